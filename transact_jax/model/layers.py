"""Building blocks shared by the sequence models: the transformer encoder's parameters, the token
feature encoder (E_act, E_surf, E_pos of the paper's eq. 4) and masked max-pooling."""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.skut.api import skut
from pallas_kernels.skut.reference import EncoderWeights
from transact_jax.config import FeatureConfig
from transact_jax.model.config import ModelConfig


def _uniform(scale: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -scale, scale)
    return init


class TransformerEncoder(nnx.Module):
    """The encoder's parameters, initialized like ``torch.nn.TransformerEncoderLayer``.

    Forward is :func:`pallas_kernels.skut.api.skut` on :meth:`weights` with ``impl`` =
    ``ModelConfig.encoder_impl``: the jnp reference (``"xla"``) or the fused SKUT kernel
    (``"pallas_triton"``; ``"auto"`` picks it on a GPU). The kernel has no dropout, so a training
    step that applies dropout runs the reference whatever ``encoder_impl`` says.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        n, d, f = cfg.num_layers, cfg.d_model, cfg.ff_dim
        self.cfg = cfg
        xavier = np.sqrt(6.0 / (d + 3 * d))  # torch: xavier_uniform_ on in_proj_weight (3d, d)

        def param(init, shape):
            return nnx.Param(init(rngs.params(), shape))

        zeros, ones = (lambda k, s: jnp.zeros(s)), (lambda k, s: jnp.ones(s))
        self.w_qkv = param(_uniform(xavier), (n, d, 3 * d))
        self.b_qkv = param(zeros, (n, 3 * d))
        self.w_o = param(_uniform(1 / np.sqrt(d)), (n, d, d))
        self.b_o = param(zeros, (n, d))
        self.ln1_scale, self.ln1_bias = param(ones, (n, d)), param(zeros, (n, d))
        self.w_1 = param(_uniform(1 / np.sqrt(d)), (n, d, f))
        self.b_1 = param(_uniform(1 / np.sqrt(d)), (n, f))
        self.w_2 = param(_uniform(1 / np.sqrt(f)), (n, f, d))
        self.b_2 = param(_uniform(1 / np.sqrt(f)), (n, d))
        self.ln2_scale, self.ln2_bias = param(ones, (n, d)), param(zeros, (n, d))

    def weights(self) -> EncoderWeights:
        return EncoderWeights(**{f.name: getattr(self, f.name)[...]
                                 for f in dataclasses.fields(EncoderWeights)})

    def __call__(self, x: jax.Array, mask: jax.Array, *, causal: bool,
                 dropout_key: Optional[jax.Array] = None) -> jax.Array:
        return skut(x, mask, self.weights(), impl=self.cfg.encoder_impl,
                    num_heads=self.cfg.num_heads, causal=causal, dropout_rate=self.cfg.dropout,
                    dropout_key=dropout_key)


def multi_hot(actions: jax.Array, num_actions: int) -> jax.Array:
    """(..., ) bitmask -> (..., A) float32 multi-hot."""
    bits = jnp.arange(num_actions, dtype=jnp.uint32)
    return ((actions.astype(jnp.uint32)[..., None] >> bits) & 1).astype(jnp.float32)


class TokenEncoder(nnx.Module):
    """Token features: E_act (multi-hot x (A, d)), E_surf (S, d), E_pos (length, d)."""

    def __init__(self, feat: FeatureConfig, length: int, d: int, *, rngs: nnx.Rngs):
        self.num_actions = feat.num_actions
        init = nnx.initializers.normal(0.02)
        self.w_act = nnx.Param(init(rngs.params(), (feat.num_actions, d)))
        self.surface = nnx.Embed(feat.num_surfaces, d, embedding_init=init, rngs=rngs)
        self.position = nnx.Param(init(rngs.params(), (length, d)))

    def __call__(self, actions: jax.Array, surfaces: jax.Array) -> jax.Array:
        length = actions.shape[1]
        return (multi_hot(actions, self.num_actions) @ self.w_act[...]
                + self.surface(surfaces) + self.position[...][:length])


def masked_max_pool(h: jax.Array, mask: jax.Array) -> jax.Array:
    """Max over valid positions of (N, L, F); zeros where no position is valid."""
    pooled = jnp.max(jnp.where(mask[..., None], h, -jnp.inf), axis=1)
    return jnp.where(jnp.any(mask, axis=1)[:, None], pooled, 0.0)
