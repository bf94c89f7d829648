"""The on-disk format of a feature log (described in :mod:`transact_jax.data.feature_log`).

Constants, the shard encoding (:func:`encode_shard`) and its checked decoding (:class:`_Shard`: prefix,
header, identity, column layout, CRC-32s), the manifest's column table and stored configs, and the
durable file writes (:func:`_write_file`, :func:`_fsync_dir`) the writer uses.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
import zlib
from typing import Any, BinaryIO, Dict, List, Mapping, Sequence, Tuple, Union

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


def version_problem(found: Any) -> str:
    """The message for a manifest or shard of another format version."""
    return (f"format version {found!r}, but this transact-jax reads feature logs of version "
            f"{FORMAT_VERSION} only: regenerate the log with this version (e.g. python -m "
            f"transact_jax generate / data, or FeatureLogWriter)")


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


def _stored_config(cls, manifest: Mapping[str, Any], key: str, manifest_path: str):
    """The config stored under ``key``; a bad one raises FeatureLogError naming the manifest and the
    config field (``"selection_config.k_ll: ..."``)."""
    try:
        return config_from_dict(cls, manifest.get(key), key)
    except ConfigError as e:
        raise FeatureLogError(manifest_path, f"{e.field}: {e.problem}") from e


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
        header = json.dumps({"log_id": log_id, "shard": int(index), "num_examples": n, "nbytes": end,
                             "columns": entries}, separators=(",", ":")).encode()
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
                 verify: str, log_id: str, index: int):
        self.path = path
        self.num_examples = n = int(entry["num_examples"])
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                size, self._file_id = st.st_size, (st.st_dev, st.st_ino)
                prefix = f.read(_PREFIX.size)
                if len(prefix) < _PREFIX.size:
                    raise FeatureLogError(path, f"truncated: {size} bytes, shorter than the "
                                          f"{_PREFIX.size}-byte shard prefix")
                magic, version, hlen, hcrc, _ = _PREFIX.unpack(prefix)
                if magic != MAGIC:
                    raise FeatureLogError(path, f"bad magic {magic!r}: not a feature log shard")
                if version != FORMAT_VERSION:
                    raise FeatureLogError(path, f"shard {version_problem(version)}")
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
        if header.get("log_id") != log_id:
            raise FeatureLogError(path, f"belongs to another feature log (log id "
                                  f"{header.get('log_id')!r}, this log's is {log_id!r}): a shard "
                                  f"copied or moved from another log, or the log was replaced "
                                  f"while it was open (open it again)")
        if header.get("shard") != index:
            raise FeatureLogError(path, f"is shard {header.get('shard')!r} of its log, the manifest "
                                  f"lists it as shard {index}")
        if header_n != n:
            raise FeatureLogError(path, f"header says {header_n} examples, the manifest says {n}")
        if verify != "none" and header.get("nbytes") != size:
            raise FeatureLogError(path, f"header says the file has {header.get('nbytes')} bytes, "
                                  f"it has {size}")
        # name -> (dtype, shape, offset, nbytes, crc32 from the manifest)
        self.layout: Dict[str, Tuple[np.dtype, Tuple[int, ...], int, int, int]] = {}
        for spec, crc in zip(columns, entry["crc32"]):
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
                offset, nbytes, header_crc = int(c["offset"]), int(c["nbytes"]), int(c["crc32"])
            except (KeyError, TypeError, ValueError) as e:
                raise FeatureLogError(path, f"corrupt header: column {name!r}: {e}") from e
            if verify != "none" and header_crc != crc:
                raise FeatureLogError(path, f"column {name!r}: the header's CRC-32 {header_crc} is "
                                      f"not the manifest's {crc}")
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

    def _reopen(self, **kw) -> BinaryIO:
        """The shard file, opened again; it must be the very file whose header was checked (a log
        replaced while open has new files under the same names)."""
        try:
            f = open(self.path, "rb", **kw)
        except OSError as e:
            raise FeatureLogError(self.path, f"cannot open shard listed in the manifest: {e}") from e
        st = os.fstat(f.fileno())
        if (st.st_dev, st.st_ino) != self._file_id:
            f.close()
            raise FeatureLogError(self.path, "is no longer the file checked when the log was "
                                  "opened: the log was replaced while it was open (open it again)")
        return f

    def open(self) -> Dict[str, np.ndarray]:
        """Memory-map the shard: ``{column: read-only (n, *shape) array view}``."""
        with self._reopen() as f:
            try:
                raw = np.memmap(f, dtype=np.uint8, mode="r")
            except (OSError, ValueError) as e:
                raise FeatureLogError(self.path, f"cannot memory-map: {e}") from e
        end = max(off + nb for _, _, off, nb, _ in self.layout.values())
        if raw.size < end:  # changed on disk since the header was checked
            raise FeatureLogError(self.path, f"truncated: {raw.size} bytes, the columns need {end}")
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
                        raise FeatureLogError(self.path, f"truncated inside column {name!r}")
                    got = zlib.crc32(view[:k], got)
                    left -= k
                if got != crc:
                    raise FeatureLogError(self.path, f"corrupt data: CRC-32 mismatch in column "
                                          f"{name!r}")
