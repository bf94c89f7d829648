"""Training throughput of the jitted train step and of the end-to-end loop.

For each preset, batch size and compute dtype: examples/s of the jitted, donated train step on
device-resident batches (input pipeline excluded; median and spread over repeated steps, compile
excluded), and examples/s of the full loop with the grain pipeline reading a feature log.

    python bench/train_throughput.py                    # CPU-sized defaults
    python bench/train_throughput.py --gpu              # GPU-sized sweep

Writes ``bench/results/train_throughput_<platform>.json`` and ``.png``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

import jax
import numpy as np

from _env import RESULTS, environment, time_calls
from transact_jax.data.generate import write_synthetic_logs
from transact_jax.data.synthetic import SyntheticConfig
from transact_jax.model.inputs import ModelInputs
from transact_jax.run.presets import preset
from transact_jax.train.loop import train
from transact_jax.train.objective import Targets
from transact_jax.run.state import init_state
from transact_jax.train.step import data_mesh, make_train_step, replicate, shard_batch


def step_throughput(name: str, batch_size: int, dtype: str, log, repeats: int) -> dict:
    base = preset(name)
    cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, dtype=dtype),
                              train=dataclasses.replace(base.train, batch_size=batch_size))
    mesh = data_mesh()
    mdef, state, opt = init_state(cfg)
    state = replicate(state, mesh)
    step = make_train_step(mdef, cfg, opt, mesh)
    ex = log.read(np.arange(batch_size) % len(log))
    x = shard_batch(ModelInputs.from_examples(ex), mesh)
    t = shard_batch(Targets.from_examples(ex), mesh)
    holder = {"state": state}

    def run():
        holder["state"], m = step(holder["state"], x, t)
        jax.block_until_ready(m["loss"])

    t0 = time.perf_counter()
    run()
    compile_s = time.perf_counter() - t0
    stats = time_calls(run, warmup=2, repeats=repeats)
    return {"preset": name, "batch_size": batch_size, "dtype": dtype, "compile_s": compile_s, **stats,
            "examples_per_s": batch_size / stats["median_s"]}


def loop_throughput(name: str, batch_size: int, log, steps: int, threads: int) -> dict:
    """The whole loop (grain pipeline + host-to-device + step), after the first logged interval."""
    base = preset(name)
    cfg = dataclasses.replace(base, train=dataclasses.replace(
        base.train, batch_size=batch_size, steps=steps, log_every=max(steps // 4, 1),
        loader_threads=threads))
    r = train(cfg, log, progress=False)
    return {"preset": name, "batch_size": batch_size, "steps": steps, "loader_threads": threads,
            "examples_per_s_after_first_log": r.examples_per_second}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="GPU-sized sweep")
    ap.add_argument("--presets", default="wide_deep,transact,transact_v2")
    ap.add_argument("--data", default=None, help="existing data dir with train/ (else generated)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes")
    ap.add_argument("--results", default=RESULTS)
    ap.add_argument("--loop-only", action="store_true",
                    help="measure only the end-to-end loop (writes train_loop_<platform>.json)")
    ap.add_argument("--loader-threads", default="2", help="comma-separated reader thread counts")
    args = ap.parse_args(argv)
    batches = (1024, 4096, 16384) if args.gpu else (64, 256)
    if args.batches:
        batches = tuple(int(b) for b in args.batches.split(","))
    repeats = 20 if args.gpu else 5
    users = 6000 if args.gpu else 400
    cfg0 = preset("transact_v2")
    data = args.data or tempfile.mkdtemp(prefix="tj_tp_")
    if not os.path.isdir(os.path.join(data, "train")):
        write_synthetic_logs(data, cfg0.feature, cfg0.selection, SyntheticConfig(users_per_chunk=1024),
                             users, 64)
    from transact_jax.data.feature_log import FeatureLog
    log = FeatureLog(os.path.join(data, "train"), cfg0.feature, cfg0.selection)
    env = environment()
    result = {"benchmark": "train_throughput", "environment": env, "examples_in_log": len(log),
              "step": [], "loop": []}
    os.makedirs(args.results, exist_ok=True)
    kind = "train_loop" if args.loop_only else "train_throughput"
    stem = os.path.join(args.results, f"{kind}_{env['platform']}")

    def save():  # after every measurement, so a cut-off run keeps what it measured
        with open(stem + ".json", "w") as f:
            json.dump(result, f, indent=2)

    rows = result["step"]
    for name in ([] if args.loop_only else args.presets.split(",")):
        for b in batches:
            for dtype in ("float32", "bfloat16"):
                r = step_throughput(name, b, dtype, log, repeats)
                print(json.dumps(r), flush=True)
                rows.append(r)
                save()
    for threads in (int(t) for t in args.loader_threads.split(",")):
        result["loop"].append(loop_throughput("transact_v2", batches[-1], log, 40 if args.gpu else 8,
                                              threads))
        print(json.dumps(result["loop"][-1]), flush=True)
        save()
    if rows:
        plot(result, stem + ".png")
    print(f"{'preset':22s} {'batch':>6s} {'dtype':>9s} {'ex/s':>12s} {'p10-p90 ms':>16s}")
    for r in rows:
        print(f"{r['preset']:22s} {r['batch_size']:6d} {r['dtype']:>9s} {r['examples_per_s']:12,.0f} "
              f"{r['p10_s'] * 1e3:7.2f}-{r['p90_s'] * 1e3:7.2f}")
    return result


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    keys = sorted({(r["preset"], r["dtype"]) for r in result["step"]})
    for name, dtype in keys:
        rs = [r for r in result["step"] if r["preset"] == name and r["dtype"] == dtype]
        ax.plot([r["batch_size"] for r in rs], [r["examples_per_s"] for r in rs], marker="o",
                ls="-" if dtype == "float32" else "--", label=f"{name} {dtype}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("examples / s (train step)")
    ax.set_title(f"Train step throughput, {result['environment']['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
