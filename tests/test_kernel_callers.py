"""The kernels as ``transact_jax`` calls them: the model's encoder weights against the reference
semantics, the model with the fused encoder against the XLA one, checkpoint compatibility across
encoder implementations, and the on-device S_all assembly against the logged-feature path.

(The kernels' own tests, which import nothing from ``transact_jax``, are in ``tests/kernels``.)
"""
from __future__ import annotations

import dataclasses
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels.skut.reference import EncoderWeights
from tests.helpers import random_requests
from tests.kernels.test_skut_reference import FLOAT64_CASES, check_matches_float64_loops
from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data.device_features import DeviceSequences, select_s_all_device
from transact_jax.data.features import select_s_all
from transact_jax.data.schema import broadcast
from transact_jax.model.builder import build_model
from transact_jax.model.config import ModelConfig
from transact_jax.model.layers import TransformerEncoder
from transact_jax.run.checkpoint import check_compatible
from transact_jax.run.config import ExperimentConfig
from transact_jax.run.presets import preset


def random_weights(seed: int, n=2, d=64, f=32) -> EncoderWeights:
    return TransformerEncoder(ModelConfig(num_layers=n, d_model=d, ff_dim=f), rngs=nnx.Rngs(seed)).weights()


@pytest.mark.parametrize("length,num_heads,causal", FLOAT64_CASES)
def test_model_encoder_weights_match_float64_loops(length, num_heads, causal):
    """The model's encoder weights (its initialisation) through the reference, against the float64
    loops of the torch layer semantics."""
    check_matches_float64_loops(random_weights(length), length, num_heads, causal)


def test_model_encoder_impl_pallas_triton_matches_xla():
    from tests.test_model import SEL, random_inputs as model_inputs

    outs = {}
    for impl in ("xla", "pallas_triton"):
        cfg = preset("transact_v2", ExperimentConfig(
            selection=SEL, model=ModelConfig(mlp_dims=(32,), encoder_impl=impl)))
        mdef, params = build_model(cfg.feature, cfg.selection, cfg.model, 3)
        outs[impl] = mdef.bind(params)(model_inputs(seed=4))
    for field in ("logits", "nal_user"):
        np.testing.assert_allclose(np.asarray(getattr(outs["pallas_triton"], field)),
                                   np.asarray(getattr(outs["xla"], field)), rtol=1e-4, atol=1e-5)


def test_checkpoint_written_with_xla_encoder_loads_with_pallas_triton():
    saved = ExperimentConfig(model=ModelConfig(encoder_impl="xla")).to_dict()
    check_compatible(saved, ExperimentConfig(model=ModelConfig(encoder_impl="pallas_triton")))
    with pytest.raises(ValueError, match="model.num_layers"):
        check_compatible(saved, ExperimentConfig(model=ModelConfig(num_layers=3)))
    # a config stored before the impl names were unified still loads
    old = dict(saved, model=dict(saved["model"], encoder_impl="skut"))
    assert ExperimentConfig.from_dict(old).model.encoder_impl == "pallas_triton"


FEAT = FeatureConfig()
SEL = SelectionConfig(k_ll=16, r=8, k_rt=4, k_imp=8, max_ll_len=300, max_rt_len=40, max_imp_len=50)


def _requests():
    rng = np.random.default_rng(8)
    return random_requests(rng, [300, 0, 17, 120], [40, 3, 0, 25], [50, 10, 0, 1], [5, 3, 2, 7],
                           FEAT)


def _assert_same_s_all(dev, host):
    for field in ("embeddings", "actions", "surfaces"):
        np.testing.assert_array_equal(np.asarray(getattr(dev, field)), getattr(host.tokens, field),
                                      err_msg=field)
    np.testing.assert_array_equal(np.asarray(dev.mask), host.mask)
    np.testing.assert_array_equal(np.asarray(dev.source_index), host.source_index)


@pytest.mark.parametrize("impl", ["pallas_triton", "xla"])
def test_device_s_all_equals_logged_features(impl):
    """De-duplicated layout: one jagged copy of each request's sequences."""
    req = _requests()
    dev = select_s_all_device(*(DeviceSequences.from_jagged(s) for s in (req.ll, req.rt, req.imp)),
                              jnp.asarray(req.cand_embedding), jnp.asarray(req.cand_to_req),
                              feat=FEAT, sel=SEL, impl=impl)
    _assert_same_s_all(dev, select_s_all(req, FEAT, SEL))


@pytest.mark.parametrize("impl", ["pallas_triton", "xla"])
def test_broadcast_s_all_equals_logged_features(impl):
    """Broadcast layout (the serving baseline): every candidate carries its own dense copy of its
    request's sequences, ``cand_to_req=None``; the same slots come out."""
    req = _requests()
    bc = broadcast(req)

    def dense(f):
        seqs = getattr(bc, f)
        return DeviceSequences(jnp.asarray(seqs.tokens.embeddings), jnp.asarray(seqs.tokens.actions),
                               jnp.asarray(seqs.tokens.surfaces), jnp.asarray(seqs.lengths, jnp.int32))

    dev = select_s_all_device(dense("ll"), dense("rt"), dense("imp"),
                              jnp.asarray(req.cand_embedding), None, feat=FEAT, sel=SEL, impl=impl)
    _assert_same_s_all(dev, select_s_all(req, FEAT, SEL))


@pytest.mark.parametrize("impl", ["xla"])     # the kernel path of S_all: the two tests above
@pytest.mark.parametrize("mode", ["recent", "random"])
def test_unranked_ll_selections_are_the_same_on_host_and_device(impl, mode):
    """The ``ll_selection`` ablations: the ll segment holds the K_LL most recent (``recent``) or one
    drawn token per equal stratum of S_LL (``random``), chronological, padding last, the same for
    every candidate of a request, on every path."""
    sel = dataclasses.replace(SEL, ll_selection=mode)
    req = _requests()
    host = select_s_all(req, FEAT, sel)
    ll = host.source_index[:, sel.segment("ll")]
    k = sel.k_ll
    for n, u in enumerate(req.cand_to_req):
        length = int(req.ll.lengths[u])
        if mode == "recent" or length <= k:
            want = np.arange(max(length - k, 0), length)
            np.testing.assert_array_equal(ll[n, :len(want)], want)
            assert (ll[n, len(want):] == -1).all()
        else:   # one position inside each stratum [j*L/k, (j+1)*L/k)
            j = np.arange(k)
            assert ((ll[n] >= j * length // k) & (ll[n] < np.maximum((j + 1) * length // k,
                                                                    j * length // k + 1))).all()
            assert (np.diff(ll[n]) > 0).all()
    # the other segments are untouched by the option
    nn = select_s_all(req, FEAT, SEL)
    rest = slice(sel.k_ll, None)
    np.testing.assert_array_equal(host.source_index[:, rest], nn.source_index[:, rest])
    dev = select_s_all_device(*(DeviceSequences.from_jagged(s) for s in (req.ll, req.rt, req.imp)),
                              jnp.asarray(req.cand_embedding), jnp.asarray(req.cand_to_req),
                              feat=FEAT, sel=sel, impl=impl)
    _assert_same_s_all(dev, host)


def test_ll_selection_is_validated():
    with pytest.raises(ValueError, match="ll_selection"):
        SelectionConfig(ll_selection="newest")
