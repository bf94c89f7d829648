"""Real-data benchmark: the Table 2 presets and lifelong-sequence ablations on a public interaction
log (MovieLens ml-latest-small by default).

Requests come from the recipe of ``transact_jax.data.interactions`` (sessions as requests, rated
items and popularity-sampled negatives as candidates, a time split into train / eval / test, item
embeddings from the training period). Every model gets the same budget (steps x batch), several
seeds, early stopping on the eval split's metric (``--early-stop-metric``; the best evaluation's
parameters are kept) and is scored on the test split: HIT@3 / AUC / NE per head, lifts against
Wide&Deep and against TransAct (RT), paired by seed, mean and sample standard deviation over seeds.
Learning curves (train loss, eval metric over steps) go into the JSON and the plot.

MovieLens has no impressions, so presets with impression-negative NAL would train without NAL
negatives; ``--nal-fallback in_batch`` (the default) makes them use in-batch negatives instead
(``TrainConfig.nal_without_impressions``), ``warn`` keeps them as configured. The JSON records it.

    python bench/realdata.py                     # ml-latest-small from ../shared/data, GPU-sized
    python bench/realdata.py --quick             # CPU smoke run: tiny budget, results to a temp dir
    python bench/realdata.py --ratings PATH      # another MovieLens ratings file

**Ablations** (``--ablations``, default :data:`DEFAULT_ABLATIONS`, ``none`` for none): each item is
``[preset@]section.field=value[+section.field=value...]`` with ``section`` one of ``selection``,
``model``, ``train``, ``recipe`` (tuple values separated by ``/``); the preset defaults to
``transact_v2``. Variants that change the selection or the recipe get their own feature logs (the
requests are the same). Each becomes a row ``preset[item]`` of the same tables.

**Jobs.** ``--jobs N`` runs N trainings at once in separate processes (one small model leaves most
of a GPU idle). Every finished run is stored in ``--cache`` (one JSON per run); a rerun skips runs
already there, so a long sweep can be split over several calls. Runs missing at the end are listed
in the JSON as ``missing``.

Writes ``bench/results/realdata.{json,md,png}``; the JSON's ``headline`` has ``dataset``, ``seeds``,
``hit3_click_lift_v2_vs_transact_pct`` / ``_std``, ``auc_click_v2``, ``auc_click_transact``. The
data itself is read from the path given and never written into the repository.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from _env import RESULTS, environment, write_results  # noqa: E402  (puts the repo root on sys.path)
from transact_jax.config import SelectionConfig  # noqa: E402
from transact_jax.data.interactions import InteractionRecipe, feature_config_for  # noqa: E402
from transact_jax.model.config import ModelConfig  # noqa: E402
from transact_jax.run.config import ExperimentConfig, TrainConfig  # noqa: E402

DEFAULT_RATINGS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                               "ml-latest-small", "ratings.csv")
HEADS = ("click", "repin", "hide")
SPLIT_NAMES = ("train", "eval", "test")
DEFAULT_ABLATIONS = ",".join([
    "selection.k_ll=0", "selection.k_ll=32",
    "selection.ll_selection=random", "selection.ll_selection=recent",
    "model.token_features=similarity/age",
    "recipe.item_id_feature=full", "transact@recipe.item_id_feature=full",
    "model.dropout=0.1", "train.weight_decay=0.01",
])
"""The default ablations, in priority order (a sweep cut short trains the first ones)."""
SECTIONS = {"selection": SelectionConfig, "model": ModelConfig, "train": TrainConfig,
            "recipe": InteractionRecipe}


@dataclasses.dataclass(frozen=True)
class Variant:
    """A preset with overrides per section: ``{"model": {"dropout": 0.1}, ...}``."""

    label: str
    preset: str
    overrides: Tuple[Tuple[str, Tuple[Tuple[str, object], ...]], ...] = ()

    def section(self, name: str) -> Dict[str, object]:
        return dict(dict(self.overrides).get(name, ()))


def _value(cls, field: str, text: str, item: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if field not in fields:
        raise SystemExit(f"--ablations: {item!r}: {cls.__name__} has no field {field!r}")
    default = getattr(cls(), field)
    if isinstance(default, tuple):
        return tuple(v for v in text.split("/") if v)
    if isinstance(default, bool):
        return text.lower() in ("1", "true", "yes")
    return type(default)(text)


def parse_ablations(spec: str) -> List[Variant]:
    """``--ablations`` (module docstring) -> variants."""
    if spec in ("", "none"):
        return []
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        preset_name, _, body = item.rpartition("@")
        sections: Dict[str, Dict[str, object]] = {}
        for assign in body.split("+"):
            key, _, text = assign.partition("=")
            section, _, field = key.partition(".")
            if section not in SECTIONS or not field or not text:
                raise SystemExit(f"--ablations: {assign!r} is not section.field=value with section "
                                 f"in {tuple(SECTIONS)}")
            sections.setdefault(section, {})[field] = _value(SECTIONS[section], field, text, item)
        name = preset_name or "transact_v2"
        out.append(Variant(f"{name}[{body}]", name,
                           tuple((s, tuple(sorted(f.items()))) for s, f in sorted(sections.items()))))
    return out


def recipe_of(args, variant: Variant) -> InteractionRecipe:
    return dataclasses.replace(InteractionRecipe(negatives_per_request=args.negatives,
                                                 seed=args.data_seed), **variant.section("recipe"))


def selection_of(variant: Variant) -> SelectionConfig:
    return dataclasses.replace(SelectionConfig(), **variant.section("selection"))


def log_dir(args, variant: Variant) -> str:
    """Feature logs depend only on the selection and the recipe: variants that agree share them."""
    key = json.dumps([variant.section("selection"), variant.section("recipe")], sort_keys=True,
                     default=str)
    if key == json.dumps([{}, {}]):
        return os.path.join(args.data, "base")
    return os.path.join(args.data, "v_" + hashlib.sha1(key.encode()).hexdigest()[:10])


def build_logs(ratings: str, directory: str, sel: SelectionConfig, recipe: InteractionRecipe) -> dict:
    """Feature logs of the three splits in ``directory`` (once; a ``done`` marker records them)."""
    from transact_jax.data.public import read_movielens, write_feature_logs
    marker = os.path.join(directory, "done")
    if not os.path.exists(marker):
        shutil.rmtree(directory, ignore_errors=True)
        data = read_movielens(ratings)
        feat = feature_config_for(data, recipe)
        t0 = time.perf_counter()
        counts = write_feature_logs(data, directory, feat=feat, sel=sel, recipe=recipe)
        with open(marker, "w") as f:
            json.dump({"examples": counts, "seconds": time.perf_counter() - t0}, f)
    with open(marker) as f:
        return json.load(f)


def experiment(args, variant: Variant, seed: int, feat) -> ExperimentConfig:
    from transact_jax.run.presets import preset
    train = dataclasses.replace(TrainConfig(
        batch_size=args.batch_size, steps=args.steps, learning_rate=args.learning_rate,
        warmup_steps=max(args.steps // 20, 1), log_every=max(args.steps // 40, 1),
        eval_every=args.eval_every, checkpoint_every=0, early_stopping_metric=args.early_stop_metric,
        early_stopping_patience=args.patience, nal_without_impressions=args.nal_fallback),
        **variant.section("train"))
    model = dataclasses.replace(ModelConfig(), **variant.section("model"))
    base = ExperimentConfig(feature=feat, selection=selection_of(variant), model=model, train=train)
    return preset(variant.preset, base, seed=seed)


def curves(workdir: str, metric: str) -> Dict[str, list]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return {"train_step": [r["step"] for r in recs if r["type"] == "train"],
            "train_loss": [r["loss"] for r in recs if r["type"] == "train"],
            "eval_step": [r["step"] for r in recs if r["type"] == "eval"],
            "eval_metric": [r[metric] for r in recs if r["type"] == "eval"]}


def run_one(args, variant: Variant, seed: int) -> dict:
    """Train one (variant, seed) on its feature logs; test-split metrics of the best parameters."""
    from transact_jax.data.feature_log import FeatureLog
    from transact_jax.train.loop import evaluate, train
    t0 = time.perf_counter()
    d = log_dir(args, variant)
    logs = {s: FeatureLog(os.path.join(d, s)) for s in SPLIT_NAMES}
    cfg = experiment(args, variant, seed, logs["train"].feat)
    workdir = tempfile.mkdtemp(prefix="realdata_")
    try:
        r = train(cfg, logs["train"], eval_log=logs["eval"], workdir=workdir, progress=False)
        test = evaluate(r.config, r.model_def, r.best_params, logs["test"])
        out = {"label": variant.label, "seed": seed, "test": test, "best_step": r.best_step,
               "best_eval": r.best_eval_metrics, "trained_nal_negatives": r.config.train.nal_negatives,
               "curves": curves(workdir, args.early_stop_metric),
               "train_seconds": time.perf_counter() - t0, "environment": environment()}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"  {variant.label:48s} seed={seed} best step {out['best_step']:5d}  test "
          + "  ".join(f"hit@3/{h}={test[f'hit@3/{h}']:.3f} auc/{h}={test[f'auc/{h}']:.3f}"
                      for h in ("click", "repin")) + f"  ({out['train_seconds']:.0f} s)", flush=True)
    return out


def _cache_path(args, variant: Variant, seed: int) -> str:
    key = hashlib.sha1(json.dumps([variant.label, seed, args.steps, args.batch_size, args.learning_rate,
                                   args.eval_every, args.patience, args.early_stop_metric,
                                   args.negatives, args.data_seed, args.nal_fallback]).encode())
    return os.path.join(args.cache, f"{key.hexdigest()[:16]}.json")


def _cached_run(args, variant: Variant, seed: int) -> dict:
    out = run_one(args, variant, seed)
    path = _cache_path(args, variant, seed)
    with open(path + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(path + ".tmp", path)
    return out


def _pool(jobs: int) -> cf.Executor:
    return cf.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))


def run_all(args, variants: List[Variant], seeds: List[int], train: bool = True
            ) -> Tuple[Dict[str, List[dict]], Dict[str, dict]]:
    """Every (variant, seed), from the cache or trained, and the feature logs built for them.

    One pool of ``--jobs`` processes does both: each needed log directory is built, and as soon as
    one is ready the runs that read it are queued (in ``variants`` order, which is the priority).
    With ``train=False`` only what the cache holds is returned."""
    todo, results = [], {v.label: {} for v in variants}
    for v in variants:
        for s in seeds:
            path = _cache_path(args, v, s)
            if os.path.exists(path):
                with open(path) as f:
                    results[v.label][s] = json.load(f)
            else:
                todo.append((v, s))
    print(f"{sum(len(r) for r in results.values())} runs cached, {len(todo)} to train", flush=True)
    built: Dict[str, dict] = {}
    if train and todo:
        by_dir: Dict[str, List[Tuple[Variant, int]]] = {}
        for v, s in todo:
            by_dir.setdefault(log_dir(args, v), []).append((v, s))
        with _pool(args.jobs) as pool:
            futures = {pool.submit(build_logs, args.ratings, d, selection_of(runs[0][0]),
                                   recipe_of(args, runs[0][0])): ("logs", d)
                       for d, runs in by_dir.items()}
            while futures:
                done, _ = cf.wait(futures, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    kind, what = futures.pop(fut)
                    if kind == "logs":
                        built[what] = fut.result()
                        print(f"logs {os.path.basename(what)}: {built[what]['examples']} in "
                              f"{built[what]['seconds']:.0f} s", flush=True)
                        for v, s in by_dir[what]:
                            futures[pool.submit(_cached_run, args, v, s)] = ("run", (v, s))
                    else:
                        v, s = what
                        results[v.label][s] = fut.result()
    return {label: [runs[s] for s in seeds if s in runs] for label, runs in results.items()}, built


def paired(model: List[dict], base: List[dict], key: str, relative: bool) -> Optional[Dict[str, object]]:
    """Paired by seed: lift in percent (``relative``) or difference of ``key``; mean, sample std."""
    by_seed = {b["seed"]: b["test"][key] for b in base}
    pairs = [(m["test"][key], by_seed[m["seed"]]) for m in model if m["seed"] in by_seed]
    if not pairs:
        return None
    d = np.array([(100.0 * (m - b) / b if b else np.nan) if relative else m - b for m, b in pairs])
    return {"mean": float(d.mean()), "std": float(d.std(ddof=1)) if len(d) > 1 else float("nan"),
            "per_seed": d.tolist()}


def summarize(results: Dict[str, List[dict]]) -> List[dict]:
    rows = []
    for name, runs in results.items():
        if not runs:
            continue
        row = {"model": name, "seeds": len(runs)}
        for h in HEADS:
            for m in ("hit@3", "auc", "ne"):
                vals = [r["test"][f"{m}/{h}"] for r in runs]
                row[f"{m}/{h}"] = {"mean": float(np.mean(vals)),
                                   "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")}
        for base in ("wide_deep", "transact"):
            if name != base and results.get(base):
                row[f"hit3_click_lift_vs_{base}"] = paired(runs, results[base], "hit@3/click", True)
                row[f"auc_click_diff_vs_{base}"] = paired(runs, results[base], "auc/click", False)
        lift, auc = row.get("hit3_click_lift_vs_transact"), row.get("auc_click_diff_vs_transact")
        row["beats_transact_by_1std"] = bool(
            lift and auc and lift["mean"] > lift["std"] and auc["mean"] > auc["std"])
        row["best_step_mean"] = float(np.mean([r["best_step"] for r in runs]))
        rows.append(row)
    return rows


def _pm(d: Optional[dict], fmt: str) -> str:
    return "-" if d is None else f"{d['mean']:{fmt}} ± {d['std']:{fmt.lstrip('+')}}"


def markdown(rows: List[dict], meta: dict) -> str:
    lines = [f"# Table 2 presets and lifelong-sequence ablations on {meta['dataset']} (test split)", "",
             f"{meta['steps']} steps x batch {meta['batch_size']} per model at most, early stopping on "
             f"the eval split's {meta['early_stop_metric']} (every {meta['eval_every']} steps, patience "
             f"{meta['patience']}), seeds {meta['seed_values']} (mean ± sample std; lifts paired by "
             f"seed); NAL fallback {meta['nal_fallback']!r}; device {meta['environment']['device']}.",
             "", "| model | HIT@3 click | AUC click | HIT@3 repin | HIT@3 click lift vs W&D | "
             "HIT@3 click lift vs TransAct | AUC click diff vs TransAct | > 1 std | best step |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {_pm(r['hit@3/click'], '.4f')} | {_pm(r['auc/click'], '.4f')} | "
            f"{_pm(r['hit@3/repin'], '.4f')} | {_pm(r.get('hit3_click_lift_vs_wide_deep'), '+.2f')}% | "
            f"{_pm(r.get('hit3_click_lift_vs_transact'), '+.2f')}% | "
            f"{_pm(r.get('auc_click_diff_vs_transact'), '+.4f')} | "
            f"{'yes' if r['beats_transact_by_1std'] else 'no'} | {r['best_step_mean']:.0f} |")
    h = meta["headline"]
    if "hit3_click_lift_v2_vs_transact_pct" in h:
        lines += ["", f"TransAct V2 vs TransAct (RT), HIT@3 click: "
                      f"{h['hit3_click_lift_v2_vs_transact_pct']:+.2f}% ± "
                      f"{h['hit3_click_lift_v2_vs_transact_std']:.2f}; AUC click {h['auc_click_v2']:.4f} "
                      f"vs {h['auc_click_transact']:.4f}. Configurations beating TransAct (RT) by more "
                      f"than one std in both: {h['beats_transact_by_1std'] or 'none'}."]
    if meta["missing"]:
        lines += ["", f"Missing runs (not trained in this sweep): {meta['missing']}"]
    return "\n".join(lines) + "\n"


def plot(results: Dict[str, List[dict]], rows: List[dict], metric: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(19, 5), gridspec_kw={"width_ratios": [1, 1, 1.3]})
    presets = [n for n in results if "[" not in n]
    for i, name in enumerate(presets):
        for k, r in enumerate(results[name]):
            cv = r["curves"]
            a.plot(cv["train_step"], cv["train_loss"], color=f"C{i}", alpha=0.6,
                   label=name if k == 0 else None)
            b.plot(cv["eval_step"], cv["eval_metric"], color=f"C{i}", marker=".", alpha=0.8,
                   label=name if k == 0 else None)
    a.set(xlabel="step", ylabel="train loss", title="training loss")
    b.set(xlabel="step", ylabel=f"eval {metric}", title=f"validation {metric} (early stopping)")
    b.legend(fontsize=7)
    bars = [r for r in rows if r.get("hit3_click_lift_vs_transact")]
    y = np.arange(len(bars))
    c.barh(y, [r["hit3_click_lift_vs_transact"]["mean"] for r in bars],
           xerr=[np.nan_to_num(r["hit3_click_lift_vs_transact"]["std"]) for r in bars],
           color=["C2" if r["beats_transact_by_1std"] else "C7" for r in bars])
    c.set_yticks(y, [r["model"] for r in bars], fontsize=7)
    c.axvline(0, color="k", lw=0.8)
    c.invert_yaxis()
    c.set(xlabel="HIT@3 click lift vs TransAct (RT), % (mean ± std over seeds)",
          title="does the lifelong sequence pay off?")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratings", default=DEFAULT_RATINGS, help="MovieLens ratings.csv / ratings.dat")
    ap.add_argument("--dataset", help="the data set's name in the results (default: the ratings "
                                      "file's folder name)")
    ap.add_argument("--data", default="/tmp/transact_realdata", help="where the feature logs go")
    ap.add_argument("--cache", help="finished runs (default DATA/runs)")
    ap.add_argument("--models", default="transact_v2,wide_deep,transact,transact_nal_inbatch,bst")
    ap.add_argument("--ablations", default=DEFAULT_ABLATIONS)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--learning-rate", type=float, default=2e-3)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--early-stop-metric", default="auc/click")
    ap.add_argument("--negatives", type=int, default=20, help="negatives per request")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--nal-fallback", default="in_batch", choices=("in_batch", "warn"))
    ap.add_argument("--jobs", type=int, default=1, help="trainings at once (processes)")
    ap.add_argument("--results", default=RESULTS)
    ap.add_argument("--quick", action="store_true", help="CPU smoke run (tiny budget, temp results)")
    ap.add_argument("--summarize-only", action="store_true",
                    help="no data, no training: tables and plot from the runs in --cache (each run "
                         "records the machine it ran on)")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.eval_every, args.seeds = 40, 64, 20, "0,1"
        args.models = "wide_deep,transact,transact_v2"
        if args.ablations == DEFAULT_ABLATIONS:
            args.ablations = "selection.ll_selection=random,model.token_features=similarity/age"
        if args.results == RESULTS:   # never overwrite committed full-size results
            args.results = os.path.join(args.data, "results")
    args.cache = args.cache or os.path.join(args.data, "runs")
    os.makedirs(args.cache, exist_ok=True)
    if not args.summarize_only and not os.path.exists(args.ratings):
        raise SystemExit(f"no ratings file at {args.ratings}: give --ratings PATH (the data is not "
                         f"part of the repository)")
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [Variant(m, m) for m in args.models.split(",")] + parse_ablations(args.ablations)
    t0 = time.perf_counter()
    results, built = run_all(args, variants, seeds, train=not args.summarize_only)
    envs = {json.dumps(r.get("environment", {"device": "unrecorded"}), sort_keys=True) for runs in results.values() for r in runs}
    rows = summarize(results)
    headline = {"dataset": args.dataset or os.path.basename(os.path.dirname(os.path.abspath(args.ratings))),
                "seeds": len(seeds),
                "beats_transact_by_1std": [r["model"] for r in rows if r["beats_transact_by_1std"]]}
    if results.get("transact") and results.get("transact_v2"):
        lift = paired(results["transact_v2"], results["transact"], "hit@3/click", True)
        headline.update(hit3_click_lift_v2_vs_transact_pct=lift["mean"],
                        hit3_click_lift_v2_vs_transact_std=lift["std"],
                        auc_click_v2=float(np.mean([r["test"]["auc/click"] for r in results["transact_v2"]])),
                        auc_click_transact=float(np.mean([r["test"]["auc/click"]
                                                          for r in results["transact"]])))
    missing = [f"{v.label} seed {s}" for v in variants for s in seeds
               if s not in {r["seed"] for r in results[v.label]}]
    meta = {"dataset": headline["dataset"], "steps": args.steps, "batch_size": args.batch_size,
            "learning_rate": args.learning_rate, "eval_every": args.eval_every, "patience": args.patience,
            "early_stop_metric": args.early_stop_metric, "seeds": len(seeds), "seed_values": seeds,
            "nal_fallback": args.nal_fallback, "negatives_per_request": args.negatives,
            "ablations": args.ablations, "logs": {os.path.basename(d): {**info, "variants": [v.label for v in variants
                                                                  if log_dir(args, v) == d]}
                     for d, info in built.items()},
            "environment": (json.loads(envs.pop()) if len(envs) == 1 else
                            {"device": "mixed", "runs": sorted(envs)} if envs else environment()),
            "headline": headline, "missing": missing,
            "wall_seconds": time.perf_counter() - t0}
    payload = {"benchmark": "realdata", **meta, "rows": rows, "runs": results}
    md = markdown(rows, meta)
    write_results(args.results, "realdata", payload, md)
    plot(results, rows, args.early_stop_metric, os.path.join(args.results, "realdata.png"))
    print(md)
    print(f"wrote {args.results}/realdata.{{json,md,png}} in {meta['wall_seconds']:.0f} s")
    return payload


if __name__ == "__main__":
    main()
