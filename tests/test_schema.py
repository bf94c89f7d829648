"""Containers of ``transact_jax.data.schema``, their validation by the rule book
(``transact_jax.data.request_rules``) and the configs."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from tests.helpers import random_jagged, random_requests
from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data import request_rules as rules
from transact_jax.data.schema import (
    BroadcastBatch,
    JaggedSequences,
    RequestBatch,
    SchemaError,
    SequenceBatch,
    TokenFields,
    TrainingExamples,
    broadcast,
)

FEAT = FeatureConfig()
TOKEN_FIELDS = ("timestamps", "actions", "surfaces", "embeddings")


def _assert_tokens_equal(a: TokenFields, b: TokenFields):
    for f in TOKEN_FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype, f
        np.testing.assert_array_equal(x, y, err_msg=f)


def _assert_jagged_equal(a: JaggedSequences, b: JaggedSequences):
    np.testing.assert_array_equal(a.offsets, b.offsets)
    assert a.offsets.dtype == np.int64 and b.offsets.dtype == np.int64
    _assert_tokens_equal(a.tokens, b.tokens)


def _manual_padded(jag: JaggedSequences, max_len: int) -> SequenceBatch:
    """Straightforward per-sequence padding (most recent max_len tokens, left-aligned, zeros after)."""
    u = jag.num_sequences
    out = TokenFields.empty((u, max_len), FEAT)
    lengths = np.zeros(u, np.int32)
    for i in range(u):
        lo, hi = int(jag.offsets[i]), int(jag.offsets[i + 1])
        lo = max(lo, hi - max_len)
        lengths[i] = hi - lo
        for f in TOKEN_FIELDS:
            getattr(out, f)[i, :hi - lo] = getattr(jag.tokens, f)[lo:hi]
    return SequenceBatch(out, lengths)


# ----------------------------------------------------------------------------- jagged / padded

@pytest.mark.parametrize("lengths", [[3, 0, 7, 1, 7], [0, 0], [5], [], [0, 4, 0]])
def test_jagged_padded_round_trip(lengths):
    rng = np.random.default_rng(len(lengths))
    jag = random_jagged(rng, lengths)
    jag.validate(FEAT, "seq")
    np.testing.assert_array_equal(jag.lengths, lengths)
    assert jag.lengths.dtype == np.int32
    padded = jag.to_padded()
    assert padded.max_len == (max(lengths) if lengths else 0)
    padded.validate(FEAT, "seq")
    _assert_tokens_equal(padded.tokens, _manual_padded(jag, padded.max_len).tokens)
    np.testing.assert_array_equal(padded.lengths, lengths)
    assert padded.lengths.dtype == np.int32
    # padding holds zeros
    for f in TOKEN_FIELDS:
        assert not np.any(getattr(padded.tokens, f)[~padded.valid])
    _assert_jagged_equal(JaggedSequences.from_padded(padded), jag)
    # wider than needed: extra zero columns, same round trip
    wide = jag.to_padded(max(lengths, default=0) + 3)
    assert wide.max_len == max(lengths, default=0) + 3
    assert not np.any(wide.tokens.embeddings[:, -3:])
    _assert_jagged_equal(JaggedSequences.from_padded(wide), jag)


def test_to_padded_truncates_to_most_recent():
    rng = np.random.default_rng(1)
    jag = random_jagged(rng, [10, 2, 0, 6])
    p = jag.to_padded(4)
    np.testing.assert_array_equal(p.lengths, [4, 2, 0, 4])
    _assert_tokens_equal(p.tokens, _manual_padded(jag, 4).tokens)
    # sequence 0 keeps tokens 6..9, sequence 3 keeps its tokens 2..5
    np.testing.assert_array_equal(p.tokens.timestamps[0], jag.tokens.timestamps[6:10])
    np.testing.assert_array_equal(p.tokens.timestamps[3], jag.tokens.timestamps[14:18])
    np.testing.assert_array_equal(p.tokens.embeddings[1, :2], jag.tokens.embeddings[10:12])
    assert not np.any(p.tokens.embeddings[1, 2:]) and not np.any(p.tokens.timestamps[2])
    assert jag.to_padded(0).tokens.embeddings.shape == (4, 0, 32)


def test_from_padded_ignores_garbage_in_padding():
    rng = np.random.default_rng(2)
    jag = random_jagged(rng, [3, 1])
    p = jag.to_padded(5)
    dirty = p.tokens.map(lambda a: a.copy())
    dirty.timestamps[~p.valid] = 123
    dirty.embeddings[~p.valid] = 7
    _assert_jagged_equal(JaggedSequences.from_padded(SequenceBatch(dirty, p.lengths)), jag)


def test_truncate_recent():
    rng = np.random.default_rng(3)
    jag = random_jagged(rng, [8, 3, 0, 5])
    assert jag.truncate_recent(8) is jag  # nothing to cut: same object
    cut = jag.truncate_recent(4)
    np.testing.assert_array_equal(cut.offsets, [0, 4, 7, 7, 11])
    for u, (lo, hi) in enumerate([(4, 8), (8, 11), (11, 11), (12, 16)]):
        _assert_tokens_equal(cut.sequence(u), jag.tokens.map(lambda a: a[lo:hi]))
    # the kept tokens are the latest by timestamp
    assert cut.sequence(0).timestamps.min() == jag.sequence(0).timestamps[-4:].min()
    assert jag.truncate_recent(0).offsets.tolist() == [0, 0, 0, 0, 0]
    empty = random_jagged(rng, [])
    assert empty.truncate_recent(3) is empty


def test_select_concatenate_sequence():
    rng = np.random.default_rng(4)
    jag = random_jagged(rng, [2, 0, 3, 1])
    s = jag.sequence(2)
    _assert_tokens_equal(s, jag.tokens.map(lambda a: a[2:5]))
    assert s.embeddings.base is not None  # a view
    sel = jag.select(np.array([3, 0, 0, 1, 2]))
    np.testing.assert_array_equal(sel.lengths, [1, 2, 2, 0, 3])
    np.testing.assert_array_equal(sel.tokens.timestamps, jag.tokens.timestamps[[5, 0, 1, 0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(sel.tokens.embeddings, jag.tokens.embeddings[[5, 0, 1, 0, 1, 2, 3, 4]])
    sel.validate(FEAT, "sel")
    none = jag.select(np.array([], np.int64))
    assert none.num_sequences == 0 and none.offsets.tolist() == [0]
    none.validate(FEAT, "none")
    assert none.tokens.embeddings.shape == (0, 32)
    # concatenate(split) == original
    parts = [jag.select(np.array([0, 1])), jag.select(np.array([2])), jag.select(np.array([3]))]
    _assert_jagged_equal(JaggedSequences.concatenate(parts), jag)
    _assert_jagged_equal(JaggedSequences.concatenate([jag, none]), jag)


def test_pytree_registration():
    rng = np.random.default_rng(5)
    req = random_requests(rng, [3, 1], [2, 2], [0, 1], [2, 1])
    leaves = jax.tree_util.tree_leaves(req)
    # 3 jagged sequences x (4 token fields + offsets) + 3 request ids + 6 candidate arrays (labels incl.)
    assert len(leaves) == 3 * 5 + 3 + 6
    doubled = jax.tree_util.tree_map(lambda a: a, req)
    assert isinstance(doubled, RequestBatch)
    _assert_jagged_equal(doubled.ll, req.ll)


# -------------------------------------------------------------------------------- broadcast

def test_broadcast_equals_explicit_copies():
    rng = np.random.default_rng(6)
    ll_lens, rt_lens, imp_lens, counts = [5, 0, 9], [3, 4, 0], [0, 2, 2], [2, 3, 1]
    req = random_requests(rng, ll_lens, rt_lens, imp_lens, counts)
    # shuffle the candidate order so cand_to_req is not sorted
    perm = rng.permutation(req.num_candidates)
    req = dataclasses.replace(req, cand_to_req=req.cand_to_req[perm], cand_item_id=req.cand_item_id[perm],
                              cand_embedding=req.cand_embedding[perm], dense=req.dense[perm],
                              categorical=req.categorical[perm], labels=req.labels[perm])
    req.validate(FEAT, SelectionConfig())
    b = broadcast(req)
    assert isinstance(b, BroadcastBatch)
    for name, jag, width in (("ll", req.ll, 9), ("rt", req.rt, 4), ("imp", req.imp, 2)):
        dense = getattr(b, name)
        assert dense.tokens.embeddings.shape == (6, width, 32)
        for n in range(req.num_candidates):
            u = int(req.cand_to_req[n])
            seq = jag.sequence(u)
            length = int(jag.lengths[u])
            assert dense.lengths[n] == length
            for f in TOKEN_FIELDS:
                got = getattr(dense.tokens, f)[n]
                np.testing.assert_array_equal(got[:length], getattr(seq, f), err_msg=f"{name} {f} {n}")
                assert not np.any(got[length:])
    np.testing.assert_array_equal(b.cand_embedding, req.cand_embedding)
    np.testing.assert_array_equal(b.cand_item_id, req.cand_item_id)
    np.testing.assert_array_equal(b.dense, req.dense)
    np.testing.assert_array_equal(b.categorical, req.categorical)
    # explicit widths, one of them truncating to the most recent tokens
    b2 = broadcast(req, (4, 10, 3))
    assert b2.ll.max_len == 4 and b2.rt.max_len == 10 and b2.imp.max_len == 3
    n0 = int(np.nonzero(req.cand_to_req == 2)[0][0])
    np.testing.assert_array_equal(b2.ll.tokens.timestamps[n0], req.ll.sequence(2).timestamps[-4:])
    assert b2.ll.lengths[n0] == 4


def test_broadcast_byte_ratio_known_configuration():
    # 4 requests, every sequence full (no padding): LL 100, RT 20, imp 10 tokens; 8 candidates each.
    rng = np.random.default_rng(7)
    req = random_requests(rng, [100] * 4, [20] * 4, [10] * 4, [8] * 4)
    token_bytes = 8 + 1 + 2 + 32  # int64 timestamp, uint8 actions, int16 surface, int8[32]
    dedup = 4 * 130 * token_bytes + 3 * 5 * 8  # tokens once + 3 offset arrays (U + 1 int64)
    full = 32 * 130 * token_bytes + 3 * 32 * 4  # per-candidate copies + 3 int32 length arrays
    assert (dedup, full) == (22_480, 179_264)
    assert req.sequence_nbytes() == dedup
    b = broadcast(req)
    assert b.sequence_nbytes() == full
    assert full / dedup == pytest.approx(7.9744, abs=1e-4)
    # with 64 candidates per request the ratio passes the 8x of the paper
    req64 = random_requests(rng, [100] * 4, [20] * 4, [10] * 4, [64] * 4)
    ratio = broadcast(req64).sequence_nbytes() / req64.sequence_nbytes()
    assert ratio == pytest.approx((256 * 130 * token_bytes + 3 * 256 * 4) / dedup, rel=1e-12)
    assert ratio > 60


# ------------------------------------------------------------------------------- validation

SEL = SelectionConfig(max_ll_len=20, max_rt_len=8, max_imp_len=6, k_ll=4, r=2, k_rt=2, k_imp=3,
                      num_nal_negatives=3)


def _valid_requests(feat=FEAT, seed=0):
    rng = np.random.default_rng(seed)
    req = random_requests(rng, [7, 0, 20], [3, 8, 0], [6, 1, 0], [2, 0, 3], feat)
    req.validate(feat, SEL)
    return req


def _replace_tokens(req, seq, field, value):
    jag = getattr(req, seq)
    return dataclasses.replace(req, **{seq: dataclasses.replace(
        jag, tokens=dataclasses.replace(jag.tokens, **{field: value}))})


def _set(a, index, value):
    a = a.copy()
    a[index] = value
    return a


def _request_mutations():
    r = _valid_requests()
    def jr(seq, **kw):  # the request with sequence ``seq`` modified
        return dataclasses.replace(r, **{seq: dataclasses.replace(getattr(r, seq), **kw)})

    return {
        "timestamps dtype": (_replace_tokens(r, "ll", "timestamps", r.ll.tokens.timestamps.astype(np.int32)),
                             "ll.tokens.timestamps"),
        "timestamps float": (_replace_tokens(r, "imp", "timestamps", r.imp.tokens.timestamps.astype(np.float64)),
                             "imp.tokens.timestamps"),
        "timestamps list": (_replace_tokens(r, "rt", "timestamps", r.rt.tokens.timestamps.tolist()),
                            "rt.tokens.timestamps"),
        "actions dtype": (_replace_tokens(r, "imp", "actions", r.imp.tokens.actions.astype(np.uint16)),
                          "imp.tokens.actions"),
        "surfaces dtype": (_replace_tokens(r, "ll", "surfaces", r.ll.tokens.surfaces.astype(np.int32)),
                           "ll.tokens.surfaces"),
        "embedding width": (_replace_tokens(r, "rt", "embeddings", r.rt.tokens.embeddings[:, :16]),
                            "rt.tokens.embeddings"),
        "embedding dtype": (_replace_tokens(r, "rt", "embeddings", r.rt.tokens.embeddings.astype(np.float32)),
                            "rt.tokens.embeddings"),
        "embedding count": (_replace_tokens(r, "ll", "embeddings", r.ll.tokens.embeddings[:-1]),
                            "ll.tokens.embeddings"),
        "surface too large": (_replace_tokens(r, "rt", "surfaces", _set(r.rt.tokens.surfaces, 4, 8)),
                              "rt.tokens.surfaces"),
        "surface negative": (_replace_tokens(r, "ll", "surfaces", _set(r.ll.tokens.surfaces, 0, -1)),
                             "ll.tokens.surfaces"),
        "embedding -128": (_replace_tokens(r, "imp", "embeddings", _set(r.imp.tokens.embeddings, (6, 3), -128)),
                           "imp.tokens.embeddings"),
        "offsets decreasing": (jr("ll", offsets=np.array([0, 7, 5, 27], np.int64)), "ll.offsets"),
        "offsets negative": (jr("rt", offsets=np.array([0, -1, 3, 11], np.int64)), "rt.offsets"),
        "offsets not from 0": (jr("rt", offsets=np.array([1, 3, 11, 11], np.int64)), "rt.offsets"),
        "offsets too short": (jr("ll", offsets=np.array([0, 7, 7, 26], np.int64)), "ll.offsets"),
        "offsets dtype": (jr("imp", offsets=r.imp.offsets.astype(np.int32)), "imp.offsets"),
        "offsets 2-D": (jr("imp", offsets=r.imp.offsets[None]), "imp.offsets"),
        "sequence count": (jr("imp", offsets=np.array([0, 6, 7], np.int64)), "imp.offsets"),
        "ll too long": (dataclasses.replace(r, ll=random_jagged(np.random.default_rng(1), [7, 0, 21])), "ll"),
        "rt too long": (dataclasses.replace(r, rt=random_jagged(np.random.default_rng(1), [3, 9, 0])), "rt"),
        "imp too long": (dataclasses.replace(r, imp=random_jagged(np.random.default_rng(1), [7, 1, 0])), "imp"),
        "user_id dtype": (dataclasses.replace(r, user_id=r.user_id.astype(np.int32)), "user_id"),
        "request_id shape": (dataclasses.replace(r, request_id=r.request_id[:2]), "request_id"),
        "request_timestamp dtype": (dataclasses.replace(r, request_timestamp=r.request_timestamp.astype(float)),
                                    "request_timestamp"),
        "cand_item_id shape": (dataclasses.replace(r, cand_item_id=r.cand_item_id[:, None]), "cand_item_id"),
        "cand_embedding dtype": (dataclasses.replace(r, cand_embedding=r.cand_embedding.astype(np.int16)),
                                 "cand_embedding"),
        "cand_embedding width": (dataclasses.replace(r, cand_embedding=r.cand_embedding[:, :31]),
                                 "cand_embedding"),
        "cand_embedding -128": (dataclasses.replace(r, cand_embedding=_set(r.cand_embedding, (1, 0), -128)),
                                "cand_embedding"),
        "cand_to_req too large": (dataclasses.replace(r, cand_to_req=_set(r.cand_to_req, 4, 3)), "cand_to_req"),
        "cand_to_req negative": (dataclasses.replace(r, cand_to_req=_set(r.cand_to_req, 0, -1)), "cand_to_req"),
        "cand_to_req dtype": (dataclasses.replace(r, cand_to_req=r.cand_to_req.astype(np.int64)), "cand_to_req"),
        "cand_to_req length": (dataclasses.replace(r, cand_to_req=r.cand_to_req[:4]), "cand_to_req"),
        "dense NaN": (dataclasses.replace(r, dense=_set(r.dense, (2, 5), np.nan)), "dense"),
        "dense inf": (dataclasses.replace(r, dense=_set(r.dense, (0, 0), -np.inf)), "dense"),
        "dense dtype": (dataclasses.replace(r, dense=r.dense.astype(np.float64)), "dense"),
        "dense width": (dataclasses.replace(r, dense=r.dense[:, :7]), "dense"),
        "categorical range": (dataclasses.replace(r, categorical=_set(r.categorical, (3, 1), 64)),
                              "categorical[:, 1]"),
        "categorical negative": (dataclasses.replace(r, categorical=_set(r.categorical, (0, 2), -1)),
                                 "categorical[:, 2]"),
        "categorical dtype": (dataclasses.replace(r, categorical=r.categorical.astype(np.int64)), "categorical"),
        "labels 2": (dataclasses.replace(r, labels=_set(r.labels, (1, 2), 2)), "labels"),
        "labels dtype": (dataclasses.replace(r, labels=r.labels.astype(np.int64)), "labels"),
        "labels heads": (dataclasses.replace(r, labels=r.labels[:, :2]), "labels"),
    }


_REQUEST_CASES = list(_request_mutations())


@pytest.mark.parametrize("case", _REQUEST_CASES)
def test_request_validation_names_field(case):
    bad, field = _request_mutations()[case]
    with pytest.raises(SchemaError) as info:
        bad.validate(FEAT, SEL)
    assert info.value.field == field, str(info.value)
    assert str(info.value).startswith(field + ":")


def test_validate_raises_the_first_request_problem_of_the_rule_book():
    """One rule book: RequestBatch.validate raises the first entry of the per-request listing."""
    r = _valid_requests()
    bad = _replace_tokens(r, "rt", "surfaces", _set(r.rt.tokens.surfaces, 4, 8))     # token 4: request 1
    bad = dataclasses.replace(bad, dense=_set(r.dense, (3, 0), np.inf))                # candidate 3: request 2
    bad = dataclasses.replace(bad, labels=_set(r.labels, (4, 1), 7))                   # request 2 again
    problems = rules.request_problems(bad, FEAT, SEL)
    assert problems == {1: rules.RequestProblem(1, "rt.tokens.surfaces", "surface id 8 out of range [0, 8)"),
                        2: rules.RequestProblem(2, "dense", "contains NaN/inf")}
    with pytest.raises(SchemaError) as info:
        bad.validate(FEAT, SEL)
    assert str(info.value) == "rt.tokens.surfaces: surface id 8 out of range [0, 8) (request 1)"
    # the switches: labels and lengths can be left out, empty candidate lists can be required
    labels_only = dataclasses.replace(r, labels=_set(r.labels, (4, 1), 7))
    assert list(rules.request_problems(labels_only, FEAT, SEL)) == [2]
    assert rules.request_problems(labels_only, FEAT, SEL, labels=False) == {}
    long = dataclasses.replace(r, ll=random_jagged(np.random.default_rng(1), [7, 0, 21]))
    assert rules.request_problems(long, FEAT, SEL)[2].field == "ll"
    assert rules.request_problems(long, FEAT, SEL, lengths=False) == {}
    empty = rules.request_problems(r, FEAT, SEL, candidates=True)
    assert list(empty) == [1] and empty[1].field == "candidates"      # request 1 has no candidates
    # structure problems are not per request: they raise at once
    with pytest.raises(SchemaError) as info:
        rules.check_structure(dataclasses.replace(r, dense=r.dense[:, :7]), FEAT)
    assert info.value.field == "dense"


def test_request_validation_action_bits_beyond_a():
    feat5 = FeatureConfig(action_names=("click", "repin", "closeup", "share", "hide"),
                          positive_actions=("click", "repin"), negative_actions=("hide",))
    assert feat5.action_dtype == np.uint8
    r = _valid_requests(feat5)  # random_requests draws actions < 2**5
    r.validate(feat5, SEL)
    for bit in (5, 7):
        bad = _replace_tokens(r, "rt", "actions", _set(r.rt.tokens.actions, 2, 1 << bit | 1))
        with pytest.raises(SchemaError, match="action bits") as info:
            bad.validate(feat5, SEL)
        assert info.value.field == "rt.tokens.actions"
    # all 8 bits are legal with the default 8 action types
    ok = _replace_tokens(_valid_requests(), "rt", "actions", np.full(11, 255, np.uint8))
    ok.validate(FEAT, SEL)


def test_request_valid_edge_cases_and_truncation():
    r = _valid_requests()
    dataclasses.replace(r, labels=None).validate(FEAT, SEL)  # serving requests carry no labels
    # over-long sequences: rejected, then accepted after truncate_recent keeps the most recent tokens
    rng = np.random.default_rng(9)
    long = dataclasses.replace(r, ll=random_jagged(rng, [30, 0, 21]), rt=random_jagged(rng, [9, 8, 100]))
    with pytest.raises(SchemaError):
        long.validate(FEAT, SEL)
    cut = long.truncate_recent(SEL)
    cut.validate(FEAT, SEL)
    np.testing.assert_array_equal(cut.ll.lengths, [20, 0, 20])
    np.testing.assert_array_equal(cut.rt.lengths, [8, 8, 8])
    np.testing.assert_array_equal(cut.ll.sequence(0).timestamps, long.ll.sequence(0).timestamps[-20:])
    np.testing.assert_array_equal(cut.rt.sequence(2).embeddings, long.rt.sequence(2).embeddings[-8:])
    assert cut.imp is long.imp
    # zero requests, zero candidates
    none = np.zeros(0, np.int64)
    empty = random_requests(rng, none, none, none, none)
    empty.validate(FEAT, SEL)
    assert empty.num_requests == 0 and empty.num_candidates == 0


def test_sequence_batch_validation():
    rng = np.random.default_rng(10)
    p = random_jagged(rng, [3, 5]).to_padded()
    p.validate(FEAT, "ll")
    with pytest.raises(SchemaError) as info:
        SequenceBatch(p.tokens, np.array([3, 6], np.int32)).validate(FEAT, "ll")
    assert info.value.field == "ll.lengths"
    with pytest.raises(SchemaError) as info:
        SequenceBatch(p.tokens, np.array([3, 5], np.int64)).validate(FEAT, "ll")
    assert info.value.field == "ll.lengths"
    with pytest.raises(SchemaError) as info:
        SequenceBatch(p.tokens, np.array([-1, 5], np.int32)).validate(FEAT, "ll")
    assert info.value.field == "ll.lengths"
    with pytest.raises(SchemaError) as info:
        p.validate(FEAT, "ll", max_len=4)
    assert info.value.field == "ll"
    with pytest.raises(SchemaError) as info:
        SequenceBatch(p.tokens.map(lambda a: a[0]), p.lengths).validate(FEAT, "rt")
    assert info.value.field == "rt.tokens"
    bad = dataclasses.replace(p.tokens, surfaces=p.tokens.surfaces[:, :4])
    with pytest.raises(SchemaError) as info:
        SequenceBatch(bad, p.lengths).validate(FEAT, "rt")
    assert info.value.field == "rt.tokens.surfaces"


def test_jagged_validation_2d_tokens_names_tokens():
    rng = np.random.default_rng(11)
    jag = random_jagged(rng, [2, 2])
    bad = JaggedSequences(jag.tokens.map(lambda a: a.reshape((2, 2) + a.shape[1:])), jag.offsets)
    with pytest.raises(SchemaError) as info:
        bad.validate(FEAT, "ll")
    assert info.value.field.startswith("ll.tokens"), str(info.value)


# ------------------------------------------------------------------------ training examples

def _valid_examples(feat=FEAT, sel=SEL, n=6, seed=0) -> TrainingExamples:
    rng = np.random.default_rng(seed)
    s = sel.s_all_len
    mask = rng.random((n, s)) < 0.7
    mask[0] = False  # an example with an empty S_all is valid
    tokens = TokenFields(
        timestamps=rng.integers(1, 10**9, (n, s)).astype(np.int64),
        actions=rng.integers(1, 1 << feat.num_actions, (n, s)).astype(feat.action_dtype),
        surfaces=rng.integers(0, feat.num_surfaces, (n, s)).astype(np.int16),
        embeddings=rng.integers(-127, 128, (n, s, feat.embedding_dim)).astype(np.int8),
    )
    tokens = tokens.map(lambda a: np.where(mask.reshape(mask.shape + (1,) * (a.ndim - 2)), a, 0).astype(a.dtype))
    rt = sel.segment("rt_recent")
    nal = mask[:, rt] & (rng.random((n, sel.r)) < 0.5)
    neg_mask = rng.random((n, sel.num_nal_negatives)) < 0.5
    negatives = rng.integers(-127, 128, (n, sel.num_nal_negatives, feat.embedding_dim)).astype(np.int8)
    negatives[~neg_mask] = 0
    ex = TrainingExamples(
        s_all=tokens, s_all_mask=mask,
        candidate_embedding=rng.integers(-127, 128, (n, feat.embedding_dim)).astype(np.int8),
        item_id=np.arange(n, dtype=np.int64), user_id=np.arange(n, dtype=np.int64) // 2,
        request_id=np.arange(n, dtype=np.int64) // 3, request_timestamp=np.full(n, 17, np.int64),
        dense=rng.normal(size=(n, feat.num_dense)).astype(np.float32),
        categorical=np.stack([rng.integers(0, v, n) for v in feat.categorical_vocab_sizes], 1).astype(np.int32),
        labels=rng.integers(0, 2, (n, feat.num_heads)).astype(np.uint8),
        nal_target_mask=nal, nal_negatives=negatives, nal_negative_mask=neg_mask)
    ex.validate(feat, sel)
    return ex


def _example_mutations():
    e = _valid_examples()
    rep = lambda **kw: dataclasses.replace(e, **kw)  # noqa: E731
    tok = lambda **kw: rep(s_all=dataclasses.replace(e.s_all, **kw))  # noqa: E731
    pad = np.argwhere(~e.s_all_mask[1:])[0] + [1, 0]  # a padding slot of example >= 1
    real = np.argwhere(e.s_all_mask)[0]
    rt = SEL.segment("rt_recent")
    rt_pad = np.argwhere(~e.s_all_mask[:, rt])
    assert len(rt_pad), "fixture needs a padding slot in S_RT[:r]"
    i, t = rt_pad[0]
    return {
        "mask dtype": (rep(s_all_mask=e.s_all_mask.astype(np.uint8)), "s_all_mask"),
        "mask width": (rep(s_all_mask=e.s_all_mask[:, :-1]), "s_all_mask"),
        "s_all timestamps dtype": (tok(timestamps=e.s_all.timestamps.astype(np.int32)), "s_all.timestamps"),
        "s_all length": (tok(embeddings=e.s_all.embeddings[:, :-1]), "s_all.embeddings"),
        "s_all surface range": (tok(surfaces=_set(e.s_all.surfaces, tuple(real), 8)), "s_all.surfaces"),
        "s_all embedding -128": (tok(embeddings=_set(e.s_all.embeddings, tuple(real) + (0,), -128)),
                                 "s_all.embeddings"),
        "padding embedding": (tok(embeddings=_set(e.s_all.embeddings, tuple(pad) + (3,), 5)), "s_all"),
        "padding actions": (tok(actions=_set(e.s_all.actions, tuple(pad), 1)), "s_all"),
        "candidate -128": (rep(candidate_embedding=_set(e.candidate_embedding, (2, 4), -128)),
                           "candidate_embedding"),
        "candidate dtype": (rep(candidate_embedding=e.candidate_embedding.astype(np.float32)),
                            "candidate_embedding"),
        "negatives -128": (rep(nal_negatives=_set(e.nal_negatives, (1, 0, 0), -128)), "nal_negatives"),
        "negatives padding": (rep(nal_negatives=_set(e.nal_negatives, tuple(np.argwhere(~e.nal_negative_mask)[0]) + (1,), 3)),
                              "nal_negatives"),
        "negatives count": (rep(nal_negatives=e.nal_negatives[:, :2]), "nal_negatives"),
        "negative mask dtype": (rep(nal_negative_mask=e.nal_negative_mask.astype(np.int8)), "nal_negative_mask"),
        "labels 2": (rep(labels=_set(e.labels, (3, 0), 2)), "labels"),
        "labels 255": (rep(labels=_set(e.labels, (0, 2), 255)), "labels"),
        "labels float": (rep(labels=e.labels.astype(np.float32)), "labels"),
        "dense NaN": (rep(dense=_set(e.dense, (4, 1), np.nan)), "dense"),
        "categorical range": (rep(categorical=_set(e.categorical, (0, 0), 1000)), "categorical[:, 0]"),
        "user_id rows": (rep(user_id=e.user_id[:-1]), "user_id"),
        "request_id dtype": (rep(request_id=e.request_id.astype(np.uint64)), "request_id"),
        "nal target on padding": (rep(nal_target_mask=_set(e.nal_target_mask, (i, t), True)), "nal_target_mask"),
        "nal target width": (rep(nal_target_mask=e.nal_target_mask[:, :1]), "nal_target_mask"),
    }


@pytest.mark.parametrize("case", list(_example_mutations()))
def test_training_example_validation_names_field(case):
    bad, field = _example_mutations()[case]
    with pytest.raises(SchemaError) as info:
        bad.validate(FEAT, SEL)
    assert info.value.field == field, str(info.value)


def test_training_example_padding_slots_must_be_zero_in_every_field():
    e = _valid_examples()
    pad = tuple(np.argwhere(~e.s_all_mask)[3])
    for f, value in (("timestamps", 99), ("surfaces", 3)):
        bad = dataclasses.replace(e, s_all=dataclasses.replace(e.s_all, **{f: _set(getattr(e.s_all, f), pad, value)}))
        with pytest.raises(SchemaError, match="padding") as info:
            bad.validate(FEAT, SEL)
        assert info.value.field == "s_all", f


def test_training_example_columns_select_concatenate():
    e = _valid_examples(n=7)
    specs = TrainingExamples.column_specs(FEAT, SEL)
    cols = e.columns()
    assert set(cols) == set(specs)
    assert specs["s_all.embeddings"] == (np.dtype(np.int8), (SEL.s_all_len, 32))
    assert specs["nal_target_mask"] == (np.dtype(bool), (2,))
    for name, (dtype, shape) in specs.items():
        assert cols[name].dtype == dtype and cols[name].shape == (7,) + shape, name
    back = TrainingExamples.from_columns(cols)
    for name, a in back.columns().items():
        np.testing.assert_array_equal(a, cols[name])
    parts = [e.select(slice(0, 3)), e.select(np.array([3])), e.select(slice(4, 7))]
    joined = TrainingExamples.concatenate(parts)
    assert len(joined) == 7
    for name, a in joined.columns().items():
        np.testing.assert_array_equal(a, cols[name], err_msg=name)
    picked = e.select(np.array([5, 1]))
    np.testing.assert_array_equal(picked.item_id, [5, 1])
    np.testing.assert_array_equal(picked.s_all.embeddings, e.s_all.embeddings[[5, 1]])
    picked.validate(FEAT, SEL)


# ----------------------------------------------------------------------------------- configs

def test_default_configs():
    feat, sel = FeatureConfig(), SelectionConfig()
    assert feat.num_actions == 8 and feat.num_surfaces == 8 and feat.embedding_dim == 32
    assert feat.quant_scale == 0.65 and feat.num_heads == 3
    assert feat.action_dtype == np.uint8
    assert feat.action_bit("click") == 1 and feat.action_bit("hide") == 128
    assert feat.positive_mask == 0b0111_1111 and feat.negative_mask == 0b1000_0000
    assert feat.action_mask(("repin", "share")) == 0b1_0010
    assert sel.s_all_len == 192
    assert [(n, s.start, s.stop) for n, s in sel.segments] == [
        ("ll", 0, 96), ("rt_recent", 96, 128), ("rt_nn", 128, 160), ("imp", 160, 192)]
    assert sel.segment("rt_nn") == slice(128, 160)
    assert (sel.max_ll_len, sel.max_rt_len, sel.max_imp_len) == (10_000, 100, 100)
    assert sel.max_lengths == {"ll": 10_000, "rt": 100, "imp": 100}
    assert list(SEL.max_lengths) == [name for name, _ in _valid_requests().sequences()]
    assert SEL.s_all_len == 11 and SEL.segment("imp") == slice(8, 11)


@pytest.mark.parametrize("a, dtype", [(1, np.uint8), (8, np.uint8), (9, np.uint16), (16, np.uint16),
                                      (17, np.uint32), (32, np.uint32)])
def test_action_dtype(a, dtype):
    feat = FeatureConfig(action_names=tuple(f"a{i}" for i in range(a)), positive_actions=("a0",),
                         negative_actions=())
    assert feat.action_dtype == np.dtype(dtype)
    assert feat.action_bit(f"a{a - 1}") == 1 << (a - 1)


@pytest.mark.parametrize("kwargs, field", [
    ({"action_names": ()}, "action_names"),
    ({"action_names": tuple(f"a{i}" for i in range(33)), "positive_actions": (), "negative_actions": ()},
     "action_names"),
    ({"positive_actions": ("click", "like")}, "positive_actions"),
    ({"negative_actions": ("dislike",)}, "negative_actions"),
    ({"positive_actions": ("click", "hide")}, "positive_actions"),
    ({"surface_names": ()}, "surface_names"),
    ({"embedding_dim": 0}, "embedding_dim"),
    ({"quant_scale": -0.65}, "quant_scale"),
    ({"quant_scale": 0.0}, "quant_scale"),
    ({"categorical_vocab_sizes": (10, 0)}, "categorical_vocab_sizes"),
])
def test_feature_config_rejects(kwargs, field):
    with pytest.raises(ValueError, match=field):
        FeatureConfig(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    ({"k_ll": -1}, "k_ll"),
    ({"r": 2.5}, "r"),
    ({"max_ll_len": -10}, "max_ll_len"),
    ({"k_imp": "32"}, "k_imp"),
    ({"num_nal_negatives": -1}, "num_nal_negatives"),
    ({"k_ll": 0, "r": 0, "k_rt": 0, "k_imp": 0}, "S_all"),
    ({"r": 101}, "r[=:] ?101 exceeds max_rt_len=100"),
    ({"max_rt_len": 10}, "r[=:] ?32 exceeds max_rt_len=10"),
])
def test_selection_config_rejects(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SelectionConfig(**kwargs)


def test_selection_config_small_values_ok():
    sel = SelectionConfig(k_ll=0, r=0, k_rt=0, k_imp=1, num_nal_negatives=0)
    assert sel.s_all_len == 1
    assert [(n, s.start, s.stop) for n, s in sel.segments] == [
        ("ll", 0, 0), ("rt_recent", 0, 0), ("rt_nn", 0, 0), ("imp", 0, 1)]
