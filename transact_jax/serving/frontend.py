"""Serving from several processes: front ends take requests, one engine process drives the device.

One Python process tops out at what its interpreter can do per request (validation, futures, the
batcher's bookkeeping), long before the device does: ``bench/serving.py`` measures the engine's
forward alone at several times the rate one process can feed it. This module splits the work the
way a serving host splits it between RPC handlers and a model server:

* :class:`EngineHost` runs in the process that owns the device: the :class:`~.ranker.Ranker`, a
  :class:`~.batcher.DynamicBatcher` (request validation off: the front ends did it) and a Unix
  socket that front ends connect to. It owns a :class:`~.shared_slots.SlotArray` and gives each
  connected front end its own range of slots.
* :class:`FrontEnd` runs in any process of the host (one per core or RPC worker): ``submit`` validates
  a request with the engine's own rules (the engine sends its feature and selection configs and
  over-long policy on connect), truncates over-long sequences, packs up to ``part_requests``
  requests that arrive within ``part_wait_s`` into one *part* written straight into a free slot of
  its range, and sends the engine only the slot number. The engine reads the part as views into
  the slot, batches it with other front ends' parts, scores it, writes the probabilities into the
  slot and answers with the slot number; the front end splits them per request and resolves each
  request's future.

Per request, the engine process runs no Python at all (its per-item work is per part); the bytes
of a request are written once (front end -> slot) and copied once more by the engine's collation
into its staging arena, as in the one-process engine.

Guarantees: every future returned by :meth:`FrontEnd.submit` resolves exactly once, with its own
request's probabilities (in candidate order) or an error: a bad request fails at once with a
:class:`~.validation.RequestError` naming the field; :class:`~.batcher.Overloaded` when the
engine's admission control or queue bound refuses the part, or when every slot of the front end is
in flight; :class:`~.batcher.BatcherClosed` when the engine is closing; :class:`EngineError` when
the batch failed on the engine; :class:`ConnectionError` when the engine process went away. A slot
is reused only after the engine has answered for it, and a front end's slot range is given to a
new front end only after every part of the old one is answered.

Protocol (pickled tuples over :mod:`multiprocessing.connection`, authenticated by a random key):
engine -> front end on connect ``("hello", {...})`` or ``("refused", reason)``; front end ->
engine ``("score", slot, token)`` and ``("bye",)``; engine -> front end ``("done", slot, token,
batch_candidates)`` or ``("error", slot, token, kind, message)``. ``token`` is the front end's
counter for the part, echoed so a stale answer can never resolve a newer part in the same slot.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
import socket
import tempfile
import threading
import time
from concurrent.futures import Future, InvalidStateError
from multiprocessing.connection import Client, Connection, Listener
from typing import Dict, List, Optional, Tuple

from transact_jax.data.schema import RequestBatch
from transact_jax.serving.batcher import (
    BatcherClosed,
    BatcherConfig,
    DynamicBatcher,
    Overloaded,
    RequestTiming,
)
from transact_jax.serving.shared_slots import SlotArray, SlotError, SlotSpec
from transact_jax.serving.validation import RequestError, validate_request

PROTOCOL = 1


class EngineError(RuntimeError):
    """The engine failed to score a part (a fault in the batch, not in the request)."""


@dataclasses.dataclass(frozen=True)
class EngineAddress:
    """Where a :class:`FrontEnd` connects: the Unix socket ``path`` and the ``authkey`` (bytes).
    Picklable: hand it to the front-end processes."""

    path: str
    authkey: bytes


@dataclasses.dataclass(frozen=True)
class HostConfig:
    """:class:`EngineHost` options.

    Attributes:
      max_frontends: front ends connected at once (each gets ``slots_per_frontend`` slots).
      slots_per_frontend: parts one front end may have in flight.
      part_requests: most requests per part (the slots' request capacity).
      part_candidates: most candidates per part (the slots' candidate capacity; None: the
        batcher's ``max_batch_candidates``). A batching policy set later must allow at least this.
      directory: folder of the shared slot file (default: ``/dev/shm`` when it has room).
    """

    max_frontends: int = 8
    slots_per_frontend: int = 32
    part_requests: int = 8
    part_candidates: Optional[int] = None
    directory: Optional[str] = None

    def __post_init__(self):
        for name in ("max_frontends", "slots_per_frontend", "part_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"HostConfig.{name}: need >= 1, got {getattr(self, name)}")
        if self.part_candidates is not None and self.part_candidates < 1:
            raise ValueError(f"HostConfig.part_candidates: need None or >= 1, got {self.part_candidates}")


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, Overloaded):
        return "overloaded"
    if isinstance(exc, BatcherClosed):
        return "closed"
    if isinstance(exc, (RequestError, SlotError)):
        return "invalid"
    return "failed"


def _error_of(kind: str, message: str) -> BaseException:
    if kind == "overloaded":
        return Overloaded(message)
    if kind == "closed":
        return BatcherClosed(message)
    return EngineError(f"{kind}: {message}")


def _hang_up(conn: Connection) -> None:
    """Shut the socket down (which wakes a thread blocked in ``recv`` on it, unlike ``close``),
    then close it."""
    try:
        with socket.socket(fileno=os.dup(conn.fileno())) as s:
            s.shutdown(socket.SHUT_RDWR)
    except (OSError, ValueError):
        pass
    conn.close()


class _Peer:
    """One connected front end, as the engine sees it."""

    def __init__(self, index: int, conn: Connection, slots: range):
        self.index, self.conn, self.slots = index, conn, slots
        self.send_lock = threading.Lock()
        self.outstanding = 0          # parts submitted and not answered yet
        self.gone = False             # the connection has ended

    def send(self, msg: tuple) -> None:
        with self.send_lock:
            self.conn.send(msg)


class EngineHost:
    """The engine side (module docstring): ``EngineHost(ranker, BatcherConfig(...))``, then give
    :attr:`address` to the front-end processes; :meth:`close` when done (or use ``with``).

    Args:
      ranker: the :class:`~.ranker.Ranker` (or any object with its ``dispatch``, ``feat``, ``sel``
        and ``config.overlong``).
      batcher: the dynamic batching policy (its ``validate`` is turned off: front ends validate).
      config: :class:`HostConfig`.
      address: socket path (default: a fresh one in a private temporary folder).
      record_timings: keep every scored part's :class:`~.batcher.RequestTiming` for
        :meth:`take_timings` (benchmarks; phases are timed when the batcher's ``timing`` is on).
    """

    def __init__(self, ranker, batcher: Optional[BatcherConfig] = None,
                 config: Optional[HostConfig] = None, address: Optional[str] = None,
                 record_timings: bool = False):
        self.ranker = ranker
        self.config = config or HostConfig()
        batcher = dataclasses.replace(batcher or BatcherConfig(), validate=False)
        part_candidates = self.config.part_candidates or batcher.max_batch_candidates
        if part_candidates > batcher.max_batch_candidates:
            raise ValueError(f"HostConfig.part_candidates: {part_candidates} exceeds the batcher's "
                             f"max_batch_candidates {batcher.max_batch_candidates}")
        self.spec = SlotSpec.for_config(ranker.feat, ranker.sel, self.config.part_requests,
                                        part_candidates)
        count = self.config.max_frontends * self.config.slots_per_frontend
        self.slots = SlotArray.create(self.spec, count, self.config.directory)
        self._batcher = DynamicBatcher(ranker, batcher)
        self._lock = threading.Lock()
        self._closed = False
        self._free_ranges = list(range(self.config.max_frontends))
        self._peers: Dict[int, _Peer] = {}
        self._threads: List[threading.Thread] = []
        self._timings: Optional[List[RequestTiming]] = [] if record_timings else None
        self._tmp = tempfile.mkdtemp(prefix="transact_jax_engine_")
        authkey = os.urandom(32)
        self.address = EngineAddress(address or os.path.join(self._tmp, "engine.sock"), authkey)
        try:
            self._listener = Listener(self.address.path, family="AF_UNIX", authkey=authkey)
        except BaseException:
            self.slots.close()
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise
        self._acceptor = threading.Thread(target=self._accept_loop, name="engine-accept", daemon=True)
        self._acceptor.start()

    # ------------------------------------------------------------------------------- control
    @property
    def batcher(self) -> DynamicBatcher:
        return self._batcher

    def set_batcher(self, config: BatcherConfig) -> None:
        """Use a new batching policy from now on (the old batcher drains what it holds). Call it
        between loads: a part arriving while the batchers are swapped may be answered
        :class:`~.batcher.BatcherClosed`."""
        new = DynamicBatcher(self.ranker, dataclasses.replace(config, validate=False))
        if new.config.max_batch_candidates < self.spec.candidates:
            new.close()
            raise ValueError(f"max_batch_candidates: {new.config.max_batch_candidates} is below the "
                             f"slots' {self.spec.candidates} candidates; build a new EngineHost")
        old, self._batcher = self._batcher, new
        old.close(drain=True)

    def take_timings(self) -> List[RequestTiming]:
        """The timings of the parts scored since the last call (``record_timings``), oldest first."""
        with self._lock:
            if self._timings is None:
                raise RuntimeError("take_timings: build the EngineHost with record_timings=True")
            out, self._timings = self._timings, []
        return out

    def connected(self) -> int:
        """Front ends connected now."""
        with self._lock:
            return sum(not p.gone for p in self._peers.values())

    def close(self, drain: bool = True, timeout: Optional[float] = 30.0) -> None:
        """Stop accepting front ends, score (``drain``) or fail what is queued, answer every part,
        then close the connections and remove the slot file and socket."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake_acceptor()
        self._listener.close()
        self._batcher.close(drain=drain, timeout=timeout)
        deadline = time.monotonic() + (timeout or 0.0)
        while any(p.outstanding for p in list(self._peers.values())) and time.monotonic() < deadline:
            time.sleep(0.005)
        for peer in list(self._peers.values()):
            _hang_up(peer.conn)
        for t in [self._acceptor] + self._threads:
            t.join(timeout)
        self.slots.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "EngineHost":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _wake_acceptor(self) -> None:
        """Unblock the acceptor's ``accept`` (closing a listening socket does not) by connecting
        without the key: the handshake fails and the acceptor sees the host closed."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                s.connect(self.address.path)
        except OSError:
            pass

    # ------------------------------------------------------------------------------ serving
    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn = self._listener.accept()
            except OSError:
                if not self._closed:
                    time.sleep(0.01)       # e.g. out of file descriptors: try again shortly
                continue
            except Exception:  # noqa: BLE001 - a failed handshake drops that client only
                continue
            with self._lock:
                index = self._free_ranges.pop(0) if self._free_ranges and not self._closed else None
            if index is None:
                try:
                    conn.send(("refused", f"all {self.config.max_frontends} front-end places are "
                               f"taken (HostConfig.max_frontends) or the engine is closing"))
                finally:
                    conn.close()
                continue
            per = self.config.slots_per_frontend
            peer = _Peer(index, conn, range(index * per, (index + 1) * per))
            with self._lock:
                self._peers[index] = peer
            ranker = self.ranker
            peer.send(("hello", dict(
                protocol=PROTOCOL, path=self.slots.path, count=self.slots.count, spec=self.spec,
                first_slot=peer.slots.start, slots=per, feature=ranker.feat, selection=ranker.sel,
                overlong=ranker.config.overlong,
                max_batch_candidates=self._batcher.config.max_batch_candidates)))
            t = threading.Thread(target=self._serve_peer, args=(peer,), name=f"engine-peer-{index}",
                                 daemon=True)
            self._threads.append(t)
            t.start()

    def _serve_peer(self, peer: _Peer) -> None:
        try:
            while True:
                msg = peer.conn.recv()
                if msg[0] == "bye":
                    break
                if msg[0] == "score":
                    self._score(peer, int(msg[1]), msg[2])
        except (EOFError, OSError):
            pass
        finally:
            with self._lock:
                peer.gone = True
            self._release_if_done(peer)

    def _score(self, peer: _Peer, slot: int, token) -> None:
        with self._lock:
            peer.outstanding += 1
        try:
            if slot not in peer.slots:
                raise SlotError("slot", f"slot {slot} is not in this front end's range "
                                f"[{peer.slots.start}, {peer.slots.stop})")
            future = self._batcher.submit(self.slots.read(slot))
        except BaseException as e:  # noqa: BLE001 - refused at once: answer with the error
            self._answer(peer, ("error", slot, token, _error_kind(e), str(e)))
            return
        future.add_done_callback(lambda f: self._reply(peer, slot, token, f))

    def _reply(self, peer: _Peer, slot: int, token, future: Future) -> None:
        exc = future.exception()
        if exc is None:
            try:
                self.slots.write_result(slot, future.result())
                timing = getattr(future, "timing", None)
                msg = ("done", slot, token, timing.batch_candidates if timing else 0)
                if timing is not None and self._timings is not None:
                    with self._lock:
                        self._timings.append(timing)
            except BaseException as e:  # noqa: BLE001
                msg = ("error", slot, token, "failed", f"writing the result: {e}")
        else:
            msg = ("error", slot, token, _error_kind(exc), str(exc))
        self._answer(peer, msg)

    def _answer(self, peer: _Peer, msg: tuple) -> None:
        try:
            peer.send(msg)
        except (OSError, EOFError, ValueError):
            pass                           # the front end is gone; its futures failed there
        finally:
            with self._lock:
                peer.outstanding -= 1
            self._release_if_done(peer)

    def _release_if_done(self, peer: _Peer) -> None:
        """Give a disconnected front end's slot range back once every part of it is answered."""
        with self._lock:
            if peer.gone and peer.outstanding == 0 and self._peers.get(peer.index) is peer:
                del self._peers[peer.index]
                self._free_ranges.append(peer.index)
        if peer.gone and peer.outstanding == 0:
            peer.conn.close()


class RemoteFuture(Future):
    """A ``concurrent.futures.Future`` of one request's probabilities (n, H) from a
    :class:`FrontEnd`; ``t_submit`` and ``t_done`` are ``time.perf_counter()`` stamps of
    ``submit`` and of the result being set; ``batch_candidates`` the size of the engine batch."""

    t_submit: float = 0.0
    t_done: Optional[float] = None
    batch_candidates: int = 0


def _settle(future: RemoteFuture, result=None, error: Optional[BaseException] = None) -> None:
    future.t_done = time.perf_counter()
    try:
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
    except InvalidStateError:   # cancelled by its caller meanwhile
        pass


_Item = Tuple[RequestBatch, RemoteFuture]


@dataclasses.dataclass(frozen=True)
class FrontEndConfig:
    """:class:`FrontEnd` options: ``part_requests`` (most requests packed into one part; None: the
    slots' capacity) and ``part_wait_s`` (how long the first request of a part waits for more;
    0 sends every request on its own)."""

    part_requests: Optional[int] = None
    part_wait_s: float = 0.0005

    def __post_init__(self):
        if self.part_requests is not None and self.part_requests < 1:
            raise ValueError(f"FrontEndConfig.part_requests: need None or >= 1, got {self.part_requests}")
        if self.part_wait_s < 0:
            raise ValueError(f"FrontEndConfig.part_wait_s: need >= 0, got {self.part_wait_s}")


class FrontEnd:
    """The front-end side (module docstring): ``FrontEnd(address)`` in any process of the host, then
    ``submit(request)`` from any thread; :meth:`close` when done (or use ``with``)."""

    def __init__(self, address: EngineAddress, config: Optional[FrontEndConfig] = None,
                 timeout: float = 30.0):
        self.config = config or FrontEndConfig()
        self._conn = Client(address.path, family="AF_UNIX", authkey=address.authkey)
        if not self._conn.poll(timeout):
            self._conn.close()
            raise TimeoutError(f"engine at {address.path}: no answer within {timeout:.0f} s")
        msg = self._conn.recv()
        if msg[0] != "hello":
            self._conn.close()
            raise ConnectionRefusedError(f"engine at {address.path}: {msg[1]}")
        hello = msg[1]
        if hello["protocol"] != PROTOCOL:
            self._conn.close()
            raise ConnectionRefusedError(f"engine speaks protocol {hello['protocol']}, this front end "
                                         f"{PROTOCOL}")
        self.feat, self.sel, self.overlong = hello["feature"], hello["selection"], hello["overlong"]
        self.spec: SlotSpec = hello["spec"]
        self.max_candidates = min(self.spec.candidates, hello["max_batch_candidates"])
        self.part_requests = min(self.config.part_requests or self.spec.requests, self.spec.requests)
        self.slots = SlotArray.attach(hello["path"], self.spec, hello["count"])
        self._free = list(range(hello["first_slot"], hello["first_slot"] + hello["slots"]))
        self._in_flight: Dict[int, Tuple[int, List[_Item]]] = {}
        self._pending: List[_Item] = []
        self._pending_candidates = 0
        self._pending_since = 0.0
        self._tokens = itertools.count()
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self._closed = False
        self._gone: Optional[BaseException] = None
        self._receiver = threading.Thread(target=self._receive_loop, name="frontend-receive",
                                          daemon=True)
        self._flusher = threading.Thread(target=self._flush_loop, name="frontend-flush", daemon=True)
        self._receiver.start()
        self._flusher.start()

    # ------------------------------------------------------------------------------- client
    def submit(self, request: RequestBatch) -> RemoteFuture:
        """Validate and queue one request (a single-request ``RequestBatch``); returns its future
        (module docstring). Raises :class:`~.batcher.BatcherClosed` after :meth:`close`."""
        future = RemoteFuture()
        future.t_submit = time.perf_counter()
        if self._closed:
            raise BatcherClosed("submit: the front end is closed")
        error = validate_request(request, self.feat, self.sel, self.overlong)
        if error is None and request.num_candidates > self.max_candidates:
            error = RequestError(0, "candidates", f"{request.num_candidates} candidates exceed the "
                                 f"engine's {self.max_candidates} per part; split the request")
        if error is not None:
            _settle(future, error=error)
            return future
        request = request.truncate_recent(self.sel)
        ready: List[List[_Item]] = []
        n = request.num_candidates
        with self._cond:
            if self._closed:
                raise BatcherClosed("submit: the front end is closed")
            if self._pending and self._pending_candidates + n > self.max_candidates:
                ready.append(self._take())
            if not self._pending:
                self._pending_since = time.perf_counter()
            self._pending.append((request, future))
            self._pending_candidates += n
            if len(self._pending) >= self.part_requests or self.config.part_wait_s <= 0:
                ready.append(self._take())
            else:
                self._cond.notify_all()
        for items in ready:
            self._send(items)
        return future

    def close(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop accepting requests; send (``drain``) or fail what is pending; wait up to
        ``timeout`` for the parts in flight; disconnect."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            items = self._take() if self._pending else []
            self._cond.notify_all()
        if items:
            if drain:
                self._send(items)
            else:
                for _, f in items:
                    _settle(f, error=BatcherClosed("the front end was closed before this request "
                                                   "was sent"))
        self._flusher.join(timeout)
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._in_flight and self._gone is None and time.monotonic() < deadline:
                self._cond.wait(max(0.0, deadline - time.monotonic()))
        try:
            with self._send_lock:
                self._conn.send(("bye",))
        except (OSError, ValueError):
            pass
        _hang_up(self._conn)
        self._receiver.join(timeout)
        self._fail_in_flight(BatcherClosed("the front end was closed before the engine answered"))
        self.slots.close()

    def __enter__(self) -> "FrontEnd":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def in_flight(self) -> int:
        """Parts sent and not answered yet."""
        with self._cond:
            return len(self._in_flight)

    # ----------------------------------------------------------------------------- internals
    def _take(self) -> List[_Item]:
        """The pending requests as one part (call under the lock)."""
        items, self._pending, self._pending_candidates = self._pending, [], 0
        return items

    def _flush_loop(self) -> None:
        wait = self.config.part_wait_s
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                remaining = self._pending_since + wait - time.perf_counter()
                if remaining > 0 and not self._closed:
                    self._cond.wait(remaining)
                    continue
                items = self._take()
            self._send(items)

    def _send(self, items: List[_Item]) -> None:
        """Write ``items`` into a free slot and tell the engine; fail them if that cannot be done."""
        with self._cond:
            gone = self._gone
            slot = self._free.pop() if self._free and gone is None else None
            if slot is not None:
                token = next(self._tokens)
                self._in_flight[slot] = (token, items)
        if slot is None:
            error = gone or Overloaded(f"all {len(self._free) + len(self._in_flight)} slots of this "
                                       f"front end are in flight: retry later or add capacity")
            for _, f in items:
                _settle(f, error=error)
            return
        try:
            self.slots.write(slot, [r for r, _ in items])
            with self._send_lock:
                self._conn.send(("score", slot, token))
        except BaseException as e:  # noqa: BLE001 - every future must resolve
            with self._cond:
                if self._in_flight.get(slot, (None,))[0] == token:
                    del self._in_flight[slot]
                    self._free.append(slot)
                    self._cond.notify_all()
                else:
                    return                 # the receiver already failed them
            error = e if isinstance(e, SlotError) else ConnectionError(f"sending to the engine: {e}")
            for _, f in items:
                _settle(f, error=error)

    def _receive_loop(self) -> None:
        try:
            while True:
                msg = self._conn.recv()
                kind, slot, token = msg[0], int(msg[1]), msg[2]
                with self._cond:
                    entry = self._in_flight.get(slot)
                    if entry is None or entry[0] != token:
                        continue           # not ours (stale): nothing waits for it
                items = entry[1]
                if kind == "done":
                    total = sum(r.num_candidates for r, _ in items)
                    probs, error = self.slots.read_result(slot, total), None
                else:
                    probs, error = None, _error_of(msg[3], msg[4])
                with self._cond:           # the slot is free once its result has been read
                    del self._in_flight[slot]
                    self._free.append(slot)
                    self._cond.notify_all()
                start = 0
                for request, future in items:
                    if error is None:
                        future.batch_candidates = int(msg[3])
                        n = request.num_candidates
                        _settle(future, probs[start:start + n])
                        start += n
                    else:
                        _settle(future, error=error)
        except (EOFError, OSError):
            pass
        self._fail_in_flight(ConnectionError("the engine closed the connection before answering"))

    def _fail_in_flight(self, error: BaseException) -> None:
        with self._cond:
            if self._gone is None:
                self._gone = error
            lost = list(self._in_flight.values())
            self._in_flight.clear()
            self._cond.notify_all()
        for _, items in lost:
            for _, f in items:
                _settle(f, error=error)
