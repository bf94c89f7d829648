"""Pure-jnp reference of VISTA's quasi-linear attention (QLA) on the jagged layout.

"Massive Memorization with Hundreds of Trillions of Parameters for Sequential Transducer Generative
Recommenders" (VISTA), Section 3.2.2, the QLU module ("full self quasi-linear attention")::

    O[S] = phi(Q[S]) phi( phi(K[S])^T V[S] )
    O[T] = phi(Q[T]) phi( phi(K[S])^T V[S] ) + Delta(phi(Q[T]), phi(K[T])) V[T]

with ``phi`` = SiLU (the paper's choice), no row normalisation (the paper drops RowNormalize, as
Lightning Attention does) and no 1/sqrt(d) scaling. This module is the contract of the kernels in
:mod:`pallas_kernels.qla.pallas_triton` and the ``impl="xla"`` implementation of
:func:`pallas_kernels.qla.api.qla`; its autodiff gives the reference gradients (Appendix B derives
them for the form without the outer phi; :mod:`pallas_kernels.qla.vjp` adds the outer phi's chain
rule).

Symbols
-------
Per user sequence b and head: ``S`` its history rows (``n_b`` of them, the user interaction
history), ``T`` its ``k_b`` seed rows (the virtual seeds, VISTA's shared learnable summarisation
embeddings appended after the history; the paper calls them targets), ``phi`` = SiLU applied
elementwise, ``M_b = phi(K[S])^T V[S]`` the (D, Dv) state of the sequence (a sum over its history
rows) and ``Delta(X, Y)`` the diagonal matrix of the row-wise dot products ``x_i . y_i``: each seed
also attends to itself (eq. 3), never to another seed (the paper's "candidates cannot attend each
other" rule). So, row by row::

    history row i:  out_i = phi(q_i) phi(M_b)
    seed row t:     out_t = phi(q_t) phi(M_b) + (phi(q_t) . phi(k_t)) v_t

The outer ``phi`` acts elementwise on the (D, Dv) matrix ``M_b``. History rows never see a seed:
seeds contribute nothing to ``M_b``. An empty history gives ``M_b = 0`` and ``phi(0) = 0``, so its
seeds see only themselves.

``causal=True`` (Section 3.2.2 names causal self-attention as the usual alternative; the paper found
no significant difference and uses full) replaces ``M_b`` for history row i by the prefix state
``C_i = sum_{j <= i, j in S} phi(k_j)^T v_j`` and applies the outer phi to each row's own state:
``out_i = phi(q_i) phi(C_i)``. Seeds come after the history, so their state is the whole history's
``M_b``, as in the full case.

The SGLU gate of the QLA layer (Section 3.2.2: QLA = QLU module + SGLU module) is *not* part of this
op: it belongs to the layer that calls it.

Jagged layout
-------------
Sequences are concatenated along the token axis: q, k (T, H, D), v (T, H, Dv); sequence b is rows
``offsets[b]:offsets[b + 1]`` (``offsets`` (B + 1,) int32, non-decreasing, ``offsets[0] = 0``).
``num_targets`` (B,) int32: the last ``num_targets[b]`` rows of sequence b (clipped to
``[0, length]``) are its seeds, the rest its history. Rows past ``offsets[-1]`` are padding: their
output (and gradient) is 0. Heads are independent. There is no ``max_seq_len``: nothing is padded,
so a sequence may have any length.

Cost: the full case is O(N D Dv) time and memory per head (``jax.ops.segment_sum`` of the per-row
outer products ``phi(k_j)^T v_j`` into the B states, then one gather of each row's state); the
causal case is the same order (a segmented inclusive scan of those outer products, one (D, Dv)
state per row). No (N, N) score is ever formed. The reference is the contract, not a fast path.

Numerics (the kernels follow them): ``phi(q)`` and ``phi(k)`` are evaluated in float32 and rounded
to the input dtype (they are matrix-product operands); the outer products and the states ``M_b``,
``C_i`` are float32; in the full case ``phi(M_b)`` is rounded to the input dtype before its product
with ``phi(q)`` (float32 accumulation); in the causal case ``phi(q_i) phi(C_i)`` is computed in
float32 (the kernel does it elementwise); the seed term ``(phi(q_t) . phi(k_t)) v_t`` is float32;
the output is in q's dtype.

Deviations from the paper's text, all deliberate:

* Appendix B's "mixed full linear attention" preamble divides by N (``O = (QK^T) . M V / N``) and
  its B.1 formulas carry a ``/N``; Section 3.2.2's QLU formula has no normaliser, and this op
  follows Section 3.2.2 (callers that want 1/N scale q or the output).
* Appendix B.1.5's gradients are for ``phi(Q) phi(K)^T V`` without the outer phi; with the outer
  phi (Section 3.2.2) the chain rule adds ``dM = dP * phi'(M)`` (see :mod:`pallas_kernels.qla.vjp`).
* The paper writes no causal QLA formula (it only says causal and full self-attention performed
  alike). ``causal=True`` is this op's reading: the inclusive prefix state ``C_i`` (``j <= i``)
  with the outer phi applied to each row's own state; seeds are unaffected.
* Seeds sit *after* the history in each sequence (the jagged layout of the HSTU op's targets);
  Section 3.2.3 lists the seeds first when it feeds them to the reconstruction decoder, which is
  a different block. In the full case the order of the rows changes nothing; only ``causal``
  depends on it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class RowMeta:
    """Per-row view of the jagged layout, (T,) arrays: ``seq`` the row's sequence (clipped to
    ``[0, B - 1]``; meaningless where not ``valid``), ``local`` its position in it, ``valid`` it
    belongs to a sequence, ``history`` / ``seed`` its kind (both False for padding)."""

    seq: jax.Array
    local: jax.Array
    valid: jax.Array
    history: jax.Array
    seed: jax.Array


def sequence_lengths(offsets: jax.Array) -> jax.Array:
    """(B,) int32 lengths ``offsets[b + 1] - offsets[b]`` (negative ones clipped to 0)."""
    offsets = offsets.astype(jnp.int32)
    return jnp.maximum(offsets[1:] - offsets[:-1], 0)


def history_lengths(lengths: jax.Array, num_targets: Optional[jax.Array]) -> jax.Array:
    """(B,) int32 history lengths ``lengths - num_targets`` (seeds clipped to ``[0, lengths]``);
    ``lengths`` when ``num_targets`` is None."""
    if num_targets is None:
        return lengths
    return lengths - jnp.clip(num_targets.astype(jnp.int32), 0, lengths)


def row_meta(offsets: jax.Array, num_targets: Optional[jax.Array], total: int) -> RowMeta:
    """:class:`RowMeta` of ``total`` rows."""
    offsets = offsets.astype(jnp.int32)
    batch = offsets.shape[0] - 1
    tok = jnp.arange(total, dtype=jnp.int32)
    if batch == 0:
        false = jnp.zeros((total,), bool)
        return RowMeta(jnp.zeros_like(tok), tok, false, false, false)
    seq = jnp.clip(jnp.searchsorted(offsets, tok, side="right") - 1, 0, batch - 1)
    local = tok - offsets[seq]
    valid = (tok >= offsets[0]) & (tok < offsets[-1])    # offsets non-decreasing
    hist_len = history_lengths(sequence_lengths(offsets), num_targets)[seq]
    history = valid & (local < hist_len)
    return RowMeta(seq.astype(jnp.int32), local, valid, history, valid & ~history)


def silu_f32(x: jax.Array) -> jax.Array:
    """``phi(x)`` = SiLU in float32."""
    return jax.nn.silu(x.astype(jnp.float32))


def silu_grad_f32(x: jax.Array) -> jax.Array:
    """``phi'(x) = sig(x) (1 + x (1 - sig(x)))`` in float32."""
    x = x.astype(jnp.float32)
    sig = jax.nn.sigmoid(x)
    return sig * (1.0 + x * (1.0 - sig))


def _check_float(name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name}: expected a floating dtype, got {x.dtype}")


def validate_inputs(q, k, v, offsets, *, num_targets=None) -> None:
    """Shapes and dtypes of :func:`qla_reference`'s arguments; errors name the argument."""
    if q.ndim != 3 or k.shape != q.shape:
        raise ValueError(f"q, k: expected the same (T, H, D) shape, got {q.shape} and {k.shape}")
    if v.ndim != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"v: expected (T, H, Dv) with (T, H) = {q.shape[:2]}, got {v.shape}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_float(name, x)
    if offsets.ndim != 1 or offsets.shape[0] < 1 or not jnp.issubdtype(offsets.dtype, jnp.integer):
        raise ValueError(f"offsets: expected (B + 1,) int, got {offsets.shape} {offsets.dtype}")
    batch = offsets.shape[0] - 1
    if num_targets is not None and (num_targets.shape != (batch,)
                                    or not jnp.issubdtype(num_targets.dtype, jnp.integer)):
        raise ValueError(f"num_targets: expected ({batch},) int, got {num_targets.shape} "
                         f"{num_targets.dtype}")


def _features(q: jax.Array, k: jax.Array):
    """``phi(q)``, ``phi(k)`` rounded to the input dtype (the products' operands)."""
    return silu_f32(q).astype(q.dtype), silu_f32(k).astype(k.dtype)


def _outer(c: jax.Array, v: jax.Array, keep: jax.Array) -> jax.Array:
    """(T, H, D, Dv) float32 ``phi(k_j)^T v_j`` per row, 0 where not ``keep`` (history rows)."""
    kv = c.astype(jnp.float32)[..., :, None] * v.astype(jnp.float32)[..., None, :]
    return jnp.where(keep[:, None, None, None], kv, 0.0)


def _segment_scan(kv: jax.Array, starts: jax.Array) -> jax.Array:
    """Inclusive prefix sums of ``kv`` along rows, restarted where ``starts`` (a segmented scan).

    A sequential ``lax.scan`` over rows: exact in the kernel's own summation order (a global
    ``cumsum`` minus the sum before each sequence would lose the earlier sequences' magnitude to
    rounding) and quick to compile; O(N) steps, so slow on long batches (the reference)."""
    def step(carry, row):
        start, x = row
        carry = jnp.where(start, x, carry + x)
        return carry, carry

    return jax.lax.scan(step, jnp.zeros(kv.shape[1:], kv.dtype), (starts, kv))[1]


def qla_reference(q: jax.Array, k: jax.Array, v: jax.Array, offsets: jax.Array, *,
                  num_targets: Optional[jax.Array], causal: bool = False) -> jax.Array:
    """VISTA quasi-linear attention on the jagged layout (see the module docstring); (T, H, Dv) in
    q's dtype, rows past ``offsets[-1]`` zero. ``num_targets`` None: no seeds.

    O(N) in the number of rows (times D Dv per row): segment sums (full) or a segmented scan
    (causal), never an (N, N) matrix.
    """
    validate_inputs(q, k, v, offsets, num_targets=num_targets)
    total = q.shape[0]
    batch = offsets.shape[0] - 1
    if total == 0 or batch == 0:
        return jnp.zeros(v.shape, q.dtype)
    meta = row_meta(offsets, num_targets, total)
    a, c = _features(q, k)
    kv = _outer(c, v, meta.history)                                      # (T, H, D, Dv) f32
    if causal:
        state = silu_f32(_segment_scan(kv, meta.valid & (meta.local == 0)))
        out = jnp.einsum("thd,thde->the", a.astype(jnp.float32), state,
                         precision=jax.lax.Precision.HIGHEST)
    else:
        m = jax.ops.segment_sum(kv, meta.seq, num_segments=batch)        # (B, H, D, Dv)
        p = silu_f32(m).astype(q.dtype)
        out = jnp.einsum("thd,thde->the", a, p[meta.seq], preferred_element_type=jnp.float32,
                         precision=jax.lax.Precision.HIGHEST)
    diag = jnp.sum(a.astype(jnp.float32) * c.astype(jnp.float32), axis=-1, keepdims=True)
    out = out + jnp.where(meta.seed[:, None, None], diag * v.astype(jnp.float32), 0.0)
    return jnp.where(meta.valid[:, None, None], out, 0.0).astype(q.dtype)


def softmax_seed_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array,
                                     offsets: jax.Array, *, num_targets: Optional[jax.Array],
                                     max_seq_len: int, causal: bool = False) -> jax.Array:
    """"VISTA w/o QLA" (Table 2): softmax attention with the same mask as QLA, for comparison.

    Per sequence: history rows attend to history rows (all of them, or ``j <= i`` when
    ``causal``), seed rows attend to every history row and to themselves (never to other seeds);
    ``softmax(q k^T / sqrt(D))`` over the allowed keys, float32 scores. Every valid row has at
    least one allowed key (itself). Dense per sequence: rows are padded to (B, ``max_seq_len``)
    and (B, H, N, N) scores formed; a sequence longer than ``max_seq_len`` keeps its first
    ``max_seq_len`` rows (the rest output 0). Output (T, H, Dv) in q's dtype, padding rows 0.
    """
    validate_inputs(q, k, v, offsets, num_targets=num_targets)
    if not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise ValueError(f"max_seq_len: expected an int >= 1, got {max_seq_len!r}")
    total, _, dim = q.shape
    batch = offsets.shape[0] - 1
    if total == 0 or batch == 0:
        return jnp.zeros(v.shape, q.dtype)
    n = max_seq_len
    offsets = offsets.astype(jnp.int32)
    lengths = jnp.minimum(sequence_lengths(offsets), n)
    hist = history_lengths(lengths, num_targets)
    pos = jnp.arange(n, dtype=jnp.int32)
    rows = jnp.clip(offsets[:-1, None] + pos[None, :], 0, total - 1)      # (B, N)
    qd, kd, vd = q[rows], k[rows], v[rows]
    pi, pj = pos[None, :, None], pos[None, None, :]
    hq, hk = pi < hist[:, None, None], pj < hist[:, None, None]
    in_seq = (pi < lengths[:, None, None]) & (pj < lengths[:, None, None])
    hist_pair = (pj <= pi) if causal else jnp.ones_like(in_seq)
    allowed = in_seq & jnp.where(hq, hk & hist_pair, hk | (pi == pj))      # (B, N, N)
    s = jnp.einsum("bihd,bjhd->bhij", qd, kd, preferred_element_type=jnp.float32)
    s = jnp.where(allowed[:, None], s / math.sqrt(dim), -1e30)   # finite: no NaN on padding
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(allowed[:, None], p, 0.0).astype(v.dtype)
    dense = jnp.einsum("bhij,bjhd->bihd", p, vd, preferred_element_type=jnp.float32)
    meta = row_meta(offsets, None, total)
    keep = meta.valid & (meta.local < n)
    out = dense[meta.seq, jnp.clip(meta.local, 0, n - 1)]
    return jnp.where(keep[:, None, None], out, 0.0).astype(q.dtype)


__all__ = [
    "RowMeta", "history_lengths", "qla_reference", "row_meta", "sequence_lengths",
    "silu_f32", "silu_grad_f32", "softmax_seed_attention_reference", "validate_inputs",
]
