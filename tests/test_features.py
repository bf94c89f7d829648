"""S_all assembly and NN feature logging (paper §3.2.2 and §3.4.1; docs/design.md "S_all slots and ordering").

A hand-built batch whose NN picks are known by construction, then a randomized comparison of
``log_nn_features`` with an independent, straightforward per-candidate numpy implementation
(float64 scores), with a small score budget so that ``nn_select`` works in many chunks.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import transact_jax.data.features as features
from tests.helpers import random_requests
from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data.features import bucket_length, log_nn_features, nal_target_mask, select_s_all
from transact_jax.data.schema import JaggedSequences, RequestBatch, SchemaError, TokenFields

FEAT = FeatureConfig()
D = FEAT.embedding_dim
CLICK, REPIN, HIDE = FEAT.action_bit("click"), FEAT.action_bit("repin"), FEAT.action_bit("hide")
NEAR_TIE = 1e-5
"""float64 gap between the K-th and (K+1)-th score below which float32 may pick either token."""


def code(sim: float) -> np.ndarray:
    """int8 embedding whose cosine with axis 0 is ~sim and with axis 1 is ~sqrt(1 - sim^2)."""
    v = np.zeros(D, np.int8)
    v[0] = round(100 * sim)
    v[1] = round(100 * np.sqrt(1 - sim * sim))
    return v


C0 = np.zeros(D, np.int8)
C0[0] = 100  # candidate along axis 0: ranks tokens by sim
C1 = np.zeros(D, np.int8)
C1[1] = 100  # candidate along axis 1: ranks tokens by -sim (sims >= 0)


def jagged(seqs, base_ts):
    """Jagged sequences from per-request lists of (sim, action) tokens; timestamp = base + 1000 u + j."""
    ts, act, surf, emb, lens = [], [], [], [], []
    for u, toks in enumerate(seqs):
        lens.append(len(toks))
        for j, (sim, a) in enumerate(toks):
            ts.append(base_ts + 1000 * u + j)
            act.append(a)
            surf.append((u + j) % FEAT.num_surfaces)
            emb.append(code(sim))
    offsets = np.zeros(len(seqs) + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    return JaggedSequences(TokenFields(np.array(ts, np.int64), np.array(act, np.uint8),
                                       np.array(surf, np.int16),
                                       np.array(emb, np.int8).reshape(-1, D)), offsets)


def hand_requests():
    # request 0: known NN picks for C0 and C1; 1: all sequences empty; 2: no candidates;
    # 3: sequences shorter than every K and than r; 4: RT with only one token older than S_RT[:r].
    ll = [[(0.1, CLICK), (0.9, CLICK), (0.2, CLICK), (0.8, REPIN), (0.95, CLICK), (0.3, HIDE)],
          [], [(0.5, CLICK)] * 4, [(0.3, CLICK), (0.9, CLICK)], [(0.4, CLICK), (0.6, 0), (0.2, CLICK)]]
    rt = [[(0.5, CLICK), (0.1, 0), (0.7, HIDE), (0.99, REPIN), (0.98, CLICK)],
          [], [(0.5, CLICK)] * 3, [(0.5, CLICK)], [(0.3, CLICK), (0.6, CLICK), (0.9, HIDE)]]
    imp = [[(0.2, 0), (0.9, 0), (0.6, 0)], [], [(0.5, 0)], [(0.4, 0)], []]
    # candidates in a shuffled order: cand_to_req is not sorted
    c2r = np.array([3, 0, 4, 1, 0], np.int32)
    cand = np.stack([C0, C0, C1, C0, C1])
    n = len(c2r)
    return RequestBatch(
        ll=jagged(ll, 100_000), rt=jagged(rt, 200_000), imp=jagged(imp, 300_000),
        user_id=np.array([10, 11, 12, 13, 14], np.int64), request_id=np.array([50, 51, 52, 53, 54], np.int64),
        request_timestamp=np.arange(5, dtype=np.int64) + 1_700_000_000,
        cand_item_id=np.array([900, 901, 902, 903, 904], np.int64), cand_embedding=cand, cand_to_req=c2r,
        dense=np.arange(n * FEAT.num_dense, dtype=np.float32).reshape(n, -1),
        categorical=np.tile(np.array([[1, 2, 3]], np.int32), (n, 1)),
        labels=np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 0, 0]], np.uint8))


HAND_SEL = SelectionConfig(max_ll_len=50, max_rt_len=10, max_imp_len=10, k_ll=3, r=2, k_rt=2, k_imp=2,
                           num_nal_negatives=2)
# expected S_all source positions per candidate: [LL x3 | S_RT[:r] x2 | NN(S_RT[r:]) x2 | imp x2]
HAND_INDEX = np.array([
    [0, 1, -1, 0, -1, -1, -1, 0, -1],   # cand 0 -> request 3 (C0)
    [1, 3, 4, 3, 4, 0, 2, 1, 2],        # cand 1 -> request 0 (C0): RT 3, 4 are best but recent
    [0, 1, 2, 1, 2, 0, -1, -1, -1],     # cand 2 -> request 4 (C1)
    [-1] * 9,                           # cand 3 -> request 1 (empty)
    [0, 2, 5, 3, 4, 0, 1, 0, 2],        # cand 4 -> request 0 (C1)
])
SEGMENT_BASE = [100_000] * 3 + [200_000] * 4 + [300_000] * 2


def test_bucket_length():
    assert [bucket_length(n) for n in (0, 1, 16, 17, 32, 33, 100, 1000, 1024, 1025, 3000, 10_000)] == [
        16, 16, 16, 32, 32, 64, 128, 1024, 1024, 2048, 3072, 10_240]


def test_select_s_all_hand_built():
    req = hand_requests()
    req.validate(FEAT, HAND_SEL)
    s = select_s_all(req, FEAT, HAND_SEL)
    assert HAND_SEL.s_all_len == 9
    np.testing.assert_array_equal(s.source_index, HAND_INDEX)
    np.testing.assert_array_equal(s.mask, HAND_INDEX >= 0)
    # the tokens are exactly the source tokens: timestamp = segment base + 1000 * request + position
    u = req.cand_to_req[:, None]
    want_ts = np.where(HAND_INDEX >= 0, np.array(SEGMENT_BASE)[None] + 1000 * u + HAND_INDEX, 0)
    np.testing.assert_array_equal(s.tokens.timestamps, want_ts)
    assert s.tokens.timestamps.dtype == np.int64 and s.tokens.embeddings.dtype == np.int8
    want_surf = np.where(HAND_INDEX >= 0, (u + HAND_INDEX) % FEAT.num_surfaces, 0)
    np.testing.assert_array_equal(s.tokens.surfaces, want_surf)
    # embeddings: request 0 / C0 keeps the LL tokens of sim 0.9, 0.8, 0.95 in chronological order
    np.testing.assert_array_equal(s.tokens.embeddings[1, :3], np.stack([code(0.9), code(0.8), code(0.95)]))
    np.testing.assert_array_equal(s.tokens.embeddings[1, 5:7], np.stack([code(0.5), code(0.7)]))
    np.testing.assert_array_equal(s.tokens.actions[1], [CLICK, REPIN, CLICK, REPIN, CLICK, CLICK, HIDE, 0, 0])
    # padding slots are all zeros
    for f in ("timestamps", "actions", "surfaces", "embeddings"):
        assert not np.any(getattr(s.tokens, f)[~s.mask]), f
    assert not np.any(s.tokens.embeddings[3])


def test_log_nn_features_hand_built():
    req = hand_requests()
    ex = log_nn_features(req, FEAT, HAND_SEL)
    ex.validate(FEAT, HAND_SEL)
    s = select_s_all(req, FEAT, HAND_SEL)
    assert len(ex) == 5
    for f in ("timestamps", "actions", "surfaces", "embeddings"):
        np.testing.assert_array_equal(getattr(ex.s_all, f), getattr(s.tokens, f))
    np.testing.assert_array_equal(ex.s_all_mask, HAND_INDEX >= 0)
    np.testing.assert_array_equal(ex.user_id, [13, 10, 14, 11, 10])
    np.testing.assert_array_equal(ex.request_id, [53, 50, 54, 51, 50])
    np.testing.assert_array_equal(ex.request_timestamp, 1_700_000_000 + np.array([3, 0, 4, 1, 0]))
    np.testing.assert_array_equal(ex.item_id, req.cand_item_id)
    np.testing.assert_array_equal(ex.candidate_embedding, req.cand_embedding)
    np.testing.assert_array_equal(ex.labels, req.labels)
    np.testing.assert_array_equal(ex.dense, req.dense)
    np.testing.assert_array_equal(ex.categorical, req.categorical)
    # NAL targets: S_RT[:2] of request 0 is (repin, click): t=0 -> next token is a click.
    # request 4: (click, hide): hide is not positive. requests 3 and 1: fewer than 2 recent tokens.
    np.testing.assert_array_equal(ex.nal_target_mask, [[0, 0], [1, 0], [0, 0], [0, 0], [1, 0]])
    # NAL negatives: the 2 most recent impressions, chronological, padding last
    np.testing.assert_array_equal(ex.nal_negative_mask, [[1, 0], [1, 1], [0, 0], [0, 0], [1, 1]])
    np.testing.assert_array_equal(ex.nal_negatives[1], np.stack([code(0.9), code(0.6)]))
    np.testing.assert_array_equal(ex.nal_negatives[0, 0], code(0.4))
    assert not np.any(ex.nal_negatives[0, 1]) and not np.any(ex.nal_negatives[2:4])
    assert ex.nal_negatives.shape == (5, 2, D)


def test_s_rt_recent_segment_and_old_prefix():
    """S_RT[:r] = the r most recent RT tokens; NN(S_RT[r:]) sees only the older prefix."""
    sel = SelectionConfig(max_ll_len=10, max_rt_len=12, max_imp_len=10, k_ll=1, r=4, k_rt=3, k_imp=1,
                          num_nal_negatives=1)
    sims = [0.05, 0.1, 0.3, 0.2, 0.6, 0.97, 0.98, 0.99, 0.995]
    for rt_len in (0, 1, 3, 4, 5, 6, 9):
        rt = [[(sims[j], CLICK) for j in range(rt_len)]]
        req = dataclasses.replace(
            random_requests(np.random.default_rng(rt_len), [2], [0], [1], [1]),
            rt=jagged(rt, 200_000), cand_embedding=C0[None])
        s = select_s_all(req, FEAT, sel)
        recent = s.source_index[0, sel.segment("rt_recent")]
        old = s.source_index[0, sel.segment("rt_nn")]
        n_recent = min(rt_len, 4)
        np.testing.assert_array_equal(recent, list(range(rt_len - n_recent, rt_len)) + [-1] * (4 - n_recent))
        prefix = max(rt_len - 4, 0)
        best_old = sorted(sorted(range(prefix), key=lambda j: -sims[j])[:3])
        np.testing.assert_array_equal(old, best_old + [-1] * (3 - len(best_old)), err_msg=f"rt_len={rt_len}")
        np.testing.assert_array_equal(s.tokens.timestamps[0, sel.segment("rt_recent")],
                                      np.where(recent >= 0, 200_000 + recent, 0))


@pytest.mark.parametrize("positive, want", [
    (("click", "repin"), [0, 1, 0, 1, 0, 0]),
    (("hide",), [0, 0, 1, 1, 0, 0]),
    (("share",), [0, 0, 0, 0, 0, 0]),
])
def test_nal_target_mask_follows_positive_actions(positive, want):
    negative = ("hide",) if "hide" not in positive else ("click",)
    feat = FeatureConfig(positive_actions=positive, negative_actions=negative)
    sel = SelectionConfig(max_ll_len=10, max_rt_len=12, max_imp_len=10, k_ll=1, r=6, k_rt=1, k_imp=1,
                          num_nal_negatives=1)
    # RT (chronological): 2 older tokens, then S_RT[:6] = repin, 0, click, hide, repin|hide, 0-action
    acts = [CLICK, CLICK, REPIN, 0, CLICK, HIDE, REPIN | HIDE, 0]
    rt = jagged([[(0.5, a) for a in acts]], 200_000)
    base = random_requests(np.random.default_rng(0), [1], [0], [0], [1], feat)
    ex = log_nn_features(dataclasses.replace(base, rt=rt), feat, sel)
    ex.validate(feat, sel)
    # target t: slot t and t+1 valid and token t+1 positive; the last slot is never a target
    np.testing.assert_array_equal(ex.nal_target_mask[0], np.array(want, bool))
    s = select_s_all(dataclasses.replace(base, rt=rt), feat, sel)
    np.testing.assert_array_equal(nal_target_mask(s.tokens, s.mask, feat, sel), ex.nal_target_mask)
    # with only 3 RT tokens the segment has 3 valid slots; targets never reach padding
    rt3 = jagged([[(0.5, a) for a in (CLICK, CLICK, CLICK)]], 200_000)
    ex3 = log_nn_features(dataclasses.replace(base, rt=rt3), feat, sel)
    exp3 = [1, 1, 0, 0, 0, 0] if "click" in positive else [0] * 6
    np.testing.assert_array_equal(ex3.nal_target_mask[0], np.array(exp3, bool))


def test_empty_and_candidate_free_batches():
    sel = HAND_SEL
    rng = np.random.default_rng(3)
    none = np.zeros(0, np.int64)
    ex = log_nn_features(random_requests(rng, none, none, none, none), FEAT, sel)
    assert len(ex) == 0 and ex.s_all.embeddings.shape == (0, 9, D)
    ex.validate(FEAT, sel)
    ex = log_nn_features(random_requests(rng, [5, 0], [3, 1], [0, 4], [0, 0]), FEAT, sel)
    assert len(ex) == 0 and ex.nal_negatives.shape == (0, 2, D)
    ex.validate(FEAT, sel)
    # all sequences empty: every slot padding, zeros everywhere
    ex = log_nn_features(random_requests(rng, [0, 0], [0, 0], [0, 0], [2, 1]), FEAT, sel)
    ex.validate(FEAT, sel)
    assert len(ex) == 3 and not ex.s_all_mask.any() and not ex.nal_negative_mask.any()
    assert not ex.nal_target_mask.any()
    for a in (ex.s_all.timestamps, ex.s_all.actions, ex.s_all.surfaces, ex.s_all.embeddings, ex.nal_negatives):
        assert not np.any(a)


def test_log_nn_features_rejects_bad_requests():
    rng = np.random.default_rng(4)
    req = random_requests(rng, [3, 2], [4, 1], [2, 2], [2, 1])
    with pytest.raises(SchemaError) as info:
        log_nn_features(dataclasses.replace(req, labels=None), FEAT, HAND_SEL)
    assert info.value.field == "labels"
    bad = dataclasses.replace(req, cand_to_req=np.array([0, 0, 2], np.int32))
    with pytest.raises(SchemaError) as info:
        log_nn_features(bad, FEAT, HAND_SEL)
    assert info.value.field == "cand_to_req"
    bad = dataclasses.replace(req, cand_embedding=req.cand_embedding.astype(np.int16))
    with pytest.raises(SchemaError) as info:
        log_nn_features(bad, FEAT, HAND_SEL)
    assert info.value.field == "cand_embedding"


# ----------------------------------------------------------------- randomized vs per-candidate numpy

def _normalized(codes: np.ndarray) -> np.ndarray:
    x = codes.astype(np.float64) * FEAT.quant_scale / 127
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _nn(emb: np.ndarray, search_len: int, c: np.ndarray, k: int):
    """Straightforward NN(S[:search_len], c; k): (indices padded with -1, near_tie, float64 scores)."""
    # elementwise product + sum: identical tokens get identical scores (a BLAS matmul may sum rows
    # of a remainder tile in another order, which would break exact ties)
    s = np.sum(_normalized(emb[:search_len]) * c, axis=-1)
    ranked = sorted(range(search_len), key=lambda j: (-s[j], j))
    top = sorted(ranked[:k])
    near = search_len > k and 0 < s[ranked[k - 1]] - s[ranked[k]] < NEAR_TIE
    return np.array(top + [-1] * (k - len(top))), near, s


def _recent(length: int, count: int) -> np.ndarray:
    idx = list(range(max(length - count, 0), length))
    return np.array(idx + [-1] * (count - len(idx)))


def expected_examples(req: RequestBatch, feat: FeatureConfig, sel: SelectionConfig, actual_index: np.ndarray):
    """Per-candidate numpy S_all. Returns (expected index, near-tie flags per segment, tokens, scores).

    Tokens are gathered at ``actual_index`` where a near tie makes either choice correct (checked
    separately), else at the expected index.
    """
    n = req.num_candidates
    index = np.full((n, sel.s_all_len), -1)
    near = np.zeros((n, sel.s_all_len), bool)
    score_of = np.full((n, sel.s_all_len), np.nan)
    tokens = TokenFields.empty((n, sel.s_all_len), feat)
    src_of = {"ll": "ll", "rt_recent": "rt", "rt_nn": "rt", "imp": "imp"}
    limits = {"ll": sel.max_ll_len, "rt": sel.max_rt_len, "imp": sel.max_imp_len}
    neg = np.zeros((n, sel.num_nal_negatives, feat.embedding_dim), np.int8)
    neg_mask = np.zeros((n, sel.num_nal_negatives), bool)
    for i in range(n):
        u = int(req.cand_to_req[i])
        c = _normalized(req.cand_embedding[i])
        seqs = {}
        for name in ("ll", "rt", "imp"):
            jag = getattr(req, name)
            lo, hi = int(jag.offsets[u]), int(jag.offsets[u + 1])
            lo = max(lo, hi - limits[name])  # over-long: keep the most recent tokens
            seqs[name] = jag.tokens.map(lambda a: a[lo:hi])
        rt_len = len(seqs["rt"].timestamps)
        for name, slots in sel.segments:
            src = seqs[src_of[name]]
            length = len(src.timestamps)
            k = slots.stop - slots.start
            if name == "rt_recent":
                idx, nt, scores = _recent(length, k), False, None
            elif name == "rt_nn":
                idx, nt, scores = _nn(src.embeddings, max(rt_len - sel.r, 0), c, k)
            else:
                idx, nt, scores = _nn(src.embeddings, length, c, k)
            index[i, slots] = idx
            near[i, slots] = nt
            use = actual_index[i, slots] if nt else idx
            if scores is not None:
                score_of[i, slots] = [scores[p] if p >= 0 else np.nan for p in use]
            for f in ("timestamps", "actions", "surfaces", "embeddings"):
                out = getattr(tokens, f)
                for j, p in zip(range(slots.start, slots.stop), use):
                    if p >= 0:
                        out[i, j] = getattr(src, f)[p]
        m = _recent(len(seqs["imp"].timestamps), sel.num_nal_negatives)
        for j, p in enumerate(m):
            if p >= 0:
                neg[i, j] = seqs["imp"].embeddings[p]
                neg_mask[i, j] = True
    return index, near, score_of, tokens, neg, neg_mask


def _inject_ties(rng, req: RequestBatch, k_ll: int) -> RequestBatch:
    """Make some candidates copy an LL token that also appears k_ll + 2 times in the sequence."""
    emb = req.ll.tokens.embeddings.copy()
    cand = req.cand_embedding.copy()
    lengths = req.ll.lengths
    for i in range(0, req.num_candidates, 3):
        u = int(req.cand_to_req[i])
        if lengths[u] >= k_ll + 2:
            pos = req.ll.offsets[u] + rng.choice(lengths[u], k_ll + 2, replace=False)
            emb[pos] = emb[pos[0]]
            cand[i] = emb[pos[0]]
        elif lengths[u]:
            cand[i] = emb[req.ll.offsets[u] + rng.integers(lengths[u])]
    ll = dataclasses.replace(req.ll, tokens=dataclasses.replace(req.ll.tokens, embeddings=emb))
    return dataclasses.replace(req, ll=ll, cand_embedding=cand)


RAND_SEL = SelectionConfig(max_ll_len=250, max_rt_len=10, max_imp_len=12, k_ll=7, r=3, k_rt=4, k_imp=5,
                           num_nal_negatives=4)


@pytest.mark.parametrize("budget", [16 * 16 * 64, None])
@pytest.mark.parametrize("seed", [1, 2])
def test_log_nn_features_matches_per_candidate_numpy(monkeypatch, budget, seed):
    rng = np.random.default_rng(seed)
    u = 44
    ll_lens = np.concatenate([np.zeros(6, int), rng.integers(1, 8, 6), rng.integers(8, 40, 14),
                              rng.integers(40, 250, 12), rng.integers(251, 300, 6)])
    rng.shuffle(ll_lens)
    rt_lens = rng.integers(0, 13, u)       # up to 12: some over max_rt_len = 10
    imp_lens = rng.integers(0, 16, u)      # up to 15: some over max_imp_len = 12
    counts = rng.integers(0, 9, u)
    counts[rng.choice(u, 6, replace=False)] = 0
    counts[int(np.argmax(ll_lens))] = 20   # one request needs a wider candidate bucket
    req = random_requests(rng, ll_lens, rt_lens, imp_lens, counts)
    perm = rng.permutation(req.num_candidates)  # candidates not grouped by request
    req = dataclasses.replace(req, cand_to_req=req.cand_to_req[perm], cand_item_id=req.cand_item_id[perm],
                              cand_embedding=req.cand_embedding[perm], dense=req.dense[perm],
                              categorical=req.categorical[perm], labels=req.labels[perm])
    req = _inject_ties(rng, req, RAND_SEL.k_ll)

    calls = []
    original = features.nn_search

    def counting(seq, lens, grid, **kw):
        calls.append(seq.shape[:2] + grid.shape[1:2])
        return original(seq, lens, grid, **kw)

    monkeypatch.setattr(features, "nn_search", counting)
    if budget is not None:
        monkeypatch.setattr(features, "_SCORE_BUDGET", budget)

    ex = log_nn_features(req, FEAT, RAND_SEL)
    ex.validate(FEAT, RAND_SEL)
    if budget is not None:  # many chunks, of several shapes
        assert len(calls) > 10 and len(set(calls)) >= 4, calls
        assert all(a * b * c <= budget or a == 16 for a, b, c in calls)  # a lone request may exceed it
    else:
        assert len(calls) <= 9, calls  # few chunks at the default budget
    truncated = req.truncate_recent(RAND_SEL)
    s = select_s_all(truncated, FEAT, RAND_SEL)
    index, near, score_of, tokens, neg, neg_mask = expected_examples(req, FEAT, RAND_SEL, s.source_index)

    n = req.num_candidates
    assert len(ex) == n == int(counts.sum())
    exact = ~near
    bad = np.argwhere(exact & (s.source_index != index))
    assert not len(bad), (f"seed={seed}: (candidate, slot) {bad[:4].tolist()}: got "
                          f"{s.source_index[bad[0, 0]].tolist()}, want {index[bad[0, 0]].tolist()}")
    # near ties: the same number of tokens, and the chosen ones score like the float64 top-K
    for i, j in zip(*np.nonzero(near)):
        assert (s.source_index[i, j] >= 0) == (index[i, j] >= 0)
    for i in np.unique(np.nonzero(near)[0]):
        for name, slots in RAND_SEL.segments:
            if near[i, slots].any():
                got = s.source_index[i, slots]
                assert np.all(np.diff(got[got >= 0]) > 0)
    assert near.any(axis=1).sum() <= 3, "too many near ties: the comparison would be weak"
    # every NN pick is a top-K token in float64 (up to the near-tie band)
    np.testing.assert_array_equal(s.mask, s.source_index >= 0)
    np.testing.assert_array_equal(ex.s_all_mask, index >= 0)
    for f in ("timestamps", "actions", "surfaces", "embeddings"):
        np.testing.assert_array_equal(getattr(ex.s_all, f), getattr(tokens, f), err_msg=f)
        np.testing.assert_array_equal(getattr(s.tokens, f), getattr(tokens, f), err_msg=f)
    np.testing.assert_array_equal(ex.nal_negatives, neg)
    np.testing.assert_array_equal(ex.nal_negative_mask, neg_mask)
    # NAL targets from the expected S_RT[:r] tokens
    rt = RAND_SEL.segment("rt_recent")
    acts, valid = tokens.actions[:, rt], index[:, rt] >= 0
    want_nal = np.zeros_like(valid)
    want_nal[:, :-1] = valid[:, :-1] & valid[:, 1:] & ((acts[:, 1:] & FEAT.positive_mask) != 0)
    np.testing.assert_array_equal(ex.nal_target_mask, want_nal)
    assert want_nal.any() and ex.s_all_mask.any(axis=1).sum() > n // 2
    # per-example metadata
    c2r = req.cand_to_req
    np.testing.assert_array_equal(ex.user_id, req.user_id[c2r])
    np.testing.assert_array_equal(ex.request_id, req.request_id[c2r])
    np.testing.assert_array_equal(ex.request_timestamp, req.request_timestamp[c2r])
    np.testing.assert_array_equal(ex.item_id, req.cand_item_id)
    np.testing.assert_array_equal(ex.labels, req.labels)
    np.testing.assert_array_equal(ex.candidate_embedding, req.cand_embedding)
    # scores of the chosen NN tokens: the chosen set is a float64 top-K (within the near-tie band)
    for i in range(n):
        for name, slots in RAND_SEL.segments:
            if name == "rt_recent":
                continue
            picked = score_of[i, slots]
            picked = picked[~np.isnan(picked)]
            if len(picked):
                ui = int(c2r[i])
                src = {"ll": truncated.ll, "rt_nn": truncated.rt, "imp": truncated.imp}[name]
                length = int(src.lengths[ui]) - (RAND_SEL.r if name == "rt_nn" else 0)
                emb = src.sequence(ui).embeddings
                all_s = np.sum(_normalized(emb[:max(length, 0)]) * _normalized(req.cand_embedding[i]), -1)
                kth = np.sort(all_s)[::-1][len(picked) - 1]
                assert picked.min() >= kth - 2 * NEAR_TIE, (i, name)
