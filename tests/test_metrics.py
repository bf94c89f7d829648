"""Tests of the offline metrics (paper §4.2.1) on small hand-checked cases."""
from __future__ import annotations

import itertools
import math

import jax.numpy as jnp
import numpy as np
import pytest

from transact_jax.eval import (
    MetricAccumulator,
    MetricInputError,
    auc,
    evaluate,
    hit_at_k,
    lift_pct,
    normalized_entropy,
    ranking_score,
)

HEADS = ("click", "repin", "hide")


# ------------------------------------------------------------------------------------ references

def _brute_hit(scores, labels, users, requests, k, ties):
    """HIT@K by a Python loop over chunks; "average" enumerates every order of tied rows."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    total = np.zeros(labels.shape[1])
    for key in sorted(set(zip(users.tolist(), requests.tolist()))):
        rows = [i for i in range(len(scores)) if (users[i], requests[i]) == key]
        if ties == "first":
            ranked = sorted(rows, key=lambda i: (-scores[i], i))
            total += labels[ranked[:k]].sum(axis=0)
            continue
        # all orders consistent with descending score, equally likely
        blocks = [list(g) for _, g in itertools.groupby(sorted(rows, key=lambda i: -scores[i]),
                                                         key=lambda i: scores[i])]
        orders = list(itertools.product(*[itertools.permutations(b) for b in blocks]))
        acc = np.zeros(labels.shape[1])
        for combo in orders:
            ranked = [i for block in combo for i in block]
            acc += labels[ranked[:k]].sum(axis=0)
        total += acc / len(orders)
    return total / len(set(users.tolist()))


def _brute_auc(p, y):
    pos = p[y == 1]
    neg = p[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def _random_data(rng, n, num_users=7, chunks_per_user=4, rounding=1):
    users = rng.integers(0, num_users, n)
    requests = rng.integers(0, chunks_per_user, n)       # request ids repeat across users on purpose
    probs = np.round(rng.random((n, 3)), rounding)       # coarse values -> many ties
    labels = (rng.random((n, 3)) < np.array([0.4, 0.3, 0.1])).astype(np.uint8)
    return probs, labels, users, requests


# ------------------------------------------------------------------------------------------ HIT@K

def test_paper_example_hit_at_3_repin_is_one():
    # chunk c = [p1, ..., p5] sorted by S; the user repins p1 and p4 -> gamma_{c,repin} = 1 for K = 3.
    # Rows are given out of order to check that the ranking, not the input order, decides.
    s = np.array([0.6, 0.9, 0.5, 0.7, 0.8])            # p4, p1, p5, p3, p2
    repin = np.array([1, 1, 0, 0, 0])                  # p4 and p1
    labels = repin[:, None]
    users = np.zeros(5, dtype=np.int64)
    requests = np.full(5, 42)
    assert hit_at_k(s, labels, users, requests, k=3).tolist() == [1.0]
    assert hit_at_k(s, labels, users, requests, k=4).tolist() == [2.0]
    assert hit_at_k(s, labels, users, requests, k=1).tolist() == [1.0]


def test_paper_example_through_evaluate():
    # probs of (click, repin, hide); weights (1, 1, 0) -> S = click + repin.
    probs = np.array([[0.3, 0.3, 0.0],   # p4: S = 0.6
                      [0.4, 0.5, 0.0],   # p1: S = 0.9
                      [0.2, 0.3, 0.0],   # p5: S = 0.5
                      [0.3, 0.4, 0.0],   # p3: S = 0.7
                      [0.4, 0.4, 0.0]])  # p2: S = 0.8
    labels = np.array([[0, 1, 0], [1, 1, 0], [0, 0, 0], [0, 0, 0], [1, 0, 0]], dtype=np.uint8)
    out = evaluate(probs, labels, np.zeros(5, np.int64), np.zeros(5, np.int64), HEADS, (1.0, 1.0, 0.0))
    assert out["hit@3/repin"] == 1.0
    assert out["hit@3/click"] == 2.0
    assert out["hit@3/hide"] == 0.0
    assert (out["num_users"], out["num_chunks"], out["num_examples"]) == (1, 1, 5)


def test_sum_over_chunks_divided_by_number_of_users():
    # user 10: chunk 1 has 2 hits in its top 3, chunk 2 has 1 hit; user 20: chunk 1 has 0 hits.
    # Chunk id 1 is shared by both users but they are different chunks.
    # HIT@3 = (2 + 1 + 0) / |U| = 3 / 2, not 3 / num_chunks.
    users = np.array([10, 10, 10, 10, 10, 10, 10, 20, 20, 20, 20])
    requests = np.array([1, 1, 1, 1, 2, 2, 2, 1, 1, 1, 1])
    s = np.array([0.9, 0.8, 0.7, 0.1, 0.5, 0.4, 0.3, 0.9, 0.8, 0.7, 0.6])
    y = np.array([1, 0, 1, 1, 0, 1, 0, 0, 0, 0, 1])[:, None]
    assert hit_at_k(s, y, users, requests, k=3).tolist() == [1.5]
    # row order must not matter
    perm = np.random.default_rng(0).permutation(len(s))
    assert hit_at_k(s[perm], y[perm], users[perm], requests[perm], k=3).tolist() == [1.5]
    out = evaluate(np.stack([s, s], 1), np.concatenate([y, y], 1), users, requests, ("a", "b"), (0.5, 0.5))
    assert out["hit@3/a"] == 1.5 and out["num_users"] == 2 and out["num_chunks"] == 3


def test_negative_hide_weight_changes_the_ranking():
    # probs (click, hide): a likely-hidden item with a high click probability.
    probs = np.array([[0.9, 0.9],    # a: S = 0.9 with w_hide = 0, 0.0 with w_hide = -1
                      [0.5, 0.0],    # b
                      [0.4, 0.0],    # c
                      [0.3, 0.0]])   # d
    labels = np.array([[0, 1], [0, 0], [0, 0], [1, 0]], dtype=np.uint8)  # a is hidden, d is clicked
    u = np.zeros(4, np.int64)
    r = np.zeros(4, np.int64)
    np.testing.assert_allclose(ranking_score(probs, (1.0, -1.0)), [0.0, 0.5, 0.4, 0.3])
    plain = evaluate(probs, labels, u, r, ("click", "hide"), {"click": 1.0, "hide": 0.0})
    with_hide = evaluate(probs, labels, u, r, ("click", "hide"), {"click": 1.0, "hide": -1.0})
    assert (plain["hit@3/click"], plain["hit@3/hide"]) == (0.0, 1.0)        # top 3 = a, b, c
    assert (with_hide["hit@3/click"], with_hide["hit@3/hide"]) == (1.0, 0.0)  # top 3 = b, c, d


def test_ties_first_vs_average():
    u = np.zeros(4, np.int64)
    r = np.zeros(4, np.int64)
    const = np.full(4, 0.5)
    # all tied: "first" takes rows 0, 1, 2 in input order; "average" gives 3/4 of the positives.
    assert hit_at_k(const, np.array([[0], [0], [0], [1]]), u, r, 3, "first").tolist() == [0.0]
    assert hit_at_k(const, np.array([[1], [0], [0], [0]]), u, r, 3, "first").tolist() == [1.0]
    assert hit_at_k(const, np.array([[0], [0], [0], [1]]), u, r, 3, "average").tolist() == [0.75]
    assert hit_at_k(const, np.array([[1], [0], [0], [0]]), u, r, 3, "average").tolist() == [0.75]
    # a tie block straddling the top-3 boundary: ranks 1..3 tied, 2 of those slots in the top 3.
    s = np.array([0.9, 0.5, 0.5, 0.5, 0.1])
    y = np.array([1, 0, 0, 1, 0])[:, None]
    u5, r5 = np.zeros(5, np.int64), np.zeros(5, np.int64)
    assert hit_at_k(s, y, u5, r5, 3, "first").tolist() == [1.0]
    assert hit_at_k(s, y, u5, r5, 3, "average")[0] == pytest.approx(1.0 + 2.0 / 3.0, abs=1e-15)
    # ties entirely inside the top K are not affected
    assert hit_at_k(s, y, u5, r5, 4, "average").tolist() == [2.0]


def test_constant_model_average_ties_gives_k_over_n_of_positives():
    rng = np.random.default_rng(1)
    n = 60
    users = np.repeat(np.arange(6), 10)
    requests = np.zeros(n, np.int64)
    labels = (rng.random((n, 2)) < 0.4).astype(np.uint8)
    hits = hit_at_k(np.zeros(n), labels, users, requests, k=3, ties="average")
    np.testing.assert_allclose(hits, labels.sum(0) * 3 / 10 / 6, rtol=0, atol=1e-12)


def test_chunk_smaller_than_k_counts_all_rows():
    users = np.array([0, 0, 1, 1, 1])
    requests = np.array([0, 0, 0, 0, 0])
    s = np.array([0.2, 0.1, 0.3, 0.2, 0.1])
    y = np.array([[1, 1], [1, 0], [0, 1], [1, 1], [1, 0]])
    # user 0: both rows count; user 1: all three rows count when K = 5.
    assert hit_at_k(s, y, users, requests, k=5).tolist() == [2.0, 1.5]
    assert hit_at_k(s, y, users, requests, k=5, ties="average").tolist() == [2.0, 1.5]
    # K = 3: user 0 (2 rows) still counts both; user 1 counts all 3 rows
    assert hit_at_k(s, y, users, requests, k=3).tolist() == [2.0, 1.5]


@pytest.mark.parametrize("ties", ["first", "average"])
def test_hit_matches_brute_force(ties):
    rng = np.random.default_rng(2)
    n = 90
    users = rng.integers(0, 5, n)
    requests = rng.integers(0, 4, n)
    scores = rng.integers(0, 3, n) / 2.0                 # heavy ties
    labels = (rng.random((n, 2)) < 0.3).astype(np.uint8)
    # keep chunks small enough for enumerating tie orders
    keep = np.zeros(n, bool)
    for key in set(zip(users.tolist(), requests.tolist())):
        idx = [i for i in range(n) if (users[i], requests[i]) == key][:6]
        keep[idx] = True
    scores, labels, users, requests = scores[keep], labels[keep], users[keep], requests[keep]
    for k in (1, 2, 3, 5):
        got = hit_at_k(scores, labels, users, requests, k=k, ties=ties)
        np.testing.assert_allclose(got, _brute_hit(scores, labels, users, requests, k, ties), atol=1e-12)


def test_hit_with_huge_ids():
    # hashed 64-bit ids: the chunk key falls back to dense ranks; result must not change
    rng = np.random.default_rng(8)
    probs, labels, users, requests = _random_data(rng, 200)
    s = ranking_score(probs, (1.0, 1.0, -1.0))
    want = hit_at_k(s, labels, users, requests, k=3)
    big_u = np.array([-(2 ** 63), 2 ** 63 - 1, 5, -7, 2 ** 40, 3, 11], dtype=np.int64)[users]
    big_r = (np.array([2 ** 64 - 1, 0, 2 ** 63, 17], dtype=np.uint64))[requests]
    np.testing.assert_array_equal(hit_at_k(s, labels, big_u, big_r, k=3), want)
    np.testing.assert_array_equal(hit_at_k(s, labels, big_u, requests, k=3), want)


def test_hit_accepts_jax_arrays():
    s = jnp.array([0.6, 0.9, 0.5, 0.7, 0.8])
    y = jnp.array([[1], [1], [0], [0], [0]], dtype=jnp.uint8)
    z = jnp.zeros(5, jnp.int32)
    assert hit_at_k(s, y, z, z, k=3).tolist() == [1.0]


# -------------------------------------------------------------------------------------------- AUC

def test_auc_hand_case():
    # positives 0.35, 0.8; negatives 0.1, 0.4 -> wins: (0.35>0.1), (0.8>0.1), (0.8>0.4) = 3 of 4
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    # a tie counts 1/2: positive 0.4 vs negative 0.4
    assert auc([0.1, 0.4, 0.4, 0.8], [0, 0, 1, 1]) == 0.875
    assert auc([0.1, 0.2, 0.3], [0, 1, 1]) == 1.0
    assert auc([0.3, 0.2, 0.1], [0, 1, 1]) == 0.0


def test_auc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(3)
    for _ in range(5):
        p = np.round(rng.random(400), 1)
        y = (rng.random(400) < 0.3).astype(np.uint8)
        assert auc(p, y) == pytest.approx(_brute_auc(p, y), abs=1e-12)


def test_auc_constant_predictions_and_single_class():
    y = np.array([0, 1, 1, 0, 1])
    assert auc(np.full(5, 0.3), y) == 0.5
    assert math.isnan(auc([0.1, 0.2, 0.3], [1, 1, 1]))
    assert math.isnan(auc([0.1, 0.2, 0.3], [0, 0, 0]))
    # only the order matters: logits give the same AUC
    p = np.array([0.1, 0.7, 0.4, 0.9, 0.2])
    assert auc(np.log(p / (1 - p)), y) == auc(p, y)


# --------------------------------------------------------------------------------------------- NE

def test_ne_hand_case():
    # base rate 1/2 -> entropy ln 2; BCE = -(2 ln 0.8 + 2 ln 0.6) / 4 = -ln(0.48) / 2
    ne = normalized_entropy([0.8, 0.2, 0.4, 0.6], [1, 0, 0, 1])
    assert ne == pytest.approx(-math.log2(0.48) / 2, rel=1e-12)
    assert ne == pytest.approx(0.5294468445267841, rel=1e-12)


def test_ne_base_rate_is_one_and_good_predictor_below_one():
    rng = np.random.default_rng(4)
    y = (rng.random(1000) < 0.2).astype(np.uint8)
    base = y.mean()
    assert normalized_entropy(np.full(1000, base), y) == pytest.approx(1.0, abs=1e-12)
    good = np.where(y == 1, 0.7, 0.05)
    assert normalized_entropy(good, y) < 0.6
    # a confidently wrong prediction is clipped, not infinite
    assert math.isfinite(normalized_entropy([0.0, 1.0], [1, 0]))
    assert math.isnan(normalized_entropy([0.1, 0.2], [0, 0]))


# --------------------------------------------------------------------------------- evaluate / acc

def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], float) and math.isnan(a[key]):
            assert math.isnan(b[key]), key
        else:
            assert a[key] == b[key], key


def test_evaluate_keys_and_values_match_single_metrics():
    rng = np.random.default_rng(5)
    probs, labels, users, requests = _random_data(rng, 300)
    w = np.array([1.0, 2.0, -1.5])
    out = evaluate(probs, labels, users, requests, HEADS, w, ks=(1, 3), ties="average")
    s = ranking_score(probs, w)
    for k in (1, 3):
        hits = hit_at_k(s, labels, users, requests, k=k, ties="average")
        for j, h in enumerate(HEADS):
            assert out[f"hit@{k}/{h}"] == hits[j]
    for j, h in enumerate(HEADS):
        assert out[f"auc/{h}"] == auc(probs[:, j], labels[:, j])
        assert out[f"ne/{h}"] == normalized_entropy(probs[:, j], labels[:, j])
    assert out["num_examples"] == 300
    assert out["num_users"] == len(set(users.tolist()))
    assert out["num_chunks"] == len(set(zip(users.tolist(), requests.tolist())))


@pytest.mark.parametrize("ties", ["first", "average"])
def test_accumulator_equals_evaluate_with_chunks_split_across_batches(ties):
    rng = np.random.default_rng(6)
    probs, labels, users, requests = _random_data(rng, 500)
    probs = probs.astype(np.float32)                      # what a model gives; exact as a JAX array
    weights = {"click": 1.0, "repin": 1.0, "hide": -2.0}
    want = evaluate(probs, labels, users, requests, HEADS, weights, ks=(1, 3, 10), ties=ties)
    acc = MetricAccumulator(HEADS, weights, ks=(1, 3, 10), ties=ties)
    cuts = [0, 37, 200, 201, 420, 500]   # rows are in random order, so chunks span several batches
    for a, b in zip(cuts[:-1], cuts[1:]):
        if a % 2:
            acc.add(jnp.asarray(probs[a:b]), jnp.asarray(labels[a:b]), jnp.asarray(users[a:b]),
                    jnp.asarray(requests[a:b]))
        else:
            acc.add(probs[a:b], labels[a:b], users[a:b], requests[a:b])
    assert acc.num_examples == 500
    _assert_same(acc.result(), want)
    acc.reset()
    with pytest.raises(ValueError, match="probs"):
        acc.result()


def test_accumulator_copies_its_inputs():
    probs = np.array([[0.9, 0.1, 0.0], [0.1, 0.9, 0.0]])
    labels = np.array([[1, 0, 0], [0, 1, 0]], np.uint8)
    ids = np.zeros(2, np.int64)
    acc = MetricAccumulator(HEADS, (1, 0, 0), ks=(1,))
    acc.add(probs, labels, ids, ids)
    probs[:] = 0.5
    assert acc.result()["hit@1/click"] == 1.0


def test_evaluate_large_random_inputs():
    rng = np.random.default_rng(7)
    n = 1_000_000
    probs = rng.random((n, 3)).astype(np.float32)
    labels = (rng.random((n, 3)) < 0.2).astype(np.uint8)
    users = rng.integers(0, 20_000, n)
    requests = rng.integers(0, 10, n)
    out = evaluate(probs, labels, users, requests, HEADS, (1.0, 1.0, -1.0), ks=(3,))
    assert out["num_examples"] == n
    assert 0.49 < out["auc/click"] < 0.51       # random scores: chance level
    # random scores: a chunk of n rows is expected to hold min(n, 3) x 0.2 positives in its top 3
    _, sizes = np.unique(users * 10 + requests, return_counts=True)
    expected = np.minimum(sizes, 3).sum() * 0.2 / out["num_users"]
    assert abs(out["hit@3/click"] - expected) < 0.01 * expected


# ------------------------------------------------------------------------------------------- lift

def test_lift_pct():
    assert lift_pct(1.1331, 1.0) == pytest.approx(13.31)
    assert lift_pct(0.8875, 1.0) == pytest.approx(-11.25)
    assert lift_pct(2.0, 2.0) == 0.0
    np.testing.assert_allclose(lift_pct(np.array([1.5, 0.5]), np.array([1.0, 1.0])), [50.0, -50.0])
    d = lift_pct({"hit@3/repin": 0.6, "hit@3/hide": 0.09, "num_users": 5},
                 {"hit@3/repin": 0.5, "hit@3/hide": 0.1, "num_users": 4, "auc/repin": 0.7})
    assert d.keys() == {"hit@3/repin", "hit@3/hide"}
    assert d["hit@3/repin"] == pytest.approx(20.0) and d["hit@3/hide"] == pytest.approx(-10.0)
    assert math.isnan(lift_pct(float("nan"), 1.0))
    with pytest.raises(ValueError, match="baseline"):
        lift_pct(1.0, 0.0)
    with pytest.raises(ValueError, match="baseline"):
        lift_pct(np.array([1.0, 1.0]), np.array([1.0, 0.0]))


# ------------------------------------------------------------------------------------- bad inputs

def _good():
    probs = np.array([[0.2, 0.5, 0.1], [0.7, 0.3, 0.0]])
    labels = np.array([[0, 1, 0], [1, 0, 0]], np.uint8)
    ids = np.array([1, 1])
    return probs, labels, ids, ids.copy()


@pytest.mark.parametrize("change, argument", [
    (lambda a: a.update(probs=np.array([[np.nan, 0.5, 0.1], [0.7, 0.3, 0.0]])), "probs"),
    (lambda a: a.update(probs=np.array([[1.2, 0.5, 0.1], [0.7, 0.3, 0.0]])), "probs"),
    (lambda a: a.update(probs=np.array([0.2, 0.7])), "probs"),
    (lambda a: a.update(probs=np.zeros((0, 3))), "probs"),
    (lambda a: a.update(labels=np.array([[0, 2, 0], [1, 0, 0]])), "labels"),
    (lambda a: a.update(labels=np.array([[0, 0.5, 0], [1, 0, 0]])), "labels"),
    (lambda a: a.update(labels=np.array([[0, 1], [1, 0]])), "labels"),
    (lambda a: a.update(labels=np.array([[0, 1, 0]])), "labels"),
    (lambda a: a.update(user_id=np.array([1, 2, 3])), "user_id"),
    (lambda a: a.update(user_id=np.array([1.0, 2.0])), "user_id"),
    (lambda a: a.update(request_id=np.array([[1, 2]])), "request_id"),
    (lambda a: a.update(request_id=np.array([True, False])), "request_id"),
    (lambda a: a.update(weights=(1.0, 1.0)), "weights"),
    (lambda a: a.update(weights=(1.0, np.nan, 1.0)), "weights"),
    (lambda a: a.update(weights={"click": 1.0, "repin": 1.0}), "weights"),
    (lambda a: a.update(heads=("click", "repin")), "heads"),
    (lambda a: a.update(ks=(0,)), "k"),
    (lambda a: a.update(ties="random"), "ties"),
])
def test_bad_inputs_raise_naming_the_argument(change, argument):
    probs, labels, users, requests = _good()
    args = dict(probs=probs, labels=labels, user_id=users, request_id=requests,
                heads=HEADS, weights=(1.0, 1.0, -1.0), ks=(3,), ties="first")
    change(args)
    with pytest.raises(ValueError, match=f"^{argument}:") as info:
        evaluate(**args)
    assert isinstance(info.value, MetricInputError)


def test_bad_inputs_single_functions():
    with pytest.raises(ValueError, match="^scores:"):
        hit_at_k(np.array([0.1, np.inf]), np.ones((2, 1)), np.zeros(2, int), np.zeros(2, int))
    with pytest.raises(ValueError, match="^k:"):
        hit_at_k(np.array([0.1, 0.2]), np.ones((2, 1)), np.zeros(2, int), np.zeros(2, int), k=2.5)
    with pytest.raises(ValueError, match="^labels:"):
        auc([0.1, 0.2], [0, 1, 1])
    with pytest.raises(ValueError, match="^probs:"):
        normalized_entropy([0.1, -0.2], [0, 1])
    with pytest.raises(ValueError, match="^probs:"):
        ranking_score(np.array([[0.5, 1.5]]), (1.0, 1.0))
    acc = MetricAccumulator(HEADS, (1.0, 1.0, -1.0))
    with pytest.raises(ValueError, match="^probs:"):
        acc.add(np.full((2, 2), 0.5), np.zeros((2, 2)), np.zeros(2, int), np.zeros(2, int))
    with pytest.raises(ValueError, match="^labels:"):
        acc.add(np.full((2, 3), 0.5), np.full((2, 3), 3), np.zeros(2, int), np.zeros(2, int))
