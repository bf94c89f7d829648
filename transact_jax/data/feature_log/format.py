"""The on-disk format of a feature log (described in :mod:`transact_jax.data.feature_log`).

Constants, the shard encoding (:func:`encode_shard`) and its checked decoding (:class:`_Shard`: prefix,
header, identity, column layout, CRC-32s), the manifest's column table and stored configs, and the
durable file writes (:func:`_write_file`, :func:`_fsync_dir`) the writer uses.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import struct
import threading
import zlib
from typing import Any, BinaryIO, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.config_json import ConfigError, config_from_dict
from transact_jax.data.schema import SchemaError, TrainingExamples

FORMAT_NAME = "transact-jax feature log"
FORMAT_VERSION = 2
MAGIC = b"TJXFLOG\x00"
MANIFEST = "manifest.json"
ALIGN = 64
SHARD_SUFFIX = ".tfl"
_PREFIX = struct.Struct("<8sIIII")  # magic, version, header length, header crc32, reserved
VERIFY_MODES = ("none", "header", "full")
STAGING_TAG, RETIRED_TAG = "tmp", "old"  # sibling directories of a log being replaced
_VERIFY_CHUNK = 1 << 22  # bytes read per zlib.crc32 call when verifying data

PathLike = Union[str, os.PathLike]


class FeatureLogError(SchemaError):
    """A feature log file is missing, truncated or corrupt; ``field`` is the file's path."""


def sibling_prefix(path: str, tag: str) -> str:
    """``.NAME.<tag>-``: the name prefix of the staging (``tag=STAGING_TAG``) or retired
    (``RETIRED_TAG``) sibling directories of the log directory ``path`` (:mod:`.writer`)."""
    return f".{os.path.basename(os.path.normpath(path))}.{tag}-"


@dataclasses.dataclass(frozen=True)
class ShardFormat:
    """What tells one kind of columnar log apart (the feature log; the request log of
    :mod:`transact_jax.data.request_log` shares this shard encoding): its name in messages, the
    shard magic and format version, how to get a log of this version, and its error class."""

    what: str
    magic: bytes
    version: int
    regenerate: str
    error: type

    def version_problem(self, found: Any) -> str:
        """The message for a manifest or shard of another format version."""
        return (f"format version {found!r}, but this transact-jax reads {self.what}s of version "
                f"{self.version} only: {self.regenerate}")


FEATURE_LOG = ShardFormat("feature log", MAGIC, FORMAT_VERSION,
                          "regenerate the log with this version (e.g. python -m transact_jax "
                          "generate / data, or FeatureLogWriter)", FeatureLogError)


def version_problem(found: Any) -> str:
    """The message for a feature log manifest or shard of another format version."""
    return FEATURE_LOG.version_problem(found)


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


def _stored_config(cls, manifest: Mapping[str, Any], key: str, manifest_path: str,
                   error: type = FeatureLogError):
    """The config stored under ``key``; a bad one raises ``error`` naming the manifest and the
    config field (``"selection_config.k_ll: ..."``)."""
    try:
        return config_from_dict(cls, manifest.get(key), key)
    except ConfigError as e:
        raise error(manifest_path, f"{e.field}: {e.problem}") from e


def _check_config(stored, given, prefix: str, log_path: str) -> None:
    """Raise SchemaError naming the first field where ``given`` differs from the stored config."""
    if given is None:
        return
    if type(given) is not type(stored):
        raise SchemaError(prefix, f"expected a {type(stored).__name__}, got {type(given).__name__}")
    for f in dataclasses.fields(stored):
        want, got = getattr(stored, f.name), getattr(given, f.name)
        if want != got:
            raise SchemaError(f"{prefix}.{f.name}", f"the log {log_path} was written with "
                              f"{want!r}, but {got!r} was given")


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A log's checked manifest: its file ``path``, the parsed ``data``, the ``log_id`` and the
    stored configs."""

    path: str
    data: Dict[str, Any]
    log_id: str
    feat: FeatureConfig
    sel: SelectionConfig


def load_manifest(log_path: str, format_name: str, fmt: ShardFormat, missing: Callable[[], str],
                  feat: Optional[FeatureConfig] = None,
                  sel: Optional[SelectionConfig] = None) -> Manifest:
    """Read and check ``log_path``'s manifest: JSON, ``format_name``, ``fmt``'s version, a log id,
    the stored configs (equal to ``feat`` / ``sel`` where given, else a SchemaError names the
    field). ``missing()``: the message when there is no manifest."""
    manifest_path = os.path.join(log_path, MANIFEST)
    err = fmt.error
    try:
        with open(manifest_path, "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError as e:
        raise err(manifest_path, missing()) from e
    except ValueError as e:
        raise err(manifest_path, f"not valid JSON: {e}") from e
    if not isinstance(data, dict) or data.get("format") != format_name:
        raise err(manifest_path, f"not a {fmt.what} manifest (format != {format_name!r})")
    if data.get("version") != fmt.version:
        raise err(manifest_path, fmt.version_problem(data.get("version")))
    log_id = data.get("log_id")
    if not isinstance(log_id, str) or not log_id:
        raise err(manifest_path, f"bad log_id {log_id!r}")
    stored_feat = _stored_config(FeatureConfig, data, "feature_config", manifest_path, err)
    stored_sel = _stored_config(SelectionConfig, data, "selection_config", manifest_path, err)
    _check_config(stored_feat, feat, "feature_config", log_path)
    _check_config(stored_sel, sel, "selection_config", log_path)
    return Manifest(manifest_path, data, log_id, stored_feat, stored_sel)


def _write_file(path: str, chunks: Sequence) -> None:
    """Create ``path`` (it must not exist), write ``chunks`` (bytes-like) and fsync it.

    Opened with the default mode, so the file gets ``0o666 & ~umask`` like any other new file. The
    writer only writes into its private staging directory, so no temporary name is needed here.
    """
    with open(path, "xb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


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


@dataclasses.dataclass(frozen=True)
class EncodedShard:
    """One serialized shard: write ``head`` then ``chunks``.

    Attributes:
      head: prefix + header + padding up to the first column.
      chunks: column buffers (no-copy ``uint8`` views) and the zero paddings between them.
      crc32: ``zlib.crc32`` of each column, in the manifest's column order (what the manifest stores).
      nbytes: the file size.
    """

    head: bytes
    chunks: Tuple[Any, ...]
    crc32: Tuple[int, ...]
    nbytes: int


def encode_shard(examples: TrainingExamples, feat: FeatureConfig, sel: SelectionConfig, *,
                 log_id: str, index: int) -> EncodedShard:
    """Serialize ``examples`` as shard number ``index`` of the log ``log_id`` (format: package doc)."""
    cols = examples.columns()
    return encode_columns([(spec, cols[spec["name"]]) for spec in _column_table(feat, sel)],
                          {"log_id": log_id, "shard": int(index), "num_examples": len(examples)},
                          FEATURE_LOG)


def encode_columns(columns: Sequence[Tuple[Mapping[str, Any], np.ndarray]], header: Mapping[str, Any],
                   fmt: ShardFormat) -> EncodedShard:
    """Serialize ``(spec, array)`` columns (``spec``: ``name``, little-endian ``dtype``, per-row
    ``shape``; every key is copied into the header's column entry) and the header fields ``header``
    (identity and counts) as one shard of format ``fmt`` (layout: package doc)."""
    arrays, entries = [], []
    for spec, array in columns:
        a = np.ascontiguousarray(array, dtype=np.dtype(spec["dtype"]))
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
        head_json = json.dumps({**header, "nbytes": end, "columns": entries},
                               separators=(",", ":")).encode()
        needed = _align(_PREFIX.size + len(head_json))
        if needed <= data_start:
            break
        data_start = needed
    head = _PREFIX.pack(fmt.magic, fmt.version, len(head_json), zlib.crc32(head_json), 0) + head_json
    head += b"\x00" * (data_start - len(head))
    chunks: List[Any] = []
    pos = data_start
    for e, a in zip(entries, arrays):
        if e["offset"] > pos:
            chunks.append(b"\x00" * (e["offset"] - pos))
        chunks.append(a)
        pos = e["offset"] + e["nbytes"]
    return EncodedShard(head, tuple(chunks), tuple(e["crc32"] for e in entries), end)


# ------------------------------------------------------------------------------------------ decoding

class _Shard:
    """One shard's checked layout; :meth:`open` memory-maps it, :meth:`verify_data` checks CRCs.

    Always checked (they cost nothing once the header is read): magic, version, the header's example
    count, the shard's identity (the manifest's ``log_id`` and its position ``index``) and that every
    column lies inside the file. With ``verify != "none"`` also: the file size, the header CRC and that
    the header's column CRC-32s are the manifest's. :meth:`verify_data` checks the data against the
    manifest's CRC-32s. The header is read with ordinary file I/O, so checking a shard keeps no file or
    map open.
    """

    def __init__(self, path: str, entry: Mapping[str, Any], columns: Sequence[Mapping[str, Any]],
                 verify: str, log_id: str, index: int, fmt: ShardFormat = FEATURE_LOG,
                 rows: Optional[Mapping[str, int]] = None):
        """``fmt``: the kind of log; ``rows``: each column's leading length where it is not the
        shard's ``num_examples`` (the request log's token and candidate columns)."""
        self.path = path
        self.num_examples = n = int(entry["num_examples"])
        err, what = fmt.error, fmt.what
        self._error = err
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                size, self._file_id = st.st_size, (st.st_dev, st.st_ino)
                prefix = f.read(_PREFIX.size)
                if len(prefix) < _PREFIX.size:
                    raise err(path, f"truncated: {size} bytes, shorter than the "
                                          f"{_PREFIX.size}-byte shard prefix")
                magic, version, hlen, hcrc, _ = _PREFIX.unpack(prefix)
                if magic != fmt.magic:
                    raise err(path, f"bad magic {magic!r}: not a {what} shard")
                if version != fmt.version:
                    raise err(path, f"shard {fmt.version_problem(version)}")
                header_bytes = f.read(hlen)
        except OSError as e:
            raise err(path, f"cannot open shard listed in the manifest: {e}") from e
        if verify != "none" and size != entry["nbytes"]:
            what = "truncated" if size < entry["nbytes"] else "has trailing bytes"
            raise err(path, f"{what}: file has {size} bytes, the manifest says "
                                  f"{entry['nbytes']}")
        if len(header_bytes) < hlen:
            raise err(path, f"truncated: the {hlen}-byte header runs past the end of "
                                  f"the {size}-byte file")
        if verify != "none" and zlib.crc32(header_bytes) != hcrc:
            raise err(path, "corrupt header: CRC-32 mismatch")
        try:
            header = json.loads(header_bytes)
            stored = {c["name"]: c for c in header["columns"]}
            header_n = int(header["num_examples"])
        except (ValueError, TypeError, KeyError) as e:
            raise err(path, f"corrupt header: {e}") from e
        if header.get("log_id") != log_id:
            raise err(path, f"belongs to another {what} (log id "
                                  f"{header.get('log_id')!r}, this log's is {log_id!r}): a shard "
                                  f"copied or moved from another log, or the log was replaced "
                                  f"while it was open (open it again)")
        if header.get("shard") != index:
            raise err(path, f"is shard {header.get('shard')!r} of its log, the manifest "
                                  f"lists it as shard {index}")
        if header_n != n:
            raise err(path, f"header says {header_n} examples, the manifest says {n}")
        if verify != "none" and header.get("nbytes") != size:
            raise err(path, f"header says the file has {header.get('nbytes')} bytes, "
                                  f"it has {size}")
        # name -> (dtype, shape, offset, nbytes, crc32 from the manifest)
        self.layout: Dict[str, Tuple[np.dtype, Tuple[int, ...], int, int, int]] = {}
        for spec, crc in zip(columns, entry["crc32"]):
            name = spec["name"]
            c = stored.get(name)
            if c is None:
                raise err(path, f"column {name!r} is missing")
            if c.get("dtype") != spec["dtype"] or list(c.get("shape", ())) != list(spec["shape"]):
                raise err(path, f"column {name!r} is {c.get('dtype')} "
                                      f"{c.get('shape')}, the manifest says {spec['dtype']} "
                                      f"{spec['shape']}")
            dtype = np.dtype(spec["dtype"])
            shape = (n if rows is None else int(rows.get(name, n)),) + tuple(spec["shape"])
            try:
                offset, nbytes, header_crc = int(c["offset"]), int(c["nbytes"]), int(c["crc32"])
            except (KeyError, TypeError, ValueError) as e:
                raise err(path, f"corrupt header: column {name!r}: {e}") from e
            if verify != "none" and header_crc != crc:
                raise err(path, f"column {name!r}: the header's CRC-32 {header_crc} is "
                                      f"not the manifest's {crc}")
            expect = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if nbytes != expect:
                raise err(path, f"column {name!r} has {nbytes} bytes, {shape} of "
                                      f"{dtype} needs {expect}")
            if offset % ALIGN or offset < _PREFIX.size + hlen:
                raise err(path, f"column {name!r} has a bad offset {offset}")
            if offset + nbytes > size:
                raise err(path, f"truncated: column {name!r} ends at byte "
                                      f"{offset + nbytes}, the file has {size}")
            self.layout[name] = (dtype, shape, offset, nbytes, crc)

    def _reopen(self, **kw) -> BinaryIO:
        """The shard file, opened again; it must be the very file whose header was checked (a log
        replaced while open has new files under the same names)."""
        try:
            f = open(self.path, "rb", **kw)
        except OSError as e:
            raise self._error(self.path, f"cannot open shard listed in the manifest: {e}") from e
        st = os.fstat(f.fileno())
        if (st.st_dev, st.st_ino) != self._file_id:
            f.close()
            raise self._error(self.path, "is no longer the file checked when the log was "
                                  "opened: the log was replaced while it was open (open it again)")
        return f

    def open(self) -> Dict[str, np.ndarray]:
        """Memory-map the shard: ``{column: read-only (n, *shape) array view}``."""
        with self._reopen() as f:
            try:
                raw = np.memmap(f, dtype=np.uint8, mode="r")
            except (OSError, ValueError) as e:
                raise self._error(self.path, f"cannot memory-map: {e}") from e
        end = max(off + nb for _, _, off, nb, _ in self.layout.values())
        if raw.size < end:  # changed on disk since the header was checked
            raise self._error(self.path, f"truncated: {raw.size} bytes, the columns need {end}")
        return {name: raw[off:off + nb].view(dtype).reshape(shape)
                for name, (dtype, shape, off, nb, _) in self.layout.items()}

    def verify_data(self) -> None:
        """Check every column against the manifest's CRC-32 (reads the column data once)."""
        buf = bytearray(_VERIFY_CHUNK)
        view = memoryview(buf)
        with self._reopen(buffering=0) as f:
            for name, (_, _, offset, nbytes, crc) in self.layout.items():
                f.seek(offset)
                got, left = 0, nbytes
                while left:
                    k = f.readinto(view[:min(_VERIFY_CHUNK, left)])
                    if not k:
                        raise self._error(self.path, f"truncated inside column {name!r}")
                    got = zlib.crc32(view[:k], got)
                    left -= k
                if got != crc:
                    raise self._error(self.path, f"corrupt data: CRC-32 mismatch in column "
                                          f"{name!r}")


class ShardMaps:
    """The shards of one log, opened on demand: each built (header checked) once by ``make(i)``, its
    data checked against its CRC-32s the first time it is read unless ``verify == "none"``, and at
    most ``max_open`` memory maps kept open (least recently used dropped; arrays already handed out
    keep their map alive). Thread-safe."""

    def __init__(self, make: Callable[[int], "_Shard"], count: int, verify: str, max_open: int):
        if max_open < 1:
            raise ValueError(f"max_open_shards: must be >= 1, got {max_open}")
        self._make = make
        self.max_open = int(max_open)
        self._shards: List[Optional[_Shard]] = [None] * count
        self._verified = [verify == "none"] * count  # "none": never checked
        self._verify_locks = [threading.Lock() for _ in range(count)]
        self.open_maps: "collections.OrderedDict[int, Dict[str, np.ndarray]]" = collections.OrderedDict()
        self._lock = threading.Lock()

    def shard(self, i: int) -> "_Shard":
        shard = self._shards[i]
        if shard is None:
            shard = self._shards[i] = self._make(i)
        return shard

    def verify(self, i: int, again: bool = False) -> None:
        """Check shard ``i``'s data against its CRC-32s once (``again``: even if already done)."""
        if self._verified[i] and not again:
            return
        with self._verify_locks[i]:  # one thread verifies; others reading this shard wait for it
            if again or not self._verified[i]:
                self.shard(i).verify_data()
                self._verified[i] = True

    def columns(self, i: int) -> Dict[str, np.ndarray]:
        """Memory-mapped columns of shard ``i``, its data verified first (class docstring)."""
        with self._lock:
            cols = self.open_maps.get(i)
            if cols is not None:
                self.open_maps.move_to_end(i)
                return cols
        self.verify(i)
        cols = self.shard(i).open()  # outside the lock; a racing duplicate map is harmless
        with self._lock:
            self.open_maps[i] = cols
            self.open_maps.move_to_end(i)
            while len(self.open_maps) > self.max_open:
                self.open_maps.popitem(last=False)
        return cols

    def close(self) -> None:
        with self._lock:
            self.open_maps.clear()


class MappedLog:
    """What the log readers share: their shards' memory maps in ``self._maps`` (a
    :class:`ShardMaps`), closing them, the context manager, and pickling by reopening (a
    multi-process input pipeline's worker reopens the log, checking the headers and, lazily, the
    data again unless this log checks nothing). Subclasses take ``(path, feat, sel, verify,
    max_open_shards)``."""

    def close(self) -> None:
        """Drop the memory maps (batches already read stay valid: they are copies); a later read
        maps the shards it needs again."""
        self._maps.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __reduce__(self):
        verify = "none" if self.verify == "none" else "header"
        return (type(self), (self.path, self.feat, self.sel, verify, self.max_open_shards))
