"""Pallas kernels for TransAct V2, HSTU and VISTA, and their pure-jnp references.

Standalone: nothing here imports ``transact_jax``, so the kernels can be reused in other models.

Layout: one package per kernel op, and one entry point per op in its ``api`` module::

    pallas_kernels/
      _common.py        helpers shared by the kernels; IMPLS and resolve_impl (the impl names);
                        A10G_SMEM_BYTES (the shared-memory budget)
      int8_codec.py     the int8 embedding codec (shared; not a kernel op; re-exported here)
      skut/             the fused transformer encoder (SKUT, paper §3.4.2)
        api.py          skut(x, mask, weights, *, impl="auto", ...)
        reference.py    the pure-jnp contract (EncoderWeights, skut_reference, ...)
        config.py       SkutConfig
        pallas_triton.py  the kernel (forward only)
        vjp.py          the kernel made differentiable (backward: autodiff of the reference)
      nn_search/        the fused int8 nearest-neighbour token search (paper §3.4.2)
        api.py          nn_search(seq_q, lengths, cand, cand_to_req=None, *, k, impl="auto", ...)
        reference.py    the pure-jnp contract (nn_search_reference, masked_top_k, PAD_INDEX, ...)
        config.py       NNSearchConfig, MAX_K
        pallas_triton.py  the kernel and its jagged-layout wrapper
        profile.py      the kernel stopped early (bench/nn_search.py --profile only)
      hstu_attention/   HSTU's jagged pointwise attention with rab^{p,t} and M-FALCON targets
        api.py          hstu_attention(q, k, v, offsets, *, max_seq_len, ..., impl="auto")
        reference.py, config.py, pallas_triton.py (forward, dq, dkv kernels), vjp.py
      qla/              VISTA's quasi-linear attention over jagged histories with virtual seeds
        api.py          qla(q, k, v, offsets, *, num_targets, causal=False, impl="auto", ...)
        reference.py, config.py, pallas_triton.py (state, output and backward kernels), vjp.py

Rule: callers run an op through its ``api`` entry point, choosing the implementation with ``impl``
(``"pallas_triton"``, ``"xla"`` = the reference, or ``"auto"``: the kernel on a GPU, the reference
elsewhere); they may import the op's ``reference`` and ``config`` modules for its types and building
blocks, never its kernel modules (only the op's own tests and benchmarks do). Each op's tests run
every implementation against its reference.
"""
from pallas_kernels.int8_codec import (
    DEQUANT_STEP,
    QUANT_MAX,
    QUANT_SCALE,
    dequantize_int8,
    l2_normalize,
    quantize_int8,
)

__all__ = [
    "DEQUANT_STEP", "QUANT_MAX", "QUANT_SCALE",
    "dequantize_int8", "l2_normalize", "quantize_int8",
]
