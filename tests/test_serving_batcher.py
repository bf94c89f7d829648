"""The dynamic batcher: per-request futures, max batch and max wait,
back-pressure, shutdown, several client threads, bad-request and failed-batch isolation.

Policy tests drive the batcher with a recording stand-in for the Ranker (instant, or held by a gate
to simulate a busy device) so that timing is under the test's control; the last tests run it in
front of the real Ranker.
"""
from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest

from tests.helpers import random_requests
from tests.test_serving_ranker import CFG, FEAT, SEL, XLA
from transact_jax.serving import (
    BatcherClosed,
    BatcherConfig,
    Bucket,
    DynamicBatcher,
    Overloaded,
    Ranker,
    RequestError,
    split_requests,
)
from transact_jax.serving.ranker import BatchReport
from transact_jax.serving.validation import validate_request
from transact_jax.model.builder import build_model

H = FEAT.num_heads


def one_request(request_id: int, cands: int = 4, seed: int = 0):
    """A single valid request whose request_id tags it."""
    rng = np.random.default_rng(seed + request_id)
    req = random_requests(rng, [20], [5], [3], [cands], FEAT, labels=False)
    return dataclasses.replace(req, request_id=np.array([request_id], np.int64))


class _InFlight:
    def __init__(self, fake, parts):
        self.fake, self.parts = fake, parts

    def finish(self):
        if self.fake.gate is not None:
            assert self.fake.gate.wait(10), "test gate never opened"
        outs = [np.full((p.num_candidates, H), float(p.request_id[0]), np.float32) for p in self.parts]
        n = sum(p.num_candidates for p in self.parts)
        report = BatchReport(Bucket("dedup", n, 2, 1, 1, 1), len(self.parts), n,
                             {"sequences": 0, "candidates": 0, "total": 0}, 0,
                             {"prep": 0.0, "total": 0.0})
        return outs, report


class FakeRanker:
    """Records batches; each candidate's 'probability' is its request_id; ``fail_on`` request ids
    make dispatch raise; ``gate`` (an Event) holds results back like a busy device."""

    def __init__(self, gate=None, fail_on=()):
        self.gate, self.fail_on = gate, set(fail_on)
        self.batches = []
        self.lock = threading.Lock()

    def validate_request(self, request):
        return validate_request(request, FEAT, SEL)

    def dispatch(self, parts, timing=False):
        ids = [int(p.request_id[0]) for p in parts]
        with self.lock:
            self.batches.append(ids)
        if self.fail_on & set(ids):
            raise RuntimeError(f"device error in batch {ids}")
        return _InFlight(self, parts)


def wait_until(cond, timeout=5.0):
    end = time.perf_counter() + timeout
    while not cond():
        assert time.perf_counter() < end, "condition not reached"
        time.sleep(0.001)


# ----------------------------------------------------------------------------------- policy

def test_each_future_gets_its_own_requests_scores():
    fake = FakeRanker()
    with DynamicBatcher(fake, max_batch_candidates=16, max_wait_s=0.01) as b:
        futures = {i: b.submit(one_request(i, cands=1 + i % 4)) for i in range(12)}
        for i, f in futures.items():
            out = f.result(5)
            assert out.shape == (1 + i % 4, H) and (out == i).all()
            t = f.timing
            assert t.e2e >= t.queue >= 0 and t.batch_candidates <= 16 and t.batch_requests >= 1
    assert sorted(i for batch in fake.batches for i in batch) == list(range(12))
    assert b.stats()["completed"] == 12


def test_full_batches_go_at_once_and_respect_the_limits():
    fake = FakeRanker()
    b = DynamicBatcher(fake, max_batch_candidates=8, max_batch_requests=3, max_wait_s=5.0)
    t0 = time.perf_counter()
    futures = [b.submit(one_request(i, cands=4)) for i in range(8)]
    for f in futures:
        f.result(4)                               # full batches never wait for max_wait_s
    assert time.perf_counter() - t0 < 4.0
    lone = b.submit(one_request(8, cands=3))      # not full: waits for company until max_wait_s
    time.sleep(0.2)
    assert not lone.done()
    b.close()                                     # closing flushes it
    assert (lone.result(0) == 8).all()
    # 2 x 4 = 8 candidates each (formed in FIFO order; workers may call dispatch in any order)
    assert sorted(fake.batches[:4]) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    b2 = DynamicBatcher(FakeRanker(), max_batch_candidates=100, max_batch_requests=3, max_wait_s=5.0)
    fs = [b2.submit(one_request(i, cands=1)) for i in range(6)]
    [f.result(4) for f in fs]
    assert all(len(batch) <= 3 for batch in b2.ranker.batches)
    b2.close()


def test_a_lone_request_waits_at_most_max_wait():
    fake = FakeRanker()
    with DynamicBatcher(fake, max_batch_candidates=256, max_wait_s=0.05) as b:
        f = b.submit(one_request(1))
        f.result(5)
        assert 0.045 <= f.timing.queue < 1.0
    with DynamicBatcher(FakeRanker(), max_batch_candidates=256, max_wait_s=0.0) as b:
        f = b.submit(one_request(2))
        f.result(5)
        assert f.timing.queue < 0.5


def test_busy_wait_holds_a_partial_batch_only_while_another_is_in_flight():
    gate = threading.Event()
    fake = FakeRanker(gate=gate)
    with DynamicBatcher(fake, max_batch_candidates=256, max_wait_s=0.01, busy_wait_s=0.3,
                        pipeline_depth=2) as b:
        first = b.submit(one_request(1))
        wait_until(lambda: len(fake.batches) == 1)      # in flight, held by the gate
        second = b.submit(one_request(2))
        time.sleep(0.15)                                # past max_wait_s, within busy_wait_s
        assert len(fake.batches) == 1                   # still filling: the device is busy
        wait_until(lambda: len(fake.batches) == 2, timeout=2.0)
        gate.set()
        assert (second.result(5) == 2).all() and 0.29 <= second.timing.queue < 1.5
        assert (first.result(5) == 1).all()
    with DynamicBatcher(FakeRanker(), max_batch_candidates=256, max_wait_s=0.01,
                        busy_wait_s=5.0) as b:              # nothing in flight: max_wait_s only
        f = b.submit(one_request(3))
        f.result(2)
        assert f.timing.queue < 1.0


def test_back_pressure_raises_overloaded_when_the_queue_is_full():
    gate = threading.Event()
    fake = FakeRanker(gate=gate)
    b = DynamicBatcher(fake, max_batch_candidates=4, max_wait_s=0.0, max_queue_requests=3,
                       pipeline_depth=1)
    first = b.submit(one_request(0))
    wait_until(lambda: fake.batches)                      # taken: the "device" holds it
    queued = [b.submit(one_request(i)) for i in (1, 2, 3)]
    with pytest.raises(Overloaded, match="queue full .*max_queue_requests=3"):
        b.submit(one_request(4))
    assert b.stats()["overloaded"] == 1 and b.queued() == 3
    gate.set()
    for i, f in enumerate([first] + queued):
        assert (f.result(5) == i).all()
    b.submit(one_request(5)).result(5)                    # space again
    b.close()
    bc = DynamicBatcher(FakeRanker(gate=threading.Event()), max_batch_candidates=8, max_wait_s=0.0,
                        max_queue_candidates=8, pipeline_depth=1)
    bc.submit(one_request(0, cands=4))
    wait_until(lambda: bc.ranker.batches)
    bc.submit(one_request(1, cands=4))
    bc.submit(one_request(2, cands=4))
    with pytest.raises(Overloaded, match="12 candidates|8 candidates"):
        bc.submit(one_request(3, cands=4))
    bc.ranker.gate.set()
    bc.close()


def test_close_drains_or_fails_pending_requests_and_joins():
    gate = threading.Event()
    b = DynamicBatcher(FakeRanker(gate=gate), max_batch_candidates=4, max_wait_s=0.0, pipeline_depth=1)
    inflight = b.submit(one_request(0))
    wait_until(lambda: b.ranker.batches)
    pending = [b.submit(one_request(i)) for i in (1, 2)]
    threading.Timer(0.1, gate.set).start()
    b.close(drain=False)
    assert (inflight.result(0) == 0).all()                # in flight: completed
    for f in pending:
        with pytest.raises(BatcherClosed, match="closed before"):
            f.result(0)
    with pytest.raises(BatcherClosed):
        b.submit(one_request(3))
    assert not b.running()

    b = DynamicBatcher(FakeRanker(), max_batch_candidates=4, max_wait_s=10.0)
    with b:
        fs = [b.submit(one_request(i, cands=1)) for i in range(3)]   # would wait 10 s for more
    assert all(f.done() for f in fs) and [int(f.result()[0, 0]) for f in fs] == [0, 1, 2]
    assert b.closed and not b.running()


def test_many_client_threads():
    fake = FakeRanker()
    results, errors = {}, []

    def client(k):
        try:
            for j in range(25):
                rid = 100 * k + j
                f = b.submit(one_request(rid, cands=1 + j % 3))
                results[rid] = (f, 1 + j % 3)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    with DynamicBatcher(fake, max_batch_candidates=12, max_wait_s=0.002) as b:
        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for rid, (f, n) in results.items():
            out = f.result(10)
            assert out.shape == (n, H) and (out == rid).all()
    assert not errors and len(results) == 200
    assert sorted(sum(fake.batches, [])) == sorted(results)
    assert b.stats()["completed"] == 200


def test_bad_requests_and_failed_batches_stay_isolated():
    fake = FakeRanker(fail_on=[7])
    with DynamicBatcher(fake, max_batch_candidates=8, max_wait_s=0.001) as b:
        good = b.submit(one_request(1))
        assert (good.result(5) == 1).all()
        bad = one_request(2)
        bad.dense[1, 3] = np.nan
        bad_f = b.submit(bad)
        too_big = b.submit(one_request(3, cands=9))
        neighbour = b.submit(one_request(4))      # submitted right with the bad ones: fine
        assert (neighbour.result(5) == 4).all()
        doomed = b.submit(one_request(7))
        with pytest.raises(RuntimeError, match="device error"):
            doomed.result(5)                      # its whole batch fails with the error ...
        later = b.submit(one_request(8))          # ... and the next batches are fine
        assert (later.result(5) == 8).all()
        with pytest.raises(RequestError, match="dense: contains NaN/inf"):
            bad_f.result(0)
        with pytest.raises(RequestError, match="candidates: 9 candidates exceed .*max_batch_candidates=8"):
            too_big.result(0)
    assert 2 not in sum(fake.batches, []) and 3 not in sum(fake.batches, [])
    assert b.stats()["invalid"] == 2


def test_config_validation():
    for kw, field in ((dict(max_batch_candidates=0), "max_batch_candidates"),
                      (dict(max_wait_s=-1), "max_wait_s"),
                      (dict(busy_wait_s=-1), "busy_wait_s"),
                      (dict(max_queue_requests=0), "max_queue_requests"),
                      (dict(max_queue_candidates=4, max_batch_candidates=8), "max_queue_candidates"),
                      (dict(max_queue_delay_s=0.0), "max_queue_delay_s"),
                      (dict(max_queue_delay_s=-1.0), "max_queue_delay_s"),
                      (dict(pipeline_depth=0), "pipeline_depth")):
        with pytest.raises(ValueError, match=field):
            BatcherConfig(**kw)


# ------------------------------------------------------------------------------ real Ranker

@pytest.fixture(scope="module")
def ranker():
    return Ranker(CFG, build_model(CFG.feature, CFG.selection, CFG.model, 0)[1], **XLA)


def test_batcher_in_front_of_the_ranker(ranker):
    rng = np.random.default_rng(11)
    whole = random_requests(rng, [300, 50, 0, 120, 7, 299], [40, 0, 10, 25, 5, 1],
                            [50, 10, 0, 1, 3, 2], [5, 3, 2, 7, 1, 4], FEAT, labels=False)
    expected = ranker.score(whole)
    singles = split_requests(whole)
    bad = dataclasses.replace(singles[2], categorical=singles[2].categorical + 10_000)
    futures = [None] * 6
    with DynamicBatcher(ranker, max_batch_candidates=32, max_wait_s=0.005, timing=True) as b:
        def client(idx):
            for u in idx:
                futures[u] = b.submit(bad if u == 2 else singles[u])
        threads = [threading.Thread(target=client, args=(idx,)) for idx in ([0, 3], [1, 4], [2, 5])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for u, f in enumerate(futures):
            if u == 2:
                with pytest.raises(RequestError, match="categorical\\[:, 0\\]"):
                    f.result(30)
                continue
            np.testing.assert_allclose(f.result(30), expected[whole.cand_to_req == u],
                                       rtol=1e-5, atol=1e-6)
            t = f.timing
            assert None not in (t.h2d, t.forward, t.d2h) and t.e2e >= t.queue + t.batch - 1e-6
            assert t.h2d_bytes["total"] > 0
