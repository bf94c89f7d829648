"""Writing a feature log: :class:`FeatureLogWriter` and :func:`write_feature_log`.

The format is described in :mod:`transact_jax.data.feature_log`; shards are encoded by
:func:`~transact_jax.data.feature_log.format.encode_shard`.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List

import numpy as np

from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.config_json import config_to_dict
from transact_jax.data.feature_log.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    SHARD_SUFFIX,
    PathLike,
    _atomic_write,
    _column_table,
    _fsync_dir,
    encode_shard,
)
from transact_jax.data.feature_log.reader import FeatureLog
from transact_jax.data.schema import SchemaError, TrainingExamples


class FeatureLogWriter:
    """Writes :class:`TrainingExamples` into a feature log directory (format: the package docstring).

    Examples are validated on :meth:`write`, buffered, and flushed as soon as a full shard of
    ``examples_per_shard`` examples is available; :meth:`close` writes the last (partial) shard and
    then the manifest, which makes the log visible. Use as a context manager: leaving the ``with``
    block with an exception aborts (removes this writer's shards, writes no manifest).

    Args:
      path: the log directory; created if missing. It must not already hold a log (a
        ``manifest.json``) unless ``overwrite=True``, which first removes the old manifest and shards.
      feat, sel: the configs the examples are logged with (stored in the manifest).
      examples_per_shard: examples per shard file (the last shard may hold fewer).
    """

    def __init__(self, path: PathLike, feat: FeatureConfig, sel: SelectionConfig, *,
                 examples_per_shard: int = 16384, overwrite: bool = False):
        if not isinstance(examples_per_shard, (int, np.integer)) or examples_per_shard <= 0:
            raise ValueError(f"examples_per_shard: must be a positive int, got {examples_per_shard!r}")
        self.path = os.fspath(path)
        self.feat, self.sel = feat, sel
        self.examples_per_shard = int(examples_per_shard)
        os.makedirs(self.path, exist_ok=True)
        manifest = os.path.join(self.path, MANIFEST)
        if os.path.exists(manifest):
            if not overwrite:
                raise FileExistsError(f"{manifest}: a feature log already exists here "
                                      f"(pass overwrite=True to replace it)")
            self._remove_old_log(manifest)
        self._buffer: List[TrainingExamples] = []
        self._buffered = 0
        self._shards: List[Dict[str, Any]] = []
        self._num_examples = 0
        self._closed = False

    def _remove_old_log(self, manifest: str) -> None:
        try:
            with open(manifest) as f:
                old = [s["file"] for s in json.load(f).get("shards", [])]
        except (OSError, ValueError, TypeError, KeyError):
            old = []
        os.unlink(manifest)  # the old log disappears atomically, then its shards go
        _fsync_dir(self.path)
        for name in old:
            if os.path.basename(name) == name and name.endswith(SHARD_SUFFIX):
                try:
                    os.unlink(os.path.join(self.path, name))
                except FileNotFoundError:
                    pass

    @property
    def num_examples(self) -> int:
        """Examples accepted so far (written or buffered)."""
        return self._num_examples + self._buffered

    def write(self, examples: TrainingExamples) -> None:
        """Validate and append ``examples``; full shards are written to disk right away."""
        if self._closed:
            raise ValueError(f"{self.path}: write() on a closed FeatureLogWriter")
        if not isinstance(examples, TrainingExamples):
            raise SchemaError("examples", f"expected TrainingExamples, got {type(examples).__name__}")
        examples.validate(self.feat, self.sel)
        if len(examples) == 0:
            return
        self._buffer.append(examples)
        self._buffered += len(examples)
        if self._buffered >= self.examples_per_shard:
            merged = TrainingExamples.concatenate(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
            full = (self._buffered // self.examples_per_shard) * self.examples_per_shard
            for start in range(0, full, self.examples_per_shard):
                self._write_shard(merged.select(slice(start, start + self.examples_per_shard)))
            rest = merged.select(slice(full, None))
            self._buffer = [rest] if len(rest) else []
            self._buffered = len(rest)

    def _write_shard(self, examples: TrainingExamples) -> None:
        name = f"shard-{len(self._shards):05d}{SHARD_SUFFIX}"
        head, chunks = encode_shard(examples, self.feat, self.sel)
        _atomic_write(os.path.join(self.path, name), [head, *chunks])
        nbytes = len(head) + sum(len(c) if isinstance(c, bytes) else c.nbytes for c in chunks)
        self._shards.append({"file": name, "num_examples": len(examples), "nbytes": nbytes})
        self._num_examples += len(examples)

    def close(self) -> None:
        """Write the remaining examples and the manifest; the log becomes readable. Idempotent."""
        if self._closed:
            return
        if self._buffered:
            merged = TrainingExamples.concatenate(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
            self._write_shard(merged)
            self._buffer, self._buffered = [], 0
        _fsync_dir(self.path)
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "feature_config": config_to_dict(self.feat),
            "selection_config": config_to_dict(self.sel),
            "columns": _column_table(self.feat, self.sel),
            "shards": self._shards,
            "num_examples": self._num_examples,
        }
        _atomic_write(os.path.join(self.path, MANIFEST), [json.dumps(manifest, indent=1).encode()])
        _fsync_dir(self.path)
        self._closed = True

    def abort(self) -> None:
        """Discard everything: remove the shards this writer wrote, write no manifest."""
        for shard in self._shards:
            try:
                os.unlink(os.path.join(self.path, shard["file"]))
            except FileNotFoundError:
                pass
        self._shards, self._buffer, self._buffered, self._num_examples = [], [], 0, 0
        self._closed = True

    def __enter__(self) -> "FeatureLogWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_feature_log(path: PathLike, examples: TrainingExamples, feat: FeatureConfig,
                      sel: SelectionConfig, *, examples_per_shard: int = 16384,
                      overwrite: bool = False) -> "FeatureLog":
    """Write ``examples`` as a new feature log and open it."""
    with FeatureLogWriter(path, feat, sel, examples_per_shard=examples_per_shard,
                          overwrite=overwrite) as w:
        w.write(examples)
    return FeatureLog(path, feat, sel)
