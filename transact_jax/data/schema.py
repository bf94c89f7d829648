"""Typed containers for sequence tokens, training examples and serving requests.

All containers are frozen dataclasses of numpy arrays (host side). They are registered as JAX pytrees,
so a batch can be passed to a jitted function as it is (after ``jax.device_put``).

Containers:

* :class:`TokenFields` - the four per-token features of a sequence token: timestamp (int64 seconds),
  action multi-hot (an A-bit bitmask, bit a = ``FeatureConfig.action_names[a]``), surface id, and the
  int8 item embedding (``D = 32`` codes, see ``pallas_kernels.int8_codec``). Shape-agnostic: (*shape)
  for the scalars and (*shape, D) for the embedding.
* :class:`SequenceBatch` - dense, left-aligned sequences (U, L) with ``lengths``; ``tokens[u, :len]``
  are valid, the rest is padding.
* :class:`JaggedSequences` - the same sequences without padding: flat tokens (T,) and ``offsets``
  (U + 1,), request u owns ``tokens[offsets[u]:offsets[u+1]]``.
* :class:`TrainingExample` fields are documented on :class:`TrainingExamples`, the batched form.
* :class:`RequestBatch` - the de-duplicated serving layout of paper §3.4.2 / Figure 5.

Every container has ``validate(...)`` that raises :class:`SchemaError` naming the offending field.
The per-field rules live in one place, :mod:`transact_jax.data.request_rules` (the validators here
apply them); docs/design.md, "Sequences and tokens" and "Bad input and errors", has the background.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterator, Mapping, Optional, Tuple

import jax
import numpy as np

from transact_jax.config import FeatureConfig, SelectionConfig


class SchemaError(ValueError):
    """Bad input: ``field`` names the offending field, the message says what is wrong."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


# ----------------------------------------------------------------------------------------- checks

def check_array(name: str, x, dtype=None, shape: Optional[Tuple[Optional[int], ...]] = None,
                kind: Optional[str] = None) -> np.ndarray:
    """Check type, dtype and shape of ``x``; ``None`` in ``shape`` matches any size."""
    if not isinstance(x, np.ndarray):
        raise SchemaError(name, f"expected a numpy array, got {type(x).__name__}")
    if dtype is not None and x.dtype != np.dtype(dtype):
        raise SchemaError(name, f"expected dtype {np.dtype(dtype)}, got {x.dtype}")
    if kind is not None and x.dtype.kind not in kind:
        raise SchemaError(name, f"expected dtype kind {kind!r}, got {x.dtype}")
    if shape is not None:
        if x.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
            dims = ["?" if s is None else str(s) for s in shape]
            want = f"({', '.join(dims)}{',' if len(dims) == 1 else ''})"
            raise SchemaError(name, f"expected shape {want}, got {x.shape}")
    return x


def check_finite(name: str, x: np.ndarray) -> None:
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        bad = np.argwhere(~np.isfinite(x))[0]
        raise SchemaError(name, f"contains NaN/inf (first at index {tuple(int(i) for i in bad)})")


def check_range(name: str, x: np.ndarray, low: int, high: int) -> None:
    """Values must lie in ``[low, high)``."""
    if x.size and (x.min() < low or x.max() >= high):
        bad = x[(x < low) | (x >= high)][0]
        raise SchemaError(name, f"value {bad} out of range [{low}, {high})")


def _register(cls):
    """Register a frozen dataclass of arrays as a JAX pytree (all fields are data)."""
    names = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=names, meta_fields=[])


# ----------------------------------------------------------------------------------------- tokens

@_register
@dataclasses.dataclass(frozen=True)
class TokenFields:
    """Per-token features; see the module docstring. Leading shape is free, e.g. (L,), (U, L)."""

    timestamps: np.ndarray  # (*shape) int64, seconds
    actions: np.ndarray     # (*shape) unsigned bitmask, FeatureConfig.action_dtype
    surfaces: np.ndarray    # (*shape) int16 surface id
    embeddings: np.ndarray  # (*shape, D) int8 codes

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.timestamps.shape)

    @classmethod
    def empty(cls, shape: Tuple[int, ...], cfg: FeatureConfig) -> "TokenFields":
        """All-padding tokens (zeros) of the given shape."""
        return cls(np.zeros(shape, np.int64), np.zeros(shape, cfg.action_dtype),
                   np.zeros(shape, np.int16), np.zeros(shape + (cfg.embedding_dim,), np.int8))

    def map(self, fn) -> "TokenFields":
        """Apply ``fn`` (an indexing op on the leading axes) to every field."""
        return TokenFields(fn(self.timestamps), fn(self.actions), fn(self.surfaces),
                           fn(self.embeddings))

    def take(self, index: np.ndarray, axis: int) -> "TokenFields":
        """Gather along token axis ``axis`` (of the scalar fields) with ``np.take_along_axis``."""
        ax = axis % self.timestamps.ndim
        return TokenFields(
            np.take_along_axis(self.timestamps, index, ax),
            np.take_along_axis(self.actions, index, ax),
            np.take_along_axis(self.surfaces, index, ax),
            np.take_along_axis(self.embeddings, index[..., None], ax),
        )

    def columns(self, prefix: str) -> Dict[str, np.ndarray]:
        return {f"{prefix}.{f.name}": getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_columns(cls, cols: Mapping[str, np.ndarray], prefix: str) -> "TokenFields":
        return cls(**{f.name: cols[f"{prefix}.{f.name}"] for f in dataclasses.fields(cls)})

    def validate(self, cfg: FeatureConfig, name: str, shape: Optional[Tuple] = None) -> None:
        """Dtypes and shapes (leading ``shape``, default: the timestamps' shape) and the token rules
        of :mod:`~transact_jax.data.request_rules` (action bits, surface ids, no int8 code -128)."""
        from transact_jax.data import request_rules as rules  # the rule book imports this module
        if shape is None:
            shape = check_array(f"{name}.timestamps", self.timestamps).shape
        rules.check_token_arrays(self, cfg, name, shape)
        rules.raise_first(rules.token_breaches(name, self, cfg))


@_register
@dataclasses.dataclass(frozen=True)
class SequenceBatch:
    """Dense, left-aligned sequences: ``tokens`` (U, L), ``lengths`` (U,) int32."""

    tokens: TokenFields
    lengths: np.ndarray

    @property
    def max_len(self) -> int:
        return self.tokens.shape[1]

    @property
    def valid(self) -> np.ndarray:
        """(U, L) bool mask of valid positions."""
        return np.arange(self.max_len)[None, :] < self.lengths[:, None]

    def validate(self, cfg: FeatureConfig, name: str, max_len: Optional[int] = None) -> None:
        if self.tokens.timestamps.ndim != 2:
            raise SchemaError(f"{name}.tokens", f"expected (U, L) tokens, got {self.tokens.shape}")
        u, length = self.tokens.shape
        self.tokens.validate(cfg, f"{name}.tokens")
        check_array(f"{name}.lengths", self.lengths, np.int32, (u,))
        check_range(f"{name}.lengths", self.lengths, 0, length + 1)
        if max_len is not None and length > max_len:
            raise SchemaError(name, f"sequence length {length} exceeds the configured maximum "
                              f"{max_len}; use truncate_recent() to keep the most recent tokens")


@_register
@dataclasses.dataclass(frozen=True)
class JaggedSequences:
    """Sequences without padding: ``tokens`` (T,) flat, ``offsets`` (U + 1,) int64, ``offsets[0] = 0``."""

    tokens: TokenFields
    offsets: np.ndarray

    @property
    def num_sequences(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets).astype(np.int32)

    def sequence(self, u: int) -> TokenFields:
        """Tokens of sequence ``u`` (a view, no copy)."""
        lo, hi = int(self.offsets[u]), int(self.offsets[u + 1])
        return self.tokens.map(lambda a: a[lo:hi])

    def to_padded(self, max_len: Optional[int] = None) -> SequenceBatch:
        """Dense (U, max_len) layout; ``max_len`` defaults to the longest sequence.

        Sequences longer than ``max_len`` keep their most recent ``max_len`` tokens.
        """
        lengths = self.lengths
        if max_len is None:
            max_len = int(lengths.max()) if len(lengths) else 0
        kept = np.minimum(lengths, max_len).astype(np.int32)
        u = self.num_sequences
        # source index of padded slot (u, j): offsets[u+1] - kept[u] + j, valid where j < kept[u]
        j = np.arange(max_len)[None, :]
        src = self.offsets[1:, None] - kept[:, None] + j
        valid = j < kept[:, None]
        src = np.where(valid, src, 0)

        def gather(a):
            out = a[src] if a.shape[0] else np.zeros((u, max_len) + a.shape[1:], a.dtype)
            out[~valid] = 0
            return out

        return SequenceBatch(self.tokens.map(gather), kept)

    @classmethod
    def from_padded(cls, seqs: SequenceBatch) -> "JaggedSequences":
        valid = seqs.valid
        offsets = np.zeros(len(seqs.lengths) + 1, np.int64)
        np.cumsum(seqs.lengths, out=offsets[1:])
        return cls(seqs.tokens.map(lambda a: a[valid]), offsets)

    @classmethod
    def concatenate(cls, parts) -> "JaggedSequences":
        parts = list(parts)
        tokens = TokenFields(*(np.concatenate([getattr(p.tokens, f.name) for p in parts])
                               for f in dataclasses.fields(TokenFields)))
        lengths = np.concatenate([p.lengths for p in parts])
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(tokens, offsets)

    def select(self, rows: np.ndarray) -> "JaggedSequences":
        """Sequences ``rows`` (in that order) as a new jagged batch."""
        return JaggedSequences.concatenate(
            [JaggedSequences(self.sequence(int(u)), np.array([0, self.lengths[u]], np.int64))
             for u in rows]) if len(rows) else JaggedSequences(
                 self.tokens.map(lambda a: a[:0]), np.zeros(1, np.int64))

    def validate(self, cfg: FeatureConfig, name: str, max_len: Optional[int] = None) -> None:
        """Structure (offsets, flat tokens), the token rules and, with ``max_len``, the length rule of
        :mod:`~transact_jax.data.request_rules`. Empty sequences are valid."""
        from transact_jax.data import request_rules as rules  # the rule book imports this module
        rules.check_jagged(self, cfg, name)
        rules.raise_first(rules.token_breaches(f"{name}.tokens", self.tokens, cfg))
        if max_len is not None:
            rules.raise_first([rules.length_breach(name, self.lengths, max_len)])

    def truncate_recent(self, max_len: int) -> "JaggedSequences":
        """Keep the ``max_len`` most recent tokens of each sequence (the truncation policy for
        over-long sequences; docs/design.md, "Truncation and over-long sequences")."""
        if len(self.offsets) < 2 or self.lengths.max() <= max_len:
            return self
        return JaggedSequences.from_padded(self.to_padded(max_len))


# ----------------------------------------------------------------------------- training examples

@_register
@dataclasses.dataclass(frozen=True)
class TrainingExamples:
    """A batch of N logged training examples (one per (request, candidate) pair).

    Attributes:
      s_all: (N, |S_all|) tokens of S_all, the NN-selected sequence (paper §3.2.2), in the fixed
        slots of ``SelectionConfig.segments`` (docs/design.md, "S_all slots and ordering").
      s_all_mask: (N, |S_all|) bool, True for real tokens.
      candidate_embedding: (N, D) int8 codes of the candidate item's embedding (e_c).
      item_id, user_id, request_id: (N,) int64; ``request_id`` identifies the ranking request, i.e.
        the (user, chunk) group of HIT@K (paper §4.2.1).
      request_timestamp: (N,) int64 seconds when the request was served.
      dense: (N, num_dense) float32 user/item/context features.
      categorical: (N, C) int32 ids, column c in ``[0, categorical_vocab_sizes[c])``.
      labels: (N, H) uint8 in {0, 1}, one per head (FeatureConfig.heads).
      nal_target_mask: (N, r) bool: position t of the S_RT[:r] segment is a Next Action Loss target,
        i.e. tokens t and t+1 are valid and token t+1 is a positive engagement. The positive
        embedding p(t+1) is the S_all embedding at the next slot.
      nal_negatives: (N, M) int8 embeddings (N, M, D) of the user's M most recent impressions
        (chronological, padding last): the NAL_imp negatives.
      nal_negative_mask: (N, M) bool, True for real negatives.
    """

    s_all: TokenFields
    s_all_mask: np.ndarray
    candidate_embedding: np.ndarray
    item_id: np.ndarray
    user_id: np.ndarray
    request_id: np.ndarray
    request_timestamp: np.ndarray
    dense: np.ndarray
    categorical: np.ndarray
    labels: np.ndarray
    nal_target_mask: np.ndarray
    nal_negatives: np.ndarray
    nal_negative_mask: np.ndarray

    def __len__(self) -> int:
        return int(self.item_id.shape[0])

    def columns(self) -> Dict[str, np.ndarray]:
        """Flat ``{name: array}`` view; every array has the example axis first."""
        cols = self.s_all.columns("s_all")
        for f in dataclasses.fields(self):
            if f.name != "s_all":
                cols[f.name] = getattr(self, f.name)
        return cols

    @classmethod
    def from_columns(cls, cols: Mapping[str, np.ndarray]) -> "TrainingExamples":
        kwargs = {f.name: cols[f.name] for f in dataclasses.fields(cls) if f.name != "s_all"}
        return cls(s_all=TokenFields.from_columns(cols, "s_all"), **kwargs)

    @staticmethod
    def column_specs(feat: FeatureConfig, sel: SelectionConfig) -> Dict[str, Tuple[np.dtype, Tuple[int, ...]]]:
        """``{column: (dtype, per-example shape)}`` of a valid batch under these configs."""
        s, d = sel.s_all_len, feat.embedding_dim
        return {
            "s_all.timestamps": (np.dtype(np.int64), (s,)),
            "s_all.actions": (feat.action_dtype, (s,)),
            "s_all.surfaces": (np.dtype(np.int16), (s,)),
            "s_all.embeddings": (np.dtype(np.int8), (s, d)),
            "s_all_mask": (np.dtype(bool), (s,)),
            "candidate_embedding": (np.dtype(np.int8), (d,)),
            "item_id": (np.dtype(np.int64), ()),
            "user_id": (np.dtype(np.int64), ()),
            "request_id": (np.dtype(np.int64), ()),
            "request_timestamp": (np.dtype(np.int64), ()),
            "dense": (np.dtype(np.float32), (feat.num_dense,)),
            "categorical": (np.dtype(np.int32), (len(feat.categorical_vocab_sizes),)),
            "labels": (np.dtype(np.uint8), (feat.num_heads,)),
            "nal_target_mask": (np.dtype(bool), (sel.r,)),
            "nal_negatives": (np.dtype(np.int8), (sel.num_nal_negatives, d)),
            "nal_negative_mask": (np.dtype(bool), (sel.num_nal_negatives,)),
        }

    def select(self, rows) -> "TrainingExamples":
        return jax.tree_util.tree_map(lambda a: a[rows], self)

    @classmethod
    def concatenate(cls, parts) -> "TrainingExamples":
        return jax.tree_util.tree_map(lambda *a: np.concatenate(a), *parts)

    def validate(self, feat: FeatureConfig, sel: SelectionConfig) -> None:
        """Dtypes and shapes of every column, the token and candidate rules of
        :mod:`~transact_jax.data.request_rules`, and the padding rules of S_all and the negatives."""
        from transact_jax.data import request_rules as rules  # the rule book imports this module
        cols = self.columns()
        n = len(self)
        for name, (dtype, shape) in self.column_specs(feat, sel).items():
            check_array(name, cols[name], dtype, (n,) + shape)
        rules.raise_first(rules.token_breaches("s_all", self.s_all, feat))
        rules.raise_first(rules.candidate_breaches(feat, ("candidate_embedding", self.candidate_embedding),
                                                   self.dense, self.categorical, self.labels))
        rules.check_codes("nal_negatives", self.nal_negatives, "negative")
        # Padding slots carry no token: a masked-off slot must be all zeros (every token field).
        pad = ~self.s_all_mask
        if any(np.any(a[pad]) for a in jax.tree_util.tree_leaves(self.s_all)):
            raise SchemaError("s_all", "padding slots (s_all_mask == False) must hold zeros")
        if np.any(self.nal_negatives[~self.nal_negative_mask]):
            raise SchemaError("nal_negatives", "padding slots (nal_negative_mask == False) must hold zeros")
        rt = sel.segment("rt_recent")
        tm = self.nal_target_mask
        if np.any(tm & ~self.s_all_mask[:, rt]):
            raise SchemaError("nal_target_mask", "marks a position whose S_RT[:r] slot is padding")


# -------------------------------------------------------------------------------------- requests

@_register
@dataclasses.dataclass(frozen=True)
class RequestBatch:
    """De-duplicated ranking requests (paper §3.4.2, Figure 5).

    Request-level features (the user's full S_LL, S_RT, S_imp) are stored once per request as jagged
    sequences; candidate-level features once per candidate, with ``cand_to_req`` mapping each
    candidate to its request. :func:`broadcast` gives the per-candidate layout of a naive server.

    Attributes:
      ll, rt, imp: (U requests) jagged S_LL, S_RT, S_imp, chronological (token timestamps never
        decrease within a request's sequence; index 0 the oldest).
      user_id, request_id, request_timestamp: (U,) int64.
      cand_item_id: (N,) int64; cand_embedding: (N, D) int8 codes; cand_to_req: (N,) int32 in [0, U).
      dense: (N, num_dense) float32, finite and within ``request_rules.DENSE_BOUND``;
      categorical: (N, C) int32.
      labels: (N, H) uint8 for logged requests (training data), or None when serving.

    Every field's rules are in :mod:`transact_jax.data.request_rules`. Empty sequences are valid;
    sequences longer than ``SelectionConfig.max_lengths`` are not (:meth:`truncate_recent` keeps their
    most recent tokens).
    """

    ll: JaggedSequences
    rt: JaggedSequences
    imp: JaggedSequences
    user_id: np.ndarray
    request_id: np.ndarray
    request_timestamp: np.ndarray
    cand_item_id: np.ndarray
    cand_embedding: np.ndarray
    cand_to_req: np.ndarray
    dense: np.ndarray
    categorical: np.ndarray
    labels: Optional[np.ndarray] = None

    @property
    def num_requests(self) -> int:
        return int(self.user_id.shape[0])

    @property
    def num_candidates(self) -> int:
        return int(self.cand_item_id.shape[0])

    def sequences(self) -> Iterator[Tuple[str, JaggedSequences]]:
        yield "ll", self.ll
        yield "rt", self.rt
        yield "imp", self.imp

    def validate(self, feat: FeatureConfig, sel: SelectionConfig) -> None:
        """Apply every rule of :mod:`~transact_jax.data.request_rules` (sequence lengths and labels
        included); raise :class:`SchemaError` naming the field of the first problem."""
        from transact_jax.data import request_rules as rules  # the rule book imports this module
        rules.validate_requests(self, feat, sel)

    def truncate_recent(self, sel: SelectionConfig) -> "RequestBatch":
        """Cut sequences longer than ``sel.max_lengths`` to their most recent tokens."""
        limits = sel.max_lengths
        return dataclasses.replace(self, **{name: seqs.truncate_recent(limits[name])
                                            for name, seqs in self.sequences()})

    def sequence_nbytes(self) -> int:
        """Bytes of the request-level sequence features in this (de-duplicated) layout."""
        return sum(sum(a.nbytes for a in jax.tree_util.tree_leaves(s)) for _, s in self.sequences())


@_register
@dataclasses.dataclass(frozen=True)
class BroadcastBatch:
    """Per-candidate layout: each candidate carries a full copy of its request's sequences.

    This is what a naive server ships to the device (paper §3.4.2 before de-duplication); it exists for
    baselines, tests and byte accounting. ``ll``/``rt``/``imp`` are (N, L) dense sequences.
    """

    ll: SequenceBatch
    rt: SequenceBatch
    imp: SequenceBatch
    cand_item_id: np.ndarray
    cand_embedding: np.ndarray
    dense: np.ndarray
    categorical: np.ndarray

    def sequence_nbytes(self) -> int:
        return sum(a.nbytes for s in (self.ll, self.rt, self.imp) for a in jax.tree_util.tree_leaves(s))


def broadcast(requests: RequestBatch, max_lens: Optional[Tuple[int, int, int]] = None) -> BroadcastBatch:
    """Expand a de-duplicated :class:`RequestBatch` into the per-candidate :class:`BroadcastBatch`.

    ``max_lens`` = (L_LL, L_RT, L_imp) of the dense layout; defaults to the longest sequence of each.
    """
    max_lens = max_lens or (None, None, None)
    dense = [s.to_padded(m) for (_, s), m in zip(requests.sequences(), max_lens)]
    rows = requests.cand_to_req
    expanded = [SequenceBatch(d.tokens.map(lambda a: a[rows]), d.lengths[rows]) for d in dense]
    return BroadcastBatch(*expanded, cand_item_id=requests.cand_item_id,
                          cand_embedding=requests.cand_embedding, dense=requests.dense,
                          categorical=requests.categorical)
