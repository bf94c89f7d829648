"""Scaling over the GPUs of one host: data-parallel training (one process, and one process per GPU)
and one serving engine per GPU.

    python bench/multi_gpu.py --gpus 1,2            # on a machine with 2 GPUs
    python bench/multi_gpu.py --gpus 1,2,4          # ... with 4
    python bench/multi_gpu.py --quick               # CPU smoke run: forced host devices, tiny sizes

The parent writes one synthetic feature log, then for each G in ``--gpus`` starts fresh worker
processes that see G devices (``CUDA_VISIBLE_DEVICES``; on CPU ``--xla_force_host_platform_device_count``):

* **step**: the jitted, donated train step of TransAct V2 on device-resident batches, at a fixed
  batch *per device* (global batch G x ``--per-device-batch``, weak scaling); examples/s, median
  of repeated steps, compile excluded;
* **loop**: the whole training loop (grain pipeline, host-to-device, step) at the same global batch,
  one process driving G devices;
* **loop, one process per GPU**: G processes (one device each) launched through
  ``transact_jax.train.step.initialize_distributed``, each reading its own shard of the log; the
  examples/s of the global batch, from process 0;
* **loss curve** at one fixed global batch for every G (same seed, same steps): the training loss
  over steps, compared with the 1-device curve (data order is the same for one process; the
  per-process runs shuffle each shard separately);
* **serving** (``--serving``): one ``bench/serving.py`` max-rate search per GPU, all at once, each
  process on its own GPU; candidates/s per GPU against one GPU alone.

Scaling efficiency = (examples/s with G devices / G) / (examples/s with 1 device).
Writes ``bench/results/multi_gpu.{json,png}``; ``headline`` has ``gpus``,
``step_scaling_efficiency_2gpu``, ``loop_scaling_efficiency_2gpu``,
``serving_candidates_per_s_per_gpu``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)


# --------------------------------------------------------------------------------- worker side
def _worker(spec: dict) -> dict:
    """Runs in a fresh process that sees its devices (and, for the per-process launch, has called
    ``initialize_distributed``). ``spec["task"]``: "step", "loop" or "curve"."""
    import dataclasses

    import jax
    import numpy as np

    from train_throughput import step_throughput
    from transact_jax.data.feature_log import FeatureLog
    from transact_jax.run.presets import preset
    from transact_jax.train.loop import train

    log = FeatureLog(os.path.join(spec["data"], "train"))
    g = jax.device_count()
    out = {"devices": g, "processes": jax.process_count(), "platform": jax.devices()[0].platform}
    if spec["task"] == "step":
        out.update(step_throughput("transact_v2", spec["per_device_batch"] * g, "bfloat16", log,
                                   spec["repeats"]))
        return out
    base = preset("transact_v2")
    batch = spec["per_device_batch"] * g if spec["task"] == "loop" else spec["curve_batch"]
    steps = spec["loop_steps"] if spec["task"] == "loop" else spec["curve_steps"]
    cfg = dataclasses.replace(base, feature=log.feat, selection=log.sel, train=dataclasses.replace(
        base.train, batch_size=batch, steps=steps, seed=0, checkpoint_every=0,
        log_every=max(steps // 4, 1) if spec["task"] == "loop" else spec["curve_every"]))
    # metrics.jsonl (the loss curve) needs a workdir; with several processes none is used, since a
    # checkpoint would need one directory shared by all of them
    workdir = tempfile.mkdtemp(prefix="mgpu_") if jax.process_count() == 1 else None
    t0 = time.perf_counter()
    r = train(cfg, log, workdir=workdir, progress=False)
    out.update(batch_size=batch, steps=steps, wall_s=time.perf_counter() - t0,
               examples_per_s_after_first_log=r.examples_per_second)
    if workdir:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            recs = [json.loads(line) for line in f]
        out["curve"] = [[rec["step"], rec["loss"]] for rec in recs if rec["type"] == "train"]
    out["final_param_checksum"] = float(sum(
        float(np.abs(np.asarray(jax.device_get(a.addressable_data(0)), np.float64)).sum())
        for a in jax.tree_util.tree_leaves(r.state.params)))
    return out


def worker_main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    if spec.get("num_processes"):
        from transact_jax.train.step import initialize_distributed
        initialize_distributed(coordinator_address=spec["coordinator"],
                               num_processes=spec["num_processes"], process_id=spec["process_id"])
    result = _worker(spec)
    with open(out_path, "w") as f:
        json.dump(result, f)


# --------------------------------------------------------------------------------- parent side
def _env(devices: List[int], cpu: bool) -> Dict[str, str]:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if cpu:
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(
            flags + [f"--xla_force_host_platform_device_count={len(devices)}"]))
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in devices)
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _wait(proc: subprocess.Popen, timeout: float) -> str:
    """The process's output once it has exited (killed after ``timeout`` seconds)."""
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        log, _ = proc.communicate()
    return log


def run_workers(specs: List[dict], device_sets: List[List[int]], cpu: bool, tmp: str,
                timeout: float) -> List[Optional[dict]]:
    """Start one worker per spec at once (each on its device set); their results (None if failed)."""
    procs = []
    for i, (spec, devs) in enumerate(zip(specs, device_sets)):
        spec_path, out_path = os.path.join(tmp, f"spec{i}.json"), os.path.join(tmp, f"out{i}.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        if os.path.exists(out_path):
            os.remove(out_path)
        procs.append((out_path, subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", spec_path, out_path],
            env=_env(devs, cpu), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    results = []
    for out_path, proc in procs:
        log = _wait(proc, timeout)
        if proc.returncode != 0 or not os.path.exists(out_path):
            print(f"worker failed (exit {proc.returncode}):\n{log[-3000:]}", flush=True)
            results.append(None)
            continue
        with open(out_path) as f:
            results.append(json.load(f))
    return results


def efficiency(rows: Dict[int, Optional[dict]], key: str, g: int) -> Optional[float]:
    one, many = rows.get(1), rows.get(g)
    if not one or not many:
        return None
    return many[key] / g / one[key]


def serving_per_gpu(g: int, serving_args: List[str], cpu: bool, tmp: str, timeout: float) -> dict:
    """``g`` serving searches at once, one per GPU; their max sustainable candidates/s."""
    procs = []
    for i in range(g):
        out = os.path.join(tmp, f"serving_{g}_{i}")
        procs.append((out, subprocess.Popen(
            [sys.executable, os.path.join(HERE, "serving.py"), "--out", out, *serving_args],
            env=_env([i], cpu), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)))
    rates = []
    for out, proc in procs:
        log = _wait(proc, timeout)
        try:
            with open(os.path.join(out, "serving.json")) as f:
                rates.append(json.load(f)["headline"]["max_candidates_per_s_p99_20ms"])
        except (OSError, KeyError, ValueError):
            print(f"serving run failed (exit {proc.returncode}):\n{log[-3000:]}", flush=True)
            rates.append(None)
    ok = [r for r in rates if r is not None]
    return {"gpus": g, "per_engine": rates,
            "total": float(sum(ok)) if len(ok) == g else None,
            "per_gpu": float(sum(ok) / g) if len(ok) == g else None}


def summarize(result: dict) -> None:
    """Fill ``result["headline"]`` from the measured rows (keys: device counts)."""
    gpus = result["gpus"]
    result["loop_per_process"].setdefault(1, result["loop"].get(1))
    g2 = 2 if 2 in gpus else max(gpus)
    serving_g = result["serving"].get(g2) or {}
    result["headline"] = {
        "gpus": max(gpus),
        "step_scaling_efficiency_2gpu": efficiency(result["step"], "examples_per_s", g2),
        "loop_scaling_efficiency_2gpu": efficiency(result["loop"], "examples_per_s_after_first_log", g2),
        "loop_per_process_scaling_efficiency_2gpu": efficiency(
            result["loop_per_process"], "examples_per_s_after_first_log", g2),
        "serving_candidates_per_s_per_gpu": serving_g.get("per_gpu"),
        "serving_candidates_per_s_one_gpu": (result["serving"].get(1) or {}).get("per_gpu"),
    }
    curves = {g: dict(r["curve"]) for g, r in result["curve"].items() if r and r.get("curve")}
    if 1 in curves:
        result["headline"]["max_loss_diff_vs_1_device"] = max(
            (abs(c[s] - curves[1][s]) for g, c in curves.items() for s in c if s in curves[1]),
            default=None)


def load_partial(path: str, serving_dirs: List[str]) -> dict:
    """A results JSON written by a run cut short (device counts back to ints), with the serving row
    of ``len(serving_dirs)`` GPUs taken from ``bench/serving.py`` runs made at the same time, one per
    GPU (their ``--out`` folders)."""
    with open(path) as f:
        result = json.load(f)
    for key in ("step", "loop", "loop_per_process", "curve", "serving"):
        result[key] = {int(g): r for g, r in result.get(key, {}).items()}
    if serving_dirs:
        rates = []
        for d in serving_dirs:
            with open(os.path.join(d, "serving.json")) as f:
                rates.append(json.load(f)["headline"]["max_candidates_per_s_p99_20ms"])
        g = len(rates)
        result["serving"][g] = {"gpus": g, "per_engine": rates, "total": float(sum(rates)),
                                "per_gpu": float(sum(rates) / g), "source": serving_dirs}
    return result


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    for key, label in (("step", "train step"), ("loop", "loop, 1 process"),
                       ("loop_per_process", "loop, 1 process per GPU")):
        rows = {int(g): r for g, r in result[key].items() if r}
        if rows:
            gs = sorted(rows)
            metric = "examples_per_s" if key == "step" else "examples_per_s_after_first_log"
            base = rows.get(1, rows[gs[0]])[metric]
            a.plot(gs, [rows[g][metric] / base / g for g in gs], marker="o", label=label)
    a.axhline(0.9, color="k", lw=0.8, ls="--")
    a.set(xlabel="GPUs", ylabel="scaling efficiency", title="examples/s per GPU vs 1 GPU", ylim=(0, 1.2))
    a.legend(fontsize=8)
    for g, r in sorted(result["curve"].items()):
        if r and r.get("curve"):
            s, l = zip(*r["curve"])
            b.plot(s, l, marker=".", label=f"{g} device(s)")
    b.set(xlabel="step", ylabel="train loss", title=f"loss at global batch {result['curve_batch']}")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", default="1,2", help="device counts to compare")
    ap.add_argument("--per-device-batch", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--loop-steps", type=int, default=60)
    ap.add_argument("--curve-batch", type=int, default=4096)
    ap.add_argument("--curve-steps", type=int, default=200)
    ap.add_argument("--curve-every", type=int, default=10)
    ap.add_argument("--users", type=int, default=6000, help="synthetic users in the training log")
    ap.add_argument("--data", help="existing data dir with train/ (else generated)")
    ap.add_argument("--serving", action="store_true", help="also one serving engine per GPU")
    ap.add_argument("--serving-args", default="--configs all --duration 1 --skip "
                    "device_only,phases,timeline,overload,cost_growth,grid --max-total-s 240",
                    help="arguments of each bench/serving.py run")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per worker")
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--quick", action="store_true", help="CPU smoke run")
    ap.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--summarize", metavar="JSON",
                    help="only fill the headline and plot of a results JSON from a run cut short")
    ap.add_argument("--serving-from", default="",
                    help="with --summarize: comma-separated bench/serving.py --out folders of runs "
                         "made at the same time, one per GPU (the serving row of that many GPUs)")
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(*args.worker)
        return {}
    if args.summarize:
        result = load_partial(args.summarize, [d for d in args.serving_from.split(",") if d])
        summarize(result)
        os.makedirs(args.results, exist_ok=True)
        with open(os.path.join(args.results, "multi_gpu.json"), "w") as f:
            json.dump(result, f, indent=1)
        plot(result, os.path.join(args.results, "multi_gpu.png"))
        print(json.dumps(result["headline"], indent=1))
        return result
    cpu = args.quick
    if args.quick:
        args.per_device_batch, args.repeats, args.loop_steps = 32, 3, 8
        args.curve_batch, args.curve_steps, args.curve_every, args.users = 64, 10, 2, 200
        if args.results == os.path.join(HERE, "results"):
            args.results = tempfile.mkdtemp(prefix="mgpu_results_")
    gpus = [int(g) for g in args.gpus.split(",")]
    tmp = tempfile.mkdtemp(prefix="mgpu_")
    data = args.data or os.path.join(tmp, "data")
    t0 = time.perf_counter()
    if not os.path.isdir(os.path.join(data, "train")):
        from transact_jax.data.generate import write_synthetic_logs
        from transact_jax.data.synthetic import SyntheticConfig
        from transact_jax.run.presets import preset
        c = preset("transact_v2")
        write_synthetic_logs(data, c.feature, c.selection, SyntheticConfig(users_per_chunk=256),
                             args.users, 1)
    common = {"data": data, "per_device_batch": args.per_device_batch, "repeats": args.repeats,
              "loop_steps": args.loop_steps, "curve_batch": args.curve_batch,
              "curve_steps": args.curve_steps, "curve_every": args.curve_every}
    from _env import environment
    result = {"benchmark": "multi_gpu", "environment": environment(), "gpus": gpus,
              "per_device_batch": args.per_device_batch, "curve_batch": args.curve_batch,
              "step": {}, "loop": {}, "loop_per_process": {}, "curve": {}, "serving": {}}
    os.makedirs(args.results, exist_ok=True)

    def save():
        with open(os.path.join(args.results, "multi_gpu.json"), "w") as f:
            json.dump(result, f, indent=1)

    for g in gpus:
        devs = list(range(g))
        for task in ("step", "loop", "curve"):
            (r,) = run_workers([dict(common, task=task)], [devs], cpu, tmp, args.timeout)
            result[task][g] = r
            print(f"{task:5s} {g} device(s): {json.dumps(r)[:300]}", flush=True)
            save()
        if g > 1:   # one process per device, through initialize_distributed
            coord = f"localhost:{_free_port()}"
            specs = [dict(common, task="loop", coordinator=coord, num_processes=g, process_id=i)
                     for i in range(g)]
            rs = run_workers(specs, [[i] for i in range(g)], cpu, tmp, args.timeout)
            result["loop_per_process"][g] = rs[0] if all(rs) else None
            print(f"loop, {g} processes: {json.dumps(rs[0])[:300] if rs[0] else 'failed'}", flush=True)
            save()
        if args.serving and not cpu:
            result["serving"][g] = serving_per_gpu(g, args.serving_args.split(), cpu, tmp, args.timeout)
            print(f"serving {g}: {result['serving'][g]}", flush=True)
            save()
    summarize(result)
    result["wall_s"] = time.perf_counter() - t0
    save()
    plot(result, os.path.join(args.results, "multi_gpu.png"))
    print(json.dumps(result["headline"], indent=1))
    print(f"wrote {args.results}/multi_gpu.{{json,png}} in {result['wall_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
