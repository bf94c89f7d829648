"""The per-user summary store (``transact_jax.serving.summary_store``): int8 quantisation of VISTA
summaries, the checksummed record, the staleness policy, and both backends (embedded SQLite, Redis)
through the same tests.

The Redis tests run against a real ``redis-server`` started here on a free port (no persistence);
when the binary is missing they fail, naming it (CI installs it in ``.ci/run``). The durability
test SIGKILLs a child process that is writing to the SQLite store and reads back every record it
had committed.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import numpy as np
import pytest

from transact_jax.config_json import ConfigError
from transact_jax.serving.summary_store import (
    HEADER,
    RedisSummaryStore,
    SQLiteSummaryStore,
    StalenessPolicy,
    Summary,
    SummaryStoreError,
    decode_summary,
    encode_summary,
    lookup,
    quantize_summary,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
K, D = 8, 16          # small summaries keep the tests fast; the format does not care


def make(user_id: int, version: int, seed: int = 0, k: int = K, d: int = D) -> Summary:
    x = np.random.default_rng([seed, user_id, version & 0xFFFF]).normal(size=(k, d)).astype(np.float32)
    return quantize_summary(x, version, user_id, created_at=1_700_000_000.0)


# ------------------------------------------------------------------------------------ redis server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_port(tmp_path_factory):
    """A private redis-server (no RDB, no AOF) on a free port for this test session."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server not found on PATH: the Redis summary-store tests need it "
                    "(.ci/run installs it; locally: apt-get install redis-server)", pytrace=False)
    port, workdir = _free_port(), tmp_path_factory.mktemp("redis")
    log_path = workdir / "redis.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(workdir)],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not _redis_ready(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server did not start on port {port}:\n{log_path.read_text()}",
                            pytrace=False)
            time.sleep(0.02)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Backend:
    """One store under test, plus what the tests need beyond the interface: a second handle on
    the same data (``reopen``) and writing raw bytes under a user's key (``write_raw``)."""

    def __init__(self, kind: str, tmp_path: pathlib.Path, redis_port=None):
        self.kind, self.path, self.port = kind, tmp_path / "summaries.db", redis_port
        self.prefix = f"test-{uuid.uuid4().hex[:12]}"
        self.opened = []
        self.store = self.reopen()

    def reopen(self):
        if self.kind == "sqlite":
            store = SQLiteSummaryStore(self.path)
        else:
            store = RedisSummaryStore(port=self.port, prefix=self.prefix)
        self.opened.append(store)
        return store

    def write_raw(self, user_id: int, blob: bytes, version: int = 0) -> None:
        if self.kind == "sqlite":
            with sqlite3.connect(self.path) as conn:
                conn.execute("INSERT OR REPLACE INTO summaries VALUES (?, ?, ?)", (user_id, version, blob))
        else:
            import redis
            client = redis.Redis(port=self.port)
            client.set(f"{self.prefix}:{user_id}", blob)
            client.close()


@pytest.fixture(params=["sqlite", "redis"])
def backend(request, tmp_path):
    port = request.getfixturevalue("redis_port") if request.param == "redis" else None
    b = Backend(request.param, tmp_path, port)
    yield b
    for store in b.opened:
        store.close()


# ----------------------------------------------------------------------------- quantisation, record


@pytest.mark.parametrize("magnitude", [1e-6, 0.65, 3.0, 1e4])
def test_quantisation_round_trip_is_within_half_a_step(magnitude):
    x = (np.random.default_rng(1).uniform(-1, 1, (128, 64)) * magnitude).astype(np.float32)
    x[3, 5] = -magnitude                  # the extreme maps to -127, never -128
    s = quantize_summary(x, version=9, user_id=4)
    assert s.codes.dtype == np.int8 and s.codes.shape == (128, 64) and (s.k, s.d) == (128, 64)
    assert s.codes.min() == -127 and s.codes.max() <= 127
    assert s.scale == pytest.approx(magnitude / 127, rel=1e-6)
    y = s.dequantize()
    assert y.dtype == np.float32
    assert np.max(np.abs(y - x)) <= s.scale / 2 * (1 + 1e-4)


def test_zero_summary_and_read_only_codes():
    s = quantize_summary(np.zeros((2, 3), np.float32), 0, 1)
    assert s.scale == 0.0 and not s.codes.any() and not s.dequantize().any()
    with pytest.raises(ValueError):
        s.codes[0, 0] = 1


@pytest.mark.parametrize("x, needle", [
    (np.array([[1.0, np.nan]], np.float32), "NaN"),
    (np.ones((2, 2), np.int32), "float"),
    (np.ones(4, np.float32), "shape"),
])
def test_quantize_rejects_bad_input_naming_the_user(x, needle):
    with pytest.raises(SummaryStoreError, match=needle) as e:
        quantize_summary(x, 1, 77)
    assert "user_id=77" in str(e.value) and e.value.user_id == 77


def test_summary_rejects_the_unused_code_and_bad_fields():
    codes = np.zeros((2, 2), np.int8)
    with pytest.raises(SummaryStoreError, match=r"user_id=3\)\.codes: contains the code -128"):
        Summary(3, 1, np.full((2, 2), -128, np.int8), 0.1, 0.0)
    with pytest.raises(SummaryStoreError, match="scale"):
        Summary(3, 1, codes, float("nan"), 0.0)
    with pytest.raises(SummaryStoreError, match="version"):
        Summary(3, 1 << 63, codes, 0.1, 0.0)
    with pytest.raises(SummaryStoreError, match="codes"):
        Summary(3, 1, codes.astype(np.int16), 0.1, 0.0)


def test_record_round_trip_is_exact():
    s = make(123456789012, -(1 << 40))
    record = encode_summary(s)
    assert len(record) == HEADER.size + K * D + 4
    back = decode_summary(record, 123456789012)
    assert back == s and back.created_at == s.created_at


def test_every_single_byte_corruption_is_detected():
    record = encode_summary(make(5, 7, k=2, d=3))
    for i in range(len(record)):
        bad = bytearray(record)
        bad[i] ^= 0x5A
        with pytest.raises(SummaryStoreError, match=r"summary\(user_id=5\): corrupt record"):
            decode_summary(bytes(bad), 5)
    for cut in (0, 10, len(record) - 1):
        with pytest.raises(SummaryStoreError, match="corrupt record"):
            decode_summary(record[:cut], 5)
    with pytest.raises(SummaryStoreError, match="belongs to user_id=5"):
        decode_summary(record, 6)


# -------------------------------------------------------------------------------------- backends


def test_round_trip_and_get_many_with_missing_users(backend):
    store = backend.store
    summaries = [make(u, 100 + u) for u in (1, 2, 3, 1 << 40)]
    assert store.put_many(summaries) == 4 and len(store) == 4 == store.count()
    assert store.get(2) == summaries[1]
    assert store.get(999) is None
    got = store.get_many([3, 999, 1, 3, 1 << 40, -5])
    assert list(got) == [3, 1, 1 << 40]
    assert got[1] == summaries[0] and got[1 << 40] == summaries[3]
    assert store.get_many([]) == {}
    x = np.random.default_rng(0).normal(size=(128, 64)).astype(np.float32)
    store.put(quantize_summary(x, 1, 50))
    y = store.get(50)
    assert np.max(np.abs(y.dequantize() - x)) <= y.scale / 2 * (1 + 1e-4)
    assert store.delete(2) and not store.delete(2) and store.get(2) is None and len(store) == 4


def test_an_older_version_never_replaces_a_newer_one(backend):
    store = backend.store
    assert store.put(make(1, 10))
    assert not store.put(make(1, 9, seed=1))
    assert store.get(1) == make(1, 10)
    assert store.put(make(1, 10, seed=2))                  # an equal version replaces
    assert store.get(1) == make(1, 10, seed=2)
    # signed 64-bit versions compare exactly (beyond float precision, across zero)
    big = (1 << 62) + 1
    for version, written in [(-3, True), (-7, False), (big, True), (big - 1, False), (0, False)]:
        assert store.put(make(2, version)) is written, version
    assert store.get(2).version == big
    # put_many applies the same rule per record, in order
    assert store.put_many([make(1, 11), make(1, 5), make(3, 2), make(3, 1)]) == 2
    assert store.get(1).version == 11 and store.get(3).version == 2


def _garbage(user_id: int):
    good = encode_summary(make(user_id, 4))
    flipped = bytearray(good)
    flipped[HEADER.size + 3] ^= 1
    return [b"not a summary at all", good[:30], bytes(flipped), encode_summary(make(user_id + 1, 4))]


@pytest.mark.parametrize("which", range(4), ids=["garbage", "truncated", "bit-flip", "other-user"])
def test_corrupt_records_raise_naming_the_user(backend, which):
    store = backend.store
    store.put_many([make(6, 1), make(8, 1)])
    backend.write_raw(7, _garbage(7)[which], version=4)
    for call in (lambda: store.get(7), lambda: store.get_many([6, 7, 8]),
                 lambda: lookup(store, 7, 4)):
        with pytest.raises(SummaryStoreError, match=r"summary\(user_id=7\): corrupt record") as e:
            call()
        assert e.value.user_id == 7
    assert store.get_many([6, 8]).keys() == {6, 8}
    assert store.put(make(7, 5)) and store.get(7) == make(7, 5)     # a newer put repairs it


def test_sqlite_version_column_must_match_the_record(tmp_path):
    b = Backend("sqlite", tmp_path)
    b.write_raw(3, encode_summary(make(3, 4)), version=5)
    with pytest.raises(SummaryStoreError, match=r"user_id=3\): corrupt record: version column 5"):
        b.store.get(3)
    b.store.close()


def test_staleness_policy_outcomes(backend):
    store = backend.store
    store.put(make(1, 100))
    strict, lenient = StalenessPolicy(), StalenessPolicy("serve_stale", max_version_lag=3)
    cases = [
        (strict, 1, 100, "hit", 0), (strict, 1, 90, "hit", -10), (strict, 1, 101, "stale_recompute", 1),
        (lenient, 1, 100, "hit", 0), (lenient, 1, 103, "stale_served", 3),
        (lenient, 1, 104, "stale_recompute", 4), (lenient, 2, 100, "miss", None),
        (strict, 2, 100, "miss", None),
    ]
    for policy, user, latest, status, lag in cases:
        r = lookup(store, user, latest, policy)
        assert (r.status, r.lag) == (status, lag), (policy, user, latest)
        served = status in ("hit", "stale_served")
        assert (r.summary == make(1, 100)) if served else r.summary is None
        assert r.stored_version == (None if status == "miss" else 100)


def test_staleness_policy_validation():
    with pytest.raises(ConfigError, match="mode: must be 'recompute' or 'serve_stale'"):
        StalenessPolicy("sometimes")
    with pytest.raises(ConfigError, match="max_version_lag: must be an int >= 0"):
        StalenessPolicy("serve_stale", -1)
    with pytest.raises(ConfigError, match="max_version_lag: only used with mode='serve_stale'"):
        StalenessPolicy("recompute", 5)


def test_concurrent_puts_and_gets(backend):
    store, threads, rounds = backend.store, 6, 25
    errors, shared_versions = [], []

    def worker(t: int):
        try:
            rng = np.random.default_rng(t)
            for i in range(rounds):
                own = 1000 + t
                store.put(make(own, i))
                v = int(rng.integers(0, 10_000))
                shared_versions.append(v)
                store.put(make(0, v))
                assert store.get(own).version == i
                got = store.get_many([own, 0, 5])
                assert got[own].version == i and 0 in got and 5 not in got
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    assert errors == []
    assert store.get(0).version == max(shared_versions)
    assert len(store) == threads + 1


def test_close_reopen_and_use_after_close(backend):
    with backend.reopen() as first:
        first.put_many([make(u, u) for u in range(20)])
    with pytest.raises(SummaryStoreError, match="closed"):
        first.get(1)
    again = backend.reopen()
    assert len(again) == 20 and again.get(19) == make(19, 19)


def test_redis_connection_errors_name_host_and_port():
    port = _free_port()
    with pytest.raises(SummaryStoreError, match=f"redis 127.0.0.1:{port}/0: connect: cannot reach"):
        RedisSummaryStore(port=port, socket_timeout_s=0.5)


def test_redis_prefix_scopes_keys(redis_port):
    a = RedisSummaryStore(port=redis_port, prefix=f"a*{uuid.uuid4().hex[:8]}")
    b = RedisSummaryStore(port=redis_port, prefix=f"b-{uuid.uuid4().hex[:8]}")
    with a, b:
        a.put(make(1, 1))
        assert b.get(1) is None and len(a) == 1 and len(b) == 0


# ------------------------------------------------------------------------------------ durability


_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from transact_jax.serving.summary_store import SQLiteSummaryStore, quantize_summary

    def make(u):
        x = np.random.default_rng(u).normal(size=(8, 16)).astype(np.float32)
        return quantize_summary(x, u, u)

    store = SQLiteSummaryStore(sys.argv[1])
    for start in range(0, 40, 10):                       # batches, then single records, forever
        store.put_many([make(u) for u in range(start, start + 10)])
        print(start + 9, flush=True)
    u = 40
    while True:
        store.put(make(u))
        print(u, flush=True)
        u += 1
""")


def test_sqlite_keeps_every_commit_across_a_kill(tmp_path):
    """A writer is SIGKILLed while writing; every record it reported committed is read back intact
    and no half-written record exists."""
    path, wanted = tmp_path / "s.db", 80
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
    committed = -1
    try:
        for line in child.stdout:
            committed = int(line)
            if committed >= wanted - 1:
                break
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    assert committed >= wanted - 1, child.stderr.read()
    assert child.returncode == -signal.SIGKILL
    with SQLiteSummaryStore(path) as store:
        n = len(store)
        assert n >= committed + 1
        got = store.get_many(range(n + 5))              # decodes (verifies) every stored record
        assert sorted(got) == list(range(n))
        x = np.random.default_rng(committed).normal(size=(8, 16)).astype(np.float32)
        assert np.max(np.abs(got[committed].dequantize() - x)) <= got[committed].scale / 2 * (1 + 1e-4)
