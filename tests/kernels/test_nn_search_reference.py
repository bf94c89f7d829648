"""The NN(S, c; K) reference (``pallas_kernels.nn_search.reference``) against the float64 brute force
of ``nn_search_cases`` (semantics: cosine of dequantized, L2-normalized tokens against the
normalized candidate; top K, ties to the lower index; padding never selected, -1 / -inf padding
slots; chronological order)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.int8_codec import quantize_int8
from pallas_kernels.nn_search.reference import (
    masked_top_k,
    nn_search_grouped_reference,
    nn_search_reference,
)
from tests.kernels.nn_search_cases import (
    SCALE,
    brute_force,
    check_against_brute,
    near_token_case,
)
from tests.kernels.seeds import seeds

SEEDS = seeds(101, 202, 303)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("cand_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("k", [1, 5, 37, 45])
def test_jagged_reference_matches_brute_force(seed, cand_dtype, k):
    rng = np.random.default_rng(seed)
    u, length, d = 7, 37, 32  # L = 37: prime, not a multiple of any block size
    lengths = rng.integers(0, length + 1, u)
    lengths[:4] = [0, 1, 3, length]  # empty, shorter than K, full
    seq, lengths, cand, c2r = near_token_case(rng, u, length, d, lengths, n_per_req=5)
    cand_j = jnp.asarray(cand, getattr(jnp, cand_dtype))
    cand_exact = np.asarray(cand_j.astype(jnp.float32), np.float64)  # the values the reference sees
    idx, scores = nn_search_reference(jnp.asarray(seq), jnp.asarray(lengths), cand_j,
                                      jnp.asarray(c2r), k=k)
    near = check_against_brute(idx, scores, seq, lengths, cand_exact, c2r, k,
                               label=f"seed={seed} {cand_dtype}")
    assert near <= 2, f"seed={seed}: too many near ties ({near}) - the comparison is too weak"


@pytest.mark.parametrize("seed", SEEDS)
def test_grouped_reference_matches_brute_force_and_jagged(seed):
    rng = np.random.default_rng(seed + 1)
    u, n, length, d, k = 6, 5, 53, 32, 8
    seq = rng.integers(-127, 128, (u, length, d)).astype(np.int8)
    lengths = np.array([0, 2, 8, 9, 53, int(rng.integers(0, 54))], np.int32)
    cand = rng.normal(0, 0.3, (u, n, d)).astype(np.float32)
    g_idx, g_scores = nn_search_grouped_reference(jnp.asarray(seq), jnp.asarray(lengths),
                                                  jnp.asarray(cand), k=k)
    g_idx, g_scores = np.asarray(g_idx), np.asarray(g_scores)
    assert g_idx.shape == (u, n, k) and g_scores.shape == (u, n, k)
    c2r = np.repeat(np.arange(u), n).astype(np.int32)
    flat = cand.reshape(u * n, d)
    check_against_brute(g_idx.reshape(u * n, k), g_scores.reshape(u * n, k), seq, lengths,
                        flat.astype(np.float64), c2r, k, label=f"grouped seed={seed}")
    j_idx, j_scores = nn_search_reference(jnp.asarray(seq), jnp.asarray(lengths), jnp.asarray(flat),
                                          jnp.asarray(c2r), k=k)
    _, _, near, _ = brute_force(seq, lengths, flat, c2r, k)
    j_idx = np.asarray(j_idx)
    same = ~near
    np.testing.assert_array_equal(j_idx[same], g_idx.reshape(u * n, k)[same])
    np.testing.assert_allclose(np.asarray(j_scores), g_scores.reshape(u * n, k), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_exact_ties_pick_lower_index(dtype):
    d = 32
    rng = np.random.default_rng(0)
    seq = rng.integers(-40, 41, (1, 12, d)).astype(np.int8)
    dup = quantize_int8(rng.normal(0, 0.3, d).astype(np.float32))
    for j in (2, 5, 9, 11):
        seq[0, j] = dup  # identical codes -> bit-identical scores
    cand = jnp.asarray(dup.astype(np.float32) * SCALE / 127, getattr(jnp, dtype))[None]
    lengths = jnp.asarray([12], jnp.int32)
    idx, scores = nn_search_reference(jnp.asarray(seq), lengths, cand, jnp.zeros(1, jnp.int32), k=2)
    np.testing.assert_array_equal(np.asarray(idx), [[2, 5]])
    s = np.asarray(scores)
    assert s[0, 0] == s[0, 1] and s[0, 0] == pytest.approx(1.0, abs=1e-2 if dtype == "bfloat16" else 1e-5)
    idx3, _ = nn_search_reference(jnp.asarray(seq), lengths, cand, jnp.zeros(1, jnp.int32), k=3)
    np.testing.assert_array_equal(np.asarray(idx3), [[2, 5, 9]])
    # length 10 excludes the tie at 11, k=5 keeps all three ties plus the next two best
    idx5, _ = nn_search_reference(jnp.asarray(seq), jnp.asarray([10], jnp.int32), cand,
                                  jnp.zeros(1, jnp.int32), k=5)
    idx5 = np.asarray(idx5)[0]
    assert {2, 5, 9} <= set(idx5.tolist()) and 11 not in idx5 and np.all(np.diff(idx5) > 0)


def test_all_equal_scores_pick_oldest_tokens():
    d = 32
    seq = np.tile(np.arange(-16, 16, dtype=np.int8), (2, 20, 1))
    seq[1] = 0  # all-zero embeddings: normalized to zero, score 0, never NaN
    cand = jnp.ones((3, d), jnp.float32)
    idx, scores = nn_search_reference(jnp.asarray(seq), jnp.asarray([20, 17], jnp.int32), cand,
                                      jnp.asarray([0, 1, 1], jnp.int32), k=4)
    np.testing.assert_array_equal(np.asarray(idx), [[0, 1, 2, 3]] * 3)
    assert not np.any(np.isnan(np.asarray(scores)))
    np.testing.assert_allclose(np.asarray(scores)[1:], 0.0)
    # zero candidate: every score 0 -> the lowest indices
    idx0, s0 = nn_search_grouped_reference(jnp.asarray(seq), jnp.asarray([20, 3], jnp.int32),
                                           jnp.zeros((2, 1, d)), k=4)
    np.testing.assert_array_equal(np.asarray(idx0)[:, 0], [[0, 1, 2, 3], [0, 1, 2, -1]])
    np.testing.assert_array_equal(np.asarray(s0)[:, 0], [[0, 0, 0, 0], [0, 0, 0, -np.inf]])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_padding_never_selected_even_if_identical_to_candidate(dtype):
    rng = np.random.default_rng(4)
    u, length, d, k = 4, 23, 32, 6
    target = quantize_int8(rng.normal(0, 0.3, d).astype(np.float32))
    seq = rng.integers(-127, 128, (u, length, d)).astype(np.int8)
    lengths = np.array([0, 4, 10, 22], np.int32)
    for r in range(u):
        seq[r, lengths[r]:] = target  # padding = perfect match (score 1.0)
    cand = np.tile(target.astype(np.float32) * SCALE / 127, (u, 1))
    c2r = np.arange(u, dtype=np.int32)
    idx, scores = nn_search_reference(jnp.asarray(seq), jnp.asarray(lengths),
                                      jnp.asarray(cand, getattr(jnp, dtype)), jnp.asarray(c2r), k=k)
    idx, scores = np.asarray(idx), np.asarray(scores)
    for r in range(u):
        n_valid = min(lengths[r], k)
        assert np.all((idx[r, :n_valid] >= 0) & (idx[r, :n_valid] < lengths[r]))
        assert np.all(idx[r, n_valid:] == -1) and np.all(np.isneginf(scores[r, n_valid:]))
        assert np.all(scores[r, :n_valid] < 0.9)  # random tokens, far from the padding's 1.0
    g_idx, _ = nn_search_grouped_reference(jnp.asarray(seq), jnp.asarray(lengths),
                                           jnp.asarray(cand)[:, None], k=k)
    np.testing.assert_array_equal(np.asarray(g_idx)[:, 0], idx)
    check_against_brute(idx, scores, seq, lengths,
                        np.asarray(jnp.asarray(cand, getattr(jnp, dtype)).astype(jnp.float32), np.float64),
                        c2r, k)


def test_k_larger_than_sequence_and_empty_axis():
    rng = np.random.default_rng(8)
    seq = rng.integers(-127, 128, (2, 3, 32)).astype(np.int8)
    cand = rng.normal(size=(2, 32)).astype(np.float32)
    idx, scores = nn_search_reference(jnp.asarray(seq), jnp.asarray([3, 2], jnp.int32),
                                      jnp.asarray(cand), jnp.asarray([0, 1], jnp.int32), k=5)
    np.testing.assert_array_equal(np.asarray(idx), [[0, 1, 2, -1, -1], [0, 1, -1, -1, -1]])
    check_against_brute(idx, scores, seq, np.array([3, 2]), cand.astype(np.float64), np.array([0, 1]), 5)
    # L = 0: everything is padding
    idx0, s0 = nn_search_reference(jnp.zeros((2, 0, 32), jnp.int8), jnp.zeros(2, jnp.int32),
                                    jnp.asarray(cand), jnp.asarray([1, 0], jnp.int32), k=3)
    np.testing.assert_array_equal(np.asarray(idx0), -np.ones((2, 3)))
    assert np.all(np.isneginf(np.asarray(s0)))


def test_masked_top_k_hand_values():
    s = jnp.asarray([[0.5, 0.9, 0.9, 0.1, 0.9], [0.3, -0.2, 0.3, 0.3, -0.9]], jnp.float32)
    v = jnp.asarray([[True, True, True, True, False], [False, True, True, True, True]])
    idx, sc = masked_top_k(s, v, 2)
    np.testing.assert_array_equal(np.asarray(idx), [[1, 2], [2, 3]])
    np.testing.assert_allclose(np.asarray(sc), [[0.9, 0.9], [0.3, 0.3]])
    idx, sc = masked_top_k(s, v, 3)
    np.testing.assert_array_equal(np.asarray(idx), [[0, 1, 2], [1, 2, 3]])
    np.testing.assert_allclose(np.asarray(sc), [[0.5, 0.9, 0.9], [-0.2, 0.3, 0.3]])
    idx, sc = masked_top_k(s, v, 7)  # k > L: the extra slots are padding
    np.testing.assert_array_equal(np.asarray(idx), [[0, 1, 2, 3, -1, -1, -1], [1, 2, 3, 4, -1, -1, -1]])
    np.testing.assert_allclose(np.asarray(sc)[0, :4], [0.5, 0.9, 0.9, 0.1])
    assert np.all(np.isneginf(np.asarray(sc)[:, 4:]))
    # nothing valid
    idx, sc = masked_top_k(s, jnp.zeros_like(v), 2)
    np.testing.assert_array_equal(np.asarray(idx), -np.ones((2, 2)))
    assert np.all(np.isneginf(np.asarray(sc)))
    # extra leading batch axis
    idx, _ = masked_top_k(jnp.stack([s, -s]), jnp.stack([v, v]), 2)
    np.testing.assert_array_equal(np.asarray(idx), [[[1, 2], [2, 3]], [[0, 3], [1, 4]]])


def test_scores_are_float64_cosines():
    rng = np.random.default_rng(12)
    u, length, d = 3, 64, 32
    seq = rng.integers(-127, 128, (u, length, d)).astype(np.int8)
    lengths = np.full(u, length, np.int32)
    cand = rng.normal(size=(6, d)) * rng.uniform(1e-3, 1e3, (6, 1))  # norm does not matter
    c2r = np.array([0, 0, 1, 1, 2, 2], np.int32)
    idx, scores = nn_search_reference(jnp.asarray(seq), jnp.asarray(lengths),
                                      jnp.asarray(cand, jnp.float32), jnp.asarray(c2r), k=length)
    idx, scores = np.asarray(idx), np.asarray(scores)
    np.testing.assert_array_equal(idx, np.tile(np.arange(length), (6, 1)))  # k = L keeps everything
    x = seq.astype(np.float64)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    c = cand / np.linalg.norm(cand, axis=-1, keepdims=True)
    want = np.einsum("nld,nd->nl", x[c2r], c)
    np.testing.assert_allclose(scores, want, atol=1e-5, rtol=0)
    assert np.all(np.abs(scores) <= 1 + 1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_many_exact_ties_random(seed):
    """Sequences drawn from a 5-item vocabulary: most ranks are exact ties, decided by index."""
    rng = np.random.default_rng(seed + 7)
    u, length, d, k, per = 8, 67, 32, 6, 5
    vocab = rng.integers(-127, 128, (5, d)).astype(np.int8)
    seq = vocab[rng.integers(0, 5, (u, length))]
    lengths = np.array([67, 17, 6, 5, 0, 66, 40, 23], np.int32)
    c2r = np.repeat(np.arange(u), per).astype(np.int32)
    cand = np.concatenate([vocab[rng.integers(0, 5, len(c2r) - 3)] * (SCALE / 127),
                           rng.normal(size=(3, d))]).astype(np.float32)
    idx, scores = nn_search_reference(jnp.asarray(seq), jnp.asarray(lengths), jnp.asarray(cand),
                                      jnp.asarray(c2r), k=k)
    near = check_against_brute(idx, scores, seq, lengths, cand.astype(np.float64), c2r, k,
                               label=f"seed={seed}")
    assert near == 0
    g_idx, _ = nn_search_grouped_reference(jnp.asarray(seq), jnp.asarray(lengths),
                                           jnp.asarray(cand.reshape(u, per, d)), k=k)
    np.testing.assert_array_equal(np.asarray(g_idx).reshape(-1, k), np.asarray(idx))


@pytest.mark.parametrize("seed", seeds(17))
def test_without_cand_to_req_candidate_n_owns_sequence_n(seed):
    """``cand_to_req=None`` (the broadcast layout, U == N): the same selection as
    ``cand_to_req = arange(N)``, bit for bit (the scores are position-invariant sums)."""
    rng = np.random.default_rng(seed)
    seq, lengths, cand, _ = near_token_case(rng, 9, 41, 32, n_per_req=1)
    c2r = np.arange(9, dtype=np.int32)
    got = nn_search_reference(jnp.asarray(seq), jnp.asarray(lengths), jnp.asarray(cand, jnp.float32), k=6)
    want = nn_search_reference(jnp.asarray(seq), jnp.asarray(lengths), jnp.asarray(cand, jnp.float32),
                               jnp.asarray(c2r), k=6)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    check_against_brute(*got, seq, lengths, np.asarray(cand, np.float32).astype(np.float64), c2r, 6,
                        label=f"seed={seed}")
    with pytest.raises(ValueError, match="cand: without cand_to_req"):
        nn_search_reference(jnp.asarray(seq), jnp.asarray(lengths), jnp.asarray(cand[:4]), k=6)
