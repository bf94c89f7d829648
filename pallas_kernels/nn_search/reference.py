"""Pure-jnp reference of the nearest-neighbour (NN) token selection (paper §3.2.2, eq. 3).

For a candidate item ``c`` and a user sequence ``S`` of int8 embeddings, ``NN(S, c; K)`` keeps the K
tokens whose embeddings are most similar to the candidate's:

1. dequantize the int8 codes (``pallas_kernels.int8_codec``) and L2-normalize each token
   (``x / max(||x||, 1e-12)``); the candidate is L2-normalized too, so scores are cosines in [-1, 1];
2. score every token: ``s_i = <x_i, c>``;
3. take the top K scores with ``jax.lax.top_k`` (ties go to the lower index);
4. padding positions (``i >= length``) are never selected: when fewer than K valid tokens exist, the
   remaining slots are padding, with index ``-1`` and score ``-inf``;
5. the selected tokens are returned in chronological order (ascending index, index 0 is the oldest
   token), padding last. The order is what the encoder sees; selection itself is order-free.

Sequences are dense and left-aligned: ``seq[u, :lengths[u]]`` is valid. Candidates are mapped to the
sequence of their request by ``cand_to_req`` (the de-duplicated, "broadcast-free" layout of paper
§3.4.2: one copy of each request's sequence, many candidates pointing at it); without
``cand_to_req``, candidate n owns sequence n (the broadcast layout, U == N).

This module is the semantic contract that the fused Pallas kernel
(:mod:`pallas_kernels.nn_search.pallas_triton`) must match, and the ``impl="xla"`` implementation
of :func:`pallas_kernels.nn_search.api.nn_search`. It favours clarity over speed;
:func:`nn_search_grouped_reference` is the faster layout for the case where every request has the
same number of candidates (used for offline feature logging).
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.int8_codec import QUANT_SCALE, dequantize_int8, l2_normalize

PAD_INDEX: int = -1
"""Index reported for a selection slot that holds no token."""


def normalized_sequence(seq_q: jax.Array, scale: float = QUANT_SCALE) -> jax.Array:
    """Dequantize int8 codes ``(..., L, D)`` and L2-normalize each token, in float32."""
    return l2_normalize(dequantize_int8(seq_q, scale, jnp.float32))


def masked_top_k(scores: jax.Array, valid: jax.Array, k: int) -> Tuple[jax.Array, jax.Array]:
    """Top-``k`` of ``scores`` (..., L) among ``valid`` positions, in chronological order.

    Returns ``(indices, top_scores)`` of shape (..., k): valid selections first in ascending index
    order, then padding slots (index ``PAD_INDEX``, score ``-inf``). Ties go to the lower index
    (``lax.top_k``'s rule). ``k`` may exceed L; the extra slots are padding.
    """
    length = scores.shape[-1]
    neg_inf = jnp.asarray(-jnp.inf, scores.dtype)
    masked = jnp.where(valid, scores, neg_inf)
    if k > length:  # lax.top_k needs k <= L: pad with never-selectable columns.
        pad = [(0, 0)] * (masked.ndim - 1) + [(0, k - length)]
        masked = jnp.pad(masked, pad, constant_values=-jnp.inf)
        valid = jnp.pad(valid, pad, constant_values=False)
    top_scores, top_idx = lax.top_k(masked, k)
    selected = jnp.take_along_axis(valid, top_idx, axis=-1)
    # Chronological order: sort by index, with padding keyed past every real index.
    key = jnp.where(selected, top_idx, jnp.iinfo(jnp.int32).max)
    key, top_scores = lax.sort((key, top_scores), dimension=-1, num_keys=1)
    is_token = key != jnp.iinfo(jnp.int32).max
    indices = jnp.where(is_token, key, PAD_INDEX).astype(jnp.int32)
    return indices, jnp.where(is_token, top_scores, neg_inf)


def _valid_mask(lengths: jax.Array, length: int) -> jax.Array:
    return jnp.arange(length, dtype=jnp.int32) < lengths[..., None]


@partial(jax.jit, static_argnames=("k", "scale"))
def nn_search_reference(
    seq_q: jax.Array,
    lengths: jax.Array,
    cand: jax.Array,
    cand_to_req: Optional[jax.Array] = None,
    *,
    k: int,
    scale: float = QUANT_SCALE,
) -> Tuple[jax.Array, jax.Array]:
    """NN(S, c; K) for every candidate against the sequence of its request.

    Args:
      seq_q: (U, L, D) int8 embedding codes, one sequence per request, left-aligned.
      lengths: (U,) int number of valid tokens of each sequence (0 allowed).
      cand: (N, D) float candidate embeddings (any float dtype; computed in float32).
      cand_to_req: (N,) int index of each candidate's request in ``[0, U)``; ``None``: candidate
        n owns sequence n (U == N, the broadcast layout; no gather of the sequences).
      k: K, tokens kept per candidate.
      scale: int8 quantization scale (0.65 in the paper).

    Returns:
      (indices (N, k) int32, scores (N, k) float32), as described in the module docstring.
    """
    seq = normalized_sequence(seq_q, scale)                    # (U, L, D)
    c = l2_normalize(cand.astype(jnp.float32))                 # (N, D)
    valid = _valid_mask(lengths, seq_q.shape[1])               # (U, L)
    if cand_to_req is None:
        if cand.shape[0] != seq_q.shape[0]:
            raise ValueError(f"cand: without cand_to_req, candidate n owns sequence n: expected "
                             f"{seq_q.shape[0]} candidates (U), got {cand.shape[0]}")
    else:
        seq, valid = seq[cand_to_req], valid[cand_to_req]      # (N, L, D), (N, L)
    # Elementwise product + sum, not a dot: XLA tiles dots so that rows in a remainder tile are
    # summed in a different order, and identical tokens would then get scores one ulp apart,
    # breaking the "ties to the lower index" rule. The reduction is position-invariant.
    scores = jnp.sum(c[:, None, :] * seq, axis=-1)             # (N, L)
    return masked_top_k(scores, valid, k)


@partial(jax.jit, static_argnames=("k", "scale"))
def nn_search_grouped_reference(
    seq_q: jax.Array,
    lengths: jax.Array,
    cand: jax.Array,
    *,
    k: int,
    scale: float = QUANT_SCALE,
) -> Tuple[jax.Array, jax.Array]:
    """Same selection as :func:`nn_search_reference` for ``cand`` of shape (U, N, D).

    Candidate ``cand[u, n]`` belongs to request ``u``; the result has shape (U, N, k). This layout
    needs no gather of the sequence, so it is what offline feature logging uses.
    """
    seq = normalized_sequence(seq_q, scale)                    # (U, L, D)
    c = l2_normalize(cand.astype(jnp.float32))                 # (U, N, D)
    scores = jnp.sum(c[:, :, None, :] * seq[:, None, :, :], axis=-1)   # (U, N, L), see above
    valid = _valid_mask(lengths, seq_q.shape[1])[:, None, :]
    valid = jnp.broadcast_to(valid, scores.shape)
    return masked_top_k(scores, valid, k)
