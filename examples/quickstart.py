"""Quickstart: synthetic lifelong-sequence data -> logged NN features -> train TransAct V2 -> HIT@3.

Runs from a checkout (installed or not) on a 2-core CPU in about a minute (measured 57 s and 56 s,
two runs in a row on the quiet 2-core CPU machine, jax 0.10.2; each run starts fresh)::

    python examples/quickstart.py                          # in a fresh temporary directory
    python examples/quickstart.py --workdir runs/quickstart   # keeps the data and checkpoints

1. Generates synthetic users with lifelong (S_LL), real-time (S_RT) and impression (S_imp) sequences
   and ranking requests ("chunks") with click/repin/hide labels, runs NN selection once per
   (request, candidate) and logs the 192-token S_all of each example to a feature log (paper §3.4.1).
2. Trains TransAct V2 (S_LL + S_RT + S_imp, Next Action Loss with impression negatives) with the jitted
   AdamW step, reading batches through the grain pipeline, with an orbax checkpoint in the workdir.
   The first step compiles the model (tens of seconds on a CPU).
3. Evaluates on held-out users: HIT@3 per head (paper §4.2.1), AUC and normalized entropy.

Without ``--workdir`` every run starts fresh and its temporary directory is removed at the end. With
``--workdir``, a run that finds the finished run of the same ``--steps`` there says so and evaluates
that run's final checkpoint; a larger ``--steps`` continues it. On a GPU, raise ``--train-users``,
``--steps`` and ``--batch-size`` (see examples/ablation.py for the paper's Table 2).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from transact_jax.data.generate import write_synthetic_logs  # noqa: E402
from transact_jax.data.synthetic import SyntheticConfig  # noqa: E402
from transact_jax.run.presets import preset  # noqa: E402
from transact_jax.train.loop import evaluate, train  # noqa: E402


def quickstart(args: argparse.Namespace, workdir: str) -> None:
    """Steps 1-3 of the module docstring, with data and checkpoints in ``workdir``."""
    base = preset(args.preset)
    cfg = dataclasses.replace(base, train=dataclasses.replace(
        base.train, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
        warmup_steps=max(args.steps // 10, 1), log_every=10, checkpoint_every=0))

    t0 = time.perf_counter()
    print(f"[1/3] logging NN features of {args.train_users:,} train and {args.eval_users:,} held-out "
          f"synthetic users", flush=True)
    train_log, eval_log = write_synthetic_logs(os.path.join(workdir, "data"), cfg.feature, cfg.selection,
                                               SyntheticConfig(seed=args.seed, users_per_chunk=250),
                                               args.train_users, args.eval_users)
    print(f"      {len(train_log):,} train and {len(eval_log):,} eval examples "
          f"({train_log.bytes_per_example():,.0f} bytes each) in {time.perf_counter() - t0:.0f} s")

    run_dir = os.path.join(workdir, "run")
    print(f"[2/3] training {cfg.name} for {cfg.train.steps} steps of {cfg.train.batch_size} "
          f"(checkpoint in {run_dir}/checkpoints; the first step compiles)", flush=True)
    result = train(cfg, train_log, workdir=run_dir)
    if result.metrics:
        print(f"      final train loss {result.metrics['loss']:.4f}")
    else:   # train() ran no step: the checkpoint already is at --steps
        print(f"      nothing to train: {run_dir} holds the finished {cfg.train.steps}-step run; "
              f"its numbers follow (pass another --workdir, or none, to train afresh)")

    t1 = time.perf_counter()
    print(f"[3/3] evaluating on the held-out users' {len(eval_log):,} candidates", flush=True)
    m = evaluate(result.config, result.model_def, result.state.params, eval_log)
    print(f"      {int(m['num_users']):,} users, {int(m['num_chunks']):,} chunks in "
          f"{time.perf_counter() - t1:.0f} s")
    print(f"{'head':8s} {'HIT@3':>7s} {'AUC':>7s} {'NE':>7s}")
    for h in cfg.feature.heads:
        print(f"{h:8s} {m[f'hit@3/{h}']:7.3f} {m[f'auc/{h}']:7.3f} {m[f'ne/{h}']:7.3f}")
    print("HIT@3/h = label-1 candidates among each chunk's top 3 by S = click + repin - hide, per user "
          "(higher is better, except hide).")
    print(f"total {time.perf_counter() - t0:.0f} s")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-users", type=int, default=600, help="synthetic users to train on")
    ap.add_argument("--eval-users", type=int, default=200, help="held-out synthetic users")
    ap.add_argument("--steps", type=int, default=120, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=64, help="examples per step")
    ap.add_argument("--preset", default="transact_v2",
                    help="the model (list: python -m transact_jax presets)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic world and of training")
    ap.add_argument("--workdir", help="keep data and checkpoints here (default: a temporary directory "
                                      "removed at the end)")
    args = ap.parse_args(argv)
    if args.workdir:
        quickstart(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="transact_quickstart_") as workdir:
            quickstart(args, workdir)


if __name__ == "__main__":
    main()
