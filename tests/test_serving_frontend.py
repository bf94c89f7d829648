"""Serving from several processes: the shared-memory slot codec, and front ends in front of one
engine host (scores pinned to ``Ranker.score``, every future resolved exactly once, back-pressure,
shutdown, refused and reconnecting front ends, real front-end processes)."""
from __future__ import annotations

import collections
import dataclasses
import multiprocessing
import os
import threading
from concurrent.futures import wait
from multiprocessing.connection import Client

import numpy as np
import pytest

from tests.helpers import random_requests
from tests.test_serving_batcher import H, FakeRanker, one_request, wait_until
from tests.test_serving_ranker import CFG, FEAT, SEL, XLA
from transact_jax.data.schema import JaggedSequences
from transact_jax.model.builder import build_model
from transact_jax.serving import BatcherClosed, BatcherConfig, Overloaded, Ranker, RankerConfig, RequestError
from transact_jax.serving import split_requests
from transact_jax.serving.frontend import (
    EngineAddress,
    EngineHost,
    FrontEnd,
    FrontEndConfig,
    HostConfig,
)
from transact_jax.serving.shared_slots import SlotArray, SlotError, SlotSpec


def requests(seed, count, max_cands=6):
    """``count`` single valid requests, ragged (empty and over-long sequences included)."""
    rng = np.random.default_rng(seed)
    ll = rng.integers(0, 360, count)
    ll[::5] = 0
    rt = rng.integers(0, 45, count)
    imp = rng.integers(0, 55, count)
    cands = rng.integers(1, max_cands + 1, count)
    whole = random_requests(rng, ll, rt, imp, cands, FEAT, labels=False)
    return whole, split_requests(whole)


@pytest.fixture(scope="module")
def ranker():
    return Ranker(CFG, build_model(CFG.feature, CFG.selection, CFG.model, 0)[1], **XLA)


# ------------------------------------------------------------------------------- slot codec

def test_slots_round_trip_parts_and_refuse_what_does_not_fit(tmp_path):
    spec = SlotSpec.for_config(FEAT, SEL, requests=4, candidates=20)
    slots = SlotArray.create(spec, 3, str(tmp_path))
    other = SlotArray.attach(slots.path, spec, 3)          # the front end's mapping of the file
    _, singles = requests(1, 7)
    parts = [p.truncate_recent(SEL) for p in singles[:3]]
    u, n = other.write(2, parts)
    got = slots.read(2)
    want = dataclasses.replace(parts[0], **{f: JaggedSequences.concatenate([getattr(p, f) for p in parts])
                                            for f in ("ll", "rt", "imp")})
    assert (u, n) == (3, sum(p.num_candidates for p in parts)) == (got.num_requests, got.num_candidates)
    for fam in ("ll", "rt", "imp"):
        a, b = getattr(got, fam), getattr(want, fam)
        np.testing.assert_array_equal(a.offsets, b.offsets)
        for field in ("timestamps", "actions", "surfaces", "embeddings"):
            np.testing.assert_array_equal(getattr(a.tokens, field), getattr(b.tokens, field))
    for name in ("user_id", "request_id", "cand_item_id", "cand_embedding", "dense", "categorical"):
        np.testing.assert_array_equal(getattr(got, name),
                                      np.concatenate([getattr(p, name) for p in parts]))
    np.testing.assert_array_equal(got.cand_to_req, np.repeat(np.arange(3), [p.num_candidates for p in parts]))
    got.validate(FEAT, SEL)                                  # a valid RequestBatch, as read
    probs = np.random.default_rng(0).random((n, H)).astype(np.float32)
    slots.write_result(2, probs)
    np.testing.assert_array_equal(other.read_result(2, n), probs)
    with pytest.raises(SlotError, match="requests: 5 requests exceed"):
        other.write(0, [p.truncate_recent(SEL) for p in singles[:5]])
    with pytest.raises(SlotError, match="ll.tokens"):
        long = dataclasses.replace(singles[0], ll=random_requests(
            np.random.default_rng(2), [SEL.max_ll_len * 4 + 1], [0], [0], [1], FEAT).ll)
        other.write(0, [long])
    with pytest.raises(SlotError, match="holds no part"):
        slots.read(1)
    other.write(1, parts[:1])
    slots._views[1]["ll.offsets"][1] += 7                    # a torn slot is an error, not a batch
    with pytest.raises(SlotError, match="ll.offsets"):
        slots.read(1)
    with pytest.raises(SlotError, match="out of range"):
        slots.read(3)
    with pytest.raises(SlotError, match="disagree"):
        SlotArray.attach(slots.path, dataclasses.replace(spec, candidates=21), 3)
    other.close()
    slots.close()
    assert not os.path.exists(slots.path)


# ---------------------------------------------------------------------- one process, threads

def test_front_ends_score_like_the_ranker_under_concurrency(ranker):
    whole, singles = requests(3, 40)
    expected = ranker.score(whole)
    bad = dataclasses.replace(singles[4], categorical=singles[4].categorical + 10_000)
    futures = [None] * len(singles)
    counts = collections.Counter()
    with EngineHost(ranker, BatcherConfig(max_batch_candidates=64, max_wait_s=0.002),
                    HostConfig(max_frontends=3, slots_per_frontend=16, part_requests=3)) as host:
        fronts = [FrontEnd(host.address, FrontEndConfig(part_wait_s=w)) for w in (0.0, 0.001, 0.003)]

        def client(k):
            for u in range(k, len(singles), 6):
                f = fronts[k % 3].submit(bad if u == 4 else singles[u])
                f.add_done_callback(lambda _, u=u: counts.update([u]))
                futures[u] = f

        threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wait(futures, timeout=60)
        for u, f in enumerate(futures):
            if u == 4:
                with pytest.raises(RequestError, match="categorical"):
                    f.result(0)
                continue
            np.testing.assert_allclose(f.result(0), expected[whole.cand_to_req == u], rtol=1e-5, atol=1e-6)
            assert f.t_done >= f.t_submit and 0 < f.batch_candidates <= 64
        for fe in fronts:
            fe.close()
        assert host.batcher.stats()["completed"] >= 1
    assert counts == collections.Counter(range(len(singles)))   # each resolved exactly once


class _HostableFake(FakeRanker):
    """The batcher tests' stand-in Ranker with what an EngineHost reads from a Ranker."""

    feat, sel, config = FEAT, SEL, RankerConfig()


def test_back_pressure_shutdown_and_refusals():
    gate = threading.Event()
    host = EngineHost(_HostableFake(gate=gate), BatcherConfig(max_batch_candidates=16, max_wait_s=0.0,
                                                              max_queue_requests=1, pipeline_depth=1),
                      HostConfig(max_frontends=2, slots_per_frontend=2, part_requests=1))
    fe = FrontEnd(host.address, FrontEndConfig(part_wait_s=0.0))
    first = fe.submit(one_request(1))                 # in the batch held by the gate
    wait_until(lambda: host.batcher.in_flight() == 1)
    second = fe.submit(one_request(2))                # queued on the engine
    third = fe.submit(one_request(3))                 # no free slot left in this front end
    with pytest.raises(Overloaded, match="slots of this front end"):
        third.result(5)
    other = FrontEnd(host.address, FrontEndConfig(part_wait_s=0.0))
    with pytest.raises(Overloaded, match="queue full"):
        other.submit(one_request(4)).result(5)        # the engine's queue bound answers at once
    with pytest.raises(ConnectionRefusedError, match="max_frontends"):
        FrontEnd(host.address)                        # both places are taken
    with pytest.raises(Exception):                    # a wrong key cannot connect
        Client(host.address.path, family="AF_UNIX", authkey=b"not the key")
    gate.set()
    assert (first.result(5) == 1).all() and (second.result(5) == 2).all()
    fe.close()
    wait_until(lambda: host.connected() == 1)
    again = FrontEnd(host.address, FrontEndConfig(part_wait_s=0.0))   # the freed place is reused
    assert (again.submit(one_request(5)).result(5) == 5).all()
    gate.clear()
    held = other.submit(one_request(6))
    wait_until(lambda: host.batcher.in_flight() == 1)
    queued = again.submit(one_request(7))
    wait_until(lambda: host.batcher.queued() == 1)
    closer = threading.Thread(target=host.close, kwargs=dict(drain=False, timeout=10))
    closer.start()
    wait_until(lambda: host.batcher.closed)
    gate.set()
    closer.join(15)
    assert (held.result(5) == 6).all()                # in flight at close: completes
    with pytest.raises(BatcherClosed):
        queued.result(5)                              # queued at a drain=False close: failed
    late = again.submit(one_request(8))               # the engine is gone
    with pytest.raises((ConnectionError, BatcherClosed)):
        late.result(5)
    other.close()
    again.close()


# ------------------------------------------------------------------------ real processes

def _front_end_process(address: EngineAddress, seed: int, count: int, out) -> None:
    """A front end in its own process: submit ``count`` requests, send back their results."""
    _, singles = requests(seed, count)
    with FrontEnd(address, FrontEndConfig(part_wait_s=0.001)) as fe:
        futures = [fe.submit(r) for r in singles]
        out.send([f.result(120) for f in futures])
    out.close()


def test_front_end_processes(ranker):
    ctx = multiprocessing.get_context("spawn")
    expected = {}
    for seed in (7, 8):
        whole, _ = requests(seed, 12)
        expected[seed] = ranker.score(whole), whole.cand_to_req
    with EngineHost(ranker, BatcherConfig(max_batch_candidates=64, max_wait_s=0.003),
                    HostConfig(max_frontends=2, slots_per_frontend=4, part_requests=4)) as host:
        pipes, procs = {}, []
        env = os.environ.get("JAX_PLATFORMS")
        os.environ["JAX_PLATFORMS"] = "cpu"           # front ends never touch an accelerator
        try:
            for seed in expected:
                mine, theirs = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_front_end_process, args=(host.address, seed, 12, theirs))
                p.start()
                pipes[seed] = mine
                procs.append(p)
        finally:
            os.environ.pop("JAX_PLATFORMS") if env is None else os.environ.update(JAX_PLATFORMS=env)
        for seed, pipe in pipes.items():
            assert pipe.poll(180), "front-end process sent nothing"
            outs = pipe.recv()
            probs, c2r = expected[seed]
            for u, out in enumerate(outs):
                np.testing.assert_allclose(out, probs[c2r == u], rtol=1e-5, atol=1e-6)
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
