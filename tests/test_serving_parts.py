"""Serving building blocks without the model: ladders and buckets, the staged arena
layout (host views <-> device unpack), batch collation in both layouts, per-request validation,
request splitting, and host staging (pinned fallback and the in-place pinned mechanism)."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from tests.helpers import random_requests
from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data.schema import RequestBatch, SchemaError, broadcast
from transact_jax.serving import staging
from transact_jax.serving.buckets import Bucket, BucketConfig, Ladder
from transact_jax.serving.collate import plan, write_broadcast, write_dedup
from transact_jax.serving.layout import FAMILIES, layout_for
from transact_jax.serving.staging import HostArena, Stager
from transact_jax.serving.validation import (
    RequestError,
    check_structure,
    request_errors,
    select_requests,
    split_requests,
    validate_request,
)

FEAT = FeatureConfig()
SEL = SelectionConfig(k_ll=16, r=8, k_rt=4, k_imp=8, max_ll_len=300, max_rt_len=40, max_imp_len=50,
                      num_nal_negatives=8)


def requests(seed=0, ll=(300, 0, 17, 120), rt=(40, 3, 0, 25), imp=(50, 10, 0, 1), cands=(5, 3, 2, 7)):
    return random_requests(np.random.default_rng(seed), list(ll), list(rt), list(imp), list(cands), FEAT)


# ------------------------------------------------------------------------------------- ladders

def test_ladder_pick_and_constructors():
    lad = Ladder((16, 32, 100))
    assert [lad.pick(n) for n in (0, 1, 16, 17, 32, 33, 100)] == [16, 16, 16, 32, 32, 100, 100]
    assert lad.pick(101) == 200 and lad.pick(250) == 300   # beyond the top: multiples of it
    assert Ladder.powers_of_two(3, 100).rungs == (4, 8, 16, 32, 64, 100)
    assert Ladder.powers_of_two(16, 64).rungs == (16, 32, 64)
    geo = Ladder.geometric(1000, 10_000, ratio=1.25, multiple=64)
    assert geo.rungs[0] == 1024 and geo.rungs[-1] >= 10_000
    assert all(r % 64 == 0 for r in geo.rungs)
    assert all(b / a <= 1.25 + 64 / a for a, b in zip(geo.rungs, geo.rungs[1:]))
    for bad in ((), (4, 4), (8, 4), (0, 4), (2.5,)):
        with pytest.raises(ValueError, match="Ladder.rungs"):
            Ladder(bad)
    with pytest.raises(ValueError, match="negative"):
        lad.pick(-1)


def test_bucket_config_reserves_a_padding_request():
    cfg = BucketConfig.for_selection(SEL, max_candidates=64, max_requests=8)
    b = cfg.dedup(17, 4, (437, 68, 61))
    assert b == Bucket("dedup", 32, 8, b.ll, b.rt, b.imp)
    assert b.ll >= 437 and b.rt >= 68 and b.imp >= 61
    assert cfg.dedup(17, 3, (437, 68, 61)).requests == 4          # U + 1 = 4
    bb = cfg.broadcast(17, (300, 40, 0))
    assert (bb.candidates, bb.requests, bb.ll, bb.rt, bb.imp) == (32, 0, 300, 40, 16)
    with pytest.raises(ValueError, match="Bucket.layout"):
        Bucket("dense", 1, 1, 1, 1, 1)


# ------------------------------------------------------------------------------------- layout

@pytest.mark.parametrize("layout", ["dedup", "broadcast"])
def test_arena_views_round_trip_through_device_unpack(layout):
    bucket = Bucket(layout, 8, 4 if layout == "dedup" else 0, 24, 8, 16)
    lay = layout_for(bucket, FEAT)
    assert all(leaf.offset % 64 == 0 for leaf in lay.leaves)
    buf = np.zeros(lay.nbytes, np.uint8)
    views = lay.views(buf)
    rng = np.random.default_rng(1)
    for name, v in views.items():
        if v.dtype.kind == "f":
            v[...] = rng.normal(size=v.shape)
        else:
            info = np.iinfo(v.dtype)
            v[...] = rng.integers(max(info.min, -1000), min(info.max, 1000), v.shape, endpoint=True)
    unpacked = jax.jit(lambda b: lay.unpack(b))(jax.device_put(buf))
    for name, v in views.items():
        got = np.asarray(unpacked[name])
        assert got.dtype == v.dtype and got.shape == v.shape, name
        np.testing.assert_array_equal(got, v, err_msg=name)
    parts = lay.part_nbytes()
    assert parts["sequences"] + parts["candidates"] <= lay.nbytes
    with pytest.raises(ValueError, match="uint8 buffer"):
        lay.views(np.zeros(lay.nbytes - 1, np.uint8))


# ----------------------------------------------------------------------------------- collation

def _dedup_views(parts, bucket_cfg):
    bplan = plan(parts, SEL)
    bucket = bplan.bucket(bucket_cfg, "dedup")
    lay = layout_for(bucket, FEAT)
    views = lay.views(np.full(lay.nbytes, 0x5A, np.uint8))     # stale bytes everywhere
    write_dedup(views, parts, bplan)
    return bplan, bucket, views


def test_dedup_collation_holds_each_request_once_with_truncation_and_padding():
    a = requests(0, ll=(350, 0, 17), rt=(40, 3, 0), imp=(50, 10, 0), cands=(5, 3, 2))   # 350 > 300
    b = requests(1, ll=(120,), rt=(25,), imp=(60,), cands=(7,))                          # 60 > 50
    parts = [a, b]
    bplan, bucket, views = _dedup_views(parts, BucketConfig.for_selection(SEL, 64, 8))
    assert bplan.num_requests == 4 and bplan.num_candidates == 17
    assert bplan.total_tokens == {"ll": 300 + 17 + 120, "rt": 40 + 3 + 25, "imp": 50 + 10 + 50}
    assert bucket.requests >= 5 and bucket.candidates == 32
    for fam in FAMILIES:
        off, lens = views[f"{fam}.offsets"], views[f"{fam}.lengths"]
        u = 0
        for p in parts:
            trunc = getattr(p.truncate_recent(SEL), fam)
            for i in range(p.num_requests):
                seq = trunc.sequence(i)
                assert lens[u] == len(seq.actions)
                lo = off[u]
                np.testing.assert_array_equal(views[f"{fam}.embeddings"][lo:lo + lens[u]], seq.embeddings)
                np.testing.assert_array_equal(views[f"{fam}.actions"][lo:lo + lens[u]], seq.actions)
                np.testing.assert_array_equal(views[f"{fam}.surfaces"][lo:lo + lens[u]], seq.surfaces)
                u += 1
        assert (lens[u:] == 0).all() and (off[u:] == bplan.total_tokens[fam]).all()
    c2r = views["cand_to_req"]
    np.testing.assert_array_equal(c2r[:17], np.concatenate([a.cand_to_req, b.cand_to_req + 3]))
    assert (c2r[17:] == 4).all()                          # padding -> the empty padding request
    np.testing.assert_array_equal(views["dense"][:17], np.concatenate([a.dense, b.dense]))
    assert (views["dense"][17:] == 0).all() and (views["categorical"][17:] == 0).all()
    assert (views["cand_embedding"][17:] == 0).all()


def test_broadcast_collation_equals_schema_broadcast():
    req = requests(2, ll=(350, 0, 17), cands=(2, 3, 4), rt=(40, 3, 0), imp=(50, 10, 0))
    # candidates of request 0 split in two runs: non-contiguous candidates are handled too
    req = dataclasses.replace(req, cand_to_req=np.array([0, 1, 1, 1, 0, 2, 2, 2, 2], np.int32))
    bplan = plan([req], SEL)
    bucket = bplan.bucket(BucketConfig.for_selection(SEL, 64, 8), "broadcast")
    lay = layout_for(bucket, FEAT)
    views = lay.views(np.full(lay.nbytes, 0x33, np.uint8))
    write_broadcast(views, [req], bplan)
    ref = broadcast(req.truncate_recent(SEL))
    assert bplan.broadcast_tokens["ll"] == int(ref.ll.lengths.sum())
    for fam in FAMILIES:
        dense = getattr(ref, fam)
        lens = views[f"{fam}.lengths"]
        np.testing.assert_array_equal(lens[:9], dense.lengths)
        assert (lens[9:] == 0).all()
        for n in range(9):
            k = dense.lengths[n]
            for field in ("embeddings", "actions", "surfaces"):
                np.testing.assert_array_equal(views[f"{fam}.{field}"][n, :k],
                                              getattr(dense.tokens, field)[n, :k], err_msg=f"{fam}.{field}")


# ---------------------------------------------------------------------------------- validation

def _bad(req: RequestBatch, what: str) -> RequestBatch:
    """``req`` with request 2 broken in one way."""
    c = np.flatnonzero(req.cand_to_req == 2)[0]
    tok = int(req.ll.offsets[2])
    if what == "rt.tokens.surfaces":
        s = req.rt.tokens.surfaces.copy()
        s[int(req.rt.offsets[2])] = FEAT.num_surfaces
        return dataclasses.replace(req, rt=dataclasses.replace(
            req.rt, tokens=dataclasses.replace(req.rt.tokens, surfaces=s)))
    if what == "ll.tokens.embeddings":
        e = req.ll.tokens.embeddings.copy()
        e[tok, 5] = -128
        return dataclasses.replace(req, ll=dataclasses.replace(
            req.ll, tokens=dataclasses.replace(req.ll.tokens, embeddings=e)))
    if what == "dense":
        d = req.dense.copy()
        d[c, 1] = np.nan
        return dataclasses.replace(req, dense=d)
    if what == "categorical[:, 1]":
        d = req.categorical.copy()
        d[c, 1] = FEAT.categorical_vocab_sizes[1]
        return dataclasses.replace(req, categorical=d)
    if what == "cand_embedding":
        d = req.cand_embedding.copy()
        d[c, 0] = -128
        return dataclasses.replace(req, cand_embedding=d)
    if what == "candidates":
        keep = req.cand_to_req != 2
        return dataclasses.replace(
            req, cand_item_id=req.cand_item_id[keep], cand_embedding=req.cand_embedding[keep],
            cand_to_req=req.cand_to_req[keep], dense=req.dense[keep],
            categorical=req.categorical[keep], labels=req.labels[keep])
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["ll.tokens.actions", "rt.tokens.surfaces", "ll.tokens.embeddings",
                                  "dense", "categorical[:, 1]", "cand_embedding", "candidates"])
def test_request_errors_name_the_request_and_field(what):
    if what == "ll.tokens.actions":   # A = 7 so that an out-of-range bit fits the uint8 bitmask
        feat = dataclasses.replace(FEAT, action_names=FEAT.action_names[:7],
                                   positive_actions=FEAT.positive_actions[:6], negative_actions=())
        req = random_requests(np.random.default_rng(3), [5, 6, 7, 8], [1] * 4, [1] * 4, [2] * 4, feat)
        tok = int(req.ll.offsets[2])
        a = req.ll.tokens.actions.copy()
        a[tok + 1] = 1 << 7                                 # bit 7 is beyond A = 7
        req = dataclasses.replace(req, ll=dataclasses.replace(
            req.ll, tokens=dataclasses.replace(req.ll.tokens, actions=a)))
        errors = request_errors(req, feat, SEL)
    else:
        req = _bad(requests(3, rt=(40, 3, 5, 25)), what)
        check_structure(req, FEAT)            # still a well-formed batch
        errors = request_errors(req, FEAT, SEL)
    assert list(errors) == [2]
    err = errors[2]
    assert isinstance(err, RequestError) and isinstance(err, SchemaError)
    assert err.field == what and err.request_index == 2 and err.request_id == 2
    assert str(err).startswith(f"request 2 (request_id 2): {what}: ")


def test_overlong_policy_and_empty_sequences():
    req = requests(4, ll=(301, 0, 5, 300), rt=(41, 0, 0, 0), imp=(0, 0, 0, 0))
    assert request_errors(req, FEAT, SEL) == {}                       # truncate: no error
    errors = request_errors(req, FEAT, SEL, overlong="reject")
    assert sorted(errors) == [0] and errors[0].field == "ll" and "301 tokens" in str(errors[0])
    with pytest.raises(ValueError, match="overlong"):
        request_errors(req, FEAT, SEL, overlong="cut")


@pytest.mark.parametrize("field,change", [
    ("cand_to_req", lambda r: dataclasses.replace(r, cand_to_req=r.cand_to_req + 1)),
    ("dense", lambda r: dataclasses.replace(r, dense=r.dense.astype(np.float64))),
    ("ll.offsets", lambda r: dataclasses.replace(r, ll=dataclasses.replace(
        r.ll, offsets=r.ll.offsets[::-1].copy()))),
    ("rt.tokens.embeddings", lambda r: dataclasses.replace(r, rt=dataclasses.replace(
        r.rt, tokens=dataclasses.replace(r.rt.tokens, embeddings=r.rt.tokens.embeddings[:, :16])))),
    ("user_id", lambda r: dataclasses.replace(r, user_id=list(r.user_id))),
])
def test_structure_errors_name_the_field(field, change):
    bad = change(requests(5))
    with pytest.raises(SchemaError) as e:
        check_structure(bad, FEAT)
    assert e.value.field == field
    one = split_requests(requests(5))[0]
    err = validate_request(change(one), FEAT, SEL)
    assert isinstance(err, RequestError) and err.field == field


def test_split_and_select_requests():
    req = requests(6)
    req = dataclasses.replace(req, cand_to_req=np.array([0, 0, 1, 0, 3, 3, 1, 2, 2, 3, 3, 3, 3, 0, 1,
                                                         3, 3], np.int32))
    ones = split_requests(req)
    assert [o.num_requests for o in ones] == [1] * 4
    for u, one in enumerate(ones):
        assert validate_request(one, FEAT, SEL) is None
        mine = req.cand_to_req == u
        np.testing.assert_array_equal(one.cand_embedding, req.cand_embedding[mine])
        np.testing.assert_array_equal(one.ll.tokens.embeddings, req.ll.sequence(u).embeddings)
    sub = select_requests(req, [3, 1])
    sub.validate(FEAT, dataclasses.replace(SEL, max_ll_len=400))
    assert sub.num_requests == 2 and list(sub.request_id) == [3, 1]
    np.testing.assert_array_equal(sub.cand_embedding[sub.cand_to_req == 0],
                                  req.cand_embedding[req.cand_to_req == 3])
    assert validate_request(req, FEAT, SEL).field == "requests"       # more than one request


# ------------------------------------------------------------------------------------- staging

def test_pinned_request_falls_back_to_pageable_on_cpu():
    dev = jax.devices()[0]
    if dev.platform == "gpu":
        pytest.skip("the fallback is for non-GPU backends")
    st = Stager(dev, pinned=True)
    assert st.info.requested_pinned and st.mode == "pageable"
    assert "GPU" in st.info.reason and repr(dev.platform) in st.info.reason
    assert Stager(dev, pinned=False).info == staging.StagingInfo(False, "pageable", "")


def test_missing_memory_kind_falls_back_to_pageable(monkeypatch):
    dev = jax.devices()[0]
    monkeypatch.setattr(staging, "has_memory_kind", lambda d, kind: False)
    info = Stager(dev, pinned=True, allow_non_gpu=True).info
    assert info.mode == "pageable" and "pinned_host" in info.reason


@pytest.mark.gpu   # pinned_host memory exists on the GPU runtime only
def test_failed_pinned_self_test_falls_back_to_pinned_copy(monkeypatch):
    dev = jax.devices()[0]
    assert staging.has_memory_kind(dev, "pinned_host")
    monkeypatch.setattr(staging, "_pinned_view", lambda array, nbytes: np.zeros(nbytes, np.uint8))
    info = Stager(dev, pinned=True, allow_non_gpu=True).info        # writes never reach the array
    assert info.mode == "pinned_copy" and "did not reach" in info.reason


# pinned modes need pinned_host memory, which exists on the GPU runtime only
@pytest.mark.parametrize("mode", ["pageable", pytest.param("pinned", marks=pytest.mark.gpu),
                                  pytest.param("pinned_copy", marks=pytest.mark.gpu)])
def test_arena_transfer_moves_the_collated_bytes(mode):
    dev = jax.devices()[0]
    st = Stager(dev, pinned=mode != "pageable", slots=1, allow_non_gpu=True)
    if mode == "pinned_copy":
        st.info = staging.StagingInfo(True, "pinned_copy", "forced by the test")
    assert st.mode == mode
    lay = layout_for(Bucket("dedup", 16, 2, 64, 16, 16), FEAT)
    arena = st.acquire(lay)
    assert isinstance(arena, HostArena) and arena.mode == mode
    for seed in (1, 2):                      # the same arena, rewritten: each copy sees new bytes
        arena.buffer[:] = (np.arange(lay.nbytes) * seed) % 253
        out, times = st.transfer(arena, sync=True)
        np.testing.assert_array_equal(np.asarray(out), arena.buffer)
        assert set(times) == ({"pin", "h2d"} if mode == "pinned_copy" else {"h2d"})
    st.release(arena)
    assert st.acquire(lay) is arena           # reused, not reallocated
    assert st.allocated_bytes() == lay.nbytes


def test_serving_refuses_a_model_that_reads_token_ages():
    """Token timestamps are not shipped to the device, so a model with the ``age`` token feature
    cannot be served; ``similarity`` (computed from the embeddings) can."""
    from transact_jax.model.config import ModelConfig
    from transact_jax.run.config import ExperimentConfig
    from transact_jax.serving.forward import make_forward
    with pytest.raises(ValueError, match="token_features"):
        make_forward(ExperimentConfig(model=ModelConfig(token_features=("age",))), "xla")
    assert callable(make_forward(ExperimentConfig(model=ModelConfig(token_features=("similarity",))),
                                 "xla"))
