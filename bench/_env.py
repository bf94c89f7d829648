"""Shared helpers of the benchmark scripts: environment record, timing statistics."""
from __future__ import annotations

import os
import platform
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Callable, Dict, List

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def environment() -> Dict[str, object]:
    """Device name and library versions, for every result file."""
    import jax
    dev = jax.devices()[0]
    out: Dict[str, object] = {
        "device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform,
        "device_count": jax.device_count(), "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "machine": platform.machine()}
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "torch", "triton"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


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
