"""Faults at the inputs: dense values beyond the bound and non-chronological sequences at the serving
boundary, a faulty ranker in front of the dynamic batcher (every future still resolves), and event
logs from real exports (a UTF-8 byte-order mark, millisecond timestamps, a huge merge window,
fractional labels)."""
from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import wait

import numpy as np
import pytest

from tests.helpers import random_requests
from tests.test_event_log import FEAT as EV_FEAT
from tests.test_event_log import SEL as EV_SEL
from tests.test_event_log import columns, write_log
from tests.test_serving_batcher import H, FakeRanker, one_request
from tests.test_serving_ranker import CFG, FEAT, SEL, XLA
from transact_jax.data.events import EventLog, EventLogConfig, build_requests
from transact_jax.data.events.columns import INT64_MAX
from transact_jax.data.public import read_interactions_csv, read_movielens
from transact_jax.data.request_rules import DENSE_BOUND
from transact_jax.data.schema import SchemaError
from transact_jax.model.builder import build_model
from transact_jax.serving import DynamicBatcher, Ranker
from transact_jax.serving.batcher import BatchResultMismatch
from transact_jax.serving.validation import request_errors, validate_request

# ------------------------------------------------------------------------------------ serving


def three_requests(seed: int = 0):
    return random_requests(np.random.default_rng(seed), [20, 6, 9], [5, 4, 3], [3, 2, 4], [3, 2, 2],
                           FEAT, labels=False)


def with_dense(req, row: int, value: float):
    dense = req.dense.copy()
    dense[row, 1] = value
    return dataclasses.replace(req, dense=dense)


def with_swapped_rt(req, request: int, position: int):
    """``req`` with tokens ``position - 1`` and ``position`` of request ``request``'s S_RT swapped."""
    t = req.rt.tokens.timestamps.copy()
    i = int(req.rt.offsets[request]) + position
    t[i - 1], t[i] = t[i] + 5, t[i - 1]
    return dataclasses.replace(req, rt=dataclasses.replace(
        req.rt, tokens=dataclasses.replace(req.rt.tokens, timestamps=t)))


def test_dense_values_must_lie_within_the_bound():
    req = three_requests()
    assert DENSE_BOUND == 1e6
    edge = with_dense(with_dense(req, 0, DENSE_BOUND), 1, -DENSE_BOUND)
    assert request_errors(edge, FEAT, SEL) == {}                      # the bound itself is fine
    bad = with_dense(req, 3, 1e30)                                    # candidate 3: request 1
    errors = request_errors(bad, FEAT, SEL)
    assert list(errors) == [1] and errors[1].field == "dense"
    assert str(errors[1]) == ("request 1 (request_id 1): dense: value 1e+30 is outside "
                              "[-1e+06, 1e+06] (DENSE_BOUND; scale the feature)")
    with pytest.raises(SchemaError, match=r"dense: value -2e\+06 is outside .* \(request 0\)"):
        dataclasses.replace(with_dense(req, 0, -2e6), labels=np.zeros((7, FEAT.num_heads), np.uint8)
                            ).validate(FEAT, SEL)
    nan = with_dense(bad, 4, np.nan)                                  # NaN keeps its own message
    assert request_errors(nan, FEAT, SEL)[1].problem == "contains NaN/inf"


def test_sequences_must_be_chronological():
    req = three_requests()
    swapped = with_swapped_rt(req, 2, 2)
    errors = request_errors(swapped, FEAT, SEL)
    assert list(errors) == [2] and errors[2].field == "rt.tokens.timestamps"
    t = swapped.rt.sequence(2).timestamps
    assert errors[2].problem == (f"token 2 (timestamp {t[2]}) is earlier than token 1 (timestamp "
                                 f"{t[1]}): sequences must be chronological, oldest first")
    single = validate_request(with_swapped_rt(one_request(5), 0, 4), FEAT, SEL)
    assert single.field == "rt.tokens.timestamps" and "token 4 " in single.problem
    # equal timestamps are chronological; a later sequence may start before the previous one ends
    t = req.ll.tokens.timestamps.copy()
    t[1] = t[0]
    t[int(req.ll.offsets[1])] = t[0] - 100
    ties = dataclasses.replace(req, ll=dataclasses.replace(
        req.ll, tokens=dataclasses.replace(req.ll.tokens, timestamps=t)))
    assert request_errors(ties, FEAT, SEL) == {}


def test_ranker_reports_both_faults_per_request_and_scores_the_rest():
    ranker = Ranker(CFG, build_model(CFG.feature, CFG.selection, CFG.model, 0)[1], **XLA)
    req = three_requests()
    bad = with_swapped_rt(with_dense(req, 3, 1e30), 2, 1)
    result = ranker.score_batch(bad)
    assert {u: e.field for u, e in result.errors.items()} == {1: "dense", 2: "rt.tokens.timestamps"}
    good = req.cand_to_req == 0
    assert np.isfinite(result.probs[good]).all() and np.isnan(result.probs[~good]).all()
    np.testing.assert_allclose(result.probs[good], ranker.score(req)[good], rtol=1e-5, atol=1e-6)


class _ShortRanker(FakeRanker):
    """A FakeRanker whose results are broken by ``fault``: "requests" (one result fewer than the
    batch's requests), "rows" (the last request's result loses a row) or "raise"."""

    def __init__(self, fault: str):
        super().__init__()
        self.fault = fault

    def dispatch(self, parts, timing=False):
        inflight = super().dispatch(parts, timing)
        finish = inflight.finish

        def broken():
            if self.fault is None:
                return finish()
            if self.fault == "raise":
                raise RuntimeError("scoring failed on the device")
            outs, report = finish()
            if self.fault == "requests":
                return outs[:-1], report
            return outs[:-1] + [outs[-1][:-1]], report

        inflight.finish = broken
        return inflight


@pytest.mark.parametrize("fault,error,match", [
    ("requests", BatchResultMismatch, "returned 2 results for a batch of 3 requests"),
    ("rows", BatchResultMismatch, "returned 3 rows for request 2 of the batch, which has 4 candidates"),
    ("raise", RuntimeError, "scoring failed on the device"),
])
def test_a_faulty_ranker_fails_every_future_of_its_batch(fault, error, match):
    fake = _ShortRanker(fault)
    b = DynamicBatcher(fake, max_batch_candidates=12, max_batch_requests=3, max_wait_s=5.0)
    try:
        futures = [b.submit(one_request(i)) for i in range(6)]         # two full batches of 3
        done, pending = wait(futures, timeout=10)
        assert not pending, "a future was left pending"
        for f in futures:
            with pytest.raises(error, match=match):
                f.result(0)
        assert sorted(fake.batches) == [[0, 1, 2], [3, 4, 5]] and b.stats()["failed"] == 6
        fake.fault = None                                               # the batcher goes on
        later = [b.submit(one_request(i)) for i in (9, 10, 11)]
        assert [int(f.result(10)[0, 0]) for f in later] == [9, 10, 11]
    finally:
        b.close(drain=False, timeout=10)
    assert not b.running()


def test_a_fault_while_resolving_still_resolves_every_future():
    """Even a malformed report (no "prep" time) fails the batch instead of killing its worker."""
    fake = FakeRanker()
    b = DynamicBatcher(fake, max_batch_candidates=8, max_batch_requests=2, max_wait_s=5.0)
    original = fake.dispatch
    broke = threading.Event()

    def dispatch(parts, timing=False):
        inflight = original(parts, timing)
        finish = inflight.finish

        def no_prep():
            outs, report = finish()
            if broke.is_set():
                return outs, report
            broke.set()
            return outs, dataclasses.replace(report, times={})

        inflight.finish = no_prep
        return inflight

    fake.dispatch = dispatch
    try:
        first = [b.submit(one_request(i)) for i in range(2)]
        assert not wait(first, timeout=10).not_done
        assert all(isinstance(f.exception(0), KeyError) for f in first)
        second = [b.submit(one_request(i)) for i in (2, 3)]
        assert [f.result(10).shape for f in second] == [(4, H), (4, H)]
    finally:
        b.close(drain=False, timeout=10)


# --------------------------------------------------------------------------------- event logs

def test_csv_with_a_byte_order_mark(tmp_path):
    paths = write_log(tmp_path, "csv")
    for p in paths:
        p.write_text(p.read_text(encoding="utf-8"), encoding="utf-8-sig")   # spreadsheet export
        assert p.read_bytes().startswith(b"\xef\xbb\xbf")
    got = build_requests(EventLog.load(*paths), EV_FEAT, EV_SEL)
    want = build_requests(EventLog.load(*columns()), EV_FEAT, EV_SEL)
    np.testing.assert_array_equal(got.rt.tokens.timestamps, want.rt.tokens.timestamps)
    np.testing.assert_array_equal(got.request_id, want.request_id)
    ratings = tmp_path / "ratings.csv"
    ratings.write_text("userId,movieId,rating,timestamp\n1,2,4.5,100\n", encoding="utf-8-sig")
    assert read_movielens(ratings).item_id.tolist() == [2]
    generic = tmp_path / "interactions.csv"
    generic.write_text("user_id,item_id,timestamp,action\n1,2,100,click\n", encoding="utf-8-sig")
    assert read_interactions_csv(generic).user_id.tolist() == [1]


T0 = 1_600_000_000    # seconds


def shifted(scale: int, jitter: int = 0):
    """The hand-made log with timestamps ``(t + T0) * scale + jitter`` (events and requests)."""
    events, items, requests = columns()
    events = {**events, "timestamp": (events["timestamp"] + T0) * scale + jitter}
    requests = {**requests, "timestamp": (requests["timestamp"] + T0) * scale + jitter}
    return events, items, requests


def test_millisecond_timestamps_need_timestamp_unit():
    want = build_requests(EventLog.load(*shifted(1)), EV_FEAT, EV_SEL)
    with pytest.raises(SchemaError, match=r"^events\.timestamp: values look like milliseconds "
                                          r"\(median 1\.6e12\), not seconds; set timestamp_unit='ms'$"):
        EventLog.load(*shifted(1000))
    for unit, scale in (("ms", 1000), ("us", 1_000_000)):
        cfg = EventLogConfig(timestamp_unit=unit)
        got = build_requests(EventLog.load(*shifted(scale, jitter=scale // 2), cfg=cfg), EV_FEAT,
                             EV_SEL, cfg)
        for name in ("ll", "rt", "imp"):                     # the 1-hour window is still one hour
            np.testing.assert_array_equal(getattr(got, name).tokens.timestamps,
                                          getattr(want, name).tokens.timestamps)
            np.testing.assert_array_equal(getattr(got, name).tokens.actions,
                                          getattr(want, name).tokens.actions)
        np.testing.assert_array_equal(got.request_timestamp, want.request_timestamp)
    with pytest.raises(SchemaError, match="look like microseconds .*set timestamp_unit='us'"):
        EventLog.load(*shifted(1_000_000), cfg=EventLogConfig(timestamp_unit="ms"))
    events, items, requests = shifted(1)
    with pytest.raises(SchemaError, match="^requests.timestamp: values look like milliseconds"):
        EventLog.load(events, items, {**requests, "timestamp": requests["timestamp"] * 1000})
    with pytest.raises(SchemaError, match="timestamp_unit"):
        EventLogConfig(timestamp_unit="ns")


def test_merge_window_near_the_int64_maximum_does_not_overflow():
    log = EventLog.load(*columns())
    want = build_requests(log, EV_FEAT, EV_SEL, EventLogConfig(merge_window_s=10**12))
    for window in (INT64_MAX, INT64_MAX - 50):
        got = build_requests(log, EV_FEAT, EV_SEL, EventLogConfig(merge_window_s=window))
        for name in ("ll", "rt"):
            np.testing.assert_array_equal(getattr(got, name).offsets, getattr(want, name).offsets)
            np.testing.assert_array_equal(getattr(got, name).tokens.actions,
                                          getattr(want, name).tokens.actions)
    with pytest.raises(SchemaError, match="merge_window_s"):
        EventLogConfig(merge_window_s=INT64_MAX + 1)


@pytest.mark.parametrize("click,shown", [
    (np.array([1, 1, 0, 0.5, 0]), "0.5"),
    (np.array(["1", "1", "0", " 0.5", "0"]), "0.5"),                     # CSV text
    (np.array([1, 1, 0, 2, 0]), "2"),
    (np.array([1, 1, 0, np.nan, 0]), "nan"),
])
def test_a_label_that_is_not_0_or_1_is_reported_as_it_is(click, shown):
    events, items, requests = columns()
    with pytest.raises(SchemaError, match=f"^requests.click: row 3: label {shown} is not 0 or 1$"):
        EventLog.load(events, items, {**requests, "click": click})
    ok = EventLog.load(events, items, {**requests, "click": np.array(["1.0", "0", "1", " 0 ", "0"])})
    assert ok.requests.labels[:, 0].tolist() == [1, 0, 1, 0, 0]


def test_event_log_dense_beyond_the_bound():
    events, items, requests = columns()
    with pytest.raises(SchemaError, match=r"^requests.dense_0: row 2: value 1e\+30 is outside"):
        EventLog.load(events, items, {**requests, "dense_0": np.array([0.5, 1.0, 1e30, 0.0, 0.0])})
