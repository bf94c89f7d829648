"""M-FALCON in the ranking model and the serving engine ("Actions Speak Louder than Words" §3.4):
b_m candidates of a request per HSTU encoder pass after one copy of the request's history give the
scores of one candidate per sequence, in the model and end to end through the Ranker."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import random_requests
from tests.test_model import FEAT, random_inputs
from transact_jax.config import SelectionConfig
from transact_jax.data.features import log_nn_features
from transact_jax.model.builder import build_model
from transact_jax.model.config import ModelConfig
from transact_jax.model.inputs import ModelInputs
from transact_jax.model.sequence.hstu import pack_requests, shared_history
from transact_jax.run.config import ExperimentConfig
from transact_jax.run.presets import preset
from transact_jax.serving import BucketConfig, Ladder, Ranker
from transact_jax.train.step import make_predict

SHARED = ("ll", "rt_recent")     # segments that do not depend on the candidate
SEL = SelectionConfig(k_ll=16, r=8, k_rt=4, k_imp=8, max_ll_len=300, max_rt_len=40, max_imp_len=50,
                      num_nal_negatives=8, ll_selection="recent")


def mfalcon_model(b_m: int = 3, sel: SelectionConfig = SEL):
    model = ModelConfig(sequence_model="hstu", segments=SHARED, num_layers=2, mlp_dims=(16,),
                        b_m=b_m)
    return build_model(FEAT, sel, model, 5)


def test_pack_requests_layout():
    hist = jnp.arange(2 * 4)[:, None].reshape(2, 4, 1).astype(jnp.float32) + 1     # 1..8
    mask = jnp.array([[True, False, True, True], [False, True, False, False]])
    targets = jnp.arange(5)[:, None].astype(jnp.float32) + 100
    c2r = jnp.array([1, 0, 0, 1, 0], jnp.int32)                 # interleaved requests
    tokens, offsets, num_targets, rows = pack_requests(hist, mask, targets, c2r, b_m=2)
    # passes: request 0 (cands 1, 2), request 0 (cand 4), request 1 (cands 0, 3); P = 2 + 3 = 5
    np.testing.assert_array_equal(num_targets, [2, 1, 2, 0, 0])
    np.testing.assert_array_equal(offsets, [0, 5, 9, 12, 12, 12])
    flat = np.asarray(tokens[:, 0])
    np.testing.assert_array_equal(flat[:12], [1, 3, 4, 101, 102, 1, 3, 4, 104, 6, 100, 103])
    assert not flat[12:].any()
    np.testing.assert_array_equal(flat[np.asarray(rows)], np.arange(5) + 100)


def assert_shared_history_scores(model, c2r: np.ndarray) -> None:
    """``model.mfalcon_logits`` on random histories of ``max(c2r) + 1`` requests and candidates
    ``c2r`` equals ``model(x)`` on each candidate's own copy of its request's history."""
    req_inputs = random_inputs(seed=11, n=int(c2r.max()) + 1)
    cands = random_inputs(seed=12, n=len(c2r))
    own = ModelInputs(**{f.name: (getattr(req_inputs, f.name)[c2r]
                                  if f.name in ("embeddings", "actions", "surfaces", "mask")
                                  else getattr(cands, f.name))
                         for f in dataclasses.fields(ModelInputs) if f.name != "token_age_hours"})
    want = np.asarray(jax.jit(lambda x: model(x).logits)(own))
    got = np.asarray(jax.jit(model.mfalcon_logits)(req_inputs, cands, jnp.asarray(c2r)))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_mfalcon_logits_equal_one_candidate_per_sequence():
    mdef, params = mfalcon_model(b_m=3)
    # 3 requests; 5 candidates of request 0: 2 passes
    assert_shared_history_scores(mdef.bind(params), np.array([2, 0, 0, 1, 0, 2, 0, 0], np.int32))


def test_shared_history_rules():
    ok = ModelConfig(sequence_model="hstu", segments=SHARED, b_m=4)
    assert shared_history(SEL, ok) is None
    reasons = [shared_history(SEL, dataclasses.replace(ok, b_m=1)),
               shared_history(SEL, dataclasses.replace(ok, segments=("rt_recent", "rt_nn"))),
               shared_history(SEL, dataclasses.replace(ok, segments=("rt_recent", "imp"))),
               shared_history(dataclasses.replace(SEL, ll_selection="nn"), ok),
               shared_history(SEL, dataclasses.replace(ok, token_features=("similarity",))),
               shared_history(SEL, ModelConfig(b_m=4))]
    assert all(reasons) and "b_m" in reasons[0] and "rt_nn" in reasons[1] and "imp" in reasons[2]
    assert "ll" in reasons[3]


@pytest.mark.parametrize("b_m", [1, 4])
def test_ranker_serves_mfalcon_scores_equal_logged_features(b_m):
    """The Ranker's dedup forward takes the M-FALCON path (b_m = 4) or not (b_m = 1); both give the
    training path's scores on the logged features of the same requests."""
    cfg = preset("hstu", ExperimentConfig(selection=SEL, model=ModelConfig(mlp_dims=(16,), num_layers=1,
                                                                          b_m=b_m)))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, segments=SHARED))
    assert (shared_history(cfg.selection, cfg.model) is None) == (b_m > 1)
    mdef, params = build_model(cfg.feature, cfg.selection, cfg.model, 2)
    buckets = BucketConfig(candidates=Ladder((64,)), requests=Ladder((8,)), ll_tokens=Ladder((2048,)),
                           rt_tokens=Ladder((512,)), imp_tokens=Ladder((512,)),
                           ll_width=Ladder((300,)), rt_width=Ladder((40,)), imp_width=Ladder((50,)))
    req = random_requests(np.random.default_rng(7), [350, 0, 17, 120], [40, 3, 0, 25], [50, 10, 0, 1],
                          [9, 3, 1, 6], FEAT)
    got = Ranker(cfg, params, nn_impl="xla", encoder_impl="xla", buckets=buckets).score(req)
    ex = log_nn_features(req, FEAT, SEL)
    want = np.asarray(make_predict(mdef)(params, ModelInputs.from_examples(ex)))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
