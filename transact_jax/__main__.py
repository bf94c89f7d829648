"""Command line: ``python -m transact_jax {generate,train,evaluate,presets} ...``.

    python -m transact_jax generate --out data/ --train-users 20000 --eval-users 4000 [--config my.json]
    python -m transact_jax train --preset transact_v2 --data data/ --workdir runs/v2 --steps 3000
    python -m transact_jax train --config my_experiment.json --data data/ --workdir runs/mine
    python -m transact_jax evaluate --workdir runs/v2 --data data/
    python -m transact_jax data movielens --ratings ml-latest-small/ratings.csv --out data/
    python -m transact_jax data interactions --file interactions.csv --out data/

``--config`` takes a JSON file of :class:`~transact_jax.run.config.ExperimentConfig` (sections
``feature``, ``selection``, ``model``, ``train``; missing fields keep their defaults). A train run in
an existing workdir resumes from its latest checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from transact_jax.run.config import ExperimentConfig


def _config(args) -> ExperimentConfig:
    """The run's config: ``--config``, or the ``--preset`` on the feature and selection configs the
    training log was written with."""
    if args.config:
        cfg = ExperimentConfig.from_json(args.config)
    else:
        from transact_jax.data.feature_log import FeatureLog
        from transact_jax.run.presets import preset
        stored = FeatureLog(os.path.join(args.data, "train"))
        cfg = preset(args.preset, ExperimentConfig(feature=stored.feat, selection=stored.sel))
    overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size),
                                   ("seed", args.seed)) if v is not None}
    if overrides:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **overrides))
    return cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m transact_jax", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="write synthetic train/eval feature logs")
    g.add_argument("--out", required=True)
    g.add_argument("--train-users", type=int, default=20_000)
    g.add_argument("--eval-users", type=int, default=4_000)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--config", help="ExperimentConfig JSON whose feature/selection configs the logs use")
    g.add_argument("--num-items", type=int, help="items in the synthetic catalog (default 200,000)")
    t = sub.add_parser("train", help="train a model on a feature log")
    t.add_argument("--config", help="ExperimentConfig JSON")
    t.add_argument("--preset", default="transact_v2", help="a preset name if no --config")
    t.add_argument("--data", required=True, help="directory with train/ (and eval/) feature logs")
    t.add_argument("--workdir", required=True)
    t.add_argument("--steps", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--no-resume", action="store_true")
    e = sub.add_parser("evaluate", help="evaluate the latest checkpoint of a workdir")
    e.add_argument("--workdir", required=True)
    e.add_argument("--data", required=True)
    sub.add_parser("presets", help="list the Table 2 presets")
    d = sub.add_parser("data", help="feature logs (train/eval/test) from a public interaction file")
    d.add_argument("format", choices=("movielens", "interactions"),
                   help="movielens: ratings.dat or ratings.csv; interactions: the generic CSV")
    d.add_argument("--ratings", "--file", dest="path", required=True, help="the input file")
    d.add_argument("--out", required=True)
    d.add_argument("--config", help="ExperimentConfig JSON whose feature/selection configs the logs use")
    d.add_argument("--negatives", type=int, help="negatives per request (default 20)")
    d.add_argument("--session-gap", type=int, help="seconds without an interaction that end a "
                                                   "session (default 1800)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--item-id", choices=("none", "full", "hashed"), default="none",
                   help="the candidate's item id as a categorical feature of the ranking tower "
                        "(full: training-period vocabulary; hashed: into the column's vocabulary)")
    args = ap.parse_args(argv)

    from transact_jax.data.feature_log import FeatureLog
    if args.command == "presets":
        from transact_jax.run.presets import PRESET_NAMES, preset
        for name in PRESET_NAMES:
            c = preset(name)
            print(f"{name:22s} sequence={c.model.sequence_model:9s} segments={','.join(c.model.segments) or '-':32s} "
                  f"nal={c.train.nal_negatives}")
        return 0
    if args.command == "generate":
        from transact_jax.data.generate import write_synthetic_logs
        from transact_jax.data.synthetic import SyntheticConfig
        cfg = ExperimentConfig.from_json(args.config) if args.config else ExperimentConfig()
        syn = SyntheticConfig(seed=args.seed)
        if args.num_items is not None:
            syn = dataclasses.replace(syn, num_items=args.num_items)
        train_log, eval_log = write_synthetic_logs(args.out, cfg.feature, cfg.selection, syn,
                                                   args.train_users, args.eval_users)
        print(f"wrote {len(train_log):,} train and {len(eval_log):,} eval examples to {args.out}")
        return 0
    if args.command == "data":
        from transact_jax.data.interactions import InteractionRecipe, feature_config_for
        from transact_jax.data.public import read_interactions_csv, read_movielens, write_feature_logs
        cfg = ExperimentConfig.from_json(args.config) if args.config else ExperimentConfig()
        recipe = InteractionRecipe(seed=args.seed, item_id_feature=args.item_id, **{k: v for k, v in (
            ("negatives_per_request", args.negatives), ("session_gap_s", args.session_gap))
            if v is not None})
        data = (read_movielens if args.format == "movielens" else read_interactions_csv)(args.path)
        feat = cfg.feature if args.config else feature_config_for(data, recipe, cfg.feature)
        counts = write_feature_logs(data, args.out, feat, cfg.selection, recipe)
        print(f"wrote {counts} examples to {args.out}")
        return 0
    if args.command == "train":
        from transact_jax.train.loop import train
        cfg = _config(args)
        train_log = FeatureLog(os.path.join(args.data, "train"), cfg.feature, cfg.selection)
        eval_dir = os.path.join(args.data, "eval")
        eval_log = FeatureLog(eval_dir, cfg.feature, cfg.selection) if os.path.isdir(eval_dir) else None
        result = train(cfg, train_log, workdir=args.workdir, eval_log=eval_log, resume=not args.no_resume)
        print(json.dumps({"train": result.metrics, "eval": result.eval_metrics}, indent=2))
        return 0
    if args.command == "evaluate":
        from transact_jax.model.builder import model_def
        from transact_jax.run.checkpoint import load_run
        from transact_jax.train.loop import evaluate
        run = load_run(args.workdir)
        cfg = run.config
        log = FeatureLog(os.path.join(args.data, "eval"), cfg.feature, cfg.selection)
        mdef = model_def(cfg.feature, cfg.selection, cfg.model)
        print(json.dumps(evaluate(cfg, mdef, run.params, log), indent=2))
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
