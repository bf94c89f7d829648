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
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
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


__all__ = ["HSTUConfig", "HSTUEncoder", "HSTULayer", "dropout", "padding_rows"]
