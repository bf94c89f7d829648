"""SKUT kernel (``pallas_kernels/skut.py``) against its reference ``skut_reference``.

On CPU the kernel runs in Pallas interpret mode (the same kernel body, executed by XLA:CPU); the
``gpu`` tests compile it with Triton on the GPU machine. Errors are relative L2 norms against the
reference evaluated in float32 at highest precision on the same (rounded) inputs; thresholds follow
METHOD.md: float32 far under 1e-3, float16 operands about 1e-3, bfloat16 operands under 1e-2. Each test
draws fresh random weights and inputs (seeded by the test parameters).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.skut import MAX_RESIDENT_TILES, SkutConfig, skut, transformer_encoder
from pallas_kernels.skut_reference import EncoderWeights, skut_reference

TOL = {jnp.float32: 2e-5, jnp.float16: 3e-3, jnp.bfloat16: 1.5e-2}
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def random_weights(seed: int, n: int = 2, d: int = 64, f: int = 32) -> EncoderWeights:
    ks = jax.random.split(jax.random.PRNGKey(seed), 12)
    shapes = dict(w_qkv=(n, d, 3 * d), b_qkv=(n, 3 * d), w_o=(n, d, d), b_o=(n, d), ln1_scale=(n, d),
                  ln1_bias=(n, d), w_1=(n, d, f), b_1=(n, f), w_2=(n, f, d), b_2=(n, d),
                  ln2_scale=(n, d), ln2_bias=(n, d))
    out = {}
    for k, (name, shape) in zip(ks, shapes.items()):
        scale = 1 / np.sqrt(shape[1]) if name.startswith("w_") else 0.2
        out[name] = jax.random.normal(k, shape) * scale + (1.0 if name.endswith("scale") else 0.0)
    return EncoderWeights(**out)


def random_inputs(seed: int, batch: int, length: int, dtype, d: int = 64):
    """Ragged, non-prefix masks: row 0 full, row 1 empty (no valid key anywhere), row 2 with leading
    padding (its first query rows see no key), the rest random."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, length, d)).astype(np.float32)
    mask = rng.random((batch, length)) < rng.uniform(0.3, 0.95, (batch, 1))
    mask[0] = True
    if batch > 1:
        mask[1] = False
    if batch > 2:
        mask[2] = np.arange(length) >= length // 2
    return jnp.asarray(x).astype(dtype), jnp.asarray(mask)


def rel_err(out, x, mask, w, **kw) -> float:
    ref = skut_reference(x.astype(jnp.float32), mask, w, **kw)
    out = np.asarray(out, np.float64)
    assert np.isfinite(out).all(), "kernel returned NaN/inf"
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: jnp.dtype(t).name)
@pytest.mark.parametrize("length", [1, 7, 64, 192, 300])
def test_matches_reference(length, dtype):
    seed = length * 31 + jnp.dtype(dtype).itemsize
    w = random_weights(seed)
    x, mask = random_inputs(seed + 1, 4, length, dtype)
    out = skut(x, mask, w)
    assert out.shape == x.shape and out.dtype == x.dtype
    err = rel_err(out, x, mask, w)
    assert err < TOL[dtype], err
    # no worse than the reference itself evaluated in the input dtype, up to rounding
    ref_own = rel_err(skut_reference(x, mask, w), x, mask, w)
    assert err <= 1.5 * ref_own + 2e-6, (err, ref_own)


@pytest.mark.parametrize("resident", [True, False])
@pytest.mark.parametrize("length,block", [(7, 16), (100, 32), (192, 64), (129, 64)])
def test_configs_agree(length, block, resident):
    """Both variants and several tilings (L not a multiple of the block) compute the same function."""
    # the resident variant refuses float32 with 64-row tiles (SkutConfig.check): test it in bf16
    dtype = jnp.bfloat16 if resident and block >= 64 else jnp.float32
    w = random_weights(length + block)
    x, mask = random_inputs(length * block + resident, 3, length, dtype)
    cfg = SkutConfig(block_q=block, block_k=block, resident=resident)
    assert rel_err(skut(x, mask, w, config=cfg), x, mask, w) < TOL[dtype]
    if dtype != jnp.float32:
        with pytest.raises(ValueError, match="resident: float32"):
            skut(x.astype(jnp.float32), mask, w, config=cfg)


def test_streaming_with_different_query_and_key_blocks():
    w = random_weights(5)
    x, mask = random_inputs(6, 3, 150, jnp.float32)
    for bq, bk in ((16, 64), (64, 16)):
        cfg = SkutConfig(block_q=bq, block_k=bk)
        assert rel_err(skut(x, mask, w, config=cfg), x, mask, w) < TOL[jnp.float32]


@pytest.mark.parametrize("num_layers", [1, 3])
def test_layer_counts(num_layers):
    """Odd and even layer counts exercise both ping-pong parities of the streaming variant."""
    w = random_weights(num_layers, n=num_layers)
    x, mask = random_inputs(num_layers + 10, 3, 70, jnp.float32)
    assert rel_err(skut(x, mask, w), x, mask, w) < TOL[jnp.float32]


def test_multi_head_non_causal_and_other_widths():
    w = random_weights(11, d=64, f=128)
    x, mask = random_inputs(12, 3, 40, jnp.float32)
    for kw in (dict(num_heads=2, causal=True), dict(num_heads=4, causal=False)):
        assert rel_err(skut(x, mask, w, **kw), x, mask, w, **kw) < TOL[jnp.float32], kw


def test_fully_padded_rows_are_finite_and_match():
    w = random_weights(21)
    x, _ = random_inputs(22, 2, 33, jnp.float32)
    mask = jnp.zeros((2, 33), bool)
    out = np.asarray(skut(x, mask, w))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, np.asarray(skut_reference(x, mask, w)), rtol=1e-5, atol=1e-5)


def test_integer_masks_and_dispatcher():
    w = random_weights(31)
    x, mask = random_inputs(32, 3, 50, jnp.float32)
    a = skut(x, mask, w)
    for m in (mask.astype(jnp.int8), mask.astype(jnp.int32)):
        np.testing.assert_array_equal(np.asarray(skut(x, m, w)), np.asarray(a))
    np.testing.assert_array_equal(np.asarray(transformer_encoder(x, mask, w, impl="pallas")),
                                  np.asarray(a))
    np.testing.assert_allclose(np.asarray(transformer_encoder(x, mask, w, impl="xla")),
                               np.asarray(skut_reference(x, mask, w)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="impl"):
        transformer_encoder(x, mask, w, impl="cuda")


def test_gradient_is_the_reference_gradient():
    w = random_weights(41)
    x, mask = random_inputs(42, 3, 20, jnp.float32)

    def loss(fn):
        return lambda x_, w_: jnp.sum(jnp.sin(fn(x_, mask, w_)))

    gk = jax.grad(loss(skut), argnums=(0, 1))(x, w)
    gr = jax.grad(loss(skut_reference), argnums=(0, 1))(x, w)
    for a, b in zip(jax.tree_util.tree_leaves(gk), jax.tree_util.tree_leaves(gr)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=2e-4)


def test_bad_inputs_name_the_field():
    w = random_weights(51)
    x, mask = random_inputs(52, 2, 10, jnp.float32)
    with pytest.raises(ValueError, match="x: expected"):
        skut(x[0], mask, w)
    with pytest.raises(ValueError, match="mask: expected shape"):
        skut(x, mask[:, :5], w)
    with pytest.raises(ValueError, match="x: dtype"):
        skut(x.astype(jnp.float64) if jax.config.jax_enable_x64 else x.astype(jnp.int32), mask, w)
    with pytest.raises(ValueError, match="mask: expected bool"):
        skut(x, mask.astype(jnp.float32), w)
    with pytest.raises(ValueError, match="x: width"):
        skut(x[..., :32], mask, w)
    with pytest.raises(ValueError, match="num_heads"):
        skut(x, mask, w, num_heads=3)
    with pytest.raises(ValueError, match="dim_feedforward"):
        skut(x, mask, random_weights(1, f=24))
    with pytest.raises(ValueError, match="resident"):
        skut(jnp.zeros((1, 16 * MAX_RESIDENT_TILES + 1, 64)), jnp.ones((1, 16 * MAX_RESIDENT_TILES + 1), bool),
             w, config=SkutConfig(block_q=16, block_k=16, resident=True))


def test_config_validation_and_defaults():
    with pytest.raises(ValueError, match="block_q"):
        SkutConfig(block_q=48)
    with pytest.raises(ValueError, match="block_k"):
        SkutConfig(block_k=8)
    with pytest.raises(ValueError, match="num_warps"):
        SkutConfig(num_warps=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        SkutConfig().block_q = 32  # type: ignore[misc]
    assert SkutConfig.default(1).block_q == 16
    assert SkutConfig.default(7).block_q == 16
    assert SkutConfig.default(192, dtype=jnp.bfloat16).block_q == 64
    assert SkutConfig.default(2048, dtype=jnp.float32).block_q == 16


def test_model_encoder_impl_skut_matches_xla():
    from transact_jax.model.config import ModelConfig
    from transact_jax.presets import preset
    from transact_jax.train.config import ExperimentConfig
    from transact_jax.train.state import build_model
    from tests.test_model import SEL, random_inputs as model_inputs

    outs = {}
    for impl in ("xla", "skut"):
        cfg = preset("transact_v2", ExperimentConfig(
            selection=SEL, model=ModelConfig(mlp_dims=(32,), encoder_impl=impl)))
        mdef, params = build_model(cfg, seed=3)
        outs[impl] = mdef.bind(params)(model_inputs(seed=4))
    np.testing.assert_allclose(np.asarray(outs["skut"].logits), np.asarray(outs["xla"].logits),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(outs["skut"].nal_user), np.asarray(outs["xla"].nal_user),
                               rtol=1e-4, atol=1e-5)


def test_checkpoint_written_with_xla_encoder_loads_with_skut():
    from transact_jax.model.config import ModelConfig
    from transact_jax.train.checkpoint import check_compatible
    from transact_jax.train.config import ExperimentConfig

    saved = ExperimentConfig(model=ModelConfig(encoder_impl="xla")).to_dict()
    check_compatible(saved, ExperimentConfig(model=ModelConfig(encoder_impl="skut")))
    with pytest.raises(ValueError, match="model.num_layers"):
        check_compatible(saved, ExperimentConfig(model=ModelConfig(num_layers=3)))


# ------------------------------------------------------------------------------ compiled (GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: jnp.dtype(t).name)
@pytest.mark.parametrize("length", [1, 7, 64, 192, 300, 1000, 2048])
def test_gpu_matches_reference(length, dtype):
    seed = length * 17 + jnp.dtype(dtype).itemsize
    w = random_weights(seed)
    x, mask = random_inputs(seed + 1, 5, length, dtype)
    out = skut(x, mask, w, interpret=False)
    err = rel_err(out, x, mask, w)
    assert err < TOL[dtype], err


@pytest.mark.gpu
@pytest.mark.parametrize("resident", [True, False])
def test_gpu_variants(resident):
    w = random_weights(7)
    x, mask = random_inputs(8, 33, 192, jnp.bfloat16)
    cfg = SkutConfig(block_q=64, block_k=64, resident=resident)
    assert rel_err(skut(x, mask, w, config=cfg, interpret=False), x, mask, w) < TOL[jnp.bfloat16]
