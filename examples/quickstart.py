"""Quickstart: synthetic lifelong-sequence data -> logged NN features -> grain batches.

Runs on a laptop CPU in well under a minute::

    pip install -e . && python examples/quickstart.py

What it does (the data side of TransAct V2, paper §3.2 and §3.4.1):

1. generates synthetic users with lifelong (S_LL), real-time (S_RT) and impression (S_imp) sequences
   and ranking requests with click/repin/hide labels;
2. runs NN selection once per (request, candidate) pair and logs the 192-token S_all to disk;
3. reads the log back through the grain pipeline (shuffled, batched, prefetched, resumable) and
   prints what a training step would receive.

Model training and evaluation are added to this script with the model (issue 3).
"""
from __future__ import annotations

import argparse
import tempfile
import time

from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data.feature_log import FeatureLog, FeatureLogWriter
from transact_jax.data.features import log_nn_features
from transact_jax.data.pipeline import make_loader
from transact_jax.data.synthetic import SyntheticConfig, iter_chunks


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="feature log directory (default: a temp dir)")
    args = ap.parse_args(argv)

    feat, sel = FeatureConfig(), SelectionConfig()
    cfg = SyntheticConfig(seed=args.seed, users_per_chunk=500)
    out = args.out or tempfile.mkdtemp(prefix="transact_quickstart_")

    t0 = time.perf_counter()
    with FeatureLogWriter(out, feat, sel, overwrite=True) as writer:
        for chunk in iter_chunks(cfg, feat, sel, args.users):
            writer.write(log_nn_features(chunk.requests, feat, sel))
    log = FeatureLog(out, feat, sel)
    print(f"logged {len(log):,} examples from {args.users:,} users in {time.perf_counter() - t0:.1f} s "
          f"-> {out} ({log.bytes_per_example():,.0f} bytes/example)")

    loader = make_loader(log, batch_size=args.batch_size, seed=args.seed, num_epochs=1)
    it = iter(loader)
    batch = next(it)
    state = it.get_state()  # save this with a checkpoint to resume the input exactly
    print(f"batch: {len(batch)} examples, S_all {batch.s_all.embeddings.shape}, "
          f"labels {batch.labels.shape}, iterator state {state}")
    fill = {name: batch.s_all_mask[:, slots].mean() for name, slots in sel.segments}
    print("S_all fill per segment: " + ", ".join(f"{k} {v:.0%}" for k, v in fill.items()))
    print("label rate per head:    " + ", ".join(
        f"{h} {r:.3f}" for h, r in zip(feat.heads, batch.labels.mean(axis=0))))
    print(f"NAL targets per example: {batch.nal_target_mask.sum(axis=1).mean():.1f} of r={sel.r}; "
          f"impression negatives: {batch.nal_negative_mask.sum(axis=1).mean():.1f} of "
          f"{sel.num_nal_negatives}")
    n = sum(len(b) for b in it) + len(batch)
    print(f"one epoch: {n:,} examples in batches of {args.batch_size} (last partial batch dropped)")


if __name__ == "__main__":
    main()
