"""The three validated tables of an event log (events, items, requests), the log itself and the
builder's options. Format and semantics: :mod:`transact_jax.data.events`."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import numpy as np

from transact_jax.config import FeatureConfig
from transact_jax.data.events.columns import (
    INT64_MAX,
    TIMESTAMP_UNITS,
    categorical_columns,
    column,
    dense_columns,
    embedding_matrix,
    label_columns,
    to_codes,
    to_int64,
    to_seconds,
)
from transact_jax.data.events.files import TableSource, read_table
from transact_jax.data.schema import SchemaError

IMPRESSION = "impression"
"""Action name of an impression (item shown, not engaged)."""
IMPRESSION_CODE = -1
"""``EventTable.action`` code of an impression."""
TABLES = ("events", "items", "requests")


@dataclasses.dataclass(frozen=True)
class EventLogConfig:
    """How an event log is read (:meth:`EventLog.load`) and how the builder turns events into tokens.

    Attributes:
      merge_window_s: explicit events of one (user, item) within this many seconds of a token's first
        event merge into that token (multi-hot actions); 0 disables merging. Any int64 is valid:
        the window's end is computed without overflow (a window longer than the span of the
        timestamps merges all of a (user, item)'s explicit events into one token).
      on_missing_item: ``"raise"`` (default) or ``"drop"`` events / candidates whose item has no
        embedding.
      timestamp_unit: unit of the ``timestamp`` columns of the events and requests tables as read by
        :meth:`EventLog.load`: ``"s"`` (default), ``"ms"`` or ``"us"``. Values are converted to whole
        seconds (rounded down), the unit of every table and of ``merge_window_s``. Timestamps whose
        median is implausibly large for the unit (e.g. milliseconds read as seconds) are rejected,
        naming the unit they look like (:func:`~transact_jax.data.events.columns.to_seconds`).
    """

    merge_window_s: int = 3600
    on_missing_item: str = "raise"
    timestamp_unit: str = "s"

    def __post_init__(self):
        w = self.merge_window_s
        if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or not 0 <= w <= INT64_MAX:
            raise SchemaError("merge_window_s", f"must be an int in [0, {INT64_MAX}] (seconds), "
                              f"got {w!r}")
        if self.on_missing_item not in ("raise", "drop"):
            raise SchemaError("on_missing_item", f"must be 'raise' or 'drop', got {self.on_missing_item!r}")
        if self.timestamp_unit not in TIMESTAMP_UNITS:
            raise SchemaError("timestamp_unit", f"must be one of {list(TIMESTAMP_UNITS)}, got "
                              f"{self.timestamp_unit!r}")


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
    def from_columns(cls, cols: Mapping[str, np.ndarray], feat: FeatureConfig,
                     timestamp_unit: str = "s") -> "EventTable":
        """Validate raw columns; ``timestamp`` is in ``timestamp_unit`` (``EventLogConfig``)."""
        if IMPRESSION in feat.action_names:
            raise SchemaError("events.action", f"{IMPRESSION!r} is reserved and cannot be an action name")
        n = len(column(cols, "events", "user_id", None))
        get = lambda name: column(cols, "events", name, n)  # noqa: E731
        actions = {name: i for i, name in enumerate(feat.action_names)}
        actions[IMPRESSION] = IMPRESSION_CODE
        surfaces = {name: i for i, name in enumerate(feat.surface_names)}
        return cls(
            user_id=to_int64(get("user_id"), "events.user_id", non_negative=True),
            item_id=to_int64(get("item_id"), "events.item_id", non_negative=True),
            action=to_codes(get("action"), "events.action", actions).astype(np.int8),
            surface=to_codes(get("surface"), "events.surface", surfaces).astype(np.int16),
            timestamp=to_seconds(get("timestamp"), "events.timestamp", timestamp_unit),
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
        ids = to_int64(column(cols, "items", "item_id", None), "items.item_id", non_negative=True)
        emb = embedding_matrix(cols, len(ids), feat.embedding_dim)
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
    def from_columns(cls, cols: Mapping[str, np.ndarray], feat: FeatureConfig,
                     timestamp_unit: str = "s") -> "RequestTable":
        """Validate raw columns; ``timestamp`` is in ``timestamp_unit`` (``EventLogConfig``)."""
        n = len(column(cols, "requests", "request_id", None))
        get = lambda name: column(cols, "requests", name, n)  # noqa: E731
        ids = {name: to_int64(get(name), f"requests.{name}", non_negative=True)
               for name in ("request_id", "user_id", "item_id")}
        ids["timestamp"] = to_seconds(get("timestamp"), "requests.timestamp", timestamp_unit)
        return cls(**ids, dense=dense_columns(cols, n, feat),
                   categorical=categorical_columns(cols, n, feat),
                   labels=label_columns(cols, n, feat), heads=tuple(feat.heads))

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


@dataclasses.dataclass(frozen=True, eq=False)
class EventLog:
    """A validated event log: events, item embeddings and ranking requests (format:
    :mod:`transact_jax.data.events`)."""

    events: EventTable
    items: ItemTable
    requests: RequestTable

    @classmethod
    def load(cls, events: TableSource, items: TableSource, requests: TableSource,
             feat: FeatureConfig = FeatureConfig(), cfg: EventLogConfig = EventLogConfig()) -> "EventLog":
        """Load and validate the three tables, each from a ``.csv`` / ``.npz`` path or a mapping;
        timestamps are read in ``cfg.timestamp_unit`` and stored in seconds."""
        unit = cfg.timestamp_unit
        return cls(EventTable.from_columns(read_table(events, "events"), feat, unit),
                   ItemTable.from_columns(read_table(items, "items"), feat),
                   RequestTable.from_columns(read_table(requests, "requests"), feat, unit))

    @classmethod
    def load_dir(cls, directory: Union[str, os.PathLike], feat: FeatureConfig = FeatureConfig(),
                 cfg: EventLogConfig = EventLogConfig()) -> "EventLog":
        """Load ``events``, ``items`` and ``requests`` (each ``.csv`` or ``.npz``) from a directory."""
        paths = []
        for table in TABLES:
            found = [p for p in (Path(directory) / f"{table}.csv", Path(directory) / f"{table}.npz")
                     if p.exists()]
            if len(found) != 1:
                raise SchemaError(table, f"expected exactly one of {table}.csv / {table}.npz in "
                                  f"{directory}, found {len(found)}")
            paths.append(found[0])
        return cls.load(*paths, feat=feat, cfg=cfg)
