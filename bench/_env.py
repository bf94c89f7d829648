"""Shared helpers of the benchmark scripts: repo on sys.path, results folder, environment record,
timing statistics."""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, Dict, List

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from transact_jax.environment import environment  # noqa: E402,F401  (re-exported for bench scripts)

RESULTS = os.path.join(os.path.dirname(__file__), "results")
__all__ = ["RESULTS", "environment", "time_calls"]


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
