"""The NN-search op's entry point: :func:`nn_search`, one call for every layout and impl."""
from __future__ import annotations

import operator
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from pallas_kernels._common import resolve_impl
from pallas_kernels.int8_codec import QUANT_SCALE
from pallas_kernels.nn_search.config import NNSearchConfig
from pallas_kernels.nn_search.pallas_triton import nn_search_pallas_triton
from pallas_kernels.nn_search.reference import (
    PAD_INDEX,
    nn_search_grouped_reference,
    nn_search_reference,
)


def _is_int(a) -> bool:
    return jnp.issubdtype(a.dtype, jnp.integer)


def _is_index(v) -> bool:
    try:
        operator.index(v)
    except TypeError:
        return False
    return True


def _validate(seq_q, lengths, cand, cand_to_req, offsets, k, max_length) -> None:
    """Shapes and dtypes of every layout; errors name the argument."""
    if offsets is None:
        if seq_q.ndim != 3 or seq_q.dtype != jnp.int8:
            raise ValueError(f"seq_q: expected (U, L, D) int8 codes, got {seq_q.shape} "
                             f"{seq_q.dtype}")
        num_req = seq_q.shape[0]
    else:
        if seq_q.ndim != 2 or seq_q.dtype != jnp.int8:
            raise ValueError(f"seq_q: expected (T, D) int8 codes with offsets (jagged layout), "
                             f"got {seq_q.shape} {seq_q.dtype}")
        if offsets.ndim != 1 or not _is_int(offsets):
            raise ValueError(f"offsets: expected (U,) int, got {offsets.shape} {offsets.dtype}")
        num_req = offsets.shape[0]
    if lengths.shape != (num_req,) or not _is_int(lengths):
        raise ValueError(f"lengths: expected ({num_req},) int (U), got {lengths.shape} "
                         f"{lengths.dtype}")
    d = seq_q.shape[-1]
    if cand.ndim not in (2, 3) or cand.shape[-1] != d or not jnp.issubdtype(cand.dtype,
                                                                             jnp.floating):
        raise ValueError(f"cand: expected (N, {d}) or (U, N, {d}) float, got {cand.shape} "
                         f"{cand.dtype}")
    if cand.ndim == 3:
        if cand.shape[0] != num_req:
            raise ValueError(f"cand: grouped candidates (U, N, D) need U = {num_req}, got "
                             f"{cand.shape}")
        if cand_to_req is not None:
            raise ValueError("cand_to_req: must be None with grouped candidates (U, N, D)")
    elif cand_to_req is None:
        if cand.shape[0] != num_req:
            raise ValueError(f"cand: without cand_to_req, candidate n owns sequence n: expected "
                             f"{num_req} candidates (U), got {cand.shape[0]}")
    elif cand_to_req.shape != cand.shape[:1] or not _is_int(cand_to_req):
        raise ValueError(f"cand_to_req: expected ({cand.shape[0]},) int, got {cand_to_req.shape} "
                         f"{cand_to_req.dtype}")
    if not _is_index(k) or k < 0:
        raise ValueError(f"k: expected an int >= 0, got {k!r}")
    if max_length is not None and (not _is_index(max_length) or max_length < 1):
        raise ValueError(f"max_length: expected None or an int >= 1, got {max_length!r}")


def _densify(seq_q, offsets, lengths, max_length: Optional[int]):
    """Jagged (T, D) -> dense (U, W, D), W = min(max_length or T, T), lengths clipped to W (and
    to the rows that exist past each offset, as the kernel does)."""
    total = seq_q.shape[0]
    width = min(max_length or total, total)
    offsets = jnp.clip(offsets.astype(jnp.int32), 0, total)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, jnp.minimum(total - offsets, width))
    pos = jnp.arange(width, dtype=jnp.int32)[None, :]
    inside = pos < lengths[:, None]
    src = jnp.where(inside, offsets[:, None] + pos, 0)
    dense = jnp.where(inside[..., None], seq_q[src], 0).astype(jnp.int8)
    return dense, lengths


def _xla(seq_q, lengths, cand, cand_to_req, offsets, *, k, max_length, scale):
    if offsets is not None:
        seq_q, lengths = _densify(seq_q, offsets, lengths, max_length)
    if cand.ndim == 3:
        return nn_search_grouped_reference(seq_q, lengths, cand, k=k, scale=scale)
    if cand_to_req is None:
        return nn_search_reference(seq_q, lengths, cand, k=k, scale=scale)
    # The kernel's rule for a request index outside [0, U) (not checkable on values inside jit):
    # an all-padding result.
    c2r = cand_to_req.astype(jnp.int32)
    bad = ((c2r < 0) | (c2r >= seq_q.shape[0]))[:, None]
    idx, scores = nn_search_reference(seq_q, lengths, cand, jnp.where(bad[:, 0], 0, c2r), k=k,
                                      scale=scale)
    return jnp.where(bad, PAD_INDEX, idx), jnp.where(bad, -jnp.inf, scores)


def _pallas_triton(seq_q, lengths, cand, cand_to_req, offsets, *, k, scale, config, interpret):
    if offsets is None:                      # dense -> jagged: request u starts at row u * L
        u, length, d = seq_q.shape
        offsets = jnp.arange(u, dtype=jnp.int32) * length
        lengths = jnp.clip(lengths.astype(jnp.int32), 0, length)
        seq_q = seq_q.reshape(u * length, d)
    out_shape = cand.shape[:-1] + (k,)
    if cand.ndim == 3:                       # grouped -> flat, candidate (u, n) owned by u
        u, n, d = cand.shape
        cand = cand.reshape(u * n, d)
        cand_to_req = jnp.repeat(jnp.arange(u, dtype=jnp.int32), n)
    elif cand_to_req is None:                # candidate n owns sequence n
        cand_to_req = jnp.arange(cand.shape[0], dtype=jnp.int32)
    idx, scores = nn_search_pallas_triton(seq_q, offsets, lengths, cand, cand_to_req, k=k,
                                          scale=scale, config=config, interpret=interpret)
    return idx.reshape(out_shape), scores.reshape(out_shape)


def nn_search(seq_q: jax.Array, lengths: jax.Array, cand: jax.Array,
              cand_to_req: Optional[jax.Array] = None, *, k: int,
              offsets: Optional[jax.Array] = None, max_length: Optional[int] = None,
              impl: str = "auto", scale: float = QUANT_SCALE,
              config: Optional[NNSearchConfig] = None,
              interpret: Optional[bool] = None) -> Tuple[jax.Array, jax.Array]:
    """NN(S, c; K): for every candidate, the K tokens of its request's sequence most similar to it.

    Semantics (every implementation and layout): tokens are int8 codes, dequantized (``scale``)
    and L2-normalized (``x / max(||x||, 1e-12)``); the score of a token is its cosine with the
    L2-normalized candidate. The top K scores are selected, ties to the lower index; padding
    positions (``>= length``) are never selected; the result is in chronological order (ascending
    index), then padding slots (index ``-1``, score ``-inf``) where fewer than K tokens exist. A
    candidate whose ``cand_to_req`` is outside ``[0, U)`` gets an all-padding result. See
    :mod:`pallas_kernels.nn_search.reference`.

    Layouts (U requests, N candidates, D embedding width):

    * dense: ``offsets`` is None, ``seq_q`` (U, L, D) int8 (left-aligned), ``lengths`` (U,).
    * jagged: ``offsets`` (U,) given, ``seq_q`` (T, D) int8 (the requests' tokens concatenated;
      request u is rows ``[offsets[u], offsets[u] + lengths[u])``), ``lengths`` (U,). Lengths are
      clipped to the rows that exist.
    * candidates: ``cand`` (N, D) float with ``cand_to_req`` (N,) int, the request of each
      candidate (de-duplicated: one sequence, many candidates); with ``cand_to_req`` None,
      candidate n owns sequence n (U == N, the broadcast layout). Results (N, k).
    * grouped: ``cand`` (U, N, D) float, ``cand_to_req`` None: ``cand[u, n]`` belongs to request
      u. Results (U, N, k). (Documented for dense ``seq_q``; jagged works the same.)

    Args:
      k: K, tokens kept per candidate. 0 gives empty (..., 0) int32 / float32 results;
        ``"pallas_triton"`` supports up to ``MAX_K`` (128).
      max_length: jagged layout, ``impl="xla"`` only: the width W of the dense copy the reference
        runs on, ``min(max_length or T, T)`` (static; lengths are clipped to W, so it must be at
        least the longest sequence for exact results).
      impl: ``"xla"``: the pure-jnp reference (:func:`nn_search_reference`, or
        :func:`nn_search_grouped_reference` for grouped candidates; the jagged layout is densified
        first). ``"pallas_triton"``: the fused kernel
        (:func:`~pallas_kernels.nn_search.pallas_triton.nn_search_pallas_triton`; dense sequences
        are flattened to the jagged layout, grouped candidates to (U*N, D)); it needs D a power of
        two >= 16. ``"auto"``: ``"pallas_triton"`` on a GPU, ``"xla"`` elsewhere.
      scale: int8 quantization scale (0.65 in the paper).
      config, interpret: the kernel's tiling and Pallas interpret mode (kernel only; defaults:
        ``NNSearchConfig()``, interpret mode when no GPU backend is present).

    Returns:
      (indices int32, scores float32), each (N, k) or (U, N, k) for grouped candidates: positions
      within the request's sequence.

    Not jitted itself (the reference and the kernel wrapper are, so eager calls of the same shapes
    share one compile whatever the layout); inside ``jax.jit``, ``k``, ``max_length``, ``impl``,
    ``scale``, ``config`` and ``interpret`` must be Python values (static).
    """
    impl = resolve_impl(impl)
    seq_q, lengths, cand = jnp.asarray(seq_q), jnp.asarray(lengths), jnp.asarray(cand)
    offsets = None if offsets is None else jnp.asarray(offsets)
    cand_to_req = None if cand_to_req is None else jnp.asarray(cand_to_req)
    _validate(seq_q, lengths, cand, cand_to_req, offsets, k, max_length)
    if k == 0:
        shape = cand.shape[:-1] + (0,)
        return jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.float32)
    if impl == "xla":
        return _xla(seq_q, lengths, cand, cand_to_req, offsets, k=k, max_length=max_length,
                    scale=scale)
    return _pallas_triton(seq_q, lengths, cand, cand_to_req, offsets, k=k, scale=scale,
                          config=config, interpret=interpret)


__all__ = ["nn_search"]
