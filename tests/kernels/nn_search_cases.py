"""NN-search test data and the float64 brute force every implementation is checked against
(builders for the tests in this folder, not a test module).

The brute force dequantizes, L2-normalizes and scores in float64, ranks valid tokens by
``(-score, index)`` (ties to the lower index), keeps K and sorts them chronologically, padding
(index -1, score -inf) last. The implementations compute in float32, so when the float64 K-th and
(K+1)-th scores are closer than ``NEAR_TIE`` the selected *scores* are compared instead of the
index sets.
"""
from __future__ import annotations

import numpy as np

from pallas_kernels.nn_search.reference import PAD_INDEX

NEAR_TIE = 1e-5
"""float64 score gap below which float32 rounding may legitimately swap the K-th and (K+1)-th token."""
SCORE_ATOL = 1e-5
"""Tolerance of the returned float32 cosines against float64."""
SCALE = 0.65


def brute_force(seq_q, lengths, cand, cand_to_req, k, scale=SCALE):
    """float64 NN selection. Returns (indices (N, k), scores (N, k), near_tie (N,), all_scores (N, L))."""
    seq = seq_q.astype(np.float64) * scale / 127
    seq = seq / np.maximum(np.linalg.norm(seq, axis=-1, keepdims=True), 1e-12)
    c = np.asarray(cand, np.float64)
    c = c / np.maximum(np.linalg.norm(c, axis=-1, keepdims=True), 1e-12)
    n = len(cand_to_req)
    idx = np.full((n, k), -1, np.int64)
    scores = np.full((n, k), -np.inf)
    near = np.zeros(n, bool)
    # elementwise product + sum (not a BLAS matmul): identical tokens get bit-identical scores
    all_scores = np.sum(seq[cand_to_req] * c[:, None, :], axis=-1)
    for i in range(n):
        length = int(lengths[cand_to_req[i]])
        s = all_scores[i, :length]
        ranked = sorted(range(length), key=lambda j: (-s[j], j))
        top = sorted(ranked[:k])
        idx[i, :len(top)] = top
        scores[i, :len(top)] = s[top]
        # an exact float64 tie (identical codes) must still go to the lower index: not a near tie
        if length > k and 0 < s[ranked[k - 1]] - s[ranked[k]] < NEAR_TIE:
            near[i] = True
    return idx, scores, near, all_scores


def check_against_brute(got_idx, got_scores, seq_q, lengths, cand, cand_to_req, k, label=""):
    """Assert a result matches the brute force; returns the number of near-tie rows."""
    got_idx = np.asarray(got_idx)
    got_scores = np.asarray(got_scores)
    n = len(cand_to_req)
    assert got_idx.shape == (n, k) and got_idx.dtype == np.int32, label
    assert got_scores.shape == (n, k) and got_scores.dtype == np.float32, label
    want_idx, want_scores, near, all_scores = brute_force(seq_q, lengths, cand, cand_to_req, k)
    for i in range(n):
        length = int(lengths[cand_to_req[i]])
        msg = f"{label} candidate {i} (length {length}, k {k})"
        n_valid = min(length, k)
        # structure: n_valid real tokens, ascending, within [0, length); then padding
        assert np.all(got_idx[i, n_valid:] == PAD_INDEX), msg
        assert np.all(np.isneginf(got_scores[i, n_valid:])), msg
        real = got_idx[i, :n_valid]
        assert np.all((real >= 0) & (real < length)), msg
        assert np.all(np.diff(real) > 0), msg
        # scores are the float64 cosines of the returned tokens
        np.testing.assert_allclose(got_scores[i, :n_valid], all_scores[i, real], atol=SCORE_ATOL,
                                   rtol=0, err_msg=msg)
        if near[i]:
            np.testing.assert_allclose(np.sort(all_scores[i, real]), np.sort(want_scores[i, :n_valid]),
                                       atol=2 * NEAR_TIE, rtol=0, err_msg=msg)
        else:
            np.testing.assert_array_equal(got_idx[i], want_idx[i], err_msg=msg)
    return int(near.sum())


def random_case(seed: int, lengths, n: int, d: int = 32, dup: bool = True):
    """Dense sequences (U, max(lengths), d) int8 with exact ties (duplicated tokens, an all-zero
    token), N candidates in random requests: one equal to a duplicated token, one all-zero.
    Returns (seq, lengths, cand, cand_to_req)."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths)
    width = max(int(lengths.max()), 1)
    seq = rng.integers(-127, 128, (len(lengths), width, d)).astype(np.int8)
    if dup:   # exact duplicates of earlier tokens and an all-zero token: exact ties
        for u, length in enumerate(lengths):
            if length >= 6:
                seq[u, length - 1] = seq[u, 1]
                seq[u, length // 2] = seq[u, 1]
                seq[u, 3] = 0
    cand = rng.normal(size=(n, d)).astype(np.float32)
    if n > 2:
        cand[1] = seq[0, 1].astype(np.float32)         # a candidate that *is* a duplicated token
        cand[2] = 0.0                                  # a zero candidate: every score 0, all tie
    c2r = rng.integers(0, len(lengths), n).astype(np.int32)
    return seq, lengths.astype(np.int32), cand, c2r


def near_token_case(rng, u, length, d, lengths=None, n_per_req=4):
    """Dense sequences and ``n_per_req`` shuffled candidates per request, half of them close to a
    valid token of their request (a high, well-separated top). Returns (seq, lengths, cand, c2r)."""
    seq = rng.integers(-127, 128, (u, length, d)).astype(np.int8)
    if lengths is None:
        lengths = rng.integers(0, length + 1, u)
    lengths = np.asarray(lengths, np.int32)
    c2r = np.repeat(np.arange(u), n_per_req).astype(np.int32)
    rng.shuffle(c2r)
    n = len(c2r)
    cand = rng.normal(0, 0.3, (n, d))
    for i in range(0, n, 2):
        lu = lengths[c2r[i]]
        if lu:
            j = rng.integers(0, lu)
            cand[i] = seq[c2r[i], j] * SCALE / 127 + rng.normal(0, 0.05, d)
    return seq, lengths, cand, c2r


def to_jagged(seq, lengths, rng=None):
    """The jagged layout of dense ``seq``: (tokens (T, D), offsets (U,)). With ``rng``, random junk
    tokens lie before, between and after the requests' tokens (offsets must be honoured)."""
    parts, offsets, start = [], [], 0
    for u, length in enumerate(lengths):
        if rng is not None:
            gap = rng.integers(-127, 128, (int(rng.integers(0, 4)), seq.shape[-1])).astype(np.int8)
            parts.append(gap)
            start += len(gap)
        parts.append(seq[u, :length])
        offsets.append(start)
        start += int(length)
    if rng is not None:
        parts.append(rng.integers(-127, 128, (3, seq.shape[-1])).astype(np.int8))
    return np.concatenate(parts).astype(np.int8), np.asarray(offsets, np.int32)
