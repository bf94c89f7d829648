"""The byte layout of one staged batch: every input array of a bucket packed into one buffer.

A batch crosses to the device as a single contiguous uint8 buffer (the "memory arena" of paper
§3.4.2): one host-to-device copy instead of one per array. :class:`ArenaLayout` fixes where each
array ("leaf") lives in that buffer (64-byte aligned); on the host, :meth:`ArenaLayout.views` gives
writable typed numpy views into the buffer, so a batch is collated directly into it; on the device,
:meth:`ArenaLayout.unpack` (inside the jitted forward) slices the buffer and bitcasts each slice
back to its dtype and shape, which XLA fuses into the consumers.

Leaves of the two layouts (D = embedding width, F = dense features, C = categorical features):

* dedup, per family f in (ll, rt, imp): ``f.embeddings`` (T_f, D) int8, ``f.actions`` (T_f,),
  ``f.surfaces`` (T_f,) int16, ``f.offsets`` (U,) int32, ``f.lengths`` (U,) int32; and
  ``cand_to_req`` (N,) int32;
* broadcast, per family: ``f.embeddings`` (N, L_f, D), ``f.actions`` (N, L_f), ``f.surfaces``
  (N, L_f), ``f.lengths`` (N,) int32;
* both: ``cand_embedding`` (N, D) int8, ``dense`` (N, F) float32, ``categorical`` (N, C) int32.

Each leaf belongs to a *part*, "sequences" (request-level sequence features) or "candidates", so
that host-to-device bytes can be reported per part. Token timestamps are not shipped: the model
does not read them.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from transact_jax.config import FeatureConfig
from transact_jax.serving.buckets import Bucket

ALIGN = 64
FAMILIES = ("ll", "rt", "imp")
PARTS = ("sequences", "candidates")


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One array in the arena: name, numpy dtype name, shape, part, byte offset."""

    name: str
    dtype: str
    shape: Tuple[int, ...]
    part: str
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class ArenaLayout:
    """Where every leaf of a bucket lives in the staged buffer (hashable: a static jit argument)."""

    bucket: Bucket
    leaves: Tuple[Leaf, ...]
    nbytes: int

    @classmethod
    def build(cls, bucket: Bucket, specs) -> "ArenaLayout":
        """From ``(name, dtype, shape, part)`` specs, in order, each leaf 64-byte aligned."""
        leaves, offset = [], 0
        for name, dtype, shape, part in specs:
            if part not in PARTS:
                raise ValueError(f"ArenaLayout: leaf {name}: unknown part {part!r}")
            leaf = Leaf(name, np.dtype(dtype).name, tuple(int(s) for s in shape), part, offset)
            leaves.append(leaf)
            offset += -(-leaf.nbytes // ALIGN) * ALIGN
        return cls(bucket, tuple(leaves), max(offset, ALIGN))

    def leaf(self, name: str) -> Leaf:
        for leaf in self.leaves:
            if leaf.name == name:
                return leaf
        raise KeyError(name)

    def part_nbytes(self) -> Dict[str, int]:
        """Bytes of each part (leaf sizes, alignment gaps excluded); computed once per layout (it
        is reported with every batch)."""
        return dict(self._part_nbytes)

    @functools.cached_property
    def _part_nbytes(self) -> Dict[str, int]:
        out = {p: 0 for p in PARTS}
        for leaf in self.leaves:
            out[leaf.part] += leaf.nbytes
        return out

    def views(self, buffer: np.ndarray) -> Dict[str, np.ndarray]:
        """Writable typed numpy views of each leaf inside ``buffer`` (uint8, ``nbytes`` long)."""
        if buffer.dtype != np.uint8 or buffer.ndim != 1 or buffer.shape[0] < self.nbytes:
            raise ValueError(f"ArenaLayout.views: need a uint8 buffer of {self.nbytes} bytes, got "
                             f"{buffer.dtype} {buffer.shape}")
        out = {}
        for leaf in self.leaves:
            raw = buffer[leaf.offset:leaf.offset + leaf.nbytes]
            out[leaf.name] = raw.view(leaf.dtype).reshape(leaf.shape)
        return out

    def unpack(self, flat: jax.Array) -> Dict[str, jax.Array]:
        """Typed device arrays of each leaf from the staged uint8 buffer (use inside jit)."""
        out = {}
        for leaf in self.leaves:
            dtype = jnp.dtype(leaf.dtype)
            count = int(np.prod(leaf.shape, dtype=np.int64))
            if count == 0:
                out[leaf.name] = jnp.zeros(leaf.shape, dtype)
                continue
            raw = lax.slice(flat, (leaf.offset,), (leaf.offset + leaf.nbytes,))
            if dtype.itemsize > 1:
                raw = raw.reshape(count, dtype.itemsize)
            out[leaf.name] = lax.bitcast_convert_type(raw, dtype).reshape(leaf.shape)
        return out


def layout_for(bucket: Bucket, feat: FeatureConfig) -> ArenaLayout:
    """The arena layout of ``bucket`` (leaves listed in the module docstring)."""
    d, n = feat.embedding_dim, bucket.candidates
    act = feat.action_dtype
    specs = []
    for fam in FAMILIES:
        size = bucket.family(fam)
        if bucket.layout == "dedup":
            u = bucket.requests
            specs += [(f"{fam}.embeddings", np.int8, (size, d), "sequences"),
                      (f"{fam}.actions", act, (size,), "sequences"),
                      (f"{fam}.surfaces", np.int16, (size,), "sequences"),
                      (f"{fam}.offsets", np.int32, (u,), "sequences"),
                      (f"{fam}.lengths", np.int32, (u,), "sequences")]
        else:
            specs += [(f"{fam}.embeddings", np.int8, (n, size, d), "sequences"),
                      (f"{fam}.actions", act, (n, size), "sequences"),
                      (f"{fam}.surfaces", np.int16, (n, size), "sequences"),
                      (f"{fam}.lengths", np.int32, (n,), "sequences")]
    if bucket.layout == "dedup":
        specs.append(("cand_to_req", np.int32, (n,), "candidates"))
    specs += [("cand_embedding", np.int8, (n, d), "candidates"),
              ("dense", np.float32, (n, feat.num_dense), "candidates"),
              ("categorical", np.int32, (n, len(feat.categorical_vocab_sizes)), "candidates")]
    return ArenaLayout.build(bucket, specs)
