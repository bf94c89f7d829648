"""The ranking tower in Flax NNX (paper Figures 2-3), shared by every sequence model.

    S_all segments --sequence model (registry)--> s (N, seq_out)
    [dense, categorical embeddings, e_c, s] --DCN-v2 cross--> MLP --> one logit per head (+ wide logit)

The sequence model is the entry of :mod:`transact_jax.model.sequence` named by
``ModelConfig.sequence_model`` (``none``, ``bst``, ``transact``); the tower does not know which.
For TransAct (the paper's eq. 4 early fusion, causal encoder, linear + max-pool) see
:mod:`transact_jax.model.sequence.transact`.

NNX was chosen over Linen: modules are plain Python objects holding their parameters, which keeps
the model readable (``model.encoder.weights()`` is the SKUT kernel's input as it is) and lets the
training loop split it into a pure parameter pytree once (``nnx.split``) and jit a functional step.

The Next Action Loss reads ``ModelOutput.nal_user``: ``P u(t)`` for the positions t of the S_RT[:r]
segment, from sequence models that produce it (paper §3.3.1).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.int8_codec import dequantize_int8
from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.model.config import ModelConfig
from transact_jax.model.inputs import ModelInputs
from transact_jax.model.sequence import sequence_model_entry


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelOutput:
    """``logits`` (N, H); ``nal_user`` (N, r, D) = P u(t) on the S_RT[:r] slots, or None;
    ``aux_loss`` a weighted scalar the sequence model adds to the training loss (VISTA's
    reconstruction loss), or None."""

    logits: jax.Array
    nal_user: Optional[jax.Array] = None
    aux_loss: Optional[jax.Array] = None


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
        build = sequence_model_entry(cfg.sequence_model).build
        self.sequence = nnx.data(build(feat, cfg, length, self._rt_slots(sel, cfg), rngs))
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

    @property
    def _dtype(self):
        return jnp.bfloat16 if self.cfg.dtype == "bfloat16" else jnp.float32

    def __call__(self, x: ModelInputs, *, dropout_key: Optional[jax.Array] = None) -> ModelOutput:
        cand = dequantize_int8(x.candidate_embedding, self.feat.quant_scale, jnp.float32)
        seq = nal = aux = None
        if self.sequence is not None:
            emb = dequantize_int8(self._take_segments(x.embeddings), self.feat.quant_scale, jnp.float32)
            age = None if x.token_age_hours is None else self._take_segments(x.token_age_hours)
            out = self.sequence(emb, self._take_segments(x.actions), self._take_segments(x.surfaces),
                                self._take_segments(x.mask), cand, self._dtype, dropout_key, age)
            seq, nal = out[0], out[1]
            aux = out[2] if len(out) > 2 else None
        return ModelOutput(logits=self._tower(x, cand, seq), nal_user=nal, aux_loss=aux)

    def mfalcon_logits(self, history: ModelInputs, x: ModelInputs, cand_to_req: jax.Array,
                       dropout_key: Optional[jax.Array] = None) -> jax.Array:
        """Logits (N, H) of N candidates (``x``: their candidate, dense and categorical fields; its
        sequence fields are not read) whose U requests share one history each (``history``: the
        (U, |S_all|) sequence fields of one candidate per request), through the sequence model's
        M-FALCON path, ``ModelConfig.b_m`` candidates per encoder pass
        (:mod:`transact_jax.model.sequence.hstu`). Equal to ``self(x).logits`` when each
        candidate's own S_all equals its request's history. ``dropout_key``: training (the
        encoder's dropout), None for inference."""
        if not sequence_model_entry(self.cfg.sequence_model).scores_requests:
            raise ValueError(f"sequence_model: {self.cfg.sequence_model!r} has no M-FALCON path")
        mfalcon = self.sequence.mfalcon
        cand = dequantize_int8(x.candidate_embedding, self.feat.quant_scale, jnp.float32)
        emb = dequantize_int8(self._take_segments(history.embeddings), self.feat.quant_scale,
                              jnp.float32)
        seq = mfalcon(emb, self._take_segments(history.actions),
                      self._take_segments(history.surfaces), self._take_segments(history.mask),
                      cand, cand_to_req, self.cfg.b_m, self._dtype, dropout_key=dropout_key)
        return self._tower(x, cand, seq)

    def _tower(self, x: ModelInputs, cand: jax.Array, seq: Optional[jax.Array]) -> jax.Array:
        """DCN-v2 cross layers and the MLP over [dense, categorical embeddings, e_c, s]; logits."""
        parts = [x.dense.astype(jnp.float32)]
        parts += [emb(x.categorical[:, i]) for i, emb in enumerate(self.categorical)]
        parts.append(cand)
        if seq is not None:
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
        return logits
