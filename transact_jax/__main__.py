"""Command line: ``python -m transact_jax {generate,train,evaluate,presets,data} ...``.

    python -m transact_jax generate --out data/ --train-users 20000 --eval-users 4000 [--config my.json]
    python -m transact_jax train --preset transact_v2 --data data/ --workdir runs/v2 --steps 3000
    python -m transact_jax train --config my_experiment.json --data data/ --workdir runs/mine
    python -m transact_jax evaluate --workdir runs/v2 --data data/
    python -m transact_jax data movielens --ratings ml-latest-small/ratings.csv --out data/
    python -m transact_jax data interactions --file interactions.csv --out data/

``--config`` takes a JSON file of :class:`~transact_jax.run.config.ExperimentConfig` (sections
``feature``, ``selection``, ``model``, ``train``; missing fields keep their defaults). A train run in
an existing workdir resumes from its latest checkpoint.

A user error (a bad argument, a missing file, an invalid config or feature log) prints one line,
``error: <message>``, on stderr and exits with status 2; ``--debug`` shows the full traceback instead.

Module-level imports stay light so that ``--help`` answers at once: each command imports what it
needs (jax, flax, the model) inside its handler.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Callable, List, Optional

USER_ERRORS = (
    # ValueError covers ConfigError (transact_jax.config_json), SchemaError and FeatureLogError
    # (transact_jax.data.schema, transact_jax.data.feature_log) and MetricInputError.
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    FloatingPointError,   # training diverged (non-finite loss): the step and checkpoint are named
)
"""Exceptions that mean the input (or the run it led to) was wrong, not the program: reported as one
line, exit status 2. Checkpoint corruption (``transact_jax.run.checkpoint.CheckpointCorruptError``)
counts too; it is matched in :func:`_is_user_error` so that ``--help`` need not import orbax."""


def _is_user_error(e: BaseException) -> bool:
    if isinstance(e, USER_ERRORS):
        return True
    checkpoint = sys.modules.get("transact_jax.run.checkpoint")   # loaded iff a command used it
    return checkpoint is not None and isinstance(e, checkpoint.CheckpointCorruptError)

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

DESCRIPTION = """\
TransAct V2 (lifelong user-action-sequence ranking, arXiv 2506.02267) in JAX/Flax.

Write feature logs (synthetic, or from a public interaction file), train a model on them and
evaluate its checkpoints. --config takes an ExperimentConfig JSON file (sections feature,
selection, model, train; missing fields keep their defaults). A train run in an existing
workdir resumes from its latest checkpoint."""

EPILOG = """\
examples:
  python -m transact_jax generate --out data/ --train-users 20000 --eval-users 4000
  python -m transact_jax train --preset transact_v2 --data data/ --workdir runs/v2 --steps 3000
  python -m transact_jax evaluate --workdir runs/v2 --data data/
  python -m transact_jax data movielens --ratings ml-latest-small/ratings.csv --out data/

Run 'python -m transact_jax COMMAND --help' for a command's options."""


class _Parser(argparse.ArgumentParser):
    """A usage error is one line on stderr too (exit status 2), pointing at ``--help``."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"error: {message} (see '{self.prog} --help')\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows ``(default: ...)`` where there is a literal default; required options, flags and
    options whose default is ``None`` (their help says what applies instead) show none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required or action.default is None or action.nargs == 0:
            return action.help or ""
        return super()._get_help_string(action)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` accepting integers >= ``minimum`` (anything else: a one-line usage error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"   # argparse names the type in its messages
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def one_line(error: BaseException) -> str:
    """``error``'s message on one line (its type name if it has none)."""
    return " ".join(str(error).splitlines()).strip() or type(error).__name__


def _add_log_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="JSON",
                   help="ExperimentConfig JSON file whose feature/selection configs the logs use "
                        "(default: the built-in ExperimentConfig)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command (no heavy imports)."""
    ap = _Parser(prog="python -m transact_jax", description=DESCRIPTION, epilog=EPILOG,
                 formatter_class=_HelpFormatter)
    ap.add_argument("--debug", action="store_true",
                    help="on an error, show the full Python traceback instead of one line")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=summary, formatter_class=_HelpFormatter)

    g = command("generate", "write synthetic train/ and eval/ feature logs of disjoint users")
    g.add_argument("--out", required=True, metavar="DIR",
                   help="directory the train/ and eval/ logs go to")
    g.add_argument("--train-users", type=positive_int, default=20_000, metavar="N",
                   help="synthetic users in train/")
    g.add_argument("--eval-users", type=positive_int, default=4_000, metavar="N",
                   help="synthetic users in eval/")
    g.add_argument("--seed", type=int, default=0, help="seed of the synthetic world")
    _add_log_config(g)
    g.add_argument("--num-items", type=positive_int, metavar="N",
                   help="items in the synthetic catalog (default: 200,000, the synthetic world's)")

    t = command("train", "train a model on a feature log (resumes in an existing workdir)")
    t.add_argument("--config", metavar="JSON",
                   help="ExperimentConfig JSON file of the whole experiment (default: --preset)")
    t.add_argument("--preset", default="transact_v2", metavar="NAME",
                   help="preset model, used without --config, on the feature/selection configs the "
                        "training log was written with (list them with the 'presets' command)")
    t.add_argument("--data", required=True, metavar="DIR",
                   help="directory with train/ (and, to evaluate after training, eval/) feature logs")
    t.add_argument("--workdir", required=True, metavar="DIR",
                   help="where config.json, metrics.jsonl and checkpoints/ go")
    t.add_argument("--steps", type=positive_int, metavar="N",
                   help="optimizer steps (default: the config's train.steps)")
    t.add_argument("--batch-size", type=positive_int, metavar="N",
                   help="examples per step (default: the config's train.batch_size)")
    t.add_argument("--seed", type=int, help="training seed (default: the config's train.seed)")
    t.add_argument("--no-resume", action="store_true",
                   help="start over, deleting the workdir's checkpoints, instead of resuming")

    e = command("evaluate", "evaluate the latest checkpoint of a workdir on a feature log")
    e.add_argument("--workdir", required=True, metavar="DIR", help="a training workdir")
    e.add_argument("--data", required=True, metavar="DIR", help="directory with an eval/ feature log")

    command("presets", "list the presets of the paper's Table 2")

    d = command("data", "feature logs (train/eval/test) from a public interaction file")
    d.add_argument("format", choices=("movielens", "interactions"),
                   help="movielens: ratings.dat or ratings.csv; interactions: the generic CSV")
    d.add_argument("--ratings", "--file", dest="path", required=True, metavar="FILE",
                   help="the input file")
    d.add_argument("--out", required=True, metavar="DIR",
                   help="directory the train/eval/test logs go to")
    _add_log_config(d)
    d.add_argument("--negatives", type=non_negative_int, metavar="N",
                   help="negatives per request (default: 20)")
    d.add_argument("--session-gap", type=positive_int, metavar="SECONDS",
                   help="seconds without an interaction that end a session (default: 1800)")
    d.add_argument("--seed", type=int, default=0,
                   help="seed of the recipe's random choices (negative sampling)")
    d.add_argument("--item-id", choices=("none", "full", "hashed"), default="none",
                   help="the candidate's item id as a categorical feature of the ranking tower "
                        "(full: training-period vocabulary; hashed: into the column's vocabulary)")
    return ap


def _experiment(path: Optional[str]):
    """``--config``'s ExperimentConfig, or the default one."""
    from transact_jax.run.config import ExperimentConfig
    return ExperimentConfig.from_json(path) if path else ExperimentConfig()


def _train_config(args: argparse.Namespace):
    """The train run's config: ``--config``, or the ``--preset`` on the feature and selection configs
    the training log was written with; then the ``--steps``/``--batch-size``/``--seed`` overrides."""
    if args.config:
        cfg = _experiment(args.config)
    else:
        from transact_jax.data.feature_log import FeatureLog
        from transact_jax.run.config import ExperimentConfig
        from transact_jax.run.presets import preset
        stored = FeatureLog(os.path.join(args.data, "train"))
        cfg = preset(args.preset, ExperimentConfig(feature=stored.feat, selection=stored.sel))
    overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size),
                                   ("seed", args.seed)) if v is not None}
    if overrides:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **overrides))
    return cfg


def _say(message: str) -> None:
    """A progress line on stderr (stdout keeps the command's result)."""
    print(message, file=sys.stderr, flush=True)


def _print_json(value) -> None:
    import json
    print(json.dumps(value, indent=2))


def _cmd_presets(args: argparse.Namespace) -> None:
    from transact_jax.run.presets import PRESET_NAMES, preset
    for name in PRESET_NAMES:
        c = preset(name)
        print(f"{name:22s} sequence={c.model.sequence_model:9s} "
              f"segments={','.join(c.model.segments) or '-':32s} nal={c.train.nal_negatives}")


def _cmd_generate(args: argparse.Namespace) -> None:
    from transact_jax.data.generate import write_synthetic_logs
    from transact_jax.data.synthetic import SyntheticConfig
    cfg = _experiment(args.config)
    syn = SyntheticConfig(seed=args.seed)
    if args.num_items is not None:
        syn = dataclasses.replace(syn, num_items=args.num_items)
    _say(f"generating {args.train_users:,} train and {args.eval_users:,} eval users into {args.out} ...")
    t0 = time.perf_counter()
    train_log, eval_log = write_synthetic_logs(args.out, cfg.feature, cfg.selection, syn,
                                               args.train_users, args.eval_users, progress=True)
    print(f"wrote {len(train_log):,} train and {len(eval_log):,} eval examples to {args.out} "
          f"in {time.perf_counter() - t0:.0f} s")


def _cmd_data(args: argparse.Namespace) -> None:
    from transact_jax.data.interactions import InteractionRecipe, feature_config_for
    from transact_jax.data.public import read_interactions_csv, read_movielens, write_feature_logs
    cfg = _experiment(args.config)
    recipe = InteractionRecipe(seed=args.seed, item_id_feature=args.item_id, **{k: v for k, v in (
        ("negatives_per_request", args.negatives), ("session_gap_s", args.session_gap))
        if v is not None})
    _say(f"reading {args.path} ...")
    data = (read_movielens if args.format == "movielens" else read_interactions_csv)(args.path)
    feat = cfg.feature if args.config else feature_config_for(data, recipe, cfg.feature)
    _say(f"writing feature logs to {args.out} ...")
    counts = write_feature_logs(data, args.out, feat, cfg.selection, recipe)
    print(f"wrote {counts} examples to {args.out}")


def _cmd_train(args: argparse.Namespace) -> None:
    from transact_jax.data.feature_log import FeatureLog
    from transact_jax.train.loop import train
    cfg = _train_config(args)
    train_log = FeatureLog(os.path.join(args.data, "train"), cfg.feature, cfg.selection)
    eval_dir = os.path.join(args.data, "eval")
    eval_log = FeatureLog(eval_dir, cfg.feature, cfg.selection) if os.path.isdir(eval_dir) else None
    _say(f"training {cfg.name} for {cfg.train.steps:,} steps of {cfg.train.batch_size} on "
         f"{len(train_log):,} examples in {args.workdir} (the first step compiles)")
    result = train(cfg, train_log, workdir=args.workdir, eval_log=eval_log, resume=not args.no_resume)
    if not result.metrics:
        _say(f"no steps to run: the run in {args.workdir} had already reached step {cfg.train.steps:,} "
             "(raise --steps to continue it, or --no-resume to start over)")
    _print_json({"train": result.metrics, "eval": result.eval_metrics})


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from transact_jax.data.feature_log import FeatureLog
    from transact_jax.model.builder import model_def
    from transact_jax.run.checkpoint import load_run
    from transact_jax.train.loop import evaluate
    run = load_run(args.workdir)
    cfg = run.config
    path = os.path.join(args.data, "eval")
    log = FeatureLog(path, cfg.feature, cfg.selection)
    _say(f"evaluating {cfg.name} from {args.workdir} on {len(log):,} examples of {path} ...")
    t0 = time.perf_counter()
    mdef = model_def(cfg.feature, cfg.selection, cfg.model)
    metrics = evaluate(cfg, mdef, run.params, log)
    _say(f"evaluated in {time.perf_counter() - t0:.0f} s")
    _print_json(metrics)


COMMANDS = {"generate": _cmd_generate, "train": _cmd_train, "evaluate": _cmd_evaluate,
            "presets": _cmd_presets, "data": _cmd_data}


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command; returns the exit status (0, or 2 for a user error)."""
    args = build_parser().parse_args(argv)   # a usage error exits here with status 2
    try:
        COMMANDS[args.command](args)
    except Exception as e:  # noqa: BLE001 - user errors are one line, the rest propagate
        if args.debug or not _is_user_error(e):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
