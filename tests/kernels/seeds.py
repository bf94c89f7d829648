"""Seeds of the random test data: fixed ones plus one drawn fresh for every test run."""
from __future__ import annotations

import os

import numpy as np

SEED_ENV = "TJ_FRESH_SEED"
FRESH_SEED = int(os.environ.get(SEED_ENV) or np.random.SeedSequence().entropy % (1 << 31))
"""Drawn once per test run (``tests/conftest.py`` draws it into ``TJ_FRESH_SEED`` so that parallel
test workers share it); it appears in the test ids: ``TJ_FRESH_SEED=<id> pytest ...`` replays a
failing case."""


def seeds(*fixed: int) -> list:
    """``fixed`` plus :data:`FRESH_SEED`."""
    return [*fixed, FRESH_SEED]
