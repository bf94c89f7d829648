"""Fused, broadcast-free int8 NN search in one Pallas (Triton backend) kernel (paper §3.4.2).

Computes exactly :func:`pallas_kernels.nn_search.reference.nn_search_reference`: for every
candidate, the K tokens of its request's sequence with the highest cosine score (dequantized,
L2-normalized tokens ``x / max(||x||, 1e-12)`` against the normalized candidate), ties to the lower
index, padding never selected, returned in chronological order with ``-1`` / ``-inf`` padding.
Callers use :func:`pallas_kernels.nn_search.api.nn_search`; this module is the jagged-layout kernel
(:func:`nn_search_pallas_triton`).

Inputs are de-duplicated: one copy of each request's int8 sequence (jagged, ``offsets``) and a
candidate -> request index, so no sequence is ever broadcast per candidate. The kernel reads the
int8 codes directly; dequantization, L2 normalization and scoring happen in registers, and neither
the dequantized sequence nor the candidates x L score matrix is written to memory.

Work decomposition
------------------
Candidates are grouped by request into blocks of ``block_c`` rows that all belong to one request
(``_block_slots``: request r owns ``ceil(count_r / block_c)`` consecutive blocks; a candidate's
slot is its request's first block times ``block_c`` plus its rank among the request's candidates,
from one pairwise-comparison reduction up to ``_PAIRWISE_MAX_N`` candidates and from a sort above).
The grid has the static upper bound ``ceil(N / block_c) + U`` programs; surplus programs find an
empty block and exit at once. Each program walks its request's tokens in tiles of ``block_t``; the
trip count is the request's own length, so short sequences cost little.

Scores
------
The cosine of a token with int8 codes q is ``(c . q) / |q|`` for the normalized candidate c: the
int8 scale cancels and ``|q|^2`` is an exact integer sum (``1 / |q|`` per token is a (T,) float32
table computed once per call by XLA, 4 bytes next to the token's 32). By default the dot products
run on tensor cores: c is split into three bfloat16 pieces (24 mantissa bits between them), int8
codes are exact in bfloat16 and bfloat16 products are exact in float32, so the score is
float32-accurate; only the accumulation order differs from a float32 FMA loop (``scores="fma"``,
also shipped). A token's score comes from the same instructions in every pass and position, so
duplicate tokens tie exactly and a bound computed in one pass is exact in the next.

In-kernel top-K without sort (Triton has no sort / top_k lowering)
-----------------------------------------------------------------
Scores are mapped to int32 keys whose signed order is the float order (``bits`` for s >= 0,
``bits ^ 0x7fffffff`` for s < 0; -0.0 is first turned into +0.0), so "top K by score, ties to the
lower index" is "top K by (key, -index)". One program per block runs five steps:

1. **Bound** (one pass over the tokens). Token ``i`` of tile ``t`` falls in bin
   ``(t mod G) * block_t + (i mod block_t)`` of ``W = G * block_t >= K`` bins (W = 2K by default).
   The per-bin running maximum is an elementwise ``max`` into G tile-shaped accumulators (kept in
   registers): no cross-thread reduction inside the loop.
2. **Threshold**. ``T_lo`` = the K-th largest bin maximum, resolved by radix select (below) to its
   top 16 key bits only (a lower bound within ~1% of it, at half the cost). K distinct tokens score
   ``>= T_lo``; on random data ~1.2 K tokens do (measured: 121 on average at L = 10k, K = 96).
3. **Collect** (second pass). Tokens with ``key >= T_lo`` are appended, in index order, to a small
   per-row buffer in global memory (``survivors`` entries of key and index; it stays in L1/L2) with
   a masked scatter store. A survivor's slot is the row's running count plus its rank in the tile,
   both from tensor-core products of the 0/1 "keep" tile (with the upper-triangular and the
   all-ones matrix), so the loop has no cross-thread scan or reduction.
4. **Select** (registers). The exact K-th largest key T* among the survivors is found by **radix
   select**: from the top, one digit of ``radix_bits`` bits at a time, count the keys
   ``>= prefix + d * 2**shift`` for each digit d and extend the prefix by the largest digit whose
   count is still >= K (one bit per step: 32 counts; several counts share one reduction, packed
   into the bits of an int32). The count above the chosen digit gives #(key > T*). The output is
   ``key > T*`` plus the first ``K - #(key > T*)`` survivors with ``key == T*`` (they are in index
   order, so exact ties go to the lower index, as in ``lax.top_k``), each written to slot "running
   count + prefix sum": chronological order falls out of the scan order, no sort needed. Slots past
   the number of selected tokens get ``-1`` / ``-inf``.
5. **Fallback**. If a row of the block has more survivors than the buffer holds (many equal or
   near-equal scores: a zero candidate, one token repeated hundreds of times), the block instead
   runs the radix select (4-bit digits: 8 passes) over the whole sequence, re-scoring every token
   on each pass, then a selection pass. Exact, about 7x slower (2.6 ms instead of 0.38 ms at
   the benchmark's headline shape when every block takes it: ``bench/nn_search.py --profile``),
   rare. Blocks that do not overflow run it with zero trips: no branch reads anything back to the
   host.

The kernel body is composed of step functions (``_steps_bound``: steps 1-2, ``_step_collect``:
step 3, then 4-5); :mod:`pallas_kernels.nn_search.profile` builds its own kernel from the same
steps to time the kernel stopped after step 2 / 3, so the shipped kernel has no profiling branch.

A row with fewer than K valid tokens never finds a digit (every count < K), keeps T* = INT32_MIN,
which no valid key equals, and selects all its valid tokens.

Global-memory traffic per block: its request's int8 sequence and inverse norms twice (36 B per
token per pass, from L2 for all but the first block of a request), the survivor buffer and the
outputs; never a score matrix.

Numerics and the near-tie band: against the float64 brute force, selections agree except between
tokens whose scores are within float32 rounding (~1e-6) of the K-th score.

Measured (H100, jax 0.11.2, ``python bench/nn_search.py``, ``bench/results/nn_search.{json,md,png}``):
0.37 ms at L_LL = 10k, 256 candidates per request, 4096 candidates, K = 96; 11.3x the broadcast XLA
pipeline and 9.8x the best de-duplicated one. ``python bench/nn_search.py --quick --tune`` times the
design choices one knob at a time.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import default_interpret, is_pow2, next_pow2
from pallas_kernels.int8_codec import QUANT_SCALE
from pallas_kernels.nn_search.config import MAX_K, NNSearchConfig
from pallas_kernels.nn_search.reference import PAD_INDEX

_BOUND_BITS = 16
"""Key bits T_lo resolves (sign, exponent, 7 mantissa bits): a bound within ~1% of the K-th bin
maximum at half the cost of an exact one."""
_INT32_MIN = -(2 ** 31)
_NORM_EPS = 1e-12


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


def _score_keys(cand, seq_ref, inv_ref, start, t0, block_t: int, length):
    """Scores (block_c, block_t) of the candidates against tokens ``[t0, t0 + block_t)`` of the
    sequence starting at row ``start`` of ``seq_ref``, and their order-preserving int32 keys.

    ``cand`` is the L2-normalized candidates: float32 (IEEE float32 FMA products) or the three
    bfloat16 pieces of :func:`_split_bf16` (tensor cores). The cosine of a token with codes q is
    ``(c . q) / |q|`` (``inv_ref`` holds ``1 / |q|`` per token: :func:`_inverse_norms`). int8
    codes are exact in bfloat16 and a product of two bfloat16 numbers is exact in float32, so the
    three-piece bfloat16 score differs from the float32 one only in float32 accumulation order.
    """
    pos = t0 + jnp.arange(block_t)
    valid = pos < length
    codes = plgpu.load(seq_ref.at[pl.ds(start + t0, block_t), :], mask=valid[:, None], other=0)
    inv = plgpu.load(inv_ref.at[pl.ds(start + t0, block_t)], mask=valid, other=0.0)
    if isinstance(cand, tuple):
        qt = codes.astype(jnp.bfloat16).T
        s = jnp.dot(cand[2], qt, preferred_element_type=jnp.float32)
        s = s + jnp.dot(cand[1], qt, preferred_element_type=jnp.float32)
        s = s + jnp.dot(cand[0], qt, preferred_element_type=jnp.float32)
    else:
        s = jnp.dot(cand, codes.astype(jnp.float32).T, preferred_element_type=jnp.float32,
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


def _row_sums(terms, max_value: int):
    """Per-row sums of (rows, W) int32 ``terms`` in [0, max_value] (summed over W), packing as many
    as fit into one int32 per cross-thread reduction (each reduction is a barrier-bound step)."""
    width = max(1, max_value.bit_length())
    per = max(1, 31 // width)
    out = []
    for g in range(0, len(terms), per):
        group = terms[g:g + per]
        packed = functools.reduce(jnp.add, [t << (width * i) for i, t in enumerate(group)])
        total = jnp.sum(packed, axis=1)
        out += [(total >> (width * i)) & ((1 << width) - 1) for i in range(len(group))]
    return out


def _count_ge(keys, valid, thresholds):
    """Per-row counts of valid keys >= each threshold (one packed reduction per few thresholds)."""
    return _row_sums([(valid & (keys >= th[:, None])).astype(jnp.int32) for th in thresholds],
                     keys.shape[1])


def _select(keys, valid, kth, need_ties, written, ties_seen):
    """Selected entries of a (rows, W) block in index order: key > T*, then ties at T* in order.

    Returns (selected, output slot, written', ties_seen')."""
    gt = valid & (keys > kth[:, None])
    eq = (valid & (keys == kth[:, None])).astype(jnp.int32)
    tie_rank = ties_seen[:, None] + jnp.cumsum(eq, axis=1)
    sel = gt | ((eq > 0) & (tie_rank <= need_ties[:, None]))
    sel_i = sel.astype(jnp.int32)
    slot = written[:, None] + jnp.cumsum(sel_i, axis=1) - 1
    n_sel, n_eq = _row_sums([sel_i, eq], keys.shape[1])
    return sel, slot, written + n_sel, ties_seen + n_eq


class _Block(NamedTuple):
    """What program ``p`` knows about its block of candidates (see ``_block_slots``)."""

    start: jax.Array          # first row of the request's tokens in the flat sequence
    length: jax.Array         # the request's length (0 for surplus programs)
    num_tiles: jax.Array
    rows: jax.Array           # (block_c,) 0..block_c-1
    row_ok: jax.Array         # (block_c,) rows that hold a candidate
    cand: object              # normalized candidates: (block_c, D) f32 or 3 bf16 pieces
    out_rows: jax.Array       # (block_c, 1) output row of each candidate (or a spare row)
    trash: bool               # interpret mode: masked-off scatter lanes go to spare targets
    inv_ref: object           # (T,) 1 / |q| per token


def _load_block(p, block_req_ref, slots_ref, offsets_ref, lengths_ref, cand_ref, inv_ref,
                n_out: int, *, block_c: int, block_t: int, trash: bool, scores: str) -> _Block:
    """Program ``p``'s block: candidates ``slots[p * block_c : (p + 1) * block_c]`` (-1: no
    candidate), all of request ``block_req[p]`` (the empty request for surplus programs)."""
    req = block_req_ref[p]
    start = offsets_ref[req]
    length = lengths_ref[req]
    rows = jnp.arange(block_c)
    cand_rows = plgpu.load(slots_ref.at[pl.ds(p * block_c, block_c)])
    row_ok = cand_rows >= 0
    cand_rows = jnp.maximum(cand_rows, 0)
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
                  out_rows, trash, inv_ref)


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


# --------------------------------------------------------------------------------------- kernel


def _tile_keys(blk: _Block, seq_ref, t, block_t: int):
    return _score_keys(blk.cand, seq_ref, blk.inv_ref, blk.start, t * block_t, block_t, blk.length)


def _bound(blk: _Block, seq_ref, *, bins: int, block_c: int, block_t: int):
    """Step 1: the maxima of the ``bins`` bins, as ``bins // block_t`` tile-shaped accumulators.

    The loop is unrolled by G = bins // block_t so that tile ``t`` always lands in accumulator
    ``t mod G``; tiles past the sequence are all invalid (INT32_MIN)."""
    groups = bins // block_t

    def body(i, ms):
        out = []
        for j, mj in enumerate(ms):
            _, keys, _, valid = _tile_keys(blk, seq_ref, i * groups + j, block_t)
            out.append(jnp.maximum(mj, jnp.where(valid[None, :], keys, _INT32_MIN)))
        return tuple(out)

    init = tuple(jnp.full((block_c, block_t), _INT32_MIN, jnp.int32) for _ in range(groups))
    return lax.fori_loop(0, lax.div(blk.num_tiles + groups - 1, groups), body, init)


def _threshold(ms, *, k: int, block_c: int, radix_bits: int):
    """Step 2: T_lo per row, the K-th largest bin maximum to its top ``_BOUND_BITS`` bits."""
    def count_ge(thresholds):
        return _row_sums([functools.reduce(jnp.add, [((m >= th[:, None]) & (m > _INT32_MIN))
                                                     .astype(jnp.int32) for m in ms])
                          for th in thresholds], sum(m.shape[1] for m in ms))

    t_lo, _ = _radix_kth(count_ge, k, block_c, radix_bits, stop_bit=32 - _BOUND_BITS)
    return t_lo


def _collect(blk: _Block, seq_ref, t_lo, key_buf, idx_buf, buf_rows, *, capacity: int,
             block_c: int, block_t: int, unroll: int):
    """Step 3: tokens with key >= T_lo, in index order, into the row's survivor buffer.

    A survivor's slot is the row's running count plus its rank within the tile. Both come from
    tensor-core products of the 0/1 ``keep`` tile: with the upper-triangular ones matrix (the
    inclusive prefix sum) and with the all-ones matrix (the row total, in every column), so the
    loop has no cross-thread scan or reduction. Returns the per-row survivor count (which may
    exceed ``capacity``: only the first ``capacity`` are stored)."""
    cols = jnp.arange(block_t)
    upper = (cols[:, None] <= cols[None, :]).astype(jnp.bfloat16)
    ones = jnp.ones((block_t, block_t), jnp.bfloat16)
    spare = _spare(blk, capacity, block_t)

    def step(t, written):                         # written: (block_c, block_t), columns equal
        _, keys, pos, valid = _tile_keys(blk, seq_ref, t, block_t)
        keep = valid[None, :] & (keys >= t_lo[:, None]) & blk.row_ok[:, None]
        keep_b = keep.astype(jnp.bfloat16)
        rank = jnp.dot(keep_b, upper, preferred_element_type=jnp.float32).astype(jnp.int32)
        slot = written + rank - 1
        fits = keep & (slot < capacity)
        slot = jnp.where(fits, slot, spare)
        plgpu.store(key_buf.at[buf_rows[:, None], slot], keys, mask=fits)
        plgpu.store(idx_buf.at[buf_rows[:, None], slot],
                    jnp.broadcast_to(pos[None, :], keys.shape).astype(jnp.int32), mask=fits)
        return written + jnp.dot(keep_b, ones, preferred_element_type=jnp.float32).astype(jnp.int32)

    def body(i, written):     # unrolled: independent tiles in flight (tiles past the end keep none)
        for j in range(unroll):
            written = step(i * unroll + j, written)
        return written

    trips = lax.div(blk.num_tiles + unroll - 1, unroll)
    written = lax.fori_loop(0, trips, body, jnp.zeros((block_c, block_t), jnp.int32))
    return jnp.max(written, axis=1)


def _select_survivors(blk: _Block, idx_ref, score_ref, key_buf, idx_buf, buf_rows, found,
                      overflow, *, k: int, capacity: int, block_c: int, radix_bits: int):
    """Step 4: the exact K-th key among the survivors, and the selection in index order (nothing
    is written for a block that overflowed: the fallback does it)."""
    cols = jnp.arange(capacity)[None, :]
    ok = (cols < found[:, None]) & blk.row_ok[:, None] & jnp.logical_not(overflow)
    s_keys = plgpu.load(key_buf.at[buf_rows[:, None], cols], mask=ok, other=_INT32_MIN)
    s_idx = plgpu.load(idx_buf.at[buf_rows[:, None], cols], mask=ok, other=0)
    kth, above = _radix_kth(lambda th: _count_ge(s_keys, ok, th), k, block_c, radix_bits)
    zeros = jnp.zeros((block_c,), jnp.int32)
    sel, slot, written, _ = _select(s_keys, ok, kth, k - above, zeros, zeros)
    _store_selected(blk, idx_ref, score_ref, k, sel, slot, s_idx, _keys_to_scores(s_keys))
    _store_padding(blk, idx_ref, score_ref, k, written,
                   jnp.broadcast_to(jnp.logical_not(overflow), (block_c,)))


def _fallback(blk: _Block, seq_ref, idx_ref, score_ref, active, *, k: int, block_c: int,
              block_t: int):
    """Step 5: for a block whose survivors overflowed (``active``), the radix select over the whole
    sequence (4-bit digits: 8 passes, every token re-scored on each), then a selection pass. Zero
    trips otherwise."""
    tiles = jnp.where(active, blk.num_tiles, 0)
    zeros = jnp.zeros((block_c,), jnp.int32)

    def count_all(thresholds):
        def body(t, counts):
            _, keys, _, valid = _tile_keys(blk, seq_ref, t, block_t)
            got = _count_ge(keys, valid[None, :], thresholds)
            return tuple(a + b for a, b in zip(counts, got))
        return lax.fori_loop(0, tiles, body, tuple(zeros for _ in thresholds))

    kth, above = _radix_kth(count_all, k, block_c, 4)

    def select_tile(t, carry):
        written, ties = carry
        s, keys, pos, valid = _tile_keys(blk, seq_ref, t, block_t)
        sel, slot, written, ties = _select(keys, valid[None, :] & blk.row_ok[:, None], kth,
                                           k - above, written, ties)
        _store_selected(blk, idx_ref, score_ref, k, sel, slot,
                        jnp.broadcast_to(pos[None, :], keys.shape).astype(jnp.int32), s)
        return written, ties

    written, _ = lax.fori_loop(0, tiles, select_tile, (zeros, zeros))
    _store_padding(blk, idx_ref, score_ref, k, written, jnp.broadcast_to(active, (block_c,)))


class _Refs(NamedTuple):
    """The refs of one program, in ``pallas_call`` order: inputs (block table, request table,
    sequence, candidates, inverse norms), outputs (indices, scores) and the survivor buffers
    (scratch outputs in global memory, ``capacity`` columns per candidate row)."""

    block_req: object
    slots: object
    offsets: object
    lengths: object
    seq: object
    cand: object
    inv: object
    idx: object
    score: object
    key_buf: object
    idx_buf: object


@dataclasses.dataclass(frozen=True)
class _Static:
    """Compile-time parameters of a launch (see :func:`_launch`)."""

    k: int
    bins: int
    capacity: int
    block_c: int
    block_t: int
    trash: bool           # interpret mode: masked-off scatter lanes go to spare targets
    scores: str
    radix_bits: int
    unroll: int


def _steps_bound(r: _Refs, st: _Static):
    """Program ``p``'s block and steps 1-2: returns (block, T_lo)."""
    p = pl.program_id(0)
    n_out = r.idx.shape[0] - (st.block_c if st.trash else 0)
    blk = _load_block(p, r.block_req, r.slots, r.offsets, r.lengths, r.cand, r.inv, n_out,
                      block_c=st.block_c, block_t=st.block_t, trash=st.trash, scores=st.scores)
    ms = _bound(blk, r.seq, bins=st.bins, block_c=st.block_c, block_t=st.block_t)
    return blk, _threshold(ms, k=st.k, block_c=st.block_c, radix_bits=st.radix_bits)


def _step_collect(r: _Refs, st: _Static, blk: _Block, t_lo):
    """Step 3: returns (the block's rows of the survivor buffers, the per-row survivor counts)."""
    buf_rows = pl.program_id(0) * st.block_c + blk.rows
    found = _collect(blk, r.seq, t_lo, r.key_buf, r.idx_buf, buf_rows, capacity=st.capacity,
                     block_c=st.block_c, block_t=st.block_t, unroll=st.unroll)
    return buf_rows, found


def _nn_search_kernel(*refs, st: _Static):
    """One program: one block of <= ``block_c`` candidates of one request, steps 1-5 of the
    module docstring (refs: :class:`_Refs`)."""
    r = _Refs(*refs)
    blk, t_lo = _steps_bound(r, st)
    buf_rows, found = _step_collect(r, st, blk, t_lo)
    _barrier(blk)                # survivors stored by all warps are read back by all warps
    overflow = jnp.max(jnp.where(blk.row_ok, found, 0)) > st.capacity
    _select_survivors(blk, r.idx, r.score, r.key_buf, r.idx_buf, buf_rows, found, overflow,
                      k=st.k, capacity=st.capacity, block_c=st.block_c, radix_bits=st.radix_bits)
    _fallback(blk, r.seq, r.idx, r.score, overflow, k=st.k, block_c=st.block_c,
              block_t=st.block_t)


# -------------------------------------------------------------------------------------- wrapper


_PAIRWISE_MAX_N = 8192
"""Up to this many candidates, ranks within a request come from one pairwise-comparison reduction
(O(N^2) work, one fused kernel: 5 us at N = 4096 on an H100, where XLA's sort took 27 us); beyond
it, from a sort. The crossover is extrapolated, not measured."""


def _block_slots(cand_to_req: jax.Array, num_req: int, block_c: int, num_blocks: int):
    """Blocks of <= block_c candidates of one request (paper's request-level de-duplication: a
    block shares one sequence).

    Request ``r`` owns blocks ``[B_r, B_r + ceil(count_r / block_c))`` with ``B_r`` the blocks of
    the requests before it; its i-th candidate (in input order) goes to slot
    ``B_r * block_c + i``. Returns (slots, block_req): ``slots`` (num_blocks * block_c,) the
    candidate in each slot or -1, ``block_req`` (num_blocks,) each block's request (the last
    request, which the caller keeps empty, for surplus blocks).
    """
    n = cand_to_req.shape[0]
    ids = jnp.arange(n, dtype=jnp.int32)
    counts = jnp.bincount(cand_to_req, length=num_req).astype(jnp.int32)
    if n <= _PAIRWISE_MAX_N:
        earlier = (cand_to_req[None, :] == cand_to_req[:, None]) & (ids[None, :] < ids[:, None])
        rank = jnp.sum(earlier.astype(jnp.int32), axis=1)
    else:
        order = jnp.argsort(cand_to_req, stable=True).astype(jnp.int32)
        position = jnp.zeros((n,), jnp.int32).at[order].set(ids)
        first = jnp.cumsum(counts) - counts
        rank = position - first[cand_to_req]
    blocks = (counts + block_c - 1) // block_c
    block0 = jnp.cumsum(blocks) - blocks
    slot = block0[cand_to_req] * block_c + rank
    slots = jnp.full((num_blocks * block_c,), -1, jnp.int32).at[slot].set(ids)
    head = slots[::block_c]
    block_req = jnp.where(head >= 0, cand_to_req[jnp.maximum(head, 0)], num_req - 1)
    return slots, block_req.astype(jnp.int32)


def _inverse_norms(seq_q: jax.Array) -> jax.Array:
    """1 / |q| per token of int8 codes q (0 for an all-zero token), float32."""
    q = seq_q.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(q * q, axis=1))
    return jnp.where(norm > 0, 1.0 / jnp.maximum(norm, 1.0), 0.0)


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


def _launch(kernel, seq_q, offsets, lengths, cand, cand_to_req, *, k: int,
            config: NNSearchConfig, interpret: bool, name: str):
    """Run ``kernel`` (a function of the :class:`_Refs` and ``st=``:class:`_Static`) over the grid
    of blocks: groups the candidates by request (:func:`_block_slots`), computes the inverse norms,
    and returns the first ``k`` columns of its (indices, scores) outputs for the N candidates."""
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
    slots, block_req = _block_slots(c2r, num_req, block_c, num_blocks)
    trash = bool(interpret)
    if trash:
        # Compiled, masked tile loads past the end touch no memory. Interpret mode slices the refs
        # for real: give it spare rows (never selected: they are past every length).
        seq_q = jnp.pad(seq_q, ((0, bins), (0, 0)))
    out_rows = n + (block_c if trash else 0)
    out_cols = k + (max(block_t, next_pow2(k), capacity) if trash else 0)
    buf_shape = (num_blocks * block_c, capacity + (max(block_t, capacity) if trash else 0))
    st = _Static(k=k, bins=bins, capacity=capacity, block_c=block_c, block_t=block_t, trash=trash,
                 scores=config.scores, radix_bits=config.radix_bits, unroll=config.unroll)
    idx, scores, _, _ = pl.pallas_call(
        functools.partial(kernel, st=st), grid=(num_blocks,), interpret=interpret, name=name,
        out_shape=(jax.ShapeDtypeStruct((out_rows, out_cols), jnp.int32),
                   jax.ShapeDtypeStruct((out_rows, out_cols), jnp.float32),
                   jax.ShapeDtypeStruct(buf_shape, jnp.int32),
                   jax.ShapeDtypeStruct(buf_shape, jnp.int32)),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                             num_stages=config.num_stages),
    )(block_req, slots, offsets, lengths, seq_q, cand, _inverse_norms(seq_q))
    return idx[:n, :k], scores[:n, :k]


def _search(seq_q, offsets, lengths, cand, cand_to_req, *, k: int, config: NNSearchConfig,
            interpret: bool):
    """The jitted body of :func:`nn_search_pallas_triton` (validated inputs, N >= 1)."""
    return _launch(_nn_search_kernel, seq_q, offsets, lengths, cand, cand_to_req, k=k,
                   config=config, interpret=interpret, name="nn_search")


def _prepare(seq_q, offsets, lengths, cand, cand_to_req, k: int, config, interpret):
    """Validate; fill in the config and interpret defaults: (config, interpret)."""
    _validate(seq_q, offsets, lengths, cand, cand_to_req, k)
    config = config or NNSearchConfig()
    config.resolve(k)
    return config, default_interpret() if interpret is None else interpret


@functools.partial(jax.jit, static_argnames=("k", "scale", "config", "interpret"))
def nn_search_pallas_triton(seq_q: jax.Array, offsets: jax.Array, lengths: jax.Array,
                            cand: jax.Array, cand_to_req: jax.Array, *, k: int,
                            scale: float = QUANT_SCALE, config: Optional[NNSearchConfig] = None,
                            interpret: Optional[bool] = None) -> Tuple[jax.Array, jax.Array]:
    """NN(S, c; K) on de-duplicated jagged sequences, in the fused kernel.

    Args:
      seq_q: (T, D) int8 codes of all requests' tokens, concatenated; D a power of two >= 16.
      offsets: (U,) int first row of each request's sequence in ``seq_q``.
      lengths: (U,) int number of tokens of each request (0 allowed); rows
        ``[offsets[u], offsets[u] + lengths[u])`` should lie inside ``seq_q`` (values are not
        checked inside jit: lengths are clipped to the rows that exist, so nothing is read out of
        bounds).
      cand: (N, D) float candidate embeddings.
      cand_to_req: (N,) int request of each candidate, in ``[0, U)``; a candidate with an index
        outside that range gets an all-padding result (-1 / -inf) rather than an error, because
        jitted code cannot raise on values. Validate requests where they enter the program.
      k: K (1..``MAX_K``). scale: int8 scale (0.65; it cancels in the cosine).
      config: the kernel's tiling (default ``NNSearchConfig()``). interpret: Pallas interpret
        mode (default: when no GPU backend is present).

    Returns:
      (indices (N, k) int32, scores (N, k) float32): positions within the request's sequence, in
      chronological order, ``-1`` / ``-inf`` padding, exactly as ``nn_search_reference``.
    """
    del scale
    config, interpret = _prepare(seq_q, offsets, lengths, cand, cand_to_req, k, config, interpret)
    if cand.shape[0] == 0:
        return jnp.zeros((0, k), jnp.int32), jnp.zeros((0, k), jnp.float32)
    return _search(seq_q, offsets, lengths, cand, cand_to_req, k=k, config=config,
                   interpret=interpret)


__all__ = ["nn_search_pallas_triton"]
