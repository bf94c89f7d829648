"""The request log: labelled requests with their full sequences on disk (round trip in any order,
shards, candidates kept per request), validation at write, atomic replace, corruption refused with the
file named, the synthetic and event-log builders, and the grain pipeline over it."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from tests.helpers import random_requests
from tests.test_event_log import CFG as EVENT_CFG
from tests.test_event_log import SEL as EVENT_SEL
from tests.test_event_log import columns as event_columns
from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data.events import EventLog, build_requests
from transact_jax.data.pipeline import make_loader
from transact_jax.data.request_log import (
    RequestLog,
    RequestLogError,
    RequestLogWriter,
    write_synthetic_request_log,
)
from transact_jax.data.schema import SchemaError
from transact_jax.data.synthetic import SyntheticConfig

FEAT = FeatureConfig()
SEL = SelectionConfig(k_ll=16, r=8, k_rt=4, k_imp=8, max_ll_len=300, max_rt_len=40, max_imp_len=50,
                      num_nal_negatives=8)
CANDIDATE_FIELDS = ("cand_item_id", "cand_embedding", "dense", "categorical", "labels")


def labelled(seed=0, count=9):
    """``count`` labelled requests, ragged (empty sequences included), candidates interleaved
    across requests (the writer groups them)."""
    rng = np.random.default_rng(seed)
    ll, rt, imp = rng.integers(0, 301, count), rng.integers(0, 41, count), rng.integers(0, 51, count)
    ll[::4] = 0
    b = random_requests(rng, ll, rt, imp, rng.integers(1, 6, count), FEAT)
    b = dataclasses.replace(b, request_id=np.arange(100, 100 + count, dtype=np.int64))
    perm = rng.permutation(b.num_candidates)
    return dataclasses.replace(b, cand_to_req=b.cand_to_req[perm],
                               **{n: getattr(b, n)[perm] for n in CANDIDATE_FIELDS})


def request(b, u):
    """Request ``u`` of ``b``: its sequences per family and its candidates' fields, in order."""
    out = {}
    for fam in ("ll", "rt", "imp"):
        seqs = getattr(b, fam)
        lo, hi = int(seqs.offsets[u]), int(seqs.offsets[u + 1])
        for f in ("timestamps", "actions", "surfaces", "embeddings"):
            out[f"{fam}.{f}"] = getattr(seqs.tokens, f)[lo:hi]
    rows = b.cand_to_req == u
    out.update({n: getattr(b, n)[rows] for n in CANDIDATE_FIELDS})
    out.update({n: getattr(b, n)[u] for n in ("user_id", "request_id", "request_timestamp")})
    return out


def assert_same_request(got, want):
    assert got.keys() == want.keys()
    for k in got:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_round_trip_in_any_order_across_shards(tmp_path):
    b = labelled()
    with RequestLogWriter(tmp_path / "log", FEAT, SEL, requests_per_shard=4) as w:
        w.write(b)
    log = RequestLog(tmp_path / "log", FEAT, SEL)
    assert (len(log), log.num_candidates, log.num_shards) == (9, b.num_candidates, 3)
    order = [8, 0, 4, 4, 5, 1]                    # shards out of order, a repeat
    got = log.read(order)
    got.validate(FEAT, SEL)
    assert got.num_requests == len(order)
    for j, u in enumerate(order):
        assert_same_request(request(got, j), request(b, u))
    assert log.read([]).num_requests == 0 and log.read_range(2, 5).num_requests == 3
    with pytest.raises(IndexError, match="out of range for a request log of 9"):
        log.read([9])
    assert "log_id=" in repr(log) and RequestLog(tmp_path / "log").feat == FEAT


def test_writes_only_valid_labelled_requests(tmp_path):
    b = labelled(1)
    with RequestLogWriter(tmp_path / "log", FEAT, SEL) as w:
        with pytest.raises(SchemaError, match="labels"):
            w.write(dataclasses.replace(b, labels=None))
        with pytest.raises(SchemaError, match="ll"):
            long = random_requests(np.random.default_rng(3), [301], [0], [0], [1], FEAT)
            w.write(long)                         # over max_ll_len: truncate_recent() first
        with pytest.raises(SchemaError, match="dense"):
            w.write(dataclasses.replace(b, dense=np.full_like(b.dense, np.nan)))
        w.write(b)
    assert len(RequestLog(tmp_path / "log")) == 9


def test_atomic_replace_and_abort(tmp_path):
    path = tmp_path / "log"
    with RequestLogWriter(path, FEAT, SEL) as w:
        w.write(labelled(2, 3))
    with pytest.raises(FileExistsError, match="a request log already exists"):
        RequestLogWriter(path, FEAT, SEL)
    with pytest.raises(RuntimeError, match="boom"):
        with RequestLogWriter(path, FEAT, SEL, overwrite=True) as w:
            w.write(labelled(3, 5))
            raise RuntimeError("boom")
    assert len(RequestLog(path)) == 3              # the aborted writer left the old log untouched
    with RequestLogWriter(path, FEAT, SEL, overwrite=True) as w:
        w.write(labelled(3, 5))
    assert len(RequestLog(path)) == 5
    assert sorted(n for n in os.listdir(tmp_path) if n != "log") == []   # no staging left behind


def test_corruption_is_refused_naming_the_file(tmp_path):
    for name in ("a", "b"):
        with RequestLogWriter(tmp_path / name, FEAT, SEL, requests_per_shard=4) as w:
            w.write(labelled(4))
    shard = tmp_path / "a" / "shard-00001.trl"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF                               # inside the last column (labels)
    shard.write_bytes(bytes(data))
    log = RequestLog(tmp_path / "a")               # headers are fine: opens
    log.read([0])                                  # shard 0 is intact
    with pytest.raises(RequestLogError, match="shard-00001.trl: corrupt data: CRC-32 mismatch in "
                                              "column 'labels'"):
        log.read([5])
    assert len(RequestLog(tmp_path / "a", verify="none").read([5]).labels)   # unchecked: reads
    os.replace(tmp_path / "b" / "shard-00000.trl", tmp_path / "a" / "shard-00000.trl")
    with pytest.raises(RequestLogError, match="belongs to another request log"):
        RequestLog(tmp_path / "a")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    manifest["version"] = 7
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RequestLogError, match="format version 7, but this transact-jax reads "
                                              "request logs of version 1"):
        RequestLog(tmp_path / "b")
    with pytest.raises(RequestLogError, match="missing: no request log here"):
        RequestLog(tmp_path / "c")
    with pytest.raises(SchemaError, match="selection_config.max_ll_len"):
        RequestLog(tmp_path / "a", sel=dataclasses.replace(SEL, max_ll_len=10))


def test_from_event_logs(tmp_path):
    batch = build_requests(EventLog.load(*event_columns()), FEAT, EVENT_SEL, EVENT_CFG)
    assert batch.labels is not None
    with RequestLogWriter(tmp_path / "log", FEAT, EVENT_SEL) as w:
        w.write(batch)
    got = RequestLog(tmp_path / "log").read_range(0, batch.num_requests)
    for u in range(batch.num_requests):
        assert_same_request(request(got, u), request(batch, u))


def test_synthetic_log_through_the_grain_pipeline(tmp_path):
    syn = SyntheticConfig(num_items=2000, users_per_chunk=16, candidates_per_request=(2, 5),
                          fixed_ll_length=400)
    log = write_synthetic_request_log(tmp_path / "log", FEAT, SEL, syn, 32, requests_per_shard=16)
    assert len(log) >= 32 and log.num_shards >= 2
    ll = np.diff(log.read_range(0, len(log)).ll.offsets)
    assert np.all(ll == SEL.max_ll_len)            # 400-token histories cut to the most recent 300

    def batches(loader, n):
        it = iter(loader)
        return it, [next(it) for _ in range(n)]

    loader = make_loader(log, batch_size=5, seed=3, num_epochs=None, num_threads=0, prefetch=0)
    it, first = batches(loader, 4)
    assert all(b.num_requests == 5 and b.labels is not None for b in first)
    again = [b.request_id for b in batches(loader, 4)[1]]
    assert all(np.array_equal(a.request_id, r) for a, r in zip(first, again))   # deterministic
    state = it.get_state()
    expect = [next(it).request_id for _ in range(2)]
    resumed = iter(make_loader(log, batch_size=5, seed=3, num_epochs=None, num_threads=0, prefetch=0))
    resumed.set_state(state)
    assert all(np.array_equal(next(resumed).request_id, e) for e in expect)     # resumes exactly
