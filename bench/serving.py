"""Serving benchmark (paper §4.4.3 "Server Optimizations", Figures 7-9), capacity and its limits.

Open-loop load on the serving engine: a generator thread submits ranking requests to the
``DynamicBatcher`` at Poisson arrival times fixed in advance (it never waits for completions, so a
slow server builds a queue instead of slowing the load down), and every request's end-to-end
latency is measured from its *scheduled* arrival to the moment its future is resolved (no
coordinated omission). Requests come from the synthetic world with every S_LL forced to the full
``--ll-len`` tokens (L_LL = 10,000 by default) and ``--cands`` candidates each.

Four configurations, as in Figures 7-9:

=============  ==========================================================================
``baseline``   broadcast layout (each candidate ships its own copy of the sequences), NN search
               and encoder by XLA, pageable host buffers
``pinned``     the baseline with batches built directly in pinned host memory
``dedup``      request-level de-duplication (sequences once per request + offsets), XLA NN
               search and encoder, pageable buffers
``all``        de-dup + pinned + the fused Pallas NN-search kernel + the SKUT encoder kernel
=============  ==========================================================================

With ``--configs``, three more (grid only): ``hstu``, the ``all`` engine with the HSTU family on
the same S_all (one candidate per sequence, the HSTU attention kernel), ``hstu_mfalcon``, HSTU over
the candidate-independent segments (S_LL by recency, S_RT[:r]) scored with M-FALCON, 16
candidates per encoder pass, and ``vista``, VISTA over those segments (one summary per request,
computed in the forward: the cost without a summary store, the cache-miss path).

**Batch size.** In the paper's Figures 7-9 the batch size (128 / 256 / 512) counts *examples*, i.e.
candidates, of one model mini-batch: "each mini-batch of size 128 results in a 64 MB payload" is 128
candidates x ~10k broadcast tokens x ~50 B. Here it is the batcher's ``max_batch_candidates``; a
batch holds whole requests, so with 64 candidates per request a batch of 256 holds up to 4 requests.

Phases of a run, in order (each one's results are written before the next starts, so a run cut
short by ``--max-total-s``, a failing phase or a kill still leaves everything measured so far):

1. **device-only capacity** (``device_only``): the jitted forward of ``all`` alone, replayed back to
   back on a batch already staged on the device (the exact call ``Ranker.dispatch`` launches), at
   each ``--search-batch-sizes``: candidates / median forward time;
2. **max sustainable rate** (``search``) of ``all`` per search batch size: the highest offered rate
   with p99 <= ``--slo-ms`` and nothing rejected or dropped, phases not synchronized; it starts
   from half the device-only capacity, grows by 1.6x until a rate fails, then bisects;
3. **phases at that rate** (``phases_at_max_rate``): the same point again with every batch's phases
   synchronized and timed (``BatcherConfig.timing``): p50/p99 of queue, prep, pin, h2d, forward,
   d2h and end-to-end;
4. **timeline** (``timeline``, ``bottleneck``): ``--timeline-s`` of timed load at 1.5x that rate
   (saturation), every batch's phases as wall-clock intervals per worker thread, and the process's
   CPU use (CPU-seconds / wall-seconds = cores used); the bottleneck is the phase holding the
   largest share of wall time on the critical path: each instant is charged to one phase in
   progress on any worker, device phases first (forward, then h2d, d2h: host work overlapping them
   is hidden), then host phases (pin, prep), and to "idle" when no batch is in any phase;
5. **2x overload** (``overload_2x``): twice that rate with admission control
   (``BatcherConfig.max_queue_delay_s`` = ``--admission-frac`` x the SLO): p99 of the accepted
   requests and the fraction rejected;
6. **cost growth** (``cost_growth``, also ``serving_cost_growth.{json,md}``): for L_LL x candidates
   per request (``--cost-growth-ll``, ``--cost-growth-cands``) a short max-rate search and the
   device-only capacity of ``all``, batches of the searched batch size capped at
   ``--cost-growth-max-batch-tokens`` S_LL tokens (fewer requests per batch at long L_LL);
   time-boxed by ``--cost-growth-max-s``, skipped cells are listed with the reason;
7. **grid** (``grid``, Figures 7-9) per (configuration, batch size, offered rate in candidates/s):
   p50 / p90 / p99 over requests of end-to-end latency and its parts: queueing (submit to batch
   formation), batch preparation (collation into the host arena), pageable-to-pinned copy (``pin``;
   only where it is a separate step), host-to-device copy, forward (NN search + S_all + model),
   device-to-host copy, phases timed per batch (which costs a little overlap; every request carries
   its batch's phase times). Also host-to-device bytes of the sequence features per candidate,
   broadcast vs de-dup (``h2d_sequence_bytes_ratio``).

``--skip`` leaves out optional phases (e.g. ``--skip cost_growth,grid`` for the search alone).

    python bench/serving.py                 # GPU machine, at most --max-total-s (540 s)
    python bench/serving.py --quick         # tiny CPU smoke test (< 2 minutes), small L
    python bench/serving.py --quick --out /tmp/x
    python bench/serving.py --replot        # redraw the PNG from the JSON in --out

Writes ``serving.json`` (``serving_quick.json`` with ``--quick``), a PNG beside it and the cost
growth table (``serving_cost_growth.{json,md}``, ``serving_quick_cost_growth.*``) in ``--out``
(default ``bench/results``). Off GPU, ``all`` runs the XLA implementations instead of the Pallas
kernels (interpret mode is a correctness tool, not a timing target); the JSON says so.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import functools
import gc
import itertools
import json
import os
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from _env import RESULTS, environment, time_device_calls  # noqa: E402  (puts the repo on sys.path)
import jax  # noqa: E402

from transact_jax.config import SelectionConfig  # noqa: E402
from transact_jax.data.synthetic import SyntheticConfig, iter_chunks  # noqa: E402
from transact_jax.model.config import ModelConfig  # noqa: E402
from transact_jax.run.presets import preset  # noqa: E402
from transact_jax.serving import (  # noqa: E402
    BatcherConfig, BucketConfig, DynamicBatcher, Ladder, Overloaded, Ranker, split_requests)
from transact_jax.serving.collate import plan  # noqa: E402
from transact_jax.serving.layout import layout_for  # noqa: E402
from transact_jax.run.config import ExperimentConfig  # noqa: E402
from transact_jax.model.builder import build_model  # noqa: E402

CONFIGS = {
    "baseline": dict(dedup=False, pinned=False, nn_impl="xla", encoder_impl="xla"),
    "pinned": dict(dedup=False, pinned=True, nn_impl="xla", encoder_impl="xla"),
    "dedup": dict(dedup=True, pinned=False, nn_impl="xla", encoder_impl="xla"),
    "all": dict(dedup=True, pinned=True, nn_impl="pallas_triton", encoder_impl="pallas_triton"),
    "hstu": dict(dedup=True, pinned=True, nn_impl="pallas_triton", encoder_impl="pallas_triton",
                 model="hstu"),
    "hstu_mfalcon": dict(dedup=True, pinned=True, nn_impl="pallas_triton",
                         encoder_impl="pallas_triton", model="hstu_mfalcon"),
    "vista": dict(dedup=True, pinned=True, nn_impl="pallas_triton", encoder_impl="pallas_triton",
                  model="vista"),
}
DEFAULT_CONFIGS = ("baseline", "pinned", "dedup", "all")
GRID_ORDER = ("all", "dedup", "baseline", "pinned", "hstu", "hstu_mfalcon", "vista")
MFALCON_B_M = 16


def model_variant(cfg: ExperimentConfig, name: str) -> ExperimentConfig:
    """The experiment of a configuration's ``model``: ``hstu`` (the HSTU preset on the same S_all,
    one candidate per sequence), ``hstu_mfalcon`` (HSTU over the candidate-independent segments,
    S_LL by recency and S_RT[:r], b_m = MFALCON_B_M candidates per encoder pass) or ``vista`` (VISTA
    over those segments: one summary per request, target attention per candidate; the summary is
    computed in the forward, not read from a store)."""
    if name == "hstu":
        return preset("hstu", cfg)
    recent = dataclasses.replace(cfg.selection, ll_selection="recent")
    if name == "hstu_mfalcon":
        hstu = preset("hstu", cfg)
        return dataclasses.replace(hstu, selection=recent, model=dataclasses.replace(
            hstu.model, segments=("ll", "rt_recent"), b_m=MFALCON_B_M))
    if name == "vista":
        vista = preset("vista", cfg)
        return dataclasses.replace(vista, selection=recent, model=dataclasses.replace(
            vista.model, segments=("ll", "rt_recent")))
    raise ValueError(f"model: unknown variant {name!r}")
PHASES = ("queue", "prep", "pin", "h2d", "forward", "d2h")
SLO_MS = 20.0
OPTIONAL_PHASES = ("device_only", "phases", "timeline", "overload", "cost_growth", "grid")
# critical-path charging order of the timeline: device phases before host phases (module docstring;
# "launch" and "device_wait" are the two intervals of an untimed batch, see batch_intervals)
CRITICAL_PATH_ORDER = ("forward", "device_wait", "h2d", "d2h", "pin", "launch", "prep")
PHASE_COLORS = {"prep": "C0", "pin": "C5", "h2d": "C1", "forward": "C2", "d2h": "C3",
                "launch": "C4", "device_wait": "C6"}
OUTPUT_RESERVE_S = 10.0      # seconds of the budget kept for writing the outputs
SATURATION = 1.5             # timeline load, as a multiple of the max sustainable rate
OVERLOAD = 2.0               # overload phase load, same


# ------------------------------------------------------------------------------------ setup

@dataclasses.dataclass(frozen=True)
class Engine:
    """What every Ranker of the run is built from: the experiment config and parameters (shared by
    all L_LL: they do not depend on ``max_ll_len``), whether kernels may run (GPU), staging slots
    (= pipeline depth: a batch in flight holds one arena) and compile threads."""

    cfg: ExperimentConfig
    params: object
    on_gpu: bool
    staging_slots: int
    compile_threads: int


def request_pool(cfg: ExperimentConfig, ll_len: int, cands: int, count: int, seed: int = 0):
    """``count`` single requests from the synthetic world, S_LL exactly ``ll_len`` tokens long."""
    syn = SyntheticConfig(seed=seed, num_items=50_000, users_per_chunk=count, fixed_ll_length=ll_len,
                          candidates_per_request=(cands, cands))
    chunk = next(iter_chunks(syn, cfg.feature, cfg.selection, count))
    requests = dataclasses.replace(chunk.requests, labels=None)
    return split_requests(requests)


def request_classes(max_requests: int, ratio: int) -> List[int]:
    """Batch sizes in requests that get their own bucket: 1, ratio, ratio^2, ... and
    ``max_requests``."""
    classes, c = [], 1
    while c < max_requests:
        classes.append(c)
        c *= max(2, ratio)
    return classes + [max(1, max_requests)]


def bench_buckets(sel: SelectionConfig, ll_len: int, cands: int, max_requests: int,
                  ratio: int = 2) -> BucketConfig:
    """Ladders aligned with the load: every request has ``cands`` candidates and ``ll_len`` S_LL
    tokens, so a batch of U requests is padded to the next of :func:`request_classes` in U, U x cands
    and U x L_LL together (plus one padding request): one bucket per class."""
    classes = request_classes(max_requests, ratio)
    base = BucketConfig.for_selection(sel, max_candidates=classes[-1] * cands)
    top = classes[-1]
    return dataclasses.replace(
        base,
        candidates=Ladder(tuple(c * cands for c in classes)),
        requests=Ladder(tuple(c + 1 for c in classes)),
        ll_tokens=Ladder(tuple(c * ll_len for c in classes)),
        rt_tokens=Ladder((top * max(sel.max_rt_len, 1),)),
        imp_tokens=Ladder((top * max(sel.max_imp_len, 1),)),
        rt_width=Ladder((max(sel.max_rt_len, 1),)), imp_width=Ladder((max(sel.max_imp_len, 1),)))


def make_rankers(engine: Engine, buckets: BucketConfig, names: Sequence[str],
                 cfg: Optional[ExperimentConfig] = None) -> Dict[str, Ranker]:
    """One Ranker per configuration name (kernels replaced by XLA off GPU)."""
    out = {}
    for name in names:
        opts = dict(CONFIGS[name])
        if not engine.on_gpu:
            opts.update(nn_impl="xla", encoder_impl="xla")
        run_cfg, params = cfg or engine.cfg, engine.params
        variant = opts.pop("model", None)
        if variant is not None:
            run_cfg = model_variant(run_cfg, variant)
            params = build_model(run_cfg.feature, run_cfg.selection, run_cfg.model, 0)[1]
        out[name] = Ranker(run_cfg, params, buckets=buckets, staging_slots=engine.staging_slots, **opts)
    return out


def warm_all(rankers: Dict[str, Ranker], pool, max_requests: Dict[str, int], workers: int) -> dict:
    """Compile every bucket that a batch of 1..max_requests[name] pool requests reaches, for every
    configuration: distinct executables compile in parallel threads (XLA compiles outside the
    GIL); then each Ranker allocates its staging arenas and runs one real batch per bucket."""
    t0 = time.perf_counter()
    jobs, examples = {}, {}
    for name, r in rankers.items():
        for u in range(1, max_requests[name] + 1):
            bucket = r.bucket_for(pool[:u])
            # rankers with the same config and NN implementation share executables
            jobs.setdefault((r.cfg, r.config.nn_impl, bucket), (r, bucket))
            examples.setdefault(name, {})[bucket] = u        # the largest batch of each bucket
    with ThreadPoolExecutor(max(1, min(workers, len(jobs)))) as ex:
        list(ex.map(lambda job: job[0].warmup([job[1]]), jobs.values()))
    compile_s = time.perf_counter() - t0
    out = {}
    for name, r in rankers.items():
        t1 = time.perf_counter()
        sizes = sorted(examples[name].values())
        r.warmup_batches([pool[:u] for u in sizes])             # arenas (no compiles)
        for u in sizes:
            r.dispatch(pool[:u]).finish()
        out[name] = {"arenas_and_first_batches_s": time.perf_counter() - t1,
                     "staging_host_bytes": r.staging_host_bytes, "buckets": len(sizes)}
    out["_compile"] = {"executables": len(jobs), "seconds": compile_s,
                       "threads": max(1, min(workers, len(jobs)))}
    return out


def compile_estimate_s(warmup: dict, executables: int, threads: int) -> float:
    """Seconds to compile ``executables`` on ``threads``, from a previous warm-up's record."""
    c = warmup.get("_compile") or {}
    n = max(1, c.get("executables", 1))
    per_exec = c.get("seconds", 10.0) * min(c.get("threads", 1), n) / n
    return per_exec * -(-executables // max(1, threads))


class Budget:
    """The run's deadline (``perf_counter`` seconds)."""

    def __init__(self, end: float):
        self.end = end

    def left(self) -> float:
        return self.end - time.perf_counter()

    def fits(self, seconds: float) -> bool:
        return seconds < self.left()


# ------------------------------------------------------------------------------ one load point

@dataclasses.dataclass(frozen=True)
class Load:
    """How load points are offered and judged: candidates per request, seconds of arrivals, the
    batcher's max wait and extra wait while busy, queue bound (seconds of offered load), seconds to finish after the last
    arrival, the p99 target and the batches in flight."""

    cands: int
    duration: float
    max_wait_s: float
    busy_wait_s: float
    queue_s: float
    grace: float
    slo_ms: float
    pipeline_depth: int

    @property
    def point_s(self) -> float:
        """Seconds one load point is expected to take."""
        return self.duration + 0.5 * self.grace


def batcher_config(**options) -> Tuple[BatcherConfig, List[str]]:
    """A ``BatcherConfig`` of the options this version of the engine has, and the names of the
    options given (not None) that it lacks."""
    known = {f.name for f in dataclasses.fields(BatcherConfig)}
    lacking = [k for k, v in options.items() if k not in known and v is not None]
    return BatcherConfig(**{k: v for k, v in options.items() if k in known}), lacking


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads)."""
    t = os.times()
    return t.user + t.system


def _pct(values, qs=(50, 90, 99)) -> Dict[str, Optional[float]]:
    a = np.asarray([v for v in values if v is not None], np.float64)
    if not len(a):
        return {f"p{q}": None for q in qs}
    return {f"p{q}": float(np.percentile(a, q)) * 1e3 for q in qs}


def run_point(ranker, pool, load: Load, *, batch: int, rate: float, timing: bool,
              admission_delay_s: Optional[float] = None, seed: int = 0,
              keep_latencies: bool = False) -> dict:
    """Offer ``rate`` candidates/s for ``load.duration`` s (Poisson arrivals); returns the
    statistics. ``admission_delay_s``: the batcher's ``max_queue_delay_s`` (admission control);
    ``keep_latencies``: also every completed request's end-to-end seconds (``e2e_s``)."""
    cands = load.cands
    req_rate = rate / cands
    n = max(1, int(round(req_rate * load.duration)))
    rng = np.random.default_rng(seed)
    schedule = np.cumsum(rng.exponential(1.0 / req_rate, n))
    cfg, lacking = batcher_config(
        max_batch_candidates=batch, max_wait_s=load.max_wait_s, busy_wait_s=load.busy_wait_s,
        max_queue_requests=max(4, int(req_rate * load.queue_s)), pipeline_depth=load.pipeline_depth,
        timing=timing, max_queue_delay_s=admission_delay_s)
    batcher = DynamicBatcher(ranker, cfg)
    submitted: List[tuple] = []
    rejected = 0
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    t0 = wall0 + 0.005
    for i in range(n):
        target = t0 + schedule[i]
        delay = target - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        try:
            submitted.append((target, batcher.submit(pool[i % len(pool)])))
        except Overloaded:
            rejected += 1
    t_end = time.perf_counter()
    deadline = t_end + load.grace
    for _, f in submitted:
        try:
            f.result(timeout=max(0.0, deadline - time.perf_counter()))
        except FutureTimeout:
            break
        except Exception:  # noqa: BLE001 - counted below
            pass
    batcher.close(drain=False)
    cpu_s, wall_s = _cpu_seconds() - cpu0, time.perf_counter() - wall0
    done = [(target, f) for target, f in submitted if f.done() and f.exception() is None]
    dropped = len(submitted) - len(done)
    timings = [f.timing for _, f in done]
    e2e = [f.timing.t_done - target for target, f in done]
    lag = [f.timing.t_submit - target for target, f in done]
    out = {
        "offered_candidates_per_s": rate, "duration_s": load.duration, "requests": n,
        "batch_candidates": batch, "pipeline_depth": load.pipeline_depth, "timed": timing,
        "offered_actual_candidates_per_s": n * cands / schedule[-1] if n > 1 else rate,
        "completed": len(done), "rejected_overloaded": rejected, "dropped": dropped,
        "reject_fraction": rejected / n,
        "achieved_candidates_per_s": (len(done) * cands / (max(t.t_done for t in timings) - t0)
                                      if timings else 0.0),
        "e2e_ms": _pct(e2e), "generator_lag_ms": _pct(lag),
        "mean_batch_candidates": float(np.mean([t.batch_candidates for t in timings])) if timings else 0,
        "cpu_cores_used": cpu_s / wall_s, "window_perf_s": [t0, t_end],
    }
    if admission_delay_s is not None:
        out["admission_max_queue_delay_ms"] = admission_delay_s * 1e3
    if lacking:
        out["engine_lacks"] = lacking
    for phase in PHASES:
        out[f"{phase}_ms"] = _pct([getattr(t, phase, None) for t in timings])
    out["model_run_ms"] = _pct([None if t.h2d is None else (t.pin or 0) + t.h2d + t.forward + t.d2h
                                for t in timings])
    out["copy_ms"] = _pct([None if t.h2d is None else (t.pin or 0) + t.h2d for t in timings])
    sized = [t for t in timings if getattr(t, "h2d_bytes", None)]
    if sized:   # each request's share of its batch's bytes, averaged per candidate
        seq = sum(t.h2d_bytes["sequences"] * cands / t.batch_candidates for t in sized)
        tot = sum(t.h2d_bytes["total"] * cands / t.batch_candidates for t in sized)
        out["h2d_sequence_bytes_per_candidate"] = seq / (len(sized) * cands)
        out["h2d_total_bytes_per_candidate"] = tot / (len(sized) * cands)
    if keep_latencies:
        out["e2e_s"] = e2e
    p99 = out["e2e_ms"]["p99"]
    out["sustained"] = bool(timings) and rejected == 0 and dropped == 0 and p99 <= load.slo_ms
    return out


def _ms(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def search_max_rate(ranker, pool, load: Load, *, batch: int, start: float, steps: int,
                    budget: Budget, label: str, point: Optional[Callable[..., dict]] = None) -> dict:
    """Highest offered rate with p99 <= the SLO and nothing rejected or dropped (phases not
    synchronized): grow by 1.6x until a rate fails, then bisect. ``point``: how a load point is
    run (default: :func:`run_point` on ``ranker`` and ``pool`` in this process)."""
    point = point or functools.partial(run_point, ranker, pool)
    best, fail, rate, trials = None, None, float(start), []
    for _ in range(steps):
        if not budget.fits(load.point_s):
            break
        r = point(load, batch=batch, rate=rate, timing=False)
        trials.append(r)
        print(f"  search {label} batch {batch}: {rate:>10,.0f} cand/s -> p99 {_ms(r['e2e_ms']['p99'])} ms, "
              f"rejected {r['rejected_overloaded']}, dropped {r['dropped']}, "
              f"{r['cpu_cores_used']:.1f} cores: {'ok' if r['sustained'] else 'FAIL'}", flush=True)
        if r["sustained"]:
            best = r
            rate = rate * 1.6 if fail is None else (rate + fail) / 2
        else:
            fail = rate
            rate = (best["offered_candidates_per_s"] + rate) / 2 if best else rate / 2
        if best and fail and fail / best["offered_candidates_per_s"] < 1.1:
            break
    return {"batch": batch, "best": best, "trials": trials,
            "max_candidates_per_s": best["offered_candidates_per_s"] if best else 0.0}


# ------------------------------------------------------------------------ device-only capacity

def captured_forward(ranker: Ranker, parts) -> Callable[[], object]:
    """The jitted forward call that ``Ranker.dispatch`` launches for ``parts`` (parameters, the
    batch staged on the device, its layout), as a function that replays it. One real batch is
    dispatched to capture the call's arguments."""
    forward = ranker._forward
    calls: List[tuple] = []

    def capture(*args, **kwargs):
        calls.append((args, kwargs))
        return forward(*args, **kwargs)

    ranker._forward = capture
    try:
        ranker.dispatch(parts).finish()
    finally:
        ranker._forward = forward
    if not calls:
        raise RuntimeError("Ranker.dispatch did not call Ranker._forward: cannot replay the forward")
    args, kwargs = calls[-1]
    return lambda: forward(*args, **kwargs)


def device_only(ranker: Ranker, pool, cands: int, batch: int, repeats: int, calls: int) -> dict:
    """Capacity of the device alone at a full batch of ``batch`` candidates: the captured forward
    replayed back to back (``time_device_calls``), candidates / median time."""
    parts = pool[:max(1, batch // cands)]
    stats = time_device_calls(captured_forward(ranker, parts), [()], repeats, calls)
    n = sum(p.num_candidates for p in parts)
    return {"batch_candidates": n, "requests": len(parts),
            "bucket_candidates": ranker.bucket_for(parts).candidates, "forward_us": stats,
            "candidates_per_s": n / (stats["median_us"] * 1e-6)}


# ------------------------------------------------------------------------------------ timeline

class TracedRanker:
    """Stands in for a :class:`Ranker` in front of the batcher and records, per batch, the thread and
    ``perf_counter`` stamps of ``dispatch`` and of ``InFlight.finish``, with the batch's phase times
    (:func:`batch_intervals` turns a record into per-thread phase intervals). Every other attribute
    is the wrapped Ranker's."""

    def __init__(self, ranker: Ranker):
        self._ranker = ranker
        self.records: List[dict] = []
        self._lock = threading.Lock()

    def __getattr__(self, name: str):
        return getattr(self._ranker, name)

    def dispatch(self, parts, *args, **kwargs) -> "_TracedInFlight":
        thread = threading.current_thread().name
        t0 = time.perf_counter()
        inflight = self._ranker.dispatch(parts, *args, **kwargs)
        return _TracedInFlight(self, inflight, thread, t0, time.perf_counter())

    def record(self, rec: dict) -> None:
        with self._lock:
            self.records.append(rec)


class _TracedInFlight:
    """An ``InFlight`` whose ``finish`` reports the batch to its :class:`TracedRanker`."""

    def __init__(self, tracer: TracedRanker, inflight, thread: str, t_dispatch: float,
                 t_dispatched: float):
        self._tracer, self._inflight = tracer, inflight
        self._rec = {"dispatch_thread": thread, "t_dispatch": t_dispatch, "t_dispatched": t_dispatched}

    def __getattr__(self, name: str):
        return getattr(self._inflight, name)

    def finish(self):
        t0 = time.perf_counter()
        outs, report = self._inflight.finish()
        self._tracer.record(dict(self._rec, finish_thread=threading.current_thread().name,
                                 t_finish=t0, t_finished=time.perf_counter(),
                                 times=dict(report.times), candidates=report.num_candidates))
        return outs, report


def batch_intervals(rec: dict) -> List[Tuple[str, str, float, float]]:
    """(thread, phase, start, end) of one traced batch. Timed: prep, pin, h2d, forward back to back
    from the start of ``dispatch``, then d2h from the start of ``finish``. Untimed (only prep is
    measured): prep, ``launch`` (rest of ``dispatch``: copy and forward enqueued) and
    ``device_wait`` (``finish``: waiting for the device, then d2h)."""
    times, thread = rec["times"], rec["dispatch_thread"]
    out, t = [], rec["t_dispatch"]
    for phase in ("prep", "pin", "h2d", "forward"):
        dt = times.get(phase)
        if dt is not None:
            out.append((thread, phase, t, t + dt))
            t += dt
    if times.get("forward") is None:
        out.append((thread, "launch", t, rec["t_dispatched"]))
        out.append((rec["finish_thread"], "device_wait", rec["t_finish"], rec["t_finished"]))
    else:
        d2h = times.get("d2h") or rec["t_finished"] - rec["t_finish"]
        out.append((rec["finish_thread"], "d2h", rec["t_finish"], rec["t_finish"] + d2h))
    return out


def critical_path_seconds(intervals: List[Tuple[str, str, float, float]],
                          window: Tuple[float, float]) -> Dict[str, float]:
    """Wall seconds of ``window`` charged to phases: each instant to the first phase of
    ``CRITICAL_PATH_ORDER`` (unknown phases after those) in progress on any thread, "idle" when no
    batch is in any phase. The charges add up to the window."""
    phases = {p for _, p, _, _ in intervals}
    order = [p for p in CRITICAL_PATH_ORDER if p in phases] + sorted(phases - set(CRITICAL_PATH_ORDER))
    events = sorted([(s, 1, p) for _, p, s, _ in intervals] + [(e, -1, p) for _, p, _, e in intervals])
    active: collections.Counter = collections.Counter()
    charged: collections.Counter = collections.Counter()
    t_prev = window[0]
    for t, step, phase in events:
        if t > t_prev:
            charged[next((p for p in order if active[p] > 0), "idle")] += t - t_prev
            t_prev = t
        active[phase] += step
    charged["idle"] += max(0.0, window[1] - t_prev)
    return dict(charged)


def timeline_of(tracer: TracedRanker, point: dict) -> Tuple[dict, dict]:
    """The timeline (per-thread phase intervals, ms from the first arrival, clipped to the arrival
    window) and the bottleneck (critical-path shares, mean concurrency per phase, cores used) of a
    traced load point."""
    w0, w1 = point["window_perf_s"]
    clipped = [(th, ph, max(s, w0), min(e, w1), i) for i, rec in enumerate(tracer.records)
               for th, ph, s, e in batch_intervals(rec) if e > w0 and s < w1]
    if not clipped:
        raise RuntimeError("no batch was traced: the batcher did not call Ranker.dispatch/finish")
    clipped.sort(key=lambda iv: iv[2])
    threads = list(dict.fromkeys(th for th, *_ in clipped))
    seen = {iv[1] for iv in clipped}
    phases = [p for p in CRITICAL_PATH_ORDER[::-1] if p in seen] + sorted(seen - set(CRITICAL_PATH_ORDER))
    wall = w1 - w0
    shares = {k: v / wall for k, v in critical_path_seconds([iv[:4] for iv in clipped], (w0, w1)).items()}
    top = max(shares, key=shares.get)
    timeline = {
        "offered_candidates_per_s": point["offered_candidates_per_s"],
        "batch_candidates": point["batch_candidates"], "timed": point["timed"], "window_s": wall,
        "threads": threads, "phases": phases, "batches": len(tracer.records),
        "interval_fields": ["thread", "phase", "start_ms", "end_ms", "batch"],
        "intervals_ms": [[threads.index(th), ph, round((s - w0) * 1e3, 3), round((e - w0) * 1e3, 3), b]
                         for th, ph, s, e, b in clipped],
        "batch_candidates_each": [rec["candidates"] for rec in tracer.records],
        "cpu_cores_used": point["cpu_cores_used"],
        "point": {k: v for k, v in point.items() if k != "window_perf_s"},
    }
    bottleneck = {
        "phase": top, "share_of_wall": shares[top], "critical_path_shares": shares,
        "mean_concurrency": {p: sum(e - s for _, q, s, e, _ in clipped if q == p) / wall for p in phases},
        "cores_used": point["cpu_cores_used"], "cpu_count": os.cpu_count(),
        "worker_threads": len(threads), "offered_candidates_per_s": point["offered_candidates_per_s"],
        "achieved_candidates_per_s": point["achieved_candidates_per_s"],
        "method": "each instant of the arrival window charged to the first phase in progress on "
                  f"any worker in the order ({' > '.join(CRITICAL_PATH_ORDER)}); 'idle' when no batch "
                  "is in any phase (batch formation, resolving futures, Python overhead); phases "
                  "synchronized (BatcherConfig.timing); cores = process CPU-s / wall-s",
    }
    return timeline, bottleneck


# ---------------------------------------------------------------------------------- cost growth

def growth_order(lls: Sequence[int], cands: Sequence[int], ll0: int, c0: int) -> List[Tuple[int, int]]:
    """The (L_LL, candidates) cells in the order they are measured: the main setting, then cells
    that change one of the two (nearest first), then the corners."""
    def key(cell):
        ll, c = cell
        return (int(ll != ll0) + int(c != c0), abs(np.log(ll / ll0)) + abs(np.log(c / c0)))
    return sorted(itertools.product(lls, cands), key=key)


def _trial_summary(r: dict) -> dict:
    return {k: r[k] for k in ("offered_candidates_per_s", "achieved_candidates_per_s", "e2e_ms",
                              "rejected_overloaded", "dropped", "sustained", "cpu_cores_used",
                              "mean_batch_candidates")}


def growth_row(ll_len: int, cands: int, requests: int, search: dict, dev: Optional[dict]) -> dict:
    """One measured cell of the cost growth table."""
    best = search["best"]
    ref = best or (min(search["trials"], key=lambda r: r["offered_candidates_per_s"])
                   if search["trials"] else None)
    dev_cps = dev["candidates_per_s"] if dev else None
    return {"ll_len": ll_len, "cands": cands, "requests_per_batch": requests,
            "batch_candidates": requests * cands,
            "max_candidates_per_s": search["max_candidates_per_s"],
            "p99_ms": ref["e2e_ms"]["p99"] if ref else None,
            "p50_ms": ref["e2e_ms"]["p50"] if ref else None, "sustained": best is not None,
            "device_only_candidates_per_s": dev_cps,
            "sustained_over_device_only": (search["max_candidates_per_s"] / dev_cps) if dev_cps else None,
            "cpu_cores_used": ref["cpu_cores_used"] if ref else None,
            "trials": [_trial_summary(r) for r in search["trials"]]}


def growth_cell(engine: Engine, s: "Settings", load: Load, ll_len: int, cands: int, requests: int,
                budget: Budget) -> dict:
    """Build, warm and measure one cost growth cell (``all`` only): device-only capacity at a full
    batch, then a short max-rate search starting at half of it."""
    t0 = time.perf_counter()
    sel = dataclasses.replace(engine.cfg.selection, max_ll_len=ll_len)
    cfg = dataclasses.replace(engine.cfg, selection=sel)
    pool = request_pool(cfg, ll_len, cands, count=max(2 * requests, 8))
    buckets = bench_buckets(sel, ll_len, cands, requests, s.cg_bucket_ratio)
    ranker = make_rankers(engine, buckets, ["all"], cfg)["all"]
    warm = warm_all({"all": ranker}, pool, {"all": requests}, engine.compile_threads)
    dev = device_only(ranker, pool, cands, requests * cands, s.device_repeats, s.device_calls)
    cell_load = dataclasses.replace(load, cands=cands, duration=s.cg_duration)
    search = search_max_rate(ranker, pool, cell_load, batch=requests * cands,
                             start=0.5 * dev["candidates_per_s"], steps=s.cg_steps, budget=budget,
                             label=f"cost growth L_LL {ll_len:,} x {cands}")
    row = growth_row(ll_len, cands, requests, search, dev)
    row.update(compile_s=warm["_compile"]["seconds"], executables=warm["_compile"]["executables"],
               seconds=time.perf_counter() - t0)
    return row


def cost_growth(engine: Engine, s: "Settings", load: Load, budget: Budget, main: dict,
                warmup: dict, on_row: Callable[[dict], None]) -> dict:
    """The cost growth table (module docstring), cells in :func:`growth_order`; a cell starts only
    if its estimated time fits both ``--cost-growth-max-s`` and the run's budget. The main setting's
    cell reuses the main search when its batch is the same. ``on_row`` is called after each cell."""
    end = min(budget.end, time.perf_counter() + s.cg_max_s)
    cell_budget = Budget(end)
    batch = s.cg_batch or main.get("batch") or max(s.search_batches)
    out = {"batch_candidates_target": batch, "max_batch_tokens": s.cg_max_batch_tokens,
           "bucket_ratio": s.cg_bucket_ratio, "search_steps": s.cg_steps,
           "point_duration_s": s.cg_duration, "slo_ms": load.slo_ms, "max_s": s.cg_max_s,
           "rows": [], "skipped": []}
    scale = []                       # measured / estimated seconds of the cells run so far
    for ll_len, cands in growth_order(s.cg_ll, s.cg_cands, s.ll_len, s.cands):
        requests = max(1, min(batch // cands, s.cg_max_batch_tokens // ll_len))
        if (ll_len, cands) == (s.ll_len, s.cands) and main.get("search") and \
                requests * cands == main["search"]["batch"]:
            row = growth_row(ll_len, cands, requests, main["search"], main.get("device_only"))
            row["reused"] = "main search and device-only capacity"
            out["rows"].append(row)
            on_row(out)
            continue
        classes = len(request_classes(requests, s.cg_bucket_ratio))
        estimate = (compile_estimate_s(warmup, classes, engine.compile_threads) + 3.0
                    + s.cg_steps * (s.cg_duration + 0.5 * load.grace))
        estimate *= float(np.mean(scale)) if scale else 1.0
        if not cell_budget.fits(estimate):
            out["skipped"].append({"ll_len": ll_len, "cands": cands, "reason": "time budget",
                                   "estimated_s": estimate, "left_s": max(0.0, cell_budget.left())})
            print(f"  cost growth L_LL {ll_len:,} x {cands}: skipped (needs ~{estimate:.0f} s, "
                  f"{max(0.0, cell_budget.left()):.0f} s left)", flush=True)
            continue
        try:
            row = growth_cell(engine, s, load, ll_len, cands, requests, cell_budget)
            row["estimated_s"] = estimate
            scale.append(max(0.5, row["seconds"] / estimate))
            out["rows"].append(row)
            print(f"  cost growth L_LL {ll_len:,} x {cands} ({requests} requests/batch): max "
                  f"{row['max_candidates_per_s']:,.0f} cand/s (p99 {_ms(row['p99_ms'])} ms), device "
                  f"only {row['device_only_candidates_per_s']:,.0f} cand/s; {row['seconds']:.0f} s",
                  flush=True)
        except Exception as e:  # noqa: BLE001 - one failed cell must not cost the others
            traceback.print_exc()
            out["skipped"].append({"ll_len": ll_len, "cands": cands,
                                   "reason": f"error: {type(e).__name__}: {e}"})
        gc.collect()
        on_row(out)
    return out


def cost_growth_markdown(growth: dict, device: str) -> str:
    """The cost growth table as markdown."""
    lines = [f"# Serving cost growth ({device})", "",
             f"Max sustainable candidates/s of `all` (p99 <= {growth['slo_ms']:g} ms, nothing rejected "
             f"or dropped; {growth['search_steps']} load points of {growth['point_duration_s']:g} s "
             f"at most), the p99 there, and the device-only capacity (forward alone, back to back). "
             f"Batches of up to {growth['batch_candidates_target']:,} candidates and "
             f"{growth['max_batch_tokens']:,} S_LL tokens.", "",
             "| L_LL | candidates/request | batch (cand. / req.) | max cand/s | p99 ms | "
             "device-only cand/s | sustained / device |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(growth["rows"], key=lambda r: (r["ll_len"], r["cands"])):
        ratio = r["sustained_over_device_only"]
        dev = r["device_only_candidates_per_s"]
        lines.append(f"| {r['ll_len']:,} | {r['cands']} | {r['batch_candidates']:,} / "
                     f"{r['requests_per_batch']} | {r['max_candidates_per_s']:,.0f} | "
                     f"{_ms(r['p99_ms'])} | {'-' if dev is None else f'{dev:,.0f}'} | "
                     f"{'-' if ratio is None else f'{ratio:.2f}'} |")
    for k in growth["skipped"]:
        lines.append(f"| {k['ll_len']:,} | {k['cands']} | skipped: {k['reason']} | | | | |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- outputs

def sequence_bytes_ratio(cfg, pool, batch: int, cands: int, buckets: BucketConfig) -> dict:
    """Sequence bytes host-to-device for one batch of ``batch`` candidates: broadcast / de-dup,
    as shipped (padded buckets) and unpadded (real tokens x bytes per token)."""
    parts = pool[:max(1, batch // cands)]
    bplan = plan(parts, cfg.selection)
    per_token = cfg.feature.embedding_dim + cfg.feature.action_dtype.itemsize + 2
    shipped = {k: layout_for(bplan.bucket(buckets, k), cfg.feature).part_nbytes()["sequences"]
               for k in ("broadcast", "dedup")}
    real = {"broadcast": sum(bplan.broadcast_tokens.values()) * per_token,
            "dedup": sum(bplan.total_tokens.values()) * per_token}
    return {"batch_candidates": bplan.num_candidates, "shipped_bytes": shipped, "unpadded_bytes": real,
            "ratio_shipped": shipped["broadcast"] / shipped["dedup"],
            "ratio_unpadded": real["broadcast"] / real["dedup"]}


def grid_point(grid: dict, name: str, batch: int, rate: float) -> Optional[dict]:
    """The measured grid point of a configuration, batch size and offered rate."""
    for r in grid.get(name, {}).get(str(batch), []):
        if r.get("offered_candidates_per_s") == rate and "e2e_ms" in r:
            return r
    return None


def figure9(grid: dict, batch: int, rate: float) -> dict:
    base, best = grid_point(grid, "baseline", batch, rate), grid_point(grid, "all", batch, rate)
    if not base or not best:
        return {}
    out = {}
    for key in ("forward_ms", "pin_ms", "h2d_ms", "copy_ms", "prep_ms", "queue_ms", "e2e_ms"):
        row = {}
        for p in ("p50", "p90", "p99"):
            a, b = base[key][p], best[key][p]
            row[p] = a / b if a is not None and b else None
        out[key[:-3]] = row
    return out


def headline(result: dict) -> dict:
    """The headline numbers, from whatever the run has measured so far (None where not)."""
    st, grid = result["settings"], result.get("grid") or {}
    search = result.get("search") or {}
    batch = search.get("batch")
    dev = (result.get("device_only") or {}).get(str(batch)) or {}
    over = result.get("overload_2x") or {}
    bott = result.get("bottleneck") or {}
    fig9 = st["fig9_batch"]
    a = [r for r in grid.get("baseline", {}).get(str(fig9), []) if "h2d_sequence_bytes_per_candidate" in r]
    b = [r for r in grid.get("dedup", {}).get(str(fig9), []) if "h2d_sequence_bytes_per_candidate" in r]
    ratio = (a[0]["h2d_sequence_bytes_per_candidate"] / b[0]["h2d_sequence_bytes_per_candidate"]
             if a and b else (result.get("sequence_bytes") or {}).get("ratio_shipped"))
    p256 = grid_point(grid, "all", 256, st["ref_rate"])
    best = search.get("best") or {}
    return {
        "device": result["environment"]["device"],
        "h2d_sequence_bytes_ratio": ratio,
        "max_candidates_per_s_p99_20ms": search.get("max_candidates_per_s"),
        "p99_ms_all_opts_batch256": p256["e2e_ms"]["p99"] if p256 else None,
        "search_slo_ms": st["slo_ms"], "search_batch": batch,
        "ll_len": st["ll_len"], "candidates_per_request": st["cands_per_request"],
        "ref_rate_candidates_per_s": st["ref_rate"],
        "device_only_candidates_per_s": dev.get("candidates_per_s"),
        "overload_2x_p99_ms_accepted": (over.get("e2e_ms") or {}).get("p99"),
        "overload_2x_reject_fraction": over.get("reject_fraction"),
        "max_rate_p99_ms": (best.get("e2e_ms") or {}).get("p99"),
        "bottleneck_phase": bott.get("phase"), "cores_used_at_saturation": bott.get("cores_used"),
        "pipeline_depth": st["pipeline_depth"],
        "frontend_processes": st.get("frontends", 0),
    }


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _grouped_bars(ax, groups: List[str], series: Dict[str, List[float]], ylabel: str) -> None:
    """Bars of each series side by side per group (a ``C{i}`` color per series)."""
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for i, (name, ys) in enumerate(series.items()):
        ax.bar(x + i * width, [y or 0 for y in ys], width, color=f"C{i}", label=name)
    ax.set_xticks(x + width * (len(series) - 1) / 2, groups)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)


def _panel_copy(ax, result: dict) -> None:
    grid, st = result["grid"], result["settings"]
    names = [n for n in CONFIGS if n in grid]
    batches, ref = st["batch_sizes"], st["ref_rate"]
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(batches))
    for i, name in enumerate(names):
        pts = [grid_point(grid, name, b, ref) or {} for b in batches]
        pin = [(p.get("pin_ms", {}).get("p99") or 0) for p in pts]
        h2d = [(p.get("h2d_ms", {}).get("p99") or 0) for p in pts]
        ax.bar(x + i * width, pin, width, color=f"C{i}", alpha=0.5)
        ax.bar(x + i * width, h2d, width, bottom=pin, color=f"C{i}", label=name)
    ax.set_xticks(x + width * (len(names) - 1) / 2, [str(b) for b in batches])
    ax.set_title(f"copy p99 (pin light, H2D dark), {ref:,.0f} cand/s (cf. Fig. 7)", fontsize=10)
    ax.set_xlabel("batch size (candidates)")
    ax.set_ylabel("ms")
    ax.legend(fontsize=8)


def _panel_model_run(ax, result: dict) -> None:
    grid, st = result["grid"], result["settings"]
    names = [n for n in CONFIGS if n in grid]
    series = {n: [((grid_point(grid, n, b, st["ref_rate"]) or {}).get("model_run_ms", {}).get("p99"))
                  for b in st["batch_sizes"]] for n in names}
    _grouped_bars(ax, [str(b) for b in st["batch_sizes"]], series, "ms")
    ax.set_title("model run p99: copy + forward + D2H (cf. Fig. 8)", fontsize=10)
    ax.set_xlabel("batch size (candidates)")


def _panel_fig9(ax, result: dict) -> None:
    heat = result.get("figure9_reduction_baseline_over_all") or {}
    rows = [k for k in heat if any(v is not None for v in heat[k].values())]
    if not rows:
        return _note(ax, "Figure 9: baseline or 'all' grid point not measured")
    data = np.array([[heat[k].get(p) or np.nan for p in ("p50", "p90", "p99")] for k in rows])
    im = ax.imshow(np.log10(data), cmap="viridis", aspect="auto")
    for (i, j), v in np.ndenumerate(data):
        ax.text(j, i, "-" if np.isnan(v) else f"{v:.1f}x", ha="center", va="center", color="w")
    ax.set_xticks(range(3), ["p50", "p90", "p99"])
    ax.set_yticks(range(len(rows)), rows)
    ax.figure.colorbar(im, ax=ax, label="log10 reduction")
    ax.set_title(f"baseline / all, batch {result['settings']['fig9_batch']} (cf. Fig. 9)", fontsize=10)


def _panel_latency(ax, result: dict) -> None:
    grid, st = result["grid"], result["settings"]
    b = st["fig9_batch"]
    for i, name in enumerate(n for n in CONFIGS if n in grid):
        pts = [(r["offered_candidates_per_s"], r["e2e_ms"]["p99"]) for r in grid[name].get(str(b), [])
               if r.get("e2e_ms", {}).get("p99") is not None]
        if pts:
            ax.plot(*zip(*pts), "o-", color=f"C{i}", label=f"{name}, batch {b} (timed)")
    search = result.get("search") or {}
    for t in search.get("trials", []):
        if t["e2e_ms"]["p99"] is not None:
            ax.plot(t["offered_candidates_per_s"], t["e2e_ms"]["p99"], "k.", alpha=0.5)
    if search.get("batch"):
        ax.plot([], [], "k.", label=f"search 'all', batch {search['batch']}")
    over = result.get("overload_2x") or {}
    if (over.get("e2e_ms") or {}).get("p99") is not None:
        ax.plot(over["offered_candidates_per_s"], over["e2e_ms"]["p99"], "r^",
                label=f"2x overload, admitted ({over['reject_fraction']:.0%} rejected)")
    ax.axhline(st["slo_ms"], color="r", ls="--", label=f"{st['slo_ms']:g} ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered load (candidates/s)")
    ax.set_ylabel("p99 end-to-end (ms)")
    ax.set_title("p99 latency vs load", fontsize=10)
    ax.legend(fontsize=7)


def _panel_phases(ax, result: dict) -> None:
    ph = result.get("phases_at_max_rate")
    if not ph:
        return _note(ax, "phases at the max rate: not measured")
    keys = [k for k in PHASES + ("e2e",) if ph.get(f"{k}_ms", {}).get("p99") is not None]
    _grouped_bars(ax, keys, {q: [ph[f"{k}_ms"][q] for k in keys] for q in ("p50", "p99")}, "ms")
    ax.set_yscale("log")
    ax.set_title(f"phases at the max rate {ph['offered_candidates_per_s']:,.0f} cand/s, batch "
                 f"{ph['batch_candidates']} (timed)", fontsize=10)


def _panel_capacity(ax, result: dict) -> None:
    dev = result.get("device_only") or {}
    per_batch = (result.get("search") or {}).get("all_batch_sizes") or {}
    batches = sorted(set(dev) | set(per_batch), key=int)
    if not batches:
        return _note(ax, "device-only capacity / search: not measured")
    _grouped_bars(ax, batches, {
        "device only (forward back to back)": [(dev.get(b) or {}).get("candidates_per_s") for b in batches],
        f"sustained, p99 <= {result['settings']['slo_ms']:g} ms": [per_batch.get(b) for b in batches]},
        "candidates/s")
    ax.set_xlabel("batch size (candidates)")
    ax.set_title("capacity of 'all': device alone vs end to end", fontsize=10)


def _panel_timeline(ax, result: dict) -> None:
    tl = result.get("timeline") or {}
    if not tl.get("intervals_ms"):
        return _note(ax, "timeline: not measured")
    threads = tl["threads"]
    for phase in tl["phases"]:
        for i in range(len(threads)):
            bars = [(s, e - s) for t, p, s, e, *_ in tl["intervals_ms"] if t == i and p == phase]
            if bars:
                ax.broken_barh(bars, (i - 0.4, 0.8), facecolors=PHASE_COLORS.get(phase, "k"))
    for phase in tl["phases"]:
        ax.bar(0, 0, color=PHASE_COLORS.get(phase, "k"), label=phase)
    ax.set_yticks(range(len(threads)), threads, fontsize=8)
    ax.set_xlim(0, tl["window_s"] * 1e3)
    ax.set_xlabel("ms from the first arrival")
    b = result.get("bottleneck") or {}
    ax.set_title(f"timeline at {tl['offered_candidates_per_s']:,.0f} cand/s (timed): bottleneck "
                 f"{b.get('phase')} ({b.get('share_of_wall', 0):.0%} of wall), "
                 f"{b.get('cores_used', 0):.1f} of {b.get('cpu_count')} cores", fontsize=10)
    ax.legend(fontsize=8, ncol=len(tl["phases"]), loc="upper right")


def _panel_cost_growth(ax, result: dict) -> None:
    rows = (result.get("cost_growth") or {}).get("rows") or []
    if not rows:
        return _note(ax, "cost growth: not measured")
    for i, c in enumerate(sorted({r["cands"] for r in rows})):
        pts = sorted((r["ll_len"], r["max_candidates_per_s"], r["device_only_candidates_per_s"])
                     for r in rows if r["cands"] == c)
        xs = [p[0] for p in pts]
        ax.plot(xs, [p[1] or np.nan for p in pts], "o-", color=f"C{i}", label=f"{c} cand/request")
        ax.plot(xs, [p[2] or np.nan for p in pts], "x--", color=f"C{i}", alpha=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("L_LL (tokens per request)")
    ax.set_ylabel("candidates/s")
    ax.set_title("cost growth: max sustained (solid), device only (dashed)", fontsize=10)
    ax.legend(fontsize=8)


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(19, 14))
    gs = fig.add_gridspec(3, 3)
    panels = [(gs[0, 0], _panel_copy), (gs[0, 1], _panel_model_run), (gs[0, 2], _panel_fig9),
              (gs[1, 0], _panel_latency), (gs[1, 1], _panel_phases), (gs[1, 2], _panel_capacity),
              (gs[2, :2], _panel_timeline), (gs[2, 2], _panel_cost_growth)]
    for spec, draw in panels:
        ax = fig.add_subplot(spec)
        try:
            draw(ax, result)
        except Exception as e:  # noqa: BLE001 - a panel without its data says so
            _note(ax, f"{draw.__name__}: {type(e).__name__}: {e}")
    st = result["settings"]
    fig.suptitle(f"TransAct V2 serving, L_LL = {st['ll_len']:,}, {st['cands_per_request']} "
                 f"candidates/request, pipeline depth {st['pipeline_depth']}, "
                 f"{result['environment']['device']} ({result.get('date', '')[:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class Report:
    """The run's result files, rewritten after every phase (module docstring): ``{stem}.json``,
    ``{stem}_cost_growth.{json,md}`` once that table exists, and at the end ``{stem}.png``."""

    def __init__(self, out: str, stem: str, result: dict, t_start: float):
        os.makedirs(out, exist_ok=True)
        self.result = result
        self.path = os.path.join(out, f"{stem}.json")
        self.png = os.path.join(out, f"{stem}.png")
        self.growth = os.path.join(out, f"{stem}_cost_growth")
        self.t_start = t_start

    @staticmethod
    def _write(path: str, text: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)

    def save(self) -> None:
        r = self.result
        r["headline"] = headline(r)
        r["total_s"] = time.perf_counter() - self.t_start
        self._write(self.path, json.dumps(r, indent=1, default=str))
        if r.get("cost_growth"):
            growth = dict(r["cost_growth"], environment=r["environment"], date=r["date"],
                          ll_len_main=r["settings"]["ll_len"], configuration="all")
            self._write(self.growth + ".json", json.dumps(growth, indent=1))
            self._write(self.growth + ".md", cost_growth_markdown(growth, r["environment"]["device"]))

    def phase(self, name: str, fn: Callable[[], object]):
        """Run one phase: its seconds and any error are recorded (the run goes on), then saved."""
        t0 = time.perf_counter()
        print(f"-- {name}", flush=True)
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - a failed phase is recorded, the later ones still run
            traceback.print_exc()
            self.result["errors"][name] = f"{type(e).__name__}: {e}"
            value = None
        self.result["phase_seconds"][name] = time.perf_counter() - t0
        self.save()
        return value

    def plot(self) -> None:
        try:
            plot(self.result, self.png)
        except Exception as e:  # noqa: BLE001 - the JSON is already written
            traceback.print_exc()
            self.result["errors"]["plot"] = f"{type(e).__name__}: {e}"
            self.save()


# ----------------------------------------------------------------------------------------- main

@dataclasses.dataclass(frozen=True)
class Settings:
    """The run's settings, defaults resolved (``--quick`` or full); see ``--help``."""

    quick: bool
    out: str
    ll_len: int
    cands: int
    batch_sizes: List[int]
    rates: List[float]
    ref_rate: float
    duration: float
    grace: float
    max_wait_ms: float
    busy_wait_ms: float
    switch_interval_us: Optional[float]
    queue_s: float
    pipeline_depth: int
    configs: List[str]
    search_start: Optional[float]
    search_steps: int
    search_batches: List[int]
    slo_ms: float
    dtype: str
    max_total_s: float
    skip: List[str]
    device_repeats: int
    device_calls: int
    timeline_s: float
    admission_frac: float
    cg_ll: List[int]
    cg_cands: List[int]
    cg_batch: Optional[int]
    cg_max_batch_tokens: int
    cg_bucket_ratio: int
    cg_steps: int
    cg_duration: float
    cg_max_s: float
    frontends: int
    part_requests: int
    part_wait_ms: float
    frontend_slots: int

    @property
    def stem(self) -> str:
        """File name stem of the outputs."""
        return "serving_quick" if self.quick else "serving"


def _ints(text: str) -> List[int]:
    return [int(float(x)) for x in text.split(",") if x]


def _floats(text: str) -> List[float]:
    return [float(x) for x in text.split(",") if x]


def parse_settings(argv=None) -> Tuple[Settings, bool]:
    """Settings from the command line (``--quick`` picks the small defaults) and ``--replot``."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny CPU smoke run (< 2 minutes)")
    ap.add_argument("--out", default=RESULTS, help="output folder (default bench/results)")
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON in --out")
    ap.add_argument("--ll-len", type=int, help="S_LL length of every request (default 10,000)")
    ap.add_argument("--cands", type=int, help="candidates per request (default 64)")
    ap.add_argument("--batch-sizes", help="grid: comma-separated max candidates per batch "
                                          "(default 128,256,512, the paper's Figures 7-9)")
    ap.add_argument("--rates", help="grid: comma-separated offered loads in candidates/s "
                                    "(default 30k,100k,300k)")
    ap.add_argument("--ref-rate", type=float, help="load of the Figure 7-9 comparisons (default: first rate)")
    ap.add_argument("--duration", type=float, help="seconds of arrivals per load point (default 2)")
    ap.add_argument("--grace", type=float, default=1.0, help="seconds to finish after the last arrival")
    ap.add_argument("--max-wait-ms", type=float, default=2.0, help="batcher max wait")
    ap.add_argument("--busy-wait-ms", type=float, default=2.0,
                    help="batcher extra wait for a fuller batch while another is in flight "
                         "(BatcherConfig.busy_wait_s; default 2)")
    ap.add_argument("--switch-interval-us", type=float,
                    help="the interpreter's thread switch interval (sys.setswitchinterval; "
                         "default: Python's, 5000)")
    ap.add_argument("--queue-s", type=float, default=0.25,
                    help="queue bound, in seconds of offered load (beyond it: Overloaded)")
    ap.add_argument("--pipeline-depth", type=int, default=3,
                    help="batches in flight (BatcherConfig.pipeline_depth = staging slots; default 3)")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                    help=f"configurations of the grid (default {','.join(DEFAULT_CONFIGS)}; also "
                         f"hstu, hstu_mfalcon: the HSTU family, one candidate per sequence or "
                         f"M-FALCON with b_m = {MFALCON_B_M}; vista: one summary per request)")
    ap.add_argument("--search-start", type=float,
                    help="first rate of the max-rate search (default: half the device-only capacity)")
    ap.add_argument("--search-steps", type=int, help="load points of each search (default 6)")
    ap.add_argument("--search-batch-sizes",
                    help="batch sizes searched for 'all', also those of the device-only capacity "
                         "(default 1024,2048,4096)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="model compute dtype")
    ap.add_argument("--slo-ms", type=float, help="p99 target of the search (default 20; --quick 250)")
    ap.add_argument("--max-total-s", type=float,
                    help="whole-run budget: a load point or cost growth cell starts only if it fits "
                         "(default 540; --quick 110)")
    ap.add_argument("--skip", default="", help=f"optional phases to leave out: {','.join(OPTIONAL_PHASES)}")
    ap.add_argument("--device-repeats", type=int, help="device-only samples (default 20; --quick 5)")
    ap.add_argument("--device-calls", type=int,
                    help="back-to-back forwards per device-only sample (default 10; --quick 3)")
    ap.add_argument("--timeline-s", type=float, help="seconds of the saturated timeline (default 1)")
    ap.add_argument("--admission-frac", type=float, default=0.5,
                    help="2x overload: max_queue_delay_s as a fraction of the SLO (default 0.5)")
    ap.add_argument("--cost-growth-ll", help="cost growth L_LL values (default 1000,10000,100000)")
    ap.add_argument("--cost-growth-cands", help="cost growth candidates per request (default 16,64,256)")
    ap.add_argument("--cost-growth-batch", type=int,
                    help="cost growth batch size in candidates (default: the search's best)")
    ap.add_argument("--cost-growth-max-batch-tokens", type=int,
                    help="cost growth: most S_LL tokens in one batch (fewer requests per batch at "
                         "long L_LL; default 4,000,000)")
    ap.add_argument("--cost-growth-bucket-ratio", type=int,
                    help="cost growth: ratio of successive request buckets (fewer compiles; default 4)")
    ap.add_argument("--cost-growth-steps", type=int, help="load points per cell (default 4)")
    ap.add_argument("--cost-growth-duration", type=float, help="seconds per cell load point (default 1)")
    ap.add_argument("--cost-growth-max-s", type=float,
                    help="seconds for the whole cost growth table (default 170; --quick 45)")
    ap.add_argument("--frontends", type=int, default=0,
                    help="run 'all' behind this many front-end processes (transact_jax.serving."
                         "frontend; search, phases and overload; 0: one process, the default)")
    ap.add_argument("--part-requests", type=int, default=4,
                    help="with --frontends: most requests a front end packs into one part")
    ap.add_argument("--part-wait-ms", type=float, default=0.5,
                    help="with --frontends: how long a part's first request waits for more")
    ap.add_argument("--frontend-slots", type=int, default=32,
                    help="with --frontends: parts each front end may have in flight")
    a = ap.parse_args(argv)
    q = a.quick
    if a.frontends < 0 or a.part_requests < 1 or a.frontend_slots < 1 or a.part_wait_ms < 0:
        ap.error("--frontends >= 0, --part-requests >= 1, --frontend-slots >= 1, --part-wait-ms >= 0")

    def pick(value, quick, full):
        return value if value is not None else (quick if q else full)

    rates = _floats(pick(a.rates, "600", "30000,100000,300000"))
    configs = [n for n in a.configs.split(",") if n]
    skip = [n for n in a.skip.split(",") if n]
    for n in configs:
        if n not in CONFIGS:
            ap.error(f"--configs: unknown {n!r}; choose from {list(CONFIGS)}")
    for n in skip:
        if n not in OPTIONAL_PHASES:
            ap.error(f"--skip: unknown {n!r}; choose from {list(OPTIONAL_PHASES)}")
    if a.pipeline_depth < 1:
        ap.error("--pipeline-depth: need >= 1")
    s = Settings(
        quick=q, out=a.out, ll_len=pick(a.ll_len, 512, 10_000), cands=pick(a.cands, 16, 64),
        batch_sizes=_ints(pick(a.batch_sizes, "32,64", "128,256,512")), rates=rates,
        ref_rate=a.ref_rate or rates[0], duration=pick(a.duration, 0.8, 2.0), grace=a.grace,
        max_wait_ms=a.max_wait_ms, busy_wait_ms=a.busy_wait_ms,
        switch_interval_us=a.switch_interval_us, queue_s=a.queue_s, pipeline_depth=a.pipeline_depth,
        configs=configs, search_start=a.search_start, search_steps=pick(a.search_steps, 3, 6),
        search_batches=_ints(pick(a.search_batch_sizes, "32,64", "1024,2048,4096")),
        slo_ms=pick(a.slo_ms, 250.0, SLO_MS), dtype=a.dtype, max_total_s=pick(a.max_total_s, 110, 540),
        skip=skip, device_repeats=pick(a.device_repeats, 5, 20), device_calls=pick(a.device_calls, 3, 10),
        timeline_s=pick(a.timeline_s, 0.8, 1.0), admission_frac=a.admission_frac,
        cg_ll=_ints(pick(a.cost_growth_ll, "128,512", "1000,10000,100000")),
        cg_cands=_ints(pick(a.cost_growth_cands, "4,16", "16,64,256")), cg_batch=a.cost_growth_batch,
        cg_max_batch_tokens=pick(a.cost_growth_max_batch_tokens, 100_000, 4_000_000),
        cg_bucket_ratio=pick(a.cost_growth_bucket_ratio, 16, 4),
        cg_steps=pick(a.cost_growth_steps, 3, 4), cg_duration=pick(a.cost_growth_duration, 0.6, 1.0),
        cg_max_s=pick(a.cost_growth_max_s, 45, 170), frontends=a.frontends,
        part_requests=a.part_requests, part_wait_ms=a.part_wait_ms, frontend_slots=a.frontend_slots)
    return s, a.replot


class ServingRun:
    """One benchmark run: the setup (model, request pool, Rankers, load) and its phases, in the order
    of the module docstring; each phase writes the results through :class:`Report`."""

    def __init__(self, s: Settings, argv: Optional[List[str]]):
        self.s = s
        t_start = time.perf_counter()
        self.budget = Budget(t_start + s.max_total_s - OUTPUT_RESERVE_S)
        on_gpu = jax.devices()[0].platform == "gpu"
        env = environment()
        sel = SelectionConfig(max_ll_len=s.ll_len)
        self.cfg = preset("transact_v2", ExperimentConfig(selection=sel, model=ModelConfig(dtype=s.dtype)))
        _, params = build_model(self.cfg.feature, self.cfg.selection, self.cfg.model, 0)
        self.engine = Engine(self.cfg, params, on_gpu, s.pipeline_depth, min(8, os.cpu_count() or 1))
        all_batches = sorted(set(s.batch_sizes) | set(s.search_batches if "all" in s.configs else []))
        max_requests = max(1, max(all_batches) // s.cands)
        self.pool = request_pool(self.cfg, s.ll_len, s.cands,
                                 count=max(4 * max_requests, 32 if s.quick else 256))
        self.buckets = bench_buckets(self.cfg.selection, s.ll_len, s.cands, max_requests)
        self.rankers = make_rankers(self.engine, self.buckets, s.configs)
        self.need = {n: max(1, max(all_batches if n == "all" else s.batch_sizes) // s.cands)
                     for n in s.configs}
        if s.switch_interval_us is not None:
            sys.setswitchinterval(s.switch_interval_us / 1e6)
        self.load = Load(cands=s.cands, duration=s.duration, max_wait_s=s.max_wait_ms / 1e3,
                         busy_wait_s=s.busy_wait_ms / 1e3,
                         queue_s=s.queue_s, grace=s.grace, slo_ms=s.slo_ms, pipeline_depth=s.pipeline_depth)
        self.fig9_batch = 256 if 256 in s.batch_sizes else s.batch_sizes[len(s.batch_sizes) // 2]
        self.main_cell: dict = {}        # the main search and device-only row, for cost growth
        self.frontends = None            # FrontEndLoad with --frontends
        self.frontend_tracer: Optional[TracedRanker] = None
        print(f"device {env['device']}; L_LL {s.ll_len:,}, {s.cands} candidates/request, grid batch "
              f"sizes {s.batch_sizes}, search batch sizes {s.search_batches}, rates {s.rates} cand/s, "
              f"{s.duration} s per point, pipeline depth {s.pipeline_depth}; pool of {len(self.pool)} "
              f"requests; setup {time.perf_counter() - t_start:.1f} s; budget {s.max_total_s:.0f} s",
              flush=True)
        self.result = {
            "headline": {}, "environment": env,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": sys.argv[1:] if argv is None else list(argv),
            "settings": dict(
                dataclasses.asdict(s), switch_interval_s=sys.getswitchinterval(),
                cands_per_request=s.cands, rates_candidates_per_s=s.rates,
                duration_s=s.duration, grace_s=s.grace, fig9_batch=self.fig9_batch,
                selection=dataclasses.asdict(sel), buckets=dataclasses.asdict(self.buckets),
                batcher_fields=[f.name for f in dataclasses.fields(BatcherConfig)],
                config_names=s.configs,
                configs={n: dataclasses.asdict(r.config) | {"buckets": None}
                         for n, r in self.rankers.items()},
                kernel_substitution=None if on_gpu else
                "not a GPU: 'all' ran the XLA NN search and encoder (Pallas interpret mode is not timed)",
                notes=[
                    "latency = scheduled arrival -> future resolved (open loop, Poisson arrivals)",
                    "grid, phases_at_max_rate, timeline: phases synchronized and timed per batch "
                    "(BatcherConfig.timing=True)",
                    "search, overload, cost growth: phases not synchronized; sustained = p99 <= slo_ms, "
                    "none rejected or dropped",
                    "pageable staging: the runtime's own pageable-to-pinned staging is inside h2d",
                    "percentiles of a phase are over requests, each carrying its batch's time",
                    "cpu_cores_used = process CPU-seconds / wall-seconds over a load point (generator "
                    "thread included)",
                ]),
            "errors": {}, "skipped": {}, "phase_seconds": {"setup": time.perf_counter() - t_start},
            "staging": {}, "warmup": {}, "sequence_bytes": None, "device_only": {}, "search": None,
            "phases_at_max_rate": None, "timeline": None, "bottleneck": None, "overload_2x": None,
            "cost_growth": None, "grid": {}, "figure9_reduction_baseline_over_all": {}, "total_s": None,
        }
        self.report = Report(s.out, s.stem, self.result, t_start)

    # ------------------------------------------------------------------------------- helpers
    def optional(self, key: str, name: str, fn: Callable[[], None], seconds: float = 0.0) -> None:
        """Run optional phase ``key`` (recorded as ``name``) unless ``--skip`` names it or
        ``seconds`` do not fit the budget."""
        if key in self.s.skip:
            self.result["skipped"][name] = "--skip"
        elif not self.budget.fits(seconds):
            self.result["skipped"][name] = f"time budget ({max(0.0, self.budget.left()):.0f} s left)"
        else:
            self.report.phase(name, fn)

    def warm(self, names: List[str]) -> None:
        """Compile and warm the Rankers ``names`` for every batch they will see."""
        w = warm_all({n: self.rankers[n] for n in names}, self.pool, {n: self.need[n] for n in names},
                     self.engine.compile_threads)
        warmup = self.result["warmup"]
        warmup.update({n: w[n] for n in names})
        warmup["_compile" if "_compile" not in warmup else "_compile_" + "+".join(names)] = \
            w["_compile"] | {"configs": names}
        for n in names:
            r = self.rankers[n]
            self.result["staging"][n] = dataclasses.asdict(r.staging)
            reason = f" ({r.staging.reason})" if r.staging.reason else ""
            print(f"[{n}] {r.config.nn_impl} NN search, {r.config.encoder_impl} encoder, "
                  f"{r.layout_kind} layout, staging {r.staging.mode}{reason}", flush=True)
        print(f"warm-up {names}: {w['_compile']['executables']} executables compiled in "
              f"{w['_compile']['seconds']:.1f} s ({w['_compile']['threads']} threads)", flush=True)

    def start_frontends(self) -> None:
        """With ``--frontends P``: the engine host around 'all' and P front-end processes
        (bench/_frontend_load.py); load points of 'all' then go through them."""
        from _frontend_load import FrontEndLoad
        s = self.s
        t0 = time.perf_counter()
        self.frontend_tracer = TracedRanker(self.rankers["all"])   # for the timeline phase
        self.frontends = FrontEndLoad(
            self.frontend_tracer, s.frontends, ll_len=s.ll_len, cands=s.cands, dtype=s.dtype,
            max_batch=max(s.search_batches), min_batch=min(s.search_batches),
            part_requests=s.part_requests,
            part_wait_s=s.part_wait_ms / 1e3, slots_per_frontend=s.frontend_slots)
        self.result["frontends"] = dict(self.frontends.settings,
                                        start_s=time.perf_counter() - t0,
                                        slot_bytes=self.frontends.host.spec.slot_bytes,
                                        slot_file=os.path.dirname(self.frontends.host.slots.path))
        print(f"{s.frontends} front-end processes connected in {time.perf_counter() - t0:.1f} s "
              f"(parts of <= {s.part_requests} requests, {s.part_wait_ms:g} ms wait)", flush=True)

    def point_all(self, load: Load, **kw) -> dict:
        """One load point of 'all': through the front-end processes when there are some, else
        :func:`run_point` in this process."""
        if self.frontends is not None:
            return self.frontends.run_point(load, phases=PHASES, **kw)
        return run_point(self.rankers["all"], self.pool, load, **kw)

    @property
    def max_rate(self) -> Tuple[float, Optional[int]]:
        """The searched max sustainable rate (0 if none) and its batch size."""
        search = self.result["search"] or {}
        return search.get("max_candidates_per_s") or 0.0, search.get("batch")

    # -------------------------------------------------------------------------------- phases
    def sequence_bytes(self) -> None:
        self.result["sequence_bytes"] = sequence_bytes_ratio(self.cfg, self.pool, self.fig9_batch,
                                                             self.s.cands, self.buckets)

    def device_only(self) -> None:
        s = self.s
        for b in s.search_batches:
            d = device_only(self.rankers["all"], self.pool, s.cands, b, s.device_repeats, s.device_calls)
            self.result["device_only"][str(b)] = d
            print(f"  device only, batch {d['batch_candidates']}: forward "
                  f"{d['forward_us']['median_us'] / 1e3:.2f} ms -> {d['candidates_per_s']:,.0f} cand/s",
                  flush=True)

    def search(self) -> None:
        s, searches = self.s, []
        for b in s.search_batches:
            dev = (self.result["device_only"].get(str(b)) or {}).get("candidates_per_s")
            start = s.search_start or (0.5 * dev if dev else (800 if s.quick else 60_000))
            searches.append(search_max_rate(self.rankers["all"], self.pool, self.load, batch=b,
                                            start=start, steps=s.search_steps, budget=self.budget,
                                            label="'all'", point=self.point_all))
        best = max(searches, key=lambda x: x["max_candidates_per_s"])
        best["all_batch_sizes"] = {str(x["batch"]): x["max_candidates_per_s"] for x in searches}
        best["other_batch_sizes"] = {str(x["batch"]): [_trial_summary(t) for t in x["trials"]]
                                     for x in searches if x is not best}
        self.result["search"] = best
        self.main_cell.update(search=best, batch=best["batch"],
                              device_only=self.result["device_only"].get(str(best["batch"])))

    def phases(self) -> None:
        rate, batch = self.max_rate
        if not rate:
            raise RuntimeError("no sustained rate was found: nothing to time")
        r = self.point_all(self.load, batch=batch, rate=rate, timing=True)
        keys = PHASES + ("e2e",)
        r["summary_ms"] = {k: {q: r[f"{k}_ms"][q] for q in ("p50", "p99")} for k in keys}
        self.result["phases_at_max_rate"] = r
        print("  at max rate (timed): " + ", ".join(
            f"{k} p50/p99 {_ms(r[f'{k}_ms']['p50'])}/{_ms(r[f'{k}_ms']['p99'])}" for k in keys) + " ms",
            flush=True)

    def timeline(self) -> None:
        rate, batch = self.max_rate
        batch = batch or max(self.s.search_batches)
        dev = (self.result["device_only"].get(str(batch)) or {}).get("candidates_per_s")
        rate = SATURATION * rate if rate else (dev or 0)
        if not rate:
            raise RuntimeError("neither a sustained rate nor a device-only capacity to saturate")
        load = dataclasses.replace(self.load, duration=self.s.timeline_s)
        if self.frontends is not None:   # the engine host's Ranker is traced all along
            tracer = self.frontend_tracer
            tracer.records.clear()
            point = self.point_all(load, batch=batch, rate=rate, timing=True)
        else:
            tracer = TracedRanker(self.rankers["all"])
            point = run_point(tracer, self.pool, load, batch=batch, rate=rate, timing=True)
        self.result["timeline"], self.result["bottleneck"] = timeline_of(tracer, point)
        b = self.result["bottleneck"]
        print(f"  timeline at {rate:,.0f} cand/s: {self.result['timeline']['batches']} batches on "
              f"{b['worker_threads']} threads; bottleneck {b['phase']} ({b['share_of_wall']:.0%} of "
              f"wall); {b['cores_used']:.2f} cores used", flush=True)
        if point.get("engine_thread_cores"):
            print("  engine process threads (cores): " + ", ".join(
                f"{k} {v:.2f}" for k, v in list(point["engine_thread_cores"].items())[:8]), flush=True)

    def overload(self) -> None:
        rate, batch = self.max_rate
        if not rate:
            raise RuntimeError("no sustained rate was found: no overload to offer")
        admission = self.s.admission_frac * self.s.slo_ms / 1e3
        r = self.point_all(self.load, batch=batch, rate=OVERLOAD * rate, timing=False,
                           admission_delay_s=admission)
        self.result["overload_2x"] = r
        lacks = f"; engine lacks {r['engine_lacks']}" if "engine_lacks" in r else ""
        print(f"  2x overload {OVERLOAD * rate:,.0f} cand/s, max_queue_delay {admission * 1e3:g} ms: "
              f"accepted p99 {_ms(r['e2e_ms']['p99'])} ms, rejected {r['reject_fraction']:.1%}, dropped "
              f"{r['dropped']}{lacks}", flush=True)

    def cost_growth(self) -> None:
        def on_row(table: dict) -> None:
            self.result["cost_growth"] = table
            self.report.save()
        self.result["cost_growth"] = cost_growth(self.engine, self.s, self.load, self.budget,
                                                 self.main_cell, self.result["warmup"], on_row)

    def grid(self) -> None:
        s, result = self.s, self.result
        others = [n for n in s.configs if n != "all"]
        if others:
            classes = len(request_classes(max(self.need[n] for n in others), 2))
            estimate = compile_estimate_s(result["warmup"], 2 * classes, self.engine.compile_threads)
            if self.budget.fits(estimate + self.load.point_s):
                self.warm(others)
            else:
                result["skipped"]["grid " + ",".join(others)] = f"compiling (~{estimate:.0f} s) does not fit"
                others = []
        names = (["all"] if "all" in self.rankers else []) + others
        for name in sorted(names, key=GRID_ORDER.index):
            rows_by_batch = result["grid"].setdefault(name, {})
            for b in s.batch_sizes:
                rows = rows_by_batch.setdefault(str(b), [])
                for rate in s.rates:
                    if not self.budget.fits(self.load.point_s):
                        rows.append({"offered_candidates_per_s": rate, "skipped": "time budget"})
                        continue
                    r = run_point(self.rankers[name], self.pool, self.load, batch=b, rate=rate, timing=True)
                    rows.append(r)
                    print(f"  [{name}] batch {b:4d} {rate:>10,.0f} cand/s: e2e p50/p99 "
                          f"{_ms(r['e2e_ms']['p50'])}/{_ms(r['e2e_ms']['p99'])} ms; p99 prep "
                          f"{_ms(r['prep_ms']['p99'])}, h2d {_ms(r['h2d_ms']['p99'])}, fwd "
                          f"{_ms(r['forward_ms']['p99'])}, queue {_ms(r['queue_ms']['p99'])} ms; achieved "
                          f"{r['achieved_candidates_per_s']:,.0f} cand/s, rejected "
                          f"{r['rejected_overloaded']}, mean batch {r['mean_batch_candidates']:.0f}",
                          flush=True)
            self.report.save()
        result["figure9_reduction_baseline_over_all"] = figure9(result["grid"], self.fig9_batch, s.ref_rate)

    def measure_all(self) -> None:
        """Search, phases, timeline and overload of 'all' (front ends closed at the end), then
        cost growth (always in this process)."""
        load = self.load
        try:
            self.report.phase("search", self.search)
            self.optional("phases", "phases_at_max_rate", self.phases, load.point_s)
            self.optional("timeline", "timeline", self.timeline, self.s.timeline_s + 0.5 * load.grace)
            self.optional("overload", "overload_2x", self.overload, load.point_s)
        finally:
            if self.frontends is not None:
                self.frontends.close()
                self.frontends = None
        self.optional("cost_growth", "cost_growth", self.cost_growth)

    # ----------------------------------------------------------------------------------- run
    def run(self) -> dict:
        report, load = self.report, self.load
        report.phase("sequence_bytes", self.sequence_bytes)
        if "all" in self.rankers:
            report.phase("warmup_all", lambda: self.warm(["all"]))
            self.optional("device_only", "device_only", self.device_only)
            if self.s.frontends:
                report.phase("frontends", self.start_frontends)
            if self.s.frontends and self.frontends is None:
                self.result["skipped"]["search"] = "--frontends: the front ends did not start (errors)"
            else:
                self.measure_all()
        self.optional("grid", "grid", self.grid)
        report.save()
        report.plot()
        result = self.result
        print(json.dumps(result["headline"], indent=1))
        if result["errors"]:
            print(f"errors: {json.dumps(result['errors'], indent=1)}")
        if result["skipped"]:
            print(f"skipped: {json.dumps(result['skipped'], indent=1)}")
        print(f"wrote {report.path}, {os.path.basename(report.png)}"
              f"{' and the cost growth table' if result['cost_growth'] else ''} in {result['total_s']:.0f} s")
        return result


def main(argv=None) -> dict:
    s, replot = parse_settings(argv)
    if replot:
        path = os.path.join(s.out, f"{s.stem}.json")
        with open(path) as f:
            plot(json.load(f), os.path.join(s.out, f"{s.stem}.png"))
        print(f"redrew {s.stem}.png from {path}")
        return {}
    return ServingRun(s, argv).run()


if __name__ == "__main__":
    main()
