"""HSTU, the Hierarchical Sequential Transduction Unit of "Actions Speak Louder than Words:
Trillion-Parameter Sequential Transducers for Generative Recommendations" (Section 3, eq. 1-3), in
Flax NNX on the jagged token layout.

One layer, with the paper's symbols (X the (T, d) tokens, f_1 / f_2 single linear layers, phi_1 =
phi_2 = SiLU, Norm a layer norm, rab^{p,t} the relative attention bias)::

    U(X), V(X), Q(X), K(X) = Split(phi_1(f_1(X)))                          (1)
    A(X) V(X) = phi_2(Q(X) K(X)^T + rab^{p,t}) V(X)                        (2)
    Y(X) = f_2(Norm(A(X) V(X)) * U(X)) + X                                 (3)

Eq. (2) is :func:`pallas_kernels.hstu_attention.api.hstu_attention` (pointwise SiLU attention, no
softmax, divided by ``max_seq_len`` with ``normalizer="seq_len"``, causal); the rab^{p,t} tables are
learned per layer and shared by the heads (``rab_pos`` over relative-position buckets, ``rab_time``
over buckets of timestamp differences). Eq. (3) as printed has no residual; the paper's layers are
"connected by residual connections" (Section 3), so ``+ X`` is added here. Dropout, when training,
applies to ``Norm(A V) * U`` before f_2 (the optional dropout the paper fuses with f_2, Section 3.3).

Jagged layout: tokens (T, d) with ``offsets`` (B + 1,) int32; sequence b is rows
``offsets[b]:offsets[b + 1]``, each at most ``max_seq_len`` long; rows past ``offsets[-1]`` are
padding (their outputs are 0 and they never reach a real row).

M-FALCON (Section 3.4): :func:`mfalcon_pack` lays out one request's history and its m candidates as
micro-batches of b_m targets each, :func:`mfalcon_target_outputs` reads the candidates' outputs back.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels._common import IMPLS
from pallas_kernels.hstu_attention.api import hstu_attention
from pallas_kernels.hstu_attention.reference import NORMALIZERS, NUM_POS_BUCKETS, NUM_TIME_BUCKETS
from transact_jax.config_json import AT_LEAST_ONE, Bound, ConfigError, check_fields


@dataclasses.dataclass(frozen=True)
class HSTUConfig:
    """Shape and options of an HSTU encoder.

    Attributes:
      num_layers: HSTU layers (residual).
      num_heads: attention heads h.
      d_model: token width d.
      d_qk, d_v: per-head widths of Q, K and of V, U (the Pallas kernel needs powers of two >= 16;
        the XLA path takes any width).
      dropout: dropout rate on ``Norm(A V) * U`` before f_2, while training.
      input_dropout: dropout rate on the encoder's input tokens, while training.
      input_scale: multiply the input tokens by sqrt(d_model) first (embedding scale).
      input_norm: layer-norm X before f_1 (a pre-norm residual stream; False is eq. 1 as printed).
      final_norm: a layer norm on the last layer's output.
      normalizer: divisor of the pointwise attention: "seq_len" (``max_seq_len``) or "none".
      use_rab_pos, use_rab_time: learn the positional / temporal relative attention bias (the
        temporal one needs token timestamps).
      max_seq_len: the longest sequence (N); longer ones are cut by the attention op.
      attention_impl: ``impl`` of the attention op: "auto" (the kernel on a GPU, XLA elsewhere),
        "pallas_triton" or "xla".
      eps: layer-norm epsilon.
    """

    num_layers: int = 2
    num_heads: int = 1
    d_model: int = 64
    d_qk: int = 32
    d_v: int = 32
    dropout: float = 0.0
    input_dropout: float = 0.0
    input_scale: bool = False
    input_norm: bool = True
    final_norm: bool = False
    normalizer: str = "seq_len"
    use_rab_pos: bool = True
    use_rab_time: bool = False
    max_seq_len: int = 200
    attention_impl: str = "auto"
    eps: float = 1e-6

    def __post_init__(self):
        rate = Bound(0, 1, high_open=True)
        check_fields(self, {**{n: AT_LEAST_ONE for n in ("num_layers", "num_heads", "d_model",
                                                        "d_qk", "d_v", "max_seq_len")},
                            "dropout": rate, "input_dropout": rate, "eps": Bound(0, low_open=True)})
        if self.normalizer not in NORMALIZERS:
            raise ConfigError("normalizer", f"expected one of {NORMALIZERS}, got {self.normalizer!r}")
        if self.attention_impl not in IMPLS:
            raise ConfigError("attention_impl", f"expected one of {IMPLS}, got "
                                                f"{self.attention_impl!r}")
        if self.attention_impl == "pallas_triton":
            for name in ("d_qk", "d_v"):
                width = getattr(self, name)
                if width < 16 or width & (width - 1):
                    raise ConfigError(name, f"the Pallas kernel needs a power of two >= 16, got "
                                            f"{width}")


def dropout(x: jax.Array, rate: float, key: Optional[jax.Array]) -> jax.Array:
    """Inverted dropout at ``rate`` when ``key`` is given (training), ``x`` otherwise."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def padding_rows(offsets: jax.Array, num_rows: int) -> jax.Array:
    """(T,) bool: rows past ``offsets[-1]`` (padding of the jagged layout)."""
    return jnp.arange(num_rows) >= offsets[-1]


class HSTULayer(nnx.Module):
    """One HSTU layer, eq. (1)-(3) with a residual (module docstring)."""

    def __init__(self, cfg: HSTUConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        h, d = cfg.num_heads, cfg.d_model
        width = h * (2 * cfg.d_v + 2 * cfg.d_qk)       # U, V, Q, K from one fused f_1
        xavier = nnx.initializers.xavier_uniform()
        self.input_norm = nnx.data(nnx.LayerNorm(d, epsilon=cfg.eps, rngs=rngs)
                                   if cfg.input_norm else None)
        self.f1 = nnx.Linear(d, width, kernel_init=xavier, rngs=rngs)
        self.norm = nnx.LayerNorm(h * cfg.d_v, epsilon=cfg.eps, rngs=rngs)
        self.f2 = nnx.Linear(h * cfg.d_v, d, kernel_init=xavier, rngs=rngs)
        zeros = nnx.initializers.zeros
        self.rab_pos = nnx.data(nnx.Param(zeros(rngs.params(), (NUM_POS_BUCKETS,)))
                                if cfg.use_rab_pos else None)
        self.rab_time = nnx.data(nnx.Param(zeros(rngs.params(), (NUM_TIME_BUCKETS,)))
                                 if cfg.use_rab_time else None)

    def __call__(self, x: jax.Array, offsets: jax.Array, *, timestamps: Optional[jax.Array] = None,
                 num_targets: Optional[jax.Array] = None,
                 dropout_key: Optional[jax.Array] = None) -> jax.Array:
        """``x`` (T, d) -> (T, d). ``timestamps`` (T,) int32 seconds feed ``rab_time``;
        ``num_targets`` (B,) marks each sequence's last tokens as M-FALCON targets (optional)."""
        cfg = self.cfg
        total, h = x.shape[0], cfg.num_heads
        if self.rab_time is not None and timestamps is None:
            raise ValueError("timestamps: use_rab_time needs the tokens' timestamps")
        xn = self.input_norm(x) if self.input_norm is not None else x
        uvqk = jax.nn.silu(self.f1(xn))                                             # eq. (1)
        u, v, q, k = jnp.split(uvqk, [h * cfg.d_v, 2 * h * cfg.d_v, 2 * h * cfg.d_v + h * cfg.d_qk],
                               axis=-1)
        av = hstu_attention(                                                        # eq. (2)
            q.reshape(total, h, cfg.d_qk), k.reshape(total, h, cfg.d_qk),
            v.reshape(total, h, cfg.d_v), offsets.astype(jnp.int32), max_seq_len=cfg.max_seq_len,
            timestamps=None if self.rab_time is None else timestamps.astype(jnp.int32),
            rab_pos=None if self.rab_pos is None else self.rab_pos[...],
            rab_time=None if self.rab_time is None else self.rab_time[...],
            num_targets=num_targets, causal=True, normalizer=cfg.normalizer,
            impl=cfg.attention_impl)
        gated = self.norm(av.reshape(total, h * cfg.d_v)) * u                       # eq. (3)
        return self.f2(dropout(gated, cfg.dropout, dropout_key)) + x


class HSTUEncoder(nnx.Module):
    """Input scale and dropout, ``num_layers`` :class:`HSTULayer` s, an optional final layer norm,
    on jagged tokens (T, d); padding rows of the output are 0."""

    def __init__(self, cfg: HSTUConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.layers = nnx.List([HSTULayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = nnx.data(nnx.LayerNorm(cfg.d_model, epsilon=cfg.eps, rngs=rngs)
                                   if cfg.final_norm else None)

    def __call__(self, x: jax.Array, offsets: jax.Array, *, timestamps: Optional[jax.Array] = None,
                 num_targets: Optional[jax.Array] = None,
                 dropout_key: Optional[jax.Array] = None) -> jax.Array:
        cfg = self.cfg
        if x.ndim != 2 or x.shape[1] != cfg.d_model:
            raise ValueError(f"x: expected (T, {cfg.d_model}) tokens, got {x.shape}")
        keys = ([None] * (cfg.num_layers + 1) if dropout_key is None
                else list(jax.random.split(dropout_key, cfg.num_layers + 1)))
        if cfg.input_scale:
            x = x * math.sqrt(cfg.d_model)
        x = dropout(x, cfg.input_dropout, keys[0])
        for layer, key in zip(self.layers, keys[1:]):
            x = layer(x, offsets, timestamps=timestamps, num_targets=num_targets, dropout_key=key)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return jnp.where(padding_rows(offsets, x.shape[0])[:, None], 0.0, x)


# ----------------------------------------------------------------------------------- M-FALCON


def _mfalcon_layout(num_history: int, num_candidates: int, b_m: int):
    """Static index arrays of the M-FALCON layout (see :func:`mfalcon_pack`): for each packed row
    its source row in ``concat([history, candidates])``, the offsets, the targets per sequence and
    the packed row of each candidate (in candidate order)."""
    if b_m < 1:
        raise ValueError(f"b_m: expected a micro-batch size >= 1, got {b_m}")
    if num_candidates < 1:
        raise ValueError(f"candidates: expected at least one candidate, got {num_candidates}")
    n, m = num_history, num_candidates
    starts = np.arange(0, m, b_m)
    sizes = np.minimum(b_m, m - starts)                         # b_m each, the last one ragged
    source = np.concatenate([np.concatenate([np.arange(n), n + s + np.arange(c)])
                             for s, c in zip(starts, sizes)])
    offsets = np.concatenate([[0], np.cumsum(n + sizes)])
    # micro-batch k = j // b_m starts at row k (n + b_m); candidate j is n + j - k b_m rows further
    candidate_rows = (np.arange(m) // b_m + 1) * n + np.arange(m)
    return (source.astype(np.int32), offsets.astype(np.int32), sizes.astype(np.int32),
            candidate_rows.astype(np.int32))


def mfalcon_pack(history: jax.Array, candidates: jax.Array,
                 b_m: int) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """M-FALCON's micro-batches ("Actions Speak Louder than Words", Section 3.4 and Appendix H) for
    one request, on the jagged layout: ``(tokens, offsets, num_targets)`` for :class:`HSTUEncoder`.

    M-FALCON (Microbatched-Fast Attention Leveraging Cacheable OperatioNs) scores m candidates of
    one user history of n tokens in ceil(m / b_m) forward passes instead of m: ``b_m`` is the
    micro-batch size, the number of candidates appended as *targets* after one copy of the history.
    Sequence k is ``history`` followed by candidates ``k b_m .. min((k + 1) b_m, m) - 1`` (the last
    micro-batch ragged) with ``num_targets[k]`` = their count. Under the attention op's target rule
    (a target sees the history and itself, never another target, at the position of the first
    target) each candidate's output equals the one of its own pass over history + that candidate
    with a plain causal mask. The sequences can go through the encoder in one call, as here, or
    one per call (where the paper reuses the history's cached K and V).

    Args:
      history: (n, ...) history rows (tokens (n, d); the same call packs timestamps (n,)).
      candidates: (m, ...) candidate rows, the same trailing shape and dtype.
      b_m: candidates per micro-batch, >= 1; the encoder's ``max_seq_len`` must be >= n + b_m
        (it is also the "seq_len" normalizer: keep the value the encoder was trained with).

    Returns:
      tokens (ceil(m / b_m) n + m, ...), offsets (ceil(m / b_m) + 1,) int32 and num_targets
      (ceil(m / b_m),) int32. :func:`mfalcon_target_outputs` reads the candidates' outputs back.
    """
    if history.shape[1:] != candidates.shape[1:] or history.dtype != candidates.dtype:
        raise ValueError(f"candidates: expected rows like history's {history.shape[1:]} "
                         f"{history.dtype}, got {candidates.shape[1:]} {candidates.dtype}")
    source, offsets, num_targets, _ = _mfalcon_layout(history.shape[0], candidates.shape[0], b_m)
    rows = jnp.concatenate([history, candidates], axis=0)
    return rows[source], jnp.asarray(offsets), jnp.asarray(num_targets)


def mfalcon_target_outputs(outputs: jax.Array, num_history: int, num_candidates: int,
                           b_m: int) -> jax.Array:
    """The (m, ...) encoder outputs of the candidate rows of :func:`mfalcon_pack`'s layout (for a
    history of ``num_history`` rows, ``num_candidates`` = m candidates, micro-batch size ``b_m``),
    in the original candidate order."""
    _, offsets, _, candidate_rows = _mfalcon_layout(num_history, num_candidates, b_m)
    if outputs.shape[0] != offsets[-1]:
        raise ValueError(f"outputs: expected {offsets[-1]} rows for n={num_history}, "
                         f"m={num_candidates}, b_m={b_m}, got {outputs.shape[0]}")
    return outputs[candidate_rows]


__all__ = ["HSTUConfig", "HSTUEncoder", "HSTULayer", "dropout", "mfalcon_pack",
           "mfalcon_target_outputs", "padding_rows"]
