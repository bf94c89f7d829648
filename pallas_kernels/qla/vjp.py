"""The QLA kernels as one differentiable function: a ``jax.custom_vjp`` whose forward pass is
:func:`~pallas_kernels.qla.pallas_triton.qla_full_fwd` (or ``qla_causal_fwd``) and whose backward
pass is :func:`~pallas_kernels.qla.pallas_triton.qla_full_bwd` (or ``qla_causal_bwd``). Saved for
the backward pass: the inputs and each sequence's (D, Dv) float32 state ``M_b`` (B H D Dv values).

Gradients (VISTA, Appendix B, extended by the outer phi of Section 3.2.2). Per sequence and head,
with ``a = phi(q)``, ``c = phi(k)``, ``M = c[S]^T v[S]``, ``P = phi(M)``, ``G = dL/dO``::

    O_i = a_i P + [i seed] (a_i . c_i) v_i
    dP  = a^T G                      (all rows: history and seeds; Appendix B's W = Q^T dO)
    dM  = dP * phi'(M)               (the outer phi; absent from Appendix B, whose B.1.5 has no
                                      outer phi)
    da_i = G_i P^T + [i seed] (G_i . v_i) c_i          (eqs. 7-8, Z = P^T)
    dc_j = v_j dM^T (j history);  (G_t . v_t) a_t (t seed)   (eqs. 9-10)
    dv_j = c_j dM (j history);    (a_t . c_t) G_t (t seed)   (eqs. 11-12)
    dq = da * phi'(q),  dk = dc * phi'(k)

Appendix B's Delta(X, Y) are the seed rows' row-wise dot products ``X[T] = G . v`` and
``U[T] = a . c``. Causal: ``P`` becomes the per-row ``phi(C_i)`` and ``dM`` the suffix sums
``R_j = sum_{i >= j} (a_i^T G_i) * phi'(C_i)`` (see :mod:`pallas_kernels.qla.pallas_triton`).
``offsets`` and ``num_targets`` are integers and get no gradient.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.qla.config import QlaConfig
from pallas_kernels.qla.pallas_triton import (
    Jagged,
    jagged_meta,
    qla_causal_bwd,
    qla_causal_fwd,
    qla_full_bwd,
    qla_full_fwd,
)


def qla_differentiable(q: jax.Array, k: jax.Array, v: jax.Array, offsets: jax.Array, *,
                       num_targets: Optional[jax.Array], causal: bool = False,
                       config: Optional[QlaConfig] = None,
                       interpret: Optional[bool] = None) -> jax.Array:
    """:func:`~pallas_kernels.qla.reference.qla_reference`'s function and gradient, computed by
    the kernels (``config`` None: :meth:`QlaConfig.default` for the shapes)."""
    total = q.shape[0]
    if total == 0 or offsets.shape[0] <= 1:
        return _empty(v, q.dtype)
    meta = jagged_meta(offsets, num_targets, total)
    return _qla_vjp(q, k, v, meta, (causal, config, interpret))


def _empty(v: jax.Array, dtype) -> jax.Array:
    """No rows or no sequences: zeros (their gradients are zero too)."""
    return jnp.zeros(v.shape, dtype)


def _forward(q, k, v, meta: Jagged, static):
    causal, config, interpret = static
    fwd = qla_causal_fwd if causal else qla_full_fwd
    return fwd(q, k, v, meta, config=config, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _qla_vjp(q, k, v, meta, static):
    return _forward(q, k, v, meta, static)[0]


def _fwd(q, k, v, meta, static):
    out, m = _forward(q, k, v, meta, static)
    return out, (q, k, v, m, meta)


def _bwd(static, residuals, grad):
    causal, config, interpret = static
    q, k, v, m, meta = residuals
    bwd = qla_causal_bwd if causal else qla_full_bwd
    dq, dk, dv = bwd(q, k, v, m, grad, meta, config=config, interpret=interpret)
    int_grads = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, jax.dtypes.float0), meta)
    return dq, dk, dv, int_grads


_qla_vjp.defvjp(_fwd, _bwd)

__all__ = ["qla_differentiable"]
