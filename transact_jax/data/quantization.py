"""Validated int8 quantization of item embeddings (paper §3.2.1).

``q = clamp(round(e / 0.65 * 127), -127, 127)`` and ``e' = q * 0.65 / 127``. The arithmetic lives
in ``pallas_kernels.int8_codec`` (shared with the kernels); this module adds the input checks that an
API boundary needs: float input, finite values, the right embedding width.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pallas_kernels.int8_codec import (
    DEQUANT_STEP,
    QUANT_MAX,
    QUANT_SCALE,
    dequantize_int8,
    quantize_int8,
)
from transact_jax.data.request_rules import check_codes
from transact_jax.data.schema import SchemaError, check_finite

MAX_ABS_ERROR: float = DEQUANT_STEP / 2
"""Round-trip error bound per component for |e| <= QUANT_SCALE (half an int8 step)."""


def quantize(e: np.ndarray, scale: float = QUANT_SCALE, name: str = "embeddings",
             dim: int | None = None) -> np.ndarray:
    """Quantize float embeddings ``(..., D)`` to int8 codes, rejecting NaN/inf and wrong widths."""
    e = np.asarray(e)
    if not np.issubdtype(e.dtype, np.floating) and e.dtype != jnp.bfloat16:
        raise SchemaError(name, f"expected float embeddings, got dtype {e.dtype}")
    if dim is not None and (e.ndim == 0 or e.shape[-1] != dim):
        raise SchemaError(name, f"expected last dimension {dim}, got shape {e.shape}")
    check_finite(name, e.astype(np.float32))
    return quantize_int8(e.astype(np.float32), scale)


def dequantize(q: np.ndarray, scale: float = QUANT_SCALE, name: str = "embeddings",
               dtype=np.float32) -> np.ndarray:
    """Dequantize int8 codes; rejects non-int8 input and the code -128, which the codec never produces."""
    q = np.asarray(q)
    if q.dtype != np.int8:
        raise SchemaError(name, f"expected int8 codes, got dtype {q.dtype}")
    check_codes(name, q)
    return dequantize_int8(q, scale, dtype)


__all__ = ["DEQUANT_STEP", "MAX_ABS_ERROR", "QUANT_MAX", "QUANT_SCALE", "dequantize", "quantize"]
