"""S_all on the accelerator, from the full sequences of serving requests (paper §3.4.1-3.4.2).

The device twin of :func:`transact_jax.data.features.select_s_all`, with the same slot semantics
(:mod:`transact_jax.data.s_all`): the NN searches run on the device
(:func:`pallas_kernels.nn_search.api.nn_search`: the fused int8 Pallas kernel or the XLA reference)
and the selected tokens' features are gathered into the fixed S_all slots in the same jitted program.
It produces exactly the ``embeddings``, ``actions``, ``surfaces`` and mask of the logged-feature path
for the same requests (tested), which is what makes serving scores equal training scores. Token
timestamps are not gathered: the model does not read them.

Two layouts of :class:`DeviceSequences`:

* **jagged** (de-duplicated, paper Figure 5): each request's tokens once, concatenated (T, ...), with
  ``offsets`` (U,); candidates point at their request through ``cand_to_req``;
* **dense**, ``offsets=None``: (U, L, ...) left-aligned rows. With ``cand_to_req=None`` row n belongs
  to candidate n: the broadcast layout of a naive server, where every candidate carries its own copy
  of its request's sequences (the serving baseline).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Optional

import jax
import jax.numpy as jnp

from pallas_kernels.int8_codec import dequantize_int8
from pallas_kernels.nn_search.api import nn_search
from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data import s_all as slots

_FIELDS = ("embeddings", "actions", "surfaces")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeviceSequences:
    """One source sequence family (S_LL, S_RT or S_imp) of U requests as device arrays:
    ``embeddings`` int8 (T, D) jagged or (U, L, D) dense, ``actions`` and ``surfaces`` (T,) or
    (U, L), ``lengths`` (U,) int32, ``offsets`` (U,) int32 start of each request's tokens (jagged) or
    None (dense)."""

    embeddings: jax.Array
    actions: jax.Array
    surfaces: jax.Array
    lengths: jax.Array
    offsets: Optional[jax.Array] = None

    @classmethod
    def from_jagged(cls, seqs) -> "DeviceSequences":
        """From a host :class:`~transact_jax.data.schema.JaggedSequences` (one copy per request)."""
        return cls(jnp.asarray(seqs.tokens.embeddings), jnp.asarray(seqs.tokens.actions),
                   jnp.asarray(seqs.tokens.surfaces), jnp.asarray(seqs.lengths, jnp.int32),
                   jnp.asarray(seqs.offsets[:-1], jnp.int32))

    def gather(self, cand_to_req: Optional[jax.Array], idx: jax.Array) -> Dict[str, jax.Array]:
        """Token fields at positions ``idx`` (N, k) of each candidate's sequence, zeros at -1."""
        mask = idx >= 0
        if self.offsets is None:          # dense rows: row n of candidate n, or of its request
            rows = (jnp.arange(idx.shape[0], dtype=jnp.int32) if cand_to_req is None
                    else cand_to_req)
            width = self.actions.shape[1]
            flat = jnp.where(mask, rows[:, None] * width + idx, 0)
        else:
            flat = jnp.where(mask, self.offsets[cand_to_req][:, None] + idx, 0)
        out = {}
        for name in _FIELDS:
            a = getattr(self, name)
            a = a.reshape((-1,) + a.shape[2:]) if self.offsets is None else a
            got = a[flat]
            keep = mask.reshape(mask.shape + (1,) * (got.ndim - mask.ndim))
            out[name] = jnp.where(keep, got, jnp.zeros((), a.dtype))
        return out


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


@functools.partial(jax.jit, static_argnames=("feat", "sel", "impl"))
def select_s_all_device(ll: DeviceSequences, rt: DeviceSequences, imp: DeviceSequences,
                        cand_embedding: jax.Array, cand_to_req: Optional[jax.Array], *,
                        feat: FeatureConfig, sel: SelectionConfig,
                        impl: str = "auto") -> DeviceSAll:
    """S_all (N, |S_all|) for N candidates (int8 ``cand_embedding`` (N, D); ``cand_to_req`` (N,), or
    None when the sequences are dense with one row per candidate). ``impl`` is the NN search's
    (``"auto"``, ``"pallas_triton"``, ``"xla"``).

    Sequences must already be truncated to the configured maxima (``RequestBatch.truncate_recent``),
    as the logged-feature path does.
    """
    seqs = {"ll": ll, "rt": rt, "imp": imp}
    cand = dequantize_int8(cand_embedding, feat.quant_scale, jnp.float32)
    c2r = None if cand_to_req is None else cand_to_req.astype(jnp.int32)

    def search(family: str, lengths: jax.Array, k: int) -> jax.Array:
        src = seqs[family]
        idx, _ = nn_search(src.embeddings, lengths, cand, c2r, k=k, offsets=src.offsets,
                           max_length=sel.max_lengths[family], impl=impl,
                           scale=feat.quant_scale)
        return idx

    def per_candidate(a: jax.Array) -> jax.Array:
        return a if c2r is None else a[c2r]

    lengths = {name: src.lengths for name, src in seqs.items()}
    index = slots.segment_indices(lengths, sel, search, per_candidate, jnp)
    fields, mask, source_index = slots.assemble(
        index, sel, lambda family, idx: seqs[family].gather(c2r, idx), jnp)
    return DeviceSAll(mask=mask, source_index=source_index, **fields)
