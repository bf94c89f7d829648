"""Building blocks shared by the sequence models: the transformer encoder's parameters, the token
feature encoder (E_act, E_surf, E_pos of the paper's eq. 4) and masked max-pooling."""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

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


SIMILARITY_BUCKETS = 16
"""Buckets of the ``similarity`` token feature: equal widths over cosine similarity [-1, 1]."""
AGE_BUCKETS = 24
"""Buckets of the ``age`` token feature: 0 for under an hour, then one per doubling of the age in
hours (bucket b >= 1 holds ages in [2^(b-1), 2^b) hours), the last one open-ended (~1,000 years)."""


def similarity_bucket(emb: jax.Array, cand: jax.Array) -> jax.Array:
    """(N, L) bucket of the cosine similarity of each token embedding (N, L, D) with its candidate's
    embedding (N, D): the signal NN selection ranks by, made visible to the model."""
    num = jnp.einsum("nld,nd->nl", emb, cand)
    den = jnp.linalg.norm(emb, axis=-1) * jnp.linalg.norm(cand, axis=-1)[:, None]
    cos = jnp.where(den > 0, num / jnp.maximum(den, 1e-12), 0.0)
    b = jnp.floor((cos + 1.0) * (SIMILARITY_BUCKETS / 2.0)).astype(jnp.int32)
    return jnp.clip(b, 0, SIMILARITY_BUCKETS - 1)


def age_bucket(age_hours: jax.Array) -> jax.Array:
    """(N, L) bucket of each token's age (hours between the token and the request, >= 0)."""
    b = jnp.floor(jnp.log2(jnp.maximum(age_hours, 1.0))).astype(jnp.int32) + 1
    return jnp.where(age_hours < 1.0, 0, jnp.clip(b, 1, AGE_BUCKETS - 1))


class TokenEncoder(nnx.Module):
    """Token features: E_act (multi-hot x (A, d)), E_surf (S, d), E_pos (length, d), and the
    optional ``ModelConfig.token_features``: a learned (SIMILARITY_BUCKETS, d) table of the token's
    cosine similarity to the candidate and a learned (AGE_BUCKETS, d) table of its age."""

    def __init__(self, feat: FeatureConfig, length: int, d: int, *, rngs: nnx.Rngs,
                 token_features: Tuple[str, ...] = ()):
        self.num_actions = feat.num_actions
        self.token_features = tuple(token_features)
        init = nnx.initializers.normal(0.02)
        self.w_act = nnx.Param(init(rngs.params(), (feat.num_actions, d)))
        self.surface = nnx.Embed(feat.num_surfaces, d, embedding_init=init, rngs=rngs)
        self.position = nnx.Param(init(rngs.params(), (length, d)))
        self.similarity = nnx.data(nnx.Embed(SIMILARITY_BUCKETS, d, embedding_init=init, rngs=rngs)
                                   if "similarity" in self.token_features else None)
        self.age = nnx.data(nnx.Embed(AGE_BUCKETS, d, embedding_init=init, rngs=rngs)
                            if "age" in self.token_features else None)

    def __call__(self, actions: jax.Array, surfaces: jax.Array, *, emb: Optional[jax.Array] = None,
                 cand: Optional[jax.Array] = None,
                 age_hours: Optional[jax.Array] = None) -> jax.Array:
        """``emb`` (N, L, D) and ``cand`` (N, D) feed ``similarity``, ``age_hours`` (N, L) ``age``."""
        length = actions.shape[1]
        out = (multi_hot(actions, self.num_actions) @ self.w_act[...]
               + self.surface(surfaces) + self.position[...][:length])
        if self.similarity is not None:
            out = out + self.similarity(similarity_bucket(emb, cand))
        if self.age is not None:
            if age_hours is None:
                raise ValueError("token_features: 'age' needs ModelInputs.token_age_hours (token "
                                 "timestamps), which these inputs do not carry")
            out = out + self.age(age_bucket(age_hours))
        return out


def masked_max_pool(h: jax.Array, mask: jax.Array) -> jax.Array:
    """Max over valid positions of (N, L, F); zeros where no position is valid."""
    pooled = jnp.max(jnp.where(mask[..., None], h, -jnp.inf), axis=1)
    return jnp.where(jnp.any(mask, axis=1)[:, None], pooled, 0.0)
