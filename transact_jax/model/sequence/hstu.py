"""HSTU as the ranking tower's sequence model: the S_all history and the candidate as one target
token, through :class:`~transact_jax.model.hstu.HSTUEncoder` on the jagged layout ("Actions Speak
Louder than Words: Trillion-Parameter Sequential Transducers for Generative Recommendations",
Section 3, eq. 1-3; the candidate is a target in the sense of M-FALCON, Section 3.4).

Tokens (width ``d_model``): each valid S_all token is ``W_item e_t + E_act + E_surf + E_pos`` -- the
dequantized item embedding projected by a learned linear layer, plus the
:class:`~transact_jax.model.layers.TokenEncoder` features of TransAct's eq. 4 (the action multi-hot
times a learned (A x d) matrix, a learned surface table, a learned table over the S_all *slots*:
after packing, the relative attention bias sees compacted positions only, and the slot tells the
encoder which segment, ll / rt_recent / rt_nn / imp, a token came from and its rank there). The
``ModelConfig.token_features`` are added as the TokenEncoder adds them ("similarity" makes the
history depend on the candidate, so such a model cannot share one history among candidates as
M-FALCON does). The candidate is one target token ``W_item e_c + e_target`` (the same item
projection, and a learned "target" vector).

Packing: example i is the jagged sequence of its n_i valid tokens (``mask`` need not be a prefix:
each segment brings its own padding) in S_all order, then the target: n_i + 1 rows starting at
``offsets[i]``, ``offsets = concat([0], cumsum(n_i + 1))``, in a static (N (L + 1), d_model) buffer
whose rows past ``offsets[-1]`` are padding (:func:`pack_jagged`). Attention is causal with
``num_targets = 1`` per sequence; the sequence vector is a linear layer on the target's output.

Encoder: :func:`hstu_config` (num_layers, num_heads, d_model, dropout from ``ModelConfig``; per-head
widths d_model / num_heads; ``max_seq_len = L + 1``; the positional relative attention bias, not
the temporal one: the serving engine ships no token timestamps; a final layer norm, as the
pre-norm residual stream of :class:`~transact_jax.model.hstu.HSTULayer` leaves the output
unnormalized). ``ff_dim`` is unused (HSTU has no feed-forward block: eq. 3's gating takes its
place). ``ModelConfig.dtype`` is the compute dtype of
the encoder (its parameters are cast for the forward pass; they stay float32).

M-FALCON (:func:`transact_jax.model.hstu.mfalcon_pack`) scores one request's candidates b_m per
pass with this encoder exactly as the tower scores them one per example, provided each micro-batch
fits ``max_seq_len``: n + b_m <= L + 1 for a history of n valid tokens (the "seq_len" normalizer
divides by ``max_seq_len``, so it cannot be raised after training).
"""
from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels._common import is_pow2
from transact_jax.config import FeatureConfig
from transact_jax.config_json import ConfigError
from transact_jax.model.config import ModelConfig
from transact_jax.model.hstu import HSTUConfig, HSTUEncoder
from transact_jax.model.layers import TokenEncoder
from transact_jax.model.sequence.registry import SequenceModelEntry, register

MIN_KERNEL_WIDTH = 16
"""The HSTU attention kernel's per-head widths are powers of two >= 16."""


def attention_impl(cfg: ModelConfig) -> str:
    """The attention op's ``impl`` for ``cfg.encoder_impl``.

    "xla" and "pallas_triton" map to themselves; "pallas_triton" with a per-head width
    (``d_model / num_heads``) the kernel cannot take raises :class:`ConfigError` naming
    ``encoder_impl``. "auto" (the kernel on a GPU) stays "auto" when the kernel could run and is
    "xla" otherwise."""
    width = cfg.d_model // cfg.num_heads
    fits = is_pow2(width) and width >= MIN_KERNEL_WIDTH
    if cfg.encoder_impl == "pallas_triton" and not fits:
        raise ConfigError("encoder_impl", f"the HSTU attention kernel needs a per-head width "
                                          f"d_model / num_heads that is a power of two >= "
                                          f"{MIN_KERNEL_WIDTH}, got {width}; use 'xla' or 'auto'")
    return "xla" if cfg.encoder_impl == "auto" and not fits else cfg.encoder_impl


def check_model_config(cfg: ModelConfig) -> None:
    """The checks ``ModelConfig`` runs for ``sequence_model="hstu"`` (errors name the field)."""
    attention_impl(cfg)


def hstu_config(cfg: ModelConfig, length: int) -> HSTUConfig:
    """The encoder's configuration for ``length`` S_all slots (module docstring)."""
    width = cfg.d_model // cfg.num_heads
    return HSTUConfig(num_layers=cfg.num_layers, num_heads=cfg.num_heads, d_model=cfg.d_model,
                      d_qk=width, d_v=width, dropout=cfg.dropout, final_norm=True,
                      use_rab_pos=True, use_rab_time=False, max_seq_len=length + 1,
                      attention_impl=attention_impl(cfg))


def pack_jagged(history: jax.Array, mask: jax.Array,
                target: jax.Array) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """Compact each row's valid ``history`` tokens (order kept) and append its ``target`` token.

    Args:
      history: (N, L, d) tokens; mask: (N, L) bool, valid tokens anywhere in the row;
      target: (N, d) one target token per row.

    Returns:
      tokens (N (L + 1), d) (rows past ``offsets[-1]`` zero), offsets (N + 1,) int32 and the
      target rows (N,) int32 (``offsets[1:] - 1``). Static shapes: one scatter, jit-friendly.
    """
    n, length, d = history.shape
    rows = jnp.concatenate([history, target[:, None]], axis=1)                    # (N, L + 1, d)
    valid = jnp.concatenate([mask.astype(bool), jnp.ones((n, 1), bool)], axis=1)
    lengths = jnp.sum(valid, axis=1, dtype=jnp.int32)                            # n_i + 1
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(lengths, dtype=jnp.int32)])
    total = n * (length + 1)
    rank = jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1
    dest = jnp.where(valid, offsets[:-1, None] + rank, total)                    # total: dropped
    tokens = jnp.zeros((total, d), history.dtype).at[dest.reshape(-1)].set(
        rows.reshape(total, d), mode="drop")
    return tokens, offsets, offsets[1:] - 1


def cast_floats(module: nnx.Module, dtype) -> nnx.Module:
    """A copy of ``module`` with its floating-point state in ``dtype`` (gradients reach the
    originals); ``module`` itself for float32 (its parameters are float32)."""
    if jnp.dtype(dtype) == jnp.float32:
        return module
    graphdef, state = nnx.split(module)
    state = jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, state)
    return nnx.merge(graphdef, state)


class HSTUSequence(nnx.Module):
    """History tokens + one candidate target token, packed jagged, an HSTU encoder, a linear layer on
    the target's output (module docstring)."""

    def __init__(self, feat: FeatureConfig, cfg: ModelConfig, length: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.tokens = TokenEncoder(feat, length, cfg.d_model, rngs=rngs,
                                   token_features=cfg.token_features)
        self.item_proj = nnx.Linear(feat.embedding_dim, cfg.d_model, rngs=rngs)
        self.target = nnx.Param(init(rngs.params(), (cfg.d_model,)))
        self.encoder = HSTUEncoder(hstu_config(cfg, length), rngs=rngs)
        self.out = nnx.Linear(cfg.d_model, cfg.seq_out_dim, rngs=rngs)

    def __call__(self, emb: jax.Array, actions: jax.Array, surfaces: jax.Array, mask: jax.Array,
                 cand: jax.Array, dtype, dropout_key: Optional[jax.Array] = None,
                 token_age_hours: Optional[jax.Array] = None) -> Tuple[jax.Array, None]:
        history = self.item_proj(emb) + self.tokens(actions, surfaces, emb=emb, cand=cand,
                                                    age_hours=token_age_hours)
        target = self.item_proj(cand) + self.target[...]
        tokens, offsets, target_rows = pack_jagged(history, mask, target)
        encoder = cast_floats(self.encoder, dtype)
        u = encoder(tokens.astype(dtype), offsets, dropout_key=dropout_key,
                    num_targets=jnp.ones((mask.shape[0],), jnp.int32))
        return self.out(u[target_rows].astype(jnp.float32)), None


register(SequenceModelEntry(
    name="hstu",
    build=lambda feat, cfg, length, rt_slots, rngs: HSTUSequence(feat, cfg, length, rngs=rngs),
    next_action_loss=False))
