"""Synthetic world: determinism, structure, and that each sequence carries its own signal."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pallas_kernels.int8_codec import dequantize_int8, l2_normalize
from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data.synthetic import (
    SOURCES,
    SyntheticConfig,
    generate_chunk,
    iter_chunks,
    make_catalog,
)

FEAT = FeatureConfig()
SEL = SelectionConfig(max_ll_len=2000)
CFG = SyntheticConfig(num_items=6000, users_per_chunk=96, seed=7)


@pytest.fixture(scope="module")
def chunk():
    return generate_chunk(CFG, FEAT, SEL, 0)


def _arrays(batch):
    import jax
    return jax.tree_util.tree_leaves(batch)


def test_deterministic_and_chunk_addressable(chunk):
    again = generate_chunk(CFG, FEAT, SEL, 0)
    for a, b in zip(_arrays(chunk.requests), _arrays(again.requests)):
        np.testing.assert_array_equal(a, b)
    # chunk 1 from the stream equals chunk 1 generated alone
    streamed = list(iter_chunks(CFG, FEAT, SEL, 2 * CFG.users_per_chunk))
    alone = generate_chunk(CFG, FEAT, SEL, 1)
    for a, b in zip(_arrays(streamed[1].requests), _arrays(alone.requests)):
        np.testing.assert_array_equal(a, b)
    assert streamed[1].requests.user_id[0] == CFG.users_per_chunk
    other = generate_chunk(dataclasses.replace(CFG, seed=8), FEAT, SEL, 0)
    assert not np.array_equal(other.requests.cand_embedding, chunk.requests.cand_embedding)


def test_last_chunk_is_partial():
    chunks = list(iter_chunks(CFG, FEAT, SEL, CFG.users_per_chunk + 5))
    assert [c.requests.num_requests for c in chunks] == [CFG.users_per_chunk, 5]


def test_requests_validate_and_respect_limits(chunk):
    req = chunk.requests
    req.validate(FEAT, SEL)
    assert req.ll.lengths.max() <= SEL.max_ll_len
    assert req.rt.lengths.max() <= SEL.max_rt_len and req.imp.lengths.max() <= SEL.max_imp_len
    lo, hi = CFG.candidates_per_request
    counts = np.bincount(req.cand_to_req, minlength=req.num_requests)
    assert counts.min() >= lo and counts.max() <= hi
    # log-uniform LL lengths: short and long users both present
    assert (req.ll.lengths < 50).any() and (req.ll.lengths > 500).any()


def test_time_order(chunk):
    req = chunk.requests
    for u in range(req.num_requests):
        ll, rt, imp = req.ll.sequence(u), req.rt.sequence(u), req.imp.sequence(u)
        for s in (ll, rt, imp):
            assert np.all(np.diff(s.timestamps) >= 0)
            assert np.all(s.timestamps < req.request_timestamp[u])
        if len(ll.timestamps) and len(rt.timestamps):
            assert ll.timestamps.max() <= rt.timestamps.min()  # S_LL ends where S_RT starts


def test_embeddings_follow_topics():
    cat = make_catalog(CFG, FEAT)
    e = l2_normalize(dequantize_int8(cat.embeddings))
    cos_own = np.sum(e * cat.centres[cat.topic], axis=1)
    other = (cat.topic + 1) % CFG.num_topics
    cos_other = np.sum(e * cat.centres[other], axis=1)
    assert cos_own.mean() > 0.8 and abs(cos_other.mean()) < 0.1
    assert np.abs(dequantize_int8(cat.embeddings)).max() <= 0.65 + 1e-6


def _topic_share(topics, offsets, per_user_topics):
    """Fraction of tokens whose topic is in that user's topic set."""
    rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    hit = (topics[:, None] == per_user_topics[rows]).any(axis=1)
    return hit.mean() if len(hit) else 0.0


def test_each_source_has_its_own_topics(chunk):
    u, req, tt = chunk.users, chunk.requests, chunk.token_topics
    dormant = np.where(u.dormant, u.lt, -1)
    # dormant interests: in S_LL, never in S_RT (except by random exploration, 5% of RT tokens)
    assert _topic_share(tt["ll"], req.ll.offsets, dormant) > 0.25
    assert _topic_share(tt["rt"], req.rt.offsets, dormant) < 0.03
    # short-term interests drive S_RT, are rare in S_LL
    assert _topic_share(tt["rt"], req.rt.offsets, u.st) > 0.4
    assert _topic_share(tt["ll"], req.ll.offsets, u.st) < 0.03
    # fatigued topics fill S_imp and are rare in the action sequences
    assert _topic_share(tt["imp"], req.imp.offsets, u.fatigued) > 0.4
    assert _topic_share(tt["ll"], req.ll.offsets, u.fatigued) < 0.03
    assert _topic_share(tt["rt"], req.rt.offsets, u.fatigued) < 0.03
    # hides in S_LL are on disliked topics
    hide = (req.ll.tokens.actions & FEAT.negative_mask) != 0
    rows = np.repeat(np.arange(req.num_requests), req.ll.lengths)
    assert (tt["ll"][hide, None] == u.disliked[rows[hide]]).any(axis=1).all()
    assert 0.04 < hide.mean() < 0.12
    # impressions carry no actions; RT tokens always carry some
    assert not req.imp.tokens.actions.any() and req.rt.tokens.actions.all()


def test_label_rates_follow_mechanisms():
    cfg = dataclasses.replace(CFG, users_per_chunk=600)
    c = generate_chunk(cfg, FEAT, SEL, 0)
    labels = c.requests.labels.astype(float)
    rate = {s: labels[c.candidate_source == i].mean(axis=0) for i, s in enumerate(SOURCES)}
    click, repin, hide = (FEAT.heads.index(h) for h in ("click", "repin", "hide"))
    assert rate["short_term"][click] > rate["random"][click] + 0.2
    assert rate["dormant"][repin] > rate["random"][repin] + 0.1
    assert rate["dormant"][repin] > rate["short_term"][repin]
    assert rate["disliked"][hide] > 0.25 > rate["random"][hide]
    assert rate["fatigued"][click] < rate["random"][click] - 0.08
    # hidden candidates are never clicked or repinned
    h = labels[:, hide] == 1
    assert not labels[h][:, [click, repin]].any()


def test_nn_scores_reveal_the_right_sequence(chunk):
    """A dormant candidate finds a close match only in S_LL; a fatigued one only in S_imp."""
    req = chunk.requests

    def best_cos(seqs, n):
        u = req.cand_to_req[n]
        e = l2_normalize(dequantize_int8(seqs.sequence(u).embeddings))
        if not len(e):
            return -1.0
        c = l2_normalize(dequantize_int8(req.cand_embedding[n]))
        return float((e @ c).max())

    def mean_best(source, seqs):
        idx = np.nonzero(chunk.candidate_source == SOURCES.index(source))[0][:150]
        return np.mean([best_cos(seqs, n) for n in idx])

    assert mean_best("dormant", req.ll) > mean_best("dormant", req.rt) + 0.2
    assert mean_best("fatigued", req.imp) > mean_best("fatigued", req.rt) + 0.2
    assert mean_best("short_term", req.rt) > mean_best("short_term", req.ll) + 0.2


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="num_topics"):
        SyntheticConfig(num_topics=5)
    with pytest.raises(ValueError, match="candidate_mix"):
        SyntheticConfig(candidate_mix=(1.0,))
    with pytest.raises(ValueError, match="candidates_per_request"):
        SyntheticConfig(candidates_per_request=(5, 2))


def test_fixed_ll_length_for_serving_benchmarks(chunk):
    cfg = dataclasses.replace(CFG, fixed_ll_length=1500)
    fixed = generate_chunk(cfg, FEAT, SEL, 0)
    assert (fixed.requests.ll.lengths == 1500).all()
    fixed.requests.validate(FEAT, SEL)
    np.testing.assert_array_equal(fixed.users.lt, chunk.users.lt)     # the same users
    capped = generate_chunk(dataclasses.replace(CFG, fixed_ll_length=10**6), FEAT, SEL, 0)
    assert (capped.requests.ll.lengths == SEL.max_ll_len).all()
    with pytest.raises(ValueError, match="fixed_ll_length"):
        SyntheticConfig(fixed_ll_length=-1)
