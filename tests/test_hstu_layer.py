"""The HSTU layer and encoder (transact_jax.model.hstu) on the jagged layout: shapes, padding rows
and other sequences never reaching a sequence's outputs, causality, the relative attention bias on
and off, the fused split of eq. 1, dropout, finite gradients, and config validation."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels.hstu_attention.reference import NUM_POS_BUCKETS, NUM_TIME_BUCKETS
from transact_jax.config_json import ConfigError
from transact_jax.model.hstu import HSTUConfig, HSTUEncoder, HSTULayer

CFG = HSTUConfig(num_layers=2, num_heads=2, d_model=16, d_qk=8, d_v=8, max_seq_len=8,
                 use_rab_pos=True, use_rab_time=True, attention_impl="xla")
OFFSETS = jnp.array([0, 3, 8, 8, 10], jnp.int32)     # lengths 3, 5, 0, 2; rows 10, 11 padding
TOTAL = 12


def inputs(seed=0):
    kx, kt = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (TOTAL, CFG.d_model))
    ts = jnp.cumsum(jax.random.randint(kt, (TOTAL,), 0, 5000)).astype(jnp.int32)
    return x, ts


def with_random_rab(module, seed=1):
    """Nonzero rab tables (they start at zero), so that the bias changes the outputs."""
    layers = module.layers if isinstance(module, HSTUEncoder) else [module]
    key = jax.random.key(seed)
    for layer in layers:
        key, kp, kt = jax.random.split(key, 3)
        if layer.rab_pos is not None:
            layer.rab_pos[...] = jax.random.normal(kp, (NUM_POS_BUCKETS,))
        if layer.rab_time is not None:
            layer.rab_time[...] = jax.random.normal(kt, (NUM_TIME_BUCKETS,))
    return module


@pytest.fixture(scope="module")
def encoder():
    return with_random_rab(HSTUEncoder(CFG, rngs=nnx.Rngs(0)))


def test_shapes_on_jagged_input_and_zero_padding_rows(encoder):
    x, ts = inputs()
    y = encoder(x, OFFSETS, timestamps=ts)
    assert y.shape == (TOTAL, CFG.d_model) and y.dtype == jnp.float32
    assert np.all(np.asarray(y[10:]) == 0)
    assert np.all(np.isfinite(np.asarray(y)))
    layer_out = encoder.layers[0](x, OFFSETS, timestamps=ts)
    assert layer_out.shape == (TOTAL, CFG.d_model)


def test_padding_rows_and_other_sequences_do_not_affect_a_sequence(encoder):
    x, ts = inputs()
    y = np.asarray(encoder(x, OFFSETS, timestamps=ts))
    noise = jax.random.normal(jax.random.key(7), (2, CFG.d_model)) * 100
    y_pad = encoder(x.at[10:].set(noise), OFFSETS, timestamps=ts.at[10:].set(10**6))
    np.testing.assert_array_equal(np.asarray(y_pad), y)
    # changing sequence 1 (rows 3..7) leaves sequences 0 and 3 as they were
    y_other = np.asarray(encoder(x.at[3:8].mul(-3.0), OFFSETS, timestamps=ts))
    np.testing.assert_allclose(y_other[:3], y[:3], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y_other[8:10], y[8:10], rtol=1e-6, atol=1e-6)
    assert not np.allclose(y_other[3:8], y[3:8])


def test_one_sequence_alone_gives_the_same_outputs(encoder):
    x, ts = inputs()
    y = np.asarray(encoder(x, OFFSETS, timestamps=ts))
    alone = encoder(x[3:8], jnp.array([0, 5], jnp.int32), timestamps=ts[3:8])
    np.testing.assert_allclose(np.asarray(alone), y[3:8], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("i", [0, 2, 3])
def test_causal_outputs_at_i_ignore_later_tokens(encoder, i):
    x, ts = inputs()
    start, end = 3, 8                                  # sequence 1
    y = np.asarray(encoder(x, OFFSETS, timestamps=ts))
    later = slice(start + i + 1, end)
    x2 = x.at[later].set(jax.random.normal(jax.random.key(3), (end - start - i - 1, CFG.d_model)))
    ts2 = ts.at[later].add(12345)
    y2 = np.asarray(encoder(x2, OFFSETS, timestamps=ts2))
    np.testing.assert_allclose(y2[:start + i + 1], y[:start + i + 1], rtol=1e-6, atol=1e-6)
    assert not np.allclose(y2[later], y[later])


def test_rab_on_and_off():
    x, ts = inputs()
    layer = with_random_rab(HSTULayer(CFG, rngs=nnx.Rngs(0)))
    off_cfg = dataclasses.replace(CFG, use_rab_pos=False, use_rab_time=False)
    off = HSTULayer(off_cfg, rngs=nnx.Rngs(0))
    assert off.rab_pos is None and off.rab_time is None
    for name in ("input_norm", "f1", "norm", "f2"):          # same weights, rab aside
        nnx.update(getattr(off, name), nnx.state(getattr(layer, name)))
    y_on = np.asarray(layer(x, OFFSETS, timestamps=ts))
    y_off = np.asarray(off(x, OFFSETS))                       # no timestamps needed without rab_time
    assert not np.allclose(y_on[:10], y_off[:10])
    layer.rab_pos[...] = jnp.zeros(NUM_POS_BUCKETS)
    layer.rab_time[...] = jnp.zeros(NUM_TIME_BUCKETS)
    np.testing.assert_allclose(np.asarray(layer(x, OFFSETS, timestamps=ts)), y_off,
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="timestamps"):
        layer(x, OFFSETS)
    # time bias only: changing the timestamps changes the outputs
    t_only = with_random_rab(HSTULayer(dataclasses.replace(CFG, use_rab_pos=False),
                                       rngs=nnx.Rngs(0)))
    assert t_only.rab_pos is None
    assert not np.allclose(np.asarray(t_only(x, OFFSETS, timestamps=ts)),
                           np.asarray(t_only(x, OFFSETS, timestamps=ts * 1000)))


def test_fused_split_is_u_v_q_k():
    """Zero f_1 weights and bias on the U block: U = silu(0) = 0, so Y = f_2's bias + X (eq. 3)."""
    x, ts = inputs()
    layer = HSTULayer(CFG, rngs=nnx.Rngs(0))
    u_width = CFG.num_heads * CFG.d_v
    layer.f1.kernel[...] = layer.f1.kernel[...].at[:, :u_width].set(0.0)
    layer.f1.bias[...] = layer.f1.bias[...].at[:u_width].set(0.0)
    layer.f2.bias[...] = jnp.arange(CFG.d_model, dtype=jnp.float32)
    y = layer(x, OFFSETS, timestamps=ts)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x + layer.f2.bias[...]), atol=1e-6)


def test_dropout_only_with_a_key():
    x, ts = inputs()
    enc = HSTUEncoder(dataclasses.replace(CFG, dropout=0.5, input_dropout=0.3), rngs=nnx.Rngs(0))
    plain = np.asarray(enc(x, OFFSETS, timestamps=ts))
    np.testing.assert_array_equal(np.asarray(enc(x, OFFSETS, timestamps=ts)), plain)
    a = np.asarray(enc(x, OFFSETS, timestamps=ts, dropout_key=jax.random.key(1)))
    b = np.asarray(enc(x, OFFSETS, timestamps=ts, dropout_key=jax.random.key(2)))
    assert not np.allclose(a, plain) and not np.allclose(a, b)
    assert np.all(a[10:] == 0)


def test_gradients_are_finite_and_reach_every_parameter(encoder):
    x, ts = inputs()
    graphdef, params = nnx.split(encoder)

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x, OFFSETS, timestamps=ts) ** 2)

    g_params, g_x = jax.grad(loss, argnums=(0, 1))(params, x)
    leaves = jax.tree_util.tree_leaves_with_path(g_params)
    assert leaves
    for path, g in leaves:
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), path
        assert np.any(g != 0), path
    assert np.all(np.asarray(g_x[10:]) == 0)             # padding rows get no gradient


@pytest.mark.parametrize("field, value", [
    ("num_layers", 0), ("num_heads", 0), ("d_model", -1), ("d_qk", 0), ("d_v", 0),
    ("max_seq_len", 0), ("dropout", 1.0), ("dropout", -0.1), ("input_dropout", 1.5),
    ("normalizer", "softmax"), ("attention_impl", "cuda"), ("use_rab_pos", 1),
    ("num_layers", 2.0), ("eps", 0.0),
])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ConfigError) as err:
        HSTUConfig(**{field: value})
    assert err.value.field == field


def test_kernel_widths_are_checked_for_the_pallas_kernel():
    with pytest.raises(ConfigError, match="d_qk"):
        HSTUConfig(d_qk=25, attention_impl="pallas_triton")
    with pytest.raises(ConfigError, match="d_v"):
        HSTUConfig(d_v=8, attention_impl="pallas_triton")
    HSTUConfig(d_qk=25, d_v=25, attention_impl="xla")           # any width on XLA
    assert dataclasses.is_dataclass(CFG) and CFG.__dataclass_params__.frozen
