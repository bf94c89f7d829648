"""Reproduce the paper's Table 2 (and Tables 4 and 6) on synthetic data.

Trains every model of Table 2 on the same synthetic feature log with the same budget (steps x batch),
for several seeds, evaluates HIT@3 per head on held-out users (paper §4.2.1: chunks ranked by
S = sum_h w_h f(x)_h, ties averaged), and reports each model's lift against Wide&Deep, paired by seed,
as mean and standard deviation over seeds. Also:

* Table 4: NAL negative sampling, in-batch vs impression, as lifts against TransAct without NAL;
* Table 6: the w_NAL sweep (impression negatives) as lifts against TransAct without NAL.

The paper's ordering is a hypothesis to test, not a target: the script reports what comes out.

    python examples/ablation.py --train-users 60000 --eval-users 12000 --steps 1500 --seeds 0,1,2

Writes ``bench/results/ablation_table{2,4,6}.{json,md}``. A full run wants a GPU; ``--quick`` runs a
tiny version on a CPU in a few minutes (too small for significant differences).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

from transact_jax.data.feature_log import FeatureLog  # noqa: E402
from transact_jax.environment import environment  # noqa: E402
from transact_jax.data.generate import write_synthetic_logs  # noqa: E402
from transact_jax.data.synthetic import SyntheticConfig  # noqa: E402
from transact_jax.run.presets import PAPER_TABLE2, PRESET_NAMES, preset  # noqa: E402
from transact_jax.run.config import ExperimentConfig, TrainConfig  # noqa: E402
from transact_jax.train.loop import train  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "..", "bench", "results")
T_CRIT_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
HEADS = ("repin", "hide")
PAPER_TABLE4 = {"transact_nal_inbatch": (0.63, -1.90), "transact_nal_imp": (1.10, -2.39)}
PAPER_TABLE6 = {1e-4: (0.58, -2.09), 1e-3: (0.86, -2.6), 1e-2: (1.10, -2.39), 1e-1: (0.54, -2.39)}


class RawStore:
    """Per-run results on disk (``--raw``), so an interrupted sweep resumes where it stopped."""

    def __init__(self, path: str):
        self.path = path
        self.data: Dict[str, Dict[str, float]] = {}
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if path and os.path.exists(path):
            with open(path) as f:
                self.data = json.load(f)

    def run(self, cfg: ExperimentConfig, train_log: FeatureLog, eval_log: FeatureLog) -> Dict[str, float]:
        key = f"{cfg.name}|seed={cfg.train.seed}|w_nal={cfg.train.w_nal:g}"
        if key not in self.data:
            self.data[key] = run(cfg, train_log, eval_log)
            if self.path:
                with open(self.path, "w") as f:
                    json.dump(self.data, f, indent=1)
        return self.data[key]


def run(cfg: ExperimentConfig, train_log: FeatureLog, eval_log: FeatureLog) -> Dict[str, float]:
    t0 = time.perf_counter()
    r = train(cfg, train_log, eval_log=eval_log, progress=False)
    out = dict(r.eval_metrics)
    out.update(train_seconds=time.perf_counter() - t0, final_loss=r.metrics.get("loss"))
    print(f"  {cfg.name:24s} seed={cfg.train.seed} w_nal={cfg.train.w_nal:<7g} "
          f"hit@3/repin={out['hit@3/repin']:.4f} hit@3/hide={out['hit@3/hide']:.4f} "
          f"auc/repin={out['auc/repin']:.4f} ({out['train_seconds']:.0f} s)", flush=True)
    return out


def lift_rows(results: Dict[str, List[Dict[str, float]]], baseline: str, names) -> List[dict]:
    """Per model: lift vs ``baseline`` paired by seed, mean and sample std over seeds."""
    rows = []
    for name in names:
        row = {"model": name, "seeds": len(results[name])}
        for head in HEADS:
            key = f"hit@3/{head}"
            lifts = np.array([100.0 * (m[key] - b[key]) / b[key]
                              for m, b in zip(results[name], results[baseline])])
            mean = float(lifts.mean())
            std = float(lifts.std(ddof=1)) if len(lifts) > 1 else float("nan")
            t = mean / (std / np.sqrt(len(lifts))) if len(lifts) > 1 and std > 0 else float("nan")
            crit = T_CRIT_95.get(len(lifts) - 1, 1.96)
            row.update({f"hit3_{head}_lift_pct": mean, f"hit3_{head}_lift_std": std,
                        f"hit3_{head}_lifts_per_seed": lifts.tolist(),
                        f"hit3_{head}_significant_95": bool(abs(t) > crit) if np.isfinite(t) else False,
                        f"hit3_{head}_mean": float(np.mean([m[key] for m in results[name]]))})
        row["auc_repin_mean"] = float(np.mean([m["auc/repin"] for m in results[name]]))
        row["auc_hide_mean"] = float(np.mean([m["auc/hide"] for m in results[name]]))
        rows.append(row)
    return rows


def markdown(title: str, rows: List[dict], paper: Dict, baseline_label: str, meta: dict) -> str:
    lines = [f"# {title}", "",
             f"Lift of HIT@3 vs {baseline_label} (mean ± std over {meta['seeds']} seeds, paired by seed; "
             f"* = not significant at 95%, t-test over seeds). Synthetic data: {meta['train_examples']:,} "
             f"train / {meta['eval_examples']:,} eval examples; {meta['steps']} steps x batch "
             f"{meta['batch_size']} per model; device {meta['environment']['device']}.", "",
             "| model | HIT@3/repin | HIT@3/hide | paper repin | paper hide | AUC repin | AUC hide |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        p = paper.get(r["model"], ("", ""))

        def cell(head):
            star = "" if r[f"hit3_{head}_significant_95"] else "*"
            return f"{r[f'hit3_{head}_lift_pct']:+.2f}% ± {r[f'hit3_{head}_lift_std']:.2f}{star}"

        lines.append(f"| {r['model']} | {cell('repin')} | {cell('hide')} | "
                     f"{p[0] if p[0] == '' else f'{p[0]:+.2f}%'} | {p[1] if p[1] == '' else f'{p[1]:+.2f}%'} | "
                     f"{r['auc_repin_mean']:.4f} | {r['auc_hide_mean']:.4f} |")
    return "\n".join(lines) + "\n"


def write(results_dir: str, name: str, payload: dict, md: str) -> None:
    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, f"{name}.json"), "w") as f:
        json.dump(payload, f, indent=2)
    with open(os.path.join(results_dir, f"{name}.md"), "w") as f:
        f.write(md)
    print(md)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-users", type=int, default=60_000)
    ap.add_argument("--eval-users", type=int, default=12_000)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--learning-rate", type=float, default=2e-3)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--data", default="/tmp/transact_ablation_data")
    ap.add_argument("--tables", default="2,4,6")
    ap.add_argument("--w-nal-sweep", default="0.0001,0.001,0.1")
    ap.add_argument("--raw", default=os.path.join(RESULTS, "ablation_raw.json"),
                    help="per-run results file; runs already in it are not repeated")
    ap.add_argument("--generate-only", action="store_true",
                    help="write the data set and stop (e.g. under JAX_PLATFORMS=cpu on a many-core host)")
    ap.add_argument("--results", default=RESULTS, help="where the tables go")
    ap.add_argument("--quick", action="store_true",
                    help="tiny CPU-sized run; its tables go to a temp dir unless --results is given")
    args = ap.parse_args(argv)
    if args.quick:
        args.train_users, args.eval_users, args.steps, args.batch_size = 1500, 500, 60, 128
        args.raw = ""
        if args.results == RESULTS:  # never overwrite the committed full-size results
            args.results = os.path.join(args.data, "results")
    jax.config.update("jax_compilation_cache_dir", os.path.join(args.data, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    seeds = [int(s) for s in args.seeds.split(",")]
    tables = set(args.tables.split(","))

    base = ExperimentConfig(train=TrainConfig(batch_size=args.batch_size, steps=args.steps,
                                              learning_rate=args.learning_rate,
                                              warmup_steps=max(args.steps // 20, 1),
                                              log_every=max(args.steps // 10, 1), checkpoint_every=0))
    t0 = time.perf_counter()
    marker = os.path.join(args.data, f"done_{args.train_users}_{args.eval_users}")
    if os.path.exists(marker):
        train_log = FeatureLog(os.path.join(args.data, "train"), base.feature, base.selection)
        eval_log = FeatureLog(os.path.join(args.data, "eval"), base.feature, base.selection)
    else:
        train_log, eval_log = write_synthetic_logs(args.data, base.feature, base.selection,
                                                   SyntheticConfig(seed=1234), args.train_users,
                                                   args.eval_users)
        open(marker, "w").close()
    print(f"data: {len(train_log):,} train / {len(eval_log):,} eval examples "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.generate_only:
        return
    meta = {"seeds": len(seeds), "seed_values": seeds, "train_examples": len(train_log),
            "eval_examples": len(eval_log), "steps": args.steps, "batch_size": args.batch_size,
            "examples": args.steps * args.batch_size, "learning_rate": args.learning_rate,
            "environment": environment(), "hit_ties": "average",
            "ranking_weights": dict(zip(base.feature.heads, base.train.ranking_weights))}

    store = RawStore(args.raw)
    results: Dict[str, List[Dict[str, float]]] = {}
    needed = list(PRESET_NAMES) if "2" in tables else ["transact", "transact_nal_inbatch", "transact_nal_imp"]
    for name in needed:
        results[name] = [store.run(preset(name, base, seed=s), train_log, eval_log) for s in seeds]

    if "2" in tables:
        rows = lift_rows(results, "wide_deep", [n for n in PRESET_NAMES if n != "wide_deep"])
        for r in rows:
            r["examples"] = meta["examples"]
        write(args.results, "ablation_table2", {"table": "paper Table 2: HIT@3 lift vs Wide&Deep", **meta,
                                  "rows": rows, "raw": results, "paper": PAPER_TABLE2},
              markdown("Table 2 on synthetic data", rows, PAPER_TABLE2, "Wide&Deep", meta))
    if "4" in tables:
        rows = lift_rows(results, "transact", ["transact_nal_inbatch", "transact_nal_imp"])
        write(args.results, "ablation_table4", {"table": "paper Table 4: NAL negatives, lift vs TransAct without NAL",
                                  **meta, "rows": rows, "paper": PAPER_TABLE4},
              markdown("Table 4 on synthetic data: NAL negative sampling", rows, PAPER_TABLE4,
                       "TransAct (RT) without NAL", meta))
    if "6" in tables:
        sweep = {0.01: results["transact_nal_imp"]}
        for w in (float(v) for v in args.w_nal_sweep.split(",")):
            sweep[w] = [store.run(preset("transact_nal_imp", base, seed=s, w_nal=w), train_log, eval_log)
                        for s in seeds]
        named = {f"w_nal={w:g}": v for w, v in sorted(sweep.items())}
        named["transact"] = results["transact"]
        rows = lift_rows(named, "transact", [k for k in named if k != "transact"])
        paper6 = {f"w_nal={w:g}": v for w, v in PAPER_TABLE6.items()}
        write(args.results, "ablation_table6", {"table": "paper Table 6: w_NAL sweep (impression negatives), lift vs "
                                  "TransAct without NAL", **meta, "rows": rows, "paper": paper6},
              markdown("Table 6 on synthetic data: w_NAL sweep", rows, paper6,
                       "TransAct (RT) without NAL", meta))
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
