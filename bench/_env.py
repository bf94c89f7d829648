"""Shared helpers of the benchmark scripts: repo on sys.path, results folder, environment record,
timing statistics."""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, Dict, List, Optional

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from transact_jax.environment import environment  # noqa: E402,F401  (re-exported for bench scripts)

RESULTS = os.path.join(os.path.dirname(__file__), "results")
__all__ = ["RESULTS", "environment", "time_calls", "time_device_calls", "write_results"]


def write_results(directory: str, stem: str, payload: dict, markdown: Optional[str] = None) -> None:
    """``directory/stem.json`` (and ``stem.md`` when ``markdown`` is given)."""
    import json
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{stem}.json"), "w") as f:
        json.dump(payload, f, indent=1)
    if markdown is not None:
        with open(os.path.join(directory, f"{stem}.md"), "w") as f:
            f.write(markdown)


def rel_err(a, b) -> float:
    """Max abs difference of ``a`` from the reference ``b``, over ``b``'s max abs value (float32)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


def time_calls(fn: Callable[[], object], warmup: int = 3, repeats: int = 20) -> Dict[str, float]:
    """Median and spread (p10/p90, min) in seconds of ``fn()``, which must block until done."""
    for _ in range(warmup):
        fn()
    samples: List[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    a = np.asarray(samples)
    return {"median_s": float(np.median(a)), "p10_s": float(np.percentile(a, 10)),
            "p90_s": float(np.percentile(a, 90)), "min_s": float(a.min()), "repeats": repeats}


def time_device_calls(fn: Callable, inputs: List[tuple], repeats: int, calls: int = 10) -> Dict[str, float]:
    """Device throughput of ``fn`` in microseconds: each sample is ``calls`` back-to-back
    asynchronous calls cycling through ``inputs`` (argument tuples), synchronized once with
    ``jax.block_until_ready`` and divided by ``calls``; every input set is run once first (compile
    and warm-up excluded). Median, p10, p90 over ``repeats`` samples."""
    import jax
    for args in inputs:
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = None
        for c in range(calls):
            out = fn(*inputs[c % len(inputs)])
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / calls)
    return stats_us(samples)


def stats_us(samples: List[float]) -> Dict[str, float]:
    """Median / p10 / p90 in microseconds of samples in seconds."""
    a = np.asarray(samples) * 1e6
    return {"median_us": float(np.median(a)), "p10_us": float(np.percentile(a, 10)),
            "p90_us": float(np.percentile(a, 90)), "samples": len(a)}
