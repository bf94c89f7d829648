"""A thread-safe dynamic batcher in front of the :class:`~transact_jax.serving.ranker.Ranker`.

Clients call :meth:`DynamicBatcher.submit` with one request (a single-request ``RequestBatch``) from
any thread and get a :class:`ScoreFuture` resolved with that request's probabilities, (n, H), or
with its own error. Requests wait in a bounded FIFO queue; a dispatcher thread forms a batch when

* the queued requests reach ``max_batch_candidates`` candidates or ``max_batch_requests`` requests,
* or the oldest queued request has waited ``max_wait_s`` ("dynamic batching"), plus ``busy_wait_s``
  while another batch is in flight: the device is busy then, so a non-full batch gains nothing by
  leaving early and a fuller one spreads the per-batch host cost over more candidates,

takes the longest FIFO prefix that fits, and hands it to a worker thread. Each worker (a pool of
``pipeline_depth`` threads) runs one batch from start to end: ``Ranker.dispatch`` (batch
preparation, host-to-device copy, forward launch), then ``InFlight.finish`` (device-to-host copy),
then resolves the batch's futures. Up to ``pipeline_depth`` batches are in flight at once, each
prepared on its own thread: batch preparation is mostly numpy copies, which release the GIL, so
several batches are collated in parallel while the device computes, and a batch waiting for its
result blocks only its own worker. Batches are formed in FIFO order; they may complete out of
order. The dispatcher forms the next batch only when a worker is free, so requests arriving while
every worker is busy join a fuller batch. Keep the Ranker's ``staging_slots`` >= ``pipeline_depth``:
each batch in flight holds one staging arena of its bucket, and a worker waits for a free one.

Every accepted request's future resolves, whatever the ranker does: if ``dispatch`` or ``finish``
raises, or the result does not match the batch (not one (n, H) array per request, with n its
candidates: :class:`BatchResultMismatch`), every future of that batch fails with the error and the
next batches go on.

Validation runs in ``submit`` (the caller's thread): a bad request's future fails at once with a
:class:`~transact_jax.serving.validation.RequestError` naming the field, and never reaches a batch,
so it cannot fail other requests. A request with more candidates than ``max_batch_candidates`` is
rejected the same way.

Back-pressure: when ``max_queue_requests`` requests (or ``max_queue_candidates`` candidates) are
waiting, ``submit`` raises :class:`Overloaded` at once instead of queueing without bound.

Admission control (``max_queue_delay_s``): ``submit`` also raises :class:`Overloaded` at once when
the request's estimated queueing delay, (queued candidates + its candidates) / recent scoring
throughput, exceeds ``max_queue_delay_s``. The throughput (candidates/s, :meth:`throughput`) is an
exponentially weighted moving average over completed batches of their candidates and of the busy
time each one accounts for: from the later of its formation and the previous completion to its own
completion, so idle time is not counted and, under load, it is the rate at which the pipeline
completes candidates. Before any batch has completed nothing is rejected by this rule. Under
overload the excess is rejected at once and accepted requests keep a bounded queueing delay,
instead of every request queueing into seconds of latency.

Shutdown: :meth:`close` (also on leaving a ``with`` block) stops accepting requests (``submit``
raises :class:`BatcherClosed`), then either scores everything still queued (``drain=True``) or fails
it with :class:`BatcherClosed` (``drain=False``); batches already in flight always complete. The
dispatcher and the workers are joined.

Timing: every resolved future carries a :class:`RequestTiming` (``future.timing``): validation,
queueing (submit to batch formation), the batch's phases (with ``BatcherConfig.timing=True`` the
phases are synchronized and each measured; see ``Ranker.dispatch``) and end-to-end latency.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Deque, Dict, List, Optional

import numpy as np

from transact_jax.data.schema import RequestBatch
from transact_jax.serving.validation import RequestError

THROUGHPUT_EWMA_WEIGHT = 0.2   # weight of the newest completed batch in the throughput average


class Overloaded(RuntimeError):
    """The batcher cannot take the request now (queue full, or its estimated queueing delay is
    above ``max_queue_delay_s``): it was not accepted (retry later or add capacity)."""


class BatchResultMismatch(RuntimeError):
    """The ranker's result for a batch does not match its requests (a fault inside the ranker): every
    future of the batch fails with it rather than receiving another request's scores."""


class BatcherClosed(RuntimeError):
    """The batcher is closed: no new requests, and a request still queued at ``close(drain=False)``
    is not scored."""


@dataclasses.dataclass(frozen=True)
class BatcherConfig:
    """Dynamic batching policy (module docstring).

    Attributes:
      max_batch_candidates: most candidates in one batch (the paper's "batch size").
      max_batch_requests: most requests in one batch (None: limited by candidates only).
      max_wait_s: longest time the oldest queued request waits for a fuller batch.
      busy_wait_s: extra wait for a fuller batch while another batch is in flight (0: none).
      max_queue_requests, max_queue_candidates: queue bounds; beyond them ``submit`` raises
        :class:`Overloaded` (None: no candidate bound).
      max_queue_delay_s: admission control: ``submit`` raises :class:`Overloaded` when the
        request's estimated queueing delay exceeds it (None: no such rule; module docstring).
      pipeline_depth: batches in flight at once, each prepared on its own worker thread (keep
        <= the Ranker's ``staging_slots``).
      timing: measure each phase of each batch (synchronizes between phases).
      validate: validate requests in ``submit`` (disable only for requests validated upstream).
    """

    max_batch_candidates: int = 256
    max_batch_requests: Optional[int] = None
    max_wait_s: float = 0.002
    busy_wait_s: float = 0.0
    max_queue_requests: int = 1024
    max_queue_candidates: Optional[int] = None
    max_queue_delay_s: Optional[float] = None
    pipeline_depth: int = 3
    timing: bool = False
    validate: bool = True

    def __post_init__(self):
        if self.max_batch_candidates < 1:
            raise ValueError(f"max_batch_candidates: need >= 1, got {self.max_batch_candidates}")
        if self.max_batch_requests is not None and self.max_batch_requests < 1:
            raise ValueError(f"max_batch_requests: need None or >= 1, got {self.max_batch_requests}")
        for name in ("max_wait_s", "busy_wait_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: need >= 0, got {getattr(self, name)}")
        if self.max_queue_requests < 1:
            raise ValueError(f"max_queue_requests: need >= 1, got {self.max_queue_requests}")
        if self.max_queue_candidates is not None and self.max_queue_candidates < self.max_batch_candidates:
            raise ValueError("max_queue_candidates: must be None or >= max_batch_candidates")
        if self.max_queue_delay_s is not None and not self.max_queue_delay_s > 0:
            raise ValueError(f"max_queue_delay_s: need None or > 0, got {self.max_queue_delay_s}")
        if self.pipeline_depth < 1:
            raise ValueError(f"pipeline_depth: need >= 1, got {self.pipeline_depth}")


@dataclasses.dataclass(frozen=True)
class RequestTiming:
    """Where one request's time went (seconds; batch phases are those of its batch).

    ``validate``: checks in ``submit``; ``queue``: enqueued until its batch was formed; ``prep``,
    ``pin``, ``h2d``, ``forward``, ``d2h``: the batch's phases (only ``prep`` unless
    ``BatcherConfig.timing``); ``batch``: batch formed until its result was on the host;
    ``e2e``: ``submit`` called until the result was set. ``t_submit``/``t_done`` are
    ``time.perf_counter()`` stamps.
    """

    validate: float
    queue: float
    prep: float
    pin: Optional[float]
    h2d: Optional[float]
    forward: Optional[float]
    d2h: Optional[float]
    batch: float
    e2e: float
    batch_requests: int
    batch_candidates: int
    t_submit: float
    t_done: float
    h2d_bytes: Dict[str, int]


class ScoreFuture(Future):
    """A ``concurrent.futures.Future`` of one request's probabilities (n, H), with ``timing`` (a
    :class:`RequestTiming`) set before the result."""

    timing: Optional[RequestTiming] = None


@dataclasses.dataclass
class _Item:
    request: RequestBatch
    future: ScoreFuture
    n: int
    t_submit: float
    t_enqueue: float
    validate_s: float


class DynamicBatcher:
    """See the module docstring. ``DynamicBatcher(ranker, BatcherConfig(...))`` or keyword
    overrides: ``DynamicBatcher(ranker, max_batch_candidates=128, max_wait_s=0.001)``."""

    def __init__(self, ranker, config: Optional[BatcherConfig] = None, **options):
        self.ranker = ranker
        self.config = dataclasses.replace(config or BatcherConfig(), **options)
        self._queue: Deque[_Item] = collections.deque()
        self._queued_candidates = 0
        self._cond = threading.Condition()
        self._closed = False
        self._in_flight = 0                      # batches handed to a worker and not yet resolved
        self._stats = collections.Counter()
        self._avg_candidates: Optional[float] = None   # throughput EWMA terms (module docstring)
        self._avg_busy_s: Optional[float] = None
        self._last_done: Optional[float] = None
        self._worker_threads: List[threading.Thread] = []
        self._workers = ThreadPoolExecutor(self.config.pipeline_depth, "batcher-worker",
                                           initializer=self._register_worker)
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="batcher-dispatch",
                                            daemon=True)
        self._dispatcher.start()

    # ------------------------------------------------------------------------------------ client
    def submit(self, request: RequestBatch) -> ScoreFuture:
        """Queue one request; returns its future. Raises :class:`Overloaded` when the queue is full
        or the request's estimated queueing delay is above ``max_queue_delay_s``, and
        :class:`BatcherClosed` after :meth:`close`. Bad requests get a failed future."""
        t_submit = time.perf_counter()
        if self._closed:
            raise BatcherClosed("submit: the batcher is closed")
        future = ScoreFuture()
        error = self.ranker.validate_request(request) if self.config.validate else None
        cap = self.config.max_batch_candidates
        if error is None and request.num_candidates > cap:
            error = RequestError(0, "candidates", f"{request.num_candidates} candidates exceed the "
                                 f"batcher's max_batch_candidates={cap}; split the request")
        t_valid = time.perf_counter()
        if error is not None:
            with self._cond:
                self._stats["invalid"] += 1
            future.set_exception(error)
            return future
        item = _Item(request, future, request.num_candidates, t_submit, t_valid, t_valid - t_submit)
        with self._cond:
            if self._closed:
                raise BatcherClosed("submit: the batcher is closed")
            refusal = self._refusal(item.n)
            if refusal is not None:
                self._stats["overloaded"] += 1
                raise Overloaded(f"submit: {refusal}: retry later or add capacity")
            self._queue.append(item)
            self._queued_candidates += item.n
            self._stats["submitted"] += 1
            self._cond.notify_all()
        return future

    def close(self, drain: bool = True, timeout: Optional[float] = None) -> None:
        """Stop accepting requests; score (``drain``) or fail the queued ones; wait for the batches
        in flight and join the threads (``timeout``: seconds for all of it, None: no limit)."""
        deadline = None if timeout is None else time.perf_counter() + max(timeout, 0.0)
        with self._cond:
            self._closed = True
            abandoned: List[_Item] = []
            if not drain:
                abandoned = list(self._queue)
                self._queue.clear()
                self._queued_candidates = 0
            self._cond.notify_all()
        for item in abandoned:
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(BatcherClosed(
                    "the batcher was closed before this request was scored"))
                self._count("abandoned")
        self._dispatcher.join(timeout)
        with self._cond:
            while self._in_flight and (deadline is None or deadline > time.perf_counter()):
                self._cond.wait(None if deadline is None else deadline - time.perf_counter())
            idle = not self._in_flight
        if idle and not self._dispatcher.is_alive():
            self._workers.shutdown(wait=True)

    def __enter__(self) -> "DynamicBatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close(drain=True)

    @property
    def closed(self) -> bool:
        return self._closed

    def running(self) -> bool:
        """Whether any of the batcher's threads (dispatcher, workers) is still alive; False once
        :meth:`close` has returned within its timeout."""
        return self._dispatcher.is_alive() or any(t.is_alive() for t in self._worker_threads)

    def queued(self) -> int:
        """Requests waiting in the queue."""
        with self._cond:
            return len(self._queue)

    def in_flight(self) -> int:
        """Batches handed to a worker and not resolved yet."""
        with self._cond:
            return self._in_flight

    def throughput(self) -> Optional[float]:
        """Recent scoring throughput in candidates/s (module docstring); None before any batch has
        completed."""
        with self._cond:
            return self._throughput()

    def stats(self) -> Dict[str, int]:
        """Counters: submitted, overloaded, invalid, batches, completed, failed, abandoned,
        candidates (scored)."""
        with self._cond:
            return dict(self._stats)

    # ----------------------------------------------------------------------------- admission
    def _throughput(self) -> Optional[float]:
        if self._avg_busy_s is None or self._avg_busy_s <= 0:
            return None
        return self._avg_candidates / self._avg_busy_s

    def _refusal(self, n: int) -> Optional[str]:
        """Why a request of ``n`` candidates cannot be queued now, or None (call under the lock)."""
        cfg = self.config
        if len(self._queue) >= cfg.max_queue_requests or (
                cfg.max_queue_candidates is not None
                and self._queued_candidates + n > cfg.max_queue_candidates):
            return (f"queue full ({len(self._queue)} requests, {self._queued_candidates} candidates "
                    f"waiting; max_queue_requests={cfg.max_queue_requests}, "
                    f"max_queue_candidates={cfg.max_queue_candidates})")
        rate = self._throughput()
        if cfg.max_queue_delay_s is not None and rate is not None:
            delay = (self._queued_candidates + n) / rate
            if delay > cfg.max_queue_delay_s:
                return (f"estimated queueing delay {delay * 1e3:.1f} ms ({self._queued_candidates} "
                        f"candidates waiting + {n}, scoring {rate:.0f} candidates/s) exceeds "
                        f"max_queue_delay_s={cfg.max_queue_delay_s}")
        return None

    def _record_throughput(self, candidates: int, t_taken: float) -> None:
        """Fold a completed batch into the throughput average (call under the lock)."""
        now = time.perf_counter()
        busy = now - (t_taken if self._last_done is None else max(t_taken, self._last_done))
        self._last_done = now
        if self._avg_busy_s is None:
            self._avg_candidates, self._avg_busy_s = float(candidates), busy
            return
        w = THROUGHPUT_EWMA_WEIGHT
        self._avg_candidates += w * (candidates - self._avg_candidates)
        self._avg_busy_s += w * (busy - self._avg_busy_s)

    # ----------------------------------------------------------------------------------- workers
    def _count(self, key: str, n: int = 1) -> None:
        with self._cond:
            self._stats[key] += n

    def _register_worker(self) -> None:
        with self._cond:
            self._worker_threads.append(threading.current_thread())

    def _batch_is_full(self) -> bool:
        cfg = self.config
        return self._queued_candidates >= cfg.max_batch_candidates or (
            cfg.max_batch_requests is not None and len(self._queue) >= cfg.max_batch_requests)

    def _next_batch(self) -> Optional[List[_Item]]:
        """The next batch (module docstring), once a worker is free, counted in flight; None once
        closed with nothing left to do."""
        cfg = self.config
        with self._cond:
            while True:
                while self._in_flight >= cfg.pipeline_depth and not (self._closed and not self._queue):
                    self._cond.wait()
                while not self._queue:
                    if self._closed:
                        return None
                    self._cond.wait()
                while not self._closed and not self._batch_is_full():
                    deadline = self._queue[0].t_enqueue + cfg.max_wait_s + (
                        cfg.busy_wait_s if self._in_flight else 0.0)
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                batch: List[_Item] = []
                candidates = 0
                while self._queue:
                    item = self._queue[0]
                    if batch and (candidates + item.n > cfg.max_batch_candidates or (
                            cfg.max_batch_requests is not None
                            and len(batch) >= cfg.max_batch_requests)):
                        break
                    self._queue.popleft()
                    self._queued_candidates -= item.n
                    if item.future.set_running_or_notify_cancel():   # skip cancelled requests
                        batch.append(item)
                        candidates += item.n
                self._cond.notify_all()
                if batch:
                    self._in_flight += 1
                    return batch

    def _fail(self, items: List[_Item], error: BaseException) -> None:
        """Fail the futures of ``items`` not resolved yet with ``error``."""
        pending = [item for item in items if not item.future.done()]
        for item in pending:
            item.future.set_exception(error)
        self._count("failed", len(pending))

    def _dispatch_loop(self) -> None:
        while True:
            items = self._next_batch()
            if items is None:
                return
            t_taken = time.perf_counter()
            try:
                self._workers.submit(self._run_batch, items, t_taken)
            except BaseException as e:  # noqa: BLE001 - e.g. no new threads at interpreter exit
                self._fail(items, e)
                self._batch_done()

    def _batch_done(self) -> None:
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()

    def _run_batch(self, items: List[_Item], t_taken: float) -> None:
        """One batch on a worker thread: prepare, copy and launch, wait for the result, resolve."""
        try:
            inflight = self.ranker.dispatch([it.request for it in items], timing=self.config.timing)
            outs, report = inflight.finish()
            self._resolve(items, list(outs), report, t_taken)
        except BaseException as e:  # noqa: BLE001 - every future of the batch must resolve
            self._fail(items, e)
        finally:
            self._batch_done()

    def _resolve(self, items: List[_Item], outs: List, report, t_taken: float) -> None:
        """Set each request's result (with its timing) from one batch's ``outs``, after checking
        that they match the batch: one array per request, with one row per candidate."""
        if len(outs) != len(items):
            raise BatchResultMismatch(f"the ranker returned {len(outs)} results for a batch of "
                                      f"{len(items)} requests")
        for i, (item, out) in enumerate(zip(items, outs)):
            rows = np.shape(out)[:1]
            if rows != (item.n,):
                raise BatchResultMismatch(f"the ranker returned {rows[0] if rows else 'no'} rows for "
                                          f"request {i} of the batch, which has {item.n} candidates")
        t_done = time.perf_counter()
        times = report.times
        for item, out in zip(items, outs):
            item.future.timing = RequestTiming(
                validate=item.validate_s, queue=t_taken - item.t_enqueue, prep=times["prep"],
                pin=times.get("pin"), h2d=times.get("h2d"), forward=times.get("forward"),
                d2h=times.get("d2h"), batch=t_done - t_taken, e2e=t_done - item.t_submit,
                batch_requests=report.num_requests, batch_candidates=report.num_candidates,
                t_submit=item.t_submit, t_done=t_done, h2d_bytes=report.h2d_bytes)
        with self._cond:   # counted before the results are set: a client sees them up to date
            self._record_throughput(report.num_candidates, t_taken)
            self._stats["batches"] += 1
            self._stats["completed"] += len(items)
            self._stats["candidates"] += report.num_candidates
        for item, out in zip(items, outs):
            item.future.set_result(out)
