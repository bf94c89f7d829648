"""The Next Action Loss is never silently off: a check of the training data before training.

With ``train.nal_negatives="impression"`` (NAL_imp, the paper's default) the negatives of each
(user, t) pair are the user's logged impressions. Data without impressions (rating logs such as
MovieLens have none) leaves every pair without negatives, and a sampled softmax over the positive
alone is identically zero: the loss and its gradient vanish and training would quietly be the model
without NAL. :func:`resolve_nal_negatives` looks at the data first and, per
``train.nal_without_impressions``, warns, switches to in-batch negatives, or refuses.
"""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np

from transact_jax.data.source import ExampleSource
from transact_jax.run.config import ExperimentConfig

SAMPLE = 4096
"""Examples (evenly spaced over the source) read to decide whether the data has impressions: a
whole example is read (about 10 KB each from a feature log), so the check costs ~40 MB of reads
before training, and data where fewer than ~1 in 4096 examples carry impressions is reported as
having none (a warning, or the configured fallback)."""


class NALWithoutImpressionsWarning(UserWarning):
    """``nal_negatives="impression"`` on data that carries no impression negatives."""


def impression_coverage(source: ExampleSource, sample: int = SAMPLE) -> float:
    """Fraction of (up to ``sample`` evenly spaced) examples with at least one impression negative."""
    n = len(source)
    if n == 0:
        return 0.0
    rows = np.unique(np.linspace(0, n - 1, min(n, sample)).astype(np.int64))
    return float(source.read(rows).nal_negative_mask.any(axis=1).mean())


def resolve_nal_negatives(cfg: ExperimentConfig, source: ExampleSource) -> ExperimentConfig:
    """``cfg`` as training should run it on ``source`` (module docstring)."""
    tc = cfg.train
    if not (tc.uses_nal and tc.nal_negatives == "impression"):
        return cfg
    if impression_coverage(source) > 0:
        return cfg
    problem = ("train.nal_negatives='impression', but the training data has no impression "
               "negatives (nal_negative_mask is False in every sampled example): the Next Action "
               "Loss would have no negatives and contribute nothing")
    if tc.nal_without_impressions == "error":
        raise ValueError(f"{problem}. Set train.nal_negatives='in_batch' (or 'none'), or "
                         f"train.nal_without_impressions='in_batch' to switch automatically.")
    if tc.nal_without_impressions == "in_batch":
        warnings.warn(f"{problem}; training with in-batch negatives instead "
                      f"(train.nal_without_impressions='in_batch').",
                      NALWithoutImpressionsWarning, stacklevel=3)
        return dataclasses.replace(cfg, train=dataclasses.replace(tc, nal_negatives="in_batch"))
    warnings.warn(f"{problem}; training continues as configured. Set "
                  f"train.nal_without_impressions='in_batch' to use in-batch negatives instead, or "
                  f"'error' to refuse.", NALWithoutImpressionsWarning, stacklevel=3)
    return cfg
