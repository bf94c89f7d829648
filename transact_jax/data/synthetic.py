"""Seeded, vectorized synthetic lifelong-sequence data.

Public data with lifelong, real-time and impression sequences does not exist (paper §4.1), so this
module builds a world in which each signal source carries information the others lack, and the
ablation of Table 2 can be *measured* rather than assumed.

The world
---------
* **Items.** ``num_topics`` topics with random unit centre vectors in R^32. An item of topic t has
  embedding ``normalize(centre_t + item_noise * g / sqrt(32))`` (g standard normal), quantized to int8
  with the paper's codec, and a quality score ``q ~ N(0, 1)`` (a dense feature the model sees).
* **Users.** Each user has

  - *long-term interests* (``lt_topics`` of them, with Dirichlet weights). A fraction of them
    (``dormant_fraction``) is **dormant**: present in the lifelong sequence S_LL, never in the
    real-time sequence S_RT. Only S_LL can reveal a dormant interest.
  - *short-term interests* (``st_topics`` topics, drawn fresh, so usually absent from S_LL, which ends
    where the real-time window starts). They drive S_RT; only S_RT reveals them.
  - *disliked topics* (``dislike_topics``): the user hides them; old hides sit in S_LL, recent ones
    (rarely) in S_RT.
  - *fatigued topics* (``fatigue_topics``): topics the user has recently been shown again and again
    without engaging. They fill the impression sequence S_imp and appear in no action sequence, so
    only S_imp reveals them.
  - an activity bias ``b ~ N(0, user_bias_std)``, given to the model as a noisy dense feature.

* **Sequences** (chronological, index 0 the oldest, int64 second timestamps):

  - S_LL: ``L ~ log-uniform[1, max_ll_len]`` tokens (``empty_ll_fraction`` of users have none) over
    the two years before the real-time window: tokens from the long-term interests (active and
    dormant), hides of disliked topics, and exploration of random topics. ``fixed_ll_length``
    gives every user the same length instead (serving benchmarks at the full L_LL).
  - S_RT: up to ``max_rt_len`` tokens in the hours before the request, a topic Markov chain (stay on a
    topic with ``rt_stickiness``) over short-term interests, active long-term interests and random
    topics, with occasional hides of disliked topics. The chain gives the Next Action Loss something
    to predict.
  - S_imp: up to ``max_imp_len`` impressions (shown, not engaged) in the same window: fatigued topics,
    short-term topics that happened not to be engaged, and random topics.
  - Action sets are multi-hot (e.g. click + repin + closeup); surfaces are drawn with homefeed first.

* **Requests.** One ranking request ("chunk", paper §4.2.1) per user with ``candidates_per_request``
  candidates drawn from a mixture of the user's short-term, active long-term, dormant, disliked,
  fatigued and random topics (``candidate_mix``). Labels come from logits that add the effects of the
  mechanisms above (``click_effects``, ``repin_effects``, ``hide_effects``; repins lean on long-term
  and dormant interests, clicks on short-term ones, hides on dislikes and fatigue), plus quality and
  user bias. A hidden candidate gets no click or repin.

Nothing about the ablation ordering is forced: the effects only say which sequence *could* reveal a
label; whether a model learns it is measured by training (``examples/ablation.py``).

Generation streams users in chunks of ``users_per_chunk``; chunk ``i`` is a pure function of
``(seed, i)``, so the output is deterministic and any chunk can be regenerated alone.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterator, Optional, Tuple

import numpy as np

from pallas_kernels.int8_codec import quantize_int8
from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data.schema import JaggedSequences, RequestBatch, TokenFields

# Candidate sources, in the order of SyntheticConfig.candidate_mix.
SOURCES: Tuple[str, ...] = ("short_term", "long_term", "dormant", "disliked", "fatigued", "random")
_SECONDS_PER_DAY = 86_400


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the synthetic world; defaults are the ones the benchmarks and ablations use."""

    seed: int = 0
    num_items: int = 200_000
    num_topics: int = 64
    item_noise: float = 0.6
    lt_topics: int = 6
    dormant_fraction: float = 0.5
    st_topics: int = 2
    dislike_topics: int = 2
    fatigue_topics: int = 2
    user_bias_std: float = 0.5
    empty_ll_fraction: float = 0.02
    short_rt_fraction: float = 0.2
    ll_mix: Tuple[float, float, float] = (0.85, 0.07, 0.08)   # interests, hides, exploration
    rt_stickiness: float = 0.6
    rt_mix: Tuple[float, float, float] = (0.7, 0.25, 0.05)    # short-term, active LT, random
    rt_hide_rate: float = 0.03
    imp_mix: Tuple[float, float, float] = (0.45, 0.2, 0.35)   # fatigued, short-term, random
    candidates_per_request: Tuple[int, int] = (16, 48)        # uniform, inclusive
    candidate_mix: Tuple[float, ...] = (0.2, 0.15, 0.15, 0.1, 0.15, 0.25)
    # effect of each candidate source (SOURCES order) on the label logits
    click_effects: Tuple[float, ...] = (2.2, 1.0, 0.6, -2.5, -1.5, 0.0)
    repin_effects: Tuple[float, ...] = (1.2, 1.5, 2.0, -2.5, -1.0, 0.0)
    hide_effects: Tuple[float, ...] = (-0.8, -0.5, -0.3, 3.0, 1.5, 0.0)
    click_bias: float = -1.5
    repin_bias: float = -2.8
    hide_bias: float = -3.5
    quality_weight: float = 0.5
    users_per_chunk: int = 1024
    start_time: int = 1_700_000_000
    user_id_offset: int = 0
    # every user's S_LL has exactly this many tokens (capped at max_ll_len) instead of the
    # log-uniform lengths; for serving benchmarks at the full L_LL (None: log-uniform)
    fixed_ll_length: Optional[int] = None

    def __post_init__(self):
        if self.num_topics < self.lt_topics + self.st_topics + self.dislike_topics + self.fatigue_topics:
            raise ValueError("num_topics: too few topics for the per-user topic sets")
        if self.num_items < self.num_topics:
            raise ValueError("num_items: need at least one item per topic")
        if len(self.candidate_mix) != len(SOURCES):
            raise ValueError(f"candidate_mix: need {len(SOURCES)} weights ({SOURCES})")
        for name in ("click_effects", "repin_effects", "hide_effects"):
            if len(getattr(self, name)) != len(SOURCES):
                raise ValueError(f"{name}: need {len(SOURCES)} values ({SOURCES})")
        lo, hi = self.candidates_per_request
        if not 1 <= lo <= hi:
            raise ValueError("candidates_per_request: need 1 <= low <= high")
        if self.fixed_ll_length is not None and self.fixed_ll_length < 0:
            raise ValueError(f"fixed_ll_length: must be None or >= 0, got {self.fixed_ll_length}")


@dataclasses.dataclass(frozen=True)
class ItemCatalog:
    """Items of the world: int8 embeddings (M, D), topic (M,), quality (M,), grouped by topic."""

    embeddings: np.ndarray
    topic: np.ndarray
    quality: np.ndarray
    topic_start: np.ndarray   # (T,) first item of each topic (items are sorted by topic)
    topic_count: np.ndarray   # (T,)
    centres: np.ndarray       # (T, D) float32 unit vectors

    def sample(self, rng: np.random.Generator, topics: np.ndarray) -> np.ndarray:
        """One random item id of each given topic."""
        return self.topic_start[topics] + (rng.random(topics.shape) * self.topic_count[topics]).astype(np.int64)


def make_catalog(cfg: SyntheticConfig, feat: FeatureConfig) -> ItemCatalog:
    """The item catalog of the world (a pure function of ``cfg.seed``)."""
    rng = np.random.default_rng([cfg.seed, 0xC47])
    d = feat.embedding_dim
    centres = rng.standard_normal((cfg.num_topics, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    topic = np.sort(rng.integers(0, cfg.num_topics, cfg.num_items))
    topic[:cfg.num_topics] = np.arange(cfg.num_topics)  # every topic has an item
    topic = np.sort(topic)
    emb = centres[topic] + cfg.item_noise * rng.standard_normal((cfg.num_items, d)).astype(np.float32) / np.sqrt(d)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    count = np.bincount(topic, minlength=cfg.num_topics)
    start = np.zeros(cfg.num_topics, np.int64)
    np.cumsum(count[:-1], out=start[1:])
    return ItemCatalog(quantize_int8(emb, feat.quant_scale), topic.astype(np.int32),
                       rng.standard_normal(cfg.num_items).astype(np.float32), start, count, centres)


@dataclasses.dataclass(frozen=True)
class UserState:
    """Hidden per-user truth of one chunk of users (U users)."""

    user_id: np.ndarray      # (U,)
    lt: np.ndarray           # (U, lt_topics) long-term topics
    lt_weight: np.ndarray    # (U, lt_topics)
    dormant: np.ndarray      # (U, lt_topics) bool
    st: np.ndarray           # (U, st_topics)
    disliked: np.ndarray     # (U, dislike_topics)
    fatigued: np.ndarray     # (U, fatigue_topics)
    bias: np.ndarray         # (U,)


@dataclasses.dataclass(frozen=True)
class SyntheticChunk:
    """Requests of one chunk of users, plus the hidden truth for diagnostics and tests.

    ``candidate_source[n]`` is the index into :data:`SOURCES` the candidate was drawn from;
    ``candidate_topic[n]`` its topic. Sequence token topics are in ``token_topics`` ("ll", "rt", "imp").
    """

    requests: RequestBatch
    users: UserState
    candidate_source: np.ndarray
    candidate_topic: np.ndarray
    token_topics: Dict[str, np.ndarray]


# ------------------------------------------------------------------------------------- helpers

def _distinct_topics(rng: np.random.Generator, u: int, num_topics: int, k: int) -> np.ndarray:
    """(u, k) topics, distinct within each row (first k of a random permutation per row)."""
    return np.argsort(rng.random((u, num_topics)), axis=1)[:, :k].astype(np.int32)


def _pick_column(rng: np.random.Generator, weights: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each entry of ``rows``, a column drawn from ``weights[row]`` (rows of weights sum to 1)."""
    cdf = np.cumsum(weights, axis=1)
    r = rng.random(len(rows))[:, None] * cdf[rows, -1:]
    return np.minimum((r > cdf[rows]).sum(axis=1), weights.shape[1] - 1)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    off = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=off[1:])
    return off


def _row_of_token(lengths: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(lengths)), lengths)


def _sorted_times(rng: np.random.Generator, lengths: np.ndarray, start: np.ndarray,
                  end: np.ndarray) -> np.ndarray:
    """Per row, ``lengths[u]`` sorted int64 times in [start[u], end[u]), flat."""
    rows = _row_of_token(lengths)
    frac = np.sort(rows + rng.random(len(rows)))  # sorted within each row since rows are grouped
    frac -= rows
    return (start[rows] + frac * (end[rows] - start[rows])).astype(np.int64)


def _actions(rng: np.random.Generator, n: int, hide: np.ndarray, feat: FeatureConfig) -> np.ndarray:
    """Multi-hot action bitmasks: positive engagements, or hide (+ sometimes closeup) where ``hide``."""
    probs = {"click": 0.6, "repin": 0.35, "closeup": 0.5, "long_click": 0.2, "share": 0.05,
             "comment": 0.03, "download": 0.03}
    bits = np.zeros(n, np.int64)
    for name, p in probs.items():
        if name in feat.action_names:
            bits |= np.where(rng.random(n) < p, feat.action_bit(name), 0)
    fallback = feat.action_bit(feat.positive_actions[0])
    bits = np.where(bits == 0, fallback, bits)
    if feat.negative_actions:
        neg = feat.action_mask(feat.negative_actions)
        closeup = feat.action_bit("closeup") if "closeup" in feat.action_names else 0
        hide_bits = neg | np.where(rng.random(n) < 0.3, closeup, 0)
        bits = np.where(hide, hide_bits, bits)
    return bits.astype(feat.action_dtype)


def _surfaces(rng: np.random.Generator, n: int, feat: FeatureConfig) -> np.ndarray:
    w = np.full(feat.num_surfaces, 1.0)
    w[0] = 4.0  # homefeed first
    return rng.choice(feat.num_surfaces, size=n, p=w / w.sum()).astype(np.int16)


def _tokens(rng, catalog, topics, times, hide, feat) -> TokenFields:
    items = catalog.sample(rng, topics)
    return TokenFields(times, _actions(rng, len(topics), hide, feat), _surfaces(rng, len(topics), feat),
                       catalog.embeddings[items])


# ----------------------------------------------------------------------------------- generation

def _users(rng: np.random.Generator, cfg: SyntheticConfig, first_user: int, u: int) -> UserState:
    k = cfg.lt_topics + cfg.st_topics + cfg.dislike_topics + cfg.fatigue_topics
    topics = _distinct_topics(rng, u, cfg.num_topics, k)
    a, b, c = cfg.lt_topics, cfg.lt_topics + cfg.st_topics, cfg.lt_topics + cfg.st_topics + cfg.dislike_topics
    dormant = rng.random((u, cfg.lt_topics)) < cfg.dormant_fraction
    # keep at least one active long-term interest so S_RT has one to draw from
    dormant[np.arange(u), rng.integers(0, cfg.lt_topics, u)] = False
    return UserState(
        user_id=np.arange(first_user, first_user + u, dtype=np.int64),
        lt=topics[:, :a], lt_weight=rng.dirichlet(np.ones(cfg.lt_topics), size=u),
        dormant=dormant, st=topics[:, a:b], disliked=topics[:, b:c], fatigued=topics[:, c:],
        bias=(cfg.user_bias_std * rng.standard_normal(u)).astype(np.float32))


def _mixture(rng: np.random.Generator, rows: np.ndarray, mix, pools, num_topics: int) -> np.ndarray:
    """Topic per token: choose a pool by ``mix`` then a uniform topic of that (U, k) pool row;
    a ``None`` pool means a uniformly random topic."""
    which = rng.choice(len(mix), size=len(rows), p=np.asarray(mix) / np.sum(mix))
    out = rng.integers(0, num_topics, len(rows)).astype(np.int32)
    for i, pool in enumerate(pools):
        sel = np.nonzero(which == i)[0]
        if pool is None or not len(sel):
            continue
        col = (rng.random(len(sel)) * pool.shape[1]).astype(np.int64)
        out[sel] = pool[rows[sel], col]
    return out


def _lifelong(rng, cfg, sel, users, catalog, t_rt_start, feat):
    u = len(users.user_id)
    max_ll = sel.max_ll_len
    lengths = np.exp(rng.uniform(0, np.log(max_ll + 1), u)).astype(np.int64)
    lengths = np.clip(lengths, 1, max_ll)
    lengths[rng.random(u) < cfg.empty_ll_fraction] = 0
    if cfg.fixed_ll_length is not None:
        lengths[:] = min(cfg.fixed_ll_length, max_ll)
    rows = _row_of_token(lengths)
    kind = rng.choice(3, size=len(rows), p=np.asarray(cfg.ll_mix) / np.sum(cfg.ll_mix))
    topics = rng.integers(0, cfg.num_topics, len(rows)).astype(np.int32)
    interest = np.nonzero(kind == 0)[0]
    topics[interest] = users.lt[rows[interest], _pick_column(rng, users.lt_weight, rows[interest])]
    hides = kind == 1
    hide_idx = np.nonzero(hides)[0]
    topics[hide_idx] = users.disliked[rows[hide_idx],
                                      rng.integers(0, users.disliked.shape[1], len(hide_idx))]
    times = _sorted_times(rng, lengths, t_rt_start - 730 * _SECONDS_PER_DAY, t_rt_start)
    return JaggedSequences(_tokens(rng, catalog, topics, times, hides, feat), _offsets(lengths)), topics


def _realtime(rng, cfg, sel, users, catalog, t_rt_start, t_req, feat):
    u = len(users.user_id)
    lengths = np.full(u, sel.max_rt_len, np.int64)
    short = rng.random(u) < cfg.short_rt_fraction
    lengths[short] = rng.integers(0, max(sel.r, 1), short.sum())
    rows = _row_of_token(lengths)
    active_lt = np.where(users.dormant, -1, users.lt)
    # draw from active long-term topics only: replace dormant slots with an active one of the row
    first_active = np.take_along_axis(users.lt, np.argmin(users.dormant, axis=1)[:, None], 1)
    active_lt = np.where(active_lt < 0, first_active, active_lt)
    fresh = _mixture(rng, rows, cfg.rt_mix, (users.st, active_lt, None), cfg.num_topics)
    # topic Markov chain: keep the previous token's topic with probability rt_stickiness
    off = _offsets(lengths)
    switch = rng.random(len(rows)) >= cfg.rt_stickiness
    switch[off[:-1][lengths > 0]] = True
    last_switch = np.maximum.accumulate(np.where(switch, np.arange(len(rows)), 0))
    topics = fresh[last_switch]
    hides = rng.random(len(rows)) < cfg.rt_hide_rate
    hide_idx = np.nonzero(hides)[0]
    topics[hide_idx] = users.disliked[rows[hide_idx],
                                      rng.integers(0, users.disliked.shape[1], len(hide_idx))]
    times = _sorted_times(rng, lengths, t_rt_start, t_req)
    return JaggedSequences(_tokens(rng, catalog, topics, times, hides, feat), off), topics


def _impressions(rng, cfg, sel, users, catalog, t_rt_start, t_req, feat):
    u = len(users.user_id)
    lengths = rng.integers(0, sel.max_imp_len + 1, u)
    rows = _row_of_token(lengths)
    topics = _mixture(rng, rows, cfg.imp_mix, (users.fatigued, users.st, None), cfg.num_topics)
    items = catalog.sample(rng, topics)
    times = _sorted_times(rng, lengths, t_rt_start, t_req)
    tokens = TokenFields(times, np.zeros(len(rows), feat.action_dtype), _surfaces(rng, len(rows), feat),
                         catalog.embeddings[items])
    return JaggedSequences(tokens, _offsets(lengths)), topics


def _candidates(rng, cfg, users, catalog, feat, lengths_ll, lengths_rt, lengths_imp):
    u = len(users.user_id)
    lo, hi = cfg.candidates_per_request
    counts = rng.integers(lo, hi + 1, u)
    c2r = _row_of_token(counts).astype(np.int32)
    n = len(c2r)
    source = rng.choice(len(SOURCES), size=n, p=np.asarray(cfg.candidate_mix) / np.sum(cfg.candidate_mix))
    topic = rng.integers(0, cfg.num_topics, n).astype(np.int32)
    # long-term / dormant candidates come from the matching subset of long-term topics;
    # users with no dormant interest get an active one instead (their source is relabelled)
    pools = {0: users.st, 3: users.disliked, 4: users.fatigued}
    for s, pool in pools.items():
        idx = np.nonzero(source == s)[0]
        topic[idx] = pool[c2r[idx], rng.integers(0, pool.shape[1], len(idx))]
    for s, want_dormant in ((1, False), (2, True)):
        idx = np.nonzero(source == s)[0]
        w = np.where(users.dormant == want_dormant, users.lt_weight + 1e-3, 0.0)
        has = w.sum(axis=1) > 0
        w = np.where(has[:, None], w, users.lt_weight)
        col = _pick_column(rng, w / w.sum(axis=1, keepdims=True), c2r[idx])
        topic[idx] = users.lt[c2r[idx], col]
        source[idx] = np.where(users.dormant[c2r[idx], col], 2, 1)
    items = catalog.sample(rng, topic)
    quality = catalog.quality[items]

    def bern(bias, effects):
        logit = bias + np.asarray(effects, np.float32)[source] + cfg.quality_weight * quality + users.bias[c2r]
        return rng.random(n) < 1.0 / (1.0 + np.exp(-logit))

    hide = bern(cfg.hide_bias, cfg.hide_effects)
    click = bern(cfg.click_bias, cfg.click_effects) & ~hide
    repin = bern(cfg.repin_bias, cfg.repin_effects) & ~hide
    by_head = {"click": click, "repin": repin, "hide": hide}
    labels = np.stack([by_head.get(h, np.zeros(n, bool)) for h in feat.heads], 1).astype(np.uint8)

    hour = rng.random(u) * 2 * np.pi
    dense_cols = [
        quality,
        np.log1p(lengths_ll[c2r]) / 10.0,
        np.log1p(lengths_rt[c2r]) / 5.0,
        lengths_imp[c2r] / 100.0,
        users.bias[c2r] + 0.3 * rng.standard_normal(n),
        np.log(catalog.topic_count[topic] / catalog.topic_count.mean()),
        np.sin(hour)[c2r],
        np.cos(hour)[c2r],
    ]
    dense = np.zeros((n, feat.num_dense), np.float32)
    for i, col in enumerate(dense_cols[:feat.num_dense]):
        dense[:, i] = col
    cat_cols = [users.user_id[c2r], topic, rng.integers(0, 1 << 30, u)[c2r]]
    categorical = np.zeros((n, len(feat.categorical_vocab_sizes)), np.int32)
    for i, vocab in enumerate(feat.categorical_vocab_sizes):
        categorical[:, i] = cat_cols[i % len(cat_cols)] % vocab
    return dict(counts=counts, c2r=c2r, source=source, topic=topic, items=items, labels=labels,
                dense=dense, categorical=categorical)


def generate_chunk(cfg: SyntheticConfig, feat: FeatureConfig, sel: SelectionConfig, chunk_index: int,
                   catalog: Optional[ItemCatalog] = None, num_users: Optional[int] = None) -> SyntheticChunk:
    """Users ``[chunk_index * users_per_chunk, ... + num_users)`` and their requests.

    A pure function of ``(cfg, feat, sel, chunk_index, num_users)``.
    """
    catalog = catalog or make_catalog(cfg, feat)
    u = cfg.users_per_chunk if num_users is None else num_users
    rng = np.random.default_rng([cfg.seed, 1, chunk_index])
    users = _users(rng, cfg, cfg.user_id_offset + chunk_index * cfg.users_per_chunk, u)
    t_req = cfg.start_time + rng.integers(0, 7 * _SECONDS_PER_DAY, u).astype(np.int64)
    t_rt_start = t_req - rng.integers(3600, 6 * 3600, u).astype(np.int64)
    ll, ll_topics = _lifelong(rng, cfg, sel, users, catalog, t_rt_start, feat)
    rt, rt_topics = _realtime(rng, cfg, sel, users, catalog, t_rt_start, t_req, feat)
    imp, imp_topics = _impressions(rng, cfg, sel, users, catalog, t_rt_start, t_req, feat)
    c = _candidates(rng, cfg, users, catalog, feat, ll.lengths, rt.lengths, imp.lengths)
    requests = RequestBatch(
        ll=ll, rt=rt, imp=imp, user_id=users.user_id,
        request_id=users.user_id.copy(),  # one request (chunk) per user
        request_timestamp=t_req,
        cand_item_id=c["items"].astype(np.int64), cand_embedding=catalog.embeddings[c["items"]],
        cand_to_req=c["c2r"], dense=c["dense"], categorical=c["categorical"], labels=c["labels"])
    return SyntheticChunk(requests, users, c["source"].astype(np.int8), c["topic"],
                          {"ll": ll_topics, "rt": rt_topics, "imp": imp_topics})


def iter_chunks(cfg: SyntheticConfig, feat: FeatureConfig, sel: SelectionConfig,
                num_users: int, catalog_seed: Optional[int] = None) -> Iterator[SyntheticChunk]:
    """Stream ``num_users`` users in chunks of ``cfg.users_per_chunk`` (the last may be smaller).

    ``catalog_seed`` (default ``cfg.seed``) picks the item catalog, so that users of another seed can
    live in the same world (e.g. held-out evaluation users).
    """
    seed = cfg.seed if catalog_seed is None else catalog_seed
    catalog = make_catalog(dataclasses.replace(cfg, seed=seed), feat)
    for i, start in enumerate(range(0, num_users, cfg.users_per_chunk)):
        yield generate_chunk(cfg, feat, sel, i, catalog, min(cfg.users_per_chunk, num_users - start))
