"""Jagged HSTU pointwise attention in Pallas (Triton backend): one forward and two backward kernels.

Computes :func:`pallas_kernels.hstu_attention.reference.hstu_attention_reference` ("Actions Speak
Louder than Words", Section 3.1 eq. 2 with rab^{p,t}, Table 9) without padding the jagged batch
and without writing any score to memory, flash-style (the HSTU paper's Appendix G describes the
same fused, "raggified" attention). The reference is the contract;
:mod:`pallas_kernels.hstu_attention.vjp` combines these kernels into one differentiable function and
:func:`pallas_kernels.hstu_attention.api.hstu_attention` is the entry point callers use.

Per-sequence metadata (computed by XLA from ``offsets``, one int32 each): ``start`` (first row),
``length`` (clipped to ``max_seq_len``) and ``history`` (``length`` minus the targets).

Forward (``_fwd_kernel``), grid ``(B, ceil(min(max_seq_len, T) / block_q), H)``
-------------------------------------------------------------------------------
Program (b, i, h) owns query rows ``[i * block_q, (i + 1) * block_q)`` of sequence b, head h (a
program past the sequence's length loads nothing and stores nothing). It keeps its q tile and a
float32 (block_q, Dv) accumulator in registers and walks, in one loop, two ranges of key tiles:

1. history keys (``j < history``): tiles up to the last key any of its rows may see -- the end of
   the query tile when causal (so tiles above the diagonal are skipped), all history otherwise;
2. target keys (``j >= history``): a target sees only itself among the targets, so only the tiles
   that meet the query tile's own rows (its diagonal) are visited.

A tile visited in both ranges (the one holding ``history``) counts each key once: the history
trips mask ``j >= history``, the target trips ``j < history``. One loop rather than two keeps one
copy of the tile body in the kernel. Per key tile: ``S = q k^T + rab`` in float32,
``P = silu(S) / norm`` where allowed (0 elsewhere) rounded to the input dtype, ``acc += P v``. No
running max or denominator: pointwise attention has no softmax, so partial sums just add.

Backward: ``_dq_kernel`` (grid over query tiles, same key ranges as the forward) recomputes S and
produces ``dq = dS k`` and the rab table gradients; ``_dkv_kernel`` (grid over key tiles) walks the
query tiles that can see its keys -- from the key tile on when causal (all of them otherwise) to
the end of the sequence if the tile holds a history key, only its diagonal if it holds targets
only -- and produces ``dv = P^T dO`` and ``dk = dS^T q``, where
``dS = (dO v^T) * silu'(S) / norm`` on allowed pairs. Neither kernel writes S, P or dS to memory;
dq, dk and dv of a row are each written by exactly one program (no atomics). Each ``_dq_kernel``
program stores its own partial rab table gradients, (NUM_*_BUCKETS,) float32 per program, which XLA
sums (deterministic; B * ceil(max_seq_len / block_q) * H * 128 bytes per table, e.g. 8 MiB for
B = 256, max_seq_len = 4096, H = 4, 64-row tiles).

rab without gathers
-------------------
Triton cannot gather from a table, so ``w[bucket(d)]`` is evaluated through the table's
differences ``delta[0] = w[0]``, ``delta[k] = w[k] - w[k - 1]`` (formed by XLA outside the kernel,
so the kernel reads 32 scalars) as ``sum_k [|d| >= boundary_k] delta[k]`` (``boundary_0 = 0``),
with the reference's integer boundaries (``POS_BOUNDARIES``, ``TIME_BOUNDARIES`` of
:mod:`pallas_kernels.hstu_attention.reference`), so every implementation puts a
pair in the same bucket. The gradient of ``delta[k]`` is the sum of dS over pairs with
``|d| >= boundary_k``. Only boundaries inside a tile's range of ``|d|`` over its allowed pairs
(two tile reductions) cost per-element work: a boundary every allowed pair passes adds a scalar
to the bias and takes ``sum(dS)``, one that none passes nothing; the others (a ``lax.cond`` each)
compare and select over the tile, and sum dS in the backward. Relative positions within a tile
span a few buckets (the buckets widen with distance) and so do the time differences of a
chronological sequence, so most of the 31 boundaries per table are skipped; evaluating all of
them made the H200 backward with both tables 13x slower than without (the kernel before this
change; the skipping is not yet timed on a GPU). Calls without tables pay nothing.
The bias is recomputed
per head (it is shared by the heads, but keeping all heads' accumulators on chip would not fit).

Ragged edges: every load is masked by the sequence's own length (rows of the next sequence or
past the array are read as 0, never used), stores are masked likewise, and output rows that no
program writes (padding past ``offsets[-1]``, rows past ``max_seq_len`` of a longer sequence) are
set to 0 by XLA afterwards.

Numerics follow the reference: products take operands in the input dtype with float32
accumulation (IEEE float32 products for float32 inputs), bias, SiLU and its derivative in float32;
P and dS are rounded to the input dtype before their products.

Shared memory (the A10G budget, ``pallas_kernels._common.A10G_SMEM_BYTES`` = 101,376 B per block):
Triton stages each ``dot``'s operands through shared memory; nothing else is allocated there.
:meth:`~pallas_kernels.hstu_attention.config.HstuAttentionConfig.default` documents the measured
figures.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import default_interpret, is_pow2
from pallas_kernels.hstu_attention.config import HstuAttentionConfig
from pallas_kernels.hstu_attention.reference import (
    NUM_POS_BUCKETS,
    NUM_TIME_BUCKETS,
    POS_BOUNDARIES,
    TIME_BOUNDARIES,
    allowed_mask,
    rab_positions,
)

_SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class Static:
    """Compile-time parameters shared by the three kernels."""

    max_seq_len: int
    causal: bool
    norm: float
    has_pos: bool
    has_time: bool


@dataclasses.dataclass(frozen=True)
class SeqMeta:
    """Per-sequence int32 metadata: first row, length (<= max_seq_len), history length; (B,)
    arrays outside the kernels, the program's own scalars inside."""

    start: jax.Array
    length: jax.Array
    history: jax.Array


def table_deltas(w: jax.Array) -> jax.Array:
    """``delta[0] = w[0]``, ``delta[k] = w[k] - w[k - 1]`` in float32 (see the module docstring)."""
    w = w.astype(jnp.float32)
    return jnp.concatenate([w[:1], w[1:] - w[:-1]])


# ----------------------------------------------------------------------------- in-kernel helpers


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` with float32 accumulation (IEEE float32 products for float32 operands)."""
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)


def _cdiv(a, b: int):
    """Ceiling division of a non-negative traced int by a positive constant."""
    return lax.div(a + (b - 1), b)


def _load_rows(ref, row0, local, length):
    """Rows ``row0 + local`` of a (T, w) ref, zero where ``local >= length``."""
    return plgpu.load(ref.at[pl.ds(row0, local.shape[0]), :], mask=(local < length)[:, None],
                      other=0)


def _load_vec(ref, row0, local, length):
    """Entries ``row0 + local`` of a (T,) ref, zero where ``local >= length``."""
    return plgpu.load(ref.at[pl.ds(row0, local.shape[0])], mask=local < length, other=0)


@dataclasses.dataclass(frozen=True)
class _Distances:
    """One tile's ``|d|`` (bucketed distances, int32 tile) and their range over the allowed pairs
    (scalars; ``lo > hi`` when no pair is allowed). A boundary ``<= lo`` holds for every allowed
    pair, one ``> hi`` for none: only boundaries in ``(lo, hi]`` need the tile (module docstring)."""

    mag: jax.Array
    lo: jax.Array
    hi: jax.Array
    boundaries: Tuple[int, ...]


def _distances(diff: jax.Array, allowed: jax.Array, boundaries: Sequence[int]) -> _Distances:
    mag = jnp.abs(diff)
    lo = jnp.min(jnp.where(allowed, mag, jnp.iinfo(jnp.int32).max))
    hi = jnp.max(jnp.where(allowed, mag, -1))
    return _Distances(mag, lo, hi, tuple(boundaries))


def _table_bias(dist: _Distances, delta_ref) -> jax.Array:
    """``w[bucket]`` as ``delta[0] + sum_k [|d| >= boundary_k] delta[k + 1]`` (float32 tile) on the
    allowed pairs: boundaries every allowed pair passes add a scalar, those none passes nothing,
    and only the rest (``lax.cond``) touch the tile."""
    const = delta_ref[0]
    bias = jnp.zeros(dist.mag.shape, jnp.float32)
    for k, edge in enumerate(dist.boundaries):
        delta = delta_ref[k + 1]
        const = const + jnp.where(edge <= dist.lo, delta, 0.0)
        bias = lax.cond((dist.lo < edge) & (edge <= dist.hi),
                        lambda b, e=edge, d=delta: b + jnp.where(dist.mag >= e, d, 0.0),
                        lambda b: b, bias)
    return bias + const


def _table_grad(dist: _Distances, ds: jax.Array, num: int) -> jax.Array:
    """Gradient of the table deltas from one tile's dS (zero on pairs not allowed):
    ``[sum(dS), sum(dS [|d| >= boundary_k])...]`` as a (num,) float32 vector (built with selects:
    Triton cannot scatter into a vector); a boundary every allowed pair passes takes ``sum(dS)``,
    one none passes 0, only the rest sum over the tile."""
    idx = jnp.arange(num)
    total = jnp.sum(ds)
    grad = jnp.where(idx == 0, total, 0.0)
    for k, edge in enumerate(dist.boundaries):
        part = lax.cond((dist.lo < edge) & (edge <= dist.hi),
                        lambda e=edge: jnp.sum(jnp.where(dist.mag >= e, ds, 0.0)),
                        lambda e=edge: jnp.where(e <= dist.lo, total, 0.0))
        grad = grad + jnp.where(idx == k + 1, part, 0.0)
    return grad


def _load_seq(meta_refs) -> SeqMeta:
    """The program's sequence metadata as scalars (the grid's first axis is the sequence)."""
    b = pl.program_id(0)
    start_ref, length_ref, history_ref = meta_refs
    return SeqMeta(start_ref[b], length_ref[b], history_ref[b])


@dataclasses.dataclass(frozen=True)
class _Tile:
    """Score tile context: local positions of query rows and key columns, the timestamps (if any)
    and, in the two-pass key loops, whether this is the history pass (keys ``j < history``
    only) or the target pass (``j >= history`` only); None: every key."""

    pos_q: jax.Array
    pos_k: jax.Array
    ts_q: Optional[jax.Array]
    ts_k: Optional[jax.Array]
    hist_pass: Optional[jax.Array]


def _mask_and_bias(tile: _Tile, seq: SeqMeta, st: Static, pos_ref, time_ref):
    """(allowed, bias, pos_dist, time_dist) of one (block_q, block_k) score tile; the bias is
    exact on allowed pairs only (the others are masked out of every result)."""
    pq, pk = tile.pos_q[:, None], tile.pos_k[None, :]
    allowed = allowed_mask(pq, pk, seq.length, seq.history, st.causal)
    if tile.hist_pass is not None:
        allowed = allowed & ((pk < seq.history) == tile.hist_pass)
    bias = jnp.zeros(allowed.shape, jnp.float32)
    pos_dist = time_dist = None
    if st.has_pos:
        rq, rk = rab_positions(pq, seq.history), rab_positions(pk, seq.history)
        pos_dist = _distances(rq - rk, allowed, POS_BOUNDARIES)
        bias = bias + _table_bias(pos_dist, pos_ref)
    if st.has_time:
        time_dist = _distances(tile.ts_q[:, None] - tile.ts_k[None, :], allowed, TIME_BOUNDARIES)
        bias = bias + _table_bias(time_dist, time_ref)
    return allowed, bias, pos_dist, time_dist


def _silu_and_grad(s: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """``silu(s)`` and ``silu'(s) = sig(s) (1 + s (1 - sig(s)))`` in float32."""
    sig = 1.0 / (1.0 + jnp.exp(-s))
    return s * sig, sig * (1.0 + s * (1.0 - sig))


def _key_ranges(q0, block_q: int, block_k: int, seq: SeqMeta, causal: bool):
    """Key tiles of a query tile starting at local row ``q0``, as one loop of ``n_hist + n_tgt``
    trips: trips ``t < n_hist`` visit history tile ``t``, the rest target tiles from ``tgt_lo`` on
    (its diagonal; module docstring). Returns ``(n_hist, tgt_lo, n_tgt)``."""
    q_end = jnp.minimum(q0 + block_q, seq.length)
    hist_end = jnp.minimum(q_end, seq.history) if causal else seq.history
    n_hist = jnp.where(q0 < seq.length, _cdiv(hist_end, block_k), 0)   # no rows: no keys
    tgt_lo_row = jnp.maximum(seq.history, q0)
    tgt_lo = lax.div(tgt_lo_row, block_k)
    n_tgt = jnp.where(q_end > tgt_lo_row, _cdiv(q_end, block_k) - tgt_lo, 0)
    return n_hist, tgt_lo, n_tgt


def _key_tile(t, n_hist, tgt_lo):
    """(key tile index, history pass?) of trip ``t`` of the :func:`_key_ranges` loop."""
    is_hist = t < n_hist
    return jnp.where(is_hist, t, tgt_lo + t - n_hist), is_hist


def _query_range(k0, block_q: int, block_k: int, seq: SeqMeta, causal: bool):
    """Query tile range ``(lo, hi)`` that can see keys ``[k0, k0 + block_k)`` (module docstring)."""
    has_hist = k0 < seq.history
    lo_row = k0 if causal else jnp.where(has_hist, 0, k0)
    hi_row = jnp.where(has_hist, seq.length, jnp.minimum(k0 + block_k, seq.length))
    lo = lax.div(lo_row, block_q)
    hi = jnp.where(hi_row > lo_row, _cdiv(hi_row, block_q), lo)
    return lo, hi


def _split_refs(refs, st: Static, n_in: int):
    """(meta_refs, tensor inputs, ts_ref, pos_ref, time_ref, outputs) from the flat ref list."""
    meta, rest = refs[:3], refs[3:]
    tensors, rest = rest[:n_in], rest[n_in:]
    ts_ref = pos_ref = time_ref = None
    if st.has_time:
        ts_ref, rest = rest[0], rest[1:]
    if st.has_pos:
        pos_ref, rest = rest[0], rest[1:]
    if st.has_time:
        time_ref, rest = rest[0], rest[1:]
    return meta, tensors, ts_ref, pos_ref, time_ref, rest


# --------------------------------------------------------------------------------------- kernels


def _key_tile_scores(t, q, pos_q, ts_q, seq, st: Static, n_hist, tgt_lo, block_k: int,
                     k_ref, v_ref, ts_ref, pos_ref, time_ref):
    """Step ``t`` of a query tile's loop over key tiles (forward and dq kernels): the tile's keys
    and values, the allowed mask, the scores ``S = Q K^T + rab`` and the rab distances (for the
    table gradients)."""
    j, hist_pass = _key_tile(t, n_hist, tgt_lo)
    k0 = j * block_k
    pos_k = k0 + jnp.arange(block_k)
    krow0 = seq.start + k0
    k = _load_rows(k_ref, krow0, pos_k, seq.length)
    v = _load_rows(v_ref, krow0, pos_k, seq.length)
    ts_k = _load_vec(ts_ref, krow0, pos_k, seq.length) if st.has_time else None
    tile = _Tile(pos_q, pos_k, ts_q, ts_k, hist_pass)
    allowed, bias, pos_dist, time_dist = _mask_and_bias(tile, seq, st, pos_ref, time_ref)
    return k, v, allowed, _mm(q, k.T) + bias, pos_dist, time_dist


def _fwd_kernel(*refs, st: Static, block_q: int, block_k: int):
    meta, (q_ref, k_ref, v_ref), ts_ref, pos_ref, time_ref, (o_ref,) = _split_refs(refs, st, 3)
    seq = _load_seq(meta)
    q0 = pl.program_id(1) * block_q
    row0 = seq.start + q0
    pos_q = q0 + jnp.arange(block_q)
    q = _load_rows(q_ref, row0, pos_q, seq.length)
    ts_q = _load_vec(ts_ref, row0, pos_q, seq.length) if st.has_time else None

    n_hist, tgt_lo, n_tgt = _key_ranges(q0, block_q, block_k, seq, st.causal)

    def key_tile(t, acc):
        _, v, allowed, s, _, _ = _key_tile_scores(t, q, pos_q, ts_q, seq, st, n_hist, tgt_lo, block_k,
                                                  k_ref, v_ref, ts_ref, pos_ref, time_ref)
        silu, _ = _silu_and_grad(s)
        p = jnp.where(allowed, silu * (1.0 / st.norm), 0.0)
        return acc + _mm(p.astype(v.dtype), v)

    acc = jnp.zeros((block_q, o_ref.shape[-1]), jnp.float32)
    acc = lax.fori_loop(0, n_hist + n_tgt, key_tile, acc)
    plgpu.store(o_ref.at[pl.ds(row0, block_q), :], acc.astype(o_ref.dtype),
                mask=(pos_q < seq.length)[:, None])


def _dq_kernel(*refs, st: Static, block_q: int, block_k: int):
    meta, (q_ref, k_ref, v_ref, do_ref), ts_ref, pos_ref, time_ref, outs = _split_refs(refs, st, 4)
    dq_ref, rest = outs[0], list(outs[1:])
    dpos_ref = rest.pop(0) if st.has_pos else None
    dtime_ref = rest.pop(0) if st.has_time else None
    seq = _load_seq(meta)
    q0 = pl.program_id(1) * block_q
    row0 = seq.start + q0
    pos_q = q0 + jnp.arange(block_q)
    q = _load_rows(q_ref, row0, pos_q, seq.length)
    do = _load_rows(do_ref, row0, pos_q, seq.length)
    ts_q = _load_vec(ts_ref, row0, pos_q, seq.length) if st.has_time else None

    n_hist, tgt_lo, n_tgt = _key_ranges(q0, block_q, block_k, seq, st.causal)

    def key_tile(t, carry):
        dq, gpos, gtime = carry
        k, v, allowed, s, pos_dist, time_dist = _key_tile_scores(
            t, q, pos_q, ts_q, seq, st, n_hist, tgt_lo, block_k, k_ref, v_ref, ts_ref, pos_ref,
            time_ref)
        _, dsilu = _silu_and_grad(s)
        dp = _mm(do, v.T)
        ds = jnp.where(allowed, dp * dsilu * (1.0 / st.norm), 0.0)
        dq = dq + _mm(ds.astype(k.dtype), k)
        if st.has_pos:
            gpos = gpos + _table_grad(pos_dist, ds, NUM_POS_BUCKETS)
        if st.has_time:
            gtime = gtime + _table_grad(time_dist, ds, NUM_TIME_BUCKETS)
        return dq, gpos, gtime

    carry = (jnp.zeros((block_q, q_ref.shape[-1]), jnp.float32),
             jnp.zeros((NUM_POS_BUCKETS,), jnp.float32),
             jnp.zeros((NUM_TIME_BUCKETS,), jnp.float32))
    dq, gpos, gtime = lax.fori_loop(0, n_hist + n_tgt, key_tile, carry)
    plgpu.store(dq_ref.at[pl.ds(row0, block_q), :], dq.astype(dq_ref.dtype),
                mask=(pos_q < seq.length)[:, None])
    if st.has_pos:
        dpos_ref[...] = gpos
    if st.has_time:
        dtime_ref[...] = gtime


def _dkv_kernel(*refs, st: Static, block_q: int, block_k: int):
    meta, (q_ref, k_ref, v_ref, do_ref), ts_ref, pos_ref, time_ref, (dk_ref, dv_ref) = \
        _split_refs(refs, st, 4)
    seq = _load_seq(meta)
    k0 = pl.program_id(1) * block_k
    krow0 = seq.start + k0
    pos_k = k0 + jnp.arange(block_k)
    k = _load_rows(k_ref, krow0, pos_k, seq.length)
    v = _load_rows(v_ref, krow0, pos_k, seq.length)
    ts_k = _load_vec(ts_ref, krow0, pos_k, seq.length) if st.has_time else None

    def query_tile(i, carry):
        dk, dv = carry
        q0 = i * block_q
        pos_q = q0 + jnp.arange(block_q)
        row0 = seq.start + q0
        q = _load_rows(q_ref, row0, pos_q, seq.length)
        do = _load_rows(do_ref, row0, pos_q, seq.length)
        ts_q = _load_vec(ts_ref, row0, pos_q, seq.length) if st.has_time else None
        tile = _Tile(pos_q, pos_k, ts_q, ts_k, None)
        allowed, bias, _, _ = _mask_and_bias(tile, seq, st, pos_ref, time_ref)
        s = _mm(q, k.T) + bias
        silu, dsilu = _silu_and_grad(s)
        scale = 1.0 / st.norm
        p = jnp.where(allowed, silu * scale, 0.0)
        dv = dv + _mm(p.astype(do.dtype).T, do)
        dp = _mm(do, v.T)
        ds = jnp.where(allowed, dp * dsilu * scale, 0.0)
        dk = dk + _mm(ds.astype(q.dtype).T, q)
        return dk, dv

    lo, hi = _query_range(k0, block_q, block_k, seq, st.causal)
    carry = (jnp.zeros((block_k, k_ref.shape[-1]), jnp.float32),
             jnp.zeros((block_k, v_ref.shape[-1]), jnp.float32))
    dk, dv = lax.fori_loop(lo, hi, query_tile, carry)
    keep = (pos_k < seq.length)[:, None]
    plgpu.store(dk_ref.at[pl.ds(krow0, block_k), :], dk.astype(dk_ref.dtype), mask=keep)
    plgpu.store(dv_ref.at[pl.ds(krow0, block_k), :], dv.astype(dv_ref.dtype), mask=keep)


# -------------------------------------------------------------------------------------- wrappers


def validate(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    """What the kernels need beyond the reference's checks; errors name the argument."""
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"q: dtype {q.dtype} not supported (float32, bfloat16, float16)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"k, v: expected q's dtype {q.dtype}, got {k.dtype} and {v.dtype}")
    for name, width in (("q/k head width Dqk", q.shape[-1]), ("v head width Dv", v.shape[-1])):
        if not is_pow2(width) or width < 16:
            raise ValueError(f"{name}: the kernel needs a power of two >= 16 (Triton tile sizes), "
                             f"got {width}; use impl='xla' for other widths")


def valid_rows(offsets: jax.Array, total: int, max_seq_len: int) -> jax.Array:
    """(T,) bool: row is inside a sequence and among its first ``max_seq_len`` rows (the rows the
    kernels write)."""
    offsets = offsets.astype(jnp.int32)
    tok = jnp.arange(total, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(offsets, tok, side="right") - 1, 0, offsets.shape[0] - 1)
    local = tok - offsets[seq]
    return (tok >= offsets[0]) & (tok < offsets[-1]) & (local < max_seq_len)


def _longest(st: Static, total: int) -> int:
    """Static bound on a sequence's length: ``max_seq_len``, or the row count if smaller (the
    grid's tile axis covers it; programs past their own sequence's end exit at once)."""
    return max(1, min(st.max_seq_len, total))


def _zero_invalid(x: jax.Array, rows: jax.Array) -> jax.Array:
    return jnp.where(rows[:, None, None], x, jnp.zeros((), x.dtype))


def _call(kernel, grid, tensors, outs, meta: SeqMeta, timestamps, pos_delta, time_delta,
          st: Static, config: HstuAttentionConfig, interpret: bool, name: str):
    """One ``pallas_call``: every (T, H, w) tensor, in and out, is seen per head as a (T, w) ref;
    a 4-d output (B, n_tiles, H, num_buckets) holds one table gradient per program."""

    def per_head(a):
        return pl.BlockSpec((a.shape[0], None, a.shape[-1]), lambda b, i, h: (0, h, 0))

    def whole(a):
        return pl.BlockSpec(a.shape, lambda b, i, h, nd=a.ndim: (0,) * nd)

    inputs = [meta.start, meta.length, meta.history, *tensors]
    specs = [whole(meta.start)] * 3 + [per_head(t) for t in tensors]
    for flag, arr in ((st.has_time, timestamps), (st.has_pos, pos_delta),
                      (st.has_time, time_delta)):
        if flag:
            inputs.append(arr)
            specs.append(whole(arr))
    out_specs = []
    for o in outs:
        if len(o.shape) == 3:
            out_specs.append(per_head(o))
        else:
            out_specs.append(pl.BlockSpec((None, None, None, o.shape[-1]),
                                          lambda b, i, h: (b, i, h, 0)))
    return pl.pallas_call(
        functools.partial(kernel, st=st, block_q=config.block_q, block_k=config.block_k),
        grid=grid,
        in_specs=specs,
        out_specs=out_specs,
        out_shape=outs,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                             num_stages=config.num_stages),
        interpret=interpret,
        name=name,
    )(*inputs)


def hstu_attention_fwd(q, k, v, offsets, meta: SeqMeta, timestamps, pos_delta, time_delta, *,
                       st: Static, config: Optional[HstuAttentionConfig] = None,
                       interpret: Optional[bool] = None) -> jax.Array:
    """Forward kernel: (T, H, Dv) in q's dtype, rows no sequence owns zero. ``pos_delta`` /
    ``time_delta`` are :func:`table_deltas` of the tables (used when ``st.has_pos`` /
    ``st.has_time``)."""
    validate(q, k, v)
    total, heads, _ = q.shape
    batch = meta.start.shape[0]
    width = max(q.shape[-1], v.shape[-1])
    config = config or HstuAttentionConfig.default(st.max_seq_len, width, q.dtype)
    interpret = default_interpret() if interpret is None else interpret
    if total == 0 or batch == 0:
        return jnp.zeros(v.shape, q.dtype)
    grid = (batch, pl.cdiv(_longest(st, total), config.block_q), heads)
    out = _call(_fwd_kernel, grid, (q, k, v), [jax.ShapeDtypeStruct(v.shape, q.dtype)], meta,
                timestamps, pos_delta, time_delta, st, config, interpret, "hstu_attention_fwd")[0]
    return _zero_invalid(out, valid_rows(offsets, total, st.max_seq_len))


def hstu_attention_bwd(q, k, v, do, offsets, meta: SeqMeta, timestamps, pos_delta, time_delta, *,
                       st: Static, config: Optional[HstuAttentionConfig] = None,
                       interpret: Optional[bool] = None):
    """Backward kernels: (dq, dk, dv, d pos_delta or None, d time_delta or None)."""
    validate(q, k, v)
    total, heads, _ = q.shape
    batch = meta.start.shape[0]
    width = max(q.shape[-1], v.shape[-1])
    config = config or HstuAttentionConfig.default(st.max_seq_len, width, q.dtype, backward=True)
    interpret = default_interpret() if interpret is None else interpret
    dpos = jnp.zeros((NUM_POS_BUCKETS,), jnp.float32) if st.has_pos else None
    dtime = jnp.zeros((NUM_TIME_BUCKETS,), jnp.float32) if st.has_time else None
    if total == 0 or batch == 0:
        return jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v), dpos, dtime
    do = do.astype(q.dtype)
    n_q = pl.cdiv(_longest(st, total), config.block_q)
    outs = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if st.has_pos:
        outs.append(jax.ShapeDtypeStruct((batch, n_q, heads, NUM_POS_BUCKETS), jnp.float32))
    if st.has_time:
        outs.append(jax.ShapeDtypeStruct((batch, n_q, heads, NUM_TIME_BUCKETS), jnp.float32))
    res = _call(_dq_kernel, (batch, n_q, heads), (q, k, v, do), outs, meta, timestamps,
                pos_delta, time_delta, st, config, interpret, "hstu_attention_dq")
    dq, rest = res[0], list(res[1:])
    if st.has_pos:
        dpos = jnp.sum(rest.pop(0), axis=(0, 1, 2))
    if st.has_time:
        dtime = jnp.sum(rest.pop(0), axis=(0, 1, 2))
    n_k = pl.cdiv(_longest(st, total), config.block_k)
    dk, dv = _call(_dkv_kernel, (batch, n_k, heads), (q, k, v, do),
                   [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
                   meta, timestamps, pos_delta, time_delta, st, config, interpret,
                   "hstu_attention_dkv")
    rows = valid_rows(offsets, total, st.max_seq_len)
    return _zero_invalid(dq, rows), _zero_invalid(dk, rows), _zero_invalid(dv, rows), dpos, dtime


__all__ = ["SeqMeta", "Static", "hstu_attention_bwd", "hstu_attention_fwd", "table_deltas",
           "valid_rows", "validate"]
