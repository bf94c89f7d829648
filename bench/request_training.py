"""HSTU (or VISTA) trained per example vs on whole requests, at equal budget, on the synthetic world.

    python bench/request_training.py            # CPU: HSTU, 3 seeds, about 20 minutes
    python bench/request_training.py --family vista --num-seeds 32   # VISTA the same way
    python bench/request_training.py --quick    # smoke run

The same labelled requests of the synthetic world are written twice: as a feature log (one row per
candidate with its logged S_all, what ``train.loop.train`` reads) and as a request log (each
request's sequences once with all its candidates, what ``train.requests.train_on_requests``
reads). One configuration of the family (``--family``: "hstu", ``b_m`` candidates per encoder
pass, or "vista", one summary per request; VISTA's reconstruction loss is part of the per-example
path only) whose history does not depend on the candidate (S_LL by recency,
``ll_selection="recent"``, and S_RT[:r]) is trained both ways
for the same number of steps on the same number of candidates per step (per example: ``--batch``
candidates; whole requests: ``--batch / mean candidates per request`` requests), then both are
evaluated on the held-out users' feature log with the same metrics (HIT@3, AUC, NE per head; the
two paths compute the same function of the parameters, a test pins it). Per seed and mean/std over
seeds; training speed in candidates per second (steady state).

Writes ``bench/results/request_training.{json,png}`` (``request_training_vista.*`` for VISTA);
``headline``: ``family``, ``auc_click_per_example``,
``auc_click_whole_request`` (means), their stds, ``candidates_per_s_per_example``,
``candidates_per_s_whole_request``, ``speedup_whole_request``, ``seeds``.
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

from _env import RESULTS, environment, write_results  # noqa: E402  (puts the repo on sys.path)
from transact_jax.config import FeatureConfig, SelectionConfig  # noqa: E402
from transact_jax.data.feature_log import FeatureLog, FeatureLogWriter  # noqa: E402
from transact_jax.data.features import log_nn_features  # noqa: E402
from transact_jax.data.request_log import RequestLog, RequestLogWriter  # noqa: E402
from transact_jax.data.synthetic import SyntheticConfig, iter_chunks  # noqa: E402
from transact_jax.model.config import ModelConfig  # noqa: E402
from transact_jax.run.config import ExperimentConfig, TrainConfig  # noqa: E402
from transact_jax.run.presets import preset  # noqa: E402
from transact_jax.train.loop import evaluate, train  # noqa: E402
from transact_jax.train.requests import train_on_requests  # noqa: E402

METRICS = ("auc/click", "auc/repin", "hit@3/click", "hit@3/repin", "ne/click")


def write_logs(root: str, feat: FeatureConfig, sel: SelectionConfig, syn: SyntheticConfig, users: int,
               catalog_seed: int) -> Dict[str, object]:
    """The same users' requests as a feature log and a request log."""
    paths = {k: os.path.join(root, k) for k in ("features", "requests")}
    with FeatureLogWriter(paths["features"], feat, sel) as fw, RequestLogWriter(paths["requests"], feat, sel) as rw:
        for chunk in iter_chunks(syn, feat, sel, users, catalog_seed=catalog_seed):
            req = chunk.requests.truncate_recent(sel)
            rw.write(req)
            fw.write(log_nn_features(req, feat, sel, validate=False))
    return {"features": FeatureLog(paths["features"], feat, sel), "requests": RequestLog(paths["requests"], feat, sel)}


def config(sel: SelectionConfig, a, steps: int, batch: int, seed: int) -> ExperimentConfig:
    cfg = preset(a.family, ExperimentConfig(
        selection=sel, model=ModelConfig(d_model=a.d_model, num_heads=2, num_layers=a.layers,
                                         mlp_dims=(64,), b_m=a.b_m, num_seeds=a.num_seeds),
        train=TrainConfig(batch_size=batch, steps=steps, learning_rate=a.lr, warmup_steps=steps // 10,
                          eval_every=steps, log_every=max(1, steps // 10), seed=seed)))
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, segments=("ll", "rt_recent")))


def summary(runs: List[dict], key: str) -> Dict[str, float]:
    vals = np.array([r[key] for r in runs], np.float64)
    return {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
            "per_seed": vals.tolist()}


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(result["rows"])
    for i, m in enumerate(("auc/click", "auc/repin")):
        means = [result["rows"][n][m]["mean"] for n in names]
        stds = [result["rows"][n][m]["std"] for n in names]
        a.bar(np.arange(len(names)) + 0.4 * i, means, 0.4, yerr=stds, label=m)
    a.set_xticks(np.arange(len(names)) + 0.2, names)
    a.set_ylim(0.5, None)
    a.set_ylabel(f"eval AUC ({result['seeds']} seeds, mean +- std)")
    a.legend()
    b.bar(names, [result["rows"][n]["candidates_per_s"]["mean"] for n in names])
    b.set_ylabel("training candidates/s")
    fig.suptitle(f"{result['family']} per example vs whole requests, {result['steps']} steps, "
                 f"{result['candidates_per_step']} candidates/step ({result['environment']['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="hstu", choices=("hstu", "vista"))
    ap.add_argument("--num-seeds", type=int, default=32, help="VISTA's virtual seeds k")
    ap.add_argument("--train-users", type=int, default=1200)
    ap.add_argument("--eval-users", type=int, default=400)
    ap.add_argument("--ll-len", type=int, default=1000, help="S_LL length of every user")
    ap.add_argument("--k-ll", type=int, default=256, help="most recent S_LL tokens the model reads")
    ap.add_argument("--cands", type=int, default=16, help="candidates per request")
    ap.add_argument("--batch", type=int, default=256, help="candidates per step, both ways")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--b-m", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--results", default=RESULTS)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.train_users, a.eval_users, a.ll_len, a.k_ll, a.steps, a.seeds, a.batch = 96, 32, 200, 64, 6, 2, 64
        if a.results == RESULTS:
            a.results = tempfile.mkdtemp(prefix="request_training_")
    t0 = time.perf_counter()
    feat = FeatureConfig()
    sel = SelectionConfig(max_ll_len=a.ll_len, k_ll=a.k_ll, ll_selection="recent")
    syn = SyntheticConfig(users_per_chunk=200, fixed_ll_length=a.ll_len, candidates_per_request=(a.cands, a.cands))
    root = tempfile.mkdtemp(prefix="request_training_data_")
    train_logs = write_logs(os.path.join(root, "train"), feat, sel, syn, a.train_users, syn.seed)
    eval_logs = write_logs(os.path.join(root, "eval"), feat, sel,
                           dataclasses.replace(syn, seed=syn.seed + 1_000_003, user_id_offset=10**9),
                           a.eval_users, syn.seed)
    requests_per_step = max(1, a.batch // a.cands)
    runs: Dict[str, List[dict]] = {"per_example": [], "whole_request": []}
    for seed in range(a.seeds):
        cfg = config(sel, a, a.steps, a.batch, seed)
        res = train(cfg, train_logs["features"], eval_log=eval_logs["features"], progress=False)
        runs["per_example"].append({**{m: res.eval_metrics[m] for m in METRICS},
                                    "candidates_per_s": res.examples_per_second})
        cfg_r = config(sel, a, a.steps, requests_per_step, seed)
        rr = train_on_requests(cfg_r, train_logs["requests"], candidates_per_request=a.cands,
                               log_every=max(1, a.steps // 10))
        ev = evaluate(cfg, rr.model_def, rr.state.params, eval_logs["features"])
        runs["whole_request"].append({**{m: ev[m] for m in METRICS},
                                      "candidates_per_s": rr.candidates_per_second})
        print(f"seed {seed}: per example auc/click {runs['per_example'][-1]['auc/click']:.4f} "
              f"({res.examples_per_second:,.0f} cand/s); whole requests "
              f"{runs['whole_request'][-1]['auc/click']:.4f} ({rr.candidates_per_second:,.0f} cand/s)",
              flush=True)
    rows = {name: {k: summary(r, k) for k in METRICS + ("candidates_per_s",)} for name, r in runs.items()}
    pe, wr = rows["per_example"], rows["whole_request"]
    result = {
        "benchmark": "request_training", "family": a.family, "environment": environment(),
        "argv": vars(a),
        "steps": a.steps, "candidates_per_step": a.batch, "requests_per_step": requests_per_step,
        "seeds": a.seeds, "train_requests": len(train_logs["requests"]),
        "eval_examples": len(eval_logs["features"]), "rows": rows, "runs": runs,
        "headline": {
            "family": a.family, "auc_click_per_example": pe["auc/click"]["mean"],
            "auc_click_per_example_std": pe["auc/click"]["std"],
            "auc_click_whole_request": wr["auc/click"]["mean"],
            "auc_click_whole_request_std": wr["auc/click"]["std"],
            "candidates_per_s_per_example": pe["candidates_per_s"]["mean"],
            "candidates_per_s_whole_request": wr["candidates_per_s"]["mean"],
            "speedup_whole_request": wr["candidates_per_s"]["mean"] / pe["candidates_per_s"]["mean"],
            "seeds": a.seeds},
        "wall_s": time.perf_counter() - t0,
    }
    stem = "request_training" if a.family == "hstu" else f"request_training_{a.family}"
    write_results(a.results, stem, result)
    plot(result, os.path.join(a.results, f"{stem}.png"))
    print(json.dumps(result["headline"], indent=1))
    return result


if __name__ == "__main__":
    main()
