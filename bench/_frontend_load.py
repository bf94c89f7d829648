"""Open-loop load through front-end processes (``bench/serving.py --frontends P``).

The benchmark process keeps the device: it runs an :class:`~transact_jax.serving.frontend.EngineHost`
around the ``all`` Ranker. ``P`` front-end processes (``multiprocessing`` spawn, JAX on the CPU
platform there: they never touch the device) each build their own pool of synthetic requests (the
same generator and sizes as the benchmark's pool, their own seed), connect a
:class:`~transact_jax.serving.frontend.FrontEnd`, and on every load point run an open-loop Poisson
generator at 1/P of the offered rate, exactly like ``run_point`` in one process: arrival times fixed
in advance, latency from the scheduled arrival to the moment the request's future is resolved in the
front end (the engine's answer crossed back, no coordinated omission). The parent starts every
front end's load point at once and merges: counts and throughput summed, percentiles over the union
of all requests, CPU over all processes (engine + front ends).

A request refused by the engine's admission control or queue bound, or finding no free slot in its
front end, fails with ``Overloaded`` right away: it is counted as rejected. Anything not resolved
``grace`` seconds after the last arrival, or failed otherwise, is dropped.
"""
from __future__ import annotations

import multiprocessing
import os
import threading
import time
from typing import Dict, List, Optional

import numpy as np

from transact_jax.serving import BatcherConfig, Overloaded
from transact_jax.serving.frontend import EngineAddress, EngineHost, FrontEnd, FrontEndConfig, HostConfig


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def thread_cpu_seconds() -> Dict[str, float]:
    """CPU seconds (user + system) of every thread of this process so far, by name: the Python
    thread's name where there is one, else the kernel's (``/proc/self/task/*/comm``: XLA's own
    threads); equal names get ``#k`` suffixes. Empty where ``/proc`` is missing."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out: Dict[str, float] = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/self/task/{tid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue                      # the thread ended meanwhile
        name = names.get(int(tid), comm)
        key, k = name, 1
        while key in out:
            k += 1
            key = f"{name}#{k}"
        out[key] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _front_end_main(address: EngineAddress, spec: dict, conn) -> None:
    """One front-end process: build its request pool, connect, run the load points it is sent."""
    import serving as S        # bench/serving.py (on sys.path: spawn keeps the parent's path)
    from transact_jax.config import SelectionConfig
    from transact_jax.model.config import ModelConfig
    from transact_jax.run.config import ExperimentConfig
    from transact_jax.run.presets import preset

    sel = SelectionConfig(max_ll_len=spec["ll_len"])
    cfg = preset("transact_v2", ExperimentConfig(selection=sel, model=ModelConfig(dtype=spec["dtype"])))
    pool = S.request_pool(cfg, spec["ll_len"], spec["cands"], count=spec["pool"], seed=1 + spec["index"])
    fe = FrontEnd(address, FrontEndConfig(part_requests=spec["part_requests"],
                                          part_wait_s=spec["part_wait_s"]))
    conn.send(("ready", len(pool)))
    try:
        while True:
            msg = conn.recv()
            if msg[0] != "run":
                break
            conn.send(("result", _run(fe, pool, spec["cands"], *msg[1:])))
    finally:
        fe.close(drain=False, timeout=5.0)


def _run(fe: FrontEnd, pool, cands: int, rate: float, duration: float, grace: float, seed: int) -> dict:
    """One load point in this front end (module docstring)."""
    req_rate = rate / cands
    n = max(1, int(round(req_rate * duration)))
    schedule = np.cumsum(np.random.default_rng(seed).exponential(1.0 / req_rate, n))
    submitted, rejected = [], 0
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    t0 = wall0 + 0.005
    for i in range(n):
        target = t0 + schedule[i]
        delay = target - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        submitted.append((target, fe.submit(pool[i % len(pool)])))
    t_end = time.perf_counter()
    deadline = t_end + grace
    for _, f in submitted:
        left = deadline - time.perf_counter()
        if left <= 0:
            break
        try:
            f.exception(timeout=left)
        except Exception:  # noqa: BLE001 - a timeout: counted as dropped below
            break
    e2e, lag, batch = [], [], []
    for target, f in submitted:
        if not f.done():
            continue
        exc = f.exception()
        if isinstance(exc, Overloaded):
            rejected += 1
        elif exc is None:
            e2e.append(f.t_done - target)
            lag.append(f.t_submit - target)
            batch.append(f.batch_candidates)
    t_last = max((f.t_done for _, f in submitted if f.done() and f.t_done), default=t_end)
    return {"requests": n, "completed": len(e2e), "rejected_overloaded": rejected,
            "dropped": n - len(e2e) - rejected, "e2e_s": e2e, "lag_s": lag, "batch": batch,
            "t0": t0, "t_end": t_end, "t_last": t_last, "cpu_s": _cpu_seconds() - cpu0,
            "wall_s": time.perf_counter() - wall0, "offered_s": float(schedule[-1]) if n > 1 else duration}


def _pct_ms(values) -> Dict[str, Optional[float]]:
    a = np.asarray(values, np.float64)
    if not a.size:
        return {"p50": None, "p90": None, "p99": None}
    return {f"p{q}": float(np.percentile(a, q)) * 1e3 for q in (50, 90, 99)}


class FrontEndLoad:
    """An :class:`EngineHost` around ``ranker`` and ``count`` front-end processes (module
    docstring); :meth:`run_point` has ``bench/serving.py``'s ``run_point`` contract."""

    def __init__(self, ranker, count: int, *, ll_len: int, cands: int, dtype: str, max_batch: int,
                 min_batch: int, part_requests: int, part_wait_s: float, slots_per_frontend: int,
                 pool: int = 64, timeout: float = 600.0):
        """``min_batch``/``max_batch``: the smallest and largest batch (candidates) load points
        will use; parts are capped to fit the smallest."""
        self.count = count
        part_requests = max(1, min(part_requests, min_batch // cands))
        self.host = EngineHost(ranker, BatcherConfig(max_batch_candidates=max_batch),
                               HostConfig(max_frontends=count, slots_per_frontend=slots_per_frontend,
                                          part_requests=part_requests,
                                          part_candidates=part_requests * cands),
                               record_timings=True)
        ctx = multiprocessing.get_context("spawn")
        self.conns, self.procs = [], []
        saved = os.environ.get("JAX_PLATFORMS")
        os.environ["JAX_PLATFORMS"] = "cpu"          # inherited by the children only
        try:
            for i in range(count):
                mine, theirs = ctx.Pipe()
                spec = dict(ll_len=ll_len, cands=cands, dtype=dtype, pool=pool, index=i,
                            part_requests=part_requests, part_wait_s=part_wait_s)
                p = ctx.Process(target=_front_end_main, args=(self.host.address, spec, theirs),
                                daemon=True)
                p.start()
                self.conns.append(mine)
                self.procs.append(p)
        finally:
            if saved is None:
                os.environ.pop("JAX_PLATFORMS", None)
            else:
                os.environ["JAX_PLATFORMS"] = saved
        for c in self.conns:
            self._expect(c, "ready", timeout)
        self.settings = dict(processes=count, part_requests=part_requests, part_wait_s=part_wait_s,
                             slots_per_frontend=slots_per_frontend, pool_per_process=pool)

    def _expect(self, conn, word: str, timeout: float):
        if not conn.poll(timeout):
            raise TimeoutError(f"front-end process: no {word!r} within {timeout:.0f} s")
        msg = conn.recv()
        if msg[0] != word:
            raise RuntimeError(f"front-end process: expected {word!r}, got {msg[0]!r}")
        return msg[1]

    def run_point(self, load, *, batch: int, rate: float, timing: bool,
                  admission_delay_s: Optional[float] = None, seed: int = 0,
                  keep_latencies: bool = False, phases=()) -> dict:
        """Offer ``rate`` candidates/s over all front ends (module docstring); ``phases``: the
        :class:`~transact_jax.serving.batcher.RequestTiming` fields to report percentiles of (over
        parts: the engine batches parts, not requests)."""
        self.host.set_batcher(BatcherConfig(
            max_batch_candidates=batch, max_wait_s=load.max_wait_s,
            busy_wait_s=load.busy_wait_s, max_queue_requests=1 << 20,
            max_queue_candidates=max(batch, int(rate * load.queue_s)), pipeline_depth=load.pipeline_depth,
            timing=timing, max_queue_delay_s=admission_delay_s))
        self.host.take_timings()
        cpu0, threads0 = _cpu_seconds(), thread_cpu_seconds()
        for i, c in enumerate(self.conns):
            c.send(("run", rate / self.count, load.duration, load.grace, seed * 1000 + i))
        rows = [self._expect(c, "result", load.duration + load.grace + 120) for c in self.conns]
        host_cpu = _cpu_seconds() - cpu0
        threads1 = thread_cpu_seconds()
        e2e = [x for r in rows for x in r["e2e_s"]]
        n = sum(r["requests"] for r in rows)
        rejected = sum(r["rejected_overloaded"] for r in rows)
        dropped = sum(r["dropped"] for r in rows)
        t0 = min(r["t0"] for r in rows)
        span = max(r["t_last"] for r in rows) - t0
        wall = max(r["wall_s"] for r in rows)
        batches = [x for r in rows for x in r["batch"]]
        out = {
            "offered_candidates_per_s": rate, "duration_s": load.duration, "requests": n,
            "batch_candidates": batch, "pipeline_depth": load.pipeline_depth, "timed": timing,
            "frontends": self.settings,
            "offered_actual_candidates_per_s": n * load.cands / max(r["offered_s"] for r in rows),
            "completed": len(e2e), "rejected_overloaded": rejected, "dropped": dropped,
            "reject_fraction": rejected / max(n, 1),
            "achieved_candidates_per_s": len(e2e) * load.cands / span if e2e and span > 0 else 0.0,
            "e2e_ms": _pct_ms(e2e), "generator_lag_ms": _pct_ms([x for r in rows for x in r["lag_s"]]),
            "mean_batch_candidates": float(np.mean(batches)) if batches else 0.0,
            "cpu_cores_used": (host_cpu + sum(r["cpu_s"] for r in rows)) / wall,
            "cpu_cores_used_engine_process": host_cpu / wall,
            "engine_thread_cores": dict(sorted(
                ((k, (v - threads0.get(k, 0.0)) / wall) for k, v in threads1.items()
                 if v - threads0.get(k, 0.0) > 0), key=lambda kv: -kv[1])[:16]),
            "window_perf_s": [t0, max(r["t_end"] for r in rows)],
        }
        parts = self.host.take_timings()       # per part: its batch's phases, as in run_point
        for phase in phases:
            out[f"{phase}_ms"] = _pct_ms([getattr(t, phase) for t in parts
                                          if getattr(t, phase, None) is not None])
        if admission_delay_s is not None:
            out["admission_max_queue_delay_ms"] = admission_delay_s * 1e3
        if keep_latencies:
            out["e2e_s"] = e2e
        p99 = out["e2e_ms"]["p99"]
        out["sustained"] = bool(e2e) and rejected == 0 and dropped == 0 and p99 <= load.slo_ms
        return out

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(("exit",))
            except OSError:
                pass
        for p in self.procs:
            p.join(30)
            if p.is_alive():
                p.kill()
        self.host.close(drain=False, timeout=10)
