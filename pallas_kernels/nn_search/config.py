"""Tiling and limits of the NN-search kernel (:mod:`pallas_kernels.nn_search.pallas_triton`)."""
from __future__ import annotations

import dataclasses
from typing import Literal, Tuple

from pallas_kernels._common import check_tiling, is_pow2, next_pow2

MAX_K = 128
"""Largest K the kernel supports."""


@dataclasses.dataclass(frozen=True)
class NNSearchConfig:
    """Tiling of the NN-search kernel.

    Attributes:
      block_c: candidates per program, all from one request (power of two, >= 16).
      block_t: sequence tokens per tile (power of two, >= 16).
      num_warps: warps per program (Triton).
      num_stages: software-pipelining stages of the token loops (Triton).
      radix_bits: bits per radix-select digit over bins and survivors (1, 2 or 4; each digit
        costs ``2**bits - 1`` counts, packed into fewer cross-thread reductions; one bit per
        step measured fastest on an H100).
      scores: how tiles are scored: ``"bf16x3"`` on tensor cores (the candidate split into three
        bfloat16 pieces; int8 codes are exact in bfloat16) or ``"fma"`` (float32 FMA).
      bins: W, the bins of the step-1 bound (0: ``max(2 * next_pow2(K), block_t)``); a power of
        two >= ``block_t`` and >= K (fewer bins than K bound nothing).
      survivors: capacity of the per-row survivor buffer (0: ``max(2 * next_pow2(K), 64)``; else a
        power of two >= 16). A block with a row over it takes the exact fallback (step 5).
      unroll: tiles per trip of the collect loop (independent tiles in flight; >= 1).
    """

    block_c: int = 16
    block_t: int = 128
    num_warps: int = 4
    num_stages: int = 2
    radix_bits: int = 1
    scores: Literal["bf16x3", "fma"] = "bf16x3"
    bins: int = 0
    survivors: int = 0
    unroll: int = 2

    def __post_init__(self) -> None:
        check_tiling(self, ("block_c", "block_t"))
        if self.survivors and (not is_pow2(self.survivors) or self.survivors < 16):
            raise ValueError(f"NNSearchConfig.survivors: expected 0 or a power of two >= 16, got "
                             f"{self.survivors}")
        if self.radix_bits not in (1, 2, 4):
            raise ValueError(f"NNSearchConfig.radix_bits: expected 1, 2 or 4, got {self.radix_bits}")
        if self.scores not in ("bf16x3", "fma"):
            raise ValueError(f"NNSearchConfig.scores: expected 'bf16x3' or 'fma', got "
                             f"{self.scores!r}")
        if self.unroll < 1:
            raise ValueError(f"NNSearchConfig.unroll: expected >= 1, got {self.unroll}")
        if self.bins and (not is_pow2(self.bins) or self.bins < self.block_t):
            raise ValueError(f"NNSearchConfig.bins: expected 0 or a power of two >= block_t "
                             f"({self.block_t}), got {self.bins}")

    def resolve(self, k: int) -> Tuple[int, int]:
        """(bins, survivors) for top-``k``: defaults filled in, bins checked against ``k``."""
        k_pad = next_pow2(k)
        bins = self.bins or max(2 * k_pad, self.block_t)
        if bins < k:
            raise ValueError(f"NNSearchConfig.bins: {bins} bins cannot bound the top {k}; "
                             f"use at least {next_pow2(k)}")
        return bins, self.survivors or max(2 * k_pad, 64)
