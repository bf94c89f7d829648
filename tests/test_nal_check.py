"""The Next Action Loss is never silently off: impression negatives missing from the data."""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest

from tests.helpers import random_requests
from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data.features import log_nn_features
from transact_jax.data.source import InMemoryExamples
from transact_jax.model.config import ModelConfig
from transact_jax.run.config import ExperimentConfig, TrainConfig
from transact_jax.run.presets import preset
from transact_jax.train.loop import train
from transact_jax.train.nal_check import (
    NALWithoutImpressionsWarning,
    impression_coverage,
    resolve_nal_negatives,
)

FEAT = FeatureConfig()
SEL = SelectionConfig(k_ll=8, r=8, k_rt=4, k_imp=4, num_nal_negatives=4, max_ll_len=60,
                      max_rt_len=20, max_imp_len=10)


def source(imp_lens, seed=0) -> InMemoryExamples:
    rng = np.random.default_rng(seed)
    u = len(imp_lens)
    req = random_requests(rng, rng.integers(0, 60, u), rng.integers(10, 20, u), imp_lens,
                          np.full(u, 4), FEAT)
    return InMemoryExamples(log_nn_features(req, FEAT, SEL), FEAT, SEL)


def config(**train) -> ExperimentConfig:
    return preset("transact_v2", ExperimentConfig(
        selection=SEL, model=ModelConfig(mlp_dims=(16,)),
        train=TrainConfig(**{"batch_size": 16, "steps": 2, "warmup_steps": 1, "log_every": 1, **train})))


NO_IMPRESSIONS = source([0] * 8)
SOME_IMPRESSIONS = source([0, 0, 0, 3, 0, 0, 0, 0])


def test_coverage_counts_examples_with_an_impression_negative():
    assert impression_coverage(NO_IMPRESSIONS) == 0.0
    assert impression_coverage(SOME_IMPRESSIONS) == pytest.approx(1 / 8)


def test_warns_by_default_and_trains_as_configured():
    cfg = config()
    with pytest.warns(NALWithoutImpressionsWarning, match="train.nal_negatives='impression'"):
        assert resolve_nal_negatives(cfg, NO_IMPRESSIONS) == cfg


def test_in_batch_fallback_is_explicit_and_said():
    cfg = config(nal_without_impressions="in_batch")
    with pytest.warns(NALWithoutImpressionsWarning, match="in-batch negatives instead"):
        got = resolve_nal_negatives(cfg, NO_IMPRESSIONS)
    assert got.train.nal_negatives == "in_batch"
    assert got == dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, nal_negatives="in_batch"))


def test_error_names_the_field():
    with pytest.raises(ValueError, match="train.nal_negatives"):
        resolve_nal_negatives(config(nal_without_impressions="error"), NO_IMPRESSIONS)


@pytest.mark.parametrize("cfg", [config(), config(nal_negatives="in_batch"), config(w_nal=0.0),
                                 config(nal_negatives="none")])
def test_silent_when_there_is_nothing_to_say(cfg):
    data = SOME_IMPRESSIONS if cfg.train.nal_negatives == "impression" and cfg.train.w_nal else NO_IMPRESSIONS
    with warnings.catch_warnings():
        warnings.simplefilter("error", NALWithoutImpressionsWarning)
        assert resolve_nal_negatives(cfg, data) == cfg


def test_bad_option_is_refused():
    with pytest.raises(ValueError, match="nal_without_impressions"):
        TrainConfig(nal_without_impressions="ignore")


def test_train_switches_and_the_loss_is_live():
    """Through train(): with the fallback the NAL has negatives (its pairs count and its loss is not
    zero), and the config that was trained is returned."""
    with pytest.warns(NALWithoutImpressionsWarning):
        result = train(config(nal_without_impressions="in_batch"), NO_IMPRESSIONS, progress=False)
    assert result.config.train.nal_negatives == "in_batch"
    assert result.metrics["nal_pairs"] > 0 and result.metrics["loss_nal"] > 0


def test_the_warning_is_true_the_loss_is_dead_without_the_fallback():
    with pytest.warns(NALWithoutImpressionsWarning):
        result = train(config(), NO_IMPRESSIONS, progress=False)
    assert result.config.train.nal_negatives == "impression"
    assert result.metrics["nal_pairs"] == 0 and result.metrics["loss_nal"] == 0
