"""The HSTU attention kernels as one differentiable function: a ``jax.custom_vjp`` whose forward
pass is :func:`pallas_kernels.hstu_attention.pallas_triton.hstu_attention_fwd` and whose backward
pass is :func:`~pallas_kernels.hstu_attention.pallas_triton.hstu_attention_bwd` (S recomputed,
flash-style; nothing but the inputs is saved).

Gradients flow to q, k, v and the rab tables. The tables enter the kernels as their differences
(:func:`~pallas_kernels.hstu_attention.pallas_triton.table_deltas`, plain XLA outside the custom
VJP), so XLA's autodiff maps the kernels' delta gradients back to the tables. ``offsets``,
``timestamps`` and ``num_targets`` are integers and get no gradient.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.hstu_attention.config import HstuAttentionConfig
from pallas_kernels.hstu_attention.pallas_triton import (
    SeqMeta,
    Static,
    hstu_attention_bwd,
    hstu_attention_fwd,
    table_deltas,
)
from pallas_kernels.hstu_attention.reference import (
    history_lengths,
    normalizer_value,
    sequence_lengths,
)


def hstu_attention_differentiable(q: jax.Array, k: jax.Array, v: jax.Array, offsets: jax.Array, *,
                                  max_seq_len: int, timestamps: Optional[jax.Array] = None,
                                  rab_pos: Optional[jax.Array] = None,
                                  rab_time: Optional[jax.Array] = None,
                                  num_targets: Optional[jax.Array] = None, causal: bool = True,
                                  normalizer: str = "seq_len",
                                  config: Optional[HstuAttentionConfig] = None,
                                  interpret: Optional[bool] = None) -> jax.Array:
    """:func:`~pallas_kernels.hstu_attention.reference.hstu_attention_reference`'s function and
    gradient, computed by the kernels (``config``: the tiling of all three kernels; None: each
    kernel's :meth:`HstuAttentionConfig.default`)."""
    offsets = offsets.astype(jnp.int32)
    lengths = sequence_lengths(offsets, max_seq_len)
    ints = (offsets, offsets[:-1], lengths, history_lengths(lengths, num_targets),
            None if rab_time is None else timestamps.astype(jnp.int32))
    st = Static(max_seq_len=max_seq_len, causal=causal,
                norm=normalizer_value(normalizer, max_seq_len),
                has_pos=rab_pos is not None, has_time=rab_time is not None)
    pos_delta = None if rab_pos is None else table_deltas(rab_pos)
    time_delta = None if rab_time is None else table_deltas(rab_time)
    return _hstu_vjp(q, k, v, pos_delta, time_delta, ints, (st, config, interpret))


def _unpack(ints):
    offsets, start, length, history, ts = ints
    return offsets, SeqMeta(start, length, history), ts


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _hstu_vjp(q, k, v, pos_delta, time_delta, ints, static):
    st, config, interpret = static
    offsets, meta, ts = _unpack(ints)
    return hstu_attention_fwd(q, k, v, offsets, meta, ts, pos_delta, time_delta, st=st,
                              config=config, interpret=interpret)


def _fwd(q, k, v, pos_delta, time_delta, ints, static):
    out = _hstu_vjp(q, k, v, pos_delta, time_delta, ints, static)
    return out, (q, k, v, pos_delta, time_delta, ints)


def _bwd(static, residuals, grad):
    st, config, interpret = static
    q, k, v, pos_delta, time_delta, ints = residuals
    offsets, meta, ts = _unpack(ints)
    dq, dk, dv, dpos, dtime = hstu_attention_bwd(q, k, v, grad, offsets, meta, ts, pos_delta,
                                                 time_delta, st=st, config=config,
                                                 interpret=interpret)
    int_grads = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, jax.dtypes.float0), ints)
    return dq, dk, dv, dpos, dtime, int_grads


_hstu_vjp.defvjp(_fwd, _bwd)

__all__ = ["hstu_attention_differentiable"]
