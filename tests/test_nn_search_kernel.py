"""Fused NN-search kernel (``pallas_kernels/nn_search.py``) against the float64 brute force of the
reference tests (same near-tie band), against the jnp reference bit for bit where no near tie
exists, and the on-device S_all assembly against the logged-feature path.

On CPU the kernel runs in Pallas interpret mode; ``gpu`` tests compile it with Triton.
"""
from __future__ import annotations

import numpy as np
import pytest
import jax.numpy as jnp

from pallas_kernels.int8_codec import QUANT_SCALE
from pallas_kernels.nn_search import MAX_K, NNSearchConfig, _search, nn_search, nn_search_jagged
from pallas_kernels.nn_search_reference import nn_search_reference
from tests.helpers import random_requests
from tests.test_nn_selection import check_against_brute
from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data.device_features import DeviceSequences, select_s_all_device
from transact_jax.data.features import select_s_all


def random_case(seed: int, lengths, n: int, d: int = 32, dup: bool = True):
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


# the default (tensor-core scores, 1-bit radix, one chunk) and a variant with every other code path:
# float32 FMA scores, 2-bit radix digits, more bins and survivors, a wider block, no unrolling
CONFIGS = [NNSearchConfig(),
           NNSearchConfig(block_c=32, block_t=32, bins=512, survivors=512, radix_bits=2,
                          scores="fma", unroll=1, num_stages=1)]


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "wide"])
@pytest.mark.parametrize("k", [1, 7, 96, 128])
def test_matches_brute_force(k, config):
    seq, lengths, cand, c2r = random_case(k + config.block_t, [0, 1, 5, 97, 300, 129, 64], 45)
    idx, scores = nn_search(seq, lengths, cand, c2r, k=k, config=config)
    check_against_brute(idx, scores, seq, lengths, cand, c2r, k, label=f"kernel k={k}")
    ref_idx, ref_scores = nn_search_reference(seq, lengths, cand, c2r, k=k)
    # the reference and the kernel differ only in float32 rounding of scores
    np.testing.assert_allclose(np.asarray(scores), np.asarray(ref_scores), atol=1e-6, rtol=0)


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "wide"])
def test_long_sequence_and_many_candidates_per_request(config):
    seq, lengths, cand, c2r = random_case(3, [2000, 700], 70)
    idx, scores = nn_search(seq, lengths, cand, c2r, k=64, config=config)
    check_against_brute(idx, scores, seq, lengths, cand, c2r, 64, label="long")


def test_survivor_buffer_overflow_takes_the_exact_fallback():
    """All-equal scores (a zero candidate; a sequence of one repeated token) make every token a
    survivor; with a 64-entry buffer the block falls back to the full radix select."""
    seq, lengths, cand, c2r = random_case(9, [300, 90, 300], 20)
    seq[2, :] = seq[2, 0]
    cand[0] = 0.0
    c2r[:4] = [0, 0, 2, 2]
    config = NNSearchConfig(block_t=16, survivors=64)
    for k in (1, 10):
        idx, scores = nn_search(seq, lengths, cand, c2r, k=k, config=config)
        check_against_brute(idx, scores, seq, lengths, cand, c2r, k, label=f"overflow k={k}")
        assert np.asarray(idx)[0].tolist() == list(range(k))        # all tie: the first k
        assert np.asarray(idx)[2].tolist() == list(range(k))
    # the main kernels really did overflow (so the results above came from the fallback kernel)
    u, length, d = seq.shape
    idx, _ = _search(jnp.asarray(seq.reshape(u * length, d)), jnp.arange(u, dtype=jnp.int32) * length,
                       jnp.asarray(lengths), jnp.asarray(cand), jnp.asarray(c2r), k=10, scale=QUANT_SCALE,
                       config=config, interpret=True, phases=2)
    found = np.asarray(idx)[:, 0]          # phases=2: the survivor count of each row in column 0
    assert found.max() > 64


def test_jagged_layout_equals_dense_and_candidate_order_does_not_matter():
    seq, lengths, cand, c2r = random_case(4, [50, 0, 33, 80], 30)
    flat = np.concatenate([seq[u, :lengths[u]] for u in range(len(lengths))])
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int32)
    dense = nn_search(seq, lengths, cand, c2r, k=20)
    jag = nn_search_jagged(flat, offsets, lengths, cand, c2r, k=20)
    for a, b in zip(dense, jag):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    perm = np.random.default_rng(0).permutation(len(c2r))
    shuffled = nn_search(seq, lengths, cand[perm], c2r[perm], k=20)
    for a, b in zip(dense, shuffled):
        np.testing.assert_array_equal(np.asarray(a)[perm], np.asarray(b))


def test_sort_path_of_the_block_table_equals_the_pairwise_path(monkeypatch):
    """Ranks within a request come from a pairwise reduction up to ``_PAIRWISE_MAX_N`` candidates
    and from a sort beyond it: both give the same blocks and results."""
    import pallas_kernels.nn_search as nn_mod
    seq, lengths, cand, c2r = random_case(13, [40, 0, 70, 33], 53)
    pairwise = nn_mod._block_slots(jnp.asarray(c2r), 5, 16, 4 + 5)
    dense = nn_search(seq, lengths, cand, c2r, k=9)
    monkeypatch.setattr(nn_mod, "_PAIRWISE_MAX_N", 0)
    sorted_ = nn_mod._block_slots(jnp.asarray(c2r), 5, 16, 4 + 5)
    for a, b in zip(pairwise, sorted_):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    slots = np.asarray(pairwise[0])
    assert sorted(slots[slots >= 0].tolist()) == list(range(53))      # every candidate once
    u, length, d = seq.shape           # not jitted, so the patched constant takes effect
    via_sort = _search(jnp.asarray(seq.reshape(u * length, d)), jnp.arange(u, dtype=jnp.int32) * length,
                       jnp.asarray(lengths), jnp.asarray(cand), jnp.asarray(c2r), k=9, scale=QUANT_SCALE,
                       config=NNSearchConfig(), interpret=True)
    for a, b in zip(dense, via_sort):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_padding_never_selected_even_when_padding_scores_best():
    rng = np.random.default_rng(5)
    seq = rng.integers(-127, 128, (2, 40, 32)).astype(np.int8)
    cand = rng.normal(size=(4, 32)).astype(np.float32)
    seq[:, 10:] = np.clip(np.round(cand[0] / np.abs(cand[0]).max() * 127), -127, 127).astype(np.int8)
    lengths = np.array([10, 3], np.int32)
    idx, scores = nn_search(seq, lengths, cand, np.array([0, 0, 1, 1], np.int32), k=8)
    idx = np.asarray(idx)
    assert (idx[0] < 10).all() and (idx[0] >= 0).all()
    assert idx[2].tolist()[:3] == [0, 1, 2] and (idx[2, 3:] == -1).all()
    assert np.isneginf(np.asarray(scores)[2, 3:]).all()


def test_no_candidates_and_bad_inputs():
    seq, lengths, cand, c2r = random_case(6, [10, 20], 4)
    idx, scores = nn_search(seq, lengths, cand[:0], c2r[:0], k=5)
    assert idx.shape == (0, 5) and scores.shape == (0, 5)
    with pytest.raises(ValueError, match="k: expected"):
        nn_search(seq, lengths, cand, c2r, k=MAX_K + 1)
    with pytest.raises(ValueError, match="cand: expected"):
        nn_search(seq, lengths, cand[:, :16], c2r, k=5)
    with pytest.raises(ValueError, match="seq_q"):
        nn_search(seq.astype(np.int32), lengths, cand, c2r, k=5)
    with pytest.raises(ValueError, match="cand_to_req"):
        nn_search(seq, lengths, cand, c2r[:2], k=5)
    with pytest.raises(ValueError, match="impl"):
        nn_search(seq, lengths, cand, c2r, k=5, impl="cuda")
    with pytest.raises(ValueError, match="block_c"):
        NNSearchConfig(block_c=24)
    with pytest.raises(ValueError, match="survivors"):
        NNSearchConfig(survivors=100)
    with pytest.raises(ValueError, match="radix_bits"):
        NNSearchConfig(radix_bits=3)
    with pytest.raises(ValueError, match="scores"):
        NNSearchConfig(scores="tf32")
    with pytest.raises(ValueError, match="unroll"):
        NNSearchConfig(unroll=0)
    with pytest.raises(ValueError, match="bins"):
        NNSearchConfig(block_t=128, bins=64)           # fewer than block_t
    with pytest.raises(ValueError, match="bins"):
        nn_search(seq, lengths, cand, c2r, k=MAX_K, config=NNSearchConfig(bins=64))


def test_out_of_range_values_are_harmless():
    seq, lengths, cand, c2r = random_case(10, [10, 20], 6)
    c2r[:2] = [5, -1]                     # no such request
    idx, scores = nn_search(seq, lengths, cand, c2r, k=4)
    assert (np.asarray(idx)[:2] == -1).all() and np.isneginf(np.asarray(scores)[:2]).all()
    good = nn_search(seq, lengths, cand[2:], c2r[2:], k=4)[0]
    np.testing.assert_array_equal(np.asarray(idx)[2:], np.asarray(good))
    flat = seq.reshape(-1, 32)
    idx, _ = nn_search_jagged(flat, np.array([0, 20], np.int32), np.array([20, 500], np.int32),
                              cand, np.array([1] * 6, np.int32), k=4)   # length past the end
    assert (np.asarray(idx) < 20).all()


def test_xla_dispatch_is_the_reference():
    seq, lengths, cand, c2r = random_case(7, [10, 20], 6)
    a = nn_search(seq, lengths, cand, c2r, k=5, impl="xla")
    b = nn_search_reference(seq, lengths, cand, c2r, k=5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_device_s_all_equals_logged_features(impl):
    feat = FeatureConfig()
    sel = SelectionConfig(k_ll=16, r=8, k_rt=4, k_imp=8, max_ll_len=300, max_rt_len=40,
                          max_imp_len=50)
    rng = np.random.default_rng(8)
    req = random_requests(rng, [300, 0, 17, 120], [40, 3, 0, 25], [50, 10, 0, 1], [5, 3, 2, 7], feat)
    host = select_s_all(req, feat, sel)
    dev = select_s_all_device(DeviceSequences.from_jagged(req.ll), DeviceSequences.from_jagged(req.rt),
                              DeviceSequences.from_jagged(req.imp), jnp.asarray(req.cand_embedding),
                              jnp.asarray(req.cand_to_req), feat=feat, sel=sel, impl=impl)
    for field in ("embeddings", "actions", "surfaces"):
        np.testing.assert_array_equal(np.asarray(getattr(dev, field)), getattr(host.tokens, field),
                                      err_msg=field)
    np.testing.assert_array_equal(np.asarray(dev.mask), host.mask)
    np.testing.assert_array_equal(np.asarray(dev.source_index), host.source_index)


# ------------------------------------------------------------------------------ compiled (GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [1, 32, 96, 128])
@pytest.mark.parametrize("lengths", [[0, 1, 5, 97, 300, 129, 64], [16384, 3000, 10000]],
                         ids=["short", "long"])
def test_gpu_matches_brute_force(lengths, k):
    """The shipped default at every K; the all-other-paths config (wider block, 2-bit radix,
    FMA scores, more bins and survivors) once per length set, at K = 96."""
    seq, lens, cand, c2r = random_case(k + len(lengths), lengths, 200 if max(lengths) < 1000 else 40)
    for config in CONFIGS if k == 96 else CONFIGS[:1]:
        idx, scores = nn_search(seq, lens, cand, c2r, k=k, config=config, interpret=False)
        check_against_brute(idx, scores, seq, lens, cand, c2r, k, label=f"gpu k={k} {config}")
