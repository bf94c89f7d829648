"""Bring-your-own-logs: an event-log format and a builder to requests and training examples (SPEC §5).

An event log is three tables. Each can be given as a CSV file with a header row (``*.csv``), a numpy
archive (``*.npz``, one array per column, read with ``allow_pickle=False``) or an in-memory
``{column: array}`` mapping. Column order does not matter; columns not listed here are ignored.

**(a) events** - one row per user action or impression:

=============  =========  ==============================================================================
column         type       meaning
=============  =========  ==============================================================================
``user_id``    int64      user, ``>= 0``
``item_id``    int64      item, ``>= 0``; must be in the item table (see ``on_missing_item``)
``action``     string     one of ``FeatureConfig.action_names`` (default ``click, repin, closeup,
                          long_click, share, comment, download, hide``), or ``impression`` for an item
                          shown to the user but not engaged with
``surface``    string     one of ``FeatureConfig.surface_names`` (default ``homefeed, search, related,
                          board, profile, notification, shopping, other``)
``timestamp``  int64      seconds (any epoch; only order and differences matter)
=============  =========  ==============================================================================

**(b) items** - the item content ("PinSage") embeddings, float, quantized to int8 by the builder with
``q = clamp(round(e / 0.65 * 127), -127, 127)`` (:func:`transact_jax.data.quantization.quantize`):

* ``item_id`` (int64, ``>= 0``, unique), and
* the ``(M, D)`` float matrix (``D = FeatureConfig.embedding_dim = 32``) either as one 2-D array
  ``embedding`` (npz / mapping) or as ``D`` columns ``emb_0 .. emb_{D-1}`` (CSV, or npz / mapping).

**(c) requests** - one row per (ranking request, candidate):

* ``request_id``, ``user_id``, ``timestamp`` (int64; all rows of one request must agree on user and
  time), ``item_id`` (int64, the candidate; must be in the item table);
* one 0/1 label column per head, named like the head (``FeatureConfig.heads``, default ``click``,
  ``repin``, ``hide``). Give all of them (training data) or none (serving requests, ``labels=None``);
* optional ``dense_0 .. dense_{num_dense-1}`` (float) and ``cat_0 .. cat_{C-1}`` (int in
  ``[0, categorical_vocab_sizes[c])``); a missing one is 0. ``dense_k`` / ``cat_k`` beyond the config
  are an error (probably a config mismatch), other unknown columns are ignored.

Every table needs at least one row. Bad input raises :class:`~transact_jax.data.schema.SchemaError`
whose ``field`` names ``<table>.<column>`` (e.g. ``events.action``, ``items.embedding``,
``requests.click``) or the table for an unreadable file: unknown action/surface names, non-integer or
negative ids, non-integer timestamps, NaN/inf embeddings or dense features, duplicate item ids, labels
other than 0/1, missing, empty or ragged columns, truncated CSV rows, corrupt npz archives.

**Semantics of the builder** (:func:`build_requests`, :func:`build_training_examples`). For a request of
user ``u`` at time ``T``:

1. *No leakage*: only events of ``u`` with ``timestamp < T`` are used.
2. *Multi-hot merging* (paper §3.2.1): explicit (non-impression) events of one (user, item) merge into
   one token when they fall within ``merge_window_s`` of the token's first event: the first event opens
   a token at time ``t0``; every later event of the pair with ``t < t0 + merge_window_s`` joins it, the
   next one opens a new token. The token's action bitmask ORs its events' actions (only those before
   ``T``), its timestamp and surface are the first event's. ``merge_window_s = 0`` disables merging.
3. *Explicit tokens* before ``T`` in chronological order (ties: by item id, then row order): ``S_RT`` is the
   ``SelectionConfig.max_rt_len`` most recent, ``S_LL`` the ``max_ll_len`` most recent of the ones
   before those (older tokens are dropped, SPEC §9).
4. *Impressions*: ``S_imp`` is the ``max_imp_len`` most recent impression events before ``T`` whose item
   ``u`` did not engage with explicitly (any action, hide included) before ``T``. Impressions are not
   merged (an item shown twice gives two tokens, ties ordered like explicit tokens); their action
   bitmask is 0. A user without events gets empty (fully masked) sequences.
5. All sequences are chronological, index 0 the oldest. Token embeddings and candidate embeddings are
   the quantized item embeddings.
6. Requests appear in order of the first row of each ``request_id``; the candidates of a request keep
   their row order, so ``RequestBatch`` candidate ``i`` (and ``TrainingExamples`` row ``i``) is the
   ``i``-th row of the requests table after a stable sort by request.
7. ``on_missing_item``: an event or candidate whose item is not in the item table raises (``"raise"``,
   the default) or is dropped (``"drop"``; a request left without candidates disappears).

The builder is vectorized numpy: events are sorted once by (user, time) and each request finds its
sequences with ``searchsorted``; tens of thousands of events take well under a second.

Example::

    log = EventLog.load("events.csv", "items.npz", "requests.csv")
    batch = build_requests(log, FeatureConfig(), SelectionConfig())          # serving layout
    examples = build_training_examples(log, FeatureConfig(), SelectionConfig())
    write_event_log_npz(log, "my_log/")                                      # round-trip
    log2 = EventLog.load_dir("my_log/")
"""
from __future__ import annotations

import csv
import dataclasses
import os
import re
import zipfile
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import numpy as np

from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data.features import log_nn_features
from transact_jax.data.quantization import quantize
from transact_jax.data.schema import (
    JaggedSequences,
    RequestBatch,
    SchemaError,
    TokenFields,
    TrainingExamples,
    check_finite,
)

IMPRESSION = "impression"
"""Action name of an impression (item shown, not engaged)."""
IMPRESSION_CODE = -1
"""``EventTable.action`` code of an impression."""
TABLES = ("events", "items", "requests")

TableSource = Union[str, os.PathLike, Mapping[str, np.ndarray]]
"""A table: a ``.csv`` / ``.npz`` path or a ``{column: array}`` mapping."""

_INT64_MAX = np.iinfo(np.int64).max


@dataclasses.dataclass(frozen=True)
class EventLogConfig:
    """How the builder turns events into tokens.

    Attributes:
      merge_window_s: explicit events of one (user, item) within this many seconds of a token's first
        event merge into that token (multi-hot actions); 0 disables merging.
      on_missing_item: ``"raise"`` (default) or ``"drop"`` events / candidates whose item has no
        embedding.
    """

    merge_window_s: int = 3600
    on_missing_item: str = "raise"

    def __post_init__(self):
        if not isinstance(self.merge_window_s, (int, np.integer)) or self.merge_window_s < 0:
            raise SchemaError("merge_window_s", f"must be a non-negative int, got {self.merge_window_s!r}")
        if self.on_missing_item not in ("raise", "drop"):
            raise SchemaError("on_missing_item", f"must be 'raise' or 'drop', got {self.on_missing_item!r}")


# ------------------------------------------------------------------------------------ reading files

def _read_csv(path: Path, table: str) -> Dict[str, np.ndarray]:
    """Columns of a CSV file with a header row, as string arrays."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [row for row in csv.reader(f) if row]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SchemaError(table, f"cannot read {path}: {e}") from e
    if not rows:
        raise SchemaError(table, f"{path} is empty (no header row)")
    header = [h.strip() for h in rows[0]]
    for j, h in enumerate(header):
        if not h or h in header[:j]:
            raise SchemaError(f"{table}.{h}", f"{path}: empty or duplicate column name in the header")
    body = rows[1:]
    for i, row in enumerate(body):
        if len(row) != len(header):
            raise SchemaError(table, f"{path} data row {i}: {len(row)} fields, the header has "
                              f"{len(header)} (truncated or corrupt file?)")
    grid = np.array(body, dtype=str).reshape(len(body), len(header))
    return {h: grid[:, j] for j, h in enumerate(header)}


def _read_npz(path: Path, table: str) -> Dict[str, np.ndarray]:
    """Arrays of an ``.npz`` archive (no pickles)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise SchemaError(table, f"{path} is not an .npz archive")
            return {k: archive[k] for k in archive.files}
    except SchemaError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, AttributeError) as e:
        raise SchemaError(table, f"cannot read {path}: {e}") from e


def read_table(source: TableSource, table: str) -> Dict[str, np.ndarray]:
    """Raw columns of one table from a ``.csv`` / ``.npz`` path or a mapping (no validation yet)."""
    if isinstance(source, Mapping):
        return {str(k): np.asarray(v) for k, v in source.items()}
    if not isinstance(source, (str, os.PathLike)):
        raise SchemaError(table, f"expected a path or a mapping of columns, got {type(source).__name__}")
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path, table)
    if suffix == ".npz":
        return _read_npz(path, table)
    raise SchemaError(table, f"{path}: unsupported file type {suffix!r} (use .csv or .npz)")


# ----------------------------------------------------------------------------- column conversion

def _column(cols: Mapping[str, np.ndarray], table: str, name: str, n: Optional[int]) -> np.ndarray:
    """A required 1-D, non-empty column of ``n`` rows (any length when ``n`` is None)."""
    field = f"{table}.{name}"
    if name not in cols:
        raise SchemaError(field, f"missing column (have {sorted(cols)})")
    a = np.asarray(cols[name])
    if a.ndim != 1:
        raise SchemaError(field, f"expected a 1-D column, got shape {a.shape}")
    if a.size == 0:
        raise SchemaError(field, "column is empty (the table needs at least one row)")
    if n is not None and len(a) != n:
        raise SchemaError(field, f"has {len(a)} rows, other columns have {n}")
    return a


def _parse_int64(x: str) -> int:
    """``int(x)`` for a decimal integer string within int64; ValueError/OverflowError otherwise."""
    value = int(x)
    if not -_INT64_MAX - 1 <= value <= _INT64_MAX:
        raise OverflowError(x)
    return value


def _first_bad(strings: np.ndarray, parse) -> Tuple[int, str]:
    """Row and value of the first string that ``parse`` rejects."""
    for i, s in enumerate(strings):
        try:
            parse(s)
        except (ValueError, OverflowError):
            return i, s
    return -1, ""


def _to_int64(a: np.ndarray, field: str, non_negative: bool = False) -> np.ndarray:
    """Integers (int dtype or decimal strings) as int64; floats are rejected, not rounded."""
    if a.dtype.kind in "USO":
        s = np.char.strip(a.astype(str))
        try:
            out = s.astype(np.int64)
        except (ValueError, OverflowError):
            row, bad = _first_bad(s, _parse_int64)
            raise SchemaError(field, f"row {row}: {bad!r} is not an int64 integer") from None
    elif a.dtype.kind in "iu":
        if a.dtype == np.uint64 and a.size and a.max() > _INT64_MAX:
            raise SchemaError(field, f"value {a.max()} out of int64 range")
        out = a.astype(np.int64)
    else:
        raise SchemaError(field, f"expected integers, got dtype {a.dtype}")
    if non_negative and out.size and out.min() < 0:
        row = int(np.argmax(out < 0))
        raise SchemaError(field, f"row {row}: negative id {out[row]}")
    return out


def _to_float32(a: np.ndarray, field: str) -> np.ndarray:
    """Finite floats (float/int dtype or decimal strings) as float32."""
    if a.dtype.kind in "USO":
        s = np.char.strip(a.astype(str))
        try:
            a = s.astype(np.float64)
        except ValueError:
            row, bad = _first_bad(s, float)
            raise SchemaError(field, f"row {row}: {bad!r} is not a number") from None
    elif a.dtype.kind not in "fiub":
        raise SchemaError(field, f"expected numbers, got dtype {a.dtype}")
    check_finite(field, a.astype(np.float64))
    with np.errstate(over="ignore"):
        out = a.astype(np.float32)
    check_finite(field, out)
    return out


def _to_codes(a: np.ndarray, field: str, vocab: Mapping[str, int]) -> np.ndarray:
    """Names (strings) to integer codes through ``vocab``; unknown names are rejected."""
    if a.dtype.kind not in "USO":
        raise SchemaError(field, f"expected names (strings), got dtype {a.dtype}")
    s = np.char.strip(a.astype(str))
    names, inverse = np.unique(s, return_inverse=True)
    for name in names:
        if name not in vocab:
            row = int(np.argmax(s == name))
            raise SchemaError(field, f"row {row}: unknown name {name!r}; expected one of {sorted(vocab)}")
    return np.array([vocab[n] for n in names], np.int64)[inverse.reshape(-1)]


def _to_labels(a: np.ndarray, field: str) -> np.ndarray:
    """0/1 labels (ints, bools or strings) as uint8."""
    if a.dtype.kind == "f":  # 0.0 / 1.0 floats are fine, anything else is reported below
        check_finite(field, a)
        v = np.where(a == np.round(a), a, -1).astype(np.int64)
    else:
        v = a.astype(np.int64) if a.dtype.kind == "b" else _to_int64(a, field)
    if v.size and ((v < 0) | (v > 1)).any():
        row = int(np.argmax((v < 0) | (v > 1)))
        raise SchemaError(field, f"row {row}: label {v[row]} is not 0 or 1")
    return v.astype(np.uint8)


def _numbered_columns(cols: Mapping[str, np.ndarray], table: str, prefix: str, count: int) -> Dict[int, str]:
    """``{k: name}`` of the present columns ``{prefix}{k}``; ``k >= count`` is an error."""
    found = {}
    for name in cols:
        m = re.fullmatch(re.escape(prefix) + r"(\d+)", name)
        if m:
            k = int(m.group(1))
            if k >= count:
                raise SchemaError(f"{table}.{name}", f"unexpected column: the config has {count} "
                                  f"{prefix}* columns ({prefix}0..{prefix}{count - 1})")
            found[k] = name
    return found


# ------------------------------------------------------------------------------------------- tables

@dataclasses.dataclass(frozen=True, eq=False)
class EventTable:
    """Validated events (E rows). ``action`` is the index into ``action_names`` (``IMPRESSION_CODE`` for
    impressions), ``surface`` the index into ``surface_names``."""

    user_id: np.ndarray     # (E,) int64
    item_id: np.ndarray     # (E,) int64
    action: np.ndarray      # (E,) int8
    surface: np.ndarray     # (E,) int16
    timestamp: np.ndarray   # (E,) int64 seconds
    action_names: Tuple[str, ...]
    surface_names: Tuple[str, ...]

    def __len__(self) -> int:
        return int(self.user_id.shape[0])

    @property
    def is_impression(self) -> np.ndarray:
        return self.action == IMPRESSION_CODE

    @classmethod
    def from_columns(cls, cols: Mapping[str, np.ndarray], feat: FeatureConfig) -> "EventTable":
        if IMPRESSION in feat.action_names:
            raise SchemaError("events.action", f"{IMPRESSION!r} is reserved and cannot be an action name")
        n = len(_column(cols, "events", "user_id", None))
        get = lambda name: _column(cols, "events", name, n)  # noqa: E731
        actions = {name: i for i, name in enumerate(feat.action_names)}
        actions[IMPRESSION] = IMPRESSION_CODE
        surfaces = {name: i for i, name in enumerate(feat.surface_names)}
        return cls(
            user_id=_to_int64(get("user_id"), "events.user_id", non_negative=True),
            item_id=_to_int64(get("item_id"), "events.item_id", non_negative=True),
            action=_to_codes(get("action"), "events.action", actions).astype(np.int8),
            surface=_to_codes(get("surface"), "events.surface", surfaces).astype(np.int16),
            timestamp=_to_int64(get("timestamp"), "events.timestamp"),
            action_names=tuple(feat.action_names), surface_names=tuple(feat.surface_names))

    def to_columns(self) -> Dict[str, np.ndarray]:
        names = np.array(list(self.action_names) + [IMPRESSION])  # code -1 -> last entry
        return {"user_id": self.user_id, "item_id": self.item_id, "action": names[self.action],
                "surface": np.array(self.surface_names)[self.surface], "timestamp": self.timestamp}

    def select(self, rows: np.ndarray) -> "EventTable":
        arrays = {f: getattr(self, f)[rows] for f in ("user_id", "item_id", "action", "surface", "timestamp")}
        return dataclasses.replace(self, **arrays)


@dataclasses.dataclass(frozen=True, eq=False)
class ItemTable:
    """Validated item embeddings: unique ``item_id`` (M,) int64 and float32 ``embedding`` (M, D)."""

    item_id: np.ndarray
    embedding: np.ndarray

    def __len__(self) -> int:
        return int(self.item_id.shape[0])

    @classmethod
    def from_columns(cls, cols: Mapping[str, np.ndarray], feat: FeatureConfig) -> "ItemTable":
        ids = _to_int64(_column(cols, "items", "item_id", None), "items.item_id", non_negative=True)
        emb = _embedding_matrix(cols, len(ids), feat.embedding_dim)
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            dup = uniq[np.argmax(counts > 1)]
            rows = np.flatnonzero(ids == dup)[:2].tolist()
            raise SchemaError("items.item_id", f"duplicate item id {dup} (rows {rows})")
        return cls(ids, emb)

    def to_columns(self, split: bool = False) -> Dict[str, np.ndarray]:
        """``item_id`` plus ``embedding`` (M, D), or ``emb_0..`` columns when ``split``."""
        if not split:
            return {"item_id": self.item_id, "embedding": self.embedding}
        cols = {"item_id": self.item_id}
        cols.update({f"emb_{k}": self.embedding[:, k] for k in range(self.embedding.shape[1])})
        return cols


def _embedding_matrix(cols: Mapping[str, np.ndarray], n: int, dim: int) -> np.ndarray:
    """The (n, dim) float32 embedding from ``embedding`` or ``emb_0..emb_{dim-1}``; finite values only."""
    if "embedding" in cols:
        e = np.asarray(cols["embedding"])
        if e.ndim != 2 or e.shape != (n, dim):
            raise SchemaError("items.embedding", f"expected shape ({n}, {dim}), got {e.shape}")
    else:
        present = _numbered_columns(cols, "items", "emb_", dim)
        if not present:
            raise SchemaError("items.embedding", f"missing: give an (M, {dim}) 'embedding' array or "
                              f"columns emb_0..emb_{dim - 1}")
        for k in range(dim):
            if k not in present:
                raise SchemaError(f"items.emb_{k}", "missing column")
        e = np.stack([_column(cols, "items", f"emb_{k}", n) for k in range(dim)], axis=1)
    if e.dtype.kind in "USO":
        flat = _to_float32(e.reshape(-1), "items.embedding")
        e = flat.reshape(n, dim)
    elif e.dtype.kind not in "fiu":
        raise SchemaError("items.embedding", f"expected floats, got dtype {e.dtype}")
    check_finite("items.embedding", e)
    with np.errstate(over="ignore"):
        out = e.astype(np.float32)
    check_finite("items.embedding", out)
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class RequestTable:
    """Validated request rows (N = one per (request, candidate))."""

    request_id: np.ndarray      # (N,) int64
    user_id: np.ndarray         # (N,) int64
    timestamp: np.ndarray       # (N,) int64
    item_id: np.ndarray         # (N,) int64
    dense: np.ndarray           # (N, num_dense) float32
    categorical: np.ndarray     # (N, C) int32
    labels: Optional[np.ndarray]  # (N, H) uint8, or None for serving requests
    heads: Tuple[str, ...]

    def __len__(self) -> int:
        return int(self.request_id.shape[0])

    @classmethod
    def from_columns(cls, cols: Mapping[str, np.ndarray], feat: FeatureConfig) -> "RequestTable":
        return _request_table(cols, feat)

    def to_columns(self) -> Dict[str, np.ndarray]:
        cols = {"request_id": self.request_id, "user_id": self.user_id, "timestamp": self.timestamp,
                "item_id": self.item_id}
        if self.labels is not None:
            cols.update({h: self.labels[:, j] for j, h in enumerate(self.heads)})
        cols.update({f"dense_{k}": self.dense[:, k] for k in range(self.dense.shape[1])})
        cols.update({f"cat_{k}": self.categorical[:, k] for k in range(self.categorical.shape[1])})
        return cols

    def select(self, rows: np.ndarray) -> "RequestTable":
        return dataclasses.replace(
            self, request_id=self.request_id[rows], user_id=self.user_id[rows],
            timestamp=self.timestamp[rows], item_id=self.item_id[rows], dense=self.dense[rows],
            categorical=self.categorical[rows],
            labels=None if self.labels is None else self.labels[rows])


def _request_table(cols: Mapping[str, np.ndarray], feat: FeatureConfig) -> RequestTable:
    """Parse and validate the requests table."""
    n = len(_column(cols, "requests", "request_id", None))
    get = lambda name: _column(cols, "requests", name, n)  # noqa: E731
    ids = {name: _to_int64(get(name), f"requests.{name}", non_negative=(name != "timestamp"))
           for name in ("request_id", "user_id", "timestamp", "item_id")}
    return RequestTable(**ids, dense=_dense_columns(cols, n, feat),
                        categorical=_categorical_columns(cols, n, feat),
                        labels=_label_columns(cols, n, feat), heads=tuple(feat.heads))


def _label_columns(cols: Mapping[str, np.ndarray], n: int, feat: FeatureConfig) -> Optional[np.ndarray]:
    """(N, H) labels when every head has a column, None when none has; partial sets are an error."""
    present = [h for h in feat.heads if h in cols]
    if not present:
        return None
    for h in feat.heads:
        if h not in cols:
            raise SchemaError(f"requests.{h}", f"missing label column: give all of {list(feat.heads)} "
                              f"(training) or none (serving)")
    return np.stack([_to_labels(_column(cols, "requests", h, n), f"requests.{h}") for h in feat.heads], 1)


def _dense_columns(cols: Mapping[str, np.ndarray], n: int, feat: FeatureConfig) -> np.ndarray:
    out = np.zeros((n, feat.num_dense), np.float32)
    for k, name in _numbered_columns(cols, "requests", "dense_", feat.num_dense).items():
        out[:, k] = _to_float32(_column(cols, "requests", name, n), f"requests.{name}")
    return out


def _categorical_columns(cols: Mapping[str, np.ndarray], n: int, feat: FeatureConfig) -> np.ndarray:
    vocab = feat.categorical_vocab_sizes
    out = np.zeros((n, len(vocab)), np.int32)
    for k, name in _numbered_columns(cols, "requests", "cat_", len(vocab)).items():
        v = _to_int64(_column(cols, "requests", name, n), f"requests.{name}")
        bad = (v < 0) | (v >= vocab[k])
        if bad.any():
            row = int(np.argmax(bad))
            raise SchemaError(f"requests.{name}", f"row {row}: value {v[row]} out of range [0, {vocab[k]})")
        out[:, k] = v
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class EventLog:
    """A validated event log: events, item embeddings and ranking requests (see the module docstring)."""

    events: EventTable
    items: ItemTable
    requests: RequestTable

    @classmethod
    def load(cls, events: TableSource, items: TableSource, requests: TableSource,
             feat: FeatureConfig = FeatureConfig()) -> "EventLog":
        """Load and validate the three tables, each from a ``.csv`` / ``.npz`` path or a mapping."""
        return cls(EventTable.from_columns(read_table(events, "events"), feat),
                   ItemTable.from_columns(read_table(items, "items"), feat),
                   RequestTable.from_columns(read_table(requests, "requests"), feat))

    @classmethod
    def load_dir(cls, directory: Union[str, os.PathLike],
                 feat: FeatureConfig = FeatureConfig()) -> "EventLog":
        """Load ``events``, ``items`` and ``requests`` (each ``.csv`` or ``.npz``) from a directory."""
        paths = []
        for table in TABLES:
            found = [p for p in (Path(directory) / f"{table}.csv", Path(directory) / f"{table}.npz")
                     if p.exists()]
            if len(found) != 1:
                raise SchemaError(table, f"expected exactly one of {table}.csv / {table}.npz in "
                                  f"{directory}, found {len(found)}")
            paths.append(found[0])
        return cls.load(*paths, feat=feat)


# ------------------------------------------------------------------------------------------ writers

def _write_csv(path: Path, cols: Mapping[str, np.ndarray]) -> None:
    """Write columns as CSV; floats in float64 repr so float32 values round-trip exactly."""
    text = [np.asarray(c, np.float64).astype(str) if np.asarray(c).dtype.kind == "f" else
            np.asarray(c).astype(str) for c in cols.values()]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(list(cols))
        writer.writerows(zip(*text))


def write_event_log_csv(log: EventLog, directory: Union[str, os.PathLike]) -> Dict[str, Path]:
    """Write ``events.csv``, ``items.csv`` (``emb_k`` columns) and ``requests.csv``; returns the paths."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tables = {"events": log.events.to_columns(), "items": log.items.to_columns(split=True),
              "requests": log.requests.to_columns()}
    paths = {}
    for name, cols in tables.items():
        paths[name] = out / f"{name}.csv"
        _write_csv(paths[name], cols)
    return paths


def write_event_log_npz(log: EventLog, directory: Union[str, os.PathLike]) -> Dict[str, Path]:
    """Write ``events.npz``, ``items.npz`` (an ``embedding`` matrix) and ``requests.npz``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tables = {"events": log.events.to_columns(), "items": log.items.to_columns(),
              "requests": log.requests.to_columns()}
    paths = {}
    for name, cols in tables.items():
        paths[name] = out / f"{name}.npz"
        np.savez(paths[name], **cols)
    return paths


# ------------------------------------------------------------------------------- vectorized helpers

class _SortedPairs:
    """(group, key) int pairs sorted lexicographically; finds the first pair >= a query, vectorized.

    Keys are replaced by their rank among the distinct keys, so ``group * (n_keys + 1) + rank`` is one
    sorted int64 (no overflow for any realistic size) and ``np.searchsorted`` does the work.
    """

    def __init__(self, group: np.ndarray, key: np.ndarray):
        self.keys = np.unique(key)
        self.stride = len(self.keys) + 1
        self.flat = group.astype(np.int64) * self.stride + np.searchsorted(self.keys, key)

    def first_at_or_after(self, group: np.ndarray, key: np.ndarray) -> np.ndarray:
        """Index of the first stored pair ``>= (group, key)`` (= number of pairs before it)."""
        q = group.astype(np.int64) * self.stride + np.searchsorted(self.keys, key)
        return np.searchsorted(self.flat, q, side="left")


def _ranges(lo: np.ndarray, hi: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Concatenated ``arange(lo[i], hi[i])`` and the (U + 1,) offsets of each range."""
    lengths = np.maximum(hi - lo, 0).astype(np.int64)
    offsets = np.zeros(len(lo) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    index = np.repeat(lo.astype(np.int64) - offsets[:-1], lengths) + np.arange(offsets[-1])
    return index, offsets


def _segment_or(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Bitwise OR of ``values[lo[i]:hi[i]]`` for each i (requires ``hi > lo``)."""
    if len(lo) == 0:
        return np.zeros(0, values.dtype)
    padded = np.append(values, np.zeros(1, values.dtype))
    return np.bitwise_or.reduceat(padded, np.stack([lo, hi], 1).ravel())[::2]


@dataclasses.dataclass(frozen=True)
class _Tokens:
    """Merged explicit tokens of all users (token ids in merge order: sorted by user, item, time).

    ``event_*`` are the explicit events in merge order; token ``j`` owns events
    ``event_lo[j] : event_lo[j + 1]``. ``group_*`` describe the distinct (user, item) pairs.
    """

    user: np.ndarray
    item_row: np.ndarray
    time: np.ndarray
    last_time: np.ndarray
    action: np.ndarray
    surface: np.ndarray
    event_lo: np.ndarray
    event_token: np.ndarray
    event_time: np.ndarray
    event_bit: np.ndarray
    group_user: np.ndarray
    group_item_row: np.ndarray
    group_first_time: np.ndarray


def _anchored_starts(group: np.ndarray, time: np.ndarray, window: int) -> np.ndarray:
    """Token start positions in events sorted by (group, time): a token covers ``[t0, t0 + window)``.

    Pointer-chasing from each group's first event, all groups at once; the number of rounds is the
    largest number of tokens in one (user, item) group.
    """
    n = len(group)
    is_start = np.zeros(n, bool)
    pairs = _SortedPairs(group, time)
    active = np.flatnonzero(np.r_[True, group[1:] != group[:-1]]) if n else np.zeros(0, np.int64)
    while active.size:
        is_start[active] = True
        nxt = np.maximum(pairs.first_at_or_after(group[active], time[active] + window), active + 1)
        inside = nxt < n
        src, nxt = active[inside], nxt[inside]
        active = nxt[group[nxt] == group[src]]
    return np.flatnonzero(is_start)


def _merge_explicit(user: np.ndarray, item_row: np.ndarray, time: np.ndarray, bit: np.ndarray,
                    surface: np.ndarray, window: int) -> _Tokens:
    """Merge explicit events of one (user, item) within ``window`` seconds into multi-hot tokens."""
    order = np.lexsort((time, item_row, user))
    u, v, t, b, s = user[order], item_row[order], time[order], bit[order], surface[order]
    n = len(u)
    new_group = np.r_[True, (u[1:] != u[:-1]) | (v[1:] != v[:-1])] if n else np.zeros(0, bool)
    group = np.cumsum(new_group) - 1
    starts = _anchored_starts(group, t, window)
    ends = np.append(starts[1:], n).astype(np.int64) if n else starts
    is_start = np.zeros(n, np.int64)
    is_start[starts] = 1
    token_of_event = np.cumsum(is_start) - 1
    g_starts = np.flatnonzero(new_group)
    return _Tokens(
        user=u[starts], item_row=v[starts], time=t[starts], last_time=t[ends - 1] if n else t[:0],
        action=_segment_or(b, starts, ends), surface=s[starts], event_lo=starts,
        event_token=token_of_event, event_time=t, event_bit=b,
        group_user=u[g_starts], group_item_row=v[g_starts], group_first_time=t[g_starts])


def _actions_before(tok: _Tokens, ids: np.ndarray, cutoff: np.ndarray) -> np.ndarray:
    """Action bitmasks of tokens ``ids`` counting only their events with time < ``cutoff``."""
    actions = tok.action[ids].copy()
    late = tok.last_time[ids] >= cutoff
    if late.any():
        pairs = _SortedPairs(tok.event_token, tok.event_time)
        hi = pairs.first_at_or_after(ids[late], cutoff[late])
        actions[late] = _segment_or(tok.event_bit, tok.event_lo[ids[late]], hi)
    return actions


def _first_engagement(tok: _Tokens, user: np.ndarray, item_row: np.ndarray) -> np.ndarray:
    """Earliest explicit-event time of each (user, item) pair (int64 max when never engaged)."""
    out = np.full(len(user), _INT64_MAX, np.int64)
    if len(tok.group_user) == 0 or len(user) == 0:
        return out
    q = _SortedPairs(tok.group_user, tok.group_item_row).first_at_or_after(user, item_row)
    qc = np.minimum(q, len(tok.group_user) - 1)
    hit = (q < len(tok.group_user)) & (tok.group_user[qc] == user) & (tok.group_item_row[qc] == item_row)
    out[hit] = tok.group_first_time[qc[hit]]
    return out


def _recent_eligible(lo: np.ndarray, hi: np.ndarray, eligible_until: np.ndarray, cutoff: np.ndarray,
                     count: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per request i, the ``count`` last positions p in ``[lo[i], hi[i])`` with
    ``eligible_until[p] >= cutoff[i]``, chronological. Returns (flat positions, offsets).

    Scans a window of the last ``count`` positions and doubles it for requests that found too few.
    """
    reqs, picks = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    active = np.flatnonzero(hi > lo) if count > 0 else np.zeros(0, np.int64)
    width = max(count, 1)
    while active.size:
        a_lo, a_hi = lo[active], hi[active]
        start = np.maximum(a_hi - width, a_lo)
        pos = start[:, None] + np.arange(width)[None, :]
        inside = pos < a_hi[:, None]
        pos = np.where(inside, pos, a_lo[:, None])
        ok = inside & (eligible_until[pos] >= cutoff[active][:, None])
        from_right = np.cumsum(ok[:, ::-1], axis=1)[:, ::-1]
        done = (from_right[:, 0] >= count) | (start == a_lo)
        rows, cols = np.nonzero(ok & (from_right <= count) & done[:, None])
        reqs.append(active[rows])
        picks.append(pos[rows, cols])
        active, width = active[~done], width * 2
    req, pick = np.concatenate(reqs), np.concatenate(picks)
    order = np.argsort(req, kind="stable")
    offsets = np.zeros(len(lo) + 1, np.int64)
    np.cumsum(np.bincount(req, minlength=len(lo)), out=offsets[1:])
    return pick[order], offsets


# -------------------------------------------------------------------------------------------- builder

def _check_compatible(log: EventLog, feat: FeatureConfig) -> None:
    """The log was loaded under a config with the same names and widths as ``feat``."""
    if log.events.action_names != tuple(feat.action_names):
        raise SchemaError("events.action", "log was loaded with different FeatureConfig.action_names")
    if log.events.surface_names != tuple(feat.surface_names):
        raise SchemaError("events.surface", "log was loaded with different FeatureConfig.surface_names")
    if log.items.embedding.shape[1] != feat.embedding_dim:
        raise SchemaError("items.embedding", f"width {log.items.embedding.shape[1]} != embedding_dim "
                          f"{feat.embedding_dim}")
    r = log.requests
    if r.heads != tuple(feat.heads) or r.dense.shape[1] != feat.num_dense or \
            r.categorical.shape[1] != len(feat.categorical_vocab_sizes):
        raise SchemaError("requests", "log was loaded with different heads / num_dense / categorical "
                          "features than this FeatureConfig")


@dataclasses.dataclass(frozen=True)
class _ItemIndex:
    """Item ids sorted, with their int8 codes."""

    ids: np.ndarray
    codes: np.ndarray

    @classmethod
    def build(cls, items: ItemTable, feat: FeatureConfig) -> "_ItemIndex":
        order = np.argsort(items.item_id, kind="stable")
        codes = quantize(items.embedding[order], feat.quant_scale, "items.embedding", feat.embedding_dim)
        return cls(items.item_id[order], codes)

    def rows(self, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Row of each id in ``codes`` and whether it exists."""
        row = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return row, self.ids[row] == ids


def _resolve_items(ids: np.ndarray, index: _ItemIndex, field: str,
                   policy: str) -> Tuple[np.ndarray, np.ndarray]:
    """(item rows, kept mask) for ``ids``; raises for missing items unless ``policy == "drop"``."""
    row, found = index.rows(ids)
    if policy == "raise" and not found.all():
        bad = int(np.argmax(~found))
        raise SchemaError(field, f"row {bad}: item id {ids[bad]} is not in the item embedding table "
                          f"(EventLogConfig(on_missing_item='drop') skips such rows)")
    return row, found


def _group_requests(req: RequestTable) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows sorted by request (first-appearance order, stable) -> (row order, request of each sorted
    row, first row of each request). Checks that a request's rows agree on user and time."""
    _, first, inverse = np.unique(req.request_id, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    by_appearance = np.argsort(first, kind="stable")
    rank = np.empty_like(by_appearance)
    rank[by_appearance] = np.arange(len(first))
    req_of_row = rank[inverse]
    head = first[by_appearance]
    for name in ("user_id", "timestamp"):
        col = getattr(req, name)
        bad = col != col[head[req_of_row]]
        if bad.any():
            row = int(np.argmax(bad))
            raise SchemaError(f"requests.{name}", f"row {row}: request {req.request_id[row]} has rows "
                              f"with different {name} ({col[head[req_of_row[row]]]} vs {col[row]})")
    order = np.argsort(req_of_row, kind="stable")
    return order, req_of_row[order], head


def _token_fields(times, actions, surfaces, item_rows, index: _ItemIndex, feat: FeatureConfig) -> TokenFields:
    return TokenFields(timestamps=times.astype(np.int64), actions=actions.astype(feat.action_dtype),
                       surfaces=surfaces.astype(np.int16), embeddings=index.codes[item_rows])


def _explicit_sequences(tok: _Tokens, req_user: np.ndarray, req_time: np.ndarray, index: _ItemIndex,
                        feat: FeatureConfig, sel: SelectionConfig) -> Tuple[JaggedSequences, JaggedSequences]:
    """S_LL and S_RT of each request from the merged explicit tokens (see the module docstring)."""
    seq_order = np.lexsort((index.ids[tok.item_row], tok.time, tok.user))
    user, time = tok.user[seq_order], tok.time[seq_order]
    first = np.searchsorted(user, req_user, side="left")
    end = _SortedPairs(user, time).first_at_or_after(req_user, req_time)
    rt_lo = np.maximum(first, end - sel.max_rt_len)
    ll_lo = np.maximum(first, rt_lo - sel.max_ll_len)
    out = []
    for lo, hi in ((ll_lo, rt_lo), (rt_lo, end)):
        pos, offsets = _ranges(lo, hi)
        ids = seq_order[pos]
        cutoff = np.repeat(req_time, np.diff(offsets))
        fields = _token_fields(tok.time[ids], _actions_before(tok, ids, cutoff), tok.surface[ids],
                               tok.item_row[ids], index, feat)
        out.append(JaggedSequences(fields, offsets))
    return out[0], out[1]


def _impression_sequences(user: np.ndarray, item_row: np.ndarray, time: np.ndarray, surface: np.ndarray,
                          tok: _Tokens, req_user: np.ndarray, req_time: np.ndarray, index: _ItemIndex,
                          feat: FeatureConfig, sel: SelectionConfig) -> JaggedSequences:
    """S_imp: recent impressions before the request of items the user had not engaged with."""
    order = np.lexsort((index.ids[item_row], time, user))
    user, item_row, time, surface = user[order], item_row[order], time[order], surface[order]
    engaged_at = _first_engagement(tok, user, item_row)
    lo = np.searchsorted(user, req_user, side="left")
    hi = _SortedPairs(user, time).first_at_or_after(req_user, req_time)
    pos, offsets = _recent_eligible(lo, hi, engaged_at, req_time, sel.max_imp_len)
    fields = _token_fields(time[pos], np.zeros(len(pos), np.int64), surface[pos], item_row[pos], index, feat)
    return JaggedSequences(fields, offsets)


def build_requests(log: EventLog, feat: FeatureConfig = FeatureConfig(),
                   sel: SelectionConfig = SelectionConfig(),
                   cfg: EventLogConfig = EventLogConfig()) -> RequestBatch:
    """De-duplicated :class:`RequestBatch` (one request per ``request_id``) from an event log.

    Sequences follow the semantics of the module docstring; labels are set when the requests table has
    label columns. The result is validated against ``feat`` and ``sel``.
    """
    _check_compatible(log, feat)
    index = _ItemIndex.build(log.items, feat)
    ev = log.events
    ev_rows, keep = _resolve_items(ev.item_id, index, "events.item_id", cfg.on_missing_item)
    ev, ev_rows = ev.select(keep), ev_rows[keep]
    rq = log.requests
    cand_rows, keep = _resolve_items(rq.item_id, index, "requests.item_id", cfg.on_missing_item)
    rq, cand_rows = rq.select(keep), cand_rows[keep]

    order, cand_to_req, head = _group_requests(rq)
    users = np.unique(np.concatenate([ev.user_id, rq.user_id]))
    ev_user = np.searchsorted(users, ev.user_id)
    req_user = np.searchsorted(users, rq.user_id[head])
    req_time = rq.timestamp[head]

    explicit = ~ev.is_impression
    bit = np.left_shift(np.ones(1, np.uint32), ev.action[explicit].astype(np.uint32))
    tok = _merge_explicit(ev_user[explicit], ev_rows[explicit], ev.timestamp[explicit], bit,
                          ev.surface[explicit], int(cfg.merge_window_s))
    ll, rt = _explicit_sequences(tok, req_user, req_time, index, feat, sel)
    imp_mask = ev.is_impression
    imp = _impression_sequences(ev_user[imp_mask], ev_rows[imp_mask], ev.timestamp[imp_mask],
                                ev.surface[imp_mask], tok, req_user, req_time, index, feat, sel)
    batch = RequestBatch(
        ll=ll, rt=rt, imp=imp,
        user_id=rq.user_id[head], request_id=rq.request_id[head], request_timestamp=req_time,
        cand_item_id=rq.item_id[order], cand_embedding=index.codes[cand_rows[order]],
        cand_to_req=cand_to_req.astype(np.int32), dense=rq.dense[order],
        categorical=rq.categorical[order],
        labels=None if rq.labels is None else rq.labels[order])
    batch.validate(feat, sel)
    return batch


def build_training_examples(log: EventLog, feat: FeatureConfig = FeatureConfig(),
                            sel: SelectionConfig = SelectionConfig(),
                            cfg: EventLogConfig = EventLogConfig()) -> TrainingExamples:
    """Logged training examples (one per request row): ``log_nn_features(build_requests(...))``.

    The requests table must have label columns.
    """
    batch = build_requests(log, feat, sel, cfg)
    if batch.labels is None:
        raise SchemaError("requests.labels", f"training examples need label columns {list(feat.heads)}")
    return log_nn_features(batch, feat, sel)


__all__ = [
    "IMPRESSION", "IMPRESSION_CODE", "EventLog", "EventLogConfig", "EventTable", "ItemTable",
    "RequestTable", "build_requests", "build_training_examples", "read_table", "write_event_log_csv",
    "write_event_log_npz",
]
