"""The HSTU attention op's entry point: :func:`hstu_attention`, one call for every impl."""
from __future__ import annotations

import functools
from typing import Optional

import jax

from pallas_kernels._common import resolve_impl
from pallas_kernels.hstu_attention.config import HstuAttentionConfig
from pallas_kernels.hstu_attention.reference import hstu_attention_reference, validate_inputs
from pallas_kernels.hstu_attention.vjp import hstu_attention_differentiable


@functools.partial(jax.jit, static_argnames=("max_seq_len", "causal", "normalizer", "impl",
                                             "config", "interpret"))
def hstu_attention(q: jax.Array, k: jax.Array, v: jax.Array, offsets: jax.Array, *,
                   max_seq_len: int, timestamps: Optional[jax.Array] = None,
                   rab_pos: Optional[jax.Array] = None, rab_time: Optional[jax.Array] = None,
                   num_targets: Optional[jax.Array] = None, causal: bool = True,
                   normalizer: str = "seq_len", impl: str = "auto",
                   config: Optional[HstuAttentionConfig] = None,
                   interpret: Optional[bool] = None) -> jax.Array:
    """HSTU pointwise attention (eq. 2 of "Actions Speak Louder than Words", with rab^{p,t}) on the
    jagged layout; returns (T, H, Dv) in ``q.dtype``, rows past ``offsets[-1]`` zero.

    ``out[i] = sum_{j allowed} silu(q_i . k_j + rab(i, j)) v_j / norm`` over the rows of i's own
    sequence (``offsets`` (B + 1,) int32), causal if ``causal``, with the target rule of
    ``num_targets`` (B,) (M-FALCON), ``rab`` from the tables ``rab_pos`` (NUM_POS_BUCKETS,) and
    ``rab_time`` (NUM_TIME_BUCKETS,) (the latter with ``timestamps`` (T,) int32), and
    ``norm = max_seq_len`` (``normalizer="seq_len"``) or 1 (``"none"``). Differentiable with respect
    to q, k, v and both tables. See :mod:`pallas_kernels.hstu_attention.reference`.

    Args:
      impl: ``"xla"``: :func:`~pallas_kernels.hstu_attention.reference.hstu_attention_reference`
        (dense: memory B H max_seq_len^2). ``"pallas_triton"``: the jagged flash-style kernels
        (forward and backward, :mod:`pallas_kernels.hstu_attention.vjp`); widths Dqk, Dv must be
        powers of two >= 16. ``"auto"``: ``"pallas_triton"`` on a GPU, ``"xla"`` elsewhere
        (:func:`pallas_kernels._common.resolve_impl`).
      config: the tiling of the forward and both backward kernels (default: each kernel's
        :meth:`HstuAttentionConfig.default`). Kernel only.
      interpret: Pallas interpret mode (default: when no GPU backend is present); kernel only.
    """
    impl = resolve_impl(impl)
    kw = dict(max_seq_len=max_seq_len, timestamps=timestamps, rab_pos=rab_pos, rab_time=rab_time,
              num_targets=num_targets, causal=causal, normalizer=normalizer)
    if impl == "xla":
        return hstu_attention_reference(q, k, v, offsets, **kw)
    validate_inputs(q, k, v, offsets, **{n: kw[n] for n in kw if n != "causal"})
    return hstu_attention_differentiable(q, k, v, offsets, **kw, config=config, interpret=interpret)


__all__ = ["hstu_attention"]
