"""Quickstart: synthetic lifelong-sequence data -> logged NN features -> train TransAct V2 -> HIT@3.

Runs on a 2-core CPU in about five minutes::

    pip install -e . && python examples/quickstart.py

1. Generates synthetic users with lifelong (S_LL), real-time (S_RT) and impression (S_imp) sequences
   and ranking requests ("chunks") with click/repin/hide labels, runs NN selection once per
   (request, candidate) and logs the 192-token S_all of each example to a feature log (paper §3.4.1).
2. Trains TransAct V2 (S_LL + S_RT + S_imp, Next Action Loss with impression negatives) with the jitted
   AdamW step, reading batches through the grain pipeline, with orbax checkpoints in ``--workdir``.
3. Evaluates on held-out users: HIT@3 per head (paper §4.2.1), AUC and normalized entropy.

Run it again with the same ``--workdir`` and it resumes from the last checkpoint. On a GPU, raise
``--train-users``, ``--steps`` and ``--batch-size`` (see examples/ablation.py for the paper's Table 2).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

from transact_jax.data.generate import write_synthetic_logs
from transact_jax.data.synthetic import SyntheticConfig
from transact_jax.run.presets import preset
from transact_jax.train.loop import train


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-users", type=int, default=2000)
    ap.add_argument("--eval-users", type=int, default=400)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--preset", default="transact_v2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "transact_quickstart"))
    args = ap.parse_args(argv)

    base = preset(args.preset)
    cfg = dataclasses.replace(base, train=dataclasses.replace(
        base.train, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
        warmup_steps=max(args.steps // 10, 1), log_every=10, checkpoint_every=50))

    t0 = time.perf_counter()
    data_dir = os.path.join(args.workdir, "data")
    train_log, eval_log = write_synthetic_logs(data_dir, cfg.feature, cfg.selection,
                                               SyntheticConfig(seed=args.seed, users_per_chunk=500),
                                               args.train_users, args.eval_users)
    print(f"[1/3] logged {len(train_log):,} train and {len(eval_log):,} eval examples "
          f"({train_log.bytes_per_example():,.0f} bytes each) in {time.perf_counter() - t0:.0f} s")

    print(f"[2/3] training {cfg.name} for {cfg.train.steps} steps of {cfg.train.batch_size} "
          f"(checkpoints in {args.workdir}/run/checkpoints)")
    result = train(cfg, train_log, workdir=os.path.join(args.workdir, "run"), eval_log=eval_log)
    m = result.eval_metrics
    print(f"[3/3] held-out users: {int(m['num_users']):,} users, {int(m['num_examples']):,} candidates")
    print(f"{'head':8s} {'HIT@3':>7s} {'AUC':>7s} {'NE':>7s}")
    for h in cfg.feature.heads:
        print(f"{h:8s} {m[f'hit@3/{h}']:7.3f} {m[f'auc/{h}']:7.3f} {m[f'ne/{h}']:7.3f}")
    print("HIT@3/h = label-1 candidates among each chunk's top 3 by S = click + repin - hide, per user "
          "(higher is better, except hide).")
    print(f"final train loss {result.metrics.get('loss', float('nan')):.4f}; total "
          f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
