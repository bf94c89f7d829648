"""The SKUT op's entry point: :func:`skut`, one call for every implementation."""
from __future__ import annotations

import functools
from typing import Optional

import jax

from pallas_kernels._common import resolve_impl
from pallas_kernels.skut.config import SkutConfig
from pallas_kernels.skut.reference import EncoderWeights, skut_reference
from pallas_kernels.skut.vjp import skut_differentiable


@functools.partial(jax.jit, static_argnames=("impl", "num_heads", "causal", "eps", "dropout_rate",
                                             "config", "interpret"))
def skut(x: jax.Array, mask: jax.Array, weights: EncoderWeights, *, impl: str = "auto",
         num_heads: int = 1, causal: bool = True, eps: float = 1e-5, dropout_rate: float = 0.0,
         dropout_key: Optional[jax.Array] = None, config: Optional[SkutConfig] = None,
         interpret: Optional[bool] = None) -> jax.Array:
    """All layers of the TransAct V2 encoder on ``x`` (B, L, d) with key-padding ``mask`` (B, L).

    Semantics (every implementation): ``torch.nn.TransformerEncoderLayer`` post-LayerNorm layers
    (ReLU FFN, LayerNorm ``eps``), stacked ``weights.num_layers`` deep, with a causal mask (if
    ``causal``) and the key-padding ``mask`` (True / nonzero: a valid token; any pattern, not only a
    prefix); a query row that sees no key gets a zero attention output (never NaN). Returns
    (B, L, d) in ``x.dtype``. See :mod:`pallas_kernels.skut.reference`.

    Args:
      impl: ``"xla"``: :func:`~pallas_kernels.skut.reference.skut_reference`.
        ``"pallas_triton"``: the fused kernel, differentiable (forward = the kernel, backward = XLA
        autodiff of the reference: :mod:`pallas_kernels.skut.vjp`); it needs float32 / bfloat16 /
        float16 ``x`` and power-of-two widths >= 16. ``"auto"``: ``"pallas_triton"`` on a GPU,
        ``"xla"`` elsewhere (:func:`pallas_kernels._common.resolve_impl`).
      dropout_rate, dropout_key: dropout (torch's four sites) at ``dropout_rate`` when
        ``dropout_key`` is given and ``dropout_rate > 0`` (training). The kernel has no dropout,
        so with dropout active ``"pallas_triton"`` runs the reference instead.
      config: the kernel's tiling (default :meth:`SkutConfig.default` for the shape); kernel only.
      interpret: Pallas interpret mode (default: when no GPU backend is present); kernel only.
    """
    impl = resolve_impl(impl)
    dropout = dropout_key is not None and dropout_rate > 0
    if impl == "xla" or dropout:
        return skut_reference(x, mask, weights, num_heads=num_heads, causal=causal, eps=eps,
                              dropout_rate=dropout_rate, dropout_key=dropout_key)
    return skut_differentiable(x, mask, weights, num_heads=num_heads, causal=causal, eps=eps,
                               config=config, interpret=interpret)


__all__ = ["skut"]
