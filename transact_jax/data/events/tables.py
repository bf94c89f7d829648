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
    categorical_columns,
    column,
    dense_columns,
    embedding_matrix,
    label_columns,
    to_codes,
    to_int64,
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
            timestamp=to_int64(get("timestamp"), "events.timestamp"),
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
    def from_columns(cls, cols: Mapping[str, np.ndarray], feat: FeatureConfig) -> "RequestTable":
        n = len(column(cols, "requests", "request_id", None))
        get = lambda name: column(cols, "requests", name, n)  # noqa: E731
        ids = {name: to_int64(get(name), f"requests.{name}", non_negative=(name != "timestamp"))
               for name in ("request_id", "user_id", "timestamp", "item_id")}
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
