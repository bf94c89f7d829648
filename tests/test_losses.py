"""Tests of the objective (transact_jax/model/losses.py): eq. 1, eq. 5-7, NAL_in-batch negatives.

Every loss goes through ``jax.jit`` (which also checks that the functions trace without Python
control flow on values). Shapes are shared between tests so that each jitted function compiles only
a few times: on a small CPU, compilation dominates the runtime.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pallas_kernels.int8_codec import dequantize_int8
from transact_jax.model import losses
from transact_jax.model.losses import next_slot, total_loss

multi_head_bce = jax.jit(losses.multi_head_bce)
bce_value_and_grad = jax.jit(jax.value_and_grad(losses.multi_head_bce))
in_batch_negatives = jax.jit(losses.in_batch_negatives,
                             static_argnames=("num_negatives", "num_tries"))


@functools.lru_cache(maxsize=None)
def _nal_value_and_grad(kind: str):
    return jax.jit(jax.value_and_grad(functools.partial(losses.nal_loss, kind=kind),
                                      argnums=(0, 1, 3), has_aux=True))


def nal(u, p, tm, neg, nm, kind="sampled_softmax", pos_codes=None, neg_codes=None):
    """``(loss, aux, (d/d user_emb, d/d pos_emb, d/d neg_emb))`` of the jitted ``nal_loss``."""
    (loss, aux), grads = _nal_value_and_grad(kind)(
        u, p, np.asarray(tm, bool), neg, np.asarray(nm, bool), pos_codes=pos_codes,
        neg_codes=neg_codes)
    return loss, aux, grads


def softplus(x):
    return np.log1p(np.exp(x))


def nal_reference(u, p, tm, neg, nm, kind, pos_codes=None, neg_codes=None):
    """numpy version of the documented formulas (float64), keeping only valid negatives."""
    u, p, neg = (np.asarray(a, np.float64) for a in (u, p, neg))
    sp = np.einsum("ntd,ntd->nt", u, p)
    sn = np.einsum("ntd,nmd->ntm", u, neg)
    if pos_codes is None:
        hit = np.all(p[:, :, None] == neg[:, None], -1)
    else:
        hit = np.all(pos_codes[:, :, None] == neg_codes[:, None], -1)
    valid = tm[:, :, None] & nm[:, None, :] & ~hit
    if kind == "sampled_softmax":
        per = np.log(np.exp(sp) + np.sum(np.where(valid, np.exp(sn), 0), -1)) - sp
        pair = tm & valid.any(-1)
    else:
        k = valid.sum(-1)
        per = softplus(-sp) + np.sum(np.where(valid, softplus(sn), 0), -1) / np.maximum(k, 1)
        pair = tm
    return np.sum(np.where(pair, per, 0)) / max(pair.sum(), 1)


# ------------------------------------------------------------------------------ multi-head BCE

def test_bce_hand_computed_two_examples_three_heads():
    logits = np.array([[0.0, 2.0, -1.0], [1.0, -3.0, 0.5]], np.float32)
    labels = np.array([[1, 0, 1], [0, 1, 0]], np.uint8)
    w = np.array([1.0, 2.0, 0.5], np.float32)
    # BCE(z, 1) = log(1 + e^-z), BCE(z, 0) = log(1 + e^z)
    ex0 = 1.0 * np.log(1 + np.exp(-0.0)) + 2.0 * np.log(1 + np.exp(2.0)) \
        + 0.5 * np.log(1 + np.exp(1.0))
    ex1 = 1.0 * np.log(1 + np.exp(1.0)) + 2.0 * np.log(1 + np.exp(3.0)) \
        + 0.5 * np.log(1 + np.exp(0.5))
    got = multi_head_bce(logits, labels, w)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, (ex0 + ex1) / 2, rtol=1e-6)
    np.testing.assert_allclose(got, 6.750554, rtol=1e-5)


def test_bce_extreme_logits_finite_and_exact():
    logits = np.array([[100.0, -100.0, 100.0, -100.0]], np.float32)
    labels = np.array([[1, 1, 0, 0]], np.uint8)
    loss, grad = bce_value_and_grad(logits, labels, np.ones(4, np.float32))
    np.testing.assert_allclose(loss, 200.0, rtol=1e-6)
    np.testing.assert_allclose(grad, [[0.0, -1.0, 1.0, 0.0]], atol=1e-6)  # sigmoid(z) - y
    assert np.all(np.isfinite(grad))


def test_bce_example_weight_masks_padded_rows():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 3)).astype(np.float32)
    labels = rng.integers(0, 2, (4, 3)).astype(np.uint8)
    w = np.array([1.0, 3.0, 0.2], np.float32)
    padded = logits.copy()
    padded[3] = [np.nan, np.inf, 1e30]
    mask = np.array([1, 1, 1, 0], np.float32)
    loss, g = bce_value_and_grad(padded, labels, w, mask)
    np.testing.assert_allclose(loss, multi_head_bce(logits[:3], labels[:3], w), rtol=1e-6)
    assert np.all(np.isfinite(g)) and np.all(g[3] == 0)
    # weighted average: sum_n e_n L_n / sum_n e_n
    ew = np.array([2.0, 1.0, 0.0, 1.0], np.float32)
    per = np.sum(w * (softplus(logits) - labels * logits), axis=1)  # BCE = softplus(z) - y z
    np.testing.assert_allclose(bce_value_and_grad(logits, labels, w, ew)[0],
                               np.dot(ew, per) / ew.sum(), rtol=1e-6)
    # no active row -> 0 with zero gradient
    zero, g0 = bce_value_and_grad(logits, labels, w, np.zeros(4, np.float32))
    assert zero == 0.0 and np.all(g0 == 0)


# --------------------------------------------------------------------------------- NAL, eq. 5

def _one_example():
    """1 example, T=2 (target at t=0 only), D=2, M=3 (negative 2 is padding)."""
    u = np.array([[[1.0, 2.0], [7.0, -9.0]]], np.float32)
    p = np.array([[[0.5, 0.5], [3.0, 3.0]]], np.float32)                  # s_p = 1.5
    tm = np.array([[True, False]])
    n = np.array([[[1.0, 0.0], [0.0, -1.0], [1e30, -1e30]]], np.float32)  # s = 1, -2, pad
    nm = np.array([[True, True, False]])
    return u, p, tm, n, nm


def test_nal_sampled_softmax_hand_computed():
    loss, aux, grads = nal(*_one_example())
    want = -np.log(np.exp(1.5) / (np.exp(1.5) + np.exp(1.0) + np.exp(-2.0)))
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(loss, 0.492700, rtol=1e-5)   # = log(1 + e^-0.5 + e^-3.5)
    assert aux["num_pairs"] == 1 and aux["num_targets"] == 1 and aux["num_negatives"] == 2
    np.testing.assert_allclose(aux["pos_logit_mean"], 1.5)
    np.testing.assert_allclose(aux["neg_logit_mean"], -0.5)
    assert aux["accuracy"] == 1.0 and aux["accidental_hits"] == 0
    # d/d s_p = softmax_p - 1, and s_p = <u, p>: d/d p(t=0) = (softmax_p - 1) * u(t=0)
    sm_p = np.exp(1.5) / (np.exp(1.5) + np.exp(1.0) + np.exp(-2.0))
    np.testing.assert_allclose(grads[1][0, 0], (sm_p - 1) * np.array([1.0, 2.0]), rtol=1e-5)
    assert np.all(grads[1][0, 1] == 0) and np.all(grads[2][0, 2] == 0)


def test_nal_bce_variant_hand_computed():
    loss, aux, _ = nal(*_one_example(), kind="bce")
    # -log sigmoid(1.5) - 1/2 [log(1 - sigmoid(1)) + log(1 - sigmoid(-2))]
    want = softplus(-1.5) + 0.5 * (softplus(1.0) + softplus(-2.0))
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(loss, 0.921508, rtol=1e-5)
    assert aux["num_pairs"] == 1


def test_nal_unknown_kind_and_half_codes_rejected():
    u, p, tm, n, nm = _one_example()
    with pytest.raises(ValueError, match="kind"):
        losses.nal_loss(u, p, tm, n, nm, kind="hinge")
    with pytest.raises(ValueError, match="codes"):
        losses.nal_loss(u, p, tm, n, nm, pos_codes=np.zeros((1, 2, 2), np.int8))


@pytest.mark.parametrize("kind", ["sampled_softmax", "bce"])
def test_nal_extreme_logits_stable(kind):
    u = np.array([[[100.0, 0.0], [-100.0, 0.0]]], np.float32)
    p = np.array([[[10.0, 0.0], [10.0, 0.0]]], np.float32)        # s_p = +1000, -1000
    neg = np.array([[[-10.0, 0.0], [0.0, 0.0], [0.0, 0.0]]], np.float32)  # s_n = -1000, +1000
    loss, _, grads = nal(u, p, [[True, True]], neg, [[True, False, False]], kind=kind)
    # t=0 costs 0, t=1 costs 2000 (ssm: log(1 + e^2000); bce: 1000 + 1000); mean over 2 pairs
    np.testing.assert_allclose(loss, 1000.0, rtol=1e-6)
    assert all(np.all(np.isfinite(g)) for g in grads)


def _random_case(seed, n=6, t=5, m=7, d=4):
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(n, t, d)).astype(np.float32)
    p = rng.normal(size=(n, t, d)).astype(np.float32)
    neg = rng.normal(size=(n, m, d)).astype(np.float32)
    tm = rng.random((n, t)) < 0.6
    tm[0, 0] = True
    nm = rng.random((n, m)) < 0.6
    nm[:, 0] = True
    return u, p, tm, neg, nm


@pytest.mark.parametrize("with_codes", [True, False])
def test_nal_with_all_negatives_equals_full_softmax(with_codes):
    """Negatives = the whole vocabulary; the positive itself is an accidental hit and is masked, so
    the candidates are exactly the V vocabulary items: NAL == softmax cross-entropy over them."""
    n, t, v, d = 6, 5, 7, 4
    rng = np.random.default_rng(0)
    codes = rng.integers(-127, 128, (v, d)).astype(np.int8)
    codes[:, 0] = np.arange(v)  # distinct items
    vocab = np.asarray(dequantize_int8(codes))
    user = rng.normal(size=(n, t, d)).astype(np.float32) * 3
    labels = rng.integers(0, v, (n, t))
    tm = rng.random((n, t)) < 0.7
    tm[0, 0] = True
    kw = dict(pos_codes=codes[labels], neg_codes=np.broadcast_to(codes, (n, v, d)).copy()) \
        if with_codes else {}
    loss, aux, grads = nal(user, vocab[labels], tm, np.broadcast_to(vocab, (n, v, d)).copy(),
                           np.ones((n, v), bool), **kw)
    full_logits = np.einsum("ntd,vd->ntv", user, vocab)
    ce = jax.jit(optax.softmax_cross_entropy_with_integer_labels)(full_logits, labels)
    np.testing.assert_allclose(loss, np.sum(np.where(tm, ce, 0)) / tm.sum(), rtol=1e-5)
    shifted = full_logits - full_logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.sum(np.exp(shifted), -1, keepdims=True))  # log_softmax
    picked = np.take_along_axis(logp, labels[..., None], -1)[..., 0]
    np.testing.assert_allclose(loss, -np.sum(np.where(tm, picked, 0)) / tm.sum(), rtol=1e-5)
    assert aux["num_pairs"] == tm.sum() and aux["accidental_hits"] == tm.sum()
    acc = np.sum(tm & (np.argmax(full_logits, -1) == labels)) / tm.sum()
    np.testing.assert_allclose(aux["accuracy"], acc)
    # and the gradient w.r.t. u(t) is the full-softmax one: (softmax - onehot) @ vocab / #targets
    sm = np.exp(logp)
    want = np.einsum("ntv,vd->ntd", sm - np.eye(v)[labels], vocab) * tm[..., None] / tm.sum()
    np.testing.assert_allclose(grads[0], want, rtol=1e-4, atol=1e-7)


def test_accidental_hit_same_as_removing_it():
    u, p, tm, n, nm = _one_example()
    base, _, _ = nal(u, p, tm, n, nm)  # negative 2 is padding, i.e. removed
    # negative 2 becomes a real negative identical to the positive
    n_hit = n.copy()
    n_hit[0, 2] = p[0, 0]
    all_valid = np.ones((1, 3), bool)
    for kind in ("sampled_softmax", "bce"):
        loss, aux, _ = nal(u, p, tm, n_hit, all_valid, kind=kind)
        np.testing.assert_allclose(loss, nal(u, p, tm, n, nm, kind=kind)[0], rtol=1e-7)
        assert aux["accidental_hits"] == 1 and aux["num_negatives"] == 2
    # with codes, equality of the codes decides (the embeddings are not compared)
    pc = np.array([[[5, 5], [0, 0]]], np.int8)
    nc = np.array([[[1, 0], [0, -1], [5, 5]]], np.int8)
    loss_c, aux_c, _ = nal(u, p, tm, n_hit, all_valid, pos_codes=pc, neg_codes=nc)
    np.testing.assert_allclose(loss_c, base, rtol=1e-7)
    assert aux_c["accidental_hits"] == 1
    nc[0, 2] = [6, 5]  # different codes: a real negative now, although its embedding equals p
    loss_nohit, aux_nohit, _ = nal(u, p, tm, n_hit, all_valid, pos_codes=pc, neg_codes=nc)
    want = np.log(1 + np.exp(-0.5) + np.exp(-3.5) + np.exp(0.0))
    np.testing.assert_allclose(loss_nohit, want, rtol=1e-6)
    assert aux_nohit["accidental_hits"] == 0


def test_accidental_hits_are_per_target():
    """A negative equal to the positive of t=0 stays a negative for t=1."""
    u = np.array([[[1.0, 0.0], [0.0, 1.0]]], np.float32)
    p = np.array([[[2.0, 0.0], [0.0, 3.0]]], np.float32)
    n = np.array([[[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]]], np.float32)  # = p(t=0)
    loss, aux, _ = nal(u, p, [[True, True]], n, [[True, False, False]])
    # t=0: no negative left -> not a pair; t=1: log(1 + e^{0 - 3})
    np.testing.assert_allclose(loss, np.log1p(np.exp(-3.0)), rtol=1e-6)
    assert aux["num_pairs"] == 1 and aux["accidental_hits"] == 1


@pytest.mark.parametrize("kind", ["sampled_softmax", "bce"])
def test_masked_targets_and_negatives_ignored(kind):
    u, p, tm, neg, nm = _random_case(1)
    clean, _, g_clean = nal(u, p, tm, neg, nm, kind=kind)
    np.testing.assert_allclose(clean, nal_reference(u, p, tm, neg, nm, kind), rtol=1e-5)
    for junk in (1e30, np.inf, np.nan, -7.0):
        u2, p2, n2 = u.copy(), p.copy(), neg.copy()
        u2[~tm], p2[~tm], n2[~nm] = junk, -junk, junk
        loss, _, g = nal(u2, p2, tm, n2, nm, kind=kind)
        np.testing.assert_allclose(loss, clean, rtol=1e-6)
        for a, b in zip(g, g_clean):
            assert np.all(np.isfinite(a))
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        assert np.all(g[0][~tm] == 0) and np.all(g[1][~tm] == 0) and np.all(g[2][~nm] == 0)


@pytest.mark.parametrize("kind", ["sampled_softmax", "bce"])
def test_no_valid_pairs_gives_zero_and_finite_gradients(kind):
    u, p, _, neg, _ = _random_case(2)
    n, t, m = u.shape[0], u.shape[1], neg.shape[1]
    loss, aux, grads = nal(u, p, np.zeros((n, t), bool), neg, np.ones((n, m), bool), kind=kind)
    assert loss == 0.0 and aux["num_pairs"] == 0 and aux["accuracy"] == 0
    assert all(np.all(np.isfinite(v)) for v in aux.values())
    assert all(np.all(g == 0) for g in grads)
    # targets but no valid negative: sampled softmax has nothing to contrast -> 0;
    # bce keeps -log sigmoid(s_p)
    loss, aux, grads = nal(u, p, np.ones((n, t), bool), neg, np.zeros((n, m), bool), kind=kind)
    assert all(np.all(np.isfinite(g)) for g in grads)
    if kind == "sampled_softmax":
        assert loss == 0.0 and aux["num_pairs"] == 0
    else:
        np.testing.assert_allclose(loss, np.mean(softplus(-np.sum(u * p, -1))), rtol=1e-6)
        assert aux["num_pairs"] == n * t


@pytest.mark.parametrize("kind", ["sampled_softmax", "bce"])
def test_nal_int8_codes_matches_numpy_and_bf16(kind):
    u, _, tm, _, nm = _random_case(3)
    rng = np.random.default_rng(3)
    codes_p = rng.integers(-127, 128, tm.shape + (u.shape[2],)).astype(np.int8)
    codes_n = rng.integers(-127, 128, nm.shape + (u.shape[2],)).astype(np.int8)
    codes_n[1, 2], tm[1, 3], nm[1, 2] = codes_p[1, 3], True, True  # one accidental hit
    p, neg = np.asarray(dequantize_int8(codes_p)), np.asarray(dequantize_int8(codes_n))
    u = u * 3
    loss, aux, grads = nal(u, p, tm, neg, nm, kind=kind, pos_codes=codes_p, neg_codes=codes_n)
    np.testing.assert_allclose(
        loss, nal_reference(u, p, tm, neg, nm, kind, codes_p, codes_n), rtol=1e-5)
    assert aux["accidental_hits"] == 1
    assert all(np.all(np.isfinite(g)) for g in grads) and np.any(grads[0] != 0)
    if kind != "sampled_softmax":
        return
    # bf16 inputs: computed in float32, close to the float32 result
    bf = [jnp.asarray(a, jnp.bfloat16) for a in (u, p, neg)]
    loss16, _, grads16 = nal(bf[0], bf[1], tm, bf[2], nm, kind=kind, pos_codes=codes_p,
                             neg_codes=codes_n)
    assert loss16.dtype == jnp.float32 and grads16[0].dtype == jnp.bfloat16
    np.testing.assert_allclose(loss16, loss, rtol=2e-2)
    bce16 = multi_head_bce(jnp.asarray(u[:, 0, :3], jnp.bfloat16), tm[:, :3], jnp.ones(3))
    assert bce16.dtype == jnp.float32
    np.testing.assert_allclose(bce16, multi_head_bce(u[:, 0, :3], tm[:, :3], jnp.ones(3)),
                               rtol=2e-2)


def test_next_slot_and_total_loss():
    x = np.arange(2 * 6).reshape(2, 6)
    np.testing.assert_array_equal(next_slot(x, slice(1, 4)), x[:, 2:5])
    np.testing.assert_array_equal(next_slot(x, slice(3, 6)), np.pad(x[:, 4:6], [(0, 0), (0, 1)]))
    assert next_slot(np.ones((2, 6, 3)), slice(0, 2)).shape == (2, 2, 3)
    np.testing.assert_allclose(total_loss(2.0, 3.0, 0.1), 2.3)
    np.testing.assert_allclose(total_loss(2.0, 3.0), 2.03)  # default w_NAL = 0.01


# ------------------------------------------------------------------------------- NAL_in-batch

def _tagged_batch(user_id, lengths, t=5, d=4):
    """emb[i, t] = (i + 1, t, 1, 0) on valid slots: a negative names its source row and slot."""
    n = len(user_id)
    mask = np.arange(t)[None, :] < np.asarray(lengths)[:, None]
    emb = np.zeros((n, t, d), np.float32)
    emb[..., 0] = np.arange(n)[:, None] + 1
    emb[..., 1] = np.arange(t)[None, :]
    emb[..., 2] = 1
    emb[~mask] = 0
    codes = (emb * 10).astype(np.int8)
    return emb, mask, np.asarray(user_id, np.int64), codes


def test_in_batch_negatives_other_row_other_user_valid_tokens():
    emb, mask, uid, codes = _tagged_batch([7, 7, 8, 8, 9, 10], [5, 3, 0, 4, 2, 5])
    sources = {i: set() for i in range(6)}
    for seed in range(40):
        neg, nmask, ncodes = map(np.asarray, in_batch_negatives(
            emb, mask, uid, jax.random.key(seed), num_negatives=3, codes=codes))
        assert neg.shape == (6, 3, 4) and nmask.shape == (6, 3) and ncodes.dtype == np.int8
        np.testing.assert_array_equal(ncodes, (neg * 10).astype(np.int8))
        assert np.all(neg[~nmask] == 0)
        for i in range(6):
            rows = {int(r) - 1 for r in neg[i, nmask[i], 0]}
            assert len(rows) <= 1  # one source example per row
            for r in rows:
                assert r != i and uid[r] != uid[i]
                sources[i].add(r)
                slots = neg[i, nmask[i], 1].astype(int)
                assert len(set(slots)) == len(slots) and np.all(mask[r, slots])
                assert nmask[i].sum() == min(3, mask[r].sum())
    # rows of user 7 draw from every other user's rows with tokens (row 2 has none)
    assert sources[0] == sources[1] == {3, 4, 5}
    assert sources[5] == {0, 1, 3, 4}


def test_in_batch_negatives_same_user_masked_and_deterministic():
    emb, mask, uid, codes = _tagged_batch([4] * 6, [5] * 6)
    neg, nmask, ncodes = in_batch_negatives(emb, mask, uid, jax.random.key(0), num_negatives=3,
                                            codes=codes)
    assert not np.any(nmask) and np.all(np.asarray(neg) == 0) and np.all(np.asarray(ncodes) == 0)
    # a single example has nobody else to draw from
    _, nm1, _ = losses.in_batch_negatives(emb[:1], mask[:1], uid[:1], jax.random.key(0), 2)
    assert nm1.shape == (1, 2) and not np.any(nm1)
    # deterministic for a key, and the key matters
    emb, mask, uid, codes = _tagged_batch(list(range(6)), [5] * 6)
    a, b, c = (in_batch_negatives(emb, mask, uid, jax.random.key(k), num_negatives=3, codes=codes)
               for k in (3, 3, 4))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert np.any(np.asarray(a[0]) != np.asarray(c[0]))


def test_in_batch_negatives_pad_to_m_and_feed_nal():
    emb, mask, uid, codes = _tagged_batch([1, 2, 3, 4, 5, 6], [5, 4, 5, 3, 1, 2])
    neg, nmask, ncodes = in_batch_negatives(emb, mask, uid, jax.random.key(0), num_negatives=7,
                                            codes=codes)
    assert neg.shape == (6, 7, 4) and ncodes.shape == (6, 7, 4)
    src = np.asarray(neg)[:, 0, 0].astype(int) - 1   # M > T: all valid tokens of the source row
    np.testing.assert_array_equal(np.asarray(nmask).sum(1), mask[src].sum(1))
    assert not np.any(np.asarray(nmask)[:, 5:])
    # without codes, no codes come back
    assert jax.eval_shape(functools.partial(losses.in_batch_negatives, num_negatives=7),
                          emb, mask, uid, jax.random.key(0))[2] is None
    loss, aux, grads = nal(emb * 0.1, emb, mask, neg, nmask, pos_codes=codes, neg_codes=ncodes)
    np.testing.assert_allclose(
        loss, nal_reference(emb * 0.1, emb, mask, np.asarray(neg), np.asarray(nmask),
                            "sampled_softmax", codes, np.asarray(ncodes)), rtol=1e-5)
    assert loss > 0 and aux["num_pairs"] == mask.sum() and aux["accidental_hits"] == 0
