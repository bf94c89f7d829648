"""Interaction logs (ratings, clicks) to ranking requests: the recipe for public data sets.

Public logs such as MovieLens record what users rated, not what they were shown, so ranking
requests have to be made from them. :func:`build_event_logs` turns an :class:`Interactions` table
(user, item, timestamp, and either a rating or an action name, optionally an exposure flag) into
event logs of :mod:`transact_jax.data.events`, split by time into train / eval / test, following an
:class:`InteractionRecipe`:

1. **Actions.** A rating ``>= positive_rating`` is a ``click`` plus a ``repin``, a rating
   ``<= negative_rating`` a ``hide``, anything between a ``click``; an ``action`` column is used as
   it is. Rows with ``exposed = 1`` are impressions (the item was shown, not engaged with). Every
   explicit interaction becomes an event on surface ``surface``.
2. **Requests.** A user's explicit interactions are cut into sessions wherever ``session_gap_s``
   passes without one; each session is one ranking request at ``T`` = the session's first timestamp,
   whose candidates are the session's items (the first interaction of each item in the session).
   Labels per head: ``click`` = a non-hide interaction, ``repin`` = a ``repin``, ``hide`` = a
   ``hide``. Sequences come from events strictly before ``T`` (the builder's rule), so nothing of the
   session itself or later is visible.
3. **Negatives.** Impressions of the session (exposures at ``T <= t <= session end`` the user did
   not engage with) are candidates with all-zero labels. When a request has fewer than
   ``negatives_per_request`` of them, the rest are sampled from the items interacted with in the
   request's own period (train, eval or test; see 4) with probability proportional to
   ``count ** popularity_power`` in that period (popularity-sampled), never an item the user
   interacted with up to the session's end; deterministic in ``seed``. Sampling by the period's own
   popularity makes negatives follow the item distribution of that period's positives. Sampling
   from the training period instead would give a label away: items new in the eval or test period
   (unseen in training, so with zero embeddings) would then appear only among positives.
4. **Split** by request time, with no leakage into features: requests with ``T`` before the
   ``eval_quantile`` quantile of request times are train, then eval up to ``test_quantile``, then
   test. Item embeddings (:mod:`transact_jax.data.item_embeddings`) are learned from interactions
   before the eval cutoff only; sequences hold only events before each request.
5. **Item identity** (optional, ``item_id_feature``): the candidate's item id as a categorical
   feature (request column ``cat_<item_id_column>``), so the ranking tower can learn an embedding
   (and a wide weight) per item next to the content embedding. ``"full"``: one category per item
   seen in the training period (by id order, from 1), 0 for every other item (out of vocabulary:
   new items share one learned row); the column's vocabulary must hold them
   (:func:`feature_config_for` sizes it). ``"hashed"``: a 64-bit mix of the id modulo the column's
   vocabulary size, for every item (collisions share a row; no vocabulary to build).

The returned event logs share events and items; each has its split's requests.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import numpy as np

from transact_jax.config import FeatureConfig
from transact_jax.data.events import EventLog, EventTable, ItemTable, RequestTable
from transact_jax.data.events.columns import to_seconds
from transact_jax.data.item_embeddings import ItemEmbeddingConfig, learn_item_embeddings
from transact_jax.data.schema import SchemaError

SPLITS = ("train", "eval", "test")
ITEM_ID_FEATURES = ("none", "full", "hashed")


@dataclasses.dataclass(frozen=True)
class Interactions:
    """One row per interaction: ``user_id``, ``item_id``, ``timestamp`` (int64 seconds), and
    ``rating`` (float) or ``action`` (names), ``exposed`` (bool, optional: the row is an impression)."""

    user_id: np.ndarray
    item_id: np.ndarray
    timestamp: np.ndarray
    rating: Optional[np.ndarray] = None
    action: Optional[np.ndarray] = None
    exposed: Optional[np.ndarray] = None

    def __post_init__(self):
        n = len(self.user_id)
        for name in ("user_id", "item_id", "timestamp"):
            a = np.asarray(getattr(self, name))
            if a.ndim != 1 or len(a) != n or (a.size and a.dtype.kind not in "iu"):
                raise SchemaError(name, f"expected a 1-D integer array of {n} rows, got "
                                        f"{a.dtype} {a.shape}")
            if a.size and a.min() < 0:
                raise SchemaError(name, f"negative value {a.min()}")
        if (self.rating is None) == (self.action is None):
            raise SchemaError("rating", "give exactly one of rating and action")
        if n == 0:
            raise SchemaError("user_id", "no interactions")
        for name in ("rating", "action", "exposed"):
            a = getattr(self, name)
            if a is not None and np.asarray(a).shape != (n,):
                raise SchemaError(name, f"expected {n} rows, got shape {np.asarray(a).shape}")
        if self.rating is not None:
            r = np.asarray(self.rating)
            if r.dtype.kind not in "iuf" or not np.isfinite(r.astype(np.float64)).all():
                bad = np.flatnonzero(~np.isfinite(r.astype(np.float64)))[:1].tolist()
                raise SchemaError("rating", f"expected finite numbers (first bad row {bad})")


@dataclasses.dataclass(frozen=True)
class InteractionRecipe:
    """How interactions become requests (module docstring). Ratings are on the data's scale;
    ``timestamp_unit`` ("s", "ms" or "us") is the unit of the timestamps (converted to seconds;
    values that look like a finer unit than declared are refused, naming it)."""

    positive_rating: float = 4.0
    negative_rating: float = 2.0
    session_gap_s: int = 1800
    negatives_per_request: int = 20
    popularity_power: float = 1.0
    eval_quantile: float = 0.8
    test_quantile: float = 0.9
    surface: str = "other"
    seed: int = 0
    item_embeddings: ItemEmbeddingConfig = ItemEmbeddingConfig()
    item_id_feature: str = "none"
    item_id_column: int = 0
    timestamp_unit: str = "s"

    def __post_init__(self):
        if self.negative_rating >= self.positive_rating:
            raise SchemaError("negative_rating", f"must be below positive_rating "
                                                 f"({self.positive_rating}), got {self.negative_rating}")
        if self.session_gap_s < 1 or self.negatives_per_request < 0:
            raise SchemaError("session_gap_s", "session_gap_s must be >= 1 and "
                                               "negatives_per_request >= 0")
        if not 0.0 < self.eval_quantile <= self.test_quantile <= 1.0:
            raise SchemaError("eval_quantile", f"need 0 < eval_quantile <= test_quantile <= 1, got "
                                               f"{self.eval_quantile}, {self.test_quantile}")
        if self.item_id_feature not in ITEM_ID_FEATURES:
            raise SchemaError("item_id_feature", f"expected one of {ITEM_ID_FEATURES}, got "
                                                 f"{self.item_id_feature!r}")
        if self.item_id_column < 0:
            raise SchemaError("item_id_column", f"must be >= 0, got {self.item_id_column}")


def feature_config_for(data: Interactions, recipe: InteractionRecipe,
                       feat: FeatureConfig = FeatureConfig()) -> FeatureConfig:
    """``feat`` with room for the recipe's item-id feature: for ``item_id_feature="full"`` the
    vocabulary of categorical column ``item_id_column`` becomes the number of distinct items in
    ``data`` plus one (an upper bound on the training-period vocabulary and its out-of-vocabulary
    row); other recipes return ``feat`` unchanged."""
    if recipe.item_id_feature != "full":
        return feat
    vocab = list(feat.categorical_vocab_sizes)
    if recipe.item_id_column >= len(vocab):
        raise SchemaError("item_id_column", f"{recipe.item_id_column} is not a categorical column of "
                                            f"FeatureConfig.categorical_vocab_sizes ({len(vocab)} columns)")
    vocab[recipe.item_id_column] = int(len(np.unique(data.item_id))) + 1
    return dataclasses.replace(feat, categorical_vocab_sizes=tuple(vocab))


def _mix64(x: np.ndarray) -> np.ndarray:
    """A 64-bit integer mix (splitmix64's finalizer) of non-negative ids, as uint64."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def item_id_categories(items: np.ndarray, train_items: np.ndarray, recipe: InteractionRecipe,
                       feat: FeatureConfig) -> Optional[np.ndarray]:
    """The item-id feature of each of ``items`` (module docstring, 5), or None when the recipe has
    none. ``train_items`` are the items interacted with in the training period."""
    if recipe.item_id_feature == "none":
        return None
    col = recipe.item_id_column
    if col >= len(feat.categorical_vocab_sizes):
        raise SchemaError("item_id_column", f"{col} is not a categorical column of "
                                            f"FeatureConfig.categorical_vocab_sizes "
                                            f"({len(feat.categorical_vocab_sizes)} columns)")
    size = feat.categorical_vocab_sizes[col]
    items = np.asarray(items, np.int64)
    if recipe.item_id_feature == "hashed":
        return (_mix64(items) % np.uint64(size)).astype(np.int64)
    vocab = np.unique(train_items)
    if len(vocab) + 1 > size:
        raise SchemaError(f"categorical_vocab_sizes[{col}]",
                          f"item_id_feature='full' needs {len(vocab) + 1} categories ({len(vocab)} "
                          f"training items + out-of-vocabulary), the column has {size}: use "
                          f"feature_config_for() or item_id_feature='hashed'")
    pos = np.searchsorted(vocab, items)
    known = (pos < len(vocab)) & (vocab[np.minimum(pos, len(vocab) - 1)] == items)
    return np.where(known, pos + 1, 0).astype(np.int64)


def _actions(data: Interactions, recipe: InteractionRecipe, feat: FeatureConfig) -> np.ndarray:
    """(E, A) bool: the actions of each interaction (all False for impressions)."""
    n = len(data.user_id)
    acts = np.zeros((n, feat.num_actions), bool)
    if data.rating is not None:
        r = np.asarray(data.rating, np.float64)
        for name, rows in (("click", r > recipe.negative_rating), ("repin", r >= recipe.positive_rating),
                           ("hide", r <= recipe.negative_rating)):
            if name not in feat.action_names:
                raise SchemaError("rating", f"the rating recipe needs action {name!r} in "
                                            f"FeatureConfig.action_names")
            acts[rows, feat.action_names.index(name)] = True
    else:
        names = np.asarray(data.action).astype(str)
        known = np.isin(names, list(feat.action_names))
        exposed = np.zeros(n, bool) if data.exposed is None else np.asarray(data.exposed, bool)
        bad = ~known & ~exposed & (names != "impression")
        if bad.any():
            raise SchemaError("action", f"unknown action {str(names[bad][0])!r} (row {int(np.argmax(bad))}); "
                                        f"expected one of {feat.action_names} or 'impression'")
        for a, name in enumerate(feat.action_names):
            acts[:, a] = names == name
    if data.exposed is not None:
        acts[np.asarray(data.exposed, bool)] = False
    return acts


def _sessions(user: np.ndarray, time: np.ndarray, gap: int) -> Tuple[np.ndarray, np.ndarray]:
    """Session id of each row (rows sorted by user, time) and each session's (start, end) time."""
    new = np.ones(len(user), bool)
    new[1:] = (user[1:] != user[:-1]) | (time[1:] - time[:-1] > gap)
    sid = np.cumsum(new) - 1
    starts = time[new]
    ends = np.maximum.reduceat(time, np.flatnonzero(new))
    return sid, np.stack([starts, ends], 1)


def _candidates(sid, items, acts, feat: FeatureConfig):
    """Each session's distinct items (first interaction) with labels from the OR of the item's
    actions in the session: (request, item, {head: labels})."""
    key = sid.astype(np.int64) * (int(items.max()) + 1) + items
    uniq, first, pos = np.unique(key, return_index=True, return_inverse=True)
    agg = np.zeros((len(uniq), feat.num_actions), bool)
    np.logical_or.at(agg, pos.reshape(-1), acts)
    hide = feat.action_names.index("hide")
    labels = {h: np.zeros(len(uniq), np.int64) for h in feat.heads}
    labels["click"] = np.delete(agg, hide, axis=1).any(axis=1).astype(np.int64)
    labels["repin"] = agg[:, feat.action_names.index("repin")].astype(np.int64)
    labels["hide"] = agg[:, hide].astype(np.int64)
    return sid[first], items[first], labels


def _cutoff(req_time: np.ndarray, q: float) -> int:
    """The request time at quantile ``q`` (requests at or after it belong to the later split)."""
    if q >= 1.0:
        return int(req_time.max()) + 1
    return max(int(np.quantile(req_time, q, method="lower")), int(req_time.min()) + 1)


def _session_impressions(user, item, time, exposed, req_user, req_time, req_end, engaged):
    """(request, item) of exposures during each request's session that the user did not engage
    with in it, once per pair."""
    reqs, items = [], []
    by_user: Dict[int, list] = {}
    for r, u in enumerate(req_user):
        by_user.setdefault(int(u), []).append(r)
    for row in np.flatnonzero(exposed):
        for r in by_user.get(int(user[row]), ()):
            if req_time[r] <= time[row] <= req_end[r] and int(item[row]) not in engaged[r]:
                reqs.append(r)
                items.append(int(item[row]))
    if not reqs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pairs = np.unique(np.stack([reqs, items], 1).astype(np.int64), axis=0)
    return pairs[:, 0], pairs[:, 1]


def _sampled_negatives(rng, need, req_user, req_end, taken, user_items, popular, probs):
    """``need[r]`` popularity-sampled items for each request r, never an item the user interacted
    with up to the session's end nor one already among its candidates."""
    reqs, items = [], []
    todo = np.flatnonzero(need)
    if not len(todo) or not len(popular):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    width = min(len(popular), 4 * int(need.max()) + 8)
    draws = np.stack([rng.choice(len(popular), size=width, replace=False, p=probs) for _ in todo])
    for r, drawn in zip(todo, draws):
        seen_items, seen_times = user_items[int(req_user[r])]
        banned = set(seen_items[seen_times <= req_end[r]].tolist()) | taken[r]
        picks = [int(x) for x in popular[drawn] if int(x) not in banned][:int(need[r])]
        reqs += [int(r)] * len(picks)
        items += picks
    return np.asarray(reqs, np.int64), np.asarray(items, np.int64)


def build_event_logs(data: Interactions, recipe: InteractionRecipe = InteractionRecipe(),
                     feat: FeatureConfig = FeatureConfig()) -> Dict[str, Optional[EventLog]]:
    """``{"train", "eval", "test"}`` event logs from ``data`` (module docstring); a split without
    requests is None."""
    if recipe.item_embeddings.dim != feat.embedding_dim:
        raise SchemaError("item_embeddings.dim", f"{recipe.item_embeddings.dim} differs from "
                                                 f"FeatureConfig.embedding_dim={feat.embedding_dim}")
    if recipe.surface not in feat.surface_names:
        raise SchemaError("surface", f"{recipe.surface!r} is not in FeatureConfig.surface_names")
    for name in ("click", "repin", "hide"):
        if name not in feat.heads or name not in feat.action_names:
            raise SchemaError("heads", f"the recipe needs {name!r} among FeatureConfig.heads and "
                                       f"FeatureConfig.action_names")
    acts = _actions(data, recipe, feat)
    seconds = to_seconds(np.asarray(data.timestamp), "timestamp", recipe.timestamp_unit)
    exposed = np.zeros(len(acts), bool) if data.exposed is None else np.asarray(data.exposed, bool)
    order = np.lexsort((data.item_id, seconds, data.user_id))
    user, item, time = (np.asarray(a, np.int64)[order] for a in (data.user_id, data.item_id,
                                                                seconds))
    acts, exposed = acts[order], exposed[order]
    explicit = acts.any(axis=1)
    if not explicit.any():
        raise SchemaError("rating" if data.rating is not None else "action",
                          "no explicit interaction: nothing to make requests from")

    ex = np.flatnonzero(explicit)
    sid, bounds = _sessions(user[ex], time[ex], recipe.session_gap_s)
    req_user = user[ex][np.r_[0, np.flatnonzero(np.diff(sid)) + 1]]
    req_time, req_end = bounds[:, 0], bounds[:, 1]
    c_req, c_item, labels = _candidates(sid, item[ex], acts[ex], feat)

    t_eval, t_test = _cutoff(req_time, recipe.eval_quantile), _cutoff(req_time, recipe.test_quantile)
    train_period = explicit & (time < t_eval)      # item embeddings come from this period only

    n_req = len(req_time)
    engaged = [set() for _ in range(n_req)]
    for r, it in zip(c_req.tolist(), c_item.tolist()):
        engaged[r].add(it)
    i_req, i_item = _session_impressions(user, item, time, exposed, req_user, req_time, req_end,
                                         engaged)
    taken = [set(e) for e in engaged]
    for r, it in zip(i_req.tolist(), i_item.tolist()):
        taken[r].add(it)
    need = np.maximum(recipe.negatives_per_request - np.bincount(i_req, minlength=n_req), 0)
    bounds_u = np.r_[0, np.flatnonzero(np.diff(user[ex])) + 1, len(ex)]
    user_items = {int(user[ex][a]): (item[ex][a:b], time[ex][a:b])
                  for a, b in zip(bounds_u[:-1], bounds_u[1:])}
    rng = np.random.default_rng(recipe.seed)
    period = np.digitize(time, [t_eval, t_test])        # 0 train, 1 eval, 2 test
    req_period = np.digitize(req_time, [t_eval, t_test])
    sampled = []
    for p in range(len(SPLITS)):          # negatives follow the item distribution of their period
        popular, counts = np.unique(item[explicit & (period == p)], return_counts=True)
        probs = counts.astype(np.float64) ** recipe.popularity_power
        sampled.append(_sampled_negatives(rng, np.where(req_period == p, need, 0), req_user, req_end,
                                          taken, user_items, popular,
                                          probs / probs.sum() if len(probs) else probs))
    s_req = np.concatenate([r for r, _ in sampled])
    s_item = np.concatenate([i for _, i in sampled])

    rows_req = np.concatenate([c_req, i_req, s_req])
    rows_item = np.concatenate([c_item, i_item, s_item])
    zeros = np.zeros(len(i_req) + len(s_req), np.int64)
    rank = np.argsort(rows_req, kind="stable")
    rows_req, rows_item = rows_req[rank], rows_item[rank]
    row_labels = {h: np.concatenate([labels[h], zeros])[rank] for h in feat.heads}

    emb = learn_item_embeddings(user[train_period], item[train_period], time[train_period],
                                cutoff=t_eval, cfg=recipe.item_embeddings,
                                items=np.concatenate([item, rows_item]))
    items_table = ItemTable(emb.item_id, emb.embedding)
    events = _event_table(user, item, time, acts, exposed, recipe, feat)
    item_cat = item_id_categories(rows_item, item[train_period], recipe, feat)
    split_of = np.digitize(req_time[rows_req], [t_eval, t_test])
    out: Dict[str, Optional[EventLog]] = {}
    for s, name in enumerate(SPLITS):
        m = split_of == s
        cols = {"request_id": rows_req[m], "user_id": req_user[rows_req[m]],
                "timestamp": req_time[rows_req[m]], "item_id": rows_item[m],
                **{h: row_labels[h][m] for h in feat.heads}}
        if item_cat is not None:
            cols[f"cat_{recipe.item_id_column}"] = item_cat[m]
        out[name] = EventLog(events, items_table, RequestTable.from_columns(cols, feat)) \
            if m.any() else None
    return out


def _event_table(user, item, time, acts, exposed, recipe: InteractionRecipe,
                 feat: FeatureConfig) -> EventTable:
    """One event per (interaction, action); an impression event per exposed row."""
    rows, codes = np.nonzero(acts)
    imp = np.flatnonzero(exposed)
    names = np.array(list(feat.action_names) + ["impression"])
    all_rows = np.concatenate([rows, imp])
    all_codes = np.concatenate([codes, np.full(len(imp), len(feat.action_names))])
    cols = {"user_id": user[all_rows], "item_id": item[all_rows], "timestamp": time[all_rows],
            "action": names[all_codes], "surface": np.full(len(all_rows), recipe.surface)}
    return EventTable.from_columns(cols, feat)
