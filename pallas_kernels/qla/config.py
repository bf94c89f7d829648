"""Tiling of the QLA kernels (:mod:`pallas_kernels.qla.pallas_triton`)."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels._common import check_tiling

MAX_TILE_BYTES = 16 * 1024
"""Largest matrix-product operand tile (rows x width, or D x block_dv) :meth:`QlaConfig.default`
picks."""

MAX_SPLIT = 64
"""Most programs one sequence's state reduction is split over (see ``QlaConfig.split_rows``)."""


@dataclasses.dataclass(frozen=True)
class QlaConfig:
    """Tiling of the QLA kernels (one config serves the forward and backward kernels of a call).

    Attributes:
      block_rows: rows per tile (power of two, >= 16). Full case: rows of each state-reduction step
        and of each output / backward program; causal case: rows loaded per step of the in-order
        walk (then processed one at a time).
      block_dv: columns of v (and of the (D, Dv) state) per program (power of two, >= 16; capped
        at Dv). Full forward and causal kernels put them on a grid axis; the full backward row
        kernel loops over them.
      split_rows: the full case's state reduction gives each sequence
        ``clamp(next_pow2(T / (B * split_rows)), 1, MAX_SPLIT)`` programs (partial states summed
        by XLA), so a batch of few long sequences still fills the GPU. Any int >= 1.
      num_warps: warps per program (Triton).
      num_stages: software-pipelining stages of the row-tile loops (Triton).
    """

    block_rows: int = 64
    block_dv: int = 64
    split_rows: int = 4096
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        check_tiling(self, ("block_rows", "block_dv"))
        if not isinstance(self.split_rows, int) or self.split_rows < 1:
            raise ValueError(f"QlaConfig.split_rows: expected an int >= 1, got {self.split_rows!r}")

    @classmethod
    def default(cls, head_dim: int = 64, value_dim: int = 64, dtype=jnp.bfloat16,
                causal: bool = False) -> "QlaConfig":
        """Heuristic per shape, within the A10G shared-memory budget
        (``pallas_kernels._common.A10G_SMEM_BYTES`` = 101,376 B per block); ``head_dim`` is D
        (q, k), ``value_dim`` Dv.

        Full case: ``block_rows`` the largest power of two <= 64 whose (rows, max(D, Dv)) operand
        tile takes at most :data:`MAX_TILE_BYTES`; ``block_dv`` the largest power of two <= Dv
        whose (D, block_dv) state tile takes at most that; 4 warps, 2 stages (1 in the backward
        row kernel: ``pallas_triton.kernel_num_stages``).
        Causal case: 16-row tiles (each row is picked out of the tile by a masked sum, which costs
        ``block_rows`` times the row's width), ``block_dv`` = 16 (the per-row work is elementwise
        on a (D, block_dv) float32 state held in registers: more, narrower programs), 8 warps
        from D = 128 on, 1 stage.

        Estimate (why these fit by construction): Triton stages each matrix product's operands
        through shared memory; the elementwise work and reductions need at most a few KiB of
        scratch. Every operand tile -- (block_rows, D), (block_rows, block_dv) or
        (D, block_dv) -- is <= 16 KiB by the rules above. The state kernel has 2 operands per
        step, double-buffered: <= 64 KiB; the output kernel 2 (the state tile is loaded inside the
        sequence loop, so also staged): <= 64 KiB; the backward row kernel 6 (``dO P^T``,
        ``v dM^T``, ``phi(k) dM``), single stage: <= 96 KiB = 98,304 B < 101,376 B. The causal
        kernels have one product (the seed rows') plus reduction scratch: <= 2 x 16 KiB.

        Measured: the Triton IR of each kernel (jax 0.10.2) compiled for sm_86 with the
        ``triton`` package 3.6.0 (``bench/_smem.py``'s method, on a CPU machine; the same
        programs compile for sm_90), D = Dv = head_dim, bytes per block, as state / output /
        backward state / backward rows (full) and forward / backward (causal):

        ========  =================================  =================================
        head_dim  full, bf16 / f16                   full, float32
        ========  =================================  =================================
        16        4,096 / 2,560 / 4,096 / 7,168      12,288 / 5,120 / 12,288 / 14,336
        32        8,192 / 6,144 / 8,192 / 16,384     24,576 / 12,288 / 24,576 / 32,768
        64        16,384 / 16,384 / 16,384 / 34,816  49,152 / 32,768 / 49,152 / 81,920
        128       24,576 / 32,768 / 24,576 / 51,200  36,864 / 32,768 / 36,864 / 57,344
        256       18,432 / 32,768 / 18,432 / 38,912  33,792 / 32,768 / 33,792 / 51,200
        ========  =================================  =================================

        Causal, any dtype: 2,048 / 3,072 (D = 16), 4,096 / 5,120 (32), 8,192 / 9,216 (64),
        16,384 / 17,408 (128), 32,768 / 33,792 (256). Unequal widths measured too (D, Dv =
        16/256, 256/16, 64/128, 128/64, 32/512, all three dtypes): at most 65,536 B. The largest
        default figure is 81,920 B (float32, D = Dv = 64, backward rows).
        """
        itemsize = jnp.dtype(dtype).itemsize
        width = max(head_dim, value_dim)
        if causal:
            return cls(block_rows=16, block_dv=16, num_warps=8 if head_dim >= 128 else 4,
                       num_stages=1)
        rows = 64
        while rows > 16 and rows * width * itemsize > MAX_TILE_BYTES:
            rows //= 2
        block_dv = value_dim if value_dim >= 16 else 16
        while block_dv > 16 and head_dim * block_dv * itemsize > MAX_TILE_BYTES:
            block_dv //= 2
        return cls(block_rows=rows, block_dv=block_dv, num_warps=4, num_stages=2)


__all__ = ["MAX_SPLIT", "MAX_TILE_BYTES", "QlaConfig"]
