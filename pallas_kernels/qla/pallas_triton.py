"""Jagged quasi-linear attention (VISTA, Section 3.2.2) in Pallas (Triton backend).

Computes :func:`pallas_kernels.qla.reference.qla_reference` without padding the jagged batch and
without materialising any per-row (D, Dv) state in memory. The reference is the contract;
:mod:`pallas_kernels.qla.vjp` combines these kernels into one differentiable function and
:func:`pallas_kernels.qla.api.qla` is the entry point callers use. Notation of the reference: per
sequence b, ``a = phi(q)``, ``c = phi(k)`` (phi = SiLU), ``M_b = sum_{j in S} c_j^T v_j`` (D, Dv),
``P_b = phi(M_b)``; seeds add ``(a_t . c_t) v_t``.

Metadata (XLA, from ``offsets`` and ``num_targets``; :func:`jagged_meta`): per sequence ``start``,
``length``, ``history`` (int32 (B,)); per row ``row_seq`` (its sequence, -1 for padding) and
``row_seed`` (1 for a seed row) (int32 (T,)).

Full case (``causal=False``): two kernels forward, two backward, all matrix products
------------------------------------------------------------------------------------
1. ``_state_kernel``, grid ``(B * n_split, H, Dv / block_dv)``: program (b, s) walks its share
   (contiguous ``1 / n_split`` of the row tiles) of sequence b's history rows and accumulates the
   partial state ``phi(k)^T v[:, cols]`` in a float32 (D, block_dv) tile; XLA sums the ``n_split``
   partials (deterministic, no atomics) and applies the outer phi: ``P_b = phi(M_b)``, rounded to
   the input dtype ((B, D, H, Dv): B H D Dv values, tiny). ``n_split`` (``QlaConfig.split_rows``)
   spreads a batch of few long sequences (B = 1, 100k rows) over the GPU.
2. ``_out_kernel``, grid ``(ceil(T / block_rows), H, Dv / block_dv)``: one program per tile of
   rows of the flat token axis (a tile may straddle sequences). It loops over the sequences its
   rows belong to (usually one or two: ``first..last`` of its ``row_seq``), and adds
   ``phi(q) P_s`` on the rows of sequence s; then the seed rows' diagonal term
   ``(a_t . c_t) v_t``. Padding rows get 0 (every row is written by exactly one program).

Backward (Appendix B with the outer phi; :mod:`pallas_kernels.qla.vjp` derives it):
``dP_b = sum_{i in b} a_i^T dO_i`` over all rows of b (history and seeds) is ``_state_kernel``
again (x = q, y = dO, every row); XLA forms ``dM = dP * phi'(M)`` (rounded to the input dtype).
Then ``_bwd_rows_kernel``, grid ``(ceil(T / block_rows), H)``, per row tile, loops over column
blocks of Dv and over the tile's sequences: ``da = dO P^T`` (every row), ``dc = v dM^T`` and
``dv = c dM`` (history rows); seeds: ``da += (dO_t . v_t) c_t``, ``dc = (dO_t . v_t) a_t``,
``dv = (a_t . c_t) dO_t``; finally ``dq = da phi'(q)``, ``dk = dc phi'(k)``.

Causal case: one program per (sequence, head, column block), rows in order
-------------------------------------------------------------------------
``out_i = a_i phi(C_i)`` with a different (D, Dv) state per row, and the outer phi is not linear:
no tile-level shortcut exists (unlike causal linear attention, a tile's outputs cannot be formed
from the tile-start state plus an intra-tile product). ``_causal_fwd_kernel`` (grid
``(B, H, Dv / block_dv)``) walks its sequence's row tiles in order, and within a tile its history
rows one at a time (each picked out of the tile by a masked sum; Triton cannot index a register
tile): ``C += c_r^T v_r``, ``out_r = sum_e a_re phi(C)_e`` (float32, elementwise on the
(D, block_dv) state). Seed rows (state = the whole history) take one matrix product per tile.
It also writes the final state ``M_b`` for the backward pass.

``_causal_bwd_kernel`` (same grid) starts from that final state and walks the rows in *reverse*:
``R += dC_i = (a_i^T dO_i) * phi'(C_i)`` (R_j = sum_{i >= j} dC_i, seeds included), then for a
history row ``dc_j = R v_j``, ``dv_j = c_j^T R``, ``da_i = dO_i phi(C_i)^T``, and
``C -= c_j^T v_j`` (the earlier state; float32 rounding of this subtraction grows like
sqrt(length) ulps of the state: about 2e-5 relative at 100k rows). ``da`` and ``dc`` sum over all
Dv columns, so each column block writes its partial (times ``phi'``), summed by XLA. The causal
kernels do O(length D Dv) elementwise work per sequence on one program per (head, column block):
correct and O(N), but far slower than the full case (which the paper uses).

Ragged edges: every load is masked by the row's validity (rows of the next sequence or past the
array read as 0; ``phi(0) = 0``, so a zero row adds nothing to a state); stores are masked to the
rows a program owns; rows no causal program writes (padding) are zeroed by XLA.

Numerics follow the reference: products take operands in the input dtype with float32
accumulation (IEEE float32 for float32 inputs); phi, phi', the states and the seed term in
float32.

Shared memory (A10G budget ``pallas_kernels._common.A10G_SMEM_BYTES`` = 101,376 B per block):
see :meth:`pallas_kernels.qla.config.QlaConfig.default` for the per-kernel estimate.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import default_interpret, is_pow2, next_pow2
from pallas_kernels.qla.config import MAX_SPLIT, QlaConfig
from pallas_kernels.qla.reference import (
    history_lengths,
    row_meta,
    sequence_lengths,
    silu_f32,
    silu_grad_f32,
)

_SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_NO_SEQ = 1 << 30
"""Larger than any sequence index: the first sequence of a tile with no valid row."""


class Jagged(NamedTuple):
    """int32 metadata of the jagged batch (computed by XLA, :func:`jagged_meta`)."""

    start: jax.Array       # (B,) first row of each sequence
    length: jax.Array      # (B,) rows of each sequence
    history: jax.Array     # (B,) history rows (length minus seeds)
    row_seq: jax.Array     # (T,) sequence of each row, -1 for padding
    row_seed: jax.Array    # (T,) 1 for seed rows, else 0


def jagged_meta(offsets: jax.Array, num_targets: Optional[jax.Array], total: int) -> Jagged:
    """:class:`Jagged` from ``offsets`` (B + 1,) and ``num_targets`` (B,) (None: no seeds)."""
    offsets = offsets.astype(jnp.int32)
    lengths = sequence_lengths(offsets)
    rows = row_meta(offsets, num_targets, total)
    return Jagged(offsets[:-1], lengths, history_lengths(lengths, num_targets),
                  jnp.where(rows.valid, rows.seq, -1).astype(jnp.int32),
                  rows.seed.astype(jnp.int32))


# ----------------------------------------------------------------------------- in-kernel helpers


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` with float32 accumulation (IEEE float32 products for float32 operands)."""
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)


def _cdiv(a, b: int):
    """Ceiling division of a non-negative traced int by a positive constant."""
    return lax.div(a + (b - 1), b)


def _silu(x: jax.Array) -> jax.Array:
    """``phi(x)`` in float32."""
    x = x.astype(jnp.float32)
    return x / (1.0 + jnp.exp(-x))


def _silu_and_grad(x: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """``phi(x)`` and ``phi'(x) = sig (1 + x (1 - sig))`` in float32."""
    x = x.astype(jnp.float32)
    sig = 1.0 / (1.0 + jnp.exp(-x))
    return x * sig, sig * (1.0 + x * (1.0 - sig))


def _phi(x: jax.Array) -> jax.Array:
    """``phi(x)`` rounded to x's dtype (a product operand)."""
    return _silu(x).astype(x.dtype)


def _load(ref, row0, rows: int, ok: jax.Array, col0=None, cols: Optional[int] = None):
    """Rows ``row0 .. row0 + rows`` (columns ``col0 .. col0 + cols``, or all) of a 2-D ref, zero
    where not ``ok`` (rows,)."""
    cidx = slice(None) if cols is None else pl.ds(col0, cols)
    return plgpu.load(ref.at[pl.ds(row0, rows), cidx], mask=ok[:, None], other=0)


def _store(ref, row0, value: jax.Array, ok: jax.Array, col0=None) -> None:
    cidx = slice(None) if col0 is None else pl.ds(col0, value.shape[1])
    plgpu.store(ref.at[pl.ds(row0, value.shape[0]), cidx], value.astype(ref.dtype),
                mask=ok[:, None])


def _pick(tile: jax.Array, hit: jax.Array) -> jax.Array:
    """Row ``hit`` (a (rows,) one-hot bool) of a float32 register tile, as a vector."""
    return jnp.sum(jnp.where(hit[:, None], tile, 0.0), axis=0)


def _put(tile: jax.Array, hit: jax.Array, row: jax.Array) -> jax.Array:
    """``tile`` with row ``hit`` replaced by ``row``."""
    return jnp.where(hit[:, None], row[None, :], tile)


def _tile_rows(row_seq_ref, row_seed_ref, block_rows: int, total: int):
    """This program's row tile of the flat token axis: (row0, in-bounds mask, row_seq, is_seed,
    first sequence, last sequence)."""
    row0 = pl.program_id(0) * block_rows
    inb = row0 + jnp.arange(block_rows) < total
    sid = plgpu.load(row_seq_ref.at[pl.ds(row0, block_rows)], mask=inb, other=-1)
    seed = plgpu.load(row_seed_ref.at[pl.ds(row0, block_rows)], mask=inb, other=0) > 0
    first = jnp.min(jnp.where(sid >= 0, sid, _NO_SEQ))
    last = jnp.max(sid)
    return row0, inb, sid, seed & (sid >= 0), first, last


# --------------------------------------------------------------------------- full-case kernels


def _state_kernel(start_ref, count_ref, x_ref, y_ref, o_ref, *, block_rows: int, n_split: int):
    """Partial ``phi(x)^T y`` over the first ``count`` rows of sequence b, share s of n_split."""
    pid = pl.program_id(0)
    b, s = pid // n_split, pid % n_split
    start, count = start_ref[b], count_ref[b]
    n_tiles = _cdiv(count, block_rows)
    per = _cdiv(n_tiles, n_split)
    lo = jnp.minimum(s * per, n_tiles)
    hi = jnp.minimum(lo + per, n_tiles)
    iota = jnp.arange(block_rows)

    def tile(t, acc):
        r0 = t * block_rows
        ok = r0 + iota < count
        x = _phi(_load(x_ref, start + r0, block_rows, ok))
        y = _load(y_ref, start + r0, block_rows, ok)
        return acc + _mm(x.T, y)

    acc = jnp.zeros((x_ref.shape[-1], y_ref.shape[-1]), jnp.float32)
    o_ref[...] = lax.fori_loop(lo, hi, tile, acc)


def _out_kernel(row_seq_ref, row_seed_ref, q_ref, k_ref, v_ref, p_ref, o_ref, *,
                block_rows: int, total: int):
    """Output columns of one row tile: ``phi(q) P_s`` per sequence s, plus the seed term."""
    row0, inb, sid, seed, first, last = _tile_rows(row_seq_ref, row_seed_ref, block_rows, total)
    dim = q_ref.shape[-1]
    a = _phi(_load(q_ref, row0, block_rows, inb))

    def sequence(s, acc):
        p = p_ref[pl.ds(s * dim, dim), :]
        return acc + jnp.where((sid == s)[:, None], _mm(a, p), 0.0)

    acc = jnp.zeros((block_rows, o_ref.shape[-1]), jnp.float32)
    acc = lax.fori_loop(first, last + 1, sequence, acc)
    # k and v only matter on seed rows: loads masked to them cost no traffic on history tiles.
    c = _phi(_load(k_ref, row0, block_rows, seed))
    v = _load(v_ref, row0, block_rows, seed).astype(jnp.float32)
    diag = jnp.sum(a.astype(jnp.float32) * c.astype(jnp.float32), axis=1)
    acc = acc + jnp.where(seed[:, None], diag[:, None] * v, 0.0)
    _store(o_ref, row0, acc, inb)


def _bwd_rows_kernel(row_seq_ref, row_seed_ref, q_ref, k_ref, v_ref, do_ref, p_ref, dm_ref,
                     dq_ref, dk_ref, dv_ref, *, block_rows: int, block_dv: int, total: int):
    """dq, dk, dv of one row tile (module docstring)."""
    row0, inb, sid, seed, first, last = _tile_rows(row_seq_ref, row_seed_ref, block_rows, total)
    hist = (sid >= 0) & ~seed
    dim = q_ref.shape[-1]
    q = _load(q_ref, row0, block_rows, inb)
    k = _load(k_ref, row0, block_rows, inb)
    a, c = _phi(q), _phi(k)
    a32, c32 = a.astype(jnp.float32), c.astype(jnp.float32)
    diag = jnp.sum(a32 * c32, axis=1)

    def column_block(f, carry):
        da, dc, gv = carry
        col0 = f * block_dv
        g = _load(do_ref, row0, block_rows, inb, col0, block_dv)
        v = _load(v_ref, row0, block_rows, inb, col0, block_dv)

        def sequence(s, inner):
            da, dc, dv = inner
            p = p_ref[pl.ds(s * dim, dim), pl.ds(col0, block_dv)]
            dm = dm_ref[pl.ds(s * dim, dim), pl.ds(col0, block_dv)]
            in_s = (sid == s)[:, None]
            hist_s = in_s & hist[:, None]
            da = da + jnp.where(in_s, _mm(g, p.T), 0.0)
            dc = dc + jnp.where(hist_s, _mm(v, dm.T), 0.0)
            dv = dv + jnp.where(hist_s, _mm(c, dm), 0.0)
            return da, dc, dv

        dv = jnp.zeros((block_rows, block_dv), jnp.float32)
        da, dc, dv = lax.fori_loop(first, last + 1, sequence, (da, dc, dv))
        g32 = g.astype(jnp.float32)
        dv = dv + jnp.where(seed[:, None], diag[:, None] * g32, 0.0)
        _store(dv_ref, row0, dv, inb, col0)
        return da, dc, gv + jnp.sum(g32 * v.astype(jnp.float32), axis=1)

    zeros = jnp.zeros((block_rows, dim), jnp.float32)
    da, dc, gv = lax.fori_loop(0, dv_ref.shape[-1] // block_dv, column_block,
                               (zeros, zeros, jnp.zeros((block_rows,), jnp.float32)))
    da = da + jnp.where(seed[:, None], gv[:, None] * c32, 0.0)
    dc = dc + jnp.where(seed[:, None], gv[:, None] * a32, 0.0)
    _, dphi_q = _silu_and_grad(q)
    _, dphi_k = _silu_and_grad(k)
    _store(dq_ref, row0, da * dphi_q, inb)
    _store(dk_ref, row0, dc * dphi_k, inb)


# ------------------------------------------------------------------------- causal-case kernels


def _sequence_scalars(start_ref, length_ref, history_ref):
    b = pl.program_id(0)
    return start_ref[b], length_ref[b], history_ref[b]


def _causal_fwd_kernel(start_ref, length_ref, history_ref, q_ref, k_ref, v_ref, o_ref, m_ref, *,
                       block_rows: int):
    """Sequence b's output columns, rows in order (module docstring); ``m_ref``: final state."""
    start, length, history = _sequence_scalars(start_ref, length_ref, history_ref)
    iota = jnp.arange(block_rows)

    def tile(t, state):
        r0 = t * block_rows
        local = r0 + iota
        ok = local < length
        a = _phi(_load(q_ref, start + r0, block_rows, ok))
        c = _phi(_load(k_ref, start + r0, block_rows, ok))
        a32, c32 = a.astype(jnp.float32), c.astype(jnp.float32)
        v32 = _load(v_ref, start + r0, block_rows, ok).astype(jnp.float32)

        def row(r, carry):
            state, out = carry
            hit = iota == r
            state = state + _pick(c32, hit)[:, None] * _pick(v32, hit)[None, :]
            o_r = jnp.sum(_pick(a32, hit)[:, None] * _silu(state), axis=0)
            return state, _put(out, hit, o_r)

        n_hist = jnp.clip(history - r0, 0, block_rows)
        out = jnp.zeros((block_rows, v_ref.shape[-1]), jnp.float32)
        state, out = lax.fori_loop(0, n_hist, row, (state, out))
        seed = ok & (local >= history)
        seed_out = _mm(a32, _silu(state)) + jnp.sum(a32 * c32, axis=1)[:, None] * v32
        out = jnp.where(seed[:, None], seed_out, out)
        _store(o_ref, start + r0, out, ok)
        return state

    state = jnp.zeros(m_ref.shape, jnp.float32)
    m_ref[...] = lax.fori_loop(0, _cdiv(length, block_rows), tile, state)


def _causal_bwd_kernel(start_ref, length_ref, history_ref, q_ref, k_ref, v_ref, do_ref, m_ref,
                       dq_ref, dk_ref, dv_ref, *, block_rows: int):
    """Sequence b's gradients, rows in reverse (module docstring); dq, dk are this column
    block's partials."""
    start, length, history = _sequence_scalars(start_ref, length_ref, history_ref)
    iota = jnp.arange(block_rows)
    n_tiles = _cdiv(length, block_rows)

    def tile(i, carry):
        state, acc = carry
        r0 = (n_tiles - 1 - i) * block_rows
        local = r0 + iota
        ok = local < length
        q = _load(q_ref, start + r0, block_rows, ok)
        k = _load(k_ref, start + r0, block_rows, ok)
        a32, c32 = _phi(q).astype(jnp.float32), _phi(k).astype(jnp.float32)
        v32 = _load(v_ref, start + r0, block_rows, ok).astype(jnp.float32)
        g32 = _load(do_ref, start + r0, block_rows, ok).astype(jnp.float32)

        # Seed rows first (they follow every history row): state = the whole history's.
        seed = (ok & (local >= history))[:, None]
        p, dp = _silu_and_grad(state)
        a_s, g_s = jnp.where(seed, a32, 0.0), jnp.where(seed, g32, 0.0)
        acc = acc + _mm(a_s.T, g_s) * dp
        gv = jnp.sum(g32 * v32, axis=1)[:, None]
        dq = jnp.where(seed, _mm(g_s, p.T) + gv * c32, 0.0)
        dk = jnp.where(seed, gv * a32, 0.0)
        dv = jnp.where(seed, jnp.sum(a32 * c32, axis=1)[:, None] * g32, 0.0)

        n_hist = jnp.clip(history - r0, 0, block_rows)

        def row(j, carry):
            state, acc, dq, dk, dv = carry
            hit = iota == n_hist - 1 - j
            a_r, c_r, v_r, g_r = (_pick(x, hit) for x in (a32, c32, v32, g32))
            p, dp = _silu_and_grad(state)
            acc = acc + a_r[:, None] * g_r[None, :] * dp
            dq = _put(dq, hit, jnp.sum(p * g_r[None, :], axis=1))
            dk = _put(dk, hit, jnp.sum(acc * v_r[None, :], axis=1))
            dv = _put(dv, hit, jnp.sum(acc * c_r[:, None], axis=0))
            state = state - c_r[:, None] * v_r[None, :]
            return state, acc, dq, dk, dv

        state, acc, dq, dk, dv = lax.fori_loop(0, n_hist, row, (state, acc, dq, dk, dv))
        _, dphi_q = _silu_and_grad(q)
        _, dphi_k = _silu_and_grad(k)
        _store(dq_ref, start + r0, dq * dphi_q, ok)
        _store(dk_ref, start + r0, dk * dphi_k, ok)
        _store(dv_ref, start + r0, dv, ok)
        return state, acc

    zeros = jnp.zeros(m_ref.shape, jnp.float32)
    lax.fori_loop(0, n_tiles, tile, (m_ref[...], zeros))


# -------------------------------------------------------------------------------------- wrappers


def validate(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    """What the kernels need beyond the reference's checks; errors name the argument."""
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"q: dtype {q.dtype} not supported (float32, bfloat16, float16)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"k, v: expected q's dtype {q.dtype}, got {k.dtype} and {v.dtype}")
    for name, width in (("q/k head width D", q.shape[-1]), ("v head width Dv", v.shape[-1])):
        if not is_pow2(width) or width < 16:
            raise ValueError(f"{name}: the kernel needs a power of two >= 16 (Triton tile sizes), "
                             f"got {width}; use impl='xla' for other widths")


def _resolve(config: Optional[QlaConfig], q: jax.Array, v: jax.Array, causal: bool,
             interpret: Optional[bool]) -> Tuple[QlaConfig, int, bool]:
    """(config, block_dv capped at Dv, interpret)."""
    config = config or QlaConfig.default(q.shape[-1], v.shape[-1], q.dtype, causal)
    interpret = default_interpret() if interpret is None else interpret
    return config, min(config.block_dv, v.shape[-1]), interpret


def num_splits(total: int, batch: int, split_rows: int) -> int:
    """Programs per sequence of the state reduction (``QlaConfig.split_rows``)."""
    want = -(-total // (max(batch, 1) * split_rows))
    return max(1, min(MAX_SPLIT, next_pow2(max(want, 1))))


def _rows_spec(width: int, grid_rank: int, total: int, col_axis: bool = False) -> pl.BlockSpec:
    """Per-head view (T, width) of a (T, H, W) array; with ``col_axis``, column block
    ``program_id(2)`` of width ``width``."""
    if grid_rank == 2:
        return pl.BlockSpec((total, None, width), lambda i, h: (0, h, 0))
    if col_axis:
        return pl.BlockSpec((total, None, width), lambda i, h, f: (0, h, f))
    return pl.BlockSpec((total, None, width), lambda i, h, f: (0, h, 0))


def _whole(a: jax.Array, grid_rank: int) -> pl.BlockSpec:
    if grid_rank == 2:
        return pl.BlockSpec(a.shape, lambda i, h: (0,) * a.ndim)
    return pl.BlockSpec(a.shape, lambda i, h, f: (0,) * a.ndim)


KERNEL_NAMES = ("qla_state", "qla_fwd", "qla_bwd_state", "qla_bwd", "qla_causal_fwd",
                "qla_causal_bwd")
"""The ``pallas_call`` names of the kernels (full: state, output, backward state, backward rows;
causal: forward, backward), as they appear in the lowered module."""


def kernel_num_stages(name: str, config: QlaConfig) -> int:
    """Pipelining stages kernel ``name`` compiles with: ``config.num_stages``, except 1 for the
    full backward row kernel (its six operand tiles per step leave no room for a second stage)."""
    return 1 if name == "qla_bwd" else config.num_stages


def _params(config: QlaConfig, name: str):
    return plgpu.CompilerParams(num_warps=config.num_warps,
                                num_stages=kernel_num_stages(name, config))


def reduce_state(x: jax.Array, y: jax.Array, start: jax.Array, count: jax.Array, *,
                 config: QlaConfig, block_dv: int, interpret: bool, name: str) -> jax.Array:
    """``sum_{rows of b, first count[b]} phi(x)^T y`` per sequence b and head: (B, D, H, Dy)
    float32 (the ``_state_kernel`` partials summed by XLA)."""
    total, heads, dim = x.shape
    dy = y.shape[-1]
    batch = start.shape[0]
    n_split = num_splits(total, batch, config.split_rows)
    grid = (batch * n_split, heads, dy // block_dv)
    part = pl.pallas_call(
        functools.partial(_state_kernel, block_rows=config.block_rows, n_split=n_split),
        grid=grid,
        in_specs=[_whole(start, 3), _whole(count, 3), _rows_spec(dim, 3, total),
                  _rows_spec(block_dv, 3, total, col_axis=True)],
        out_specs=pl.BlockSpec((dim, None, block_dv), lambda i, h, f: (i, h, f)),
        out_shape=jax.ShapeDtypeStruct((batch * n_split * dim, heads, dy), jnp.float32),
        compiler_params=_params(config, name),
        interpret=interpret,
        name=name,
    )(start, count, x, y)
    return part.reshape(batch, n_split, dim, heads, dy).sum(axis=1)


def _flat_state(m: jax.Array) -> jax.Array:
    """(B, D, H, Dv) -> (B * D, H, Dv): each sequence's state as D consecutive rows."""
    b, d, h, dv = m.shape
    return m.reshape(b * d, h, dv)


def qla_full_fwd(q: jax.Array, k: jax.Array, v: jax.Array, meta: Jagged, *,
                 config: Optional[QlaConfig] = None,
                 interpret: Optional[bool] = None) -> Tuple[jax.Array, jax.Array]:
    """Full-case forward: (out (T, H, Dv) in q's dtype, M (B, D, H, Dv) float32)."""
    validate(q, k, v)
    config, block_dv, interpret = _resolve(config, q, v, False, interpret)
    total, heads, dim = q.shape
    batch = meta.start.shape[0]
    m = reduce_state(k, v, meta.start, meta.history, config=config, block_dv=block_dv,
                     interpret=interpret, name="qla_state")
    p = _flat_state(silu_f32(m).astype(q.dtype))
    grid = (pl.cdiv(total, config.block_rows), heads, v.shape[-1] // block_dv)
    out = pl.pallas_call(
        functools.partial(_out_kernel, block_rows=config.block_rows, total=total),
        grid=grid,
        in_specs=[_whole(meta.row_seq, 3), _whole(meta.row_seed, 3),
                  _rows_spec(dim, 3, total), _rows_spec(dim, 3, total),
                  _rows_spec(block_dv, 3, total, col_axis=True),
                  pl.BlockSpec((batch * dim, None, block_dv), lambda i, h, f: (0, h, f))],
        out_specs=_rows_spec(block_dv, 3, total, col_axis=True),
        out_shape=jax.ShapeDtypeStruct(v.shape, q.dtype),
        compiler_params=_params(config, "qla_fwd"),
        interpret=interpret,
        name="qla_fwd",
    )(meta.row_seq, meta.row_seed, q, k, v, p)
    return out, m


def qla_full_bwd(q: jax.Array, k: jax.Array, v: jax.Array, m: jax.Array, do: jax.Array,
                 meta: Jagged, *, config: Optional[QlaConfig] = None,
                 interpret: Optional[bool] = None):
    """Full-case backward from the forward's state ``m``: (dq, dk, dv)."""
    validate(q, k, v)
    config, block_dv, interpret = _resolve(config, q, v, False, interpret)
    total, heads, dim = q.shape
    batch = meta.start.shape[0]
    do = do.astype(q.dtype)
    dp = reduce_state(q, do, meta.start, meta.length, config=config, block_dv=block_dv,
                      interpret=interpret, name="qla_bwd_state")
    p = _flat_state(silu_f32(m).astype(q.dtype))
    dm = _flat_state((dp * silu_grad_f32(m)).astype(q.dtype))
    state_spec = pl.BlockSpec((batch * dim, None, v.shape[-1]), lambda i, h: (0, h, 0))
    dq, dk, dv = pl.pallas_call(
        functools.partial(_bwd_rows_kernel, block_rows=config.block_rows, block_dv=block_dv,
                          total=total),
        grid=(pl.cdiv(total, config.block_rows), heads),
        in_specs=[_whole(meta.row_seq, 2), _whole(meta.row_seed, 2),
                  _rows_spec(dim, 2, total), _rows_spec(dim, 2, total),
                  _rows_spec(v.shape[-1], 2, total), _rows_spec(v.shape[-1], 2, total),
                  state_spec, state_spec],
        out_specs=[_rows_spec(dim, 2, total), _rows_spec(dim, 2, total),
                   _rows_spec(v.shape[-1], 2, total)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(config, "qla_bwd"),
        interpret=interpret,
        name="qla_bwd",
    )(meta.row_seq, meta.row_seed, q, k, v, do, p, dm)
    return dq, dk, dv


def _causal_specs(dim: int, block_dv: int):
    """(spec of a (B,) metadata vector, spec of a (B * D, H, Dv) state's (D, block_dv) block)."""
    seq = lambda a: _whole(a, 3)  # noqa: E731
    state = pl.BlockSpec((dim, None, block_dv), lambda b, h, f: (b, h, f))
    return seq, state


def _zero_invalid(x: jax.Array, meta: Jagged) -> jax.Array:
    return jnp.where((meta.row_seq >= 0)[:, None, None], x, jnp.zeros((), x.dtype))


def qla_causal_fwd(q: jax.Array, k: jax.Array, v: jax.Array, meta: Jagged, *,
                   config: Optional[QlaConfig] = None,
                   interpret: Optional[bool] = None) -> Tuple[jax.Array, jax.Array]:
    """Causal-case forward: (out (T, H, Dv) in q's dtype, final states (B, D, H, Dv) float32)."""
    validate(q, k, v)
    config, block_dv, interpret = _resolve(config, q, v, True, interpret)
    total, heads, dim = q.shape
    batch = meta.start.shape[0]
    seq, state = _causal_specs(dim, block_dv)
    out, m = pl.pallas_call(
        functools.partial(_causal_fwd_kernel, block_rows=config.block_rows),
        grid=(batch, heads, v.shape[-1] // block_dv),
        in_specs=[seq(meta.start), seq(meta.length), seq(meta.history),
                  _rows_spec(dim, 3, total), _rows_spec(dim, 3, total),
                  _rows_spec(block_dv, 3, total, col_axis=True)],
        out_specs=[_rows_spec(block_dv, 3, total, col_axis=True), state],
        out_shape=[jax.ShapeDtypeStruct(v.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch * dim, heads, v.shape[-1]), jnp.float32)],
        compiler_params=_params(config, "qla_causal_fwd"),
        interpret=interpret,
        name="qla_causal_fwd",
    )(meta.start, meta.length, meta.history, q, k, v)
    return _zero_invalid(out, meta), m.reshape(batch, dim, heads, v.shape[-1])


def qla_causal_bwd(q: jax.Array, k: jax.Array, v: jax.Array, m: jax.Array, do: jax.Array,
                   meta: Jagged, *, config: Optional[QlaConfig] = None,
                   interpret: Optional[bool] = None):
    """Causal-case backward from the forward's final states ``m``: (dq, dk, dv)."""
    validate(q, k, v)
    config, block_dv, interpret = _resolve(config, q, v, True, interpret)
    total, heads, dim = q.shape
    batch = meta.start.shape[0]
    n_col = v.shape[-1] // block_dv
    seq, state = _causal_specs(dim, block_dv)
    partial_spec = pl.BlockSpec((total, None, dim), lambda b, h, f: (0, h, f))
    dq, dk, dv = pl.pallas_call(
        functools.partial(_causal_bwd_kernel, block_rows=config.block_rows),
        grid=(batch, heads, n_col),
        in_specs=[seq(meta.start), seq(meta.length), seq(meta.history),
                  _rows_spec(dim, 3, total), _rows_spec(dim, 3, total),
                  _rows_spec(block_dv, 3, total, col_axis=True),
                  _rows_spec(block_dv, 3, total, col_axis=True), state],
        out_specs=[partial_spec, partial_spec, _rows_spec(block_dv, 3, total, col_axis=True)],
        out_shape=[jax.ShapeDtypeStruct((total, heads, n_col * dim), jnp.float32),
                   jax.ShapeDtypeStruct((total, heads, n_col * dim), jnp.float32),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(config, "qla_causal_bwd"),
        interpret=interpret,
        name="qla_causal_bwd",
    )(meta.start, meta.length, meta.history, q, k, v, do.astype(q.dtype), _flat_state(m))

    def total_of(partial):
        return _zero_invalid(partial.reshape(total, heads, n_col, dim).sum(axis=2), meta)

    return (total_of(dq).astype(q.dtype), total_of(dk).astype(k.dtype),
            _zero_invalid(dv, meta))


__all__ = ["KERNEL_NAMES", "Jagged", "jagged_meta", "kernel_num_stages", "num_splits",
           "qla_causal_bwd", "qla_causal_fwd", "qla_full_bwd", "qla_full_fwd", "reduce_state",
           "validate"]
