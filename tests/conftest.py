"""Shared test fixtures and the ``gpu`` marker.

Tests marked ``@pytest.mark.gpu`` need a CUDA device (the GPU machine); on a CPU-only machine they are
skipped with a clear reason, so ``pytest`` on CPU runs everything else.
"""
from __future__ import annotations

import jax
import pytest


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
