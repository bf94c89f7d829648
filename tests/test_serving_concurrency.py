"""Serving under concurrency: batches prepared in parallel by the batcher's workers, admission
control, shutdown with batches in flight, the staging pool under contention, and the vectorized
collation against the per-request loop it replaced.

Policy tests drive the batcher with a stand-in for the Ranker whose batch preparation and "device"
take random, short times; the end-to-end test runs many client threads against a real tiny Ranker
and pins every request's scores to ``Ranker.score`` of that request alone.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time
from concurrent.futures import wait

import jax
import numpy as np
import pytest

from tests.helpers import random_requests
from tests.test_serving_batcher import H, FakeRanker, one_request, wait_until
from tests.test_serving_ranker import CFG, FEAT, SEL, XLA
from transact_jax.model.builder import build_model
from transact_jax.serving import BatcherClosed, BucketConfig, DynamicBatcher, Overloaded, Ranker
from transact_jax.serving import collate
from transact_jax.serving.collate import TOKEN_FIELDS, plan, write_broadcast, write_dedup
from transact_jax.serving.layout import FAMILIES, layout_for
from transact_jax.serving.staging import Stager


class SlowRanker(FakeRanker):
    """A :class:`FakeRanker` whose ``dispatch`` (batch preparation) and ``finish`` (the device) take
    ``prep_s`` and ``device_s`` seconds (with ``jitter``: a random time up to that); records the
    most batches it ever had in flight at once and which threads prepared them. ``hold`` (request
    id -> Event) keeps the result of that request's batch back until the event is set."""

    def __init__(self, prep_s=0.0, device_s=0.0, jitter=True, seed=0, hold=None, **kw):
        super().__init__(**kw)
        self.prep_s, self.device_s, self.jitter, self.hold = prep_s, device_s, jitter, hold or {}
        self.rng = np.random.default_rng(seed)
        self.active = self.most_active = 0
        self.threads = set()

    def _sleep(self, secs):
        if self.jitter:
            with self.lock:
                secs = float(self.rng.uniform(0, secs))
        time.sleep(secs)

    def dispatch(self, parts, timing=False):
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            self.threads.add(threading.current_thread().name)
        self._sleep(self.prep_s)
        inflight = super().dispatch(parts, timing)
        finish = inflight.finish

        def slow_finish():
            try:
                for p in parts:
                    event = self.hold.get(int(p.request_id[0]))
                    if event is not None:
                        assert event.wait(10), "test hold never released"
                self._sleep(self.device_s)
                return finish()
            finally:
                with self.lock:
                    self.active -= 1

        inflight.finish = slow_finish
        return inflight


def count_resolutions(futures):
    """{index: how many times the future's done-callbacks ran} (a future resolves once)."""
    counts = collections.Counter()
    lock = threading.Lock()

    def done(i):
        def callback(_):
            with lock:
                counts[i] += 1
        return callback

    for i, f in enumerate(futures):
        f.add_done_callback(done(i))
    return counts


# ------------------------------------------------------------------------- parallel workers

def test_many_clients_each_request_scored_exactly_once_by_parallel_workers():
    fake = SlowRanker(prep_s=0.004, device_s=0.004, seed=1)
    futures, errors, lock = {}, [], threading.Lock()

    def client(k):
        try:
            for j in range(30):
                rid = 1000 * k + j
                f = b.submit(one_request(rid, cands=1 + (k + j) % 4))
                with lock:
                    futures[rid] = (f, 1 + (k + j) % 4)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    b = DynamicBatcher(fake, max_batch_candidates=10, max_wait_s=0.001, pipeline_depth=3,
                       validate=False)
    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = sorted(futures)
    counts = count_resolutions([futures[i][0] for i in ids])
    b.close(drain=True, timeout=30)
    assert not errors and len(ids) == 240 and not b.running()
    for rid in ids:
        f, n = futures[rid]
        out = f.result(0)
        assert out.shape == (n, H) and (out == rid).all()
    assert set(counts.values()) == {1} and len(counts) == 240            # every future once
    dispatched = sum(fake.batches, [])
    assert sorted(dispatched) == ids                                       # none lost or duplicated
    assert all(sum(1 + (i // 1000 + i % 1000) % 4 for i in batch) <= 10 for batch in fake.batches)
    assert fake.most_active <= 3 and len(fake.threads) <= 3             # pipeline_depth workers
    stats = b.stats()
    assert stats["completed"] == 240 and stats["batches"] == len(fake.batches)
    assert "failed" not in stats and b.in_flight() == 0


def test_batches_are_formed_fifo():
    fake = SlowRanker(prep_s=0.003, device_s=0.003, seed=2)
    with DynamicBatcher(fake, max_batch_candidates=12, max_wait_s=0.002, pipeline_depth=3,
                        validate=False) as b:
        futures = [b.submit(one_request(i, cands=1 + i % 5)) for i in range(150)]
        assert not wait(futures, timeout=30).not_done
    # each batch is a run of consecutive requests, and together they are every request in order
    batches = sorted(fake.batches)
    assert all(batch == list(range(batch[0], batch[0] + len(batch))) for batch in batches)
    assert sum(batches, []) == list(range(150))


def test_a_slow_batch_does_not_hold_back_the_others():
    hold = {0: threading.Event()}
    fake = SlowRanker(hold=hold)
    with DynamicBatcher(fake, max_batch_candidates=4, max_wait_s=0.0, pipeline_depth=3) as b:
        slow = b.submit(one_request(0))
        wait_until(lambda: fake.batches)
        later = [b.submit(one_request(i)) for i in (1, 2, 3, 4)]
        for i, f in enumerate(later, start=1):
            assert (f.result(5) == i).all()                  # completed while batch 0 waits
        assert not slow.done()
        hold[0].set()
        assert (slow.result(5) == 0).all()


# -------------------------------------------------------------------------- admission control

def test_overload_is_rejected_at_once_and_accepted_requests_keep_their_latency():
    # capacity: 2 batches of 16 candidates per 20 ms = 1,600 candidates/s; offered: twice that
    fake = SlowRanker(device_s=0.02, jitter=False)
    b = DynamicBatcher(fake, max_batch_candidates=16, max_wait_s=0.001, pipeline_depth=2,
                       max_queue_requests=100_000, max_queue_delay_s=0.03, validate=False)
    requests = [one_request(i, cands=4) for i in range(800)]
    accepted, rejected = [], 0
    t0 = time.perf_counter()
    for i, req in enumerate(requests):                       # open loop: 800 requests/s for 1 s
        time.sleep(max(0.0, t0 + i / 800 - time.perf_counter()))
        try:
            accepted.append(b.submit(req))
        except Overloaded as e:
            assert "max_queue_delay_s=0.03" in str(e)
            rejected += 1
    assert not wait(accepted, timeout=20).not_done
    b.close()
    assert all(f.exception() is None for f in accepted)
    assert 0.2 * 800 < rejected < 0.8 * 800                              # about half is excess
    assert b.stats()["overloaded"] == rejected and b.stats()["completed"] == len(accepted)
    queue_s = np.array([f.timing.queue for f in accepted])
    # without admission control the queue grows by ~400 requests/s: ~1 s of queueing at the end,
    # p90 ~0.9 s (p90, not p99: a stall of the whole machine delays a few requests however admitted)
    assert np.percentile(queue_s, 90) < 0.2, np.percentile(queue_s, [50, 90, 99])
    assert 500 < b.throughput() < 5000


def test_no_delay_rejection_before_any_batch_completed():
    gate = threading.Event()
    fake = FakeRanker(gate=gate)
    b = DynamicBatcher(fake, max_batch_candidates=4, max_wait_s=0.0, pipeline_depth=1,
                       max_queue_delay_s=1e-9)
    futures = [b.submit(one_request(i)) for i in range(5)]   # nothing has completed: no estimate
    assert b.throughput() is None
    gate.set()
    assert not wait(futures, timeout=5).not_done
    assert b.throughput() > 0
    with pytest.raises(Overloaded, match="estimated queueing delay .*max_queue_delay_s=1e-09"):
        b.submit(one_request(9))                                # now 1 ns is never enough
    b.close()


# ---------------------------------------------------------------------------------- shutdown

@pytest.mark.parametrize("drain", [True, False])
def test_close_with_batches_in_flight(drain):
    hold = {i: threading.Event() for i in range(3)}
    fake = SlowRanker(hold=hold)
    b = DynamicBatcher(fake, max_batch_candidates=4, max_wait_s=0.0, pipeline_depth=3)
    in_flight = [b.submit(one_request(i)) for i in range(3)]
    wait_until(lambda: len(fake.batches) == 3)               # three batches held "on the device"
    queued = [b.submit(one_request(i)) for i in range(3, 7)]
    assert b.in_flight() == 3 and b.queued() == 4
    assert fake.most_active == 3 and len(fake.threads) == 3               # each on its own worker
    closer = threading.Thread(target=b.close, kwargs=dict(drain=drain))
    closer.start()
    time.sleep(0.05)
    assert closer.is_alive() and not any(f.done() for f in in_flight)   # waits for them
    with pytest.raises(BatcherClosed):
        b.submit(one_request(9))
    for event in hold.values():
        event.set()
    closer.join(10)
    assert not closer.is_alive() and not b.running()
    for i, f in enumerate(in_flight):
        assert (f.result(0) == i).all()                      # in flight: always completed
    for i, f in enumerate(queued, start=3):
        if drain:
            assert (f.result(0) == i).all()
        else:
            with pytest.raises(BatcherClosed, match="closed before"):
                f.result(0)
    assert b.stats().get("abandoned", 0) == (0 if drain else 4)


def test_close_with_a_timeout_returns_while_a_batch_is_stuck():
    hold = {0: threading.Event()}
    b = DynamicBatcher(SlowRanker(hold=hold), max_batch_candidates=4, max_wait_s=0.0)
    stuck = b.submit(one_request(0))
    wait_until(lambda: b.in_flight() == 1)
    t0 = time.perf_counter()
    b.close(drain=False, timeout=0.2)
    assert 0.15 < time.perf_counter() - t0 < 2.0 and b.running() and not stuck.done()
    hold[0].set()
    assert (stuck.result(5) == 0).all()
    b.close()                                                 # now joins everything
    assert not b.running()


# ------------------------------------------------------------------------------ staging pool

def test_stager_acquire_waits_for_a_free_arena_and_never_allocates_more():
    lay = layout_for(BucketConfig.for_selection(SEL, 64, 8).dedup(10, 2, (100, 10, 10)), FEAT)
    st = Stager(jax.devices()[0], pinned=False, slots=2)
    st.preallocate(lay)
    first, second = st.acquire(lay), st.acquire(lay)
    got = []
    waiter = threading.Thread(target=lambda: got.append(st.acquire(lay)))
    waiter.start()
    time.sleep(0.1)
    assert waiter.is_alive() and not got                      # all slots busy: it waits
    st.release(second)
    waiter.join(5)
    assert got == [second] and st.allocations == 2
    assert st.allocated_bytes() == 2 * lay.nbytes
    st.release(first)
    st.release(got[0])
    st.preallocate(lay)                                       # already full: nothing new
    assert st.allocations == 2


# --------------------------------------------------------------------------- real Ranker

@pytest.fixture(scope="module")
def ranker():
    return Ranker(CFG, build_model(CFG.feature, CFG.selection, CFG.model, 0)[1], staging_slots=3,
                  **XLA)


def test_concurrent_clients_get_the_scores_of_each_request_alone(ranker):
    rng = np.random.default_rng(5)
    # S_LL up to 350 and S_RT up to 45: some requests are truncated while collated
    requests = [random_requests(rng, [int(rng.integers(0, 351))], [int(rng.integers(0, 46))],
                                [int(rng.integers(0, 51))], [int(rng.integers(1, 7))], FEAT,
                                labels=False) for _ in range(36)]
    assert any(int(r.ll.lengths[0]) > SEL.max_ll_len for r in requests)
    ranker.warmup({ranker.bucket_for([r]) for r in requests})   # one bucket, all its arenas
    expected = [ranker.score(r) for r in requests]            # each alone, one at a time
    allocations = ranker._stager.allocations
    futures = [None] * len(requests)
    # <= 6 requests of <= 6 candidates: every batch in the bucket the references compiled
    b = DynamicBatcher(ranker, max_batch_candidates=32, max_batch_requests=6, max_wait_s=0.002,
                       pipeline_depth=3)

    def client(idx):
        for u in idx:
            futures[u] = b.submit(requests[u])

    threads = [threading.Thread(target=client, args=(range(k, len(requests), 6),)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = count_resolutions(futures)
    b.close(timeout=60)
    assert set(counts.values()) == {1} and len(counts) == len(requests)
    for r, f, want in zip(requests, futures, expected):
        got = f.result(0)
        assert got.shape == (r.num_candidates, FEAT.num_heads)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert b.stats()["completed"] == len(requests)
    assert max(f.timing.batch_requests for f in futures) > 1                   # really batched
    assert ranker._stager.allocations == allocations == ranker.config.staging_slots  # reused


# ---------------------------------------------------------------- collation vs the old loop

def reference_dedup(views, parts, sel):
    """The per-request collation loop that the vectorized one replaced."""
    limits = sel.max_lengths
    for fam in FAMILIES:
        tok = req = 0
        for p in parts:
            seqs = getattr(p, fam)
            for u in range(p.num_requests):
                hi = int(seqs.offsets[u + 1])
                lo = max(int(seqs.offsets[u]), hi - limits[fam])
                views[f"{fam}.lengths"][req], views[f"{fam}.offsets"][req] = hi - lo, tok
                for field in TOKEN_FIELDS:
                    views[f"{fam}.{field}"][tok:tok + hi - lo] = getattr(seqs.tokens, field)[lo:hi]
                tok, req = tok + hi - lo, req + 1
        views[f"{fam}.lengths"][req:] = 0
        views[f"{fam}.offsets"][req:] = tok
    start = req = 0
    for p in parts:
        views["cand_to_req"][start:start + p.num_candidates] = p.cand_to_req + req
        start, req = start + p.num_candidates, req + p.num_requests
    views["cand_to_req"][start:] = req
    reference_candidates(views, parts, start)


def reference_broadcast(views, parts, sel):
    limits = sel.max_lengths
    row = 0
    for p in parts:
        for c in range(p.num_candidates):
            u = int(p.cand_to_req[c])
            for fam in FAMILIES:
                seqs = getattr(p, fam)
                hi = int(seqs.offsets[u + 1])
                lo = max(int(seqs.offsets[u]), hi - limits[fam])
                views[f"{fam}.lengths"][row] = hi - lo
                for field in TOKEN_FIELDS:
                    views[f"{fam}.{field}"][row, :hi - lo] = getattr(seqs.tokens, field)[lo:hi]
            row += 1
    for fam in FAMILIES:
        views[f"{fam}.lengths"][row:] = 0
    reference_candidates(views, parts, row)


def reference_candidates(views, parts, n):
    for name in ("cand_embedding", "dense", "categorical"):
        views[name][:n] = np.concatenate([getattr(p, name) for p in parts])
        views[name][n:] = 0


def mixed_parts(seed=0):
    """Single requests (over-long or not), several-request parts with and without a truncated
    request, empty sequences, non-contiguous candidates."""
    rng = np.random.default_rng(seed)

    def part(ll, rt, imp, cands):
        return random_requests(rng, ll, rt, imp, cands, FEAT)

    shuffled = part([310, 20, 0], [5, 44, 3], [51, 0, 9], [2, 3, 2])
    shuffled = dataclasses.replace(shuffled, cand_to_req=np.array([0, 1, 2, 1, 0, 1, 2], np.int32))
    return [part([350], [41], [60], [3]), part([120], [0], [7], [2]),
            part([301, 0, 17, 299], [40, 3, 0, 50], [50, 10, 0, 1], [1, 2, 3, 1]),
            part([0], [0], [0], [1]), part([40, 300, 12], [1, 2, 3], [4, 5, 6], [1, 1, 2]),
            shuffled, part([400], [100], [100], [4])]


@pytest.mark.parametrize("layout,gather_below", [("dedup", 0), ("dedup", 10**9), ("broadcast", 0)])
def test_vectorized_collation_equals_the_per_request_loop(layout, gather_below, monkeypatch):
    # truncated parts of several requests: one range per request (0) or one gather (10**9)
    monkeypatch.setattr(collate, "GATHER_BELOW_TOKENS", gather_below)
    parts = mixed_parts(3)
    bplan = plan(parts, SEL)
    assert bplan.truncated_parts["ll"].tolist() == [True, False, True, False, False, True, True]
    lay = layout_for(bplan.bucket(BucketConfig.for_selection(SEL, 64, 16), layout), FEAT)
    got, want = (np.full(lay.nbytes, 0x5A, np.uint8) for _ in range(2))     # same stale bytes
    new, old = (write_dedup, reference_dedup) if layout == "dedup" else (write_broadcast,
                                                                         reference_broadcast)
    new(lay.views(got), parts, bplan)
    old(lay.views(want), parts, SEL)
    for name, view in lay.views(got).items():
        np.testing.assert_array_equal(view, lay.views(want)[name], err_msg=name)
    np.testing.assert_array_equal(got, want)
    # every part on its own, a single part, and a batch of single requests
    for batch in ([parts[2]], [parts[0]], parts[:2] + parts[3:4]):
        bp = plan(batch, SEL)
        lay = layout_for(bp.bucket(BucketConfig.for_selection(SEL, 64, 16), layout), FEAT)
        got, want = (np.full(lay.nbytes, 0x33, np.uint8) for _ in range(2))
        new(lay.views(got), batch, bp)
        old(lay.views(want), batch, SEL)
        np.testing.assert_array_equal(got, want)
