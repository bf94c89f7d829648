"""TransAct (paper §3.2.2, Figure 3): early fusion (eq. 4), a causal transformer encoder, linear +
max-pool over valid positions; it also produces ``P u(t)`` for the Next Action Loss.

Early fusion: ``F = concat(E_PinSage(S_all), e_c) + E_act + E_surf + E_pos`` with d = 2 x 32 = 64,
the dequantized token embedding and the candidate embedding side by side, plus the multi-hot action
vector times a learned (A x d) matrix, a learned surface table and a learned positional parameter.
``P u(t)``: u(t) is the encoder output at position t of the S_RT[:r] segment (causal, so it has
seen only tokens up to t) and P the learned d -> 32 projection (paper §3.3.1).
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
from flax import nnx

from transact_jax.config import FeatureConfig
from transact_jax.model.config import ModelConfig
from transact_jax.model.layers import TokenEncoder, TransformerEncoder, masked_max_pool
from transact_jax.model.sequence.registry import SequenceModelEntry, register


class TransActSequence(nnx.Module):
    """TransAct: early fusion (eq. 4), causal encoder, linear + max-pool; also P u(t) for NAL."""

    def __init__(self, feat: FeatureConfig, cfg: ModelConfig, length: int,
                 rt_slots: Optional[slice], *, rngs: nnx.Rngs):
        if cfg.d_model != 2 * feat.embedding_dim:
            raise ValueError(f"d_model: early fusion needs d_model = 2 x embedding_dim = "
                             f"{2 * feat.embedding_dim}, got {cfg.d_model}")
        self.tokens = TokenEncoder(feat, length, cfg.d_model, rngs=rngs,
                                   token_features=cfg.token_features)
        self.encoder = TransformerEncoder(cfg, rngs=rngs)
        self.out = nnx.Linear(cfg.d_model, cfg.seq_out_dim, rngs=rngs)
        self.nal_proj = nnx.Linear(cfg.d_model, feat.embedding_dim, use_bias=False, rngs=rngs)
        self.rt_slots = rt_slots

    def __call__(self, emb, actions, surfaces, mask, cand, dtype, dropout_key=None,
                 token_age_hours=None):
        fused = jnp.concatenate([emb, jnp.broadcast_to(cand[:, None, :], emb.shape)], axis=-1)
        tokens = self.tokens(actions, surfaces, emb=emb, cand=cand, age_hours=token_age_hours)
        x = (fused + tokens).astype(dtype)
        u = self.encoder(x, mask, causal=True, dropout_key=dropout_key)
        pooled = masked_max_pool(self.out(u.astype(jnp.float32)), mask)
        nal = None if self.rt_slots is None else self.nal_proj(u[:, self.rt_slots].astype(jnp.float32))
        return pooled, nal


register(SequenceModelEntry(
    name="transact",
    build=lambda feat, cfg, length, rt_slots, rngs: TransActSequence(feat, cfg, length, rt_slots,
                                                                     rngs=rngs),
    next_action_loss=True))
