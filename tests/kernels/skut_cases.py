"""Random SKUT weights and inputs, the relative error against the reference, and a float64 loop
implementation of the encoder (builders for the tests in this folder, not a test module)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.skut.reference import EncoderWeights, skut_reference

TOL = {jnp.float32: 2e-5, jnp.float16: 3e-3, jnp.bfloat16: 1.5e-2}
"""Relative L2 error against the float32 reference: float32 far under 1e-3, float16 operands about
1e-3, bfloat16 operands under 1e-2."""
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)

reference = jax.jit(skut_reference, static_argnames=("num_heads", "causal", "eps", "dropout_rate"))
"""The reference, jitted (one compile per shape instead of op-by-op dispatch)."""


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
    """Relative L2 error of ``out`` against the reference in float32 on the same (rounded) ``x``."""
    ref = reference(x.astype(jnp.float32), mask, w, **kw)
    out = np.asarray(out, np.float64)
    assert np.isfinite(out).all(), "returned NaN/inf"
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def numpy_encoder(x, mask, w: EncoderWeights, num_heads=1, causal=True, eps=1e-5):
    """Float64 loop-per-row implementation of the torch layer semantics."""
    x = np.asarray(x, np.float64)
    w = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), w)
    b, length, d = x.shape
    dh = d // num_heads

    def ln(v, g, bias):
        mu = v.mean(-1, keepdims=True)
        var = ((v - mu) ** 2).mean(-1, keepdims=True)
        return (v - mu) / np.sqrt(var + eps) * g + bias

    for layer in range(w.num_layers):
        qkv = x @ w.w_qkv[layer] + w.b_qkv[layer]
        q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
        attn = np.zeros_like(x)
        for bi in range(b):
            for i in range(length):
                keys = [j for j in range(length) if mask[bi, j] and (j <= i or not causal)]
                if not keys:
                    continue
                for h in range(num_heads):
                    hs = slice(h * dh, (h + 1) * dh)
                    s = np.array([q[bi, i, hs] @ k[bi, j, hs] for j in keys]) / np.sqrt(dh)
                    p = np.exp(s - s.max())
                    p /= p.sum()
                    attn[bi, i, hs] = p @ v[bi, keys, hs]
        a = attn @ w.w_o[layer] + w.b_o[layer]
        h1 = ln(x + a, w.ln1_scale[layer], w.ln1_bias[layer])
        ff = np.maximum(h1 @ w.w_1[layer] + w.b_1[layer], 0) @ w.w_2[layer] + w.b_2[layer]
        x = ln(h1 + ff, w.ln2_scale[layer], w.ln2_bias[layer])
    return x
