"""Early stopping on a validation metric: the best parameters are kept, training stops after
``patience`` evaluations without improvement, and the best is the run's state at that step."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from tests.test_nal_check import SOME_IMPRESSIONS, config
from transact_jax.run.config import TrainConfig
from transact_jax.train import loop
from transact_jax.train.early_stopping import EarlyStopping


def scripted(values, metric="auc/click"):
    """An ``evaluate`` replacement returning ``values`` in turn (and recording the steps' params)."""
    calls = []

    def fake(cfg, mdef, params, log, *args, **kwargs):
        calls.append(jax.device_get(params))
        return {metric: values[len(calls) - 1], "ne/click": 1.0}
    return fake, calls


def test_stops_after_patience_and_returns_the_best(monkeypatch):
    fake, calls = scripted([0.50, 0.60, 0.58, 0.59, 0.70, 0.80])
    monkeypatch.setattr(loop, "evaluate", fake)
    cfg = config(steps=12, eval_every=2, early_stopping_metric="auc/click", early_stopping_patience=2)
    result = loop.train(cfg, SOME_IMPRESSIONS, eval_log=SOME_IMPRESSIONS, progress=False)
    assert len(calls) == 4                                  # evals at steps 2, 4, 6, 8: stop at 8
    assert int(result.state.step) == 8
    assert result.best_step == 4 and result.best_eval_metrics["auc/click"] == 0.60
    for a, b in zip(jax.tree_util.tree_leaves(result.best_params), jax.tree_util.tree_leaves(calls[1])):
        np.testing.assert_array_equal(a, b)
    assert result.eval_metrics["auc/click"] == 0.59         # the last evaluation, not repeated


def test_patience_zero_keeps_the_best_without_stopping(monkeypatch):
    calls = []

    def fake(cfg, mdef, params, log, *args, **kwargs):
        calls.append(step := len(calls) + 1)
        return {"auc/click": 0.5, "ne/click": 1.0 / step}
    monkeypatch.setattr(loop, "evaluate", fake)
    cfg = config(steps=8, eval_every=2, early_stopping_metric="ne/click")
    result = loop.train(cfg, SOME_IMPRESSIONS, eval_log=SOME_IMPRESSIONS, progress=False)
    assert int(result.state.step) == 8 and len(calls) == 4
    assert result.best_step == 8                            # lower NE is better


def test_configuration_errors_name_the_field():
    with pytest.raises(ValueError, match="early_stopping_metric"):
        TrainConfig(early_stopping_metric="auc/click")     # no eval_every
    with pytest.raises(ValueError, match="early_stopping_patience"):
        TrainConfig(early_stopping_patience=-1)
    cfg = config(eval_every=1, early_stopping_metric="auc/click")
    with pytest.raises(ValueError, match="needs an eval_log"):
        loop.train(cfg, SOME_IMPRESSIONS, progress=False)
    with pytest.raises(ValueError, match="not an evaluation metric"):
        EarlyStopping("auc/like").update(1, {"auc/click": 0.5}, {})
