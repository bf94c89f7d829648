"""BST (Behavior Sequence Transformer), the paper's Table 2 baseline: projected item embeddings +
E_act + E_surf + E_pos, the candidate appended as a final extra token, a non-causal transformer
encoder; the candidate token's output (after a linear layer) is the sequence vector."""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
from flax import nnx

from transact_jax.config import FeatureConfig
from transact_jax.model.config import ModelConfig
from transact_jax.model.layers import TokenEncoder, TransformerEncoder
from transact_jax.model.sequence.registry import SequenceModelEntry, register


class BSTSequence(nnx.Module):
    """BST: projected item embeddings + E_act + E_surf + E_pos, the candidate as a final extra token,
    a non-causal encoder; the candidate token's output (after a linear layer) is the sequence vector."""

    def __init__(self, feat: FeatureConfig, cfg: ModelConfig, length: int, *, rngs: nnx.Rngs):
        self.tokens = TokenEncoder(feat, length + 1, cfg.d_model, rngs=rngs,
                                   token_features=cfg.token_features)
        self.item_proj = nnx.Linear(feat.embedding_dim, cfg.d_model, rngs=rngs)
        self.target = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (cfg.d_model,)))
        self.encoder = TransformerEncoder(cfg, rngs=rngs)
        self.out = nnx.Linear(cfg.d_model, cfg.seq_out_dim, rngs=rngs)

    def __call__(self, emb, actions, surfaces, mask, cand, dtype, dropout_key=None,
                 token_age_hours=None):
        n, length = mask.shape
        with_cand = jnp.concatenate([emb, cand[:, None, :]], axis=1)
        items = self.item_proj(with_cand)
        actions = jnp.concatenate([actions, jnp.zeros((n, 1), actions.dtype)], axis=1)
        surfaces = jnp.concatenate([surfaces, jnp.zeros((n, 1), surfaces.dtype)], axis=1)
        is_target = (jnp.arange(length + 1) == length)[None, :, None]
        if token_age_hours is not None:   # the candidate token is "now"
            token_age_hours = jnp.concatenate([token_age_hours, jnp.zeros((n, 1))], axis=1)
        tokens = self.tokens(actions, surfaces, emb=with_cand, cand=cand, age_hours=token_age_hours)
        x = items + tokens + jnp.where(is_target, self.target[...], 0.0)
        full_mask = jnp.concatenate([mask, jnp.ones((n, 1), bool)], axis=1)
        u = self.encoder(x.astype(dtype), full_mask, causal=False, dropout_key=dropout_key)
        return self.out(u[:, -1].astype(jnp.float32)), None


register(SequenceModelEntry(
    name="bst",
    build=lambda feat, cfg, length, rt_slots, rngs: BSTSequence(feat, cfg, length, rngs=rngs),
    next_action_loss=False))
