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

M-FALCON ("Actions Speak Louder than Words" Section 3.4): when the history the model reads is the
same for every candidate of a request (:func:`shared_history`), :meth:`HSTUSequence.mfalcon`
scores a batch of requests with one encoder pass per b_m candidates of a request
(:func:`pack_requests`): the request's history once, then up to b_m candidates as targets that see
the history and themselves, not each other. Each candidate's output equals that of its own
one-target sequence, so the scores are the tower's, at the encoder cost of ceil(m / b_m) passes of
n + b_m rows instead of m passes of n + 1 rows. ``ModelConfig.b_m`` sizes the attention for it
(``max_seq_len`` = L + b_m, fixed at training: the "seq_len" normalizer divides by it).
:func:`transact_jax.model.hstu.mfalcon_pack` is the same packing for one request.
"""
from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels._common import is_pow2
from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.config_json import ConfigError
from transact_jax.model.config import ModelConfig
from transact_jax.model.hstu import HSTUConfig, HSTUEncoder
from transact_jax.model.layers import TokenEncoder
from transact_jax.model.sequence.registry import SequenceModelEntry, register, sequence_model_entry

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
                      use_rab_pos=True, use_rab_time=False, max_seq_len=length + cfg.b_m,
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


def shared_history(sel: SelectionConfig, cfg: ModelConfig) -> Optional[str]:
    """None when every candidate of a request reads the same history tokens (so the family's
    ``mfalcon`` path applies: HSTU's M-FALCON, VISTA's per-user summary), else why not: the family
    must have that path (the registry's ``scores_requests``; for "hstu" also b_m > 1), read neither
    ``rt_nn`` nor ``imp`` (both NN-selected per candidate: NN(S_RT[r:], c), NN(S_imp, c)), read
    ``ll`` only with ``ll_selection="recent"`` (not per candidate), and add no "similarity" token
    feature (it depends on the candidate). ``rt_recent`` (S_RT[:r]) is always shared."""
    if not sequence_model_entry(cfg.sequence_model).scores_requests:
        return f"sequence_model {cfg.sequence_model!r} scores one candidate per sequence"
    if cfg.sequence_model == "hstu" and cfg.b_m < 2:
        return "b_m is 1: one candidate per sequence"
    for segment in ("rt_nn", "imp"):
        if segment in cfg.segments:
            return f"the {segment} segment is selected per candidate"
    if "ll" in cfg.segments and sel.ll_selection != "recent":
        return f"the ll segment is selected per candidate (ll_selection={sel.ll_selection!r})"
    if "similarity" in cfg.token_features:
        return "the 'similarity' token feature depends on the candidate"
    return None


def pack_requests(history: jax.Array, mask: jax.Array, targets: jax.Array,
                  cand_to_req: jax.Array, b_m: int):
    """M-FALCON packing of a batch of requests (module docstring), static shapes, jit-friendly.

    Args:
      history: (U, L, d) each request's tokens; mask: (U, L) bool, valid tokens anywhere in a row.
      targets: (N, d) candidate tokens; cand_to_req: (N,) int32 each candidate's request.
      b_m: most candidates per pass.

    Returns:
      tokens (P L + N, d) (P = U + ceil(N / b_m) passes at most; unused passes are empty and
      rows past ``offsets[-1]`` zero), offsets (P + 1,) int32, num_targets (P,) int32 and each
      candidate's row (N,) int32. Pass order: requests in order, each request's candidates in
      their order within the batch, b_m per pass.
    """
    u, length, d = history.shape
    n = targets.shape[0]
    passes = u + -(-n // b_m)
    c2r = cand_to_req.astype(jnp.int32)
    order = jnp.argsort(c2r, stable=True)
    sreq = c2r[order]
    rank = jnp.arange(n, dtype=jnp.int32) - jnp.searchsorted(sreq, sreq, side="left").astype(jnp.int32)
    per_req = jnp.zeros((u,), jnp.int32).at[c2r].add(1)
    req_passes = -(-per_req // b_m)
    first_pass = jnp.cumsum(req_passes) - req_passes
    sorted_pass = first_pass[sreq] + rank // b_m
    pass_req = jnp.zeros((passes,), jnp.int32).at[sorted_pass].set(sreq)
    num_targets = jnp.zeros((passes,), jnp.int32).at[sorted_pass].add(1)
    n_hist = jnp.sum(mask, axis=1, dtype=jnp.int32)
    lengths = jnp.where(num_targets > 0, n_hist[pass_req] + num_targets, 0)
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(lengths, dtype=jnp.int32)])
    total = passes * length + n
    hist_rank = jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1                      # (U, L)
    keep = mask[pass_req] & (num_targets > 0)[:, None]                              # (P, L)
    dest = jnp.where(keep, offsets[:-1, None] + hist_rank[pass_req], total)
    tokens = jnp.zeros((total, d), history.dtype).at[dest.reshape(-1)].set(
        history[pass_req].reshape(passes * length, d), mode="drop")
    sorted_rows = offsets[sorted_pass] + n_hist[sreq] + rank % b_m
    rows = jnp.zeros((n,), jnp.int32).at[order].set(sorted_rows)
    tokens = tokens.at[rows].set(targets.astype(tokens.dtype))
    return tokens, offsets, num_targets, rows


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
        tokens, offsets, target_rows = pack_jagged(history, mask, self._target_tokens(cand))
        u = self._encode(tokens, offsets, jnp.ones((mask.shape[0],), jnp.int32), dtype, dropout_key)
        return self.out(u[target_rows].astype(jnp.float32)), None

    def mfalcon(self, emb: jax.Array, actions: jax.Array, surfaces: jax.Array, mask: jax.Array,
                cand: jax.Array, cand_to_req: jax.Array, b_m: int, dtype,
                dropout_key: Optional[jax.Array] = None) -> jax.Array:
        """Sequence vectors (N, seq_out_dim) of N candidates from their U requests' shared history
        (``emb`` (U, L, D), ``actions``, ``surfaces``, ``mask`` (U, L)), b_m candidates per encoder
        pass (module docstring); equal to ``self(...)`` on each candidate's own copy of its
        request's history (with ``dropout_key`` None). ``dropout_key``: the encoder's dropout, for
        training on whole requests; the history must not depend on the candidate
        (:func:`shared_history`)."""
        if self.tokens.similarity is not None:
            raise ValueError("token_features: 'similarity' depends on the candidate; M-FALCON "
                             "needs a history shared by the request's candidates")
        history = self.item_proj(emb) + self.tokens(actions, surfaces, emb=emb)
        tokens, offsets, num_targets, rows = pack_requests(history, mask, self._target_tokens(cand),
                                                           cand_to_req, b_m)
        u = self._encode(tokens, offsets, num_targets, dtype, dropout_key)
        return self.out(u[rows].astype(jnp.float32))

    def _target_tokens(self, cand: jax.Array) -> jax.Array:
        return self.item_proj(cand) + self.target[...]

    def _encode(self, tokens, offsets, num_targets, dtype, dropout_key) -> jax.Array:
        encoder = cast_floats(self.encoder, dtype)
        return encoder(tokens.astype(dtype), offsets, dropout_key=dropout_key,
                       num_targets=num_targets)


register(SequenceModelEntry(
    name="hstu",
    build=lambda feat, cfg, length, rt_slots, rngs: HSTUSequence(feat, cfg, length, rngs=rngs),
    next_action_loss=False, scores_requests=True))
