"""The QLA op (``pallas_kernels.qla.api.qla``, VISTA Section 3.2.2): every implementation against
the reference.

The reference itself is checked against a float64 per-sequence transcription of the paper's
formulas (the seeds' ``Delta`` as an explicit diagonal matrix, the causal prefix states as explicit
sums), for the structural rules (seeds never see other seeds, history never sees seeds, padding
rows are 0, empty histories, sequences without seeds) and for its O(N) memory. The shared base
runs each ``impl`` ("xla", "pallas_triton") against the reference on random jagged batches (fixed
and fresh seeds, lengths 0 and not multiples of the tile, full and causal, float32 / bfloat16):
outputs and the gradients of ``sum(out * g)`` with respect to q, k, v. Then the kernel's
configurations and errors. On CPU the kernels run in Pallas interpret mode (small shapes: this
file's CPU part takes well under a minute); the ``gpu`` tests compile them with Triton (up to
100,000 rows). Errors are relative L2 norms against the reference evaluated in float32 on the same
(rounded) inputs.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._common import A10G_SMEM_BYTES
from pallas_kernels.qla.api import qla
from pallas_kernels.qla.config import MAX_SPLIT, QlaConfig
from pallas_kernels.qla.pallas_triton import num_splits
from pallas_kernels.qla.reference import qla_reference, softmax_seed_attention_reference
from tests.kernels.seeds import FRESH_SEED

IMPLS = ("xla", "pallas_triton")
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 1.5e-2}
"""Relative L2 error against the float32 reference on the same inputs."""
GRAD_TOL = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2}
SMALL = QlaConfig(block_rows=16, block_dv=16, split_rows=16)
"""16-row tiles, 16-column blocks and a split state reduction: several tiles, column blocks and
partial states per sequence at interpret-mode sizes."""


@pytest.fixture(params=IMPLS)
def impl(request) -> str:
    return request.param


@dataclasses.dataclass(frozen=True)
class Case:
    """One random jagged batch."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    offsets: jax.Array
    num_targets: jax.Array

    @property
    def valid(self) -> int:
        return int(self.offsets[-1])


def random_case(seed: int, lengths: Sequence[int], *, heads: int = 2, dqk: int = 16,
                dv: int = 32, dtype=jnp.float32, pad: int = 5,
                targets: Optional[Sequence[int]] = None) -> Case:
    """Jagged batch with ``lengths`` (0 allowed), ``pad`` padding rows past the last sequence and
    ``targets`` seeds per sequence (default 0..3, never more than its length)."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    total = int(offsets[-1]) + pad
    q, k, v = (rng.normal(size=(total, heads, d)) * 0.7 for d in (dqk, dqk, dv))
    if targets is None:
        targets = np.minimum(rng.integers(0, 4, len(lengths)), lengths)
    as_dtype = lambda a: jnp.asarray(a, jnp.float32).astype(dtype)  # noqa: E731
    return Case(as_dtype(q), as_dtype(k), as_dtype(v), jnp.asarray(offsets),
                jnp.asarray(np.asarray(targets, np.int32)))


def _f32(case: Case) -> Case:
    return dataclasses.replace(case, q=case.q.astype(jnp.float32), k=case.k.astype(jnp.float32),
                               v=case.v.astype(jnp.float32))


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.isfinite(got).all(), "returned NaN/inf"
    denom = np.linalg.norm(want)
    return float(np.linalg.norm(got - want) / (denom if denom > 0 else 1.0))


def _extra(impl: str, config, interpret=None) -> dict:
    return {} if impl == "xla" else dict(config=config, interpret=interpret)


def check_forward(case: Case, impl: str, causal: bool, config=SMALL, interpret=None) -> None:
    out = qla(case.q, case.k, case.v, case.offsets, num_targets=case.num_targets, causal=causal,
              impl=impl, **_extra(impl, config, interpret))
    assert out.shape == case.q.shape[:2] + case.v.shape[-1:] and out.dtype == case.q.dtype
    c32 = _f32(case)
    want = qla_reference(c32.q, c32.k, c32.v, case.offsets, num_targets=case.num_targets,
                         causal=causal)
    err = rel_err(out, want)
    assert err < TOL[case.q.dtype.type], (impl, causal, err)
    assert not np.asarray(out[case.valid:], np.float32).any(), "padding rows must be 0"


def check_gradients(case: Case, impl: str, causal: bool, config=SMALL, interpret=None) -> None:
    """Gradients of ``sum(out * g)`` with respect to q, k, v."""
    g = jnp.asarray(np.random.default_rng(1).normal(size=case.q.shape[:2] + case.v.shape[-1:]),
                    jnp.float32)

    def grads(fn_impl, **more):
        def loss(q, k, v):
            out = qla(q, k, v, case.offsets, num_targets=case.num_targets, causal=causal,
                      impl=fn_impl, **more)
            return jnp.sum(out.astype(jnp.float32) * g)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    got = grads(impl, **_extra(impl, config, interpret))(case.q, case.k, case.v)
    c32 = _f32(case)
    want = grads("xla")(c32.q, c32.k, c32.v)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert a.dtype == case.q.dtype, name
        err = rel_err(a, b)
        assert err < GRAD_TOL[case.q.dtype.type], (impl, name, causal, err)
        assert not np.asarray(a[case.valid:], np.float32).any(), "padding rows get 0 gradient"


# --------------------------------------------------------------- the reference is the contract


def _silu(x):
    return x / (1.0 + np.exp(-x))


def dense_formula(case: Case, causal: bool) -> np.ndarray:
    """float64 per sequence and head, written from VISTA Section 3.2.2: ``O[S] = phi(Q[S])
    phi(phi(K[S])^T V[S])``, ``O[T] = phi(Q[T]) phi(phi(K[S])^T V[S]) + Delta(phi(Q[T]),
    phi(K[T])) V[T]`` with Delta an explicit diagonal matrix; causal: history row i's state is the
    sum over history rows j <= i."""
    q, k, v = (np.asarray(a, np.float64) for a in (case.q, case.k, case.v))
    off, nt = np.asarray(case.offsets), np.asarray(case.num_targets)
    out = np.zeros(q.shape[:2] + v.shape[-1:])
    for b in range(len(off) - 1):
        lo, hi = off[b], off[b + 1]
        n_hist = hi - lo - min(nt[b], hi - lo)
        s_rows, t_rows = np.arange(lo, lo + n_hist), np.arange(lo + n_hist, hi)
        for h in range(q.shape[1]):
            a, c, vv = _silu(q[:, h]), _silu(k[:, h]), v[:, h]
            m = c[s_rows].T @ vv[s_rows]                                     # (D, Dv)
            for idx, i in enumerate(s_rows):
                state = c[s_rows[:idx + 1]].T @ vv[s_rows[:idx + 1]] if causal else m
                out[i, h] = a[i] @ _silu(state)
            delta = np.diag(np.sum(a[t_rows] * c[t_rows], axis=1))
            out[t_rows, h] = a[t_rows] @ _silu(m) + delta @ vv[t_rows]
    return out


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_reference_matches_dense_formula(causal):
    """Seeds everywhere: none (length 9), all rows (empty history: length 3, 3 seeds), one."""
    case = random_case(7, [9, 0, 13, 3, 6, 1], targets=[0, 0, 4, 3, 2, 1])
    got = qla_reference(case.q, case.k, case.v, case.offsets, num_targets=case.num_targets,
                        causal=causal)
    np.testing.assert_allclose(np.asarray(got), dense_formula(case, causal), rtol=2e-5, atol=2e-5)
    assert not np.asarray(got[case.valid:]).any()


def test_seeds_never_see_other_seeds():
    """Changing one seed's k, v changes only that seed's output; changing a history row's k, v
    changes every row of its sequence (full) and nothing in other sequences."""
    case = random_case(8, [10, 7], targets=[4, 2])

    def run(k, v, causal=False):
        return np.asarray(qla_reference(case.q, k, v, case.offsets, num_targets=case.num_targets,
                                        causal=causal))

    base = run(case.k, case.v)
    seed = 7                                   # second of sequence 0's seeds (rows 6..9)
    moved = run(case.k.at[seed].add(1.0), case.v.at[seed].add(1.0))
    changed = np.flatnonzero(np.abs(moved - base).max(axis=(1, 2)) > 0)
    np.testing.assert_array_equal(changed, [seed])
    moved = run(case.k.at[2].add(1.0), case.v.at[2].add(1.0))
    changed = np.flatnonzero(np.abs(moved - base).max(axis=(1, 2)) > 0)
    np.testing.assert_array_equal(changed, np.arange(10))
    # Causal: history row 2 reaches only later history rows and the seeds.
    base_c = run(case.k, case.v, True)
    moved_c = run(case.k.at[2].add(1.0), case.v.at[2].add(1.0), True)
    changed = np.flatnonzero(np.abs(moved_c - base_c).max(axis=(1, 2)) > 0)
    np.testing.assert_array_equal(changed, np.arange(2, 10))


def test_reference_no_seeds_and_none():
    """``num_targets=None`` is "no seeds"; a sequence of only seeds sees only itself."""
    case = random_case(9, [6, 4], targets=[0, 0])
    a = qla_reference(case.q, case.k, case.v, case.offsets, num_targets=None)
    b = qla_reference(case.q, case.k, case.v, case.offsets, num_targets=case.num_targets)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    only = qla_reference(case.q, case.k, case.v, case.offsets,
                         num_targets=jnp.asarray([6, 4], jnp.int32))
    diag = jnp.sum(jax.nn.silu(case.q) * jax.nn.silu(case.k), -1, keepdims=True) * case.v
    np.testing.assert_allclose(np.asarray(only[:10]), np.asarray(diag[:10]), rtol=1e-5, atol=1e-6)


def test_reference_is_linear_in_memory():
    """50,000 rows in one sequence: a dense (N, N) score matrix would take 10 GB; the reference
    (segment sums / a segmented scan of (D, Dv) states) runs in a few hundred MB."""
    case = random_case(10, [50_000], heads=1, dqk=16, dv=16, pad=0, targets=[8])
    for causal in (False, True):
        fn = jax.jit(lambda q, k, v, o, n, c=causal: qla_reference(q, k, v, o, num_targets=n,
                                                                   causal=c))
        out = fn(case.q, case.k, case.v, case.offsets, case.num_targets)
        assert np.isfinite(np.asarray(out)).all() and out.shape == (50_000, 1, 16)


def dense_softmax(case: Case, causal: bool) -> np.ndarray:
    """float64 loop: history attends to history (j <= i when causal), seeds to history and
    themselves; softmax of q.k / sqrt(D)."""
    q, k, v = (np.asarray(a, np.float64) for a in (case.q, case.k, case.v))
    off, nt = np.asarray(case.offsets), np.asarray(case.num_targets)
    out = np.zeros(q.shape[:2] + v.shape[-1:])
    for b in range(len(off) - 1):
        lo, hi = off[b], off[b + 1]
        n_hist = hi - lo - min(nt[b], hi - lo)
        for i in range(hi - lo):
            keys = [j for j in range(hi - lo) if (j < n_hist and (i >= n_hist or not causal
                                                                  or j <= i)) or j == i]
            s = np.einsum("hd,jhd->hj", q[lo + i], k[lo + np.asarray(keys)]) / np.sqrt(q.shape[-1])
            p = np.exp(s - s.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            out[lo + i] = np.einsum("hj,jhd->hd", p, v[lo + np.asarray(keys)])
    return out


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_softmax_seed_attention_reference(causal):
    case = random_case(12, [9, 0, 5, 3], targets=[3, 0, 5, 1])
    got = softmax_seed_attention_reference(case.q, case.k, case.v, case.offsets,
                                           num_targets=case.num_targets, max_seq_len=9,
                                           causal=causal)
    np.testing.assert_allclose(np.asarray(got), dense_softmax(case, causal), rtol=1e-5, atol=1e-6)
    assert not np.asarray(got[case.valid:]).any()


# ------------------------------------------------------- shared base: every impl vs the reference


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda t: jnp.dtype(t).name)
def test_forward_and_gradients_match_reference(impl, dtype, causal):
    """Ragged lengths (0, 1, tile multiples and not), an empty history (3 rows, 3 seeds), a
    sequence without seeds, seeds spanning tiles (20 of 37 rows)."""
    case = random_case(11, [0, 37, 16, 1, 3, 5], dtype=dtype, targets=[0, 20, 0, 1, 3, 2])
    check_forward(case, impl, causal)
    if impl != "xla" or dtype != jnp.float32:   # float32 "xla" gradients are the reference's own
        check_gradients(case, impl, causal)


@pytest.mark.parametrize("seed", [FRESH_SEED])
def test_fresh_seed_forward_and_gradients(seed):
    """A fresh draw per test run (the kernel): lengths (some 0, rarely tile multiples), seeds,
    heads, widths, causality, column blocks."""
    rng = np.random.default_rng(seed)
    lengths = [int(x) * (rng.random() > 0.2) for x in rng.integers(1, 50, rng.integers(2, 5))]
    dv = int(rng.choice([16, 32]))
    case = random_case(seed, lengths, heads=int(rng.integers(1, 3)), dqk=int(rng.choice([16, 32])),
                       dv=dv, pad=int(rng.integers(0, 20)))
    causal = bool(rng.random() < 0.4)
    config = QlaConfig(block_rows=16, block_dv=int(rng.choice([16, dv])),
                       split_rows=int(rng.choice([8, 4096])))
    check_forward(case, "pallas_triton", causal, config)
    check_gradients(case, "pallas_triton", causal, config)


def test_empty_batches(impl):
    """No rows at all; all sequences empty (every row padding); no sequences."""
    for lengths, pad in (([0, 0, 0], 0), ([0, 0], 7), ([], 4)):
        case = random_case(41, lengths, pad=pad)
        kw = dict(num_targets=case.num_targets, impl=impl)
        out = qla(case.q, case.k, case.v, case.offsets, **kw)
        assert out.shape == (pad, 2, 32) and not np.asarray(out).any()
        grads = jax.grad(lambda q: jnp.sum(qla(q, case.k, case.v, case.offsets, **kw)))(case.q)
        assert grads.shape == case.q.shape and not np.asarray(grads).any()


# ---------------------------------------------------------------------------- impl dispatch


def test_impl_dispatch():
    case = random_case(61, [5, 9])
    args = (case.q, case.k, case.v, case.offsets)
    for impl, kernel in (("xla", False), ("pallas_triton", True)):     # traced, not run
        fn = lambda *a: qla(*a, num_targets=case.num_targets, impl=impl)  # noqa: E731
        assert ("pallas_call" in str(jax.make_jaxpr(fn)(*args))) == kernel, impl
    want = "pallas_triton" if jax.default_backend() == "gpu" else "xla"
    np.testing.assert_array_equal(
        np.asarray(qla(*args, num_targets=case.num_targets)),
        np.asarray(qla(*args, num_targets=case.num_targets, impl=want)))
    with pytest.raises(ValueError, match="impl: expected one of"):
        qla(*args, num_targets=case.num_targets, impl="cuda")


# ------------------------------------------------------------------ the kernel's configurations


def test_bad_inputs_name_the_argument():
    case = random_case(81, [5, 9])
    nt = case.num_targets

    def call(q, k, v, offsets, impl="pallas_triton", **kw):
        return qla(q, k, v, offsets, impl=impl, **{"num_targets": nt, **kw})

    with pytest.raises(ValueError, match="q, k: expected"):
        call(case.q, case.k[..., :8], case.v, case.offsets)
    with pytest.raises(ValueError, match="v: expected"):
        call(case.q, case.k, case.v[:3], case.offsets)
    with pytest.raises(ValueError, match="offsets: expected"):
        call(case.q, case.k, case.v, case.offsets.astype(jnp.float32))
    with pytest.raises(ValueError, match="num_targets: expected"):
        call(case.q, case.k, case.v, case.offsets, num_targets=jnp.zeros(5, jnp.int32))
    with pytest.raises(ValueError, match="num_targets: expected"):
        call(case.q, case.k, case.v, case.offsets, num_targets=jnp.zeros(2, jnp.float32),
             impl="xla")
    with pytest.raises(ValueError, match="q: expected a floating dtype"):
        call(case.q.astype(jnp.int32), case.k, case.v, case.offsets, impl="xla")
    with pytest.raises(ValueError, match="head width"):
        call(case.q[..., :12], case.k[..., :12], case.v, case.offsets)
    with pytest.raises(ValueError, match="k, v: expected q's dtype"):
        call(case.q, case.k.astype(jnp.bfloat16), case.v, case.offsets)
    with pytest.raises(ValueError, match="max_seq_len: expected"):
        softmax_seed_attention_reference(case.q, case.k, case.v, case.offsets, num_targets=nt,
                                         max_seq_len=0)


@pytest.mark.parametrize("field,value", [("block_rows", 48), ("block_dv", 8), ("num_warps", 3),
                                         ("num_stages", 0), ("split_rows", 0)])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"QlaConfig.{field}"):
        QlaConfig(**{field: value})


def test_config_defaults():
    with pytest.raises(dataclasses.FrozenInstanceError):
        QlaConfig().block_rows = 32  # type: ignore[misc]
    assert QlaConfig.default(64, 64, jnp.bfloat16) == QlaConfig(64, 64, 4096, 4, 2)
    assert QlaConfig.default(64, 64, jnp.float32).block_rows == 64
    assert QlaConfig.default(128, 128, jnp.float32) == QlaConfig(32, 32, 4096, 4, 2)
    assert QlaConfig.default(256, 256, jnp.float32) == QlaConfig(16, 16, 4096, 4, 2)
    assert QlaConfig.default(256, 256, jnp.bfloat16).block_dv == 32
    assert QlaConfig.default(64, 64, causal=True) == QlaConfig(16, 16, 4096, 4, 1)
    assert QlaConfig.default(128, 64, causal=True).num_warps == 8
    assert [num_splits(t, b, 4096) for t, b in ((100_000, 1), (4096, 1), (1 << 20, 512), (0, 0))] \
        == [32, 1, 1, 1]
    assert num_splits(10 ** 7, 1, 16) == MAX_SPLIT
    assert A10G_SMEM_BYTES == 101_376


def test_lowers_to_triton():
    """The kernels (full: state, output, backward state, backward rows; causal: forward,
    backward) lower to Triton IR (the GPU path's first step, which needs no GPU): catches an op
    without a Triton lowering rule on a CPU-only machine."""
    case = random_case(91, [40, 7], dqk=64, dv=64, dtype=jnp.bfloat16)
    names = {False: ("qla_state", "qla_fwd", "qla_bwd_state", "qla_bwd"),
             True: ("qla_causal_fwd", "qla_causal_bwd")}
    for causal, kernels in names.items():
        def loss(q, k, v):
            out = qla(q, k, v, case.offsets, num_targets=case.num_targets, causal=causal,
                      impl="pallas_triton", interpret=False)
            return jnp.sum(out.astype(jnp.float32))

        traced = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(case.q, case.k,
                                                                            case.v)
        text = traced.lower(lowering_platforms=("cuda",)).as_text()
        for name in kernels:
            assert name in text, name


# ------------------------------------------------------------------------------ compiled (GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda t: jnp.dtype(t).name)
@pytest.mark.parametrize("lengths", [[1, 0, 63, 64, 65, 300], [100_000], [60_000, 17, 40_000]],
                         ids=["short", "100k", "100k_jagged"])
def test_gpu_full(lengths, dtype):
    case = random_case(sum(lengths), lengths, heads=2, dqk=64, dv=64, dtype=dtype,
                       targets=[min(128, n) for n in lengths])
    check_forward(case, "pallas_triton", False, config=None, interpret=False)
    check_gradients(case, "pallas_triton", False, config=None, interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda t: jnp.dtype(t).name)
@pytest.mark.parametrize("lengths", [[1, 0, 63, 64, 65, 300], [100_000]], ids=["short", "100k"])
def test_gpu_causal(lengths, dtype):
    case = random_case(sum(lengths) + 1, lengths, heads=2, dqk=64, dv=64, dtype=dtype,
                       targets=[min(128, n) for n in lengths])
    check_forward(case, "pallas_triton", True, config=None, interpret=False)
    check_gradients(case, "pallas_triton", True, config=None, interpret=False)


@pytest.mark.gpu
def test_gpu_wide_heads_and_many_short_sequences():
    """D = Dv = 128 (column blocks); 2,000 sequences of 1..40 rows (tiles straddle many)."""
    lengths = list(np.random.default_rng(3).integers(1, 40, 2000))
    case = random_case(5, lengths, heads=3, dqk=128, dv=128, dtype=jnp.bfloat16)
    check_forward(case, "pallas_triton", False, config=None, interpret=False)
    check_gradients(case, "pallas_triton", False, config=None, interpret=False)
