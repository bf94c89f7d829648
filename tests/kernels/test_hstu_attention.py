"""The HSTU attention op (``pallas_kernels.hstu_attention.api.hstu_attention``): every
implementation against the reference.

The reference itself is checked against a float64 loop over (i, j) pairs that spells out the mask
(causal, targets), the rab positions and buckets and the normalizer. The shared base runs each
``impl`` ("xla", "pallas_triton") against the reference on random jagged batches (fixed and fresh
seeds, lengths 0 and not multiples of the tile, with and without rab_pos / rab_time, causal and
not, targets, float32 / bfloat16): outputs and gradients with respect to q, k, v and both tables.
Then the kernel's configurations and errors. On CPU the kernels run in Pallas interpret mode; the
``gpu`` tests compile them with Triton (lengths up to 8192). Errors are relative L2 norms against
the reference evaluated in float32 on the same (rounded) inputs.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._common import A10G_SMEM_BYTES
from pallas_kernels.hstu_attention.api import hstu_attention
from pallas_kernels.hstu_attention.config import HstuAttentionConfig
from pallas_kernels.hstu_attention.reference import (
    NUM_POS_BUCKETS,
    NUM_TIME_BUCKETS,
    POS_BOUNDARIES,
    TIME_BOUNDARIES,
    hstu_attention_reference,
    pos_bucket,
    time_bucket,
)
from tests.kernels.seeds import FRESH_SEED

IMPLS = ("xla", "pallas_triton")
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 1.5e-2}
"""Relative L2 error against the float32 reference on the same inputs."""
GRAD_TOL = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2}
SMALL = HstuAttentionConfig(block_q=16, block_k=16)
"""16-row tiles: several tiles per sequence at interpret-mode lengths."""


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
    max_seq_len: int
    timestamps: jax.Array
    rab_pos: jax.Array
    rab_time: jax.Array
    num_targets: jax.Array

    def kwargs(self, rab_pos: bool = False, rab_time: bool = False, targets: bool = False,
               **extra) -> Dict:
        kw = dict(max_seq_len=self.max_seq_len, **extra)
        if rab_pos:
            kw["rab_pos"] = self.rab_pos
        if rab_time:
            kw.update(rab_time=self.rab_time, timestamps=self.timestamps)
        if targets:
            kw["num_targets"] = self.num_targets
        return kw


def random_case(seed: int, lengths: Sequence[int], *, heads: int = 2, dqk: int = 16,
                dv: int = 32, dtype=jnp.float32, pad: int = 5,
                max_seq_len: Optional[int] = None) -> Case:
    """Jagged batch with ``lengths`` (0 allowed), ``pad`` padding rows past the last sequence,
    timestamps increasing within a sequence with gaps from 0 s to years (every time bucket), and
    0..3 targets per sequence (never more than its length)."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    total = int(offsets[-1]) + pad
    q, k, v = (rng.normal(size=(total, heads, d)) * 0.5 for d in (dqk, dqk, dv))
    gaps = np.exp(rng.uniform(0, 21, total)).astype(np.int64) * (rng.random(total) < 0.9)
    ts = np.cumsum(gaps) % (1 << 30)
    ts = np.concatenate([np.sort(ts[s:e]) for s, e in zip(offsets[:-1], offsets[1:])]
                        + [ts[offsets[-1]:]]).astype(np.int32)
    targets = np.minimum(rng.integers(0, 4, len(lengths)), lengths).astype(np.int32)
    as_dtype = lambda a: jnp.asarray(a, jnp.float32).astype(dtype)  # noqa: E731
    return Case(as_dtype(q), as_dtype(k), as_dtype(v), jnp.asarray(offsets),
                max_seq_len or max(int(lengths.max(initial=0)), 1), jnp.asarray(ts),
                jnp.asarray(rng.normal(size=NUM_POS_BUCKETS) * 0.5, jnp.float32),
                jnp.asarray(rng.normal(size=NUM_TIME_BUCKETS) * 0.5, jnp.float32),
                jnp.asarray(targets))


def _f32(case: Case) -> Case:
    return dataclasses.replace(case, q=case.q.astype(jnp.float32), k=case.k.astype(jnp.float32),
                               v=case.v.astype(jnp.float32))


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.isfinite(got).all(), "returned NaN/inf"
    denom = np.linalg.norm(want)
    return float(np.linalg.norm(got - want) / (denom if denom > 0 else 1.0))


def check_forward(case: Case, impl: str, config=None, interpret=None, **flags) -> None:
    kw = case.kwargs(**flags)
    extra = {} if impl == "xla" else dict(config=config, interpret=interpret)
    out = hstu_attention(case.q, case.k, case.v, case.offsets, impl=impl, **kw, **extra)
    assert out.shape == case.q.shape[:2] + case.v.shape[-1:] and out.dtype == case.q.dtype
    c32 = _f32(case)
    want = hstu_attention(c32.q, c32.k, c32.v, case.offsets, impl="xla", **kw)
    assert rel_err(out, want) < TOL[case.q.dtype.type], (impl, flags, rel_err(out, want))
    valid = int(case.offsets[-1])
    assert not np.asarray(out[valid:], np.float32).any(), "padding rows must be 0"


def check_gradients(case: Case, impl: str, config=SMALL, interpret=None, **flags) -> None:
    """Gradients of ``sum(sin(out) * w)`` w.r.t. q, k, v and the tables given in ``flags``."""
    kw = case.kwargs(**flags)
    weight = jnp.asarray(np.random.default_rng(1).normal(size=case.q.shape[:2] + case.v.shape[-1:]),
                         jnp.float32)

    def loss(fn_impl, **more):
        def f(q, k, v, rp, rt):
            kk = dict(kw)
            if "rab_pos" in kk:
                kk["rab_pos"] = rp
            if "rab_time" in kk:
                kk["rab_time"] = rt
            out = hstu_attention(q, k, v, case.offsets, impl=fn_impl, **kk, **more)
            return jnp.sum(jnp.sin(out.astype(jnp.float32)) * weight)
        return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4)))

    more = {} if impl == "xla" else dict(config=config, interpret=interpret)
    got = loss(impl, **more)(case.q, case.k, case.v, case.rab_pos, case.rab_time)
    c32 = _f32(case)
    want = loss("xla")(c32.q, c32.k, c32.v, case.rab_pos, case.rab_time)
    names = ("dq", "dk", "dv", "drab_pos", "drab_time")
    for name, g, w in zip(names, got, want):
        if name == "drab_pos" and not flags.get("rab_pos"):
            assert not np.asarray(g).any()
            continue
        if name == "drab_time" and not flags.get("rab_time"):
            assert not np.asarray(g).any()
            continue
        err = rel_err(g, w)
        assert err < GRAD_TOL[case.q.dtype.type], (impl, name, flags, err)
    valid = int(case.offsets[-1])
    for g in got[:3]:
        assert not np.asarray(g[valid:], np.float32).any(), "padding rows must get 0 gradient"


ALL = dict(rab_pos=True, rab_time=True, targets=True)


# --------------------------------------------------------------- the reference is the contract


def brute_force(case: Case, causal: bool, normalizer: str, **flags) -> np.ndarray:
    """float64 loop over (i, j) pairs, written from the module docstring of the reference."""
    q, k, v = (np.asarray(a, np.float64) for a in (case.q, case.k, case.v))
    off, ts = np.asarray(case.offsets), np.asarray(case.timestamps, np.int64)
    rp, rt = np.asarray(case.rab_pos, np.float64), np.asarray(case.rab_time, np.float64)
    n = case.max_seq_len
    norm = float(n) if normalizer == "seq_len" else 1.0
    out = np.zeros(q.shape[:2] + v.shape[-1:])
    for b in range(len(off) - 1):
        s, length = off[b], min(off[b + 1] - off[b], n)
        targets = int(case.num_targets[b]) if flags.get("targets") else 0
        hist = length - min(targets, length)
        for i in range(length):
            for j in range(length):
                if i < hist:
                    ok = j < hist and (j <= i or not causal)
                else:
                    ok = j < hist or j == i
                if not ok:
                    continue
                bias = 0.0
                if flags.get("rab_pos"):
                    d = abs(min(i, hist) - min(j, hist))
                    bias += rp[sum(d >= e for e in POS_BOUNDARIES)]
                if flags.get("rab_time"):
                    dt = abs(ts[s + i] - ts[s + j])
                    bias += rt[sum(dt >= e for e in TIME_BOUNDARIES)]
                x = np.sum(q[s + i] * k[s + j], -1) + bias                    # (H,)
                out[s + i] += (x / (1 + np.exp(-x)))[:, None] * v[s + j] / norm
    return out


@pytest.mark.parametrize("causal,normalizer,flags", [
    (True, "seq_len", {}),
    (True, "seq_len", ALL),
    (False, "none", ALL),
    (False, "seq_len", dict(rab_pos=True)),
])
def test_reference_matches_brute_force(causal, normalizer, flags):
    case = random_case(7, [9, 0, 13, 1, 6], max_seq_len=11)   # 13 > max_seq_len: cut to 11 rows
    got = hstu_attention_reference(case.q, case.k, case.v, case.offsets,
                                   **case.kwargs(**flags, causal=causal, normalizer=normalizer))
    want = brute_force(case, causal, normalizer, **flags)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_buckets():
    assert NUM_POS_BUCKETS <= 32 and NUM_TIME_BUCKETS <= 32
    d = jnp.arange(-5000, 5000)
    pb = np.asarray(pos_bucket(d))
    np.testing.assert_array_equal(pb[5000:5016], np.arange(16))          # exact below 16
    np.testing.assert_array_equal(pb, np.asarray(pos_bucket(-d)))       # symmetric
    assert (np.diff(pb[5000:]) >= 0).all() and pb.max() == NUM_POS_BUCKETS - 1
    dt = jnp.asarray([0, 1, 2, 3, 4, 7, 8, 1000, 86400, (1 << 30) - 1, 1 << 30, 2 ** 31 - 1])
    np.testing.assert_array_equal(np.asarray(time_bucket(dt)),
                                  [0, 1, 2, 2, 3, 3, 4, 10, 17, 30, 31, 31])
    np.testing.assert_array_equal(np.asarray(time_bucket(-dt)), np.asarray(time_bucket(dt)))


# ------------------------------------------------------- shared base: every impl vs the reference


@pytest.mark.parametrize("causal,flags", [(True, {}), (True, ALL), (False, ALL)],
                         ids=["plain", "rab_targets", "noncausal_rab_targets"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda t: jnp.dtype(t).name)
def test_forward_matches_reference(impl, dtype, causal, flags):
    case = random_case(11, [0, 37, 16, 1, 50, 17], dtype=dtype, max_seq_len=50)
    check_forward(case, impl, config=SMALL, causal=causal, **flags)


@pytest.mark.parametrize("seed", [FRESH_SEED])
def test_fresh_seed_forward_and_gradients(impl, seed):
    """A fresh draw per test run: lengths (some 0, rarely tile multiples), heads, widths, rab and
    target flags and causality."""
    rng = np.random.default_rng(seed)
    lengths = [int(x) * (rng.random() > 0.2) for x in rng.integers(1, 70, rng.integers(2, 5))]
    flags = dict(rab_pos=bool(rng.random() < 0.7), rab_time=bool(rng.random() < 0.7),
                 targets=bool(rng.random() < 0.5))
    case = random_case(seed, lengths, heads=int(rng.integers(1, 3)), dqk=16,
                       dv=int(rng.choice([16, 32])), max_seq_len=max(max(lengths), 1) + 3)
    causal = bool(rng.random() < 0.8)
    check_forward(case, impl, config=SMALL, causal=causal, **flags)
    if impl != "xla":   # float32 "xla" gradients are the reference's own
        check_gradients(case, impl, causal=causal, **flags)


@pytest.mark.parametrize("causal,flags", [(True, ALL), (False, dict(rab_pos=True, targets=True))],
                         ids=["rab_targets", "noncausal_pos_targets"])
def test_gradients_match_reference(causal, flags):
    """Kernel only: in float32 ``impl="xla"`` is the reference (its bfloat16 gradients are tested
    below and on fresh seeds)."""
    case = random_case(21, [23, 0, 40, 17], max_seq_len=40)
    check_gradients(case, "pallas_triton", causal=causal, **flags)


def test_gradients_bfloat16(impl):
    case = random_case(31, [33, 5, 0, 21], dtype=jnp.bfloat16, max_seq_len=40)
    check_gradients(case, impl, **ALL)


def test_empty_batches(impl):
    """No rows at all; all sequences empty (every row padding); no sequences."""
    for lengths, pad in (([0, 0, 0], 0), ([0, 0], 7), ([], 4)):
        case = random_case(41, lengths, pad=pad, max_seq_len=8)
        kw = case.kwargs(targets=True)
        out = hstu_attention(case.q, case.k, case.v, case.offsets, impl=impl, **kw)
        assert out.shape == (pad, 2, 32) and not np.asarray(out).any()
        grads = jax.grad(lambda q: jnp.sum(hstu_attention(
            q, case.k, case.v, case.offsets, impl=impl, **kw)))(case.q)
        assert grads.shape == case.q.shape and not np.asarray(grads).any()


def test_normalizer_and_long_sequences_cut(impl):
    """``normalizer="none"`` is ``max_seq_len`` times ``"seq_len"``; rows past ``max_seq_len`` of a
    longer sequence are 0."""
    case = random_case(51, [20, 9], max_seq_len=12)
    kw = case.kwargs(rab_pos=True)
    extra = {} if impl == "xla" else dict(config=SMALL)
    a = hstu_attention(case.q, case.k, case.v, case.offsets, impl=impl, **kw, **extra)
    b = hstu_attention(case.q, case.k, case.v, case.offsets, impl=impl, normalizer="none",
                       **kw, **extra)
    np.testing.assert_allclose(np.asarray(b), 12 * np.asarray(a), rtol=1e-5, atol=1e-6)
    assert not np.asarray(a[12:20]).any() and np.asarray(a[:12]).any()
    with pytest.raises(ValueError, match="normalizer: expected one of"):
        hstu_attention(case.q, case.k, case.v, case.offsets, impl=impl, normalizer="softmax", **kw)


# ---------------------------------------------------------------------------- impl dispatch


def test_impl_dispatch():
    case = random_case(61, [5, 9])
    args = (case.q, case.k, case.v, case.offsets)
    for impl, kernel in (("xla", False), ("pallas_triton", True)):     # traced, not run
        fn = lambda *a: hstu_attention(*a, impl=impl, **case.kwargs())  # noqa: E731
        jaxpr = str(jax.make_jaxpr(fn)(*args))
        assert ("pallas_call" in jaxpr) == kernel, impl
    want = "pallas_triton" if jax.default_backend() == "gpu" else "xla"
    np.testing.assert_array_equal(np.asarray(hstu_attention(*args, **case.kwargs())),
                                  np.asarray(hstu_attention(*args, impl=want, **case.kwargs())))
    with pytest.raises(ValueError, match="impl: expected one of"):
        hstu_attention(*args, impl="cuda", **case.kwargs())


# ------------------------------------------------------------------ the kernel's configurations


@pytest.mark.parametrize("block_q,block_k", [(16, 32), (32, 16)])
def test_unequal_tiles(block_q, block_k):
    """Query and key tiles of different sizes (the target and causal tile ranges round
    differently), with targets spanning several tiles."""
    case = random_case(71, [45, 3, 30], max_seq_len=45)
    case = dataclasses.replace(case, num_targets=jnp.asarray([20, 3, 0], jnp.int32))
    config = HstuAttentionConfig(block_q=block_q, block_k=block_k)
    check_forward(case, "pallas_triton", config, **ALL)
    check_gradients(case, "pallas_triton", config, targets=True, rab_time=True)


def test_bad_inputs_name_the_field():
    case = random_case(81, [5, 9])
    args = (case.q, case.k, case.v, case.offsets)

    def call(*a, impl="pallas_triton", **kw):
        kw = {**case.kwargs(), **kw}
        return hstu_attention(*a, impl=impl, **kw)

    with pytest.raises(ValueError, match="q, k: expected"):
        call(case.q, case.k[..., :8], case.v, case.offsets)
    with pytest.raises(ValueError, match="v: expected"):
        call(case.q, case.k, case.v[:3], case.offsets)
    with pytest.raises(ValueError, match="offsets: expected"):
        call(*args[:3], case.offsets.astype(jnp.float32))
    with pytest.raises(ValueError, match="rab_pos: expected"):
        call(*args, rab_pos=jnp.zeros(7))
    with pytest.raises(ValueError, match="timestamps: required"):
        call(*args, rab_time=case.rab_time)
    with pytest.raises(ValueError, match="num_targets: expected"):
        call(*args, num_targets=jnp.zeros(5, jnp.int32))
    with pytest.raises(ValueError, match="head width"):
        call(case.q[..., :12], case.k[..., :12], case.v, case.offsets)
    with pytest.raises(ValueError, match="k, v: expected q's dtype"):
        call(case.q, case.k.astype(jnp.bfloat16), case.v, case.offsets)


@pytest.mark.parametrize("field,value", [("block_q", 48), ("block_k", 8), ("num_warps", 3)])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"HstuAttentionConfig.{field}"):
        HstuAttentionConfig(**{field: value})


def test_config_defaults():
    with pytest.raises(dataclasses.FrozenInstanceError):
        HstuAttentionConfig().block_q = 32  # type: ignore[misc]
    assert HstuAttentionConfig.default(7).block_q == 16
    assert HstuAttentionConfig.default(8192, 64, jnp.bfloat16).block_q == 64
    assert HstuAttentionConfig.default(8192, 64, jnp.float32).block_q == 64
    assert HstuAttentionConfig.default(8192, 128, jnp.float32).block_q == 32
    assert HstuAttentionConfig.default(8192, 256, jnp.float32).block_q == 16
    assert HstuAttentionConfig.default(8192, 256, jnp.bfloat16).block_q == 32
    assert HstuAttentionConfig.default(8192, backward=True).num_stages == 1
    assert A10G_SMEM_BYTES == 101_376


def test_lowers_to_triton():
    """The three kernels lower to Triton IR (the GPU path's first step, which needs no GPU):
    catches an op without a Triton lowering rule on a CPU-only machine."""
    case = random_case(91, [40, 7], dqk=64, dv=64, dtype=jnp.bfloat16)

    def loss(q, k, v):
        out = hstu_attention(q, k, v, case.offsets, impl="pallas_triton", interpret=False,
                             **case.kwargs(**ALL))
        return jnp.sum(out.astype(jnp.float32))

    traced = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(case.q, case.k, case.v)
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    for name in ("hstu_attention_fwd", "hstu_attention_dq", "hstu_attention_dkv"):
        assert name in text, name


# ------------------------------------------------------------------------------ compiled (GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda t: jnp.dtype(t).name)
@pytest.mark.parametrize("lengths", [[1, 0, 63, 64, 65, 300], [2048, 17, 1000], [8192, 4000]],
                         ids=["short", "2k", "8k"])
def test_gpu_forward(lengths, dtype):
    case = random_case(sum(lengths), lengths, heads=2, dqk=64, dv=64, dtype=dtype)
    check_forward(case, "pallas_triton", interpret=False, **ALL)
    check_forward(case, "pallas_triton", interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda t: jnp.dtype(t).name)
@pytest.mark.parametrize("lengths", [[1, 0, 63, 64, 65, 300], [8192, 1000]], ids=["short", "8k"])
def test_gpu_gradients(lengths, dtype):
    case = random_case(sum(lengths) + 1, lengths, heads=2, dqk=64, dv=64, dtype=dtype)
    check_gradients(case, "pallas_triton", config=None, interpret=False, **ALL)


@pytest.mark.gpu
def test_gpu_non_causal_and_wide_heads():
    case = random_case(5, [700, 129, 0, 1], heads=3, dqk=128, dv=128, dtype=jnp.bfloat16)
    check_forward(case, "pallas_triton", interpret=False, causal=False, **ALL)
    check_gradients(case, "pallas_triton", config=None, interpret=False, causal=False, **ALL)
