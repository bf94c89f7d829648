"""Seeds of the random test data: fixed ones plus one drawn fresh for every test run."""
from __future__ import annotations

import numpy as np

FRESH_SEED = int(np.random.SeedSequence().entropy % (1 << 31))
"""Drawn once per test run; it appears in the test ids, so a failing case can be replayed."""


def seeds(*fixed: int) -> list:
    """``fixed`` plus :data:`FRESH_SEED`."""
    return [*fixed, FRESH_SEED]
