"""Fused, broadcast-free int8 NN search in one Pallas (Triton backend) kernel (paper §3.4.2).

Computes exactly :func:`pallas_kernels.nn_search_reference.nn_search_reference` (SPEC §2): for every
candidate, the K tokens of its request's sequence with the highest cosine score, ties to the lower
index, padding never selected, returned in chronological order with ``-1`` / ``-inf`` padding.

Inputs are de-duplicated: one copy of each request's int8 sequence (jagged, ``offsets``) and a
candidate -> request index, so no sequence is ever broadcast per candidate. The kernel reads the
int8 codes directly; dequantization, L2 normalization and scoring happen in registers, and neither
the dequantized sequence nor the candidates x L score matrix is written to memory.

Work decomposition
------------------
Candidates are grouped by request (a stable argsort of ``cand_to_req``) into blocks of
``block_c`` rows that all belong to one request; program ``p`` owns block ``p`` (the grid has the
static upper bound ``ceil(N / block_c) + U`` blocks; surplus programs find an empty block and
exit their loops at once). A program walks its request's tokens in tiles of ``block_t``; the trip
count is the request's own length, so short sequences cost little.

In-kernel top-K without sort (Triton has no sort / top_k lowering)
-----------------------------------------------------------------
Scores are mapped to int32 keys whose signed order is the float order (``bits`` for s >= 0,
``bits ^ 0x7fffffff`` for s < 0; -0.0 is first turned into +0.0), so "top K by score, ties to the
lower index" is "top K by (key, -index)". Per candidate row:

1. **Bound** (one pass over the tokens). Token ``i`` falls in bin ``i % W`` of ``W >= 2K`` bins (held
   as ``W / block_t`` tile-shaped accumulators); the running per-bin maximum is an elementwise
   ``max`` of tiles. The K-th largest
   of the W bin maxima, ``T_lo``, is the score of K distinct tokens, so at least K tokens score
   ``>= T_lo``, and on typical data few more do (about 1.3 K).
2. **Collect** (one pass). Tokens with ``key >= T_lo`` are appended, in index order, to a small
   per-row buffer (``survivors`` entries: key and index); slots come from a running count plus a
   prefix sum (``cumsum``) within the tile, written with a masked scatter store.
3. **Select** (registers). The exact K-th largest key T* among the survivors is found by radix
   select, 4 bits per step from the top: with the prefix fixed so far, count the keys ``>= prefix
   + d * 16**shift`` for d = 1..15 and extend the prefix by the largest digit whose count is still
   >= K; eight steps give T*, and the count above the chosen digit gives #(key > T*). The output is
   ``key > T*`` plus the first ``K - #(key > T*)`` survivors with ``key == T*`` (they are in index
   order, so exact ties go to the lower index, as in ``lax.top_k``), each written to slot "running
   count + prefix sum": chronological order falls out of the scan order, no sort needed. Slots past
   the number of selected tokens get ``-1`` / ``-inf``.
4. **Fallback.** If a row of the block has more survivors than the buffer (many equal or
   near-equal scores, e.g. a zero candidate), the block runs the same radix select over the whole
   sequence instead, re-scoring all tokens on each of the eight steps, then a selection pass. Exact,
   just slower; the loops have zero trips otherwise.

A row with fewer than K valid tokens never finds a digit (every count < K), keeps T* = INT32_MIN,
which no valid key equals, and selects all its valid tokens.

Every pass scores tokens with the same tile shape, so a token's key is bit-identical in every pass
(a bound computed in pass 1 is exact in pass 2). Global-memory traffic per program: its request's
int8 sequence twice (32 B per token per pass, from L2 for all but the first program of a request),
the survivor buffer, and the outputs; never a score matrix.

Status (2026-11-22, H100, jax 0.11.2): the first version of the full-radix algorithm (today's default path,
``survivors=0``, before it was refactored into helpers shared with the survivor path; the refactor
is not yet re-run on a GPU) returned the exact reference's indices on every row, but took 6.4 ms at L_LL = 10k with 256
candidates per request (4096 candidates, K = 96), against 3.7 ms for the de-duplicated XLA pipeline:
it is ALU-bound on nine passes of scoring plus fifteen compare-and-count reductions per token. The
survivor path was slower in its first GPU version (11 ms, 256-wide tiles) and its current version
was not measured (its compile did not finish within the 100 s probe). Both are exact and tested in
interpret mode; see ``bench/nn_search.py`` and the issue notes.

Numerics: scores are float32 with IEEE float32 products (no TF32): a token's score is computed by
the same instruction sequence wherever it sits, so duplicate tokens tie exactly. Against the
float64 brute force, selections agree except between tokens whose scores are within float32
rounding (~1e-6) of the K-th score: the "near-tie band" the tests document.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Literal, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import check_tiling, default_interpret, is_pow2
from pallas_kernels.int8_codec import QUANT_MAX, QUANT_SCALE
from pallas_kernels.nn_search_reference import PAD_INDEX, nn_search_reference

MAX_K = 128
"""Largest K the kernel supports."""
_RADIX_BITS = 4
_INT32_MIN = -(2 ** 31)
_NORM_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class NNSearchConfig:
    """Tiling of the NN-search kernel.

    Attributes:
      block_c: candidates per program, all from one request (power of two, >= 16).
      block_t: sequence tokens per tile (power of two, >= 16).
      num_warps: warps per program (Triton).
      num_stages: software-pipelining stages of the token loops (Triton).
      survivors: 0 (default): exact radix select over the whole sequence (steps 3-4 of the module
        docstring on all tokens: 9 passes). A power of two: enable the bound + survivor buffer
        (steps 1-3, 2 passes; at least ``2 * next_pow2(K)`` entries are used); typically ~1.3 K
        tokens survive, and a block with a row over the buffer takes the full radix select.
        Tested in interpret mode only; see the module docstring's status note.
    """

    block_c: int = 16
    block_t: int = 64
    num_warps: int = 4
    num_stages: int = 1
    survivors: int = 0

    def __post_init__(self) -> None:
        if self.survivors and not is_pow2(self.survivors):
            raise ValueError(f"NNSearchConfig.survivors: expected 0 or a power of two, got "
                             f"{self.survivors}")
        check_tiling(self, ("block_c", "block_t"))


def _wrap_int32(value: int) -> jax.Array:
    return jnp.int32(((value + 2 ** 31) % 2 ** 32) - 2 ** 31)


def _score_keys(c_norm, seq_ref, start, t0, block_t: int, length, scale: float):
    """Scores (block_c, block_t) of the candidates against tokens ``[t0, t0 + block_t)`` of the
    sequence starting at row ``start`` of ``seq_ref``, and their order-preserving int32 keys."""
    pos = t0 + jnp.arange(block_t)
    valid = pos < length
    codes = plgpu.load(seq_ref.at[pl.ds(start + t0, block_t), :], mask=valid[:, None], other=0)
    x = codes.astype(jnp.float32) * (scale / QUANT_MAX)
    norm = jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True))
    x = x / jnp.maximum(norm, _NORM_EPS)
    s = jnp.dot(c_norm, x.T, preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)
    s = s + 0.0                                     # -0.0 -> +0.0: equal floats, equal keys
    bits = lax.bitcast_convert_type(s, jnp.int32)
    keys = jnp.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return s, keys, pos, valid


def _keys_to_scores(keys):
    bits = jnp.where(keys >= 0, keys, keys ^ 0x7FFFFFFF)
    return lax.bitcast_convert_type(bits, jnp.float32)


def _radix_kth(count_ge, k: int, block_c: int):
    """Exact K-th largest key per row by 4-bit radix digits (module docstring).

    ``count_ge(thresholds)`` returns, for a list of (block_c,) int32 thresholds, the per-row counts
    of valid keys >= each. Returns (T*, #keys > T*); T* = INT32_MIN where fewer than K keys exist.
    """
    prefix = jnp.full((block_c,), _INT32_MIN, jnp.int32)
    count_above = jnp.zeros((block_c,), jnp.int32)    # #keys >= prefix + 16 ** (shift + 1)
    for shift in range(32 - _RADIX_BITS, -1, -_RADIX_BITS):
        # int32 wrap-around is intended: prefix + d * 16**shift always lands inside int32
        thresholds = [prefix + _wrap_int32(d << shift) for d in range(1, 1 << _RADIX_BITS)]
        counts = list(count_ge(thresholds)) + [count_above]
        digit = jnp.zeros((block_c,), jnp.int32)
        next_above = counts[0]
        for d in range(1, 1 << _RADIX_BITS):
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


def _nn_search_kernel(block_req_ref, block_row_ref, block_cnt_ref, offsets_ref, lengths_ref,
                      perm_ref, seq_ref, cand_ref, idx_ref, score_ref, surv_key_ref, surv_idx_ref,
                      *, k: int, k_pad: int, bins: int, capacity: int, block_c: int, block_t: int,
                      scale: float, trash: bool):
    p = pl.program_id(0)
    req = block_req_ref[p]
    row0 = block_row_ref[p]
    count = block_cnt_ref[p]                        # 0 for surplus programs
    has_req = count > 0
    safe_req = jnp.where(has_req, req, 0)
    start = offsets_ref[safe_req]
    length = jnp.where(has_req, lengths_ref[safe_req], 0)
    num_tiles = lax.div(length + block_t - 1, block_t)

    rows = jnp.arange(block_c)
    row_ok = rows < count
    cand_rows = plgpu.load(perm_ref.at[pl.ds(row0, block_c)], mask=row_ok, other=0)
    d = cand_ref.shape[1]
    c = plgpu.load(cand_ref.at[cand_rows[:, None], jnp.arange(d)[None, :]], mask=row_ok[:, None],
                   other=0).astype(jnp.float32)
    c_norm = c / jnp.maximum(jnp.sqrt(jnp.sum(c * c, axis=1, keepdims=True)), _NORM_EPS)

    def tile(t, width):
        return _score_keys(c_norm, seq_ref, start, t * width, width, length, scale)

    # Scatter targets. Compiled, masked-off lanes store nothing. Interpret mode emulates a masked
    # scatter by writing the old value back, so there every masked-off lane gets its own spare
    # target (rows past N, columns past the used ones) that the wrapper slices away.
    n_out = idx_ref.shape[0] - (block_c if trash else 0)
    out_rows = jnp.where(row_ok, cand_rows, n_out + rows if trash else 0)[:, None]

    def spare(cols_used, width):
        return (cols_used + jnp.arange(width))[None, :] if trash else 0

    def store_out(sel, slot, idx_vals, score_vals):
        slot = jnp.where(sel, slot, spare(k, sel.shape[1]))
        plgpu.store(idx_ref.at[out_rows, slot], idx_vals, mask=sel)
        plgpu.store(score_ref.at[out_rows, slot], score_vals, mask=sel)

    def survivor_path():
        # ---- pass 1: lower bound T_lo on the K-th score. Token i falls in bin i % bins (bins >= 2K);
        # the K-th largest bin maximum is the score of K distinct tokens, so >= K tokens score >= T_lo.
        # The W bins are held as W / block_t accumulators of tile width, so every pass scores the
        # same (block_c, block_t) tiles (bit-identical keys) and tiles stay register-sized.
        groups = bins // block_t
        surv_rows = (p * block_c + rows)[:, None]

        def bin_max(t, ms):
            _, keys, _, valid = tile(t, block_t)
            keys = jnp.where(valid[None, :], keys, _INT32_MIN)
            g = lax.rem(t, groups)
            return tuple(jnp.where(g == j, jnp.maximum(mj, keys), mj) for j, mj in enumerate(ms))

        ms = lax.fori_loop(0, num_tiles, bin_max,
                           tuple(jnp.full((block_c, block_t), _INT32_MIN, jnp.int32)
                                 for _ in range(groups)))
        # Gather the groups into one (block_c, bins) array through the row's buffer (one radix
        # select over it instead of one per group: a much smaller program).
        for j, mj in enumerate(ms):
            plgpu.store(surv_key_ref.at[surv_rows, (j * block_t + jnp.arange(block_t))[None, :]],
                        mj)
        if not trash:
            plgpu.debug_barrier()
        bin_cols = jnp.arange(bins)[None, :]
        m = plgpu.load(surv_key_ref.at[surv_rows, bin_cols])
        if not trash:
            plgpu.debug_barrier()    # all reads of the bins finish before pass 2 overwrites them
        t_lo, _ = _radix_kth(lambda th: _count_ge(m, m > _INT32_MIN, th), k, block_c)

        # ---- pass 2: the survivors (key >= T_lo), in index order, into a small per-row buffer

        def collect(t, written):
            _, keys, pos, valid = tile(t, block_t)
            keep = valid[None, :] & (keys >= t_lo[:, None]) & row_ok[:, None]
            keep_i = keep.astype(jnp.int32)
            slot = written[:, None] + jnp.cumsum(keep_i, axis=1) - 1
            fits = keep & (slot < capacity)
            slot = jnp.where(fits, slot, spare(capacity, block_t))
            plgpu.store(surv_key_ref.at[surv_rows, slot], keys, mask=fits)
            plgpu.store(surv_idx_ref.at[surv_rows, slot],
                        jnp.broadcast_to(pos[None, :], keys.shape).astype(jnp.int32), mask=fits)
            return written + jnp.sum(keep_i, axis=1)

        survivors = lax.fori_loop(0, num_tiles, collect, jnp.zeros((block_c,), jnp.int32))
        overflow = jnp.max(jnp.where(row_ok, survivors, 0)) > capacity
        if not trash:
            plgpu.debug_barrier()        # survivors stored by all warps are read back below

        # ---- exact K-th among the survivors (registers), then selection in index order
        cols = jnp.arange(capacity)
        s_ok = (cols[None, :] < survivors[:, None]) & row_ok[:, None] & jnp.logical_not(overflow)
        s_keys = plgpu.load(surv_key_ref.at[surv_rows, cols[None, :]], mask=s_ok, other=_INT32_MIN)
        s_idx = plgpu.load(surv_idx_ref.at[surv_rows, cols[None, :]], mask=s_ok, other=0)
        kth, above = _radix_kth(lambda th: _count_ge(s_keys, s_ok, th), k, block_c)
        sel, slot, written, _ = _select(s_keys, s_ok, kth, k - above, zeros, zeros)
        store_out(sel, slot, s_idx, _keys_to_scores(s_keys))
        return overflow, written

    zeros = jnp.zeros((block_c,), jnp.int32)
    if capacity:
        overflow, written = survivor_path()
    else:                        # survivors=0: the full-sequence radix select only
        overflow, written = jnp.asarray(True), zeros

    # ---- full-sequence radix select: the only path with survivors=0; otherwise the fallback when
    # a row has more survivors than the buffer holds (many near-equal scores). Re-scores the whole
    # sequence on each of its passes; zero trips when not needed.
    full_tiles = jnp.where(overflow, num_tiles, 0)

    def count_full(thresholds):
        def body(t, counts):
            _, keys, _, valid = tile(t, block_t)
            got = _count_ge(keys, valid[None, :], thresholds)
            return tuple(a + b for a, b in zip(counts, got))
        return lax.fori_loop(0, full_tiles, body, tuple(zeros for _ in thresholds))

    kth_f, above_f = _radix_kth(count_full, k, block_c)

    def select_full(t, carry):
        written_f, ties = carry
        s, keys, pos, valid = tile(t, block_t)
        sel_f, slot_f, written_f, ties = _select(keys, valid[None, :] & row_ok[:, None], kth_f,
                                                 k - above_f, written_f, ties)
        store_out(sel_f, slot_f, jnp.broadcast_to(pos[None, :], keys.shape).astype(jnp.int32), s)
        return written_f, ties

    written_f, _ = lax.fori_loop(0, full_tiles, select_full, (zeros, zeros))
    written = jnp.where(overflow, written_f, written)

    # ---- padding slots [written, k): disjoint from the slots stored above, so no ordering needed
    cols_k = jnp.arange(k_pad)
    pad = row_ok[:, None] & (cols_k[None, :] >= written[:, None]) & (cols_k[None, :] < k)
    if trash:
        cols_t = jnp.where(pad, cols_k[None, :], k + cols_k[None, :])
    else:
        cols_t = jnp.broadcast_to(jnp.where(cols_k < k, cols_k, 0)[None, :], pad.shape)
    plgpu.store(idx_ref.at[out_rows, cols_t], jnp.full((block_c, k_pad), PAD_INDEX, jnp.int32),
                mask=pad)
    plgpu.store(score_ref.at[out_rows, cols_t], jnp.full((block_c, k_pad), -jnp.inf, jnp.float32),
                mask=pad)


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
    req = jnp.searchsorted(block_end, b, side="right").astype(jnp.int32)
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
    interpret = default_interpret() if interpret is None else interpret
    n = cand.shape[0]
    num_req = offsets.shape[0]
    if n == 0:
        return jnp.zeros((0, k), jnp.int32), jnp.zeros((0, k), jnp.float32)
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
    num_blocks = -(-n // config.block_c) + num_req
    perm, block_req, block_row, block_cnt = _block_table(c2r, num_req, config.block_c, num_blocks)
    # Compiled, the masked tile loads past the end touch no memory. Interpret mode slices the refs
    # for real: give it one spare tile of rows (never selected).
    seq_pad = jnp.pad(seq_q, ((0, config.block_t), (0, 0))) if interpret else seq_q
    perm_pad = jnp.pad(perm, (0, config.block_c)) if interpret else perm
    k_pad = 1 << (k - 1).bit_length()
    trash = bool(interpret)
    # Every pass scores the same tile shape, so a token's key is the same bit for bit in every
    # pass; the pass-1 bins (>= 2K) are tile-width groups.
    width = config.block_t
    bins = max(2 * k_pad, width)
    capacity = max(config.survivors, bins) if config.survivors else 0
    kernel = functools.partial(_nn_search_kernel, k=k, k_pad=k_pad, bins=bins, capacity=capacity,
                               block_c=config.block_c, block_t=width, scale=scale, trash=trash)
    out_rows = n + (config.block_c if trash else 0)
    out_cols = k + (max(width, k_pad, capacity) if trash else 0)
    surv_shape = ((num_blocks * config.block_c, capacity + (width if trash else 0)) if capacity
                  else (1, 1))
    if trash:
        seq_pad = jnp.pad(seq_q, ((0, width), (0, 0)))
    idx, scores, _, _ = pl.pallas_call(
        kernel,
        grid=(num_blocks,),
        out_shape=(jax.ShapeDtypeStruct((out_rows, out_cols), jnp.int32),
                   jax.ShapeDtypeStruct((out_rows, out_cols), jnp.float32),
                   jax.ShapeDtypeStruct(surv_shape, jnp.int32),     # survivor keys (scratch)
                   jax.ShapeDtypeStruct(surv_shape, jnp.int32)),    # survivor indices (scratch)
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                             num_stages=config.num_stages),
        interpret=interpret,
        name="nn_search",
    )(block_req, block_row, block_cnt, offsets, lengths,
      perm_pad, seq_pad, cand)
    if trash:
        idx, scores = idx[:n, :k], scores[:n, :k]
    return idx, scores


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
