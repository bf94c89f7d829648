"""Offline evaluation of ranking models (paper §4.2.1): HIT@K per head grouped by
(user, chunk), AUC and normalized entropy per head, relative lift for Table 2 style reports.

See :mod:`transact_jax.eval.metrics` for the definitions and notation.
"""
from transact_jax.eval.metrics import (
    NE_EPS,
    MetricAccumulator,
    MetricInputError,
    auc,
    evaluate,
    hit_at_k,
    lift_pct,
    normalized_entropy,
    ranking_score,
)

__all__ = [
    "NE_EPS",
    "MetricAccumulator",
    "MetricInputError",
    "auc",
    "evaluate",
    "hit_at_k",
    "lift_pct",
    "normalized_entropy",
    "ranking_score",
]
