"""SASRec vs HSTU vs HSTU-large in the traditional sequential retrieval setting of "Actions Speak
Louder than Words" (§4.1.1, Table 4): leave-one-out on MovieLens, full shuffle, multi-epoch,
sampled softmax, HR@K and NDCG@K ranking the held-out item against the entire corpus.

Every model gets the same data, width, dropout, optimizer, negatives and budget (``--max-epochs``
with early stopping on validation NDCG@10, the best epoch's parameters scored on test) and the same
seeds; "HSTU" has SASRec's layers and heads, "HSTU-large" 4x the layers and 2x the heads (the
paper's rows). Mean ± sample std over seeds.

    python bench/hstu_retrieval.py                               # ml-latest-small, GPU-sized
    python bench/hstu_retrieval.py --quick                       # CPU smoke run, temp results
    python bench/hstu_retrieval.py --ratings ml-1m/ratings.dat   # the paper's Table 4 on ML-1M

Writes ``bench/results/hstu_retrieval.{json,md,png}`` (``--results``); the JSON's ``headline``
holds ``hr10_sasrec``, ``hr10_hstu``, ``hr10_hstu_large`` (and NDCG@10 of each), ``hr10_popularity``
(ranking by training counts, no model), ``seeds`` and ``dataset``; ``paper_table4`` the paper's
numbers. The data is read from the path given, never written into the
repository (``../shared/data/ml-latest-small/ratings.csv`` by default, when it exists).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from typing import Dict, List

import numpy as np

from _env import RESULTS, environment, write_results  # noqa: E402  (puts the repo root on sys.path)
from transact_jax.data.stochastic_length import METHODS as SL_METHODS  # noqa: E402
from transact_jax.retrieval.data import read_sequences  # noqa: E402
from transact_jax.retrieval.models import RetrievalModelConfig, scaled  # noqa: E402
from transact_jax.retrieval.train import RetrievalTrainConfig, fit, popularity_baseline  # noqa: E402

DEFAULT_RATINGS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                               "ml-latest-small", "ratings.csv")
MODELS = ("sasrec", "hstu", "hstu_large")
LABELS = {"sasrec": "SASRec", "hstu": "HSTU", "hstu_large": "HSTU-large"}
METRICS = ("hr@10", "hr@50", "hr@200", "ndcg@10", "ndcg@200")
PAPER_TABLE4 = {
    "source": "Actions Speak Louder than Words (ICML 2024), Table 4: multi-pass, full-shuffle; "
              "SASRec (2023) is the best SASRec recipe of Zhai et al. 2023a",
    "ML-1M": {"sasrec": {"hr@10": .2853, "hr@50": .5474, "hr@200": .7528, "ndcg@10": .1603,
                         "ndcg@200": .2498},
              "hstu": {"hr@10": .3097, "hr@50": .5754, "hr@200": .7716, "ndcg@10": .1720,
                       "ndcg@200": .2606},
              "hstu_large": {"hr@10": .3294, "hr@50": .5935, "hr@200": .7839, "ndcg@10": .1893,
                             "ndcg@200": .2771}},
    "ML-20M": {"sasrec": {"hr@10": .2906, "hr@50": .5499, "hr@200": .7655, "ndcg@10": .1621,
                          "ndcg@200": .2521},
               "hstu": {"hr@10": .3252, "hr@50": .5885, "hr@200": .7943, "ndcg@10": .1878,
                        "ndcg@200": .2774},
               "hstu_large": {"hr@10": .3567, "hr@50": .6149, "hr@200": .8076, "ndcg@10": .2106,
                              "ndcg@200": .2971}},
}


def model_configs(args, num_items: int) -> Dict[str, RetrievalModelConfig]:
    base = RetrievalModelConfig(
        model="sasrec", num_items=num_items, max_len=args.max_len, d_model=args.d_model,
        num_layers=args.layers, num_heads=args.heads, dropout=args.dropout, d_qk=args.d_qk,
        d_v=args.d_v, use_rab_pos=not args.no_rab, use_rab_time=not args.no_rab,
        attention_impl=args.attention_impl)
    hstu = dataclasses.replace(base, model="hstu")
    every = {"sasrec": base, "hstu": hstu, "hstu_large": scaled(hstu)}
    return {m: every[m] for m in args.models.split(",")}


def mean_std(values: List[float]) -> Dict[str, float]:
    a = np.asarray(values, np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else float("nan")}


def summarize(runs: Dict[str, List[dict]]) -> List[dict]:
    rows = []
    for name, rs in runs.items():
        row = {"model": name, "label": LABELS[name], "parameters": rs[0]["parameters"],
               "num_layers": rs[0]["num_layers"], "num_heads": rs[0]["num_heads"],
               "best_epoch": mean_std([r["best_epoch"] for r in rs]),
               "train_seconds": mean_std([r["train_seconds"] for r in rs])}
        for split in ("test", "valid"):
            for m in METRICS:
                row[f"{split}/{m}"] = mean_std([r[split][m] for r in rs])
        rows.append(row)
    return rows


def _pm(s: Dict[str, float], fmt: str = ".4f") -> str:
    std = "n/a" if not np.isfinite(s["std"]) else format(s["std"], fmt)
    return f"{format(s['mean'], fmt)} ± {std}"


def markdown(rows: List[dict], meta: dict) -> str:
    t = meta["train"]
    lines = [f"# HSTU vs SASRec, sequential retrieval on {meta['dataset']}", "",
             f"Leave-one-out ({meta['data']['users']} users, {meta['data']['items']} items, inputs "
             f"cut to the last {meta['max_len']} items), full shuffle, multi-epoch; sampled softmax "
             f"with {t['num_negatives']} {t['negatives']} negatives per sequence, temperature "
             f"{t['temperature']}; Adam lr {t['learning_rate']}, batch {t['batch_size']}, at most "
             f"{t['max_epochs']} epochs with early stopping on validation NDCG@10 (every "
             f"{t['eval_every']} epochs, patience {t['patience']}); d = {meta['d_model']}, dropout "
             f"{meta['dropout']}; test metrics rank the held-out item against all items (seen "
             f"items {'excluded' if t['exclude_seen'] else 'not excluded'}). Seeds "
             f"{meta['seed_values']} (mean ± sample std); device {meta['environment']['device']}.",
             "", "| model | layers x heads | params | HR@10 | HR@50 | HR@200 | NDCG@10 | NDCG@200 | "
             "best epoch | train s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['num_layers']} x {r['num_heads']} | {r['parameters']:,} | "
                     + " | ".join(_pm(r[f"test/{m}"]) for m in METRICS)
                     + f" | {r['best_epoch']['mean']:.0f} | {r['train_seconds']['mean']:.0f} |")
    pop = meta["popularity_baseline"]["test"]
    lines += ["", "Popularity (training counts, no model): " + ", ".join(
        f"{m.upper()} {pop[m]:.4f}" for m in METRICS) + "."]
    lines += ["", "Paper, Table 4 (ML-1M; 6,040 users): SASRec HR@10 .2853 / NDCG@10 .1603, HSTU "
              ".3097 / .1720, HSTU-large .3294 / .1893. Reproduce on ML-1M with "
              "`python bench/hstu_retrieval.py --ratings ml-1m/ratings.dat`."]
    return "\n".join(lines) + "\n"


def plot(runs: Dict[str, List[dict]], rows: List[dict], popularity: Dict[str, float],
         path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    for i, (name, rs) in enumerate(runs.items()):
        for k, r in enumerate(rs):
            a.plot(r["curve"]["epoch"], r["curve"]["valid_ndcg@10"], color=f"C{i}", alpha=0.7,
                   label=LABELS[name] if k == 0 else None)
    a.set(xlabel="epoch", ylabel="validation NDCG@10", title="learning curves (early stopping)")
    a.legend()
    x = np.arange(len(METRICS))
    width = 0.8 / max(len(rows), 1)
    for i, r in enumerate(rows):
        b.bar(x + i * width, [r[f"test/{m}"]["mean"] for m in METRICS], width,
              yerr=[np.nan_to_num(r[f"test/{m}"]["std"]) for m in METRICS], label=r["label"],
              color=f"C{i}")
    b.scatter(x + width * (len(rows) - 1) / 2, [popularity[m] for m in METRICS], marker="_", s=600,
              color="k", zorder=3, label="popularity")
    b.set_xticks(x + width * (len(rows) - 1) / 2, [m.upper() for m in METRICS])
    b.set(ylabel="test (mean ± std over seeds)", title="entire-corpus ranking, test split")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratings", default=DEFAULT_RATINGS,
                    help="MovieLens ratings.csv / ratings.dat, or a generic interactions CSV")
    ap.add_argument("--dataset", help="the data set's name in the results (default: the ratings "
                                      "file's folder name)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"some of {MODELS}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--max-len", type=int, default=200, help="input items kept per user (200: ML-1M "
                                                             "in the paper)")
    ap.add_argument("--d-model", type=int, default=50)
    ap.add_argument("--layers", type=int, default=2, help="SASRec and HSTU (HSTU-large: 4x)")
    ap.add_argument("--heads", type=int, default=1, help="SASRec and HSTU (HSTU-large: 2x)")
    ap.add_argument("--d-qk", type=int, default=32, help="HSTU per-head width of Q, K")
    ap.add_argument("--d-v", type=int, default=32, help="HSTU per-head width of V, U")
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--no-rab", action="store_true", help="HSTU without rab^{p,t}")
    ap.add_argument("--attention-impl", default="auto", help="HSTU attention op: auto | xla | "
                                                              "pallas_triton")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--max-epochs", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=2)
    ap.add_argument("--patience", type=int, default=15, help="evaluations without improvement")
    ap.add_argument("--negatives", type=int, default=128, help="sampled negatives per sequence")
    ap.add_argument("--sampler", default="uniform", choices=("uniform", "popularity"))
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--exclude-seen", action="store_true", help="drop seen items from the ranking")
    ap.add_argument("--stochastic-length-alpha", type=float, default=2.0,
                    help="Stochastic Length alpha in (1, 2] on the training sequences (2: off)")
    ap.add_argument("--stochastic-length-method", default="feature_weighted", choices=SL_METHODS,
                    help="Stochastic Length subsequence selection")
    ap.add_argument("--results", default=RESULTS)
    ap.add_argument("--quick", action="store_true", help="CPU smoke run (tiny budget, temp results)")
    args = ap.parse_args(argv)
    if args.quick:
        args.max_len, args.max_epochs, args.eval_every, args.seeds = 50, 3, 1, "0,1"
        args.attention_impl = "xla"
        if args.results == RESULTS:          # never overwrite committed full-size results
            args.results = tempfile.mkdtemp(prefix="hstu_retrieval_")
    if not os.path.exists(args.ratings):
        raise SystemExit(f"no ratings file at {args.ratings}: give --ratings PATH (the data is not "
                         f"part of the repository)")
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    data = read_sequences(args.ratings, args.max_len)
    tcfg = RetrievalTrainConfig(batch_size=args.batch_size, learning_rate=args.learning_rate,
                                weight_decay=args.weight_decay, max_epochs=args.max_epochs,
                                num_negatives=args.negatives, negatives=args.sampler,
                                temperature=args.temperature, eval_every=args.eval_every,
                                patience=args.patience, exclude_seen=args.exclude_seen,
                                stochastic_length_alpha=args.stochastic_length_alpha,
                                stochastic_length_method=args.stochastic_length_method)
    configs = model_configs(args, data.num_items)
    runs: Dict[str, List[dict]] = {name: [] for name in configs}
    for name, cfg in configs.items():
        for seed in seeds:
            r = fit(cfg, tcfg, data, seed, log=print)
            print(f"== {LABELS[name]} seed {seed}: test HR@10 {r['test']['hr@10']:.4f} NDCG@10 "
                  f"{r['test']['ndcg@10']:.4f} (best epoch {r['best_epoch']}, "
                  f"{r['train_seconds']:.0f} s)", flush=True)
            runs[name].append(r)
    rows = summarize(runs)
    dataset = args.dataset or os.path.basename(os.path.dirname(os.path.abspath(args.ratings)))
    by = {r["model"]: r for r in rows}
    headline = {"dataset": dataset, "seeds": len(seeds)}
    for name in MODELS:
        if name in by:
            headline[f"hr10_{name}"] = by[name]["test/hr@10"]["mean"]
            headline[f"ndcg10_{name}"] = by[name]["test/ndcg@10"]["mean"]
    popularity = popularity_baseline(data, tcfg.ks)
    headline["hr10_popularity"] = popularity["test"]["hr@10"]
    meta = {"dataset": dataset, "ratings_file": os.path.basename(args.ratings),
            "data": data.summary(), "max_len": args.max_len, "d_model": args.d_model,
            "dropout": args.dropout, "seeds": len(seeds), "seed_values": seeds,
            "quick": args.quick, "models": {n: dataclasses.asdict(c) for n, c in configs.items()},
            "train": dataclasses.asdict(tcfg), "environment": environment(), "headline": headline,
            "popularity_baseline": popularity,
            "paper_table4": PAPER_TABLE4, "wall_seconds": time.perf_counter() - t0}
    payload = {"benchmark": "hstu_retrieval", **meta, "rows": rows, "runs": runs}
    md = markdown(rows, meta)
    write_results(args.results, "hstu_retrieval", payload, md)
    plot(runs, rows, meta["popularity_baseline"]["test"],
         os.path.join(args.results, "hstu_retrieval.png"))
    print(md)
    print(f"wrote {args.results}/hstu_retrieval.{{json,md,png}} in {meta['wall_seconds']:.0f} s")
    return payload


if __name__ == "__main__":
    main()
