"""Shared test fixtures and the ``gpu`` marker.

Tests marked ``@pytest.mark.gpu`` need a CUDA device (the GPU machine); on a CPU-only machine they are
skipped with a clear reason, so ``pytest`` on CPU runs everything else.
"""
from __future__ import annotations

import gc
import os

# Tests check semantics at full float32 precision and reproducibly: on a GPU, no TF32 matmuls and
# deterministic reductions (scatter-add gradients otherwise use atomics). Speed is for bench/.
if "--xla_gpu_deterministic_ops" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_deterministic_ops=true").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop each test module's compiled programs after it. One pytest process compiles thousands of
    XLA programs and the CPU backend maps memory for every executable it keeps; kept all, they
    reach the kernel's per-process limit of memory maps (``vm.max_map_count``, 65,530 by default)
    and a later compilation crashes the process (a segmentation fault inside XLA)."""
    yield
    jax.clear_caches()
    gc.collect()


def pytest_configure(config):
    """Draw the run's fresh kernel-test seed once, before any worker of ``pytest -n`` starts: they
    inherit it, so they all collect the same test ids (``tests/kernels/seeds.py``)."""
    if not os.environ.get("TJ_FRESH_SEED"):
        import numpy as np
        os.environ["TJ_FRESH_SEED"] = str(int(np.random.SeedSequence().entropy % (1 << 31)))


def _has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a GPU (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
