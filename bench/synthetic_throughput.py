"""Synthetic data + NN feature logging throughput: generation, S_all selection and feature-log writing.

Streams synthetic users in chunks, runs NN selection once per example (``log_nn_features``), writes
the logged examples with ``FeatureLogWriter`` and reports:

* wall time and examples/s (target: >= 1,000,000 examples in < 10 minutes on a 2-core machine),
* peak resident memory of the process (target: < 4 GB),
* bytes per example: logged S_all features vs. the full sequences (de-duplicated per request, and
  broadcast per candidate, as a naive logger would store them).

Writes ``bench/results/synthetic_throughput.json`` and ``.png``. Run::

    python bench/synthetic_throughput.py --examples 1000000 --out /tmp/synthetic_log
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import time

import numpy as np

from _env import RESULTS, environment  # noqa: E402  (also puts the repo root on sys.path)
from transact_jax.config import FeatureConfig, SelectionConfig  # noqa: E402
from transact_jax.data.feature_log import FeatureLog, FeatureLogWriter  # noqa: E402
from transact_jax.data.features import log_nn_features  # noqa: E402
from transact_jax.data.synthetic import SyntheticConfig, iter_chunks  # noqa: E402

def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=1_000_000, help="stop after this many examples")
    ap.add_argument("--users-per-chunk", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/transact_synthetic_log", help="feature log directory")
    ap.add_argument("--keep", action="store_true", help="keep the written log")
    ap.add_argument("--results", default=RESULTS)
    args = ap.parse_args(argv)

    feat, sel = FeatureConfig(), SelectionConfig()
    cfg = SyntheticConfig(seed=args.seed, users_per_chunk=args.users_per_chunk)
    mean_cands = sum(cfg.candidates_per_request) / 2
    num_users = int(np.ceil(args.examples / mean_cands * 1.05)) + cfg.users_per_chunk
    if os.path.exists(args.out):
        shutil.rmtree(args.out)

    t0 = time.perf_counter()
    t_gen = t_log = t_write = 0.0
    n_examples = n_requests = 0
    bytes_dedup = bytes_broadcast = 0
    ll_tokens = 0
    progress = []
    with FeatureLogWriter(args.out, feat, sel) as writer:
        chunks = iter_chunks(cfg, feat, sel, num_users)
        while n_examples < args.examples:
            ta = time.perf_counter()
            chunk = next(chunks)
            tb = time.perf_counter()
            examples = log_nn_features(chunk.requests, feat, sel, validate=False)
            tc = time.perf_counter()
            writer.write(examples)
            td = time.perf_counter()
            t_gen, t_log, t_write = t_gen + tb - ta, t_log + tc - tb, t_write + td - tc
            req = chunk.requests
            n_examples += len(examples)
            n_requests += req.num_requests
            ll_tokens += int(req.ll.lengths.sum())
            bytes_dedup += req.sequence_nbytes()
            # broadcast bytes without materializing: every candidate carries its request's sequences
            per_req = sum(np.diff(s.offsets) * (s.tokens.embeddings.itemsize * feat.embedding_dim + 8
                                                + s.tokens.actions.itemsize + 2)
                          for _, s in req.sequences())
            bytes_broadcast += int(per_req[req.cand_to_req].sum())
            progress.append({"examples": n_examples, "seconds": time.perf_counter() - t0})
            print(f"{n_examples:>9,d} examples  {time.perf_counter() - t0:7.1f} s  "
                  f"peak RSS {peak_rss_bytes() / 2**30:.2f} GiB", flush=True)
    wall = time.perf_counter() - t0
    log = FeatureLog(args.out, feat, sel)
    logged_bpe = log.bytes_per_example()
    result = {
        "benchmark": "synthetic_throughput",
        "examples": n_examples,
        "requests": n_requests,
        "mean_ll_length": ll_tokens / n_requests,
        "wall_seconds": wall,
        "examples_per_second": n_examples / wall,
        "seconds": {"generate": t_gen, "nn_select_and_assemble": t_log, "write": t_write},
        "peak_rss_bytes": peak_rss_bytes(),
        "bytes_per_example": {
            "logged_s_all_on_disk": logged_bpe,
            "full_sequences_dedup_per_request": bytes_dedup / n_examples,
            "full_sequences_broadcast_per_candidate": bytes_broadcast / n_examples,
        },
        "targets": {"examples": 1_000_000, "wall_seconds": 600, "peak_rss_bytes": 4 * 2**30},
        "config": {"selection": sel.__dict__, "users_per_chunk": cfg.users_per_chunk, "seed": args.seed},
        "versions": environment(),
        "progress": progress,
    }
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "synthetic_throughput.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(result, os.path.join(args.results, "synthetic_throughput.png"))
    if not args.keep:
        shutil.rmtree(args.out)
    print(json.dumps({k: v for k, v in result.items() if k != "progress"}, indent=2))
    return result


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    xs = [p["seconds"] for p in result["progress"]]
    ys = [p["examples"] / 1e6 for p in result["progress"]]
    a.plot(xs, ys, marker=".")
    a.axvline(600, color="r", ls="--", label="10-minute budget")
    a.axhline(1.0, color="g", ls=":", label="1M examples")
    a.set_xlabel("seconds")
    a.set_ylabel("logged examples (millions)")
    a.set_title(f"{result['examples_per_second']:.0f} examples/s, peak RSS "
                f"{result['peak_rss_bytes'] / 2**30:.2f} GiB")
    a.legend()
    bpe = result["bytes_per_example"]
    labels = ["logged S_all", "full seqs\n(de-dup)", "full seqs\n(broadcast)"]
    vals = [bpe["logged_s_all_on_disk"], bpe["full_sequences_dedup_per_request"],
            bpe["full_sequences_broadcast_per_candidate"]]
    b.bar(labels, [v / 1024 for v in vals], color=["tab:green", "tab:orange", "tab:red"])
    b.set_yscale("log")
    b.set_ylabel("KiB per training example (log)")
    b.set_title("Storage per example")
    for i, v in enumerate(vals):
        b.text(i, v / 1024, f"{v / 1024:.1f}", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
