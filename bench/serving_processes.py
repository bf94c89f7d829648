"""Several serving engine processes on one GPU: the max sustainable rate with 1, 2, 4 ... engines.

One Python process drives the device through one ``DynamicBatcher`` and its worker threads, and
every request passes through that process's interpreter (validation, batching, collation, futures),
so one process tops out where its interpreter does (``bench/serving.py`` reports the cores it
uses). A serving host runs several engine processes per GPU behind a load balancer instead; this
benchmark measures that:

    python bench/serving_processes.py --processes 1,2,4        # GPU machine
    python bench/serving_processes.py --quick                  # CPU smoke run, tiny L

For each P in ``--processes``: P child processes, each a full engine on the same device (its own
``Ranker`` of the ``all`` configuration from ``bench/serving.py``, compiled for the batches it will
see, its own ``DynamicBatcher`` and its own open-loop Poisson generator at 1/P of the offered load:
an even load balancer). At each offered total rate every child runs the same load point at the same
moment (the parent sends the start line to all of them) and returns the end-to-end latency of every
request; p50/p90/p99 are over the union of all children's requests. Rates climb by ``--growth``
from ``--start`` until one is not sustained (p99 above ``--slo-ms``, or anything rejected or
dropped); the max sustainable rate is the highest sustained one. Children share a persistent
compilation cache, so only the first compiles.

Writes ``bench/results/serving_processes.json`` (``headline``: ``max_candidates_per_s_p99_20ms``
over P, ``best_processes``, and per P) and a PNG.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

from _env import RESULTS, environment, write_results  # noqa: E402  (puts the repo on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))


# --------------------------------------------------------------------------------- child side

def child_main(spec: dict) -> None:
    """One engine: build, warm, then run the load points the parent asks for (stdin/stdout)."""
    import jax
    import serving as S
    from transact_jax.config import SelectionConfig
    from transact_jax.model.builder import build_model
    from transact_jax.model.config import ModelConfig
    from transact_jax.run.config import ExperimentConfig
    from transact_jax.run.presets import preset

    on_gpu = jax.devices()[0].platform == "gpu"
    sel = SelectionConfig(max_ll_len=spec["ll_len"])
    cfg = preset("transact_v2", ExperimentConfig(selection=sel, model=ModelConfig(dtype=spec["dtype"])))
    _, params = build_model(cfg.feature, cfg.selection, cfg.model, 0)
    max_requests = max(1, spec["batch"] // spec["cands"])
    pool = S.request_pool(cfg, spec["ll_len"], spec["cands"], count=max(4 * max_requests, 64),
                          seed=spec["index"])
    buckets = S.bench_buckets(cfg.selection, spec["ll_len"], spec["cands"], max_requests)
    engine = S.Engine(cfg, params, on_gpu, spec["pipeline_depth"], min(8, os.cpu_count() or 1))
    rankers = S.make_rankers(engine, buckets, ["all"])
    S.warm_all(rankers, pool, {"all": max_requests}, engine.compile_threads)
    load = S.Load(cands=spec["cands"], duration=spec["duration"], max_wait_s=spec["max_wait_s"],
                  busy_wait_s=spec["busy_wait_s"], queue_s=spec["queue_s"], grace=spec["grace"],
                  slo_ms=spec["slo_ms"], pipeline_depth=spec["pipeline_depth"])
    print("READY", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] != "RUN":
            break
        rate, seed = float(words[1]), int(words[2])
        r = S.run_point(rankers["all"], pool, load, batch=spec["batch"], rate=rate, timing=False,
                        seed=seed, keep_latencies=True)
        print("RESULT " + json.dumps(r), flush=True)


# -------------------------------------------------------------------------------- parent side

class Children:
    """P engine processes on the visible device; ``point(rate)`` runs one synchronized load point."""

    def __init__(self, count: int, spec: dict, env: Dict[str, str], timeout: float):
        self.procs = []
        for i in range(count):
            args = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(dict(spec, index=i))]
            self.procs.append(subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                               stderr=None, text=True, env=env, cwd=os.path.dirname(HERE)))
        for p in self.procs:
            self._expect(p, "READY", timeout)

    @staticmethod
    def _expect(proc: subprocess.Popen, word: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"engine process exited (code {proc.poll()}) before {word}")
            if line.startswith(word):
                return line[len(word):].strip()
        raise TimeoutError(f"engine process: no {word} within {timeout:.0f} s")

    def point(self, total_rate: float, seed: int, timeout: float) -> List[dict]:
        per = total_rate / len(self.procs)
        for i, p in enumerate(self.procs):
            p.stdin.write(f"RUN {per} {seed * 1000 + i}\n")
            p.stdin.flush()
        return [json.loads(self._expect(p, "RESULT", timeout)) for p in self.procs]

    def close(self) -> None:
        for p in self.procs:
            try:
                p.stdin.write("EXIT\n")
                p.stdin.close()
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def merge(rows: List[dict], total_rate: float, slo_ms: float) -> dict:
    """One load point over all engines: summed counts and throughput, percentiles over the union."""
    e2e = np.concatenate([np.asarray(r["e2e_s"], np.float64) for r in rows]) * 1e3
    pct = ({f"p{q}": float(np.percentile(e2e, q)) for q in (50, 90, 99)} if e2e.size
           else {"p50": None, "p90": None, "p99": None})
    out = {"offered_candidates_per_s": total_rate,
           "achieved_candidates_per_s": float(sum(r["achieved_candidates_per_s"] for r in rows)),
           "e2e_ms": pct, "processes": len(rows)}
    for key in ("requests", "completed", "rejected_overloaded", "dropped"):
        out[key] = int(sum(r[key] for r in rows))
    out["cpu_cores_used"] = float(sum(r["cpu_cores_used"] for r in rows))
    out["mean_batch_candidates"] = float(np.mean([r["mean_batch_candidates"] for r in rows]))
    out["sustained"] = bool(e2e.size) and out["rejected_overloaded"] == 0 and out["dropped"] == 0 \
        and pct["p99"] <= slo_ms
    return out


def search(children: Children, start: float, growth: float, steps: int, slo_ms: float,
           timeout: float, deadline: float, point_s: float) -> dict:
    """Rates start, start x growth, ... until one is not sustained (or ``steps`` or the deadline)."""
    trials, best, rate = [], None, start
    for step in range(steps):
        if time.monotonic() + point_s > deadline:
            break
        m = merge(children.point(rate, step, timeout), rate, slo_ms)
        trials.append(m)
        print(f"  P={m['processes']} {rate:>11,.0f} cand/s: p50/p99 {m['e2e_ms']['p50'] or 0:.1f}/"
              f"{m['e2e_ms']['p99'] or 0:.1f} ms, achieved {m['achieved_candidates_per_s']:,.0f}, "
              f"rejected {m['rejected_overloaded']}, cores {m['cpu_cores_used']:.1f}"
              f"{'' if m['sustained'] else '  (not sustained)'}", flush=True)
        if not m["sustained"]:
            break
        best = m
        rate *= growth
    return {"max_candidates_per_s": best["offered_candidates_per_s"] if best else 0.0,
            "at_max": best, "trials": trials}


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for p, r in result["per_processes"].items():
        t = r.get("trials") or []
        a.plot([x["offered_candidates_per_s"] for x in t], [x["e2e_ms"]["p99"] or 0 for x in t], "o-",
               label=f"{p} process(es)")
    a.axhline(result["slo_ms"], color="k", ls=":", lw=1)
    a.set_xlabel("offered candidates/s (all processes)")
    a.set_ylabel("p99 end-to-end ms")
    a.set_yscale("log")
    a.legend()
    ps = list(result["per_processes"])
    b.bar([str(p) for p in ps], [result["per_processes"][p]["max_candidates_per_s"] for p in ps])
    b.set_xlabel("engine processes on one GPU")
    b.set_ylabel(f"max candidates/s at p99 <= {result['slo_ms']:g} ms")
    fig.suptitle(f"{result['environment']['device']}: L_LL {result['spec']['ll_len']:,}, "
                 f"{result['spec']['cands']} candidates/request, batch {result['spec']['batch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", default="1,2,4")
    ap.add_argument("--ll-len", type=int, default=10_000)
    ap.add_argument("--cands", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2048, help="max candidates per batch")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--start", type=float, default=100_000, help="first offered rate (cand/s)")
    ap.add_argument("--growth", type=float, default=1.25)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("--grace", type=float, default=1.0)
    ap.add_argument("--slo-ms", type=float, default=20.0)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--busy-wait-ms", type=float, default=2.0)
    ap.add_argument("--queue-s", type=float, default=0.25)
    ap.add_argument("--pipeline-depth", type=int, default=3)
    ap.add_argument("--max-total-s", type=float, default=400)
    ap.add_argument("--results", default=RESULTS)
    ap.add_argument("--quick", action="store_true", help="CPU smoke run")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child_main(json.loads(a.child))
        return {}
    if a.quick:
        a.processes, a.ll_len, a.cands, a.batch = "1,2", 256, 8, 32
        a.start, a.steps, a.duration, a.slo_ms, a.max_total_s = 200, 2, 0.5, 500.0, 150
        if a.results == RESULTS:
            a.results = tempfile.mkdtemp(prefix="serving_processes_")
    t0 = time.monotonic()
    deadline = t0 + a.max_total_s
    spec = dict(ll_len=a.ll_len, cands=a.cands, batch=a.batch, dtype=a.dtype, duration=a.duration,
                grace=a.grace, slo_ms=a.slo_ms, max_wait_s=a.max_wait_ms / 1e3,
                busy_wait_s=a.busy_wait_ms / 1e3, queue_s=a.queue_s, pipeline_depth=a.pipeline_depth)
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false",
               JAX_COMPILATION_CACHE_DIR=os.environ.get("JAX_COMPILATION_CACHE_DIR",
                                                        tempfile.mkdtemp(prefix="serving_jaxcache_")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    result = {"benchmark": "serving_processes", "environment": environment(), "spec": spec,
              "slo_ms": a.slo_ms, "argv": sys.argv[1:] if argv is None else list(argv),
              "per_processes": {}, "errors": {}}
    point_s = a.duration + a.grace + 1.0
    for p in (int(x) for x in a.processes.split(",")):
        if time.monotonic() + 60 > deadline:
            result["errors"][str(p)] = "time budget"
            continue
        children = None
        try:
            t = time.monotonic()
            children = Children(p, spec, env, timeout=max(60.0, deadline - time.monotonic()))
            print(f"{p} engine process(es) ready in {time.monotonic() - t:.0f} s", flush=True)
            r = search(children, a.start, a.growth, a.steps, a.slo_ms, 120.0, deadline, point_s)
        except (RuntimeError, TimeoutError, OSError, ValueError) as e:
            result["errors"][str(p)] = repr(e)[:400]
            print(f"{p} process(es): {e!r}", flush=True)
            continue
        finally:
            if children is not None:
                children.close()
        result["per_processes"][str(p)] = r
        write_results(a.results, "serving_processes", result)
    per = {p: r["max_candidates_per_s"] for p, r in result["per_processes"].items()}
    best = max(per, key=per.get) if per else None
    result["headline"] = {"device": result["environment"]["device"],
                          "max_candidates_per_s_p99_20ms": per.get(best) if best else None,
                          "best_processes": int(best) if best else None,
                          "per_processes": per, "ll_len": a.ll_len, "candidates_per_request": a.cands,
                          "batch_candidates": a.batch, "slo_ms": a.slo_ms}
    write_results(a.results, "serving_processes", result)
    plot(result, os.path.join(a.results, "serving_processes.png"))
    print(json.dumps(result["headline"], indent=1))
    return result


if __name__ == "__main__":
    main()
