"""Training on whole requests (HSTU with M-FALCON): fixed-shape request batches, scores equal to the
logged-feature path, the loss goes down on a synthetic request log, and wrong inputs are refused
naming the problem."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.helpers import random_requests
from tests.test_mfalcon import FEAT, SEL, SHARED
from transact_jax.data.features import log_nn_features
from transact_jax.data.request_batches import RequestCapacity, pad_request_batch
from transact_jax.data.request_log import write_synthetic_request_log
from transact_jax.data.schema import SchemaError
from transact_jax.data.synthetic import SyntheticConfig
from transact_jax.model.builder import build_model
from transact_jax.model.config import ModelConfig
from transact_jax.model.inputs import ModelInputs
from transact_jax.run.config import ExperimentConfig, TrainConfig
from transact_jax.run.presets import preset
from transact_jax.train.requests import make_request_predict, train_on_requests
from transact_jax.train.step import make_predict


def hstu_cfg(**train) -> ExperimentConfig:
    cfg = preset("hstu", ExperimentConfig(
        selection=SEL, model=ModelConfig(mlp_dims=(16,), num_layers=1, b_m=4, d_model=32, num_heads=2),
        train=TrainConfig(**train) if train else TrainConfig()))
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, segments=SHARED))


def test_padded_request_batches_score_like_the_logged_features():
    cfg = hstu_cfg()
    mdef, params = build_model(cfg.feature, cfg.selection, cfg.model, 2)
    req = random_requests(np.random.default_rng(5), [300, 0, 17, 120], [40, 3, 0, 25], [50, 10, 0, 1],
                          [9, 3, 1, 6], FEAT)
    cap = RequestCapacity.for_batch(SEL, requests=6, candidates_per_request=5)   # room to pad
    arrays = pad_request_batch(req, cap, FEAT)
    assert arrays["weight"].sum() == req.num_candidates and arrays["cand_to_req"][-1] == 4
    got = np.asarray(make_request_predict(mdef, cfg, "xla")(params, arrays))[:req.num_candidates]
    want = np.asarray(make_predict(mdef)(params, ModelInputs.from_examples(
        log_nn_features(req, FEAT, SEL))))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    with pytest.raises(SchemaError, match="candidates: 19 exceed the batch capacity 8"):
        pad_request_batch(req, RequestCapacity.for_batch(SEL, 4, 2), FEAT)
    with pytest.raises(SchemaError, match="labels"):
        pad_request_batch(dataclasses.replace(req, labels=None), cap, FEAT)


def test_training_on_a_request_log(tmp_path):
    syn = SyntheticConfig(num_items=2000, users_per_chunk=32, candidates_per_request=(4, 8))
    train_log = write_synthetic_request_log(tmp_path / "train", FEAT, SEL, syn, 64)
    eval_log = write_synthetic_request_log(tmp_path / "eval", FEAT, SEL,
                                           dataclasses.replace(syn, seed=syn.seed + 7), 32,
                                           catalog_seed=syn.seed)
    cfg = hstu_cfg(batch_size=8, steps=40, learning_rate=3e-3, warmup_steps=4)
    res = train_on_requests(cfg, train_log, candidates_per_request=8, eval_source=eval_log,
                            nn_impl="xla", log_every=5)
    losses = [m["loss"] for m in res.metrics]
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
    assert set(res.evaluation) == {f"auc_{h}" for h in FEAT.heads}
    assert res.candidates_per_second > 0
    with pytest.raises(ValueError, match="ll_selection='nn'"):
        train_on_requests(dataclasses.replace(cfg, selection=dataclasses.replace(SEL, ll_selection="nn")),
                          train_log, candidates_per_request=8)
