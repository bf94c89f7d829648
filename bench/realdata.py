"""Real-data benchmark: the Table 2 presets on a public interaction log (MovieLens by default).

Requests come from ``python -m transact_jax data`` (the recipe of
``transact_jax.data.interactions``: sessions as requests, rated items and popularity-sampled
negatives as candidates, a time split into train / eval / test, item embeddings from the training
period). Every model gets the same budget (steps x batch), several seeds, early stopping on the eval
split's metric (``--early-stop-metric``; the best evaluation's parameters are kept) and is scored
on the test split: HIT@3 / AUC / NE per head, lifts against Wide&Deep and TransAct V2 against
TransAct (RT), paired by seed, mean and sample standard deviation over seeds. Learning curves (train
loss, eval metric over steps) go into the JSON and the plot.

MovieLens has no impressions, so presets with impression-negative NAL would train without NAL
negatives; ``--nal-fallback in_batch`` (the default) makes them use in-batch negatives instead
(``TrainConfig.nal_without_impressions``), ``warn`` keeps them as configured. The JSON records it.

    python bench/realdata.py                     # ml-latest-small from ../shared/data, GPU-sized
    python bench/realdata.py --quick             # CPU smoke run: tiny budget, results to a temp dir
    python bench/realdata.py --ratings PATH      # another MovieLens ratings file

``--ablations k_ll=0,k_ll=32,k_ll=192,ll_selection=recent`` adds TransAct V2 trained on S_all
selected differently (each variant logs its own feature logs; requests and labels are the same), as
rows ``transact_v2[<variant>]`` of the same tables.

Writes ``bench/results/realdata.{json,md,png}``; the JSON's ``headline`` has ``dataset``, ``seeds``,
``hit3_click_lift_v2_vs_transact_pct`` / ``_std``, ``auc_click_v2``, ``auc_click_transact``. The
data itself is read from the path given and never written into the repository.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from typing import Dict, List

import numpy as np

from _env import RESULTS, environment  # noqa: E402  (puts the repo root on sys.path)
from transact_jax.config import SelectionConfig  # noqa: E402
from transact_jax.data.feature_log import FeatureLog  # noqa: E402
from transact_jax.data.interactions import InteractionRecipe  # noqa: E402
from transact_jax.data.public import read_movielens, write_feature_logs  # noqa: E402
from transact_jax.run.config import ExperimentConfig, TrainConfig  # noqa: E402
from transact_jax.run.presets import PRESET_NAMES, preset  # noqa: E402
from transact_jax.train.loop import evaluate, train  # noqa: E402

DEFAULT_RATINGS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                               "ml-latest-small", "ratings.csv")
HEADS = ("click", "repin", "hide")


def prepare(args, sel: SelectionConfig, directory: str) -> Dict[str, FeatureLog]:
    """Feature logs of the three splits with selection ``sel`` (built once per directory; the
    requests and labels do not depend on ``sel``, only the logged S_all does)."""
    marker = os.path.join(directory, "done")
    if not os.path.exists(marker):
        if not os.path.exists(args.ratings):
            raise SystemExit(f"no ratings file at {args.ratings}: give --ratings PATH (the data is "
                             f"not part of the repository)")
        shutil.rmtree(directory, ignore_errors=True)
        recipe = InteractionRecipe(negatives_per_request=args.negatives, seed=args.data_seed)
        counts = write_feature_logs(read_movielens(args.ratings), directory, sel=sel, recipe=recipe)
        with open(marker, "w") as f:
            json.dump(counts, f)
    return {s: FeatureLog(os.path.join(directory, s)) for s in ("train", "eval", "test")}


def ablation_selections(spec: str) -> Dict[str, SelectionConfig]:
    """``"k_ll=32,ll_selection=recent"`` -> one SelectionConfig per ``field=value`` (others default)."""
    out = {}
    for item in filter(None, spec.split(",")):
        field, _, value = item.partition("=")
        default = getattr(SelectionConfig(), field, None)
        if default is None or not value:
            raise SystemExit(f"--ablations: {item!r} is not field=value of SelectionConfig")
        out[item] = dataclasses.replace(SelectionConfig(), **{field: type(default)(value)})
    return out


def curves(workdir: str, metric: str) -> Dict[str, list]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return {"train_step": [r["step"] for r in recs if r["type"] == "train"],
            "train_loss": [r["loss"] for r in recs if r["type"] == "train"],
            "eval_step": [r["step"] for r in recs if r["type"] == "eval"],
            "eval_metric": [r[metric] for r in recs if r["type"] == "eval"]}


def run(cfg: ExperimentConfig, logs: Dict[str, FeatureLog], metric: str) -> dict:
    t0 = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="realdata_")
    try:
        r = train(cfg, logs["train"], eval_log=logs["eval"], workdir=workdir, progress=False)
        test = evaluate(r.config, r.model_def, r.best_params, logs["test"])
        out = {"test": test, "best_step": r.best_step, "best_eval": r.best_eval_metrics,
               "trained_nal_negatives": r.config.train.nal_negatives,
               "curves": curves(workdir, metric), "train_seconds": time.perf_counter() - t0}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"  {cfg.name:22s} seed={cfg.train.seed} best step {out['best_step']:5d}  test "
          + "  ".join(f"hit@3/{h}={test[f'hit@3/{h}']:.3f} auc/{h}={test[f'auc/{h}']:.3f}"
                      for h in HEADS) + f"  ({out['train_seconds']:.0f} s)", flush=True)
    return out


def paired_lift(model: List[dict], base: List[dict], key: str) -> Dict[str, object]:
    """Lift in percent of ``model`` over ``base``, paired by seed (nan where the baseline is 0)."""
    pairs = [(m["test"][key], b["test"][key]) for m, b in zip(model, base)]
    lifts = np.array([100.0 * (m - b) / b if b else np.nan for m, b in pairs])
    return {"mean": float(lifts.mean()),
            "std": float(lifts.std(ddof=1)) if len(lifts) > 1 else float("nan"),
            "per_seed": lifts.tolist()}


def summarize(results: Dict[str, List[dict]]) -> List[dict]:
    rows = []
    for name, runs in results.items():
        row = {"model": name, "seeds": len(runs)}
        for h in HEADS:
            for m in ("hit@3", "auc", "ne"):
                vals = [r["test"][f"{m}/{h}"] for r in runs]
                row[f"{m}/{h}"] = {"mean": float(np.mean(vals)),
                                   "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")}
            if name != "wide_deep" and "wide_deep" in results:
                row[f"hit3_{h}_lift_vs_wide_deep"] = paired_lift(runs, results["wide_deep"], f"hit@3/{h}")
        row["best_step_mean"] = float(np.mean([r["best_step"] for r in runs]))
        rows.append(row)
    return rows


def markdown(rows: List[dict], meta: dict) -> str:
    lines = [f"# Table 2 presets on {meta['dataset']} (test split)", "",
             f"{meta['steps']} steps x batch {meta['batch_size']} per model, early stopping on the eval "
             f"split's {meta['early_stop_metric']} (every {meta['eval_every']} steps, patience "
             f"{meta['patience']}), {meta['seeds']} seeds (mean ± std); NAL fallback "
             f"{meta['nal_fallback']!r}; device {meta['environment']['device']}.", "",
             "| model | HIT@3 click | AUC click | HIT@3 repin | AUC repin | click lift vs W&D |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lift = r.get("hit3_click_lift_vs_wide_deep")
        lift_s = "-" if lift is None else f"{lift['mean']:+.2f}% ± {lift['std']:.2f}"
        lines.append(f"| {r['model']} | {r['hit@3/click']['mean']:.4f} ± {r['hit@3/click']['std']:.4f} | "
                     f"{r['auc/click']['mean']:.4f} ± {r['auc/click']['std']:.4f} | "
                     f"{r['hit@3/repin']['mean']:.4f} | {r['auc/repin']['mean']:.4f} | {lift_s} |")
    h = meta["headline"]
    lines += ["", f"TransAct V2 vs TransAct (RT), HIT@3 click: {h['hit3_click_lift_v2_vs_transact_pct']:+.2f}% "
              f"± {h['hit3_click_lift_v2_vs_transact_std']:.2f}; AUC click {h['auc_click_v2']:.4f} vs "
              f"{h['auc_click_transact']:.4f}."]
    return "\n".join(lines) + "\n"


def plot(results: Dict[str, List[dict]], metric: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, (name, runs) in enumerate(results.items()):
        color = f"C{i}"
        for k, r in enumerate(runs):
            c = r["curves"]
            a.plot(c["train_step"], c["train_loss"], color=color, alpha=0.6,
                   label=name if k == 0 else None)
            b.plot(c["eval_step"], c["eval_metric"], color=color, marker=".", alpha=0.8,
                   label=name if k == 0 else None)
    a.set_xlabel("step")
    a.set_ylabel("train loss")
    a.set_title("training loss")
    b.set_xlabel("step")
    b.set_ylabel(f"eval {metric}")
    b.set_title(f"validation {metric} (early stopping)")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratings", default=DEFAULT_RATINGS, help="MovieLens ratings.csv / ratings.dat")
    ap.add_argument("--data", default="/tmp/transact_realdata", help="where the feature logs go")
    ap.add_argument("--models", default=",".join(PRESET_NAMES))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--learning-rate", type=float, default=2e-3)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--early-stop-metric", default="auc/click")
    ap.add_argument("--negatives", type=int, default=20, help="negatives per request")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--nal-fallback", default="in_batch", choices=("in_batch", "warn"))
    ap.add_argument("--ablations", default="",
                    help="TransAct V2 with other S_all selections, e.g. 'k_ll=0,k_ll=32,k_ll=192,"
                         "ll_selection=recent' (each logs its own feature logs)")
    ap.add_argument("--results", default=RESULTS)
    ap.add_argument("--quick", action="store_true", help="CPU smoke run (tiny budget, temp results)")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.eval_every, args.seeds = 40, 64, 20, "0,1"
        args.models = "wide_deep,transact,transact_v2"
        if args.results == RESULTS:   # never overwrite committed full-size results
            args.results = os.path.join(args.data, "results")
    seeds = [int(s) for s in args.seeds.split(",")]
    models = args.models.split(",")
    logs = prepare(args, SelectionConfig(), args.data)
    base = ExperimentConfig(train=TrainConfig(
        batch_size=args.batch_size, steps=args.steps, learning_rate=args.learning_rate,
        warmup_steps=max(args.steps // 20, 1), log_every=max(args.steps // 40, 1),
        eval_every=args.eval_every, checkpoint_every=0, early_stopping_metric=args.early_stop_metric,
        early_stopping_patience=args.patience, nal_without_impressions=args.nal_fallback))
    print(f"data: " + ", ".join(f"{k} {len(v):,}" for k, v in logs.items()) + " examples", flush=True)
    t0 = time.perf_counter()
    results = {m: [run(preset(m, base, seed=s), logs, args.early_stop_metric) for s in seeds]
               for m in models}
    for variant, sel in ablation_selections(args.ablations).items():
        v_logs = prepare(args, sel, os.path.join(args.data, variant.replace("=", "_")))
        v_base = dataclasses.replace(base, selection=sel)
        results[f"transact_v2[{variant}]"] = [
            run(preset("transact_v2", v_base, seed=s), v_logs, args.early_stop_metric) for s in seeds]
    rows = summarize(results)
    headline = {"dataset": os.path.basename(os.path.dirname(os.path.abspath(args.ratings))),
                "seeds": len(seeds)}
    if "transact" in results and "transact_v2" in results:
        lift = paired_lift(results["transact_v2"], results["transact"], "hit@3/click")
        headline.update(hit3_click_lift_v2_vs_transact_pct=lift["mean"],
                        hit3_click_lift_v2_vs_transact_std=lift["std"],
                        auc_click_v2=float(np.mean([r["test"]["auc/click"] for r in results["transact_v2"]])),
                        auc_click_transact=float(np.mean([r["test"]["auc/click"]
                                                          for r in results["transact"]])))
    meta = {"dataset": headline["dataset"], "steps": args.steps, "batch_size": args.batch_size,
            "learning_rate": args.learning_rate, "eval_every": args.eval_every, "patience": args.patience,
            "early_stop_metric": args.early_stop_metric, "seeds": len(seeds), "seed_values": seeds,
            "nal_fallback": args.nal_fallback, "negatives_per_request": args.negatives,
            "ablations": args.ablations,
            "examples": {k: len(v) for k, v in logs.items()}, "environment": environment(),
            "headline": headline, "wall_seconds": time.perf_counter() - t0}
    payload = {"benchmark": "realdata", **meta, "rows": rows, "runs": results}
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "realdata.json"), "w") as f:
        json.dump(payload, f, indent=1)
    md = markdown(rows, meta) if "auc_click_v2" in headline else ""
    with open(os.path.join(args.results, "realdata.md"), "w") as f:
        f.write(md)
    plot(results, args.early_stop_metric, os.path.join(args.results, "realdata.png"))
    print(md or json.dumps(headline))
    print(f"wrote {args.results}/realdata.{{json,md,png}} in {meta['wall_seconds']:.0f} s")
    return payload


if __name__ == "__main__":
    main()
