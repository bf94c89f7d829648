"""Requests in shared memory: fixed-size slots that front-end processes fill and the engine reads.

A serving host runs several front-end processes (each validates its clients' requests with its own
interpreter) and one engine process that drives the device (:mod:`.frontend`). Requests cross from a
front end to the engine through a :class:`SlotArray`: one shared, memory-mapped file cut into
``count`` equal slots. A front end writes a *part* (one or a few validated requests, concatenated into
one :class:`~transact_jax.data.schema.RequestBatch`) into a slot it owns, then tells the engine the
slot's number over a socket; the engine reads the part back as numpy views into the slot (no copy),
collates it into its staging arena like any other part, and writes the part's probabilities into
the slot's result area. Only the slot number travels through the socket; the request bytes are
written once, by the front end.

Slot layout (:class:`SlotSpec` fixes the capacities, every array 64-byte aligned): a header of
eight int64 (magic, U requests, N candidates, T_ll, T_rt, T_imp tokens, then two reserved words),
then per family f in (ll, rt, imp) the token fields ``f.timestamps`` (T_f,) int64, ``f.actions``
(T_f,), ``f.surfaces`` (T_f,) int16, ``f.embeddings`` (T_f, D) int8 and ``f.offsets`` (U + 1,)
int64; the request fields ``user_id``, ``request_id``, ``request_timestamp`` (U,) int64; the
candidate fields ``cand_item_id`` (N,) int64, ``cand_embedding`` (N, D) int8, ``cand_to_req`` (N,)
int32, ``dense`` (N, F) float32, ``categorical`` (N, C) int32; and ``result`` (N, H) float32.

Token capacity per family is ``requests x SelectionConfig.max_lengths[f]``: a front end truncates
over-long sequences (most recent tokens kept, the policy of the logged-feature path) before writing,
so a part never needs more. :meth:`SlotArray.write` refuses a part that does not fit, naming the
field; :meth:`SlotArray.read` checks the header (magic, sizes within capacity, offsets and
``cand_to_req`` in range) so a torn or foreign slot is an error, never a garbled batch.

The file lives in ``/dev/shm`` when that has room (RAM-backed), else in the temporary directory
(:func:`shared_dir`). The creator removes it on :meth:`SlotArray.close`; processes that attached
keep their mapping until they close it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import mmap
import os
import tempfile
import uuid
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data.schema import JaggedSequences, RequestBatch, TokenFields

ALIGN = 64
FAMILIES = ("ll", "rt", "imp")
MAGIC = 0x54524A5F534C4F54          # "TRJ_SLOT"
HEADER_WORDS = 8
TOKEN_FIELDS = ("timestamps", "actions", "surfaces", "embeddings")
REQUEST_FIELDS = ("user_id", "request_id", "request_timestamp")
CANDIDATE_FIELDS = ("cand_item_id", "cand_embedding", "cand_to_req", "dense", "categorical")


class SlotError(ValueError):
    """A part does not fit its slot, or a slot's contents are not a valid part: ``field`` names
    what is wrong."""

    def __init__(self, field: str, problem: str):
        self.field = field
        super().__init__(f"{field}: {problem}")


@dataclasses.dataclass(frozen=True)
class SlotSpec:
    """Capacities and widths of one slot (module docstring).

    Attributes:
      requests: most requests in a part (U).
      candidates: most candidates in a part (N).
      tokens: most tokens per family (ll, rt, imp) after truncation.
      embedding_dim, num_dense, num_categorical, num_heads: D, F, C, H of the feature config.
      action_dtype: numpy name of the action bitmask dtype.
    """

    requests: int
    candidates: int
    tokens: Tuple[int, int, int]
    embedding_dim: int
    num_dense: int
    num_categorical: int
    num_heads: int
    action_dtype: str

    def __post_init__(self):
        for name in ("requests", "candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"SlotSpec.{name}: need >= 1, got {getattr(self, name)}")
        if len(self.tokens) != 3 or min(self.tokens) < 0:
            raise ValueError(f"SlotSpec.tokens: need three counts >= 0, got {self.tokens}")

    @classmethod
    def for_config(cls, feat: FeatureConfig, sel: SelectionConfig, requests: int,
                   candidates: int) -> "SlotSpec":
        """Slots for parts of up to ``requests`` requests and ``candidates`` candidates, sequences
        truncated to ``sel.max_lengths``."""
        limits = sel.max_lengths
        return cls(requests, candidates, tuple(requests * int(limits[f]) for f in FAMILIES),
                   feat.embedding_dim, feat.num_dense, len(feat.categorical_vocab_sizes),
                   feat.num_heads, np.dtype(feat.action_dtype).name)

    def fields(self) -> List[Tuple[str, str, Tuple[int, ...], str]]:
        """(name, dtype, capacity shape, size key) of every array after the header, in order; the
        size key says which count a part uses of the leading axis: "T_ll", "U+1", "U", "N"..."""
        d = self.embedding_dim
        out = []
        for fam, cap in zip(FAMILIES, self.tokens):
            key = f"T_{fam}"
            out += [(f"{fam}.timestamps", "int64", (cap,), key),
                    (f"{fam}.actions", self.action_dtype, (cap,), key),
                    (f"{fam}.surfaces", "int16", (cap,), key),
                    (f"{fam}.embeddings", "int8", (cap, d), key),
                    (f"{fam}.offsets", "int64", (self.requests + 1,), "U+1")]
        out += [(name, "int64", (self.requests,), "U") for name in REQUEST_FIELDS]
        n = self.candidates
        out += [("cand_item_id", "int64", (n,), "N"), ("cand_embedding", "int8", (n, d), "N"),
                ("cand_to_req", "int32", (n,), "N"), ("dense", "float32", (n, self.num_dense), "N"),
                ("categorical", "int32", (n, self.num_categorical), "N"),
                ("result", "float32", (n, self.num_heads), "N")]
        return out

    @property
    def offsets(self) -> Dict[str, int]:
        """Byte offset of every array inside a slot."""
        return self._layout[0]

    @property
    def slot_bytes(self) -> int:
        return self._layout[1]

    @functools.cached_property
    def _layout(self) -> Tuple[Dict[str, int], int]:
        offset = _aligned(HEADER_WORDS * 8)
        where = {}
        for name, dtype, shape, _ in self.fields():
            where[name] = offset
            offset += _aligned(math.prod(shape) * np.dtype(dtype).itemsize)
        return where, offset


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def shared_dir(nbytes: int) -> str:
    """``/dev/shm`` when it exists and has ``nbytes`` free (with a 25% margin), else the temporary
    directory (a shared file mapping works the same there, backed by the page cache)."""
    try:
        st = os.statvfs("/dev/shm")
        if st.f_bavail * st.f_frsize >= 1.25 * nbytes:
            return "/dev/shm"
    except OSError:
        pass
    return tempfile.gettempdir()


class SlotArray:
    """``count`` slots of ``spec`` in one shared file (module docstring).

    ``SlotArray.create(spec, count)`` in the engine process; ``SlotArray.attach(path, spec, count)``
    in a front end (the engine tells it ``path``). A slot is only ever written by the one process
    that owns it at the time (the protocol of :mod:`.frontend` hands slots back and forth), so no
    locks are needed here.
    """

    def __init__(self, path: str, spec: SlotSpec, count: int, owner: bool):
        if count < 1:
            raise ValueError(f"count: need >= 1, got {count}")
        self.path, self.spec, self.count, self.owner = path, spec, count, owner
        self.nbytes = spec.slot_bytes * count
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size != self.nbytes:
                raise SlotError("path", f"{path} holds {size} bytes; {count} slots of this spec need "
                                f"{self.nbytes} (engine and front end disagree on the slot spec)")
            self._map = mmap.mmap(fd, self.nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._buffer = np.frombuffer(self._map, np.uint8)
        self._views = [self._slot_views(i) for i in range(count)]

    @classmethod
    def create(cls, spec: SlotSpec, count: int, directory: Optional[str] = None) -> "SlotArray":
        """A new zero-filled shared file for ``count`` slots (removed again by :meth:`close`)."""
        nbytes = spec.slot_bytes * count
        directory = directory or shared_dir(nbytes)
        path = os.path.join(directory, f"transact_jax_slots_{os.getpid()}_{uuid.uuid4().hex[:12]}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, nbytes)
        finally:
            os.close(fd)
        try:
            return cls(path, spec, count, owner=True)
        except BaseException:
            os.unlink(path)
            raise

    @classmethod
    def attach(cls, path: str, spec: SlotSpec, count: int) -> "SlotArray":
        return cls(path, spec, count, owner=False)

    def _slot_views(self, i: int) -> Dict[str, np.ndarray]:
        base = i * self.spec.slot_bytes
        out = {"header": self._buffer[base:base + HEADER_WORDS * 8].view(np.int64)}
        where = self.spec.offsets
        for name, dtype, shape, _ in self.spec.fields():
            start = base + where[name]
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
            out[name] = self._buffer[start:start + nbytes].view(dtype).reshape(shape)
        return out

    def _check_index(self, i: int) -> Dict[str, np.ndarray]:
        if not 0 <= i < self.count:
            raise SlotError("slot", f"index {i} out of range [0, {self.count})")
        return self._views[i]

    # ------------------------------------------------------------------------------ front end
    def write(self, i: int, parts: Sequence[RequestBatch]) -> Tuple[int, int]:
        """Concatenate ``parts`` (valid requests, sequences within ``max_lengths``) into slot ``i``;
        returns (U, N). Raises :class:`SlotError` if they do not fit."""
        v, spec = self._check_index(i), self.spec
        u = sum(p.num_requests for p in parts)
        n = sum(p.num_candidates for p in parts)
        if not parts or n == 0:
            raise SlotError("candidates", "a part needs at least one candidate")
        if u > spec.requests:
            raise SlotError("requests", f"{u} requests exceed the slot's {spec.requests}")
        if n > spec.candidates:
            raise SlotError("candidates", f"{n} candidates exceed the slot's {spec.candidates}")
        sizes = []
        for fam, cap in zip(FAMILIES, spec.tokens):
            seqs = [getattr(p, fam) for p in parts]
            t = sum(int(s.offsets[-1]) for s in seqs)
            if t > cap:
                raise SlotError(f"{fam}.tokens", f"{t} tokens exceed the slot's {cap} (truncate "
                                f"sequences to SelectionConfig.max_lengths first)")
            sizes.append(t)
            for field in TOKEN_FIELDS:
                np.concatenate([getattr(s.tokens, field)[:int(s.offsets[-1])] for s in seqs],
                               axis=0, out=v[f"{fam}.{field}"][:t])
            offsets = v[f"{fam}.offsets"]
            offsets[0] = 0
            np.cumsum(np.concatenate([np.diff(s.offsets) for s in seqs]), out=offsets[1:u + 1])
        for name in REQUEST_FIELDS:
            np.concatenate([getattr(p, name) for p in parts], out=v[name][:u])
        for name in CANDIDATE_FIELDS:
            if name == "cand_to_req":
                continue
            np.concatenate([getattr(p, name) for p in parts], axis=0, out=v[name][:n])
        shift = np.repeat(np.cumsum([0] + [p.num_requests for p in parts[:-1]]),
                          [p.num_candidates for p in parts])
        np.add(np.concatenate([p.cand_to_req for p in parts]), shift, out=v["cand_to_req"][:n],
               casting="unsafe")
        v["header"][:6] = (MAGIC, u, n, *sizes)
        return u, n

    def read_result(self, i: int, n: int) -> np.ndarray:
        """A copy of the (n, H) probabilities the engine wrote into slot ``i``."""
        return self._check_index(i)["result"][:n].copy()

    # --------------------------------------------------------------------------------- engine
    def read(self, i: int) -> RequestBatch:
        """Slot ``i``'s part as a :class:`RequestBatch` of views into the slot (valid until the slot
        is handed back). Raises :class:`SlotError` if the header or structure is not a valid part."""
        v, spec = self._check_index(i), self.spec
        magic, u, n, *t = (int(x) for x in v["header"][:6])
        if magic != MAGIC:
            raise SlotError("header", f"slot {i} holds no part (magic {magic:#x})")
        if not (1 <= u <= spec.requests and 1 <= n <= spec.candidates):
            raise SlotError("header", f"slot {i}: {u} requests, {n} candidates out of capacity")
        seqs = {}
        for fam, size, cap in zip(FAMILIES, t, spec.tokens):
            offsets = v[f"{fam}.offsets"][:u + 1]
            if not 0 <= size <= cap or offsets[0] != 0 or offsets[-1] != size or (
                    u and np.any(offsets[1:] < offsets[:-1])):
                raise SlotError(f"{fam}.offsets", f"slot {i}: offsets do not describe {size} tokens")
            seqs[fam] = JaggedSequences(
                TokenFields(*(v[f"{fam}.{field}"][:size] for field in TOKEN_FIELDS)), offsets)
        c2r = v["cand_to_req"][:n]
        if c2r.min() < 0 or c2r.max() >= u:
            raise SlotError("cand_to_req", f"slot {i}: values outside [0, {u})")
        return RequestBatch(**seqs, **{name: v[name][:u] for name in REQUEST_FIELDS},
                            **{name: v[name][:n] for name in CANDIDATE_FIELDS})

    def write_result(self, i: int, probs: np.ndarray) -> None:
        """Store a part's (N, H) probabilities in slot ``i``."""
        out = self._check_index(i)["result"]
        if probs.ndim != 2 or probs.shape[0] > out.shape[0] or probs.shape[1] != out.shape[1]:
            raise SlotError("result", f"shape {probs.shape} does not fit {out.shape}")
        out[:probs.shape[0]] = probs

    # ------------------------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Drop the mapping (and, in the creator, remove the file). Views handed out earlier must
        not be used afterwards."""
        self._views = []
        self._buffer = None
        try:
            self._map.close()
        except BufferError:    # a caller still holds a view: the mapping goes with the last one
            pass
        if self.owner:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
