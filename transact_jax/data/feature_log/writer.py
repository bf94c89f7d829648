"""Writing a feature log: :class:`FeatureLogWriter` and :func:`write_feature_log`.

The format is described in :mod:`transact_jax.data.feature_log`; shards are encoded by
:func:`~transact_jax.data.feature_log.format.encode_shard`.

Atomic replace
==============

A writer never writes into the log directory itself. It writes every shard, then the manifest, into a
private *staging* directory next to it (same parent, so renames are atomic), and :meth:`publish`
swaps the finished directory in:

1. ``os.rename(staging, path)``: done if ``path`` does not exist or is an empty directory;
2. otherwise ``os.rename(path, ".NAME.old-*")`` then ``os.rename(staging, path)``, then the old
   directory is deleted.

So a reader of ``path`` sees the old complete log or the new complete log, never a mix and never a
half-written one, except in the window between the two renames of step 2, when ``path`` is absent
(a reader gets "manifest.json: missing" naming the ``.NAME.old-*`` directory). A writer killed at any
other point leaves the old log untouched. Stale sibling directories of killed writers (named
``.NAME.tmp-HOST-PID-*`` and ``.NAME.old-HOST-PID-*``; HOST is a hash of the host name) are tidied by
the next writer for the same path once their process is gone: a staging directory is deleted; an old
log is deleted when ``path`` exists, and renamed back to ``path`` when it does not (the writer died
inside the window). Directories of live processes or other hosts are left alone; readers ignore them.
"""
from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import socket
import uuid
import zlib
from typing import Any, Dict, List, Optional

import numpy as np

from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.config_json import config_to_dict
from transact_jax.data.feature_log.format import (
    EncodedShard,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    RETIRED_TAG,
    SHARD_SUFFIX,
    STAGING_TAG,
    PathLike,
    _column_table,
    _fsync_dir,
    _write_file,
    encode_shard,
    sibling_prefix,
)
from transact_jax.data.feature_log.reader import FeatureLog
from transact_jax.data.schema import SchemaError, TrainingExamples

_HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"


# ------------------------------------------------------------------------------------ directories

def new_sibling(path: str, tag: str) -> str:
    parent = os.path.dirname(path)
    return os.path.join(parent, f"{sibling_prefix(path, tag)}{_HOST}-{os.getpid()}-"
                                f"{secrets.token_hex(4)}")


def _owner_gone(name: str, prefix: str) -> bool:
    """Whether the writer that made sibling ``name`` (``prefix`` + HOST-PID-RANDOM) is dead."""
    parts = name[len(prefix):].split("-")
    if len(parts) != 3 or parts[0] != _HOST or not parts[1].isdigit():
        return False  # another host, or not ours: leave it
    pid = int(parts[1])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. PermissionError: alive, another user's
        return False
    return False


def tidy_siblings(path: str) -> None:
    """Remove staging directories of dead writers; put back an old log a dead writer had moved aside
    without moving its new log in; remove the other old logs of dead writers (module docstring)."""
    parent = os.path.dirname(path) or "."
    staging, retired = sibling_prefix(path, STAGING_TAG), sibling_prefix(path, RETIRED_TAG)
    try:
        names = sorted(os.listdir(parent))
    except FileNotFoundError:
        return
    for name in names:
        full = os.path.join(parent, name)
        if name.startswith(staging) and _owner_gone(name, staging):
            shutil.rmtree(full, ignore_errors=True)
        elif name.startswith(retired) and _owner_gone(name, retired):
            if not os.path.lexists(path):
                try:
                    os.rename(full, path)
                    continue
                except OSError:
                    pass
            shutil.rmtree(full, ignore_errors=True)


def _is_log_entry(name: str, suffix: str) -> bool:
    """Names a log directory may hold: the manifest, shards (``suffix``), and the temporary files
    that feature log writers of format version 1 left behind when killed."""
    return name == MANIFEST or name.endswith(suffix) or (name.startswith(".") and name.endswith(".tmp"))


def check_replaceable(path: str, overwrite: bool, what: str = "feature log",
                      suffix: str = SHARD_SUFFIX) -> None:
    """Raise unless the directory ``path`` may be replaced: absent, empty, or a log of kind ``what``
    (only with ``overwrite``) holding nothing but its files (it is replaced as a whole)."""
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path):
        raise FileExistsError(f"{path}: exists and is not a directory")
    names = sorted(os.listdir(path))
    if MANIFEST in names and not overwrite:
        raise FileExistsError(f"{os.path.join(path, MANIFEST)}: a {what} already exists here "
                              f"(pass overwrite=True to replace it)")
    foreign = [n for n in names if not _is_log_entry(n, suffix)]
    if foreign:
        raise FileExistsError(f"{os.path.join(path, foreign[0])}: not part of a {what}; the "
                              f"writer replaces the whole directory {path}, so it refuses while "
                              f"other files are in it")


def swap_in(staging: str, path: str) -> None:
    """Move the finished directory ``staging`` to ``path``, replacing what is there (module doc)."""
    parent = os.path.dirname(path) or "."
    retired: Optional[str] = None
    try:
        os.rename(staging, path)  # atomic if path is absent or an empty directory
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        retired = new_sibling(path, RETIRED_TAG)
        os.rename(path, retired)        # the window: path is absent from here ...
        try:
            os.rename(staging, path)    # ... to here
        except BaseException:
            os.rename(retired, path)
            raise
    _fsync_dir(parent)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


# ------------------------------------------------------------------------------------------ writer

class ShardedLogWriter:
    """What every writer of a sharded log directory shares (the atomic replace of the module
    docstring): a private staging directory next to ``path``, shard files written into it, the
    manifest written last by :meth:`finish`, and :meth:`publish` swapping the directory in.
    Subclasses (with ``feat`` and ``sel`` set) add ``write`` and define :meth:`_flush` (write what is
    buffered), :meth:`_columns` and :meth:`_totals` (the manifest's column table and totals);
    ``what``, ``suffix``, ``format_name`` and ``format_version`` name the kind of log, its shard
    files and its manifest's format. Use as a context manager: leaving the ``with`` block with an exception aborts."""

    what = "feature log"
    suffix = SHARD_SUFFIX
    format_name = FORMAT_NAME
    format_version = FORMAT_VERSION

    def __init__(self, path: PathLike, overwrite: bool):
        self.path = os.fspath(path)
        self._target = os.path.realpath(self.path)  # a symlink keeps pointing at the log
        self.overwrite = bool(overwrite)
        os.makedirs(os.path.dirname(self._target), exist_ok=True)
        tidy_siblings(self._target)
        check_replaceable(self._target, self.overwrite, self.what, self.suffix)
        self.log_id = uuid.uuid4().hex
        self.staging_path = new_sibling(self._target, STAGING_TAG)
        os.mkdir(self.staging_path)  # default mode: 0o777 & ~umask
        self._shards: List[Dict[str, Any]] = []
        self._finished = self._closed = False

    def _check_open(self) -> None:
        if self._finished or self._closed:
            raise ValueError(f"{self.path}: write() after finish() or close()")

    def _add_shard(self, shard: EncodedShard, entry: Dict[str, Any]) -> None:
        """Write the encoded shard as the next shard file; its manifest entry is ``entry`` plus the
        file name, size and column CRC-32s."""
        name = f"shard-{len(self._shards):05d}{self.suffix}"
        _write_file(os.path.join(self.staging_path, name), [shard.head, *shard.chunks])
        self._shards.append({"file": name, **entry, "nbytes": shard.nbytes,
                             "crc32": list(shard.crc32)})

    def _flush(self) -> None:
        """Write whatever is still buffered (subclasses)."""

    def _columns(self) -> List[Dict[str, Any]]:
        """The manifest's column table (subclasses)."""
        return []

    def _totals(self) -> Dict[str, int]:
        """The manifest's totals (subclasses)."""
        return {}

    def _manifest(self) -> Dict[str, Any]:
        return {"format": self.format_name, "version": self.format_version, "log_id": self.log_id,
                "feature_config": config_to_dict(self.feat),
                "selection_config": config_to_dict(self.sel),
                "columns": self._columns(), "shards": self._shards, **self._totals()}

    def finish(self) -> None:
        """Write the remaining data and then the manifest into the staging directory; nothing
        becomes visible at ``path`` until :meth:`publish`. Idempotent."""
        if self._finished or self._closed:
            return
        self._flush()
        _write_file(os.path.join(self.staging_path, MANIFEST),
                    [json.dumps(self._manifest(), indent=1).encode()])
        _fsync_dir(self.staging_path)
        self._finished = True

    def publish(self) -> None:
        """Swap the finished log into ``path`` (module docstring), replacing the old log. Idempotent."""
        if self._closed:
            return
        if not self._finished:
            raise ValueError(f"{self.path}: publish() before finish()")
        try:
            check_replaceable(self._target, self.overwrite, self.what, self.suffix)  # again
            swap_in(self.staging_path, self._target)
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def close(self) -> None:
        """:meth:`finish` and :meth:`publish`: the log becomes readable at ``path``. Idempotent."""
        self.finish()
        self.publish()

    def abort(self) -> None:
        """Discard everything written: delete the staging directory; ``path`` is untouched."""
        if self._closed:
            return
        shutil.rmtree(self.staging_path, ignore_errors=True)
        self._shards = []
        self._discard()
        self._closed = True

    def _discard(self) -> None:
        """Forget buffered data (subclasses)."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class FeatureLogWriter(ShardedLogWriter):
    """Writes :class:`TrainingExamples` into a feature log directory (format: the package docstring).

    Examples are validated on :meth:`write`, buffered, and flushed to the staging directory as soon as
    a full shard of ``examples_per_shard`` examples is available. :meth:`close` = :meth:`finish`
    (the last, partial shard, then the manifest) + :meth:`publish` (the atomic swap of the staging
    directory into ``path``, module docstring): only then does the log become visible, replacing any
    old one. Use as a context manager: leaving the ``with`` block with an exception aborts (deletes
    the staging directory; ``path`` is untouched).

    Args:
      path: the log directory; its parent is created if missing. If it exists it must be empty or a
        feature log holding only feature log files; a log is only replaced with ``overwrite=True``.
        The old log stays readable until the new one is published.
      feat, sel: the configs the examples are logged with (stored in the manifest).
      examples_per_shard: examples per shard file (the last shard may hold fewer).

    Attributes:
      path: the log directory, as given.
      log_id: the new log's identity (a random UUID, in the manifest and in every shard header).
      staging_path: the directory being written (a sibling of ``path``).
    """

    def __init__(self, path: PathLike, feat: FeatureConfig, sel: SelectionConfig, *,
                 examples_per_shard: int = 16384, overwrite: bool = False):
        if not isinstance(examples_per_shard, (int, np.integer)) or examples_per_shard <= 0:
            raise ValueError(f"examples_per_shard: must be a positive int, got {examples_per_shard!r}")
        self.feat, self.sel = feat, sel
        self.examples_per_shard = int(examples_per_shard)
        self._buffer: List[TrainingExamples] = []
        self._buffered = 0
        self._num_examples = 0
        super().__init__(path, overwrite)

    @property
    def num_examples(self) -> int:
        """Examples accepted so far (written or buffered)."""
        return self._num_examples + self._buffered

    def write(self, examples: TrainingExamples) -> None:
        """Validate and append ``examples``; full shards are written to disk right away."""
        self._check_open()
        if not isinstance(examples, TrainingExamples):
            raise SchemaError("examples", f"expected TrainingExamples, got {type(examples).__name__}")
        examples.validate(self.feat, self.sel)
        if len(examples) == 0:
            return
        self._buffer.append(examples)
        self._buffered += len(examples)
        if self._buffered >= self.examples_per_shard:
            merged = self._merged()
            full = (self._buffered // self.examples_per_shard) * self.examples_per_shard
            for start in range(0, full, self.examples_per_shard):
                self._write_shard(merged.select(slice(start, start + self.examples_per_shard)))
            rest = merged.select(slice(full, None))
            self._buffer = [rest] if len(rest) else []
            self._buffered = len(rest)

    def _merged(self) -> TrainingExamples:
        return TrainingExamples.concatenate(self._buffer) if len(self._buffer) > 1 else self._buffer[0]

    def _write_shard(self, examples: TrainingExamples) -> None:
        shard = encode_shard(examples, self.feat, self.sel, log_id=self.log_id, index=len(self._shards))
        self._add_shard(shard, {"num_examples": len(examples)})
        self._num_examples += len(examples)

    def _flush(self) -> None:
        if self._buffered:
            self._write_shard(self._merged())
            self._buffer, self._buffered = [], 0

    def _columns(self) -> List[Dict[str, Any]]:
        return _column_table(self.feat, self.sel)

    def _totals(self) -> Dict[str, int]:
        return {"num_examples": self._num_examples}

    def _discard(self) -> None:
        self._buffer, self._buffered, self._num_examples = [], 0, 0


def write_feature_log(path: PathLike, examples: TrainingExamples, feat: FeatureConfig,
                      sel: SelectionConfig, *, examples_per_shard: int = 16384,
                      overwrite: bool = False) -> "FeatureLog":
    """Write ``examples`` as a new feature log (atomically replacing an old one with ``overwrite``)
    and open it."""
    with FeatureLogWriter(path, feat, sel, examples_per_shard=examples_per_shard,
                          overwrite=overwrite) as w:
        w.write(examples)
    return FeatureLog(path, feat, sel)
