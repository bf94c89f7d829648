"""TransAct V2 ranking model in Flax NNX (SPEC §3; paper Figures 2-3).

    S_all tokens --eq. 4--> F (N, L, d) --encoder--> U (N, L, d) --linear + max-pool--> s (N, seq_out)
    [dense, categorical embeddings, e_c, s] --DCN-v2 cross--> MLP --> one logit per head (+ wide logit)

Feature encoding (eq. 4): ``F = concat(E_PinSage(S_all), e_c) + E_act + E_surf + E_pos`` with
d = 2 x 32 = 64: the dequantized token embedding and the candidate embedding side by side ("early
fusion"), plus the multi-hot action vector times a learned (A x d) matrix, a learned surface table and
a learned positional parameter (|S_all| x d).

NNX was chosen over Linen: modules are plain Python objects holding their parameters, which keeps
the model readable (``model.encoder.weights()`` is the SKUT kernel's input as it is) and lets the
training loop split it into a pure parameter pytree once (``nnx.split``) and jit a functional step.

The Next Action Loss reads ``ModelOutput.nal_user``: ``P u(t)`` for the positions t of the S_RT[:r]
segment, where u(t) is the encoder output at that position (causal, so it has seen only tokens up to
t) and P the learned d -> 32 projection (§3.3.1).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.int8_codec import dequantize_int8
from pallas_kernels.skut import skut
from pallas_kernels.skut_reference import EncoderWeights, skut_reference
from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.model.config import ModelConfig
from transact_jax.model.inputs import ModelInputs


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelOutput:
    """``logits`` (N, H); ``nal_user`` (N, r, D) = P u(t) on the S_RT[:r] slots, or None."""

    logits: jax.Array
    nal_user: Optional[jax.Array] = None


def _uniform(scale: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -scale, scale)
    return init


class TransformerEncoder(nnx.Module):
    """The encoder's parameters, initialized like ``torch.nn.TransformerEncoderLayer``.

    Forward is :func:`pallas_kernels.skut_reference.skut_reference` on :meth:`weights`
    (``encoder_impl="xla"``) or the fused kernel :func:`pallas_kernels.skut.skut`
    (``encoder_impl="skut"``) whenever no dropout is applied.
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
        dropout_active = dropout_key is not None and self.cfg.dropout > 0
        if self.cfg.encoder_impl == "skut" and not dropout_active:
            return skut(x, mask, self.weights(), num_heads=self.cfg.num_heads, causal=causal)
        return skut_reference(x, mask, self.weights(), num_heads=self.cfg.num_heads, causal=causal,
                              dropout_rate=self.cfg.dropout, dropout_key=dropout_key)


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


class TransActSequence(nnx.Module):
    """TransAct: early fusion (eq. 4), causal encoder, linear + max-pool; also P u(t) for NAL."""

    def __init__(self, feat: FeatureConfig, cfg: ModelConfig, length: int,
                 rt_slots: Optional[slice], *, rngs: nnx.Rngs):
        if cfg.d_model != 2 * feat.embedding_dim:
            raise ValueError(f"d_model: early fusion needs d_model = 2 x embedding_dim = "
                             f"{2 * feat.embedding_dim}, got {cfg.d_model}")
        self.tokens = TokenEncoder(feat, length, cfg.d_model, rngs=rngs)
        self.encoder = TransformerEncoder(cfg, rngs=rngs)
        self.out = nnx.Linear(cfg.d_model, cfg.seq_out_dim, rngs=rngs)
        self.nal_proj = nnx.Linear(cfg.d_model, feat.embedding_dim, use_bias=False, rngs=rngs)
        self.rt_slots = rt_slots

    def __call__(self, emb, actions, surfaces, mask, cand, dtype, dropout_key=None):
        fused = jnp.concatenate([emb, jnp.broadcast_to(cand[:, None, :], emb.shape)], axis=-1)
        x = (fused + self.tokens(actions, surfaces)).astype(dtype)
        u = self.encoder(x, mask, causal=True, dropout_key=dropout_key)
        pooled = masked_max_pool(self.out(u.astype(jnp.float32)), mask)
        nal = None if self.rt_slots is None else self.nal_proj(u[:, self.rt_slots].astype(jnp.float32))
        return pooled, nal


class BSTSequence(nnx.Module):
    """BST: projected item embeddings + E_act + E_surf + E_pos, the candidate as a final extra token,
    a non-causal encoder; the candidate token's output (after a linear layer) is the sequence vector."""

    def __init__(self, feat: FeatureConfig, cfg: ModelConfig, length: int, *, rngs: nnx.Rngs):
        self.tokens = TokenEncoder(feat, length + 1, cfg.d_model, rngs=rngs)
        self.item_proj = nnx.Linear(feat.embedding_dim, cfg.d_model, rngs=rngs)
        self.target = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (cfg.d_model,)))
        self.encoder = TransformerEncoder(cfg, rngs=rngs)
        self.out = nnx.Linear(cfg.d_model, cfg.seq_out_dim, rngs=rngs)

    def __call__(self, emb, actions, surfaces, mask, cand, dtype, dropout_key=None):
        n, length = mask.shape
        items = self.item_proj(jnp.concatenate([emb, cand[:, None, :]], axis=1))
        actions = jnp.concatenate([actions, jnp.zeros((n, 1), actions.dtype)], axis=1)
        surfaces = jnp.concatenate([surfaces, jnp.zeros((n, 1), surfaces.dtype)], axis=1)
        is_target = (jnp.arange(length + 1) == length)[None, :, None]
        x = items + self.tokens(actions, surfaces) + jnp.where(is_target, self.target[...], 0.0)
        full_mask = jnp.concatenate([mask, jnp.ones((n, 1), bool)], axis=1)
        u = self.encoder(x.astype(dtype), full_mask, causal=False, dropout_key=dropout_key)
        return self.out(u[:, -1].astype(jnp.float32)), None


class CrossLayer(nnx.Module):
    """DCN-v2 cross layer: ``x_{l+1} = x_0 * (W x_l + b) + x_l``."""

    def __init__(self, width: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(width, width, rngs=rngs)

    def __call__(self, x0: jax.Array, x: jax.Array) -> jax.Array:
        return x0 * self.linear(x) + x


class RankingModel(nnx.Module):
    """The full ranking model; ``model(inputs) -> ModelOutput``."""

    def __init__(self, feat: FeatureConfig, sel: SelectionConfig, cfg: ModelConfig, *,
                 rngs: nnx.Rngs):
        self.feat, self.sel, self.cfg = feat, sel, cfg
        self.slots = self._slots(sel, cfg)
        length = sum(s.stop - s.start for s in self.slots)
        sequence = None
        if cfg.sequence_model == "transact":
            sequence = TransActSequence(feat, cfg, length, self._rt_slots(sel, cfg), rngs=rngs)
        elif cfg.sequence_model == "bst":
            sequence = BSTSequence(feat, cfg, length, rngs=rngs)
        self.sequence = nnx.data(sequence)
        self.categorical = nnx.List([nnx.Embed(v, cfg.cat_embed_dim, rngs=rngs)
                                     for v in feat.categorical_vocab_sizes])
        width = (feat.num_dense + len(feat.categorical_vocab_sizes) * cfg.cat_embed_dim
                 + feat.embedding_dim + (cfg.seq_out_dim if cfg.uses_sequence else 0))
        self.input_norm = nnx.LayerNorm(width, rngs=rngs)
        self.cross = nnx.List([CrossLayer(width, rngs=rngs) for _ in range(cfg.num_cross_layers)])
        dims = (width,) + tuple(cfg.mlp_dims)
        self.mlp = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
        self.head = nnx.Linear(dims[-1], feat.num_heads, rngs=rngs)
        wide = None
        if cfg.wide:
            wide = nnx.List([nnx.Embed(v, feat.num_heads, embedding_init=nnx.initializers.zeros,
                                       rngs=rngs) for v in feat.categorical_vocab_sizes])
        self.wide = nnx.data(wide)

    @staticmethod
    def _slots(sel: SelectionConfig, cfg: ModelConfig) -> Tuple[slice, ...]:
        return tuple(sel.segment(s) for s in cfg.segments) if cfg.uses_sequence else ()

    @staticmethod
    def _rt_slots(sel: SelectionConfig, cfg: ModelConfig) -> Optional[slice]:
        """Where S_RT[:r] sits in the model's (segment-sliced) sequence, if it reads it."""
        if "rt_recent" not in cfg.segments or sel.r == 0:
            return None
        start = 0
        for s in cfg.segments:
            if s == "rt_recent":
                return slice(start, start + sel.r)
            seg = sel.segment(s)
            start += seg.stop - seg.start
        return None

    def _take_segments(self, a: jax.Array) -> jax.Array:
        return jnp.concatenate([a[:, s] for s in self.slots], axis=1)

    def __call__(self, x: ModelInputs, *, dropout_key: Optional[jax.Array] = None) -> ModelOutput:
        dtype = jnp.bfloat16 if self.cfg.dtype == "bfloat16" else jnp.float32
        scale = self.feat.quant_scale
        cand = dequantize_int8(x.candidate_embedding, scale, jnp.float32)
        parts = [x.dense.astype(jnp.float32)]
        parts += [emb(x.categorical[:, i]) for i, emb in enumerate(self.categorical)]
        parts.append(cand)
        nal = None
        if self.sequence is not None:
            emb = dequantize_int8(self._take_segments(x.embeddings), scale, jnp.float32)
            seq, nal = self.sequence(emb, self._take_segments(x.actions),
                                     self._take_segments(x.surfaces), self._take_segments(x.mask),
                                     cand, dtype, dropout_key)
            parts.append(seq)
        x0 = self.input_norm(jnp.concatenate(parts, axis=-1))
        h = x0
        for layer in self.cross:
            h = layer(x0, h)
        for layer in self.mlp:
            h = jax.nn.relu(layer(h))
        logits = self.head(h)
        if self.wide is not None:
            logits = logits + sum(t(x.categorical[:, i]) for i, t in enumerate(self.wide))
        return ModelOutput(logits=logits, nal_user=nal)
