"""Per-user summary cache for serving: VISTA summaries, int8, checksummed, in SQLite or Redis.

VISTA (VIrtual Sequential Target Attention, in "Massive Memorization with Hundreds of Trillions
of Parameters for Sequential Transducer Generative Recommenders", Section 3.2) summarises a user's
whole interaction history into **k** "virtual seed" embeddings of width **d** (a ``(k, d)`` float
matrix; k = 128 by default, d e.g. 64). Sections 3.1 and 4 ("Embedding delivery system") quantise
these summaries and export them to a key-value store; inference only fetches and dequantises them
and runs the cheap second stage (target attention). This module is that store, independent of the
model:

* :class:`Summary` - one user's quantised summary: int8 ``codes`` (k, d), a ``scale`` and the
  **version** of the history it summarises: any integer that grows with the user's history, e.g. the
  timestamp or the count of the latest action included. :func:`quantize_summary` /
  :meth:`Summary.dequantize` use the project's symmetric int8 codec (``pallas_kernels.int8_codec``:
  codes in [-127, 127], never -128) with one scale per summary, ``max|x| / 127``.
* :func:`encode_summary` / :func:`decode_summary` - the binary record (header, codes, CRC32). A
  corrupt record raises :class:`SummaryStoreError` naming the user; it is never returned as data.
* :class:`SummaryStore` - the interface; :class:`SQLiteSummaryStore` (embedded, no server; the
  default) and :class:`RedisSummaryStore` implement it. Both refuse to replace a stored summary with
  an older version (``put`` of version v is a no-op when the stored version is > v).
* :class:`StalenessPolicy` and :func:`lookup` - whether a stored summary may be served for a user
  whose latest action has a given version, or must be recomputed (recomputing is the model's job).

Record layout (little-endian), :data:`HEADER` then the codes then the checksum::

    magic b"VSUM" | format u16 | reserved u16 (0) | user_id i64 | version i64 | k u32 | d u32 |
    scale f64 | created_at f64 | codes: k*d int8, row-major | crc32 u32 over all preceding bytes
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import math
import numbers
import os
import re
import sqlite3
import struct
import threading
import time
import zlib
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from pallas_kernels.int8_codec import QUANT_MAX, dequantize_int8
from transact_jax.config_json import NON_NEGATIVE, ConfigError, check_fields
from transact_jax.data.quantization import quantize
from transact_jax.data.schema import SchemaError

MAGIC = b"VSUM"
FORMAT_VERSION = 1
HEADER = struct.Struct("<4sHHqqIIdd")
"""magic, format, reserved, user_id, version, k, d, scale, created_at (48 bytes)."""
_CRC = struct.Struct("<I")
_VERSION_OFFSET = 16
"""Byte offset of ``version`` in the header (the Redis script reads it there)."""
_INT64 = (-(1 << 63), (1 << 63) - 1)


class SummaryStoreError(ValueError):
    """A summary store problem: ``field`` names what is wrong (``summary(user_id=7)``, the
    ``codes`` of one, ``redis 127.0.0.1:6379``...), ``problem`` says what; ``user_id`` is the
    user concerned, if any. Like ``SchemaError`` and ``ConfigError``, the message is
    ``"<field>: <problem>"``."""

    def __init__(self, field: str, problem: str, user_id: Optional[int] = None):
        self.field, self.problem, self.user_id = field, problem, user_id
        super().__init__(f"{field}: {problem}")


def _who(user_id: Optional[int], part: str = "") -> str:
    base = "summary" if user_id is None else f"summary(user_id={user_id})"
    return f"{base}.{part}" if part else base


def _check_int64(name: str, value, user_id: Optional[int] = None) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise SummaryStoreError(_who(user_id, name), f"expected an int, got {value!r}", user_id)
    if not _INT64[0] <= int(value) <= _INT64[1]:
        raise SummaryStoreError(_who(user_id, name), f"{value} is outside the int64 range", user_id)
    return int(value)


# ------------------------------------------------------------------------------------ the summary


@dataclasses.dataclass(frozen=True, eq=False)
class Summary:
    """One user's quantised summary (module docstring: k, d, version).

    Attributes:
      user_id: the user (int64).
      version: the history version summarised (int64; larger = newer).
      codes: int8 ``(k, d)`` codes in [-127, 127]; stored read-only.
      scale: dequantisation step: ``x ~= codes * scale`` (``max|x| / 127``; 0 for an all-zero x).
      created_at: when the summary was computed (seconds since the epoch).
    """

    user_id: int
    version: int
    codes: np.ndarray
    scale: float
    created_at: float

    def __post_init__(self):
        uid = _check_int64("user_id", self.user_id)
        object.__setattr__(self, "user_id", uid)
        object.__setattr__(self, "version", _check_int64("version", self.version, uid))
        object.__setattr__(self, "codes", _checked_codes(self.codes, uid))
        for name, low in (("scale", 0.0), ("created_at", None)):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) \
                    or not math.isfinite(value) or (low is not None and value < low):
                need = "a finite number" + (f" >= {low}" if low is not None else "")
                raise SummaryStoreError(_who(uid, name), f"must be {need}, got {value!r}", uid)
            object.__setattr__(self, name, float(value))

    @property
    def k(self) -> int:
        """Number of virtual seed embeddings."""
        return self.codes.shape[0]

    @property
    def d(self) -> int:
        """Embedding width."""
        return self.codes.shape[1]

    def dequantize(self) -> np.ndarray:
        """The float32 ``(k, d)`` summary: ``codes * scale`` (error <= scale / 2 per element)."""
        return dequantize_int8(self.codes, self.scale * QUANT_MAX, np.float32)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Summary):
            return NotImplemented
        return (self.user_id, self.version, self.scale, self.created_at) == \
            (other.user_id, other.version, other.scale, other.created_at) \
            and np.array_equal(self.codes, other.codes)

    __hash__ = None


def _checked_codes(codes, user_id: int) -> np.ndarray:
    where = _who(user_id, "codes")
    if not isinstance(codes, np.ndarray) or codes.dtype != np.int8:
        got = codes.dtype if isinstance(codes, np.ndarray) else type(codes).__name__
        raise SummaryStoreError(where, f"expected an int8 numpy array, got {got}", user_id)
    if codes.ndim != 2 or 0 in codes.shape:
        raise SummaryStoreError(where, f"expected shape (k, d) with k, d >= 1, got {codes.shape}",
                                user_id)
    if np.any(codes == -QUANT_MAX - 1):
        raise SummaryStoreError(where, f"contains the code {-QUANT_MAX - 1}, which the int8 codec "
                                       f"never produces (codes lie in [-{QUANT_MAX}, {QUANT_MAX}])",
                                user_id)
    if codes.flags.writeable:                 # a private, read-only copy: the dataclass is frozen
        codes = codes.copy()
        codes.setflags(write=False)
    return codes


def quantize_summary(x: np.ndarray, version: int, user_id: int,
                     created_at: Optional[float] = None) -> Summary:
    """Quantise a float ``(k, d)`` summary with one symmetric scale, ``max|x| / 127``.

    Codes are ``round(x / scale)`` in [-127, 127] (the project codec, ``quantize`` of
    ``transact_jax.data.quantization``, with ``max|x|`` as its scale), so each element round-trips
    with an error of at most ``scale / 2``. NaN/inf, non-float input or a shape other than
    ``(k, d)`` raise :class:`SummaryStoreError` naming the user. ``created_at`` defaults to now.
    """
    uid = _check_int64("user_id", user_id)
    x = np.asarray(x)
    if x.ndim != 2 or 0 in x.shape:
        raise SummaryStoreError(_who(uid, "x"), f"expected shape (k, d) with k, d >= 1, got {x.shape}",
                                uid)
    try:
        amax = float(np.max(np.abs(x.astype(np.float32))))
        codes = quantize(x, scale=amax if 0 < amax < math.inf else 1.0, name=_who(uid, "x"))
    except SchemaError as e:
        raise SummaryStoreError(e.field, e.problem, uid) from e
    except (TypeError, ValueError) as e:
        raise SummaryStoreError(_who(uid, "x"), f"not a float array ({e})", uid) from e
    return Summary(uid, version, codes, amax / QUANT_MAX,
                   time.time() if created_at is None else created_at)


# ----------------------------------------------------------------------------------------- record


def encode_summary(summary: Summary) -> bytes:
    """The checksummed binary record of ``summary`` (layout in the module docstring)."""
    body = HEADER.pack(MAGIC, FORMAT_VERSION, 0, summary.user_id, summary.version, summary.k,
                       summary.d, summary.scale, summary.created_at) + summary.codes.tobytes()
    return body + _CRC.pack(zlib.crc32(body))


def _corrupt(user_id: Optional[int], problem: str) -> SummaryStoreError:
    return SummaryStoreError(_who(user_id), f"corrupt record: {problem}", user_id)


def decode_summary(record: bytes, user_id: Optional[int] = None) -> Summary:
    """Parse and verify a record: magic, format version, length (from k, d), CRC32 and, when
    ``user_id`` is given (the key it was stored under), that the record belongs to that user.
    Any failure raises :class:`SummaryStoreError` ("corrupt record: ...") naming the user."""
    if not isinstance(record, (bytes, bytearray, memoryview)):
        raise _corrupt(user_id, f"expected bytes, got {type(record).__name__}")
    record = bytes(record)
    least = HEADER.size + _CRC.size
    if len(record) < least:
        raise _corrupt(user_id, f"truncated: {len(record)} bytes, a record has at least {least}")
    magic, fmt, reserved, uid, version, k, d, scale, created_at = HEADER.unpack_from(record)
    if magic != MAGIC:
        raise _corrupt(user_id, f"bad magic {magic!r} (expected {MAGIC!r})")
    if fmt != FORMAT_VERSION or reserved != 0:
        raise _corrupt(user_id, f"unsupported format {fmt}.{reserved} (this reader: {FORMAT_VERSION}.0)")
    expected = HEADER.size + k * d + _CRC.size
    if len(record) != expected:
        raise _corrupt(user_id, f"{len(record)} bytes, but k={k}, d={d} needs {expected}")
    (stored,) = _CRC.unpack_from(record, len(record) - _CRC.size)
    computed = zlib.crc32(memoryview(record)[:-_CRC.size])
    if stored != computed:
        raise _corrupt(user_id, f"CRC32 mismatch (stored {stored:#010x}, computed {computed:#010x})")
    if user_id is not None and uid != user_id:
        raise _corrupt(user_id, f"the record belongs to user_id={uid}")
    codes = np.frombuffer(record, np.int8, count=k * d, offset=HEADER.size).reshape(k, d)
    try:
        return Summary(uid, version, codes, scale, created_at)
    except SummaryStoreError as e:
        raise _corrupt(uid, e.problem) from e


# -------------------------------------------------------------------------------------- staleness


@dataclasses.dataclass(frozen=True)
class StalenessPolicy:
    """When a stored summary may still be served (see :func:`lookup`).

    Attributes:
      mode: ``"recompute"``: only an up-to-date summary is served; ``"serve_stale"``: a summary at
        most ``max_version_lag`` versions behind the user's latest is served too.
      max_version_lag: the largest tolerated ``latest_version - summary.version`` (in version units:
        actions or seconds, whatever the version counts). Only used by ``"serve_stale"``; must be 0
        with ``"recompute"`` so that a setting is never silently ignored.
    """

    mode: str = "recompute"
    max_version_lag: int = 0

    def __post_init__(self):
        check_fields(self, {"max_version_lag": NON_NEGATIVE})
        if self.mode not in ("recompute", "serve_stale"):
            raise ConfigError("mode", f"must be 'recompute' or 'serve_stale', got {self.mode!r}")
        if self.mode == "recompute" and self.max_version_lag:
            raise ConfigError("max_version_lag", f"only used with mode='serve_stale', got "
                                                 f"{self.max_version_lag} with mode='recompute'")


@dataclasses.dataclass(frozen=True)
class LookupResult:
    """The outcome of :func:`lookup`.

    ``status`` is one of:

    * ``"hit"``: a summary with ``version >= latest_version`` is stored; ``summary`` is it.
    * ``"stale_served"``: the stored summary is behind (``0 < lag <= max_version_lag``) and the
      policy is ``"serve_stale"``; ``summary`` is it. The caller may refresh it in the background.
    * ``"stale_recompute"``: the stored summary is behind by more than the policy allows (any lag in
      ``"recompute"`` mode); ``summary`` is None: recompute it from the full history.
    * ``"miss"``: nothing is stored for the user; ``summary`` is None: compute it.

    So ``summary is None`` exactly when the caller must (re)compute. ``stored_version`` is the
    version of the stored summary (None on a miss) and ``lag`` is ``latest_version -
    stored_version`` (None on a miss; <= 0 on a hit).
    """

    summary: Optional[Summary]
    status: str
    stored_version: Optional[int] = None
    lag: Optional[int] = None


def lookup(store: "SummaryStore", user_id: int, latest_version: int,
           policy: StalenessPolicy = StalenessPolicy()) -> LookupResult:
    """Fetch ``user_id``'s summary and classify it against the user's ``latest_version`` (the
    version of their latest action) with ``policy``: see :class:`LookupResult`. A corrupt record
    raises :class:`SummaryStoreError`, as ``store.get`` does."""
    latest = _check_int64("latest_version", latest_version, user_id)
    summary = store.get(user_id)
    if summary is None:
        return LookupResult(None, "miss")
    lag = latest - summary.version
    if lag <= 0:
        return LookupResult(summary, "hit", summary.version, lag)
    if policy.mode == "serve_stale" and lag <= policy.max_version_lag:
        return LookupResult(summary, "stale_served", summary.version, lag)
    return LookupResult(None, "stale_recompute", summary.version, lag)


# -------------------------------------------------------------------------------------- interface


class SummaryStore(abc.ABC):
    """Per-user summary storage. Every method is thread-safe; a closed store raises
    :class:`SummaryStoreError`. ``put`` never replaces a stored summary of a newer version (an
    equal version is replaced); records that fail verification raise instead of being returned."""

    @abc.abstractmethod
    def get(self, user_id: int) -> Optional[Summary]:
        """The user's summary, or None if none is stored."""

    @abc.abstractmethod
    def get_many(self, user_ids: Iterable[int]) -> Dict[int, Summary]:
        """Summaries of the stored users among ``user_ids`` (missing users are absent), fetched in
        one round trip. The first corrupt record (in request order) raises."""

    @abc.abstractmethod
    def put(self, summary: Summary) -> bool:
        """Store ``summary`` unless a newer version is stored; True if it was written."""

    @abc.abstractmethod
    def put_many(self, summaries: Iterable[Summary]) -> int:
        """``put`` each summary (in order; each record atomically); the number written."""

    @abc.abstractmethod
    def delete(self, user_id: int) -> bool:
        """Remove the user's summary; True if there was one."""

    @abc.abstractmethod
    def count(self) -> int:
        """Number of stored summaries."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections; idempotent."""

    def __len__(self) -> int:
        return self.count()

    def __enter__(self) -> "SummaryStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _unique_ids(user_ids: Iterable[int]) -> List[int]:
    return list(dict.fromkeys(_check_int64("user_id", u) for u in user_ids))


def _checked_summary(summary) -> Summary:
    if not isinstance(summary, Summary):
        raise SummaryStoreError("summary", f"expected a Summary, got {type(summary).__name__}")
    return summary


# ----------------------------------------------------------------------------------------- SQLite


_SCHEMA = ("CREATE TABLE IF NOT EXISTS summaries (user_id INTEGER PRIMARY KEY, "
           "version INTEGER NOT NULL, record BLOB NOT NULL)")
_UPSERT = ("INSERT INTO summaries (user_id, version, record) VALUES (?, ?, ?) "
           "ON CONFLICT(user_id) DO UPDATE SET version = excluded.version, record = excluded.record "
           "WHERE excluded.version >= summaries.version")
_SQL_BATCH = 500      # ids per SELECT ... IN (...) (under SQLite's host-parameter limit)


class SQLiteSummaryStore(SummaryStore):
    """The embedded store: one SQLite file, table ``summaries(user_id PRIMARY KEY, version,
    record)``, no server.

    Durability: WAL journal and ``synchronous=FULL``; every ``put`` / ``put_many`` is one
    ``BEGIN IMMEDIATE`` ... ``COMMIT`` transaction, so once it returns the records survive a crash
    of the process (kill -9) and of the machine, and a crash mid-write leaves the previous committed
    state: never a half record (the CRC would reject one anyway). ``put_many`` is all-or-nothing.

    Version rule: the upsert compares versions inside the same statement
    (``ON CONFLICT(user_id) DO UPDATE ... WHERE excluded.version >= summaries.version``), so an
    older summary never replaces a newer one, even with concurrent writers. The ``version`` column
    must equal the record's version; a mismatch is reported as a corrupt record.

    Threads: one connection per thread (opened on first use; WAL lets readers run concurrently
    with the single writer, and writers wait up to ``timeout_s`` for each other). Meant for a fixed
    pool of serving workers: each thread's connection stays open until :meth:`close`.
    """

    def __init__(self, path: "str | os.PathLike[str]", timeout_s: float = 10.0):
        self.path = os.fspath(path)
        if self.path == ":memory:" or self.path.startswith("file:"):
            raise SummaryStoreError("path", "needs a file path (each thread opens its own connection)")
        self.timeout_s = float(timeout_s)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: List[sqlite3.Connection] = []
        self._closed = False
        with self._sql_errors("open"):
            conn = self._conn()
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise SummaryStoreError(self._where, f"could not enable WAL (journal_mode={mode})")
            conn.execute(_SCHEMA)

    @property
    def _where(self) -> str:
        return f"sqlite {self.path}"

    @contextlib.contextmanager
    def _sql_errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as e:
            raise SummaryStoreError(self._where, f"{what} failed: {e}") from e

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise SummaryStoreError(self._where, "the store is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None,
                                   check_same_thread=False)   # close() closes it from any thread
            conn.execute("PRAGMA synchronous=FULL")
            with self._lock:
                if self._closed:
                    conn.close()
                    raise SummaryStoreError(self._where, "the store is closed")
                self._connections.append(conn)
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def _transaction(self, what: str, immediate: bool) -> Iterator[sqlite3.Connection]:
        with self._sql_errors(what):
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @staticmethod
    def _decode_row(user_id: int, version, record) -> Summary:
        summary = decode_summary(record, user_id)
        if summary.version != version:
            raise _corrupt(user_id, f"version column {version!r} != record version {summary.version}")
        return summary

    def get(self, user_id: int) -> Optional[Summary]:
        uid = _check_int64("user_id", user_id)
        with self._sql_errors(f"get user_id={uid}"):
            row = self._conn().execute("SELECT version, record FROM summaries WHERE user_id = ?",
                                       (uid,)).fetchone()
        return None if row is None else self._decode_row(uid, *row)

    def get_many(self, user_ids: Iterable[int]) -> Dict[int, Summary]:
        ids = _unique_ids(user_ids)
        rows: Dict[int, Tuple] = {}
        with self._transaction("get_many", immediate=False) as conn:    # one consistent snapshot
            for i in range(0, len(ids), _SQL_BATCH):
                chunk = ids[i:i + _SQL_BATCH]
                sql = ("SELECT user_id, version, record FROM summaries WHERE user_id IN "
                       f"({','.join('?' * len(chunk))})")
                rows.update((r[0], r[1:]) for r in conn.execute(sql, chunk))
        return {u: self._decode_row(u, *rows[u]) for u in ids if u in rows}

    def put(self, summary: Summary) -> bool:
        return self.put_many([summary]) == 1

    def put_many(self, summaries: Iterable[Summary]) -> int:
        rows = [(s.user_id, s.version, encode_summary(s)) for s in map(_checked_summary, summaries)]
        if not rows:
            return 0
        with self._transaction("put", immediate=True) as conn:
            written = 0
            for row in rows:
                written += conn.execute(_UPSERT, row).rowcount
        return written

    def delete(self, user_id: int) -> bool:
        uid = _check_int64("user_id", user_id)
        with self._transaction(f"delete user_id={uid}", immediate=True) as conn:
            return conn.execute("DELETE FROM summaries WHERE user_id = ?", (uid,)).rowcount > 0

    def count(self) -> int:
        with self._sql_errors("count"):
            return self._conn().execute("SELECT COUNT(*) FROM summaries").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()


# ------------------------------------------------------------------------------------------ Redis


# KEYS[1]: the user's key, ARGV[1]: the new record. Writes unless the stored record is newer: the
# versions (int64, little-endian, at byte _VERSION_OFFSET of the header) are compared byte by byte
# from the most significant one (sign bit flipped), exactly, without Lua's double-precision numbers.
# A stored value that is not a record (no magic, too short) is overwritten.
_PUT_IF_NEWER = """
local new = ARGV[1]
local old = redis.call('GET', KEYS[1])
if old and string.len(old) >= {header} and string.sub(old, 1, 4) == '{magic}' then
  for i = {last}, {first}, -1 do
    local a, b = string.byte(new, i), string.byte(old, i)
    if i == {last} then a = (a + 128) % 256; b = (b + 128) % 256 end
    if a > b then break end
    if a < b then return 0 end
  end
end
redis.call('SET', KEYS[1], new)
return 1
""".format(header=HEADER.size, magic=MAGIC.decode("ascii"),
           first=_VERSION_OFFSET + 1, last=_VERSION_OFFSET + 8)


class RedisSummaryStore(SummaryStore):
    """Summaries in Redis: key ``f"{prefix}:{user_id}"``, value the checksummed record.

    ``get_many`` is one MGET. ``put`` runs a Lua script (EVALSHA) that compares the stored and the
    new record's versions and writes only if the new one is not older, atomically on the server;
    ``put_many`` sends those calls in one MULTI/EXEC pipeline (each record atomic, the batch run
    without interleaving). Durability is the server's (its RDB/AOF settings), not this client's.
    ``count`` scans the prefix (O(number of keys)). The client is thread-safe (connection pool).
    Connection problems raise :class:`SummaryStoreError` naming ``host:port``; ``retries`` is how
    often a command is retried after a connection error (no backoff).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 6379, db: int = 0,
                 prefix: str = "vista:summary", socket_timeout_s: float = 1.0, retries: int = 1):
        if not isinstance(prefix, str) or not prefix:
            raise SummaryStoreError("prefix", f"expected a non-empty string, got {prefix!r}")
        self.host, self.port, self.db, self.prefix = host, int(port), int(db), prefix
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError as e:
            raise SummaryStoreError(self._where, "the 'redis' package is not installed") from e
        self._errors_mod = redis.exceptions
        self._client = redis.Redis(host=host, port=self.port, db=self.db,
                                   socket_timeout=socket_timeout_s,
                                   socket_connect_timeout=socket_timeout_s,
                                   retry=Retry(NoBackoff(), retries))
        self._script = self._client.register_script(_PUT_IF_NEWER)
        self._match = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + ":*"
        self._closed = False
        with self._redis_errors("connect"):
            self._client.ping()

    @property
    def _where(self) -> str:
        return f"redis {self.host}:{self.port}/{self.db}"

    def _key(self, user_id: int) -> str:
        return f"{self.prefix}:{user_id}"

    @contextlib.contextmanager
    def _redis_errors(self, what: str) -> Iterator[None]:
        if self._closed:
            raise SummaryStoreError(self._where, "the store is closed")
        errors = self._errors_mod
        try:
            yield
        except (errors.ConnectionError, errors.TimeoutError) as e:
            raise SummaryStoreError(self._where, f"{what}: cannot reach the server ({e})") from e
        except errors.RedisError as e:
            raise SummaryStoreError(self._where, f"{what} failed: {e}") from e

    def get(self, user_id: int) -> Optional[Summary]:
        uid = _check_int64("user_id", user_id)
        with self._redis_errors(f"get user_id={uid}"):
            record = self._client.get(self._key(uid))
        return None if record is None else decode_summary(record, uid)

    def get_many(self, user_ids: Iterable[int]) -> Dict[int, Summary]:
        ids = _unique_ids(user_ids)
        if not ids:
            return {}
        with self._redis_errors("get_many"):
            records = self._client.mget([self._key(u) for u in ids])
        return {u: decode_summary(r, u) for u, r in zip(ids, records) if r is not None}

    def put(self, summary: Summary) -> bool:
        s = _checked_summary(summary)
        with self._redis_errors(f"put user_id={s.user_id}"):
            return bool(self._script(keys=[self._key(s.user_id)], args=[encode_summary(s)]))

    def put_many(self, summaries: Iterable[Summary]) -> int:
        items = [_checked_summary(s) for s in summaries]
        if not items:
            return 0
        with self._redis_errors("put_many"):
            pipe = self._client.pipeline(transaction=True)
            for s in items:
                self._script(keys=[self._key(s.user_id)], args=[encode_summary(s)], client=pipe)
            return sum(int(r) for r in pipe.execute())

    def delete(self, user_id: int) -> bool:
        uid = _check_int64("user_id", user_id)
        with self._redis_errors(f"delete user_id={uid}"):
            return self._client.delete(self._key(uid)) > 0

    def count(self) -> int:
        start = len(self.prefix) + 1
        with self._redis_errors("count"):
            keys = self._client.scan_iter(match=self._match, count=1000)
            return sum(1 for key in keys if _is_int(key[start:]))

    def close(self) -> None:
        self._closed = True
        self._client.close()


def _is_int(text: bytes) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


__all__ = [
    "FORMAT_VERSION", "HEADER", "MAGIC", "LookupResult", "RedisSummaryStore", "SQLiteSummaryStore",
    "StalenessPolicy", "Summary", "SummaryStore", "SummaryStoreError", "decode_summary",
    "encode_summary", "lookup", "quantize_summary",
]
