"""Serve TransAct V2: load (or quickly train) a model and rank synthetic requests through the batcher.

    python examples/serve.py                          # trains a tiny model first
    python examples/serve.py --checkpoint runs/v2     # a training workdir (or its checkpoints/ dir)

Without ``--checkpoint`` it takes about 30 s on a 2-core CPU (measured 31 s on the quiet 2-core CPU
machine, jax 0.10.2), most of it training and compiling.

1. Without ``--checkpoint``: logs NN features for a few hundred synthetic users and trains
   TransAct V2 for a few dozen steps into ``--workdir``, afresh on every run (like
   examples/quickstart.py, smaller).
2. ``Ranker.from_checkpoint`` loads the parameters and the experiment config. On a GPU it uses the
   Pallas NN-search and SKUT kernels and pinned staging; elsewhere the XLA implementations.
3. Requests of new users (full S_LL, S_RT and S_imp plus candidates, as a ranking service receives
   them) are submitted one by one from a few client threads to a ``DynamicBatcher``, which batches
   them, runs NN selection and the model on the device, and resolves each request's future.
4. Prints each request's top candidates by the ranking score S = click + repin - hide (the weights
   of ``train.ranking_weights``) with their per-head probabilities, and where each candidate came
   from in the synthetic world (e.g. the user's short-term interests, or a topic they hide).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from transact_jax.data.synthetic import SOURCES, SyntheticConfig, iter_chunks  # noqa: E402


def train_tiny(workdir: str, users: int, steps: int, batch_size: int, seed: int) -> str:
    from transact_jax.data.generate import write_synthetic_logs
    from transact_jax.run.presets import preset
    from transact_jax.train.loop import train

    base = preset("transact_v2")
    cfg = dataclasses.replace(base, train=dataclasses.replace(
        base.train, steps=steps, batch_size=batch_size, seed=seed, warmup_steps=max(steps // 10, 1),
        log_every=10, checkpoint_every=0))
    t0 = time.perf_counter()
    # one held-out user: write_synthetic_logs wants a non-empty eval split, which serving ignores
    train_log, _ = write_synthetic_logs(os.path.join(workdir, "data"), cfg.feature, cfg.selection,
                                        SyntheticConfig(seed=seed, users_per_chunk=250), users, 1)
    run = os.path.join(workdir, "run")
    train(cfg, train_log, workdir=run, resume=False)
    print(f"trained {cfg.name} for {steps} steps on {len(train_log):,} examples in "
          f"{time.perf_counter() - t0:.0f} s -> {run}")
    return run


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="training workdir or checkpoint directory to serve")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "transact_serve"),
                    help="where the tiny model is trained without --checkpoint (started afresh)")
    ap.add_argument("--train-users", type=int, default=200, help="synthetic users of the tiny model")
    ap.add_argument("--steps", type=int, default=60, help="training steps of the tiny model")
    ap.add_argument("--batch-size", type=int, default=64, help="training batch of the tiny model")
    ap.add_argument("--requests", type=int, default=6, help="ranking requests to serve")
    ap.add_argument("--top", type=int, default=5, help="candidates printed per request")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from transact_jax.serving import DynamicBatcher, Ranker, split_requests

    path = args.checkpoint or train_tiny(args.workdir, args.train_users, args.steps,
                                                 args.batch_size, args.seed)
    ranker = Ranker.from_checkpoint(path)
    cfg = ranker.cfg
    print(f"serving {cfg.name}: NN search {ranker.config.nn_impl}, encoder {ranker.config.encoder_impl}, "
          f"staging {ranker.staging.mode}" + (f" ({ranker.staging.reason})" if ranker.staging.reason else ""))

    # new users of the same world (another seed stream), one ranking request each
    world = SyntheticConfig(seed=args.seed + 7, users_per_chunk=args.requests, user_id_offset=10**9)
    chunk = next(iter_chunks(world, cfg.feature, cfg.selection, args.requests, catalog_seed=args.seed))
    requests = split_requests(dataclasses.replace(chunk.requests, labels=None))
    sources = [chunk.candidate_source[chunk.requests.cand_to_req == u] for u in range(len(requests))]

    # compile the forward for the shape bucket this traffic lands in before taking load (steady
    # state then never compiles; a batch of another size may land in another bucket, compiled once)
    t0 = time.perf_counter()
    compiled = ranker.warmup_batches([requests])
    print(f"warm-up: {compiled} bucket(s) compiled in {time.perf_counter() - t0:.1f} s")

    futures = [None] * len(requests)
    with DynamicBatcher(ranker, max_batch_candidates=256, max_wait_s=0.005) as batcher:
        def client(rows):
            for u in rows:
                futures[u] = batcher.submit(requests[u])
        clients = [threading.Thread(target=client, args=(range(k, len(requests), 3),)) for k in range(3)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        results = [f.result(timeout=600) for f in futures]
    stats = batcher.stats()
    print(f"scored {stats['completed']} requests ({stats['candidates']} candidates) in "
          f"{stats['batches']} batches")

    weights = np.asarray(cfg.train.ranking_weights, np.float32)
    heads = cfg.feature.heads
    for u, (req, probs, fut) in enumerate(zip(requests, results, futures)):
        score = probs @ weights
        order = np.argsort(-score)[:args.top]
        print(f"\nrequest {u}: user {int(req.user_id[0])}, S_LL {int(req.ll.lengths[0])} / S_RT "
              f"{int(req.rt.lengths[0])} / S_imp {int(req.imp.lengths[0])} tokens, "
              f"{req.num_candidates} candidates, {fut.timing.e2e * 1e3:.1f} ms end to end")
        print(f"  {'item':>8s} {'score':>7s} " + " ".join(f"{h:>6s}" for h in heads) + "  source")
        for i in order:
            print(f"  {int(req.cand_item_id[i]):8d} {score[i]:7.3f} "
                  + " ".join(f"{p:6.3f}" for p in probs[i]) + f"  {SOURCES[sources[u][i]]}")


if __name__ == "__main__":
    main()
