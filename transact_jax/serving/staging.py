"""Host-to-device staging: reused host buffers per bucket, optionally in pinned host memory.

Paper §3.4.2 ("Pinned Memory Arena"): a batch prepared in ordinary (pageable) host memory is first
copied into a pinned (page-locked) buffer and then over PCIe to the GPU; building the batch directly
in a pre-allocated pinned buffer removes the pageable-to-pinned copy. Here a batch is collated into
a :class:`HostArena`: one contiguous uint8 buffer per bucket (see :mod:`.layout`), allocated once and
reused. Three modes:

* ``"pageable"``: the arena is a numpy array; ``jax.device_put`` copies it to the device (on a GPU,
  the runtime stages it through its own pinned buffer internally, so the "PinMem" copy is hidden
  inside the host-to-device time).
* ``"pinned"``: the arena is a JAX array in the device's ``pinned_host`` memory, written in place
  through a numpy view of its buffer; the host-to-device copy is a DMA from pinned memory, with no
  pageable-to-pinned copy at all.
* ``"pinned_copy"``: pinned memory exists but in-place writes could not be verified; the batch is
  collated in pageable memory, copied to a ``pinned_host`` array (timed separately as ``pin``), then
  to the device: the paper's baseline data path, measured in two steps.

``Stager(pinned=True)`` falls back, with ``info.reason`` saying why: to ``"pageable"`` when the
backend is not a GPU (pinned memory only matters for DMA to an accelerator; on the CPU backend both
"memories" are host RAM) or the device has no ``pinned_host`` memory; to ``"pinned_copy"`` when a
self-test of in-place writes fails. The self-test writes two patterns through the view of a small
pinned buffer and checks that each device copy sees them.

Reuse: a bucket has ``slots`` arenas (a pool, allocated on first use or by :meth:`Stager.preallocate`
and then kept); :meth:`Stager.acquire` returns a free one and, when all ``slots`` are busy, blocks on a
condition until one is released: it never allocates beyond ``slots``, so in steady state arenas are
only reused. The caller releases its arena once the batch's result is back on the host (by then the
device has consumed the copy), so a buffer is never overwritten while a transfer from it may still be
running.
"""
from __future__ import annotations

import ctypes
import dataclasses
import threading
import time
from typing import Dict, List, Optional, Tuple

import jax
import numpy as np

from transact_jax.serving.layout import ArenaLayout

MODES = ("pageable", "pinned", "pinned_copy")


@dataclasses.dataclass(frozen=True)
class StagingInfo:
    """What staging is in use: ``requested_pinned``, the ``mode`` and, when it differs from the
    request, the ``reason``."""

    requested_pinned: bool
    mode: str
    reason: str = ""


def _sharding(device, memory_kind: str):
    return jax.sharding.SingleDeviceSharding(device, memory_kind=memory_kind)


def has_memory_kind(device, kind: str) -> bool:
    """Whether ``device`` exposes memory ``kind`` (e.g. ``"pinned_host"``)."""
    try:
        return any(m.kind == kind for m in device.addressable_memories())
    except Exception:  # noqa: BLE001 - older runtimes without memories()
        return False


def _pinned_view(array: jax.Array, nbytes: int) -> np.ndarray:
    """A writable uint8 numpy view of a ready pinned-host JAX array's buffer."""
    pointer = array.unsafe_buffer_pointer()
    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(pointer))


def _allocate_pinned(device, nbytes: int) -> Tuple[jax.Array, np.ndarray]:
    array = jax.device_put(np.zeros(nbytes, np.uint8), _sharding(device, "pinned_host"))
    array.block_until_ready()
    return array, _pinned_view(array, nbytes)


def pinned_self_test(device, nbytes: int = 4096) -> Tuple[bool, str]:
    """Check that writes through the numpy view of a pinned buffer reach the device copy."""
    try:
        array, view = _allocate_pinned(device, nbytes)
        target = _sharding(device, "device")
        for seed in (1, 2):
            pattern = ((np.arange(nbytes) * (2 * seed + 1) + seed) % 251).astype(np.uint8)
            view[:] = pattern
            got = np.asarray(jax.device_put(array, target))
            if not np.array_equal(got, pattern):
                return False, "writes through the pinned buffer's view did not reach the device copy"
        return True, ""
    except Exception as e:  # noqa: BLE001 - any failure means: do not write in place
        return False, f"in-place pinned writes unavailable ({type(e).__name__}: {e})"


class HostArena:
    """One reusable host buffer for a layout: ``views`` to collate into, ``source`` to transfer."""

    def __init__(self, layout: ArenaLayout, device, mode: str):
        self.layout = layout
        self.mode = mode
        self._pinned: Optional[jax.Array] = None
        if mode == "pinned":
            self._pinned, self.buffer = _allocate_pinned(device, layout.nbytes)
        else:
            self.buffer = np.zeros(layout.nbytes, np.uint8)
        self.views: Dict[str, np.ndarray] = layout.views(self.buffer)

    @property
    def source(self):
        """What is transferred: the pinned JAX array or the numpy buffer."""
        return self._pinned if self._pinned is not None else self.buffer


class Stager:
    """Pools of :class:`HostArena` per layout and the host-to-device copy (module docstring).

    Args:
      device: the target device.
      pinned: request pinned staging (falls back as described in the module docstring).
      slots: arenas per layout (how many batches of one bucket may be in flight at once).
      allow_non_gpu: use pinned memory even off GPU where the backend offers it (tests of the
        mechanism on the CPU backend; it brings no speed there).
    """

    def __init__(self, device, pinned: bool, slots: int = 3, allow_non_gpu: bool = False):
        if slots < 1:
            raise ValueError(f"slots: need >= 1, got {slots}")
        self.device = device
        self.slots = slots
        self.info = self._choose(device, pinned, allow_non_gpu)
        self._pools: Dict[ArenaLayout, List[HostArena]] = {}
        self._free: Dict[ArenaLayout, List[HostArena]] = {}
        self._cond = threading.Condition()
        self.allocations = 0   # arenas allocated so far (at most ``slots`` per layout)

    @staticmethod
    def _choose(device, pinned: bool, allow_non_gpu: bool) -> StagingInfo:
        if not pinned:
            return StagingInfo(False, "pageable")
        if device.platform != "gpu" and not allow_non_gpu:
            return StagingInfo(True, "pageable", f"pinned host memory only helps DMA to a GPU; "
                               f"backend is {device.platform!r}: using pageable buffers")
        if not has_memory_kind(device, "pinned_host"):
            return StagingInfo(True, "pageable", f"device {device} has no 'pinned_host' memory: "
                               f"using pageable buffers")
        ok, why = pinned_self_test(device)
        if not ok:
            return StagingInfo(True, "pinned_copy", why + ": collating in pageable memory and "
                               "copying to pinned memory before each transfer")
        return StagingInfo(True, "pinned")

    @property
    def mode(self) -> str:
        return self.info.mode

    def acquire(self, layout: ArenaLayout) -> HostArena:
        """A free arena of ``layout``: a released one, else a new one while the pool has fewer than
        ``slots``; when all ``slots`` are busy, waits until :meth:`release` frees one (module
        docstring). Thread-safe."""
        with self._cond:
            while True:
                free = self._free.setdefault(layout, [])
                if free:
                    return free.pop()
                if self._reserve(layout):
                    break
                self._cond.wait()
        return self._allocate(layout)

    def preallocate(self, layout: ArenaLayout) -> None:
        """Allocate the missing slots of ``layout`` now (warm-up), so serving never allocates;
        never waits for busy arenas."""
        while True:
            with self._cond:
                if not self._reserve(layout):
                    return
            self.release(self._allocate(layout))

    def _reserve(self, layout: ArenaLayout) -> bool:
        """Reserve a slot of ``layout``'s pool for an arena allocated outside the lock, if the pool
        has room (call under the lock)."""
        pool = self._pools.setdefault(layout, [])
        if len(pool) >= self.slots:
            return False
        pool.append(None)
        return True

    def _allocate(self, layout: ArenaLayout) -> HostArena:
        """A new arena in the slot reserved by :meth:`_reserve` (freed again if allocation fails)."""
        pool = self._pools[layout]
        try:
            arena = HostArena(layout, self.device, self.mode)
        except BaseException:
            with self._cond:
                pool.remove(None)
                self._cond.notify_all()
            raise
        with self._cond:
            pool[pool.index(None)] = arena
            self.allocations += 1
        return arena

    def release(self, arena: HostArena) -> None:
        with self._cond:
            self._free.setdefault(arena.layout, []).append(arena)
            self._cond.notify_all()

    def transfer(self, arena: HostArena, sync: bool) -> Tuple[jax.Array, Dict[str, float]]:
        """Copy the arena to the device. Returns the device buffer and, with ``sync``, the seconds
        of each step (``pin`` for the pageable-to-pinned copy, ``h2d`` for the copy to the
        device), each waited for with ``block_until_ready``."""
        times: Dict[str, float] = {}
        target = _sharding(self.device, "device") if self.mode != "pageable" else self.device
        source = arena.source
        t0 = time.perf_counter()
        if self.mode == "pinned_copy":
            source = jax.device_put(arena.buffer, _sharding(self.device, "pinned_host"))
            if sync:
                source.block_until_ready()
                t1 = time.perf_counter()
                times["pin"], t0 = t1 - t0, t1
        out = jax.device_put(source, target)
        if sync:
            out.block_until_ready()
            times["h2d"] = time.perf_counter() - t0
        return out, times

    def allocated_bytes(self) -> int:
        """Host bytes held by all arenas."""
        with self._cond:
            return sum(a.layout.nbytes for pool in self._pools.values() for a in pool if a is not None)
