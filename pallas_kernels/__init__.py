"""Pallas kernels for TransAct V2 and their pure-jnp references.

Standalone: nothing here imports ``transact_jax``, so the kernels can be reused in other models.
Each kernel lives in a module family: the kernel, its ``*_reference`` and its config; import
functions from their modules (e.g. ``from pallas_kernels.nn_search_reference import
nn_search_reference``).
"""
from pallas_kernels.int8_codec import (
    DEQUANT_STEP,
    QUANT_MAX,
    QUANT_SCALE,
    dequantize_int8,
    l2_normalize,
    quantize_int8,
)
from pallas_kernels.nn_search_reference import PAD_INDEX, masked_top_k, normalized_sequence

__all__ = [
    "DEQUANT_STEP", "QUANT_MAX", "QUANT_SCALE", "PAD_INDEX",
    "dequantize_int8", "l2_normalize", "quantize_int8",
    "masked_top_k", "normalized_sequence",
]
