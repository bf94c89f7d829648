"""VISTA as a sequence-model family: it trains with its reconstruction loss, scores a request's
candidates from one summary per request like one candidate per sequence, and the serving engine
and whole-request training take that path."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.helpers import random_requests
from tests.test_mfalcon import FEAT, SEL, SHARED, assert_shared_history_scores
from tests.test_model import random_inputs
from transact_jax.config_json import ConfigError
from transact_jax.data.features import log_nn_features
from transact_jax.data.request_batches import RequestCapacity, pad_request_batch
from transact_jax.model.builder import build_model
from transact_jax.model.config import ModelConfig
from transact_jax.model.inputs import ModelInputs
from transact_jax.model.sequence.hstu import shared_history
from transact_jax.run.config import ExperimentConfig, TrainConfig
from transact_jax.run.presets import preset
from transact_jax.run.state import init_state
from transact_jax.serving import BucketConfig, Ladder, Ranker
from transact_jax.train.objective import Targets
from transact_jax.train.requests import make_request_predict
from transact_jax.train.step import make_predict, make_train_step


def vista_cfg(segments=SHARED, **model) -> ExperimentConfig:
    cfg = preset("vista", ExperimentConfig(
        selection=SEL, model=ModelConfig(mlp_dims=(16,), num_seeds=8, d_model=32, num_heads=2,
                                         num_layers=1, **model),
        train=TrainConfig(batch_size=6, warmup_steps=1, learning_rate=3e-3)))
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, segments=segments))


def test_trains_with_the_reconstruction_loss():
    cfg = vista_cfg(segments=("ll", "rt_recent", "rt_nn", "imp"))
    mdef, state, opt = init_state(cfg)
    step = make_train_step(mdef, cfg, opt)
    x = random_inputs(17)
    n, r = x.embeddings.shape[0], SEL.r
    labels = np.random.default_rng(0).integers(0, 2, (n, FEAT.num_heads)).astype(np.float32)
    targets = Targets(labels=labels, nal_target_mask=np.zeros((n, r), bool),
                      nal_negatives=np.zeros((n, r, FEAT.embedding_dim), np.int8),
                      nal_negative_mask=np.zeros((n, r), bool),
                      user_id=np.arange(n, dtype=np.int32), example_weight=np.ones(n, np.float32))
    losses, aux = [], []
    for _ in range(8):
        state, m = step(state, x, targets)
        assert bool(m["finite"]) and float(m["grad_norm"]) > 0
        losses.append(float(m["loss"]))
        aux.append(float(m["loss_aux"]))
    assert losses[-1] < losses[0] and aux[-1] < aux[0], (losses, aux)
    off = vista_cfg(recon_weight=0.0)
    out = build_model(off.feature, off.selection, off.model, 0)
    assert out[0].bind(out[1])(x).aux_loss is None
    with pytest.raises(ConfigError, match="summary_attention"):
        ModelConfig(sequence_model="vista", summary_attention="linear")


def test_one_summary_per_request_scores_like_one_candidate_per_sequence():
    cfg = vista_cfg()
    assert shared_history(cfg.selection, cfg.model) is None
    mdef, params = build_model(cfg.feature, cfg.selection, cfg.model, 5)
    assert_shared_history_scores(mdef.bind(params), np.array([2, 0, 0, 1, 0, 2, 0], np.int32))
    nn_cfg = vista_cfg(segments=("ll", "rt_recent", "rt_nn"))
    assert "rt_nn" in shared_history(nn_cfg.selection, nn_cfg.model)


def test_served_and_whole_request_scores_equal_the_logged_features():
    cfg = vista_cfg()
    mdef, params = build_model(cfg.feature, cfg.selection, cfg.model, 2)
    req = random_requests(np.random.default_rng(7), [350, 0, 17, 120], [40, 3, 0, 25], [50, 10, 0, 1],
                          [9, 3, 1, 6], FEAT)
    ex = log_nn_features(req, FEAT, SEL)
    want = np.asarray(make_predict(mdef)(params, ModelInputs.from_examples(ex)))
    buckets = BucketConfig(candidates=Ladder((64,)), requests=Ladder((8,)), ll_tokens=Ladder((2048,)),
                           rt_tokens=Ladder((512,)), imp_tokens=Ladder((512,)),
                           ll_width=Ladder((300,)), rt_width=Ladder((40,)), imp_width=Ladder((50,)))
    served = Ranker(cfg, params, nn_impl="xla", encoder_impl="xla", buckets=buckets).score(req)
    np.testing.assert_allclose(served, want, rtol=2e-5, atol=2e-6)
    truncated = req.truncate_recent(SEL)
    arrays = pad_request_batch(truncated, RequestCapacity.for_batch(SEL, 4, 5), FEAT)
    whole = np.asarray(make_request_predict(mdef, cfg, "xla")(params, arrays))[:req.num_candidates]
    np.testing.assert_allclose(whole, want, rtol=2e-5, atol=2e-6)
