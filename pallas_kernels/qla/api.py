"""The QLA op's entry point: :func:`qla`, one call for every impl."""
from __future__ import annotations

import functools
from typing import Optional

import jax

from pallas_kernels._common import resolve_impl
from pallas_kernels.qla.config import QlaConfig
from pallas_kernels.qla.reference import qla_reference, validate_inputs
from pallas_kernels.qla.vjp import qla_differentiable


@functools.partial(jax.jit, static_argnames=("causal", "impl", "config", "interpret"))
def qla(q: jax.Array, k: jax.Array, v: jax.Array, offsets: jax.Array, *,
        num_targets: Optional[jax.Array], causal: bool = False, impl: str = "auto",
        config: Optional[QlaConfig] = None, interpret: Optional[bool] = None) -> jax.Array:
    """VISTA quasi-linear attention (Section 3.2.2, the QLU module) on the jagged layout; returns
    (T, H, Dv) in ``q.dtype``, rows past ``offsets[-1]`` zero.

    Per sequence b (rows ``offsets[b]:offsets[b + 1]``, ``offsets`` (B + 1,) int32) whose last
    ``num_targets[b]`` rows ((B,) int32; None: none) are seeds T and the rest history S, with
    ``phi`` = SiLU and ``M_b = phi(K[S])^T V[S]``::

        out[S] = phi(Q[S]) phi(M_b)
        out[T] = phi(Q[T]) phi(M_b) + (phi(q_t) . phi(k_t)) v_t        (each seed sees itself only)

    ``causal``: history row i uses its prefix state ``C_i`` instead of ``M_b``. No row
    normalisation, no 1/sqrt(d) scaling; the layer's SGLU gate is not part of the op.
    Differentiable with respect to q, k, v. See :mod:`pallas_kernels.qla.reference`.

    Args:
      impl: ``"xla"``: :func:`~pallas_kernels.qla.reference.qla_reference` (segment sums / a
        segmented scan; memory T H D Dv floats). ``"pallas_triton"``: the jagged kernels (forward
        and backward, :mod:`pallas_kernels.qla.vjp`); widths D, Dv must be powers of two >= 16
        and q, k, v share one dtype (float32, bfloat16 or float16). ``"auto"``:
        ``"pallas_triton"`` on a GPU, ``"xla"`` elsewhere
        (:func:`pallas_kernels._common.resolve_impl`).
      config: the kernels' tiling (default :meth:`QlaConfig.default` for the shapes). Kernel only.
      interpret: Pallas interpret mode (default: when no GPU backend is present); kernel only.
    """
    impl = resolve_impl(impl)
    if impl == "xla":
        return qla_reference(q, k, v, offsets, num_targets=num_targets, causal=causal)
    validate_inputs(q, k, v, offsets, num_targets=num_targets)
    return qla_differentiable(q, k, v, offsets, num_targets=num_targets, causal=causal,
                              config=config, interpret=interpret)


__all__ = ["qla"]
