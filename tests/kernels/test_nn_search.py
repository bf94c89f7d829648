"""The NN-search op (``pallas_kernels.nn_search.api.nn_search``): every implementation against the
float64 brute force of ``nn_search_cases`` (same near-tie band) and the jnp reference.

The first part is the shared base: each test runs for every ``impl`` ("xla", "pallas_triton") on
random data (fixed and fresh seeds, ragged lengths including 0, lengths that are not multiples of
the tile, exact ties) in every layout: dense, jagged, grouped, and ``cand_to_req=None``; k = 0.
The second part tests the kernel's own configurations, fallback, block table and limits. On CPU
the kernel runs in Pallas interpret mode; ``gpu`` tests compile it with Triton.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.nn_search import pallas_triton
from pallas_kernels.nn_search.api import nn_search
from pallas_kernels.nn_search.config import MAX_K, NNSearchConfig
from pallas_kernels.nn_search.profile import nn_search_stopped
from pallas_kernels.nn_search.reference import nn_search_grouped_reference, nn_search_reference
from tests.kernels.nn_search_cases import check_against_brute, random_case, to_jagged
from tests.kernels.seeds import FRESH_SEED

IMPLS = ("xla", "pallas_triton")
LAYOUTS = ("dense", "jagged", "grouped", "no_cand_to_req")


@pytest.fixture(params=IMPLS)
def impl(request) -> str:
    return request.param


def assert_same(a, b) -> None:
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def check(got, seq, lengths, cand, c2r, k, label, reference=None) -> None:
    """``got`` (flat (N, k) results) against the brute force, and its scores against the jnp
    reference's (they differ only in float32 rounding)."""
    check_against_brute(*got, seq, lengths, cand, c2r, k, label=label)
    ref = nn_search_reference(seq, lengths, cand, c2r, k=k) if reference is None else reference
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(ref[1]).reshape(-1, k), atol=1e-6,
                               rtol=0)


# ------------------------------------------------------- shared base: every impl vs the reference


@pytest.mark.parametrize("k", [1, 96, 128])     # a small odd k (7): the wide config below
def test_matches_brute_force(impl, k):
    seq, lengths, cand, c2r = random_case(k + 128, [0, 1, 5, 97, 300, 129, 64], 45)
    got = nn_search(seq, lengths, cand, c2r, k=k, impl=impl)
    check(got, seq, lengths, cand, c2r, k, label=f"{impl} k={k}")


def test_long_sequence_and_many_candidates_per_request(impl):
    seq, lengths, cand, c2r = random_case(3, [2000, 700], 70)
    got = nn_search(seq, lengths, cand, c2r, k=64, impl=impl)
    check_against_brute(*got, seq, lengths, cand, c2r, 64, label="long")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("seed", [FRESH_SEED])
def test_layouts(impl, layout, seed):
    """Each layout on a fresh draw: the brute force, the reference, and (jagged) the dense layout's
    selection."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 20))
    lengths = [0, int(rng.integers(1, k + 1)), int(rng.integers(17, 200)), int(rng.integers(1, 200))]
    u, per = len(lengths), 3
    seq, lengths, cand, c2r = random_case(seed, lengths, u * per)
    label = f"{impl} {layout} seed={seed} k={k}"
    if layout == "grouped":
        cand_g = cand.reshape(u, per, -1)
        got = nn_search(seq, lengths, cand_g, k=k, impl=impl)
        assert got[0].shape == (u, per, k) and got[1].shape == (u, per, k)
        c2r = np.repeat(np.arange(u, dtype=np.int32), per)
        ref = nn_search_grouped_reference(seq, lengths, cand_g, k=k)
        check([np.asarray(a).reshape(-1, k) for a in got], seq, lengths, cand, c2r, k, label, ref)
    elif layout == "no_cand_to_req":
        got = nn_search(seq, lengths, cand[:u], k=k, impl=impl)
        check(got, seq, lengths, cand[:u], np.arange(u, dtype=np.int32), k, label)
    else:
        dense = nn_search(seq, lengths, cand, c2r, k=k, impl=impl)
        check(dense, seq, lengths, cand, c2r, k, label)
        if layout == "jagged":
            flat, offsets = to_jagged(seq, lengths, rng)
            jagged = [nn_search(flat, lengths, cand, c2r, k=k, offsets=offsets, impl=impl)]
            if impl == "xla":   # a dense copy only as wide as the longest sequence
                jagged.append(nn_search(flat, lengths, cand, c2r, k=k, offsets=offsets,
                                        max_length=int(lengths.max()), impl=impl))
            for got in jagged:
                check(got, seq, lengths, cand, c2r, k, label)
                # the same selection; "xla" scores may differ in the last bit (XLA vectorizes
                # the sums of a (U, W, D) product differently for another width W)
                np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(dense[0]))
                if impl == "pallas_triton":
                    assert_same(got, dense)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_k_zero(impl, layout):
    seq, lengths, cand, c2r = random_case(2, [10, 0, 7], 6)
    kw = dict(k=0, impl=impl)
    if layout == "dense":
        got, shape = nn_search(seq, lengths, cand, c2r, **kw), (6, 0)
    elif layout == "jagged":
        flat, offsets = to_jagged(seq, lengths)
        got, shape = nn_search(flat, lengths, cand, c2r, offsets=offsets, **kw), (6, 0)
    elif layout == "grouped":
        got, shape = nn_search(seq, lengths, cand.reshape(3, 2, -1), **kw), (3, 2, 0)
    else:
        got, shape = nn_search(seq, lengths, cand[:3], **kw), (3, 0)
    assert got[0].shape == shape and got[0].dtype == jnp.int32
    assert got[1].shape == shape and got[1].dtype == jnp.float32
    if layout == "dense":              # and no candidates at all
        idx, scores = nn_search(seq, lengths, cand[:0], c2r[:0], k=5, impl=impl)
        assert idx.shape == (0, 5) and scores.shape == (0, 5)


def test_padding_never_selected_even_when_padding_scores_best(impl):
    rng = np.random.default_rng(5)
    seq = rng.integers(-127, 128, (2, 40, 32)).astype(np.int8)
    cand = rng.normal(size=(4, 32)).astype(np.float32)
    seq[:, 10:] = np.clip(np.round(cand[0] / np.abs(cand[0]).max() * 127), -127, 127).astype(np.int8)
    lengths = np.array([10, 3], np.int32)
    idx, scores = nn_search(seq, lengths, cand, np.array([0, 0, 1, 1], np.int32), k=8, impl=impl)
    idx = np.asarray(idx)
    assert (idx[0] < 10).all() and (idx[0] >= 0).all()
    assert idx[2].tolist()[:3] == [0, 1, 2] and (idx[2, 3:] == -1).all()
    assert np.isneginf(np.asarray(scores)[2, 3:]).all()


def test_candidate_order_does_not_matter(impl):
    seq, lengths, cand, c2r = random_case(4, [50, 0, 33, 80], 30)
    dense = nn_search(seq, lengths, cand, c2r, k=20, impl=impl)
    perm = np.random.default_rng(0).permutation(len(c2r))
    shuffled = nn_search(seq, lengths, cand[perm], c2r[perm], k=20, impl=impl)
    for a, b in zip(dense, shuffled):
        np.testing.assert_array_equal(np.asarray(a)[perm], np.asarray(b))


def test_out_of_range_values_are_harmless(impl):
    seq, lengths, cand, c2r = random_case(10, [10, 20], 6)
    c2r[:2] = [5, -1]                     # no such request
    idx, scores = nn_search(seq, lengths, cand, c2r, k=4, impl=impl)
    assert (np.asarray(idx)[:2] == -1).all() and np.isneginf(np.asarray(scores)[:2]).all()
    check_against_brute(np.asarray(idx)[2:], np.asarray(scores)[2:], seq, lengths, cand[2:],
                        c2r[2:], 4, label="in range")
    flat = seq.reshape(-1, 32)
    idx, _ = nn_search(flat, np.array([20, 500], np.int32), cand, np.array([1] * 6, np.int32), k=4,
                       offsets=np.array([0, 20], np.int32), impl=impl)   # length past the end
    assert (np.asarray(idx) < 20).all()


def test_bad_inputs_name_the_argument(impl):
    seq, lengths, cand, c2r = random_case(6, [10, 20], 4)
    flat, offsets = to_jagged(seq, lengths)

    def call(*args, **kw):
        return nn_search(*args, **{"k": 5, "impl": impl, **kw})

    with pytest.raises(ValueError, match="seq_q"):
        call(seq.astype(np.int32), lengths, cand, c2r)
    with pytest.raises(ValueError, match="seq_q"):
        call(seq, lengths, cand, c2r, offsets=offsets)           # dense codes with offsets
    with pytest.raises(ValueError, match="offsets"):
        call(flat, lengths, cand, c2r, offsets=offsets.astype(np.float32))
    with pytest.raises(ValueError, match="lengths"):
        call(seq, lengths[:1], cand, c2r)
    with pytest.raises(ValueError, match="cand: expected"):
        call(seq, lengths, cand[:, :16], c2r)
    with pytest.raises(ValueError, match="cand_to_req"):
        call(seq, lengths, cand, c2r[:2])
    with pytest.raises(ValueError, match="cand_to_req"):
        call(seq, lengths, cand.reshape(2, 2, -1), c2r)           # grouped takes no index
    with pytest.raises(ValueError, match="cand: without cand_to_req"):
        call(seq, lengths, cand)
    with pytest.raises(ValueError, match="k: expected"):
        call(seq, lengths, cand, c2r, k=-1)
    with pytest.raises(ValueError, match="max_length"):
        call(flat, lengths, cand, c2r, offsets=offsets, max_length=0)
    with pytest.raises(ValueError, match="impl: expected one of"):
        call(seq, lengths, cand, c2r, impl="cuda")


def test_impl_dispatch():
    seq, lengths, cand, c2r = random_case(7, [10, 20], 6)
    assert_same(nn_search(seq, lengths, cand, c2r, k=5, impl="xla"),
                nn_search_reference(seq, lengths, cand, c2r, k=5))
    want = "pallas_triton" if jax.default_backend() == "gpu" else "xla"
    assert_same(nn_search(seq, lengths, cand, c2r, k=5),
                nn_search(seq, lengths, cand, c2r, k=5, impl=want))
    for impl, kernel in (("xla", False), ("pallas_triton", True)):     # traced, not run
        jaxpr = str(jax.make_jaxpr(lambda *a: nn_search(*a, k=5, impl=impl))(seq, lengths, cand, c2r))
        assert ("pallas_call" in jaxpr) == kernel, impl


# ------------------------------------------------------------------- the kernel's own behaviour


# the default (tensor-core scores, 1-bit radix, one chunk) and a variant with every other code path:
# float32 FMA scores, 2-bit radix digits, more bins and survivors, a wider block, no unrolling
CONFIGS = [NNSearchConfig(),
           NNSearchConfig(block_c=32, block_t=32, bins=512, survivors=512, radix_bits=2,
                          scores="fma", unroll=1, num_stages=1)]
WIDE = CONFIGS[1]


@pytest.mark.parametrize("k", [7, 128])   # k = 1 and 96: the default config above
def test_wide_config_matches_brute_force(k):
    seq, lengths, cand, c2r = random_case(k + WIDE.block_t, [0, 1, 5, 97, 300, 129, 64], 45)
    got = nn_search(seq, lengths, cand, c2r, k=k, impl="pallas_triton", config=WIDE)
    check(got, seq, lengths, cand, c2r, k, label=f"wide k={k}")


def test_wide_config_long_sequence_and_many_candidates_per_request():
    seq, lengths, cand, c2r = random_case(3, [2000, 700], 70)
    got = nn_search(seq, lengths, cand, c2r, k=64, impl="pallas_triton", config=WIDE)
    check_against_brute(*got, seq, lengths, cand, c2r, 64, label="long wide")


def test_survivor_buffer_overflow_takes_the_exact_fallback():
    """All-equal scores (a zero candidate; a sequence of one repeated token) make every token a
    survivor; with a 64-entry buffer the block falls back to the full radix select."""
    seq, lengths, cand, c2r = random_case(9, [300, 90, 300], 20)
    seq[2, :] = seq[2, 0]
    cand[0] = 0.0
    c2r[:4] = [0, 0, 2, 2]
    config = NNSearchConfig(block_t=16, survivors=64)
    for k in (1, 10):
        idx, scores = nn_search(seq, lengths, cand, c2r, k=k, impl="pallas_triton", config=config)
        check_against_brute(idx, scores, seq, lengths, cand, c2r, k, label=f"overflow k={k}")
        assert np.asarray(idx)[0].tolist() == list(range(k))        # all tie: the first k
        assert np.asarray(idx)[2].tolist() == list(range(k))
    # the main kernel really did overflow (so the results above came from the fallback): the
    # profiling kernel stopped after step 3 reports the survivor count of each candidate
    u, length, d = seq.shape
    jagged = (seq.reshape(u * length, d), np.arange(u, dtype=np.int32) * length, lengths, cand, c2r)
    found = nn_search_stopped(*jagged, k=10, stop_after=3, config=config)
    assert found.shape == (20,) and int(np.asarray(found).max()) > 64
    # stopped after step 2, it reports T_lo: a lower bound of the K-th score's int32 key
    t_lo = np.asarray(nn_search_stopped(*jagged, k=10, stop_after=2, config=config))
    bits = np.asarray(scores).min(axis=1).view(np.int32)
    assert (t_lo <= np.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)).all()
    assert (t_lo > np.iinfo(np.int32).min).all()             # every row has >= K tokens
    with pytest.raises(ValueError, match="stop_after"):
        nn_search_stopped(*jagged, k=10, stop_after=4, config=config)


def test_sort_path_of_the_block_table_equals_the_pairwise_path(monkeypatch):
    """Ranks within a request come from a pairwise reduction up to ``_PAIRWISE_MAX_N`` candidates
    and from a sort beyond it: both give the same blocks and results."""
    seq, lengths, cand, c2r = random_case(13, [40, 0, 70, 33], 53)
    pairwise = pallas_triton._block_slots(jnp.asarray(c2r), 5, 16, 4 + 5)
    dense = nn_search(seq, lengths, cand, c2r, k=9, impl="pallas_triton")
    monkeypatch.setattr(pallas_triton, "_PAIRWISE_MAX_N", 0)
    sorted_ = pallas_triton._block_slots(jnp.asarray(c2r), 5, 16, 4 + 5)
    for a, b in zip(pairwise, sorted_):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    slots = np.asarray(pairwise[0])
    assert sorted(slots[slots >= 0].tolist()) == list(range(53))      # every candidate once
    u, length, d = seq.shape           # not jitted, so the patched constant takes effect
    via_sort = pallas_triton._search(jnp.asarray(seq.reshape(u * length, d)),
                                     jnp.arange(u, dtype=jnp.int32) * length, jnp.asarray(lengths),
                                     jnp.asarray(cand), jnp.asarray(c2r), k=9,
                                     config=NNSearchConfig(), interpret=True)
    assert_same(dense, via_sort)


@pytest.mark.parametrize("kwargs,field", [
    (dict(block_c=24), "block_c"), (dict(survivors=100), "survivors"),
    (dict(radix_bits=3), "radix_bits"), (dict(scores="tf32"), "scores"), (dict(unroll=0), "unroll"),
    (dict(block_t=128, bins=64), "bins"),           # fewer bins than block_t
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"NNSearchConfig.{field}"):
        NNSearchConfig(**kwargs)


def test_kernel_limits():
    seq, lengths, cand, c2r = random_case(6, [10, 20], 4)
    with pytest.raises(ValueError, match="k: expected"):
        nn_search(seq, lengths, cand, c2r, k=MAX_K + 1, impl="pallas_triton")
    with pytest.raises(ValueError, match="seq_q: embedding width"):
        nn_search(seq[..., :24], lengths, cand[:, :24], c2r, k=5, impl="pallas_triton")
    with pytest.raises(ValueError, match="bins"):
        nn_search(seq, lengths, cand, c2r, k=MAX_K, impl="pallas_triton",
                  config=NNSearchConfig(bins=64))
    idx, scores = pallas_triton.nn_search_pallas_triton(seq.reshape(-1, 32), np.array([0, 20]),
                                                        lengths, cand[:0], c2r[:0], k=5)
    assert idx.shape == (0, 5) and scores.shape == (0, 5)


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
        idx, scores = nn_search(seq, lens, cand, c2r, k=k, impl="pallas_triton", config=config,
                                interpret=False)
        check_against_brute(idx, scores, seq, lens, cand, c2r, k, label=f"gpu k={k} {config}")
