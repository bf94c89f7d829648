"""S_all, written once: which tokens go in which slots (paper §3.2.2, eq. 2-3).

    S_all = NN(S_LL, c; K_LL) ⊕ S_RT[:r] ⊕ NN(S_RT[r:], c; K_RT) ⊕ NN(S_imp, c; K_imp)

Sequences are stored chronologically (index 0 the oldest token), so ``S_RT[:r]``, the r most recent
real-time actions, are the *last* r tokens of S_RT, and ``S_RT[r:]``, the older part, is the prefix
of length ``max(len(S_RT) - r, 0)``. Each segment has fixed slots (``SelectionConfig.segments``);
inside a segment valid tokens come first in chronological order, padding (index -1, mask False,
zero features) after. ``docs/design.md`` ("S_all slots and ordering") has the reasoning.

Three callers compute S_all and all go through :func:`segment_indices` and :func:`assemble`:

* offline NN feature logging on the host (numpy, :mod:`transact_jax.data.features`);
* de-duplicated serving on the device (jnp, :mod:`transact_jax.data.device_features`): one copy of
  each request's sequences, candidates mapped to their request;
* the broadcast serving baseline (jnp, the same module with one copy of the sequences per candidate).

They differ only in the array module, how the NN search runs (``search``) and how selected tokens are
fetched (``gather``); the slot semantics live here, so train/serve parity holds by construction.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Tuple

from transact_jax.config import SelectionConfig

PAD_INDEX = -1
"""Index of a slot that holds no token."""

FAMILY = {"ll": "ll", "rt_recent": "rt", "rt_nn": "rt", "imp": "imp"}
"""The source sequence family of each S_all segment."""

Search = Callable[[str, Any, int], Any]
"""``search(family, searched_lengths (U,), k) -> (N, k)`` NN indices (chronological, -1 padding)
of every candidate within its request's sequence of ``family``, searching only the first
``searched_lengths[u]`` tokens."""


def recent_index(lengths, count: int, xp) -> Any:
    """(U, count) positions of the ``count`` most recent tokens, chronological, -1 padding last."""
    lengths = lengths.astype(xp.int32)
    start = xp.maximum(lengths - count, 0)[:, None]
    idx = start + xp.arange(count, dtype=xp.int32)[None, :]
    return xp.where(idx < lengths[:, None], idx, PAD_INDEX).astype(xp.int32)


def random_index(lengths, count: int, xp) -> Any:
    """(U, count) positions of ``count`` pseudo-random tokens, chronological, -1 padding last.

    Stratified: the sequence is cut into ``count`` equal strata and one position is drawn in each
    by an integer hash of (length, stratum), so the draw is the same in numpy and jnp (the host
    logger and the device agree) and spreads over the whole history. A sequence of at most
    ``count`` tokens keeps them all."""
    n = lengths.astype(xp.int32)[:, None]
    j = xp.arange(count, dtype=xp.int32)[None, :]
    lo = (j * n) // count
    hi = ((j + 1) * n) // count
    h = (n.astype(xp.uint32) * xp.uint32(0x9E3779B1)) ^ (j.astype(xp.uint32) * xp.uint32(0x85EBCA77))
    h = (h ^ (h >> xp.uint32(15))) * xp.uint32(0x2C1B3C6D)
    h = h ^ (h >> xp.uint32(12))
    width = xp.maximum(hi - lo, 1).astype(xp.uint32)
    drawn = (lo + (h % width).astype(xp.int32)).astype(xp.int32)
    return xp.where(n <= count, recent_index(lengths, count, xp), drawn).astype(xp.int32)


def segment_indices(lengths: Mapping[str, Any], sel: SelectionConfig, search: Search,
                    per_candidate: Callable[[Any], Any], xp) -> Dict[str, Any]:
    """Positions (N, k_segment) in the source sequence of every S_all segment's tokens.

    ``lengths[family]`` are the (U,) sequence lengths of ``"ll"``, ``"rt"``, ``"imp"``;
    ``per_candidate`` maps a per-request (U, ...) array to its candidates (N, ...).
    ``sel.ll_selection`` ``"recent"`` / ``"random"`` fill the ``ll`` segment with the K_LL most
    recent / :func:`random_index` S_LL tokens instead of NN(S_LL, c; K_LL) (ablations; the same
    tokens for every candidate of a request).
    """
    rt_old = xp.maximum(lengths["rt"] - sel.r, 0)
    if sel.ll_selection in ("recent", "random"):   # ablations: not selected by similarity
        pick = recent_index if sel.ll_selection == "recent" else random_index
        ll = per_candidate(pick(lengths["ll"], sel.k_ll, xp))
    else:
        ll = search("ll", lengths["ll"], sel.k_ll)
    return {
        "ll": ll,
        "rt_recent": per_candidate(recent_index(lengths["rt"], sel.r, xp)),
        "rt_nn": search("rt", rt_old, sel.k_rt),
        "imp": search("imp", lengths["imp"], sel.k_imp),
    }


def assemble(indices: Mapping[str, Any], sel: SelectionConfig,
             gather: Callable[[str, Any], Dict[str, Any]], xp) -> Tuple[Dict[str, Any], Any, Any]:
    """S_all from per-segment positions, in ``sel.segments`` order.

    ``gather(family, idx)`` returns the token fields (name -> (N, k, ...) array) at positions ``idx``
    (N, k) of each candidate's ``family`` sequence, zeros where ``idx == -1``.
    Returns (fields name -> (N, |S_all|, ...), mask (N, |S_all|) bool, source_index (N, |S_all|)).
    """
    names = [name for name, _ in sel.segments]
    parts = [gather(FAMILY[name], indices[name]) for name in names]
    fields = {f: xp.concatenate([p[f] for p in parts], axis=1) for f in parts[0]}
    source_index = xp.concatenate([indices[name] for name in names], axis=1).astype(xp.int32)
    return fields, source_index >= 0, source_index
