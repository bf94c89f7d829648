"""A thread-safe dynamic batcher in front of the :class:`~transact_jax.serving.ranker.Ranker`.

Clients call :meth:`DynamicBatcher.submit` with one request (a single-request ``RequestBatch``) from
any thread and get a :class:`ScoreFuture` resolved with that request's probabilities, (n, H), or
with its own error. Requests wait in a bounded FIFO queue; a dispatcher thread forms a batch when

* the queued requests reach ``max_batch_candidates`` candidates or ``max_batch_requests`` requests,
* or the oldest queued request has waited ``max_wait_s`` ("dynamic batching"),

takes the longest FIFO prefix that fits, and hands it to ``Ranker.dispatch`` (batch preparation,
host-to-device copy, forward launch). A completer thread waits for each batch's result
(device-to-host) and resolves the futures, so that up to ``pipeline_depth`` batches are in flight:
the next batch is prepared and copied while the device still computes the previous one.

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

Shutdown: :meth:`close` (also on leaving a ``with`` block) stops accepting requests (``submit``
raises :class:`BatcherClosed`), then either scores everything still queued (``drain=True``) or fails
it with :class:`BatcherClosed` (``drain=False``); batches already in flight always complete. Both
threads are joined.

Timing: every resolved future carries a :class:`RequestTiming` (``future.timing``): validation,
queueing (submit to batch formation), the batch's phases (with ``BatcherConfig.timing=True`` the
phases are synchronized and each measured; see ``Ranker.dispatch``) and end-to-end latency.
"""
from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
from concurrent.futures import Future
from typing import Deque, Dict, List, Optional

import numpy as np

from transact_jax.data.schema import RequestBatch
from transact_jax.serving.validation import RequestError


class Overloaded(RuntimeError):
    """The batcher's queue is full: the request was not accepted (retry later or add capacity)."""


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
      max_queue_requests, max_queue_candidates: queue bounds; beyond them ``submit`` raises
        :class:`Overloaded` (None: no candidate bound).
      pipeline_depth: batches in flight at once (keep <= the Ranker's ``staging_slots``).
      timing: measure each phase of each batch (synchronizes between phases).
      validate: validate requests in ``submit`` (disable only for requests validated upstream).
    """

    max_batch_candidates: int = 256
    max_batch_requests: Optional[int] = None
    max_wait_s: float = 0.002
    max_queue_requests: int = 1024
    max_queue_candidates: Optional[int] = None
    pipeline_depth: int = 2
    timing: bool = False
    validate: bool = True

    def __post_init__(self):
        if self.max_batch_candidates < 1:
            raise ValueError(f"max_batch_candidates: need >= 1, got {self.max_batch_candidates}")
        if self.max_batch_requests is not None and self.max_batch_requests < 1:
            raise ValueError(f"max_batch_requests: need None or >= 1, got {self.max_batch_requests}")
        if self.max_wait_s < 0:
            raise ValueError(f"max_wait_s: need >= 0, got {self.max_wait_s}")
        if self.max_queue_requests < 1:
            raise ValueError(f"max_queue_requests: need >= 1, got {self.max_queue_requests}")
        if self.max_queue_candidates is not None and self.max_queue_candidates < self.max_batch_candidates:
            raise ValueError("max_queue_candidates: must be None or >= max_batch_candidates")
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
        self._slots = threading.Semaphore(self.config.pipeline_depth)
        self._completions: "queue.Queue" = queue.Queue()
        self._stats = collections.Counter()
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="batcher-dispatch",
                                            daemon=True)
        self._completer = threading.Thread(target=self._complete_loop, name="batcher-complete",
                                           daemon=True)
        self._dispatcher.start()
        self._completer.start()

    # ------------------------------------------------------------------------------------ client
    def submit(self, request: RequestBatch) -> ScoreFuture:
        """Queue one request; returns its future. Raises :class:`Overloaded` when the queue is full
        and :class:`BatcherClosed` after :meth:`close`. Bad requests get a failed future."""
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
        cfg = self.config
        with self._cond:
            if self._closed:
                raise BatcherClosed("submit: the batcher is closed")
            full = len(self._queue) >= cfg.max_queue_requests or (
                cfg.max_queue_candidates is not None
                and self._queued_candidates + item.n > cfg.max_queue_candidates)
            if full:
                self._stats["overloaded"] += 1
                raise Overloaded(
                    f"submit: queue full ({len(self._queue)} requests, {self._queued_candidates} "
                    f"candidates waiting; max_queue_requests={cfg.max_queue_requests}, "
                    f"max_queue_candidates={cfg.max_queue_candidates}): retry later or add capacity")
            self._queue.append(item)
            self._queued_candidates += item.n
            self._stats["submitted"] += 1
            self._cond.notify_all()
        return future

    def close(self, drain: bool = True, timeout: Optional[float] = None) -> None:
        """Stop accepting requests; score (``drain``) or fail the queued ones; join the threads."""
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
        self._completer.join(None if timeout is None else max(timeout, 0.0))

    def __enter__(self) -> "DynamicBatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close(drain=True)

    @property
    def closed(self) -> bool:
        return self._closed

    def queued(self) -> int:
        """Requests waiting in the queue."""
        with self._cond:
            return len(self._queue)

    def stats(self) -> Dict[str, int]:
        """Counters: submitted, overloaded, invalid, batches, completed, failed, abandoned,
        candidates (scored)."""
        with self._cond:
            return dict(self._stats)

    # ----------------------------------------------------------------------------------- workers
    def _count(self, key: str, n: int = 1) -> None:
        with self._cond:
            self._stats[key] += n

    def _batch_is_full(self) -> bool:
        cfg = self.config
        return self._queued_candidates >= cfg.max_batch_candidates or (
            cfg.max_batch_requests is not None and len(self._queue) >= cfg.max_batch_requests)

    def _next_batch(self) -> Optional[List[_Item]]:
        """The next batch (module docstring); None once closed with nothing left to do."""
        cfg = self.config
        with self._cond:
            while True:
                while not self._queue:
                    if self._closed:
                        return None
                    self._cond.wait()
                deadline = self._queue[0].t_enqueue + cfg.max_wait_s
                while not self._closed and not self._batch_is_full():
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
                    return batch

    def _fail(self, items: List[_Item], error: BaseException) -> None:
        """Fail the futures of ``items`` not resolved yet with ``error``."""
        pending = [item for item in items if not item.future.done()]
        for item in pending:
            item.future.set_exception(error)
        self._count("failed", len(pending))

    def _dispatch_loop(self) -> None:
        while True:
            self._slots.acquire()
            items = self._next_batch()
            if items is None:
                self._slots.release()
                break
            t_taken = time.perf_counter()
            try:
                inflight = self.ranker.dispatch([it.request for it in items], timing=self.config.timing)
            except BaseException as e:  # noqa: BLE001 - the batch's requests get the error
                self._slots.release()
                self._fail(items, e)
                continue
            self._completions.put((inflight, items, t_taken))
        self._completions.put(None)

    def _complete_loop(self) -> None:
        while True:
            job = self._completions.get()
            if job is None:
                return
            inflight, items, t_taken = job
            try:
                try:
                    outs, report = inflight.finish()
                finally:
                    self._slots.release()
                self._resolve(items, list(outs), report, t_taken)
            except BaseException as e:  # noqa: BLE001 - every future of the batch must resolve
                self._fail(items, e)

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
        for item, out in zip(items, outs):
            item.future.set_result(out)
        with self._cond:
            self._stats["batches"] += 1
            self._stats["completed"] += len(items)
            self._stats["candidates"] += report.num_candidates
