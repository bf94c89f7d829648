"""On-disk storage of logged NN features: the *feature log* (paper §3.4.1, SPEC §2).

Training reads logged S_all (|S_all| tokens per example, O(1) in the sequence length) instead of the
users' full sequences. :class:`FeatureLogWriter` stores :class:`~transact_jax.data.schema.TrainingExamples`
(or runs the NN selection on labelled requests first, :meth:`FeatureLogWriter.write_requests`);
:class:`FeatureLog` reads them back with O(1) random access through memory maps.

Format (version 1)
==================

A feature log is a directory::

    my_log/
      manifest.json        # written last; without it the directory holds no log
      shard-00000.tfl      # examples [0, n_0)
      shard-00001.tfl      # examples [n_0, n_0 + n_1)
      shard-NNNNN.tfl      # one file per shard, in example order

``manifest.json`` is a UTF-8 JSON object:

* ``"format"``: ``"transact-jax feature log"``; ``"version"``: ``1``.
* ``"feature_config"`` / ``"selection_config"``: ``dataclasses.asdict`` of the
  :class:`~transact_jax.config.FeatureConfig` / :class:`~transact_jax.config.SelectionConfig` the
  examples were logged with (tuples become lists).
* ``"columns"``: ``[{"name", "dtype", "shape"}, ...]``, one per column of
  ``TrainingExamples.column_specs(feat, sel)``, in that order. ``name`` is the flat column name of
  ``TrainingExamples.columns()`` (e.g. ``"s_all.embeddings"``, ``"labels"``), ``dtype`` numpy's
  little-endian type string (``"<i8"``, ``"|i1"``, ``"|b1"``, ``"<f4"``, ...), ``shape`` the
  per-example shape (a list; ``[]`` for a scalar per example).
* ``"shards"``: ``[{"file", "num_examples", "nbytes"}, ...]`` in example order: the file name
  (relative to the directory), how many examples it holds and its exact size in bytes. Global example
  ``i`` lives in the first shard whose cumulative count exceeds ``i``.
* ``"num_examples"``: the total.

A shard file (``*.tfl``; all integers little-endian):

=========  ========  ==============================================================================
offset     size      content
=========  ========  ==============================================================================
0          8         magic ``b"TJXFLOG\\x00"``
8          4 (u32)   format version, ``1``
12         4 (u32)   header length ``H`` in bytes
16         4 (u32)   CRC-32 (``zlib.crc32``) of the ``H`` header bytes
20         4 (u32)   reserved, ``0``
24         ``H``     UTF-8 JSON header: ``{"num_examples": n, "nbytes": <file size>, "columns":
                     [{"name", "dtype", "shape", "offset", "nbytes", "crc32"}, ...]}``
...                  column data
=========  ========  ==============================================================================

Each column is the C-order array of shape ``(n, *shape)`` stored raw at ``offset`` (absolute, a
multiple of 64), ``nbytes = n * prod(shape) * itemsize`` long; ``crc32`` is ``zlib.crc32`` of those
bytes. Columns follow the manifest's order, zero padding fills the gaps, and the file ends right after
the last column. So any column is one memory map away::

    np.memmap(shard_path, dtype=col["dtype"], mode="r", offset=col["offset"],
              shape=(n, *col["shape"]))

Writing is crash-safe: every shard and the manifest are written to a temporary file in the same
directory, flushed, fsync'ed and moved into place with ``os.replace``; the manifest comes last. A
reader only opens files the manifest lists and checks their sizes, so a writer killed at any point
leaves either the previous state or a directory with no (new) manifest, never a half-written shard
that is accepted.

Verification when opening (``verify=``): ``"header"`` (default) checks the manifest, every shard's
magic, version, header CRC, column layout against the manifest and file size; ``"full"`` also checks
every column's CRC-32 (reads all data once); ``"none"`` opens shards lazily on first access, checking
only what is needed to read them safely (magic, layout, bounds). Problems raise :class:`FeatureLogError`
naming the file and what is wrong; a config that differs from the one given raises
:class:`~transact_jax.data.schema.SchemaError` naming the config field.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import struct
import tempfile
import threading
import zlib
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data.schema import RequestBatch, SchemaError, TrainingExamples

FORMAT_NAME = "transact-jax feature log"
FORMAT_VERSION = 1
MAGIC = b"TJXFLOG\x00"
MANIFEST = "manifest.json"
ALIGN = 64
SHARD_SUFFIX = ".tfl"
_PREFIX = struct.Struct("<8sIIII")  # magic, version, header length, header crc32, reserved
VERIFY_MODES = ("none", "header", "full")

PathLike = Union[str, os.PathLike]


class FeatureLogError(SchemaError):
    """A feature log file is missing, truncated or corrupt; ``field`` is the file's path."""


# ------------------------------------------------------------------------------------------ helpers

def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _le(dtype: np.dtype) -> np.dtype:
    """The little-endian form of ``dtype`` (no-op for 1-byte types and on little-endian hosts)."""
    dtype = np.dtype(dtype)
    return dtype if dtype.itemsize == 1 else dtype.newbyteorder("<")


def _column_table(feat: FeatureConfig, sel: SelectionConfig) -> List[Dict[str, Any]]:
    """The manifest's ``"columns"`` list for these configs."""
    return [{"name": name, "dtype": _le(dtype).str, "shape": list(shape)}
            for name, (dtype, shape) in TrainingExamples.column_specs(feat, sel).items()]


def _config_to_json(cfg) -> Dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _config_from_json(cls, data: Any, where: str, key: str):
    """Rebuild a frozen config dataclass from its JSON form (lists back to tuples)."""
    if not isinstance(data, dict):
        raise FeatureLogError(where, f"{key!r} must be a JSON object")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise FeatureLogError(where, f"{key!r} has fields this version does not know: {unknown}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise FeatureLogError(where, f"{key!r} is not a valid {cls.__name__}: {e}") from e


def _check_config(stored, given, prefix: str, log_path: str) -> None:
    """Raise SchemaError naming the first field where ``given`` differs from the stored config."""
    if given is None:
        return
    if type(given) is not type(stored):
        raise SchemaError(prefix, f"expected a {type(stored).__name__}, got {type(given).__name__}")
    for f in dataclasses.fields(stored):
        want, got = getattr(stored, f.name), getattr(given, f.name)
        if want != got:
            raise SchemaError(f"{prefix}.{f.name}", f"the feature log {log_path} was written with "
                              f"{want!r}, but {got!r} was given")


def _atomic_write(path: str, chunks: Sequence) -> None:
    """Write ``chunks`` (bytes-like) to ``path`` via a temp file + fsync + ``os.replace``."""
    directory, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def encode_shard(examples: TrainingExamples, feat: FeatureConfig, sel: SelectionConfig
                 ) -> Tuple[bytes, List[Any]]:
    """Serialize one shard: returns (prefix + header + padding, [column buffers and paddings])."""
    n = len(examples)
    cols = examples.columns()
    arrays, entries = [], []
    for spec in _column_table(feat, sel):
        a = np.ascontiguousarray(cols[spec["name"]], dtype=np.dtype(spec["dtype"]))
        a = a.reshape(-1).view(np.uint8)  # raw bytes (buffer protocol, no copy)
        arrays.append(a)
        entries.append({**spec, "offset": 0, "nbytes": int(a.nbytes), "crc32": zlib.crc32(a)})
    # Offsets depend on the header length and vice versa: iterate to the fixed point (2-3 rounds).
    data_start = _align(_PREFIX.size)
    while True:
        offset = data_start
        for e in entries:
            e["offset"] = offset
            offset = _align(offset + e["nbytes"])
        end = entries[-1]["offset"] + entries[-1]["nbytes"]
        header = json.dumps({"num_examples": n, "nbytes": end, "columns": entries},
                            separators=(",", ":")).encode()
        needed = _align(_PREFIX.size + len(header))
        if needed <= data_start:
            break
        data_start = needed
    head = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header), zlib.crc32(header), 0) + header
    head += b"\x00" * (data_start - len(head))
    chunks: List[Any] = []
    pos = data_start
    for e, a in zip(entries, arrays):
        if e["offset"] > pos:
            chunks.append(b"\x00" * (e["offset"] - pos))
        chunks.append(a)
        pos = e["offset"] + e["nbytes"]
    return head, chunks


# ------------------------------------------------------------------------------------------ writer

class FeatureLogWriter:
    """Writes :class:`TrainingExamples` into a feature log directory (format: module docstring).

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

    def write_requests(self, requests: RequestBatch) -> int:
        """Run NN feature logging on labelled ``requests`` and write the examples; returns how many."""
        from transact_jax.data.features import log_nn_features
        examples = log_nn_features(requests, self.feat, self.sel)
        self.write(examples)
        return len(examples)

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
            "feature_config": _config_to_json(self.feat),
            "selection_config": _config_to_json(self.sel),
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


# ------------------------------------------------------------------------------------------ reader

class _Shard:
    """One shard's checked layout; :meth:`open` memory-maps it, :meth:`verify_data` checks CRCs.

    The header is read with ordinary file I/O, so checking a shard keeps no file or map open.
    """

    def __init__(self, path: str, entry: Mapping[str, Any], columns: Sequence[Mapping[str, Any]],
                 verify: str):
        self.path = path
        self.num_examples = n = int(entry["num_examples"])
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                prefix = f.read(_PREFIX.size)
                if len(prefix) < _PREFIX.size:
                    raise FeatureLogError(path, f"truncated: {size} bytes, shorter than the "
                                          f"{_PREFIX.size}-byte shard prefix")
                magic, version, hlen, hcrc, _ = _PREFIX.unpack(prefix)
                if magic != MAGIC:
                    raise FeatureLogError(path, f"bad magic {magic!r}: not a feature log shard")
                if version != FORMAT_VERSION:
                    raise FeatureLogError(path, f"shard format version {version}, this reader "
                                          f"knows {FORMAT_VERSION}")
                header_bytes = f.read(hlen)
        except OSError as e:
            raise FeatureLogError(path, f"cannot open shard listed in the manifest: {e}") from e
        if verify != "none" and size != entry["nbytes"]:
            what = "truncated" if size < entry["nbytes"] else "has trailing bytes"
            raise FeatureLogError(path, f"{what}: file has {size} bytes, the manifest says "
                                  f"{entry['nbytes']}")
        if len(header_bytes) < hlen:
            raise FeatureLogError(path, f"truncated: the {hlen}-byte header runs past the end of "
                                  f"the {size}-byte file")
        if verify != "none" and zlib.crc32(header_bytes) != hcrc:
            raise FeatureLogError(path, "corrupt header: CRC-32 mismatch")
        try:
            header = json.loads(header_bytes)
            stored = {c["name"]: c for c in header["columns"]}
            header_n = int(header["num_examples"])
        except (ValueError, TypeError, KeyError) as e:
            raise FeatureLogError(path, f"corrupt header: {e}") from e
        if header_n != n:
            raise FeatureLogError(path, f"header says {header_n} examples, the manifest says {n}")
        if verify != "none" and header.get("nbytes") != size:
            raise FeatureLogError(path, f"header says the file has {header.get('nbytes')} bytes, "
                                  f"it has {size}")
        # name -> (dtype, shape, offset, nbytes, crc32)
        self.layout: Dict[str, Tuple[np.dtype, Tuple[int, ...], int, int, int]] = {}
        for spec in columns:
            name = spec["name"]
            c = stored.get(name)
            if c is None:
                raise FeatureLogError(path, f"column {name!r} is missing")
            if c.get("dtype") != spec["dtype"] or list(c.get("shape", ())) != list(spec["shape"]):
                raise FeatureLogError(path, f"column {name!r} is {c.get('dtype')} "
                                      f"{c.get('shape')}, the manifest says {spec['dtype']} "
                                      f"{spec['shape']}")
            dtype = np.dtype(spec["dtype"])
            shape = (n,) + tuple(spec["shape"])
            try:
                offset, nbytes, crc = int(c["offset"]), int(c["nbytes"]), int(c["crc32"])
            except (KeyError, TypeError, ValueError) as e:
                raise FeatureLogError(path, f"corrupt header: column {name!r}: {e}") from e
            expect = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if nbytes != expect:
                raise FeatureLogError(path, f"column {name!r} has {nbytes} bytes, {shape} of "
                                      f"{dtype} needs {expect}")
            if offset % ALIGN or offset < _PREFIX.size + hlen:
                raise FeatureLogError(path, f"column {name!r} has a bad offset {offset}")
            if offset + nbytes > size:
                raise FeatureLogError(path, f"truncated: column {name!r} ends at byte "
                                      f"{offset + nbytes}, the file has {size}")
            self.layout[name] = (dtype, shape, offset, nbytes, crc)

    def open(self) -> Dict[str, np.ndarray]:
        """Memory-map the shard: ``{column: read-only (n, *shape) array view}``."""
        try:
            raw = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise FeatureLogError(self.path, f"cannot memory-map: {e}") from e
        end = max(off + nb for _, _, off, nb, _ in self.layout.values())
        if raw.size < end:  # changed on disk since the header was checked
            raise FeatureLogError(self.path, f"truncated: {raw.size} bytes, the columns need {end}")
        return {name: raw[off:off + nb].view(dtype).reshape(shape)
                for name, (dtype, shape, off, nb, _) in self.layout.items()}

    def verify_data(self) -> None:
        """Check every column's CRC-32 (reads the whole file once)."""
        step = 1 << 24
        with open(self.path, "rb") as f:
            for name, (_, _, offset, nbytes, crc) in self.layout.items():
                f.seek(offset)
                got, left = 0, nbytes
                while left:
                    chunk = f.read(min(step, left))
                    if not chunk:
                        raise FeatureLogError(self.path, f"truncated inside column {name!r}")
                    got = zlib.crc32(chunk, got)
                    left -= len(chunk)
                if got != crc:
                    raise FeatureLogError(self.path, f"corrupt data: CRC-32 mismatch in column "
                                          f"{name!r}")


class FeatureLog:
    """Read-only, random-access view of a feature log directory (format: module docstring).

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
        self.feat = _config_from_json(FeatureConfig, manifest.get("feature_config"), manifest_path,
                                      "feature_config")
        self.sel = _config_from_json(SelectionConfig, manifest.get("selection_config"),
                                     manifest_path, "selection_config")
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

    def _normalize(self, indices) -> np.ndarray:
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise TypeError(f"indices: expected a 1-D integer array, got {idx.dtype} {idx.shape}")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < -self._len or idx.max() >= self._len):
            bad = idx[(idx < -self._len) | (idx >= self._len)][0]
            raise IndexError(f"indices: {bad} out of range for a feature log of {self._len} examples")
        return np.where(idx < 0, idx + self._len, idx)

    def read(self, indices: Union[Sequence[int], np.ndarray]) -> TrainingExamples:
        """Examples at ``indices`` (any order, repeats allowed), in that order, as one batch.

        One vectorized gather per (shard, column): indices are grouped by shard and sorted within it
        for sequential access, then scattered back to the requested order.
        """
        idx = self._normalize(indices)
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
