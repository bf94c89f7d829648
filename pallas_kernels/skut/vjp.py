"""SKUT made differentiable: a ``jax.custom_vjp`` whose forward pass is the fused kernel
(:func:`pallas_kernels.skut.pallas_triton.skut_pallas_triton`) and whose backward pass is XLA's
autodiff of the reference (:func:`pallas_kernels.skut.reference.skut_reference`, recomputed from
the saved inputs), so a model can train with the kernel in its forward pass (without dropout:
the kernel has none).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.skut.config import SkutConfig
from pallas_kernels.skut.pallas_triton import skut_pallas_triton
from pallas_kernels.skut.reference import EncoderWeights, skut_reference


def skut_differentiable(x: jax.Array, mask: jax.Array, weights: EncoderWeights, *,
                        num_heads: int = 1, causal: bool = True, eps: float = 1e-5,
                        config: Optional[SkutConfig] = None,
                        interpret: Optional[bool] = None) -> jax.Array:
    """:func:`~pallas_kernels.skut.pallas_triton.skut_pallas_triton` with the reference's gradient
    (with respect to ``x`` and ``weights``; ``mask`` gets a zero cotangent)."""
    static = dict(num_heads=num_heads, causal=causal, eps=eps, config=config, interpret=interpret)
    return _skut_vjp(x, mask, weights, tuple(sorted(static.items())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _skut_vjp(x, mask, weights, static):
    return skut_pallas_triton(x, mask, weights, **dict(static))


def _skut_vjp_fwd(x, mask, weights, static):
    return skut_pallas_triton(x, mask, weights, **dict(static)), (x, mask, weights)


def _skut_vjp_bwd(static, residuals, grad):
    x, mask, weights = residuals
    kw = dict(static)

    def ref(x_, w_):
        return skut_reference(x_, mask, w_, num_heads=kw["num_heads"], causal=kw["causal"],
                              eps=kw["eps"])

    _, pullback = jax.vjp(ref, x, weights)
    dx, dw = pullback(grad)
    if jnp.issubdtype(mask.dtype, jnp.inexact):
        mask_grad = jnp.zeros_like(mask)
    else:
        mask_grad = np.zeros(mask.shape, jax.dtypes.float0)
    return dx, mask_grad, dw


_skut_vjp.defvjp(_skut_vjp_fwd, _skut_vjp_bwd)
