"""VISTA as the ranking tower's sequence model (``sequence_model="vista"``): the tokens it reads
summarised into ``num_seeds`` virtual-seed embeddings (stage 1), the candidate attending to that
summary (stage 2), and the generative reconstruction loss as the family's auxiliary loss (layers:
:mod:`transact_jax.model.vista`).

Tokens (width ``d_model``): each valid token of the segments read is ``W_item e_t`` (the dequantized
item embedding, projected) plus the :class:`~transact_jax.model.layers.TokenEncoder` features
(actions, surface, slot, and the optional ``token_features``), compacted to the front of the row
(segments each bring their own padding) in slot order. The candidate is ``W_cand e_c``. The
sequence vector is a linear layer on the stage-2 output.

Configuration from ``ModelConfig``: ``d_model``, ``num_heads``, ``num_layers`` (stage-1 layers),
``num_seeds``, ``summary_attention``, ``causal_summary``, ``recon_weight``; ``encoder_impl`` is the
``impl`` of the QLA op; stage 2 is one transformer block. The model computes in float32 (its
``dtype`` is not applied yet) and applies no dropout.

The summary does not depend on the candidate when the history does not
(:func:`~transact_jax.model.sequence.hstu.shared_history`), so :meth:`VistaSequence.mfalcon`
summarises each request's history once and runs only stage 2 per candidate (the registry's
``scores_requests``): the serving engine and whole-request training use it. That path returns no
reconstruction loss.
"""
from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from transact_jax.config import FeatureConfig
from transact_jax.model.config import ModelConfig
from transact_jax.model.layers import TokenEncoder
from transact_jax.model.sequence.registry import SequenceModelEntry, register
from transact_jax.model.vista import (
    ReconstructionDecoder,
    TargetAttention,
    VistaConfig,
    VistaSummarizer,
)


def vista_config(cfg: ModelConfig) -> VistaConfig:
    """The VISTA layers' configuration from the model's (module docstring)."""
    return VistaConfig(num_seeds=cfg.num_seeds, d_model=cfg.d_model, num_heads=cfg.num_heads,
                       num_layers=cfg.num_layers, target_layers=1, attention=cfg.summary_attention,
                       causal=cfg.causal_summary, recon_weight=cfg.recon_weight,
                       attention_impl=cfg.encoder_impl)


def compact(tokens: jax.Array, mask: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Each row's valid tokens moved to its front (order kept), the rest zero; and the prefix mask."""
    order = jnp.argsort(~mask, axis=1, stable=True)
    moved = jnp.take_along_axis(tokens, order[..., None], axis=1)
    valid = jnp.take_along_axis(mask, order, axis=1)
    return jnp.where(valid[..., None], moved, 0.0), valid


class VistaSequence(nnx.Module):
    """Token projection, :class:`VistaSummarizer`, :class:`TargetAttention`, output layer and the
    optional :class:`ReconstructionDecoder` (module docstring)."""

    def __init__(self, feat: FeatureConfig, cfg: ModelConfig, length: int, *, rngs: nnx.Rngs):
        vcfg = vista_config(cfg)
        self.recon_weight = cfg.recon_weight
        self.tokens = TokenEncoder(feat, length, cfg.d_model, rngs=rngs,
                                   token_features=cfg.token_features)
        self.item_proj = nnx.Linear(feat.embedding_dim, cfg.d_model, rngs=rngs)
        self.cand_proj = nnx.Linear(feat.embedding_dim, cfg.d_model, rngs=rngs)
        self.summarizer = VistaSummarizer(vcfg, rngs=rngs)
        self.target = TargetAttention(vcfg, rngs=rngs)
        self.decoder = nnx.data(ReconstructionDecoder(vcfg, rngs=rngs) if cfg.recon_weight > 0 else None)
        self.out = nnx.Linear(cfg.d_model, cfg.seq_out_dim, rngs=rngs)

    def _history(self, emb, actions, surfaces, mask, cand=None, age=None):
        tokens = self.item_proj(emb) + self.tokens(actions, surfaces, emb=emb, cand=cand,
                                                   age_hours=age)
        return compact(tokens, mask.astype(bool))

    def __call__(self, emb: jax.Array, actions: jax.Array, surfaces: jax.Array, mask: jax.Array,
                 cand: jax.Array, dtype, dropout_key: Optional[jax.Array] = None,
                 token_age_hours: Optional[jax.Array] = None):
        history, valid = self._history(emb, actions, surfaces, mask, cand, token_age_hours)
        summary = self.summarizer(history, valid)
        vector = self.out(self.target(self.cand_proj(cand), summary))
        aux = None
        if self.decoder is not None:
            aux = self.recon_weight * self.decoder(summary, history, valid)
        return vector, None, aux

    def mfalcon(self, emb: jax.Array, actions: jax.Array, surfaces: jax.Array, mask: jax.Array,
                cand: jax.Array, cand_to_req: jax.Array, b_m: int, dtype,
                dropout_key: Optional[jax.Array] = None) -> jax.Array:
        """Sequence vectors (N, seq_out_dim) of N candidates from their U requests' histories
        (``emb`` (U, L, D) ...): one summary per request, stage 2 per candidate; equal to
        ``self(...)[0]`` on each candidate's own copy of its request's history. ``b_m`` is unused
        (stage 2 is per candidate anyway)."""
        if self.tokens.similarity is not None:
            raise ValueError("token_features: 'similarity' depends on the candidate; one summary "
                             "per request needs a history shared by the request's candidates")
        history, valid = self._history(emb, actions, surfaces, mask)
        summary = self.summarizer(history, valid)
        return self.out(self.target(self.cand_proj(cand), summary[cand_to_req]))


register(SequenceModelEntry(
    name="vista",
    build=lambda feat, cfg, length, rt_slots, rngs: VistaSequence(feat, cfg, length, rngs=rngs),
    next_action_loss=False, scores_requests=True))
