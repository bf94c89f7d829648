"""Reading a feature log: :class:`FeatureLog`, random access through memory-mapped shards.

The format is described in :mod:`transact_jax.data.feature_log`; each shard's header is checked by
:class:`~transact_jax.data.feature_log.format._Shard`, its data against the manifest's CRC-32s the
first time it is read (:meth:`FeatureLog.read`), and every batch read for values no
:class:`~transact_jax.data.feature_log.FeatureLogWriter` writes (:func:`value_breaches`).
"""
from __future__ import annotations

import json
import os
from typing import Dict, Iterator, List, Optional, Sequence, Union

import numpy as np

from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data import request_rules as rules
from transact_jax.data.feature_log.format import (
    FEATURE_LOG,
    FORMAT_NAME,
    RETIRED_TAG,
    VERIFY_MODES,
    FeatureLogError,
    PathLike,
    MappedLog,
    ShardMaps,
    _Shard,
    _column_table,
    load_manifest,
    sibling_prefix,
)
from transact_jax.data.schema import TrainingExamples
from transact_jax.data.source import check_indices

_BOOL_COLUMNS = ("s_all_mask", "nal_target_mask", "nal_negative_mask")


def value_breaches(batch: TrainingExamples, feat: FeatureConfig) -> Iterator[rules.Breach]:
    """Values of ``batch`` that no writer stores, found with cheap vectorized min/max passes.

    The content rules of :mod:`~transact_jax.data.request_rules` for S_all tokens (action bits,
    surface ids, int8 codes) and candidates (embedding codes, finite ``dense``, ``categorical`` ids in
    their vocabularies, 0/1 ``labels``), the negatives' codes, and bool columns holding bytes other
    than 0 and 1. Ids and timestamps have no domain to check. The padding rules of
    ``TrainingExamples.validate`` are not re-checked (they need more than a min/max pass).
    """
    yield from rules.token_breaches("s_all", batch.s_all, feat)
    yield from rules.candidate_breaches(feat, ("candidate_embedding", batch.candidate_embedding),
                                        batch.dense, batch.categorical, batch.labels)
    codes = rules.code_breach("nal_negatives", batch.nal_negatives, "example")
    if codes is not None:
        yield codes
    for name in _BOOL_COLUMNS:
        raw = getattr(batch, name).view(np.uint8)
        if raw.size and int(raw.max()) > 1:
            flat = raw.reshape(len(raw), -1)
            rows = np.flatnonzero((flat > 1).any(axis=1))
            yield rules.Breach(name, rows, flat[rows].max(axis=1), "byte {value} is not a bool (0 or 1)",
                               (len(raw),), "example")


def _example_of(breach: rules.Breach) -> int:
    """The batch row (example) of a breach's first offending row."""
    return int(np.unravel_index(int(breach.rows[0]), breach.shape)[0])


class FeatureLog(MappedLog):
    """Read-only, random-access view of a feature log directory (format: the package docstring).

    Args:
      path: the log directory.
      feat, sel: the configs the caller expects; ``None`` accepts the stored ones. A difference raises
        :class:`SchemaError` naming the field (e.g. ``"selection_config.k_ll"``).
      verify: ``"header"`` (default): every shard header at open, each shard's data CRC-32s the first
        time it is read, and the values of every batch read; ``"full"``: like ``"header"`` but all
        data CRC-32s at open; ``"none"``: shards opened lazily with only the checks needed to read
        them safely (layout, bounds, identity), no CRCs, no value checks (package docstring).
      max_open_shards: memory maps kept open at once (least recently used ones are closed), which
        bounds file descriptors for logs with many shards.

    Attributes:
      feat, sel: the stored configs.
      log_id: the log's identity (the manifest's ``log_id``, repeated in every shard header).
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
        m = load_manifest(self.path, FORMAT_NAME, FEATURE_LOG,
                          lambda: _missing_manifest(self.path), feat, sel)
        manifest, manifest_path, self.log_id, self.feat, self.sel = m.data, m.path, m.log_id, m.feat, m.sel
        self._columns = _column_table(self.feat, self.sel)
        if manifest.get("columns") != self._columns:
            raise FeatureLogError(manifest_path, "column table does not match the stored configs")
        try:
            self._entries = [{"file": str(s["file"]), "num_examples": int(s["num_examples"]),
                              "nbytes": int(s["nbytes"]), "crc32": [int(c) for c in s["crc32"]]}
                             for s in manifest["shards"]]
        except (KeyError, TypeError, ValueError) as e:
            raise FeatureLogError(manifest_path, f"bad shard list: {e}") from e
        for s in self._entries:
            if (os.path.basename(s["file"]) != s["file"] or s["num_examples"] <= 0
                    or len(s["crc32"]) != len(self._columns)):
                raise FeatureLogError(manifest_path, f"bad shard entry {s}")
        self.shard_sizes = np.array([s["num_examples"] for s in self._entries], np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(self.shard_sizes)]).astype(np.int64)
        self._len = int(self.shard_starts[-1])
        if manifest.get("num_examples") != self._len:
            raise FeatureLogError(manifest_path, f"num_examples {manifest.get('num_examples')} != "
                                  f"sum over shards {self._len}")
        self._specs = TrainingExamples.column_specs(self.feat, self.sel)
        self.max_open_shards = int(max_open_shards)
        self._maps = ShardMaps(lambda i: _Shard(os.path.join(self.path, self._entries[i]["file"]),
                                                self._entries[i], self._columns, verify, self.log_id, i),
                               len(self._entries), verify, self.max_open_shards)
        if verify != "none":
            for i in range(len(self._entries)):
                self._maps.shard(i)
        if verify == "full":
            self.verify_all()

    # -- structure

    def __len__(self) -> int:
        return self._len

    @property
    def num_shards(self) -> int:
        return len(self._entries)

    @property
    def shard_files(self) -> List[str]:
        return [os.path.join(self.path, s["file"]) for s in self._entries]

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
        for sequential access, then scattered back to the requested order. Unless ``verify="none"``,
        a shard's data is checked against its CRC-32s the first time it is read, and the batch's
        values by :func:`value_breaches`: a bad one raises :class:`FeatureLogError` naming the shard
        file, the column and the example.
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
                cols = self._maps.columns(s)
                contiguous = bool(np.all(np.diff(local) == 1))
                for name, target in out.items():
                    src = cols[name]
                    target[dest] = src[local[0]:local[-1] + 1] if contiguous else src[local]
        batch = TrainingExamples.from_columns(out)
        if self.verify != "none":
            for breach in value_breaches(batch, self.feat):
                self._raise_bad_value(breach, int(idx[_example_of(breach)]))
        return batch

    def _raise_bad_value(self, breach: rules.Breach, example: int) -> None:
        s = int(np.searchsorted(self.shard_starts, example, side="right") - 1)
        raise FeatureLogError(self.shard_files[s], f"column {breach.field!r}: {breach.text(0)} (example "
                              f"{example - int(self.shard_starts[s])} of this shard, {example} of the "
                              f"log): no FeatureLogWriter writes this value, the shard is corrupt")

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
        """Check every shard's data against the manifest's CRC-32s (what ``verify="full"`` does at
        open), even if already checked."""
        for i in range(self.num_shards):
            self._maps.verify(i, again=True)

    def __repr__(self) -> str:
        # the identity is part of it: grain matches the data source of a saved iterator state by
        # repr, so resuming on a log regenerated at the same path is refused, not silently mixed
        return (f"FeatureLog({self.path!r}, log_id={self.log_id}, examples={self._len}, "
                f"shards={self.num_shards}, bytes_per_example={self.bytes_per_example():.0f})")


def _missing_manifest(path: str) -> str:
    """Why there is no manifest at ``path``, naming an old log a killed writer moved aside."""
    parent = os.path.dirname(os.path.normpath(path)) or "."
    prefix = sibling_prefix(path, RETIRED_TAG)
    try:
        retired = sorted(n for n in os.listdir(parent) if n.startswith(prefix))
    except OSError:
        retired = []
    if retired and not os.path.lexists(path):
        return (f"missing: a writer is replacing this log, or was killed while doing so; the old log "
                f"is in {os.path.join(parent, retired[-1])} (the next FeatureLogWriter for this "
                f"path moves it back)")
    return "missing: no feature log here (a writer that never finished leaves no manifest)"
