"""Reading a feature log: :class:`FeatureLog`, random access through memory-mapped shards.

The format is described in :mod:`transact_jax.data.feature_log`; each shard's header is checked by
:class:`~transact_jax.data.feature_log.format._Shard`.
"""
from __future__ import annotations

import collections
import json
import os
import threading
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data.feature_log.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    VERIFY_MODES,
    FeatureLogError,
    PathLike,
    _check_config,
    _column_table,
    _Shard,
    _stored_config,
)
from transact_jax.data.schema import TrainingExamples
from transact_jax.data.source import check_indices


class FeatureLog:
    """Read-only, random-access view of a feature log directory (format: the package docstring).

    Args:
      path: the log directory.
      feat, sel: the configs the caller expects; ``None`` accepts the stored ones. A difference raises
        :class:`SchemaError` naming the field (e.g. ``"selection_config.k_ll"``).
      verify: ``"header"`` (default), ``"full"`` (also every CRC) or ``"none"`` (lazy, minimal checks).
      max_open_shards: memory maps kept open at once (least recently used ones are closed), which
        bounds file descriptors for logs with many shards.

    Attributes:
      feat, sel: the stored configs.
      shard_sizes: (num_shards,) examples per shard; ``shard_starts`` their first global index.
    """

    def __init__(self, path: PathLike, feat: Optional[FeatureConfig] = None,
                 sel: Optional[SelectionConfig] = None, verify: str = "header",
                 max_open_shards: int = 256):
        if max_open_shards < 1:
            raise ValueError(f"max_open_shards: must be >= 1, got {max_open_shards}")
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify: must be one of {VERIFY_MODES}, got {verify!r}")
        self.path = os.fspath(path)
        self.verify = verify
        manifest_path = os.path.join(self.path, MANIFEST)
        try:
            with open(manifest_path, "rb") as f:
                manifest = json.loads(f.read())
        except FileNotFoundError as e:
            raise FeatureLogError(manifest_path, "missing: no feature log here (a writer that was "
                                  "never closed leaves no manifest)") from e
        except ValueError as e:
            raise FeatureLogError(manifest_path, f"not valid JSON: {e}") from e
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise FeatureLogError(manifest_path, f"not a feature log manifest (format != "
                                  f"{FORMAT_NAME!r})")
        if manifest.get("version") != FORMAT_VERSION:
            raise FeatureLogError(manifest_path, f"format version {manifest.get('version')!r}, this "
                                  f"reader knows {FORMAT_VERSION}")
        self.feat = _stored_config(FeatureConfig, manifest, "feature_config", manifest_path)
        self.sel = _stored_config(SelectionConfig, manifest, "selection_config", manifest_path)
        _check_config(self.feat, feat, "feature_config", self.path)
        _check_config(self.sel, sel, "selection_config", self.path)
        self._columns = _column_table(self.feat, self.sel)
        if manifest.get("columns") != self._columns:
            raise FeatureLogError(manifest_path, "column table does not match the stored configs")
        try:
            self._entries = [{"file": str(s["file"]), "num_examples": int(s["num_examples"]),
                              "nbytes": int(s["nbytes"])} for s in manifest["shards"]]
        except (KeyError, TypeError, ValueError) as e:
            raise FeatureLogError(manifest_path, f"bad shard list: {e}") from e
        for s in self._entries:
            if os.path.basename(s["file"]) != s["file"] or s["num_examples"] <= 0:
                raise FeatureLogError(manifest_path, f"bad shard entry {s}")
        self.shard_sizes = np.array([s["num_examples"] for s in self._entries], np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(self.shard_sizes)]).astype(np.int64)
        self._len = int(self.shard_starts[-1])
        if manifest.get("num_examples") != self._len:
            raise FeatureLogError(manifest_path, f"num_examples {manifest.get('num_examples')} != "
                                  f"sum over shards {self._len}")
        self._specs = TrainingExamples.column_specs(self.feat, self.sel)
        self.max_open_shards = int(max_open_shards)
        self._shards: List[Optional[_Shard]] = [None] * len(self._entries)
        self._open: "collections.OrderedDict[int, Dict[str, np.ndarray]]" = collections.OrderedDict()
        self._lock = threading.Lock()
        if verify != "none":
            for i in range(len(self._entries)):
                shard = self._shard(i)
                if verify == "full":
                    shard.verify_data()

    # -- structure

    def __len__(self) -> int:
        return self._len

    @property
    def num_shards(self) -> int:
        return len(self._entries)

    @property
    def shard_files(self) -> List[str]:
        return [os.path.join(self.path, s["file"]) for s in self._entries]

    def _shard(self, i: int) -> _Shard:
        shard = self._shards[i]
        if shard is None:
            shard = _Shard(os.path.join(self.path, self._entries[i]["file"]), self._entries[i],
                           self._columns, self.verify)
            self._shards[i] = shard
        return shard

    def _columns_of(self, i: int) -> Dict[str, np.ndarray]:
        """Memory-mapped columns of shard ``i``; at most ``max_open_shards`` maps stay open (LRU)."""
        with self._lock:
            cols = self._open.get(i)
            if cols is not None:
                self._open.move_to_end(i)
                return cols
        cols = self._shard(i).open()  # outside the lock; a racing duplicate map is harmless
        with self._lock:
            self._open[i] = cols
            self._open.move_to_end(i)
            while len(self._open) > self.max_open_shards:
                self._open.popitem(last=False)  # readers holding its arrays keep the map alive
        return cols

    def bytes_per_example(self) -> float:
        """Bytes on disk per example (shard files including headers and padding; 0 if empty)."""
        return sum(s["nbytes"] for s in self._entries) / self._len if self._len else 0.0

    def column_bytes_per_example(self) -> int:
        """Bytes of column data per example (the payload, without headers or padding)."""
        return sum(d.itemsize * int(np.prod(shape, dtype=np.int64)) for d, shape in self._specs.values())

    # -- reading

    def read(self, indices: Union[Sequence[int], np.ndarray]) -> TrainingExamples:
        """Examples at ``indices`` (any order, repeats allowed), in that order, as one batch.

        One vectorized gather per (shard, column): indices are grouped by shard and sorted within it
        for sequential access, then scattered back to the requested order.
        """
        idx = check_indices(indices, self._len, "a feature log")
        out = {name: np.empty((len(idx),) + shape, dtype) for name, (dtype, shape) in self._specs.items()}
        if len(idx):
            order = np.argsort(idx, kind="stable")
            sorted_idx = idx[order]
            shard_of = np.searchsorted(self.shard_starts, sorted_idx, side="right") - 1
            cuts = np.flatnonzero(np.diff(shard_of)) + 1
            for lo, hi in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(idx)]])):
                s = int(shard_of[lo])
                local = sorted_idx[lo:hi] - self.shard_starts[s]
                dest = order[lo:hi]
                cols = self._columns_of(s)
                contiguous = bool(np.all(np.diff(local) == 1))
                for name, target in out.items():
                    src = cols[name]
                    target[dest] = src[local[0]:local[-1] + 1] if contiguous else src[local]
        return TrainingExamples.from_columns(out)

    def read_range(self, start: int, stop: int) -> TrainingExamples:
        """Examples ``[start, stop)`` in order."""
        return self.read(np.arange(start, stop, dtype=np.int64))

    def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
        """One example as ``{column: array of the per-example shape}`` (copies, not views)."""
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"index: expected an int, got {type(index).__name__}; use read() for many")
        batch = self.read(np.array([index], np.int64)).columns()
        return {name: a[0] for name, a in batch.items()}

    def verify_all(self) -> None:
        """Open every shard and check every CRC-32 (what ``verify="full"`` does at open)."""
        for i in range(self.num_shards):
            self._shard(i).verify_data()

    # -- lifetime

    def close(self) -> None:
        """Drop the memory maps (arrays returned by :meth:`read` stay valid: they are copies).

        A later read maps the shards it needs again."""
        with self._lock:
            self._open.clear()

    def __enter__(self) -> "FeatureLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __reduce__(self):
        # Picklable for multi-process input pipelines: a worker reopens the log lazily.
        return (FeatureLog, (self.path, self.feat, self.sel, "none", self.max_open_shards))

    def __repr__(self) -> str:
        return (f"FeatureLog({self.path!r}, examples={self._len}, shards={self.num_shards}, "
                f"bytes_per_example={self.bytes_per_example():.0f})")
