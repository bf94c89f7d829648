"""Pure-jnp reference of the TransAct V2 transformer encoder (paper §3.2.2, Figure 3).

This is the contract of SKUT ("single kernel unified transformer", paper §3.4.2), the fused Pallas
kernel that computes all layers in one launch (:mod:`pallas_kernels.skut.pallas_triton`); it is also
the ``impl="xla"`` implementation of :func:`pallas_kernels.skut.api.skut`.

Layer semantics are exactly those of ``torch.nn.TransformerEncoderLayer(d_model, nhead,
dim_feedforward, activation="relu", batch_first=True, norm_first=False)`` (post-LayerNorm)::

    a = MultiHeadAttention(x)            # in-projection W_qkv (+bias), softmax(q k^T / sqrt(d_h)) v,
                                         # out-projection W_o (+bias)
    x = LayerNorm_1(x + a)               # eps 1e-5
    x = LayerNorm_2(x + W_2 relu(W_1 x + b_1) + b_2)

with a causal mask (query i sees keys j <= i) and a key-padding mask (padding keys are never seen).
A query row with no visible key gets a zero attention output ``softmax(.) v = 0`` (the out-projection
bias is still added), never NaN; torch returns NaN there. Such rows are padding rows (a valid token
always sees itself), so they never influence valid rows.

Weights are stacked over layers (leading axis ``num_layers``) and stored input-major, ``y = x @ W + b``
(torch stores ``W^T``; :func:`EncoderWeights.from_torch` converts). Matrix products take their operands in
the input's dtype and accumulate in float32; LayerNorm, softmax and residuals run in float32.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EncoderWeights:
    """Weights of ``num_layers`` stacked encoder layers (d = d_model, f = dim_feedforward).

    Shapes: ``w_qkv`` (n, d, 3d) with columns [q | k | v], ``b_qkv`` (n, 3d), ``w_o`` (n, d, d),
    ``b_o`` (n, d), ``ln1_scale``/``ln1_bias`` (n, d), ``w_1`` (n, d, f), ``b_1`` (n, f), ``w_2``
    (n, f, d), ``b_2`` (n, d), ``ln2_scale``/``ln2_bias`` (n, d).
    """

    w_qkv: jax.Array
    b_qkv: jax.Array
    w_o: jax.Array
    b_o: jax.Array
    ln1_scale: jax.Array
    ln1_bias: jax.Array
    w_1: jax.Array
    b_1: jax.Array
    w_2: jax.Array
    b_2: jax.Array
    ln2_scale: jax.Array
    ln2_bias: jax.Array

    @property
    def num_layers(self) -> int:
        return int(self.w_qkv.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.w_qkv.shape[1])

    @property
    def ff_dim(self) -> int:
        return int(self.w_1.shape[2])

    def layer(self, i: int) -> "EncoderWeights":
        """Weights of layer ``i`` (leading axis kept, size 1)."""
        return jax.tree_util.tree_map(lambda a: a[i:i + 1], self)

    @classmethod
    def from_torch(cls, state_dict: Mapping[str, np.ndarray], num_layers: int,
                   prefix: str = "layers.") -> "EncoderWeights":
        """From a ``torch.nn.TransformerEncoder`` state dict (arrays, e.g. ``t.detach().numpy()``)."""
        def get(i, name):
            return np.asarray(state_dict[f"{prefix}{i}.{name}"], np.float32)

        def stack(name, transpose=False):
            mats = [get(i, name) for i in range(num_layers)]
            return jnp.asarray(np.stack([m.T if transpose else m for m in mats]))

        return cls(
            w_qkv=stack("self_attn.in_proj_weight", True), b_qkv=stack("self_attn.in_proj_bias"),
            w_o=stack("self_attn.out_proj.weight", True), b_o=stack("self_attn.out_proj.bias"),
            ln1_scale=stack("norm1.weight"), ln1_bias=stack("norm1.bias"),
            w_1=stack("linear1.weight", True), b_1=stack("linear1.bias"),
            w_2=stack("linear2.weight", True), b_2=stack("linear2.bias"),
            ln2_scale=stack("norm2.weight"), ln2_bias=stack("norm2.bias"))


def _dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` with operands in x's dtype and float32 accumulation."""
    return jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis in float32 (biased variance, like torch)."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def attention_mask(mask: jax.Array, causal: bool) -> jax.Array:
    """(B, L, L) bool: query i may see key j (key valid and, if causal, j <= i)."""
    length = mask.shape[-1]
    visible = jnp.broadcast_to(mask[:, None, :], mask.shape[:1] + (length, length))
    if causal:
        visible = visible & jnp.tril(jnp.ones((length, length), bool))[None]
    return visible


def masked_softmax(scores: jax.Array, visible: jax.Array) -> jax.Array:
    """Softmax over the last axis restricted to ``visible``; all-zero where nothing is visible."""
    scores = jnp.where(visible, scores, -jnp.inf)
    top = jnp.max(scores, axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    p = jnp.where(visible, jnp.exp(scores - top), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(denom > 0, denom, 1.0)


def _dropout(x: jax.Array, rate: float, key: Optional[jax.Array]) -> jax.Array:
    if rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def encoder_layer(x: jax.Array, visible: jax.Array, w: EncoderWeights, layer: int, *, num_heads: int,
                  eps: float, dropout_rate: float = 0.0,
                  dropout_key: Optional[jax.Array] = None) -> jax.Array:
    """One post-LN encoder layer; ``x`` (B, L, d) in the compute dtype, returns float32."""
    b, length, d = x.shape
    dh = d // num_heads
    keys = [None] * 4 if dropout_key is None else list(jax.random.split(dropout_key, 4))
    qkv = _dot(x, w.w_qkv[layer]) + w.b_qkv[layer]                        # (B, L, 3d) f32
    q, k, v = (qkv[..., i * d:(i + 1) * d].reshape(b, length, num_heads, dh) for i in range(3))
    cdt = x.dtype
    scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(cdt), k.astype(cdt),
                        preferred_element_type=jnp.float32) / np.sqrt(dh).astype(np.float32)
    p = masked_softmax(scores, visible[:, None])
    p = _dropout(p, dropout_rate, keys[0])
    attn = jnp.einsum("bhqk,bkhd->bqhd", p.astype(cdt), v.astype(cdt),
                      preferred_element_type=jnp.float32).reshape(b, length, d)
    attn = _dot(attn.astype(cdt), w.w_o[layer]) + w.b_o[layer]
    h = layer_norm(x.astype(jnp.float32) + _dropout(attn, dropout_rate, keys[1]),
                   w.ln1_scale[layer], w.ln1_bias[layer], eps)
    ff = jax.nn.relu(_dot(h.astype(cdt), w.w_1[layer]) + w.b_1[layer])
    ff = _dropout(ff, dropout_rate, keys[2])
    ff = _dot(ff.astype(cdt), w.w_2[layer]) + w.b_2[layer]
    return layer_norm(h + _dropout(ff, dropout_rate, keys[3]), w.ln2_scale[layer], w.ln2_bias[layer], eps)


def skut_reference(x: jax.Array, mask: jax.Array, weights: EncoderWeights, *, num_heads: int = 1,
                   causal: bool = True, eps: float = 1e-5, dropout_rate: float = 0.0,
                   dropout_key: Optional[jax.Array] = None) -> jax.Array:
    """All encoder layers on ``x`` (B, L, d) with key-padding ``mask`` (B, L) bool.

    Returns (B, L, d) in ``x.dtype``. Dropout (rate ``dropout_rate``, torch's four dropout sites)
    applies only when ``dropout_key`` is given; inference passes none.
    """
    if x.ndim != 3 or mask.shape != x.shape[:2]:
        raise ValueError(f"x: expected (B, L, d) with mask (B, L), got {x.shape} and {mask.shape}")
    if x.shape[-1] != weights.d_model or weights.d_model % num_heads:
        raise ValueError(f"x: width {x.shape[-1]} does not fit d_model={weights.d_model}, "
                         f"num_heads={num_heads}")
    visible = attention_mask(mask.astype(bool), causal)
    h = x
    for i in range(weights.num_layers):
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
        h = encoder_layer(h, visible, weights, i, num_heads=num_heads, eps=eps,
                          dropout_rate=dropout_rate, dropout_key=key).astype(x.dtype)
    return h
