"""Int8 affine codec for 32-d item ("PinSage") embeddings (paper §3.2.1).

The paper stores every sequence token's content embedding ``e`` as int8:

    q  = clamp(round(e / 0.65 * 127), -127, 127)     # quantize
    e' = q * 0.65 / 127                               # dequantize

0.65 is the paper's scale: embeddings whose components lie in [-0.65, 0.65] round-trip with an
absolute error of at most ``0.65 / 127 / 2`` (about 2.6e-3) per component; larger components clamp to
±0.65. -128 is never produced, so the code is symmetric.

This module is shared by the kernels and their references (and re-exported, with input validation, by
``transact_jax.data.quantization``); it depends only on ``jax.numpy`` / ``numpy``.
"""
from __future__ import annotations

from typing import Union

import jax.numpy as jnp
import numpy as np

QUANT_SCALE: float = 0.65
"""Embedding magnitude that maps to the int8 extreme (paper §3.2.1)."""
QUANT_MAX: int = 127
"""Largest int8 code produced; the range is symmetric, [-127, 127]."""
DEQUANT_STEP: float = QUANT_SCALE / QUANT_MAX
"""Value of one int8 step: ``e' = q * DEQUANT_STEP``."""

ArrayLike = Union[np.ndarray, jnp.ndarray]


def _xp(x: ArrayLike):
    return np if isinstance(x, np.ndarray) else jnp


def quantize_int8(e: ArrayLike, scale: float = QUANT_SCALE) -> ArrayLike:
    """Quantize float embeddings to int8 codes: ``clamp(round(e / scale * 127), -127, 127)``.

    Works on numpy (returns numpy) and jax arrays (returns jax). Rounding is half-to-even, as both
    ``np.rint`` and ``jnp.round`` do. Inputs are not validated here (NaN becomes an arbitrary code);
    use ``transact_jax.data.quantization.quantize`` at API boundaries.
    """
    xp = _xp(e)
    q = xp.round(xp.asarray(e, dtype=np.float32) * np.float32(QUANT_MAX / scale))
    return xp.clip(q, -QUANT_MAX, QUANT_MAX).astype(np.int8)


def dequantize_int8(q: ArrayLike, scale: float = QUANT_SCALE, dtype=np.float32) -> ArrayLike:
    """Inverse of :func:`quantize_int8`: ``q * scale / 127`` in ``dtype`` (float32 by default)."""
    xp = _xp(q)
    return q.astype(dtype) * xp.asarray(scale / QUANT_MAX, dtype=dtype)


def l2_normalize(x: ArrayLike, eps: float = 1e-12) -> ArrayLike:
    """``x / max(||x||_2, eps)`` along the last axis (a zero vector stays zero, never NaN)."""
    xp = _xp(x)
    norm = xp.sqrt(xp.sum(x * x, axis=-1, keepdims=True))
    return x / xp.maximum(norm, xp.asarray(eps, dtype=x.dtype))
