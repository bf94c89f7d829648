"""Tiling of the SKUT kernel (:mod:`pallas_kernels.skut.pallas_triton`)."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels._common import check_tiling, next_pow2

MAX_RESIDENT_TILES = 8
"""Longest sequence, in tiles, that the resident (whole sequence on chip) variant unrolls."""


@dataclasses.dataclass(frozen=True)
class SkutConfig:
    """Tiling of the SKUT kernel.

    Attributes:
      block_q: query rows per tile (power of two, >= 16).
      block_k: key rows per tile (power of two, >= 16); the resident variant uses ``block_q``.
      num_warps: warps per program (Triton).
      num_stages: software-pipelining stages of the loops (Triton).
      resident: keep the whole sequence on chip (unrolled tiles; needs ``ceil(L / block_q) <=
        MAX_RESIDENT_TILES``) instead of streaming query tiles with a ping-pong buffer. Slower than
        streaming on an H100 (register spills); float32 with 64-row tiles is refused (its Triton
        compile did not finish within 5 minutes there); never chosen by :meth:`default`.
    """

    block_q: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 1
    resident: bool = False

    def __post_init__(self) -> None:
        check_tiling(self, ("block_q", "block_k"))

    def check(self, length: int, dtype) -> None:
        """Raise if this config cannot run sequences of ``length`` in ``dtype``."""
        tiles = -(-length // self.block_q)
        if self.resident and tiles > MAX_RESIDENT_TILES:
            raise ValueError(f"SkutConfig.resident: L={length} is {tiles} tiles of {self.block_q} "
                             f"rows, more than MAX_RESIDENT_TILES={MAX_RESIDENT_TILES}")
        if self.resident and self.block_q >= 64 and jnp.dtype(dtype) == jnp.float32:
            raise ValueError("SkutConfig.resident: float32 with 64-row tiles is not supported (its "
                             "Triton compile did not finish in 5 minutes on an H100); use "
                             "block_q <= 32 or the streaming variant")

    @classmethod
    def default(cls, length: int, d_model: int = 64, dtype=jnp.bfloat16) -> "SkutConfig":
        """Heuristic per shape (tuned on an H100 with ``bench/skut.py --tune``).

        64-row tiles (16 for float32: its operand tiles are twice as large, and 32-row float32 tiles
        take 106,496 B of shared memory, over the A10G budget), never larger than the
        power-of-two rounded sequence, so L = 7 does not compute a 64-row tile that is mostly
        masked; 4 warps, no pipelining; the streaming variant. On an H100 at B = 256 (bf16) the
        streaming variant with 64-row tiles and 4 warps was the fastest of 18 configurations at
        L = 192 (86 us; the resident variant 188 us: its unrolled tiles spill registers) and within
        noise of the best at L = 64 (``bench/results/skut_tune_log.txt``).
        """
        del d_model
        cap = 16 if jnp.dtype(dtype) == jnp.float32 else 64
        block = max(16, min(cap, next_pow2(max(length, 1))))
        return cls(block_q=block, block_k=block, num_warps=4, num_stages=1, resident=False)
