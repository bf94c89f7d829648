"""S_all assembly on the accelerator, from de-duplicated requests (SPEC §2, §7; paper §3.4.2).

The serving-time twin of :func:`transact_jax.data.features.select_s_all`: the request's full
sequences are on the device once per request (jagged, with offsets), the NN searches run there
(:func:`pallas_kernels.nn_search.nn_search_jagged`, or the XLA reference), and the selected tokens'
features are gathered into the fixed S_all slots in the same jitted program::

    S_all = NN(S_LL, c; K_LL) ⊕ S_RT[:r] ⊕ NN(S_RT[r:], c; K_RT) ⊕ NN(S_imp, c; K_imp)

It produces exactly the ``embeddings``, ``actions``, ``surfaces`` and mask of the logged-feature path
for the same requests (tested), which is what makes serving scores equal training scores. Token
timestamps are not gathered: the model does not read them.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Literal

import jax
import jax.numpy as jnp

from pallas_kernels.int8_codec import dequantize_int8
from pallas_kernels.nn_search import nn_search_jagged
from pallas_kernels.nn_search_reference import PAD_INDEX, nn_search_reference
from transact_jax.config import FeatureConfig, SelectionConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeviceSequences:
    """One source sequence family (S_LL, S_RT or S_imp) of U requests, jagged, as device arrays:
    ``embeddings`` (T, D) int8, ``actions`` (T,), ``surfaces`` (T,), ``offsets`` (U,) int32 start of
    each request's tokens, ``lengths`` (U,) int32."""

    embeddings: jax.Array
    actions: jax.Array
    surfaces: jax.Array
    offsets: jax.Array
    lengths: jax.Array

    @classmethod
    def from_jagged(cls, seqs) -> "DeviceSequences":
        """From a host :class:`~transact_jax.data.schema.JaggedSequences` (one copy per request)."""
        offsets = jnp.asarray(seqs.offsets[:-1], jnp.int32)
        return cls(jnp.asarray(seqs.tokens.embeddings), jnp.asarray(seqs.tokens.actions),
                   jnp.asarray(seqs.tokens.surfaces), offsets,
                   jnp.asarray(seqs.lengths, jnp.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeviceSAll:
    """S_all of N candidates: ``embeddings`` (N, S, D) int8, ``actions`` (N, S), ``surfaces`` (N, S),
    ``mask`` (N, S) bool, ``source_index`` (N, S) int32 (position in the source sequence, -1 pad)."""

    embeddings: jax.Array
    actions: jax.Array
    surfaces: jax.Array
    mask: jax.Array
    source_index: jax.Array


def _search(seqs: DeviceSequences, lengths: jax.Array, cand: jax.Array, cand_to_req: jax.Array,
            k: int, scale: float, impl: str, max_len: int) -> jax.Array:
    if k == 0:
        return jnp.zeros((cand.shape[0], 0), jnp.int32)
    if impl == "pallas":
        idx, _ = nn_search_jagged(seqs.embeddings, seqs.offsets, lengths, cand, cand_to_req, k=k,
                                  scale=scale)
        return idx
    # XLA: densify to (U, max_len) (the configured maximum) and run the reference.
    width = max(1, min(max_len, seqs.embeddings.shape[0]))
    lengths = jnp.minimum(lengths, width)
    pos = jnp.arange(width)[None, :]
    inside = pos < lengths[:, None]
    src = jnp.where(inside, seqs.offsets[:, None] + pos, 0)
    dense = jnp.where(inside[..., None], seqs.embeddings[src], 0).astype(jnp.int8)
    idx, _ = nn_search_reference(dense, lengths, cand, cand_to_req, k=k, scale=scale)
    return idx


def recent_index(lengths: jax.Array, count: int) -> jax.Array:
    """(len(lengths), count) positions of the ``count`` most recent tokens, chronological, -1 pad."""
    start = jnp.maximum(lengths - count, 0)[:, None]
    idx = start + jnp.arange(count)[None, :]
    return jnp.where(idx < lengths[:, None], idx, PAD_INDEX).astype(jnp.int32)


def _gather(seqs: DeviceSequences, cand_to_req: jax.Array, idx: jax.Array):
    mask = idx >= 0
    flat = jnp.where(mask, seqs.offsets[cand_to_req][:, None] + idx, 0)

    def take(a):
        got = a[flat]
        keep = mask.reshape(mask.shape + (1,) * (got.ndim - mask.ndim))
        return jnp.where(keep, got, jnp.zeros((), a.dtype))

    return take(seqs.embeddings), take(seqs.actions), take(seqs.surfaces), mask


@functools.partial(jax.jit, static_argnames=("feat", "sel", "impl"))
def select_s_all_device(ll: DeviceSequences, rt: DeviceSequences, imp: DeviceSequences,
                        cand_embedding: jax.Array, cand_to_req: jax.Array, *, feat: FeatureConfig,
                        sel: SelectionConfig,
                        impl: Literal["pallas", "xla"] = "pallas") -> DeviceSAll:
    """S_all (N, |S_all|) for N candidates (int8 ``cand_embedding`` (N, D), ``cand_to_req`` (N,)).

    Sequences must already be truncated to the configured maxima (``RequestBatch.truncate_recent``),
    as the logged-feature path does.
    """
    scale = feat.quant_scale
    cand = dequantize_int8(cand_embedding, scale, jnp.float32)
    c2r = cand_to_req.astype(jnp.int32)
    rt_old = jnp.maximum(rt.lengths - sel.r, 0)
    index = {
        "ll": (ll, _search(ll, ll.lengths, cand, c2r, sel.k_ll, scale, impl, sel.max_ll_len)),
        "rt_recent": (rt, recent_index(rt.lengths, sel.r)[c2r]),
        "rt_nn": (rt, _search(rt, rt_old, cand, c2r, sel.k_rt, scale, impl, sel.max_rt_len)),
        "imp": (imp, _search(imp, imp.lengths, cand, c2r, sel.k_imp, scale, impl, sel.max_imp_len)),
    }
    return assemble_s_all(index, lambda seqs, idx: _gather(seqs, c2r, idx), sel)


def assemble_s_all(index, gather: Callable, sel: SelectionConfig) -> DeviceSAll:
    """S_all from per-segment selections: ``index[segment] = (source, idx)`` with (N, k) positions
    (-1 padding); ``gather(source, idx)`` returns (embeddings, actions, surfaces, mask) of those
    positions. The segments are laid out in ``sel.segments`` order."""
    segs = [index[name] for name, _ in sel.segments]
    parts = [gather(source, idx) for source, idx in segs]
    return DeviceSAll(
        embeddings=jnp.concatenate([p[0] for p in parts], axis=1),
        actions=jnp.concatenate([p[1] for p in parts], axis=1),
        surfaces=jnp.concatenate([p[2] for p in parts], axis=1),
        mask=jnp.concatenate([p[3] for p in parts], axis=1),
        source_index=jnp.concatenate([idx for _, idx in segs], axis=1))
