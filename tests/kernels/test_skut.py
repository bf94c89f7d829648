"""The SKUT op (``pallas_kernels.skut.api.skut``): every implementation against the reference.

The first part is the shared base: each test runs for every ``impl`` ("xla", "pallas_triton") and
checks :func:`skut` against :func:`skut_reference` on random data (fixed and fresh seeds, ragged
masks, lengths that are not multiples of the tile, float32 / bfloat16 / float16, gradients).
The second part tests the kernel's own configurations and errors. On CPU the kernel runs in Pallas
interpret mode (the same kernel body, executed by XLA:CPU); the ``gpu`` tests compile it with
Triton on the GPU machine. Errors are relative L2 norms against the reference evaluated in float32
on the same (rounded) inputs (thresholds: ``skut_cases.TOL``).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.skut.api import skut
from pallas_kernels.skut.config import MAX_RESIDENT_TILES, SkutConfig
from pallas_kernels.skut.reference import skut_reference
from tests.kernels.seeds import FRESH_SEED
from tests.kernels.skut_cases import DTYPES, TOL, random_inputs, random_weights, reference, rel_err

IMPLS = ("xla", "pallas_triton")


@pytest.fixture(params=IMPLS)
def impl(request) -> str:
    return request.param


# ------------------------------------------------------- shared base: every impl vs the reference


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: jnp.dtype(t).name)
@pytest.mark.parametrize("length", [1, 64, 192, 300])   # short and ragged: the fresh-seed test
def test_matches_reference(impl, length, dtype):
    seed = length * 31 + jnp.dtype(dtype).itemsize
    w = random_weights(seed)
    x, mask = random_inputs(seed + 1, 4, length, dtype)
    out = skut(x, mask, w, impl=impl)
    assert out.shape == x.shape and out.dtype == x.dtype
    err = rel_err(out, x, mask, w)
    assert err < TOL[dtype], err
    # no worse than the reference itself evaluated in the input dtype, up to rounding
    ref_own = rel_err(reference(x, mask, w), x, mask, w)
    assert err <= 1.5 * ref_own + 2e-6, (err, ref_own)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda t: jnp.dtype(t).name)
@pytest.mark.parametrize("seed", [FRESH_SEED])
def test_fresh_seed_matches_reference(impl, seed, dtype):
    """A fresh draw per test run: weights, inputs, batch and a length that is no multiple of 16."""
    rng = np.random.default_rng(seed)
    length = 16 * int(rng.integers(0, 8)) + int(rng.integers(1, 16))
    batch = int(rng.integers(3, 6))
    w = random_weights(seed)
    x, mask = random_inputs(seed + 1, batch, length, dtype)
    err = rel_err(skut(x, mask, w, impl=impl), x, mask, w)
    assert err < TOL[dtype], (seed, length, err)


def test_gradient_is_the_reference_gradient(impl):
    w = random_weights(41)
    x, mask = random_inputs(42, 3, 20, jnp.float32)

    def loss(fn):
        return lambda x_, w_: jnp.sum(jnp.sin(fn(x_, mask, w_)))

    gk = jax.jit(jax.grad(loss(lambda *a: skut(*a, impl=impl)), argnums=(0, 1)))(x, w)
    gr = jax.jit(jax.grad(loss(skut_reference), argnums=(0, 1)))(x, w)
    for a, b in zip(jax.tree_util.tree_leaves(gk), jax.tree_util.tree_leaves(gr)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=2e-4)


def test_fully_padded_rows_are_finite_and_match(impl):
    w = random_weights(21)
    x, _ = random_inputs(22, 2, 33, jnp.float32)
    mask = jnp.zeros((2, 33), bool)
    out = np.asarray(skut(x, mask, w, impl=impl))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, np.asarray(reference(x, mask, w)), rtol=1e-5, atol=1e-5)


def test_integer_masks(impl):
    w = random_weights(31)
    x, mask = random_inputs(32, 3, 50, jnp.float32)
    a = skut(x, mask, w, impl=impl)
    for m in (mask.astype(jnp.int8), mask.astype(jnp.int32)):
        np.testing.assert_array_equal(np.asarray(skut(x, m, w, impl=impl)), np.asarray(a))


def test_dropout_runs_the_reference(impl):
    """The kernel has no dropout: with dropout active every impl is the reference with dropout;
    a rate without a key (or a zero rate) is inference."""
    w = random_weights(61)
    x, mask = random_inputs(62, 3, 24, jnp.float32)
    key = jax.random.PRNGKey(3)
    got = skut(x, mask, w, impl=impl, dropout_rate=0.25, dropout_key=key)
    want = reference(x, mask, w, dropout_rate=0.25, dropout_key=key)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    inference = skut(x, mask, w, impl=impl)
    assert not np.allclose(np.asarray(got), np.asarray(inference))
    for kw in (dict(dropout_rate=0.25), dict(dropout_rate=0.0, dropout_key=key)):
        np.testing.assert_array_equal(np.asarray(skut(x, mask, w, impl=impl, **kw)),
                                      np.asarray(inference))


# ---------------------------------------------------------------------------- impl dispatch


def test_impl_dispatch():
    w = random_weights(33)
    x, mask = random_inputs(34, 3, 20, jnp.float32)
    np.testing.assert_allclose(np.asarray(skut(x, mask, w, impl="xla")),
                               np.asarray(skut_reference(x, mask, w)), rtol=1e-6, atol=1e-6)
    for impl, kernel in (("xla", False), ("pallas_triton", True)):     # traced, not run
        jaxpr = str(jax.make_jaxpr(lambda *a: skut(*a, impl=impl))(x, mask, w))
        assert ("pallas_call" in jaxpr) == kernel, impl
    want = "pallas_triton" if jax.default_backend() == "gpu" else "xla"
    np.testing.assert_array_equal(np.asarray(skut(x, mask, w)),
                                  np.asarray(skut(x, mask, w, impl=want)))
    with pytest.raises(ValueError, match="impl: expected one of"):
        skut(x, mask, w, impl="cuda")


# ------------------------------------------------------------------ the kernel's configurations


@pytest.mark.parametrize("resident", [True, False])
@pytest.mark.parametrize("length,block", [(7, 16), (100, 32), (129, 64)])
def test_configs_agree(length, block, resident):
    """Both variants and several tilings (L not a multiple of the block) compute the same function."""
    # the resident variant refuses float32 with 64-row tiles (SkutConfig.check): test it in bf16
    dtype = jnp.bfloat16 if resident and block >= 64 else jnp.float32
    w = random_weights(length + block)
    x, mask = random_inputs(length * block + resident, 3, length, dtype)
    cfg = SkutConfig(block_q=block, block_k=block, resident=resident)
    assert rel_err(skut(x, mask, w, impl="pallas_triton", config=cfg), x, mask, w) < TOL[dtype]
    if dtype != jnp.float32:
        with pytest.raises(ValueError, match="resident: float32"):
            skut(x.astype(jnp.float32), mask, w, impl="pallas_triton", config=cfg)


def test_streaming_with_different_query_and_key_blocks():
    w = random_weights(5)
    x, mask = random_inputs(6, 3, 150, jnp.float32)
    for bq, bk in ((16, 64), (64, 16)):
        cfg = SkutConfig(block_q=bq, block_k=bk)
        out = skut(x, mask, w, impl="pallas_triton", config=cfg)
        assert rel_err(out, x, mask, w) < TOL[jnp.float32]


@pytest.mark.parametrize("num_layers", [1, 3])
def test_layer_counts(num_layers):
    """Odd and even layer counts exercise both ping-pong parities of the streaming variant."""
    w = random_weights(num_layers, n=num_layers)
    x, mask = random_inputs(num_layers + 10, 3, 70, jnp.float32)
    assert rel_err(skut(x, mask, w, impl="pallas_triton"), x, mask, w) < TOL[jnp.float32]


def test_multi_head_non_causal_and_other_widths(impl):
    w = random_weights(11, d=64, f=128)
    x, mask = random_inputs(12, 3, 40, jnp.float32)
    for kw in (dict(num_heads=2, causal=True), dict(num_heads=4, causal=False)):
        out = skut(x, mask, w, impl=impl, **kw)
        assert rel_err(out, x, mask, w, **kw) < TOL[jnp.float32], kw


def test_bad_inputs_name_the_field():
    w = random_weights(51)
    x, mask = random_inputs(52, 2, 10, jnp.float32)

    def kernel(x_, m_, w_, **kw):
        return skut(x_, m_, w_, impl="pallas_triton", **kw)

    with pytest.raises(ValueError, match="x: expected"):
        kernel(x[0], mask, w)
    with pytest.raises(ValueError, match="mask: expected shape"):
        kernel(x, mask[:, :5], w)
    with pytest.raises(ValueError, match="x: dtype"):
        kernel(x.astype(jnp.float64) if jax.config.jax_enable_x64 else x.astype(jnp.int32), mask, w)
    with pytest.raises(ValueError, match="mask: expected bool"):
        kernel(x, mask.astype(jnp.float32), w)
    with pytest.raises(ValueError, match="x: width"):
        kernel(x[..., :32], mask, w)
    with pytest.raises(ValueError, match="num_heads"):
        kernel(x, mask, w, num_heads=3)
    with pytest.raises(ValueError, match="dim_feedforward"):
        kernel(x, mask, random_weights(1, f=24))
    with pytest.raises(ValueError, match="resident"):
        kernel(jnp.zeros((1, 16 * MAX_RESIDENT_TILES + 1, 64)),
               jnp.ones((1, 16 * MAX_RESIDENT_TILES + 1), bool), w,
               config=SkutConfig(block_q=16, block_k=16, resident=True))


@pytest.mark.parametrize("field,value", [("block_q", 48), ("block_k", 8), ("num_warps", 3)])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"SkutConfig.{field}"):
        SkutConfig(**{field: value})


def test_config_defaults():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SkutConfig().block_q = 32  # type: ignore[misc]
    assert SkutConfig.default(1).block_q == 16
    assert SkutConfig.default(7).block_q == 16
    assert SkutConfig.default(192, dtype=jnp.bfloat16).block_q == 64
    assert SkutConfig.default(2048, dtype=jnp.float32).block_q == 16


# ------------------------------------------------------------------------------ compiled (GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: jnp.dtype(t).name)
@pytest.mark.parametrize("length", [1, 7, 64, 192, 300, 1000, 2048])
def test_gpu_matches_reference(length, dtype):
    seed = length * 17 + jnp.dtype(dtype).itemsize
    w = random_weights(seed)
    x, mask = random_inputs(seed + 1, 5, length, dtype)
    out = skut(x, mask, w, impl="pallas_triton", interpret=False)
    err = rel_err(out, x, mask, w)
    assert err < TOL[dtype], err


@pytest.mark.gpu
@pytest.mark.parametrize("resident", [True, False])
def test_gpu_variants(resident):
    w = random_weights(7)
    x, mask = random_inputs(8, 33, 192, jnp.bfloat16)
    cfg = SkutConfig(block_q=64, block_k=64, resident=resident)
    out = skut(x, mask, w, impl="pallas_triton", config=cfg, interpret=False)
    assert rel_err(out, x, mask, w) < TOL[jnp.bfloat16]
