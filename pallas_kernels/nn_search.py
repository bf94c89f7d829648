"""Fused, broadcast-free int8 NN search in Pallas (Triton backend) kernels (paper §3.4.2).

Computes exactly :func:`pallas_kernels.nn_search_reference.nn_search_reference` (SPEC §2): for every
candidate, the K tokens of its request's sequence with the highest cosine score, ties to the lower
index, padding never selected, returned in chronological order with ``-1`` / ``-inf`` padding.

Inputs are de-duplicated: one copy of each request's int8 sequence (jagged, ``offsets``) and a
candidate -> request index, so no sequence is ever broadcast per candidate. The kernels read the
int8 codes directly; dequantization, L2 normalization and scoring happen in registers, and neither
the dequantized sequence nor the candidates x L score matrix is written to memory.

Work decomposition
------------------
Candidates are grouped by request (a stable argsort of ``cand_to_req``) into blocks of
``block_c`` rows that all belong to one request (the grid has the static upper bound
``ceil(N / block_c) + U`` blocks; surplus programs find an empty block and exit at once). The
token passes walk the request's tokens in tiles of ``block_t``; the trip count is the request's own
length, so short sequences cost little. ``NNSearchConfig.splits`` > 1 splits the tiles into chunks
handled by separate programs (more parallelism; measured slower on an H100 at L = 10k, so the
default is one chunk).

Scores
------
The cosine of a token with int8 codes q is ``(c . q) / |q|`` for the normalized candidate c: the
int8 scale cancels and ``|q|^2`` is an exact integer sum. By default the dot products run on tensor
cores: c is split into three bfloat16 pieces (24 mantissa bits between them), int8 codes are exact
in bfloat16 and bfloat16 products are exact in float32, so the score is float32-accurate; only the
accumulation order differs from a float32 FMA loop (``scores="fma"``, also shipped). A token's
score comes from the same instructions in every pass and position, so duplicate tokens tie exactly
and a bound computed in one pass is exact in the next.

In-kernel top-K without sort (Triton has no sort / top_k lowering)
-----------------------------------------------------------------
Scores are mapped to int32 keys whose signed order is the float order (``bits`` for s >= 0,
``bits ^ 0x7fffffff`` for s < 0; -0.0 is first turned into +0.0), so "top K by score, ties to the
lower index" is "top K by (key, -index)". Per candidate row, four kernels:

1. **Bound** (``nn_search_bound``, one pass over the tokens). Token ``i`` of tile ``t`` falls in
   bin ``(t mod G) * block_t + (i mod block_t)`` of ``W = G * block_t >= K`` bins (W = 2K by
   default). The per-bin running maximum is an elementwise ``max`` into G tile-shaped
   accumulators: no cross-thread reduction inside the loop.
2. **Threshold** (``nn_search_threshold``). ``T_lo`` = the K-th largest bin maximum, resolved by
   radix select (below) to its top 16 key bits only (a lower bound within ~1% of it, at half the
   cost). K distinct tokens score ``>= T_lo``; on random data ~1.2 K tokens do.
3. **Collect** (``nn_search_collect``, one pass). Tokens with ``key >= T_lo`` are appended, in
   index order, to a small per-row buffer in global memory (``survivors`` entries of key and index;
   it stays in L1/L2); slots come from a running count plus a prefix sum (``cumsum``) within the
   tile, written with a masked scatter store.
4. **Select** (``nn_search_select``, registers). The exact K-th largest key T* among the survivors
   is found by **radix select**: from the top, one digit of ``radix_bits`` bits at a time, count
   the keys ``>= prefix + d * 2**shift`` for each digit d and extend the prefix by the largest digit
   whose count is still >= K (one bit per step: 32 counts in all, each a cross-thread reduction;
   4-bit digits need 120). The count above the chosen digit gives #(key > T*). The output is
   ``key > T*`` plus the first ``K - #(key > T*)`` survivors with ``key == T*`` (they are in index
   order, so exact ties go to the lower index, as in ``lax.top_k``), each written to slot "running
   count + prefix sum": chronological order falls out of the scan order, no sort needed. Slots past
   the number of selected tokens get ``-1`` / ``-inf``.
5. **Fallback** (``nn_search_fallback``). The select kernel flags a block if one of its rows has
   more survivors than the buffer holds (many equal or near-equal scores: a zero candidate, one
   token repeated hundreds of times). The fallback kernel runs the radix select (4-bit digits: 8
   passes) over the whole sequence of flagged blocks, re-scoring every token on each pass, then a
   selection pass, and overwrites those rows in place (aliased outputs). Exact, several times
   slower, rare. It is always launched; unflagged blocks exit at once (cheaper than a
   ``lax.cond``, whose predicate XLA reads on the host).

A row with fewer than K valid tokens never finds a digit (every count < K), keeps T* = INT32_MIN,
which no valid key equals, and selects all its valid tokens.

Global-memory traffic per block: its request's int8 sequence twice (32 B per token per pass, from
L2 for all but the first block of a request), the bins, the survivor buffer and the outputs; never a
score matrix.

Numerics and the near-tie band: against the float64 brute force, selections agree except between
tokens whose scores are within float32 rounding (~1e-6) of the K-th score.

Measured (H100, jax 0.11.2, ``python bench/nn_search.py``): 0.57 ms at L_LL = 10k, 256 candidates
per request, 4096 candidates, K = 96; 6.3x the best de-duplicated XLA pipeline and 7.3x the
broadcast one (``bench/results/nn_search.{json,md,png}``).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Literal, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import check_tiling, default_interpret, is_pow2, next_pow2
from pallas_kernels.int8_codec import QUANT_SCALE
from pallas_kernels.nn_search_reference import PAD_INDEX, nn_search_reference

MAX_K = 128
"""Largest K the kernel supports."""
_BOUND_BITS = 16
"""Key bits T_lo resolves (sign, exponent, 7 mantissa bits): a bound within ~1% of the K-th bin
maximum at half the cost of an exact one."""
_INT32_MIN = -(2 ** 31)
_NORM_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class NNSearchConfig:
    """Tiling of the NN-search kernels.

    Attributes:
      block_c: candidates per program, all from one request (power of two, >= 16).
      block_t: sequence tokens per tile (power of two, >= 16).
      num_warps: warps per program (Triton).
      num_stages: software-pipelining stages of the token loops (Triton).
      radix_bits: bits per radix-select digit over bins and survivors (1, 2 or 4; each digit
        costs ``2**bits - 1`` cross-thread counts, one bit per step the fewest in all).
      scores: how tiles are scored: ``"bf16x3"`` on tensor cores (the candidate split into three
        bfloat16 pieces; int8 codes are exact in bfloat16) or ``"fma"`` (float32 FMA).
      splits: S, chunks of consecutive tiles each request's sequence is split into for the two
        token passes (one program per block and chunk: enough programs to hide latency).
      bins: W, the bins of the pass-1 bound (0: ``max(2 * next_pow2(K), S * block_t)``); a power
        of two >= ``S * block_t`` and >= K (fewer bins than K bound nothing).
      survivors: capacity of the per-row survivor buffer (0: ``max(2 * next_pow2(K), 64)``; else a
        power of two >= 16). A block with a row over it is redone by the exact fallback kernel.
    """

    block_c: int = 16
    block_t: int = 64
    num_warps: int = 4
    num_stages: int = 1
    radix_bits: int = 1
    scores: Literal["bf16x3", "fma"] = "bf16x3"
    splits: int = 1
    bins: int = 0
    survivors: int = 0

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
        if not is_pow2(self.splits):
            raise ValueError(f"NNSearchConfig.splits: expected a power of two, got {self.splits}")
        least = self.splits * self.block_t
        if self.bins and (not is_pow2(self.bins) or self.bins < least):
            raise ValueError(f"NNSearchConfig.bins: expected 0 or a power of two >= splits * "
                             f"block_t ({least}), got {self.bins}")

    def resolve(self, k: int) -> Tuple[int, int]:
        """(bins, survivors) for top-``k``: defaults filled in, bins checked against ``k``."""
        k_pad = next_pow2(k)
        bins = self.bins or max(2 * k_pad, self.splits * self.block_t)
        if bins < k:
            raise ValueError(f"NNSearchConfig.bins: {bins} bins cannot bound the top {k}; "
                             f"use at least {next_pow2(k)}")
        return bins, self.survivors or max(2 * k_pad, 64)


# ----------------------------------------------------------------------------- in-kernel helpers


def _wrap_int32(value: int) -> jax.Array:
    return jnp.int32(((value + 2 ** 31) % 2 ** 32) - 2 ** 31)


def _split_bf16(c_norm) -> Tuple[jax.Array, ...]:
    """c = c1 + c2 + c3 in bfloat16 pieces (24 bits of mantissa between them: float32 accuracy)."""
    c1 = c_norm.astype(jnp.bfloat16)
    r1 = c_norm - c1.astype(jnp.float32)
    c2 = r1.astype(jnp.bfloat16)
    c3 = (r1 - c2.astype(jnp.float32)).astype(jnp.bfloat16)
    return c1, c2, c3


def _score_keys(cand, seq_ref, start, t0, block_t: int, length, scale: float):
    """Scores (block_c, block_t) of the candidates against tokens ``[t0, t0 + block_t)`` of the
    sequence starting at row ``start`` of ``seq_ref``, and their order-preserving int32 keys.

    ``cand`` is the L2-normalized candidates as float32 (IEEE float32 FMA products) or as the
    three bfloat16 pieces of :func:`_split_bf16` (tensor cores). The cosine of a token with codes
    q is ``(c . q) / |q|``: the int8 scale cancels, and ``|q|^2`` is an exact integer sum. int8
    codes are exact in bfloat16 and a product of two bfloat16 numbers is exact in float32, so the
    three-piece tensor-core score differs from the float32 one only in float32 accumulation order.
    """
    del scale                                       # cancels in the cosine
    pos = t0 + jnp.arange(block_t)
    valid = pos < length
    codes = plgpu.load(seq_ref.at[pl.ds(start + t0, block_t), :], mask=valid[:, None], other=0)
    q = codes.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(q * q, axis=1))
    inv = jnp.where(norm > 0, 1.0 / jnp.maximum(norm, 1.0), 0.0)
    if isinstance(cand, tuple):
        qt = codes.astype(jnp.bfloat16).T
        s = jnp.dot(cand[2], qt, preferred_element_type=jnp.float32)
        s = s + jnp.dot(cand[1], qt, preferred_element_type=jnp.float32)
        s = s + jnp.dot(cand[0], qt, preferred_element_type=jnp.float32)
    else:
        s = jnp.dot(cand, q.T, preferred_element_type=jnp.float32,
                    precision=lax.Precision.HIGHEST)
    s = s * inv[None, :] + 0.0                      # -0.0 -> +0.0: equal floats, equal keys
    bits = lax.bitcast_convert_type(s, jnp.int32)
    keys = jnp.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return s, keys, pos, valid


def _keys_to_scores(keys):
    bits = jnp.where(keys >= 0, keys, keys ^ 0x7FFFFFFF)
    return lax.bitcast_convert_type(bits, jnp.float32)


def _radix_kth(count_ge, k: int, block_c: int, bits: int, stop_bit: int = 0):
    """K-th largest key per row by radix digits of ``bits`` bits, from the top (module docstring).

    ``count_ge(thresholds)`` returns, for a list of (block_c,) int32 thresholds, the per-row counts
    of valid keys >= each. Returns (T, #keys >= T + 2**stop_bit) where T is the K-th largest key
    with its bits below ``stop_bit`` cleared: exact for ``stop_bit=0``, otherwise a lower bound
    that still has >= K keys at or above it. T = INT32_MIN where fewer than K keys exist. Each digit
    costs ``2**bits - 1`` counts (cross-thread reductions): one bit per step needs the fewest.
    """
    prefix = jnp.full((block_c,), _INT32_MIN, jnp.int32)
    count_above = jnp.zeros((block_c,), jnp.int32)    # #keys >= prefix + 2 ** (shift + bits)
    for shift in range(32 - bits, stop_bit - 1, -bits):
        # int32 wrap-around is intended: prefix + d * 2**shift always lands inside int32
        thresholds = [prefix + _wrap_int32(d << shift) for d in range(1, 1 << bits)]
        counts = list(count_ge(thresholds)) + [count_above]
        digit = jnp.zeros((block_c,), jnp.int32)
        next_above = counts[0]
        for d in range(1, 1 << bits):
            take = counts[d - 1] >= k
            digit = jnp.where(take, d, digit)
            next_above = jnp.where(take, counts[d], next_above)
        prefix = prefix + (digit << shift)
        count_above = next_above
    return prefix, count_above


def _count_ge(keys, valid, thresholds):
    return tuple(jnp.sum((valid & (keys >= th[:, None])).astype(jnp.int32), axis=1)
                 for th in thresholds)


def _select(keys, valid, kth, need_ties, written, ties_seen):
    """Selected entries of a (rows, W) block in index order: key > T*, then ties at T* in order.

    Returns (selected, output slot, written', ties_seen')."""
    gt = valid & (keys > kth[:, None])
    eq = (valid & (keys == kth[:, None])).astype(jnp.int32)
    tie_rank = ties_seen[:, None] + jnp.cumsum(eq, axis=1)
    sel = gt | ((eq > 0) & (tie_rank <= need_ties[:, None]))
    sel_i = sel.astype(jnp.int32)
    slot = written[:, None] + jnp.cumsum(sel_i, axis=1) - 1
    return sel, slot, written + jnp.sum(sel_i, axis=1), ties_seen + jnp.sum(eq, axis=1)


class _Block(NamedTuple):
    """What program ``p`` knows about its block of candidates (see ``_block_table``)."""

    start: jax.Array          # first row of the request's tokens in the flat sequence
    length: jax.Array         # the request's length (0 for surplus programs)
    num_tiles: jax.Array
    rows: jax.Array           # (block_c,) 0..block_c-1
    row_ok: jax.Array         # (block_c,) rows that hold a candidate
    cand: object              # normalized candidates: (block_c, D) f32 or 3 bf16 pieces
    out_rows: jax.Array       # (block_c, 1) output row of each candidate (or a spare row)
    trash: bool               # interpret mode: masked-off scatter lanes go to spare targets


def _load_block(p, block_req_ref, block_row_ref, block_cnt_ref, offsets_ref, lengths_ref,
                perm_ref, cand_ref, n_out: int, *, block_c: int, block_t: int, trash: bool,
                scores: str = "fma") -> _Block:
    req = block_req_ref[p]
    row0 = block_row_ref[p]
    count = block_cnt_ref[p]                        # 0 for surplus programs
    has_req = count > 0
    safe_req = jnp.where(has_req, req, 0)
    start = offsets_ref[safe_req]
    length = jnp.where(has_req, lengths_ref[safe_req], 0)
    rows = jnp.arange(block_c)
    row_ok = rows < count
    cand_rows = plgpu.load(perm_ref.at[pl.ds(row0, block_c)], mask=row_ok, other=0)
    d = cand_ref.shape[1]
    c = plgpu.load(cand_ref.at[cand_rows[:, None], jnp.arange(d)[None, :]], mask=row_ok[:, None],
                   other=0).astype(jnp.float32)
    c_norm = c / jnp.maximum(jnp.sqrt(jnp.sum(c * c, axis=1, keepdims=True)), _NORM_EPS)
    # Compiled, masked-off scatter lanes store nothing. Interpret mode emulates a masked scatter by
    # writing the old value back, so there every masked-off lane gets its own spare target (rows
    # past N, columns past the used ones) that the wrapper slices away.
    out_rows = jnp.where(row_ok, cand_rows, n_out + rows if trash else 0)[:, None]
    cand = _split_bf16(c_norm) if scores == "bf16x3" else c_norm
    return _Block(start, length, lax.div(length + block_t - 1, block_t), rows, row_ok, cand,
                  out_rows, trash)


def _spare(blk: _Block, cols_used: int, width: int):
    return (cols_used + jnp.arange(width))[None, :] if blk.trash else 0


def _store_selected(blk: _Block, idx_ref, score_ref, k: int, sel, slot, idx_vals, score_vals):
    slot = jnp.where(sel, slot, _spare(blk, k, sel.shape[1]))
    plgpu.store(idx_ref.at[blk.out_rows, slot], idx_vals, mask=sel)
    plgpu.store(score_ref.at[blk.out_rows, slot], score_vals, mask=sel)


def _store_padding(blk: _Block, idx_ref, score_ref, k: int, written, live):
    """-1 / -inf in slots [written, k) of the rows where ``live``: disjoint from the selected slots,
    so no ordering against their stores is needed."""
    k_pad = next_pow2(k)
    cols = jnp.arange(k_pad)[None, :]
    pad = (live & blk.row_ok)[:, None] & (cols >= written[:, None]) & (cols < k)
    if blk.trash:
        cols_t = jnp.where(pad, cols, k + cols)
    else:
        cols_t = jnp.broadcast_to(jnp.where(cols < k, cols, 0), pad.shape)
    plgpu.store(idx_ref.at[blk.out_rows, cols_t], jnp.full(pad.shape, PAD_INDEX, jnp.int32),
                mask=pad)
    plgpu.store(score_ref.at[blk.out_rows, cols_t], jnp.full(pad.shape, -jnp.inf, jnp.float32),
                mask=pad)


def _barrier(blk: _Block) -> None:
    if not blk.trash:          # interpret mode runs one program at a time: nothing to order
        plgpu.debug_barrier()


# -------------------------------------------------------------------------------------- kernels
#
# The main path is three kernels. ``bound`` and ``collect`` run one program per (block, chunk):
# the request's tiles are split into ``splits`` chunks of consecutive tiles so that there are
# enough programs to hide memory and reduction latency; ``select`` runs one program per block.


def _chunk(blk: _Block, s, splits: int, block_t: int):
    """Tiles [t0, t0 + count) of chunk ``s`` and the token limit (exclusive) that masks them."""
    per = lax.div(blk.num_tiles + splits - 1, splits)
    t0 = s * per
    count = jnp.clip(blk.num_tiles - t0, 0, per)
    return t0, count, jnp.minimum(blk.length, (t0 + per) * block_t)


def _bound_kernel(block_req_ref, block_row_ref, block_cnt_ref, offsets_ref, lengths_ref, perm_ref,
                  seq_ref, cand_ref, bins_ref, *, chunk_bins: int, splits: int, block_c: int,
                  block_t: int, scale: float, trash: bool, scores: str):
    """Step 1 for chunk ``s``: the maxima of its ``chunk_bins`` bins (columns
    ``[s * chunk_bins, (s + 1) * chunk_bins)`` of the block's rows of ``bins_ref``)."""
    p, s = pl.program_id(0), pl.program_id(1)
    blk = _load_block(p, block_req_ref, block_row_ref, block_cnt_ref, offsets_ref, lengths_ref,
                      perm_ref, cand_ref, 0, block_c=block_c, block_t=block_t, trash=trash,
                      scores=scores)
    t0, count, limit = _chunk(blk, s, splits, block_t)
    groups = chunk_bins // block_t

    # G tile-shaped accumulators, the loop unrolled by G so that the chunk's i-th tile always
    # lands in accumulator i mod G; tiles past the chunk are all invalid (INT32_MIN).
    def bin_max(i, ms):
        out = []
        for j, mj in enumerate(ms):
            t = t0 + i * groups + j
            _, keys, _, valid = _score_keys(blk.cand, seq_ref, blk.start, t * block_t, block_t,
                                            limit, scale)
            out.append(jnp.maximum(mj, jnp.where(valid[None, :], keys, _INT32_MIN)))
        return tuple(out)

    ms = lax.fori_loop(0, lax.div(count + groups - 1, groups), bin_max,
                       tuple(jnp.full((block_c, block_t), _INT32_MIN, jnp.int32)
                             for _ in range(groups)))
    rows = (p * block_c + blk.rows)[:, None]
    for j, mj in enumerate(ms):
        cols = s * chunk_bins + j * block_t + jnp.arange(block_t)
        plgpu.store(bins_ref.at[rows, cols[None, :]], mj)


def _threshold_kernel(bins_ref, t_lo_ref, *, k: int, block_c: int, radix_bits: int):
    """T_lo per row: the K-th largest of its W bin maxima (>= K tokens score >= T_lo)."""
    p = pl.program_id(0)
    rows = p * block_c + jnp.arange(block_c)
    m = plgpu.load(bins_ref.at[rows[:, None], jnp.arange(bins_ref.shape[1])[None, :]])
    t_lo, _ = _radix_kth(lambda th: _count_ge(m, m > _INT32_MIN, th), k, block_c, radix_bits,
                         stop_bit=32 - _BOUND_BITS)
    plgpu.store(t_lo_ref.at[rows], t_lo)


def _collect_kernel(block_req_ref, block_row_ref, block_cnt_ref, offsets_ref, lengths_ref,
                    perm_ref, seq_ref, cand_ref, t_lo_ref, key_ref, idx_ref, count_ref, *,
                    capacity: int, splits: int, block_c: int, block_t: int, scale: float,
                    trash: bool, scores: str):
    """Step 2 for chunk ``s``: its tokens with key >= T_lo, in index order, into columns
    ``[s * capacity, (s + 1) * capacity)`` of the row's buffers; their number into
    ``count_ref[row, s]`` (it may exceed ``capacity``: only the first ``capacity`` are stored)."""
    p, s = pl.program_id(0), pl.program_id(1)
    blk = _load_block(p, block_req_ref, block_row_ref, block_cnt_ref, offsets_ref, lengths_ref,
                      perm_ref, cand_ref, 0, block_c=block_c, block_t=block_t, trash=trash,
                      scores=scores)
    t0, count, limit = _chunk(blk, s, splits, block_t)
    rows = p * block_c + blk.rows
    t_lo = plgpu.load(t_lo_ref.at[rows])
    base = s * capacity

    def collect(i, written):
        _, keys, pos, valid = _score_keys(blk.cand, seq_ref, blk.start, (t0 + i) * block_t,
                                          block_t, limit, scale)
        keep = valid[None, :] & (keys >= t_lo[:, None]) & blk.row_ok[:, None]
        keep_i = keep.astype(jnp.int32)
        slot = written[:, None] + jnp.cumsum(keep_i, axis=1) - 1
        fits = keep & (slot < capacity)
        slot = base + jnp.where(fits, slot, _spare(blk, (splits - s) * capacity, block_t))
        plgpu.store(key_ref.at[rows[:, None], slot], keys, mask=fits)
        plgpu.store(idx_ref.at[rows[:, None], slot],
                    jnp.broadcast_to(pos[None, :], keys.shape).astype(jnp.int32), mask=fits)
        return written + jnp.sum(keep_i, axis=1)

    found = lax.fori_loop(0, count, collect, jnp.zeros((block_c,), jnp.int32))
    plgpu.store(count_ref.at[rows[:, None], jnp.full((1, 1), s)], found[:, None])


def _select_kernel(block_req_ref, block_row_ref, block_cnt_ref, offsets_ref, lengths_ref,
                   perm_ref, seq_ref, cand_ref, count_ref, key_in_ref, sidx_in_ref, idx_ref,
                   score_ref, overflow_ref, key_ref, sidx_ref, *, k: int, capacity: int,
                   splits: int, block_c: int, block_t: int, trash: bool, scores: str,
                   radix_bits: int):
    """Step 3: the chunks' survivors compacted (chunk order = index order) into the first
    ``capacity`` columns, the exact K-th among them, the selection in index order. Flags the block
    when a row has more survivors than ``capacity`` (its rows are then left to the fallback).
    ``key_ref``/``sidx_ref`` alias ``key_in_ref``/``sidx_in_ref``."""
    del seq_ref, key_in_ref, sidx_in_ref
    p = pl.program_id(0)
    n_out = idx_ref.shape[0] - (block_c if trash else 0)
    blk = _load_block(p, block_req_ref, block_row_ref, block_cnt_ref, offsets_ref, lengths_ref,
                      perm_ref, cand_ref, n_out, block_c=block_c, block_t=block_t, trash=trash,
                      scores=scores)
    rows = (p * block_c + blk.rows)[:, None]

    def found(s):                                   # (block_c,) survivors of chunk s
        n = plgpu.load(count_ref.at[rows, jnp.full((1, 1), s)]).reshape(block_c)
        return jnp.where(blk.row_ok, n, 0)

    per_chunk = [found(s) for s in range(splits)]
    total = functools.reduce(jnp.add, per_chunk)
    overflow = jnp.max(total) > capacity
    plgpu.store(overflow_ref.at[pl.ds(p, 1)], jnp.broadcast_to(overflow.astype(jnp.int32), (1,)))
    cols = jnp.arange(capacity)[None, :]
    # Compact in place: chunk s moves to columns [prefix_s, prefix_s + found_s) of chunk 0's
    # region. Those lie past chunk 0's own survivors and outside every other region, so no move
    # overwrites data still to be read.
    prefix = per_chunk[0]
    for s in range(1, splits):
        move = (cols < per_chunk[s][:, None]) & jnp.logical_not(overflow)
        src = s * capacity + cols
        keys = plgpu.load(key_ref.at[rows, src], mask=move, other=0)
        pos = plgpu.load(sidx_ref.at[rows, src], mask=move, other=0)
        dst = jnp.where(move, prefix[:, None] + cols, _spare(blk, splits * capacity, capacity))
        plgpu.store(key_ref.at[rows, dst], keys, mask=move)
        plgpu.store(sidx_ref.at[rows, dst], pos, mask=move)
        prefix = prefix + per_chunk[s]
    _barrier(blk)                # the moved survivors, stored by all warps, are read back below

    s_ok = (cols < total[:, None]) & blk.row_ok[:, None] & jnp.logical_not(overflow)
    s_keys = plgpu.load(key_ref.at[rows, cols], mask=s_ok, other=_INT32_MIN)
    s_idx = plgpu.load(sidx_ref.at[rows, cols], mask=s_ok, other=0)
    kth, above = _radix_kth(lambda th: _count_ge(s_keys, s_ok, th), k, block_c, radix_bits)
    zeros = jnp.zeros((block_c,), jnp.int32)
    sel, slot, written, _ = _select(s_keys, s_ok, kth, k - above, zeros, zeros)
    _store_selected(blk, idx_ref, score_ref, k, sel, slot, s_idx, _keys_to_scores(s_keys))
    _store_padding(blk, idx_ref, score_ref, k, written, jnp.logical_not(overflow))


def _fallback_kernel(block_req_ref, block_row_ref, block_cnt_ref, offsets_ref, lengths_ref,
                     perm_ref, seq_ref, cand_ref, overflow_ref, idx_in_ref, score_in_ref, idx_ref,
                     score_ref, *, k: int, block_c: int, block_t: int, scale: float, trash: bool,
                     scores: str):
    """Step 4: the radix select over the whole sequence for flagged blocks (others exit at once).
    ``idx_ref``/``score_ref`` alias ``idx_in_ref``/``score_in_ref``: unflagged rows keep the main
    kernel's results."""
    del idx_in_ref, score_in_ref
    p = pl.program_id(0)
    n_out = idx_ref.shape[0] - (block_c if trash else 0)
    blk = _load_block(p, block_req_ref, block_row_ref, block_cnt_ref, offsets_ref, lengths_ref,
                      perm_ref, cand_ref, n_out, block_c=block_c, block_t=block_t, trash=trash,
                      scores=scores)
    active = overflow_ref[p] > 0
    tiles = jnp.where(active, blk.num_tiles, 0)
    zeros = jnp.zeros((block_c,), jnp.int32)

    def tile(t):
        return _score_keys(blk.cand, seq_ref, blk.start, t * block_t, block_t, blk.length, scale)

    def count_all(thresholds):
        def body(t, counts):
            _, keys, _, valid = tile(t)
            got = _count_ge(keys, valid[None, :], thresholds)
            return tuple(a + b for a, b in zip(counts, got))
        return lax.fori_loop(0, tiles, body, tuple(zeros for _ in thresholds))

    kth, above = _radix_kth(count_all, k, block_c, 4)       # 4 bits: 8 passes over the tokens

    def select_tile(t, carry):
        written, ties = carry
        s, keys, pos, valid = tile(t)
        sel, slot, written, ties = _select(keys, valid[None, :] & blk.row_ok[:, None], kth,
                                           k - above, written, ties)
        _store_selected(blk, idx_ref, score_ref, k, sel, slot,
                        jnp.broadcast_to(pos[None, :], keys.shape).astype(jnp.int32), s)
        return written, ties

    written, _ = lax.fori_loop(0, tiles, select_tile, (zeros, zeros))
    _store_padding(blk, idx_ref, score_ref, k, written, jnp.broadcast_to(active, (block_c,)))


# -------------------------------------------------------------------------------------- wrapper


def _block_table(cand_to_req: jax.Array, num_req: int, block_c: int, num_blocks: int):
    """Blocks of <= block_c candidates of one request, in request order.

    Returns (perm, block_req, block_row, block_cnt): ``perm`` lists candidate ids grouped by request
    (stable); block ``b`` covers ``perm[block_row[b] : block_row[b] + block_cnt[b]]``, all of request
    ``block_req[b]``; surplus blocks have ``block_cnt == 0``.
    """
    perm = jnp.argsort(cand_to_req, stable=True).astype(jnp.int32)
    counts = jnp.bincount(cand_to_req, length=num_req).astype(jnp.int32)
    first = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts)[:-1].astype(jnp.int32)])
    blocks_per_req = (counts + block_c - 1) // block_c
    block_end = jnp.cumsum(blocks_per_req)
    b = jnp.arange(num_blocks, dtype=jnp.int32)
    # "compare_all": one fused elementwise kernel. The default "scan" method is a loop, and an
    # XLA GPU while loop syncs with the host on every trip (measured: ~0.1 ms per call, H100).
    req = jnp.searchsorted(block_end, b, side="right", method="compare_all").astype(jnp.int32)
    live = req < num_req
    req_c = jnp.minimum(req, num_req - 1)
    j = b - (block_end[req_c] - blocks_per_req[req_c])             # block number within the request
    row = first[req_c] + j * block_c
    cnt = jnp.clip(counts[req_c] - j * block_c, 0, block_c)
    return perm, jnp.where(live, req_c, 0), jnp.where(live, row, 0), jnp.where(live, cnt, 0)


def _validate(seq_q, offsets, lengths, cand, cand_to_req, k: int) -> None:
    if seq_q.ndim != 2 or seq_q.dtype != jnp.int8:
        raise ValueError(f"seq_q: expected (T, D) int8 codes, got {seq_q.shape} {seq_q.dtype}")
    d = seq_q.shape[1]
    if not is_pow2(d) or d < 16:
        raise ValueError(f"seq_q: embedding width must be a power of two >= 16, got {d}")
    if cand.ndim != 2 or cand.shape[1] != d or not jnp.issubdtype(cand.dtype, jnp.floating):
        raise ValueError(f"cand: expected (N, {d}) float, got {cand.shape} {cand.dtype}")
    if cand_to_req.shape != cand.shape[:1] or not jnp.issubdtype(cand_to_req.dtype, jnp.integer):
        raise ValueError(f"cand_to_req: expected ({cand.shape[0]},) int, got {cand_to_req.shape} "
                         f"{cand_to_req.dtype}")
    if offsets.ndim != 1 or lengths.shape != offsets.shape:
        raise ValueError(f"offsets/lengths: expected two (U,) arrays, got {offsets.shape} and "
                         f"{lengths.shape}")
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k: expected 1 <= k <= {MAX_K}, got {k}")


def _search(seq_q, offsets, lengths, cand, cand_to_req, *, k: int, scale: float,
            config: NNSearchConfig, interpret: bool, phases: int = 3):
    """The jitted body of :func:`nn_search_jagged`; ``phases`` < 3 stops the main kernel early
    (profiling only: its outputs are then not the search results)."""
    bins, capacity = config.resolve(k)
    block_c, block_t = config.block_c, config.block_t
    n = cand.shape[0]
    num_req = offsets.shape[0]
    # Values cannot be checked inside jit, so make bad ones harmless instead of out of bounds:
    # a candidate whose request is outside [0, U) goes to an extra empty request (all padding),
    # and each request's length is clipped to the rows that exist.
    total = seq_q.shape[0]
    offsets = jnp.clip(offsets.astype(jnp.int32), 0, total)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, total - offsets)
    offsets = jnp.concatenate([offsets, jnp.zeros((1,), jnp.int32)])
    lengths = jnp.concatenate([lengths, jnp.zeros((1,), jnp.int32)])
    c2r = cand_to_req.astype(jnp.int32)
    c2r = jnp.where((c2r >= 0) & (c2r < num_req), c2r, num_req)
    num_req += 1
    num_blocks = -(-n // block_c) + num_req
    perm, block_req, block_row, block_cnt = _block_table(c2r, num_req, block_c, num_blocks)
    trash = bool(interpret)
    if trash:
        # Compiled, masked tile loads past the end touch no memory. Interpret mode slices the refs
        # for real: give it spare rows (never selected: they are past every length).
        seq_q = jnp.pad(seq_q, ((0, bins), (0, 0)))
        perm = jnp.pad(perm, (0, block_c))
    splits = config.splits
    k_pad = next_pow2(k)
    rows = num_blocks * block_c
    out_shape = (n + (block_c if trash else 0), k + (max(block_t, k_pad, capacity) if trash else 0))
    buf_shape = (rows, splits * capacity + (max(block_t, capacity) if trash else 0))
    tables = (block_req, block_row, block_cnt, offsets, lengths, perm, seq_q, cand)
    common = dict(block_c=block_c, block_t=block_t, trash=trash, scores=config.scores)

    def call(kernel, grid, out, name, aliases=None, **kw):
        return pl.pallas_call(
            functools.partial(kernel, **kw), grid=grid, out_shape=out,
            input_output_aliases=aliases or {}, interpret=interpret, name=name,
            compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                                 num_stages=config.num_stages))

    def i32(shape):
        return jax.ShapeDtypeStruct(shape, jnp.int32)

    out = (i32(out_shape), jax.ShapeDtypeStruct(out_shape, jnp.float32))
    bins_max = call(_bound_kernel, (num_blocks, splits), i32((rows, bins)), "nn_search_bound",
                    chunk_bins=bins // splits, splits=splits, scale=scale, **common)(*tables)
    t_lo = call(_threshold_kernel, (num_blocks,), i32((rows,)), "nn_search_threshold", k=k,
                block_c=block_c, radix_bits=config.radix_bits)(bins_max)
    if phases == 1:          # profiling only
        return t_lo, bins_max
    keys, sidx, found = call(_collect_kernel, (num_blocks, splits),
                             (i32(buf_shape), i32(buf_shape), i32((rows, splits))),
                             "nn_search_collect", capacity=capacity, splits=splits, scale=scale,
                             **common)(*tables, t_lo)
    if phases == 2:          # profiling only
        return found, keys
    # the select kernel compacts the survivors in place: their buffers are aliased outputs
    n_in = len(tables)
    idx, scores, overflow, _, _ = call(
        _select_kernel, (num_blocks,), out + (i32((num_blocks,)), i32(buf_shape), i32(buf_shape)),
        "nn_search_select", aliases={n_in + 1: 3, n_in + 2: 4}, k=k, capacity=capacity,
        splits=splits, radix_bits=config.radix_bits, **common)(*tables, found, keys, sidx)
    # Always launched: unflagged blocks exit at once, which is cheaper than a ``lax.cond`` (XLA
    # reads a conditional's predicate on the host: a device-to-host sync per call).
    idx, scores = call(_fallback_kernel, (num_blocks,), out, "nn_search_fallback",
                       aliases={n_in + 1: 0, n_in + 2: 1}, k=k, scale=scale,
                       **common)(*tables, overflow, idx, scores)
    return idx[:n, :k], scores[:n, :k]


@functools.partial(jax.jit, static_argnames=("k", "scale", "config", "interpret"))
def nn_search_jagged(seq_q: jax.Array, offsets: jax.Array, lengths: jax.Array, cand: jax.Array,
                     cand_to_req: jax.Array, *, k: int, scale: float = QUANT_SCALE,
                     config: Optional[NNSearchConfig] = None,
                     interpret: Optional[bool] = None) -> Tuple[jax.Array, jax.Array]:
    """NN(S, c; K) on de-duplicated jagged sequences.

    Args:
      seq_q: (T, D) int8 codes of all requests' tokens, concatenated.
      offsets: (U,) int first row of each request's sequence in ``seq_q``.
      lengths: (U,) int number of tokens of each request (0 allowed); rows
        ``[offsets[u], offsets[u] + lengths[u])`` should lie inside ``seq_q`` (values are not
        checked inside jit: lengths are clipped to the rows that exist, so nothing is read out of
        bounds).
      cand: (N, D) float candidate embeddings.
      cand_to_req: (N,) int request of each candidate, in ``[0, U)``; a candidate with an index
        outside that range gets an all-padding result (-1 / -inf) rather than an error, because
        jitted code cannot raise on values. Validate requests at the API boundary
        (``RequestBatch.validate``).
      k: K (1..128). scale: int8 scale (0.65).

    Returns:
      (indices (N, k) int32, scores (N, k) float32): positions within the request's sequence, in
      chronological order, ``-1`` / ``-inf`` padding, exactly as ``nn_search_reference``.
    """
    _validate(seq_q, offsets, lengths, cand, cand_to_req, k)
    config = config or NNSearchConfig()
    config.resolve(k)
    if cand.shape[0] == 0:
        return jnp.zeros((0, k), jnp.int32), jnp.zeros((0, k), jnp.float32)
    interpret = default_interpret() if interpret is None else interpret
    return _search(seq_q, offsets, lengths, cand, cand_to_req, k=k, scale=scale, config=config,
                   interpret=interpret)


def nn_search(seq_q: jax.Array, lengths: jax.Array, cand: jax.Array, cand_to_req: jax.Array, *,
              k: int, scale: float = QUANT_SCALE, impl: Literal["pallas", "xla"] = "pallas",
              config: Optional[NNSearchConfig] = None,
              interpret: Optional[bool] = None) -> Tuple[jax.Array, jax.Array]:
    """Dense-layout entry point with the reference's signature: ``seq_q`` (U, L, D) int8 with
    ``lengths`` (U,). ``impl="xla"`` runs :func:`nn_search_reference`."""
    if impl == "xla":
        return nn_search_reference(seq_q, lengths, cand, cand_to_req, k=k, scale=scale)
    if impl != "pallas":
        raise ValueError(f"impl: expected 'pallas' or 'xla', got {impl!r}")
    if seq_q.ndim != 3:
        raise ValueError(f"seq_q: expected (U, L, D) int8, got shape {seq_q.shape}")
    u, length, d = seq_q.shape
    offsets = jnp.arange(u, dtype=jnp.int32) * length
    lens = jnp.clip(jnp.asarray(lengths, jnp.int32), 0, length)
    return nn_search_jagged(seq_q.reshape(u * length, d), offsets, lens, cand, cand_to_req, k=k,
                            scale=scale, config=config, interpret=interpret)


__all__ = ["MAX_K", "NNSearchConfig", "nn_search", "nn_search_jagged"]
