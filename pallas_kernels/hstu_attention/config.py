"""Tiling of the HSTU attention kernels (:mod:`pallas_kernels.hstu_attention.pallas_triton`)."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels._common import check_tiling, next_pow2


MAX_TILE_BYTES = 16 * 1024
"""Largest (rows, head_dim) operand tile :meth:`HstuAttentionConfig.default` picks."""


@dataclasses.dataclass(frozen=True)
class HstuAttentionConfig:
    """Tiling of one HSTU attention kernel (forward, or one of the two backward kernels).

    Attributes:
      block_q: query rows per tile (power of two, >= 16).
      block_k: key rows per tile (power of two, >= 16).
      num_warps: warps per program (Triton).
      num_stages: software-pipelining stages of the key (or query) loop (Triton).
    """

    block_q: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        check_tiling(self, ("block_q", "block_k"))

    @classmethod
    def default(cls, max_seq_len: int, head_dim: int = 64, dtype=jnp.bfloat16,
                backward: bool = False) -> "HstuAttentionConfig":
        """Heuristic per shape, within the A10G shared-memory budget
        (``pallas_kernels._common.A10G_SMEM_BYTES``); ``head_dim`` is the wider of Dqk and Dv.

        Square tiles of the largest power of two <= 64 rows whose (rows, head_dim) operand tile
        takes at most :data:`MAX_TILE_BYTES` (bf16 / f16: 64 rows up to head_dim 128, 32 at 256;
        float32: 64 rows up to 64, 32 at 128, 16 at 256), never larger than the power-of-two
        rounded ``max_seq_len`` (a short batch does not compute mostly masked tiles); 4 warps;
        two pipelining stages in the forward kernel, one in the backward kernels (they stage more
        operand tiles).

        Shared memory of these configs (Dqk = Dv = head_dim, with both rab tables), from the Triton
        IR of the kernels compiled for sm_86 with the ``triton`` package (``bench/_smem.py``'s
        method; triton 3.6.0 on the Triton IR of jax 0.10.2, on a CPU machine), in bytes per block
        as fwd / dq / dkv; the A10G budget is 101,376 B:

        ==============  =========================  ===========================
        head_dim        bf16 / f16                 float32
        ==============  =========================  ===========================
        16              6,400 / 8,192 / 16,384     28,928 / 28,672 / 32,768
        32              12,544 / 14,336 / 24,576   41,216 / 40,960 / 49,152
        64              24,832 / 26,624 / 40,960   65,792 / 65,536 / 81,920
        128             57,600 / 57,344 / 73,728   53,376 / 65,536 / 69,632
        256             51,328 / 65,536 / 67,584   50,240 / 65,536 / 66,560
        ==============  =========================  ===========================

        Without rab tables the forward figures are 128-256 B lower, the backward ones equal.
        """
        itemsize = jnp.dtype(dtype).itemsize
        block = 64
        while block > 16 and block * head_dim * itemsize > MAX_TILE_BYTES:
            block //= 2
        block = max(16, min(block, next_pow2(max(max_seq_len, 1))))
        return cls(block_q=block, block_k=block, num_warps=4, num_stages=1 if backward else 2)


__all__ = ["MAX_TILE_BYTES", "HstuAttentionConfig"]
