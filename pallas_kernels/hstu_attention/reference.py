"""Pure-jnp reference of HSTU's pointwise aggregated attention on the jagged layout.

"Actions Speak Louder than Words: Trillion-Parameter Sequential Transducers for Generative
Recommendations" (HSTU), Section 3.1, eq. (2)::

    A(X) V(X) = phi_2(Q(X) K(X)^T + rab^{p,t}) V(X),        phi_2 = SiLU

This module is the contract of the kernels in :mod:`pallas_kernels.hstu_attention.pallas_triton`
and the ``impl="xla"`` implementation of :func:`pallas_kernels.hstu_attention.api.hstu_attention`;
its autodiff gives the reference gradients (with respect to q, k, v, ``rab_pos`` and ``rab_time``).

Jagged layout
-------------
Sequences are concatenated along the token axis: q, k (T, H, Dqk), v (T, H, Dv); sequence b is rows
``offsets[b]:offsets[b + 1]`` (``offsets`` (B + 1,) int32, non-decreasing, ``offsets[0] = 0``).
Rows past ``offsets[-1]`` are padding: nothing is computed for them and their output is 0. A
sequence longer than ``max_seq_len`` is cut to its first ``max_seq_len`` rows (the rest are padding:
output 0, never a key); callers keep every length <= ``max_seq_len``.

For query row i and key row j of one sequence (``i``, ``j`` local positions)::

    out[i] = sum_{j allowed(i, j)} silu(q_i . k_j + rab(i, j)) v_j / norm

with no softmax and no 1/sqrt(d) scaling (eq. 2). Heads are independent; ``rab`` is shared by them.

Mask (``allowed``)
------------------
* Only pairs of the same sequence.
* ``causal``: j <= i.
* ``num_targets`` (B,) int32: the last ``num_targets[b]`` tokens of sequence b (of its first
  ``max_seq_len`` rows; clipped to its length) are *targets* (ranking candidates; M-FALCON,
  Section 3.4 and Appendix H, "b_m" candidates per microbatch). A target attends to every history
  (non-target) token of its sequence and to itself, never to another target; a history token
  never attends to a target. With ``causal=False`` history tokens attend to every history token;
  targets are unchanged.

Relative attention bias ``rab^{p,t}`` (Table 9: one (N, N) bias per layer, shared across heads)
--------------------------------------------------------------------------------------------
``rab(i, j) = rab_pos[pos_bucket(p_i - p_j)] + rab_time[time_bucket(t_i - t_j)]``, each term present
only when its table is given. ``p_i`` is the local position, except that every target takes the
position of the first target (``L_b - num_targets[b]``): each candidate then sees the history at the
same relative positions, as if it were the only candidate, which is what M-FALCON needs for the
b_m candidates of a microbatch to be scored exactly as in separate passes. ``t`` are the
``timestamps`` (T,) int32 (seconds; any origin, differences must fit in int32).

The buckets are monotone step functions of ``|difference|`` with few buckets (``NUM_POS_BUCKETS``,
``NUM_TIME_BUCKETS`` <= 32) and integer boundaries (``POS_BOUNDARIES``, ``TIME_BOUNDARIES``): a
Triton kernel cannot gather from a table, so it evaluates ``w[bucket(d)]`` as the telescoping sum
``w[0] + sum_k [|d| >= boundary_k] (w[k + 1] - w[k])`` -- one compare and one select-add per
boundary and score element (31 each for the shipped tables), exact in integers, so every
implementation puts a pair in the same bucket.

Normalizer
----------
``normalizer="seq_len"`` divides by ``max_seq_len`` (the N of the padded batch); ``"none"`` by 1.
Eq. (2) prints no normalizer; the authors' public implementation of the paper divides the pointwise
attention by the sequence length N. A constant divisor keeps what Section 3.1 wants from pointwise
aggregation -- the output grows with the number of related past actions, a signal of the intensity
of preferences that softmax normalization removes -- while keeping the sum's scale bounded as N
grows (the layer norm of eq. 3 follows, but the activations entering it should not scale with N).

Numerics: q.k products take operands in the input dtype and accumulate in float32; the bias, SiLU
and normalizer are float32; ``silu(.) / norm`` is rounded to the input dtype before the product
with v (float32 accumulation); the output is in q's dtype.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

NORMALIZERS = ("seq_len", "none")
"""Accepted ``normalizer`` names: ``"seq_len"`` (divide by ``max_seq_len``) or ``"none"``."""

NUM_EXACT_POS = 16
"""Relative positions ``|d| < NUM_EXACT_POS`` each get their own bucket."""

POS_BOUNDARIES = tuple(range(1, NUM_EXACT_POS)) + tuple(
    int(round(NUM_EXACT_POS * 2 ** (k / 2))) for k in range(16))
"""Lower edges of position buckets 1..31: 1..15 (exact), then half-octaves 16, 23, 32, 45, 64,
91, 128, ..., 2896 (bucket 31 holds every ``|d| >= 2896``)."""

NUM_POS_BUCKETS = len(POS_BOUNDARIES) + 1
"""32 position buckets."""

TIME_BOUNDARIES = tuple(1 << k for k in range(31))
"""Lower edges of time buckets 1..31: 1, 2, 4, ..., 2**30 seconds."""

NUM_TIME_BUCKETS = len(TIME_BOUNDARIES) + 1
"""32 time buckets: bucket 0 is ``dt = 0``, bucket ``k >= 1`` is ``2**(k-1) <= |dt| < 2**k``
(bucket 31: ``|dt| >= 2**30`` s, about 34 years)."""


def _bucketize(diff: jax.Array, boundaries) -> jax.Array:
    """Number of ``boundaries`` <= ``|diff|`` (int32): the bucket of a monotone step function."""
    mag = jnp.abs(diff.astype(jnp.int32))
    bucket = jnp.zeros(mag.shape, jnp.int32)
    for edge in boundaries:
        bucket = bucket + (mag >= edge).astype(jnp.int32)
    return bucket


def pos_bucket(d: jax.Array) -> jax.Array:
    """Position bucket of a relative position ``d = p_i - p_j`` (int): ``|d|`` for ``|d| < 16``,
    then one bucket per half octave up to 2896, clipped to ``NUM_POS_BUCKETS - 1`` = 31. Symmetric
    in the sign of ``d`` (only non-causal attention sees ``d < 0``)."""
    return _bucketize(d, POS_BOUNDARIES)


def time_bucket(dt: jax.Array) -> jax.Array:
    """Time bucket of a timestamp difference ``dt = t_i - t_j`` (int seconds): 0 for ``dt = 0``,
    else ``floor(log2(|dt|)) + 1`` clipped to ``NUM_TIME_BUCKETS - 1`` = 31. Symmetric in sign."""
    return _bucketize(dt, TIME_BOUNDARIES)


def normalizer_value(normalizer: str, max_seq_len: int) -> float:
    """The divisor of ``normalizer`` (one of :data:`NORMALIZERS`)."""
    if normalizer == "seq_len":
        return float(max_seq_len)
    if normalizer == "none":
        return 1.0
    raise ValueError(f"normalizer: expected one of {NORMALIZERS}, got {normalizer!r}")


def sequence_lengths(offsets: jax.Array, max_seq_len: int) -> jax.Array:
    """(B,) int32 lengths ``offsets[b + 1] - offsets[b]`` clipped to ``[0, max_seq_len]``."""
    offsets = offsets.astype(jnp.int32)
    return jnp.clip(offsets[1:] - offsets[:-1], 0, max_seq_len)


def history_lengths(lengths: jax.Array, num_targets: Optional[jax.Array]) -> jax.Array:
    """(B,) int32 history (non-target) lengths: ``lengths - num_targets`` (targets clipped to
    ``[0, lengths]``), ``lengths`` without targets."""
    if num_targets is None:
        return lengths
    return lengths - jnp.clip(num_targets.astype(jnp.int32), 0, lengths)


def allowed_mask(pos_q: jax.Array, pos_k: jax.Array, length, history, causal: bool) -> jax.Array:
    """Bool ``allowed(i, j)`` for local query positions ``pos_q`` (broadcast against) key positions
    ``pos_k`` of one sequence of ``length`` rows whose first ``history`` rows are history (see the
    module docstring). Shapes broadcast; scalars or arrays for ``length``/``history``."""
    valid = (pos_q < length) & (pos_k < length)
    q_hist = pos_q < history
    k_hist = pos_k < history
    hist_pair = (pos_k <= pos_q) if causal else jnp.ones_like(valid)
    allowed = jnp.where(q_hist, k_hist & hist_pair, k_hist | (pos_k == pos_q))
    return valid & allowed


def rab_positions(pos: jax.Array, history) -> jax.Array:
    """Positions that enter ``pos_bucket``: targets (``pos >= history``) take ``history``."""
    return jnp.minimum(pos, history)


def _validate(q, k, v, offsets, max_seq_len, timestamps, rab_pos, rab_time, num_targets):
    if q.ndim != 3 or k.shape != q.shape:
        raise ValueError(f"q, k: expected the same (T, H, Dqk) shape, got {q.shape} and {k.shape}")
    if v.ndim != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"v: expected (T, H, Dv) with (T, H) = {q.shape[:2]}, got {v.shape}")
    if offsets.ndim != 1 or offsets.shape[0] < 1 or not jnp.issubdtype(offsets.dtype, jnp.integer):
        raise ValueError(f"offsets: expected (B + 1,) int, got {offsets.shape} {offsets.dtype}")
    if not isinstance(max_seq_len, (int, np.integer)) or max_seq_len < 1:
        raise ValueError(f"max_seq_len: expected an int >= 1, got {max_seq_len!r}")
    batch = offsets.shape[0] - 1
    if num_targets is not None and (num_targets.shape != (batch,)
                                    or not jnp.issubdtype(num_targets.dtype, jnp.integer)):
        raise ValueError(f"num_targets: expected ({batch},) int, got {num_targets.shape} "
                         f"{num_targets.dtype}")
    if rab_pos is not None and rab_pos.shape != (NUM_POS_BUCKETS,):
        raise ValueError(f"rab_pos: expected ({NUM_POS_BUCKETS},), got {rab_pos.shape}")
    if rab_time is not None:
        if rab_time.shape != (NUM_TIME_BUCKETS,):
            raise ValueError(f"rab_time: expected ({NUM_TIME_BUCKETS},), got {rab_time.shape}")
        if timestamps is None:
            raise ValueError("timestamps: required with rab_time")
    if timestamps is not None and (timestamps.shape != q.shape[:1]
                                   or not jnp.issubdtype(timestamps.dtype, jnp.integer)):
        raise ValueError(f"timestamps: expected ({q.shape[0]},) int, got {timestamps.shape} "
                         f"{timestamps.dtype}")


def validate_inputs(q, k, v, offsets, *, max_seq_len, timestamps=None, rab_pos=None, rab_time=None,
                    num_targets=None, normalizer="seq_len") -> None:
    """Shapes and dtypes of :func:`hstu_attention_reference`'s arguments; errors name the field."""
    _validate(q, k, v, offsets, max_seq_len, timestamps, rab_pos, rab_time, num_targets)
    normalizer_value(normalizer, max_seq_len)


def hstu_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, offsets: jax.Array, *,
                             max_seq_len: int, timestamps: Optional[jax.Array] = None,
                             rab_pos: Optional[jax.Array] = None,
                             rab_time: Optional[jax.Array] = None,
                             num_targets: Optional[jax.Array] = None, causal: bool = True,
                             normalizer: str = "seq_len") -> jax.Array:
    """HSTU pointwise attention on the jagged layout (see the module docstring); (T, H, Dv) in q's
    dtype, rows past ``offsets[-1]`` zero.

    Dense and masked: sequences are padded to (B, N = ``max_seq_len``) and every (B, H, N, N) score
    is formed, so memory grows as B H N^2 (the contract, not a fast path).
    """
    validate_inputs(q, k, v, offsets, max_seq_len=max_seq_len, timestamps=timestamps,
                    rab_pos=rab_pos, rab_time=rab_time, num_targets=num_targets,
                    normalizer=normalizer)
    total, _, _ = q.shape
    n = max_seq_len
    norm = normalizer_value(normalizer, n)
    offsets = offsets.astype(jnp.int32)
    lengths = sequence_lengths(offsets, n)                                   # (B,)
    history = history_lengths(lengths, num_targets)                          # (B,)
    pos = jnp.arange(n, dtype=jnp.int32)
    rows = jnp.clip(offsets[:-1, None] + pos[None, :], 0, max(total - 1, 0))  # (B, N)

    def pad(x):                                                 # (T, ...) -> (B, N, ...)
        return x[rows] if total else jnp.zeros(rows.shape + x.shape[1:], x.dtype)

    qd, kd, vd = pad(q), pad(k), pad(v)
    allowed = allowed_mask(pos[None, :, None], pos[None, None, :], lengths[:, None, None],
                           history[:, None, None], causal)                   # (B, N, N)
    scores = jnp.einsum("bihd,bjhd->bhij", qd, kd, preferred_element_type=jnp.float32)
    bias = jnp.zeros(allowed.shape, jnp.float32)
    if rab_pos is not None:
        p = rab_positions(pos[None, :], history[:, None])                    # (B, N)
        bias = bias + rab_pos.astype(jnp.float32)[pos_bucket(p[:, :, None] - p[:, None, :])]
    if rab_time is not None:
        t = pad(timestamps.astype(jnp.int32))                                # (B, N)
        bias = bias + rab_time.astype(jnp.float32)[time_bucket(t[:, :, None] - t[:, None, :])]
    s = scores + bias[:, None]
    p_attn = jnp.where(allowed[:, None], jax.nn.silu(s) / norm, 0.0).astype(v.dtype)
    dense = jnp.einsum("bhij,bjhd->bihd", p_attn, vd, preferred_element_type=jnp.float32)

    # Back to the jagged layout by a gather (its transpose is the scatter autodiff needs).
    tok = jnp.arange(total, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(offsets, tok, side="right") - 1, 0, lengths.shape[0] - 1)
    local = tok - offsets[seq] if lengths.shape[0] else tok
    keep = (tok < offsets[-1]) & (local < n) & (local >= 0)
    if lengths.shape[0] == 0:
        return jnp.zeros(v.shape, q.dtype)
    out = dense[seq, jnp.clip(local, 0, n - 1)]
    return jnp.where(keep[:, None, None], out, 0.0).astype(q.dtype)


__all__ = [
    "NORMALIZERS", "NUM_POS_BUCKETS", "NUM_TIME_BUCKETS", "POS_BOUNDARIES", "TIME_BOUNDARIES",
    "allowed_mask", "history_lengths", "hstu_attention_reference", "normalizer_value",
    "pos_bucket", "rab_positions", "sequence_lengths", "time_bucket", "validate_inputs",
]
