"""Serving benchmark (paper §4.4.3 "Server Optimizations", Figures 7-9).

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

**Batch size.** In the paper's Figures 7-9 the batch size (128 / 256 / 512) counts *examples*, i.e.
candidates, of one model mini-batch: "each mini-batch of size 128 results in a 64 MB payload" is 128
candidates x ~10k broadcast tokens x ~50 B. Here it is the batcher's ``max_batch_candidates``; a
batch holds whole requests, so with 64 candidates per request a batch of 256 holds up to 4 requests.

Measured per (configuration, batch size, offered rate in candidates/s): p50 / p90 / p99 over
requests of end-to-end latency and its parts: queueing (submit to batch formation), batch
preparation (collation into the host arena), pageable-to-pinned copy (``pin``; only where it is a
separate step), host-to-device copy, forward (NN search + S_all + model), device-to-host copy.
Phases are synchronized and timed per batch (``BatcherConfig.timing``), which costs a little
overlap; every request carries its batch's phase times. Also host-to-device bytes of the sequence
features per candidate, broadcast vs de-dup (``h2d_sequence_bytes_ratio``), and for ``all`` a search
for the highest offered rate sustained with p99 <= 20 ms and nothing rejected or dropped
(phases not synchronized there).

    python bench/serving.py                 # GPU machine, about 4-5 minutes
    python bench/serving.py --quick         # tiny CPU smoke test (< 1 minute), small L
    python bench/serving.py --quick --out /tmp/x

Writes ``serving.json`` (``serving_quick.json`` with ``--quick``) and a PNG beside it in ``--out``
(default ``bench/results``). Off GPU, ``all`` runs the XLA implementations instead of the Pallas
kernels (interpret mode is a correctness tool, not a timing target); the JSON says so.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout
from typing import Dict, List, Optional

import numpy as np

from _env import RESULTS, environment  # noqa: E402  (puts the repo on sys.path)
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
}
PHASES = ("queue", "prep", "pin", "h2d", "forward", "d2h")
SLO_MS = 20.0


# ------------------------------------------------------------------------------------ setup

def request_pool(cfg: ExperimentConfig, ll_len: int, cands: int, count: int, seed: int = 0):
    """``count`` single requests from the synthetic world, S_LL exactly ``ll_len`` tokens long."""
    syn = SyntheticConfig(seed=seed, num_items=50_000, users_per_chunk=count, fixed_ll_length=ll_len,
                          candidates_per_request=(cands, cands))
    chunk = next(iter_chunks(syn, cfg.feature, cfg.selection, count))
    requests = dataclasses.replace(chunk.requests, labels=None)
    return split_requests(requests)


def bench_buckets(sel: SelectionConfig, ll_len: int, max_requests: int, max_candidates: int) -> BucketConfig:
    """Ladders aligned with the load: U requests of full S_LL hold U x L_LL tokens, and U is padded
    to 2^k + 1 (one padding request), so each bucket is fixed by U's power-of-two class alone."""
    k = max(1, int(np.ceil(np.log2(max(max_requests, 1)))))
    classes = [1 << i for i in range(k + 1)]                     # 1, 2, 4, ... >= max_requests
    base = BucketConfig.for_selection(sel, max_candidates=max_candidates)
    top = classes[-1]
    return dataclasses.replace(
        base,
        requests=Ladder(tuple(c + 1 for c in classes)),
        ll_tokens=Ladder(tuple(c * ll_len for c in classes)),
        rt_tokens=Ladder((top * max(sel.max_rt_len, 1),)),
        imp_tokens=Ladder((top * max(sel.max_imp_len, 1),)),
        rt_width=Ladder((max(sel.max_rt_len, 1),)), imp_width=Ladder((max(sel.max_imp_len, 1),)))


def make_rankers(cfg, params, buckets, on_gpu: bool, names) -> Dict[str, Ranker]:
    out = {}
    for name in names:
        opts = dict(CONFIGS[name])
        if not on_gpu:
            opts.update(nn_impl="xla", encoder_impl="xla")
        out[name] = Ranker(cfg, params, buckets=buckets, **opts)
    return out


def warm_all(rankers: Dict[str, Ranker], pool, max_requests: int, workers: int) -> Dict[str, dict]:
    """Compile every bucket that a batch of 1..max_requests pool requests reaches, for every
    configuration: distinct executables compile in parallel threads (XLA compiles outside the
    GIL); then each Ranker allocates its staging arenas and runs one real batch per size."""
    t0 = time.perf_counter()
    jobs = {}
    for r in rankers.values():
        for u in range(1, max_requests + 1):
            bucket = r.bucket_for(pool[:u])
            # rankers with the same config and NN implementation share executables
            jobs.setdefault((r.cfg, r.config.nn_impl, bucket), (r, bucket))
    with ThreadPoolExecutor(max(1, workers)) as ex:
        list(ex.map(lambda job: job[0].warmup([job[1]]), jobs.values()))
    compile_s = time.perf_counter() - t0
    out = {}
    for name, r in rankers.items():
        t1 = time.perf_counter()
        r.warmup_batches([pool[:u] for u in range(1, max_requests + 1)])    # arenas (no compiles)
        for u in range(1, max_requests + 1):
            r.dispatch(pool[:u]).finish()
        out[name] = {"arenas_and_first_batches_s": time.perf_counter() - t1,
                     "staging_host_bytes": r.staging_host_bytes}
    out["_compile"] = {"executables": len(jobs), "seconds": compile_s, "threads": workers}
    return out


# ------------------------------------------------------------------------------ one load point

def _pct(values, qs=(50, 90, 99)) -> Dict[str, Optional[float]]:
    a = np.asarray([v for v in values if v is not None], np.float64)
    if not len(a):
        return {f"p{q}": None for q in qs}
    return {f"p{q}": float(np.percentile(a, q)) * 1e3 for q in qs}


def run_point(ranker: Ranker, pool, *, batch: int, rate: float, duration: float, cands: int,
              max_wait: float, timing: bool, queue_s: float, grace: float, slo_ms: float,
              seed: int = 0) -> dict:
    """Offer ``rate`` candidates/s for ``duration`` s (Poisson arrivals); returns the statistics."""
    req_rate = rate / cands
    n = max(1, int(round(req_rate * duration)))
    rng = np.random.default_rng(seed)
    schedule = np.cumsum(rng.exponential(1.0 / req_rate, n))
    cfg = BatcherConfig(max_batch_candidates=batch, max_wait_s=max_wait,
                        max_queue_requests=max(4, int(req_rate * queue_s)), pipeline_depth=2,
                        timing=timing)
    batcher = DynamicBatcher(ranker, cfg)
    submitted: List[tuple] = []
    rejected = 0
    t0 = time.perf_counter() + 0.005
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
    deadline = t_end + grace
    for _, f in submitted:
        try:
            f.result(timeout=max(0.0, deadline - time.perf_counter()))
        except FutureTimeout:
            break
        except Exception:  # noqa: BLE001 - counted below
            pass
    batcher.close(drain=False)
    done = [(target, f) for target, f in submitted if f.done() and f.exception() is None]
    dropped = len(submitted) - len(done)
    timings = [f.timing for _, f in done]
    e2e = [f.timing.t_done - target for target, f in done]
    lag = [f.timing.t_submit - target for target, f in done]
    out = {
        "offered_candidates_per_s": rate, "duration_s": duration, "requests": n,
        "offered_actual_candidates_per_s": n * cands / schedule[-1] if n > 1 else rate,
        "completed": len(done), "rejected_overloaded": rejected, "dropped": dropped,
        "achieved_candidates_per_s": (len(done) * cands / (max(t.t_done for t in timings) - t0)
                                      if timings else 0.0),
        "e2e_ms": _pct(e2e), "generator_lag_ms": _pct(lag),
        "mean_batch_candidates": float(np.mean([t.batch_candidates for t in timings])) if timings else 0,
    }
    for phase in PHASES:
        out[f"{phase}_ms"] = _pct([getattr(t, phase) for t in timings])
    out["model_run_ms"] = _pct([None if t.h2d is None else (t.pin or 0) + t.h2d + t.forward + t.d2h
                                for t in timings])
    out["copy_ms"] = _pct([None if t.h2d is None else (t.pin or 0) + t.h2d for t in timings])
    if timings:   # each request's share of its batch's bytes, averaged per candidate
        seq = sum(t.h2d_bytes["sequences"] * cands / t.batch_candidates for t in timings)
        tot = sum(t.h2d_bytes["total"] * cands / t.batch_candidates for t in timings)
        out["h2d_sequence_bytes_per_candidate"] = seq / (len(timings) * cands)
        out["h2d_total_bytes_per_candidate"] = tot / (len(timings) * cands)
    p99 = out["e2e_ms"]["p99"]
    out["sustained"] = bool(timings) and rejected == 0 and dropped == 0 and p99 <= slo_ms
    return out


def _ms(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def search_max_rate(ranker, pool, *, batch, start, steps, time_left, **kw) -> dict:
    """Highest offered rate with p99 <= the SLO and nothing rejected or dropped: grow by 1.6x until
    a rate fails, then bisect."""
    best, fail, rate, trials = None, None, float(start), []
    for _ in range(steps):
        if not time_left():
            break
        r = run_point(ranker, pool, batch=batch, rate=rate, **kw)
        trials.append(r)
        print(f"  search 'all' batch {batch}: {rate:>10,.0f} cand/s -> p99 {_ms(r['e2e_ms']['p99'])} ms, "
              f"rejected {r['rejected_overloaded']}, dropped {r['dropped']}: "
              f"{'ok' if r['sustained'] else 'FAIL'}", flush=True)
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


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = result["grid"]
    names = [n for n in CONFIGS if n in grid]
    batches = result["settings"]["batch_sizes"]
    ref = result["settings"]["ref_rate"]

    def at(name, b, rate=ref):
        for r in grid[name].get(str(b), []):
            if r.get("offered_candidates_per_s") == rate and "e2e_ms" in r:
                return r
        return None

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(batches))
    ax = axes[0, 0]
    for i, name in enumerate(names):
        pin = [((at(name, b) or {}).get("pin_ms", {}).get("p99") or 0) for b in batches]
        h2d = [((at(name, b) or {}).get("h2d_ms", {}).get("p99") or 0) for b in batches]
        ax.bar(x + i * width, pin, width, color=f"C{i}", alpha=0.5)
        ax.bar(x + i * width, h2d, width, bottom=pin, color=f"C{i}", label=name)
    ax.set_xticks(x + width * (len(names) - 1) / 2, [str(b) for b in batches])
    ax.set_title(f"copy time p99 (pin light, H2D dark) at {ref:,.0f} cand/s (cf. Fig. 7)")
    ax.set_xlabel("batch size (candidates)")
    ax.set_ylabel("ms")
    ax.legend()
    ax = axes[0, 1]
    for i, name in enumerate(names):
        run = [((at(name, b) or {}).get("model_run_ms", {}).get("p99") or 0) for b in batches]
        ax.bar(x + i * width, run, width, color=f"C{i}", label=name)
    ax.set_xticks(x + width * (len(names) - 1) / 2, [str(b) for b in batches])
    ax.set_title("model run p99: copy + forward + D2H (cf. Fig. 8)")
    ax.set_xlabel("batch size (candidates)")
    ax.set_ylabel("ms")
    ax.legend()
    ax = axes[1, 0]
    heat = result.get("figure9_reduction_baseline_over_all") or {}
    rows = [k for k in heat if any(v is not None for v in heat[k].values())]
    if rows:
        data = np.array([[heat[k].get(p) or np.nan for p in ("p50", "p90", "p99")] for k in rows])
        im = ax.imshow(np.log10(data), cmap="viridis", aspect="auto")
        for (i, j), v in np.ndenumerate(data):
            ax.text(j, i, "-" if np.isnan(v) else f"{v:.1f}x", ha="center", va="center", color="w")
        ax.set_xticks(range(3), ["p50", "p90", "p99"])
        ax.set_yticks(range(len(rows)), rows)
        fig.colorbar(im, ax=ax, label="log10 reduction")
    ax.set_title(f"baseline / all, batch {result['settings']['fig9_batch']} (cf. Fig. 9)")
    ax = axes[1, 1]
    b = result["settings"]["fig9_batch"]
    for i, name in enumerate(names):
        pts = [(r["offered_candidates_per_s"], r["e2e_ms"]["p99"]) for r in grid[name].get(str(b), [])
               if r.get("e2e_ms", {}).get("p99") is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "o-", color=f"C{i}", label=name)
    for t in (result.get("search") or {}).get("trials", []):
        if t["e2e_ms"]["p99"] is not None:
            ax.plot(t["offered_candidates_per_s"], t["e2e_ms"]["p99"], "k.", alpha=0.4)
    slo = result["settings"]["slo_ms"]
    ax.axhline(slo, color="r", ls="--", label=f"{slo:g} ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered load (candidates/s)")
    ax.set_ylabel("p99 end-to-end (ms)")
    ax.set_title(f"p99 latency vs load, batch {b} (dots: search for 'all')")
    ax.legend()
    fig.suptitle(f"TransAct V2 serving, L_LL = {result['settings']['ll_len']:,}, "
                 f"{result['settings']['cands_per_request']} candidates/request, "
                 f"{result['environment']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def figure9(grid: dict, batch: int, rate: float) -> dict:
    def at(name):
        for r in grid.get(name, {}).get(str(batch), []):
            if r.get("offered_candidates_per_s") == rate and "e2e_ms" in r:
                return r
        return None

    base, best = at("baseline"), at("all")
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


# ----------------------------------------------------------------------------------------- main

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny CPU smoke run (< 1 minute)")
    ap.add_argument("--out", default=RESULTS, help="output folder (default bench/results)")
    ap.add_argument("--ll-len", type=int, help="S_LL length of every request (default 10,000)")
    ap.add_argument("--cands", type=int, help="candidates per request (default 64)")
    ap.add_argument("--batch-sizes", help="comma-separated max candidates per batch (default 128,256,512)")
    ap.add_argument("--rates", help="comma-separated offered loads in candidates/s (default 30k,100k,300k)")
    ap.add_argument("--ref-rate", type=float, help="load of the Figure 7-9 comparisons (default: first rate)")
    ap.add_argument("--duration", type=float, help="seconds of arrivals per load point (default 2)")
    ap.add_argument("--grace", type=float, default=1.0, help="seconds to finish after the last arrival")
    ap.add_argument("--max-wait-ms", type=float, default=2.0, help="batcher max wait")
    ap.add_argument("--queue-s", type=float, default=0.25,
                    help="queue bound, in seconds of offered load (beyond it: Overloaded)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--search-start", type=float, help="first rate of the max-rate search")
    ap.add_argument("--search-steps", type=int, help="load points of the search (default 7)")
    ap.add_argument("--search-batch-sizes", help="batch sizes searched for 'all' (default 256,512)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="model compute dtype")
    ap.add_argument("--slo-ms", type=float, help="p99 target of the search (default 20; --quick 250)")
    ap.add_argument("--max-total-s", type=float,
                    help="whole-run budget: a load point starts only if it fits (default 290; --quick 55). "
                         "Order: 'all' grid, its search, then dedup, baseline, pinned")
    args = ap.parse_args(argv)

    q = args.quick
    ll_len = args.ll_len or (512 if q else 10_000)
    cands = args.cands or (16 if q else 64)
    batch_sizes = [int(b) for b in (args.batch_sizes or ("32,64" if q else "128,256,512")).split(",")]
    rates = [float(r) for r in (args.rates or ("600" if q else "30000,100000,300000")).split(",")]
    ref_rate = args.ref_rate or rates[0]
    duration = args.duration or (0.8 if q else 2.0)
    search_start = args.search_start or (800 if q else 60_000)
    search_steps = args.search_steps or (3 if q else 6)
    slo_ms = args.slo_ms or (250.0 if q else SLO_MS)
    search_batches = [int(b) for b in (args.search_batch_sizes or ("64" if q else "256,512")).split(",")]
    max_total = args.max_total_s or (55 if q else 290)
    names = [n for n in args.configs.split(",") if n]
    for n in names:
        if n not in CONFIGS:
            ap.error(f"--configs: unknown {n!r}; choose from {list(CONFIGS)}")
    t_start = time.perf_counter()
    budget_end = t_start + max_total - 10.0     # keep time for the outputs

    dev = jax.devices()[0]
    on_gpu = dev.platform == "gpu"
    env = environment()
    sel = SelectionConfig(max_ll_len=ll_len)
    cfg = preset("transact_v2", ExperimentConfig(selection=sel, model=ModelConfig(dtype=args.dtype)))
    _, params = build_model(cfg.feature, cfg.selection, cfg.model, 0)
    max_requests = max(1, max(batch_sizes) // cands)
    pool = request_pool(cfg, ll_len, cands, count=max(4 * max_requests, 32 if q else 256))
    buckets = bench_buckets(sel, ll_len, max_requests, max(batch_sizes))
    print(f"device {env['device']}; L_LL {ll_len:,}, {cands} candidates/request, batch sizes "
          f"{batch_sizes}, rates {rates} cand/s, {duration} s per point; pool of {len(pool)} requests "
          f"built in {time.perf_counter() - t_start:.1f} s", flush=True)

    rankers = make_rankers(cfg, params, buckets, on_gpu, names)
    kw = dict(cands=cands, duration=duration, max_wait=args.max_wait_ms / 1e3, queue_s=args.queue_s,
              grace=args.grace, slo_ms=slo_ms)
    grid, staging = {}, {}
    warmup = warm_all(rankers, pool, max_requests, workers=min(8, os.cpu_count() or 1))
    print(f"warm-up: {warmup['_compile']['executables']} executables compiled in "
          f"{warmup['_compile']['seconds']:.1f} s ({warmup['_compile']['threads']} threads)", flush=True)
    for name in names:
        ranker = rankers[name]
        staging[name] = dataclasses.asdict(ranker.staging)
        print(f"[{name}] {ranker.config.nn_impl} NN search, {ranker.config.encoder_impl} encoder, "
              f"{ranker.layout_kind} layout, staging {ranker.staging.mode}"
              f"{' (' + ranker.staging.reason + ')' if ranker.staging.reason else ''}", flush=True)

    def time_left() -> bool:
        """Whether one more load point fits before the deadline."""
        return time.perf_counter() + duration + 0.5 * args.grace < budget_end

    def grid_for(name):
        ranker = rankers[name]
        grid[name] = {}
        for b in batch_sizes:
            rows = grid[name].setdefault(str(b), [])
            for rate in rates:
                if not time_left():
                    rows.append({"offered_candidates_per_s": rate, "skipped": "time budget"})
                    continue
                r = run_point(ranker, pool, batch=b, rate=rate, timing=True, **kw)
                rows.append(r)
                print(f"  [{name}] batch {b:4d} {rate:>10,.0f} cand/s: e2e p50/p99 "
                      f"{_ms(r['e2e_ms']['p50'])}/{_ms(r['e2e_ms']['p99'])} ms; p99 prep "
                      f"{_ms(r['prep_ms']['p99'])}, h2d {_ms(r['h2d_ms']['p99'])}, fwd "
                      f"{_ms(r['forward_ms']['p99'])}, queue {_ms(r['queue_ms']['p99'])} ms; achieved "
                      f"{r['achieved_candidates_per_s']:,.0f} cand/s, rejected "
                      f"{r['rejected_overloaded']}, mean batch {r['mean_batch_candidates']:.0f}",
                      flush=True)

    # headline measurements first ('all', then its max-rate search), so a tight budget cuts the rest
    search = None
    if "all" in rankers:
        grid_for("all")
        searches = []
        for b in search_batches:
            searches.append(search_max_rate(rankers["all"], pool, batch=b, start=search_start,
                                            steps=search_steps, time_left=time_left, timing=False,
                                            **kw))
        search = max(searches, key=lambda s: s["max_candidates_per_s"])
        search["all_batch_sizes"] = {str(s["batch"]): s["max_candidates_per_s"] for s in searches}
    for name in sorted(names, key=lambda n: ("all", "dedup", "baseline", "pinned").index(n)):
        if name != "all":
            grid_for(name)
    grid = {n: grid[n] for n in names}

    fig9_batch = 256 if 256 in batch_sizes else batch_sizes[len(batch_sizes) // 2]
    ratio = sequence_bytes_ratio(cfg, pool, fig9_batch, cands, buckets)

    def measured_ratio():
        a = [r for r in grid.get("baseline", {}).get(str(fig9_batch), []) if "h2d_sequence_bytes_per_candidate" in r]
        b = [r for r in grid.get("dedup", {}).get(str(fig9_batch), []) if "h2d_sequence_bytes_per_candidate" in r]
        if a and b:
            return a[0]["h2d_sequence_bytes_per_candidate"] / b[0]["h2d_sequence_bytes_per_candidate"]
        return ratio["ratio_shipped"]

    def p99_at(name, b):
        for r in grid.get(name, {}).get(str(b), []):
            if r.get("offered_candidates_per_s") == ref_rate and "e2e_ms" in r:
                return r["e2e_ms"]["p99"]
        return None

    result = {
        "headline": {
            "device": env["device"],
            "h2d_sequence_bytes_ratio": measured_ratio(),
            "max_candidates_per_s_p99_20ms": search["max_candidates_per_s"] if search else None,
            "p99_ms_all_opts_batch256": p99_at("all", 256),
            "search_slo_ms": slo_ms, "search_batch": search["batch"] if search else None,
            "ll_len": ll_len, "candidates_per_request": cands, "ref_rate_candidates_per_s": ref_rate,
        },
        "environment": env,
        "settings": {
            "quick": q, "ll_len": ll_len, "cands_per_request": cands, "batch_sizes": batch_sizes,
            "rates_candidates_per_s": rates, "ref_rate": ref_rate, "duration_s": duration,
            "grace_s": args.grace, "max_wait_ms": args.max_wait_ms, "queue_s": args.queue_s,
            "pipeline_depth": 2, "dtype": args.dtype, "fig9_batch": fig9_batch,
            "selection": dataclasses.asdict(sel), "buckets": dataclasses.asdict(buckets),
            "configs": {n: dataclasses.asdict(rankers[n].config) | {"buckets": None} for n in names},
            "kernel_substitution": None if on_gpu else
            "not a GPU: 'all' ran the XLA NN search and encoder (Pallas interpret mode is not timed)",
            "slo_ms": slo_ms,
            "notes": [
                "latency = scheduled arrival -> future resolved (open loop, Poisson arrivals)",
                "grid points: phases synchronized and timed per batch (BatcherConfig.timing=True)",
                "search points: phases not synchronized; sustained = p99 <= slo_ms, none rejected or dropped",
                "pageable staging: the runtime's own pageable-to-pinned staging is inside h2d",
                "percentiles of a phase are over requests, each carrying its batch's time",
            ],
        },
        "staging": staging,
        "warmup": warmup,
        "sequence_bytes": ratio,
        "grid": grid,
        "figure9_reduction_baseline_over_all": figure9(grid, fig9_batch, ref_rate),
        "search": search,
        "total_s": None,
    }
    result["total_s"] = time.perf_counter() - t_start
    os.makedirs(args.out, exist_ok=True)
    stem = "serving_quick" if q else "serving"
    path = os.path.join(args.out, f"{stem}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(args.out, f"{stem}.png"))
    h = result["headline"]
    print(json.dumps(h, indent=1))
    print(f"wrote {path} and {stem}.png in {result['total_s']:.0f} s")


if __name__ == "__main__":
    main()
