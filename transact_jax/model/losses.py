"""Training objective of TransAct V2 (paper §3.1, §3.3, eq. 1 and 5-7).

    L = L_CE + w_NAL * L_NAL                                                   (eq. 7)

Notation (paper §3.3.1), explained once:

* ``u(t)``     - the transformer output of the user's sequence at position t of the S_RT[:r] segment
  (causal mask, so it has seen tokens 0..t only), projected by the model's learned ``P`` to the
  item-embedding width D = 32: ``user_emb = P u(t)``.
* ``p_u(t+1)`` - the (dequantized, "PinSage") embedding of the token at t+1 when that token is a
  positive engagement: the positive of the pair (u, t). Build it with :func:`next_slot`.
* ``n_u``      - the negatives of user u: the user's own recent impressions (NAL_imp, the default,
  ``TrainingExamples.nal_negatives``) or tokens of another user of the batch (NAL_in-batch,
  :func:`in_batch_negatives`).
* ``w_NAL``    - weight of the Next Action Loss in eq. 7 (default 0.01, Table 6).
* ``w_h``      - loss weight of prediction head h in eq. 1.

Choices (documented here, tested in ``tests/test_losses.py``):

* :func:`multi_head_bce` is eq. 1, ``sum_h w_h BCE_h``, averaged over (optionally weighted)
  examples.
* :func:`nal_loss` is eq. 5 *averaged* over valid (u, t) pairs, where eq. 6 sums them: with the
  mean, the scale of L_NAL and hence the meaning of w_NAL do not depend on the batch size, on r, or
  on how many positions happen to be positive engagements.
* A sampled-softmax pair needs at least one valid negative: with none, eq. 5 is identically 0 (and
  so is its gradient), so such pairs are left out of the mean instead of diluting it.
* Accidental hits: a negative that *is* the positive item (equal int8 codes when codes are given,
  otherwise bit-equal embeddings) is masked out for that pair only.
* Everything is computed in float32 whatever the input dtype; masked inputs are replaced by zeros
  before use, so padding may hold any value (even inf/NaN) without changing the loss or its
  gradient.
* With no valid example / pair, a loss is exactly 0 with zero (finite) gradients.

All functions are pure ``jax.numpy`` and jit-able (shapes and ``kind`` are static).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array

NAL_KINDS: Tuple[str, ...] = ("sampled_softmax", "bce")
"""``kind`` values of :func:`nal_loss`: eq. 5 (default) or the cross-entropy NAL of Table 7."""

DEFAULT_W_NAL: float = 0.01
"""w_NAL chosen by the paper (Table 6)."""


def _f32(x) -> Array:
    return jnp.asarray(x).astype(jnp.float32)


def _safe_mean(total: Array, count: Array) -> Array:
    """``total / count``, 0 where ``count == 0`` (no NaN in value or gradient)."""
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


# ------------------------------------------------------------------------------------ eq. 1

def multi_head_bce(logits: Array, labels: Array, head_weights: Array,
                   example_weight: Optional[Array] = None) -> Array:
    """Weighted multi-head binary cross-entropy L_CE (eq. 1), averaged over examples.

    For example x with logits z_h and labels y_h in {0, 1} (soft labels also work):

        L_CE(x) = sum_h w_h * -[y_h log sigmoid(z_h) + (1 - y_h) log sigmoid(-z_h)]

    computed with ``jax.nn.log_sigmoid`` (finite for any finite logit, e.g. ±100). The result is
    ``sum_n e_n L_CE(x_n) / sum_n e_n`` with example weights e_n (all 1 by default; a 0/1 mask drops
    padded batch rows, whose logits may then be arbitrary). 0 if the weights sum to 0.

    Args:
      logits: (N, H) one logit per head (any float dtype).
      labels: (N, H) 0/1 labels (uint8, bool or float).
      head_weights: (H,) the w_h.
      example_weight: optional (N,) non-negative example weights.

    Returns:
      float32 scalar.
    """
    z = _f32(logits)
    y = _f32(labels)
    w = _f32(head_weights)
    ew = jnp.ones(z.shape[:1], jnp.float32) if example_weight is None else _f32(example_weight)
    active = ew != 0
    z = jnp.where(active[:, None], z, 0.0)
    y = jnp.where(active[:, None], y, 0.0)
    bce = -(y * jax.nn.log_sigmoid(z) + (1.0 - y) * jax.nn.log_sigmoid(-z))  # (N, H)
    per_example = jnp.sum(bce * w[None, :], axis=-1)
    total = jnp.sum(jnp.where(active, ew * per_example, 0.0))
    return _safe_mean(total, jnp.sum(jnp.where(active, ew, 0.0)))


# ---------------------------------------------------------------------------------- eq. 5-6

def next_slot(x: Array, segment: slice) -> Array:
    """The slot after each slot of ``segment`` along axis 1: ``x[:, s + 1]`` for s in ``segment``.

    With ``segment = SelectionConfig.segment("rt_recent")`` and ``x`` the (dequantized) S_all
    embeddings (N, |S_all|, D) or their int8 codes, this is p_u(t+1) for t = 0..r-1, aligned with
    ``TrainingExamples.nal_target_mask``. A slot past the end of ``x`` reads as zeros (it is never a
    target: position r-1 has no next token inside S_RT[:r]).
    """
    start, stop = segment.start + 1, segment.stop + 1
    length = segment.stop - segment.start
    out = x[:, start:min(stop, x.shape[1])]
    missing = length - out.shape[1]
    if missing > 0:
        pad = [(0, 0)] * x.ndim
        pad[1] = (0, missing)
        out = jnp.pad(out, pad)
    return out


def _accidental_hits(pos: Array, neg: Array) -> Array:
    """(N, T, M) bool: negative j of example n equals the positive of (n, t) in every component."""
    return jnp.all(pos[:, :, None, :] == neg[:, None, :, :], axis=-1)


def nal_loss(user_emb: Array, pos_emb: Array, target_mask: Array, neg_emb: Array, neg_mask: Array,
             *, pos_codes: Optional[Array] = None, neg_codes: Optional[Array] = None,
             kind: str = "sampled_softmax") -> Tuple[Array, Dict[str, Array]]:
    """Next Action Loss L_NAL (eq. 5-6), averaged over valid (u, t) pairs.

    A pair (n, t) is a target when ``target_mask[n, t]``; its negatives are the j with
    ``neg_mask[n, j]`` that are not accidental hits (negative j equal to the positive of (n, t):
    equal int8 codes when ``pos_codes``/``neg_codes`` are given, else bit-equal embeddings). With
    logits ``s_p = <P u(t), p(t+1)>`` and ``s_j = <P u(t), n_j>``:

    * ``kind="sampled_softmax"`` (eq. 5): ``-log(e^{s_p} / (e^{s_p} + sum_j e^{s_j}))``
      = ``logsumexp(s_p, s_1, ..., s_k) - s_p``. Pairs with at least one valid negative are
      averaged.
    * ``kind="bce"`` (cross-entropy NAL, paper Table 7): ``-log sigmoid(s_p)
      - (1/k) sum_j log(1 - sigmoid(s_j))`` over the k valid negatives of the pair (the negative
      term is 0 when k = 0); every target pair is averaged. The positive term and the mean negative
      term weigh equally.

    Args:
      user_emb: (N, T, D) P u(t), already projected to the item-embedding width.
      pos_emb: (N, T, D) embedding of the token at t+1 (see :func:`next_slot`).
      target_mask: (N, T) bool, True for valid targets.
      neg_emb: (N, M, D) negatives of each example.
      neg_mask: (N, M) bool, True for real negatives.
      pos_codes, neg_codes: optional int8 codes (N, T, D) / (N, M, D) of positives and negatives
        for accidental-hit detection (give both or neither).
      kind: "sampled_softmax" or "bce".

    Returns:
      ``(loss, aux)``: float32 scalar loss (0 when there is no valid pair) and a dict of float32
      scalars without gradient: ``num_pairs`` (pairs averaged), ``num_targets``, ``num_negatives``
      (valid (pair, negative) combinations), ``pos_logit_mean`` (over targets), ``neg_logit_mean``
      (over valid negatives of targets), ``accuracy`` (fraction of targets with at least one
      negative whose positive logit beats every negative logit), ``accidental_hits`` (masked
      (pair, negative) combinations).
    """
    if kind not in NAL_KINDS:
        raise ValueError(f"kind must be one of {NAL_KINDS}, got {kind!r}")
    if (pos_codes is None) != (neg_codes is None):
        raise ValueError("give both pos_codes and neg_codes, or neither")
    tmask = jnp.asarray(target_mask).astype(bool)
    nmask = jnp.asarray(neg_mask).astype(bool)
    # masked inputs -> 0 so that padding (even inf/NaN) touches neither the value nor the gradient
    u = jnp.where(tmask[..., None], _f32(user_emb), 0.0)
    p = jnp.where(tmask[..., None], _f32(pos_emb), 0.0)
    n = jnp.where(nmask[..., None], _f32(neg_emb), 0.0)

    hp = jax.lax.Precision.HIGHEST  # D = 32: exact f32 costs nothing, and no TF32 on GPU
    pos_logit = jnp.sum(u * p, axis=-1)                                     # (N, T)
    neg_logit = jnp.einsum("ntd,nmd->ntm", u, n, precision=hp)              # (N, T, M)

    if pos_codes is not None:
        hit = _accidental_hits(jnp.asarray(pos_codes), jnp.asarray(neg_codes))
    else:
        hit = _accidental_hits(p, n)
    candidate = tmask[:, :, None] & nmask[:, None, :]
    valid = candidate & ~hit                                                # (N, T, M)
    num_neg = jnp.sum(valid, axis=-1).astype(jnp.float32)                   # (N, T)
    has_neg = tmask & (num_neg > 0)
    neg_logit = jnp.where(valid, neg_logit, 0.0)

    if kind == "sampled_softmax":
        # stable logsumexp over {s_p} U {s_j valid}; invalid entries are replaced before exp
        m = jnp.maximum(pos_logit, jnp.max(jnp.where(valid, neg_logit, -jnp.inf), axis=-1))
        m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
        shifted = jnp.where(valid, neg_logit, m[..., None]) - m[..., None]
        neg_exp = jnp.where(valid, jnp.exp(shifted), 0.0)
        total_exp = jnp.exp(pos_logit - m) + jnp.sum(neg_exp, axis=-1)     # >= exp(0) = 1 for pairs
        per_pair = jnp.log(jnp.where(has_neg, total_exp, 1.0)) + m - pos_logit
        pair = has_neg
    else:
        neg_term = jnp.sum(jnp.where(valid, -jax.nn.log_sigmoid(-neg_logit), 0.0), axis=-1)
        per_pair = -jax.nn.log_sigmoid(pos_logit) + _safe_mean(neg_term, num_neg)
        pair = tmask

    num_pairs = jnp.sum(pair).astype(jnp.float32)
    loss = _safe_mean(jnp.sum(jnp.where(pair, per_pair, 0.0)), num_pairs)

    sg = jax.lax.stop_gradient
    num_targets = jnp.sum(tmask).astype(jnp.float32)
    beats = pos_logit > jnp.max(jnp.where(valid, neg_logit, -jnp.inf), axis=-1)
    aux = {
        "num_pairs": num_pairs,
        "num_targets": num_targets,
        "num_negatives": jnp.sum(num_neg),
        "pos_logit_mean": sg(_safe_mean(jnp.sum(jnp.where(tmask, pos_logit, 0.0)), num_targets)),
        "neg_logit_mean": sg(_safe_mean(jnp.sum(neg_logit), jnp.sum(num_neg))),
        "accuracy": _safe_mean(jnp.sum(has_neg & beats).astype(jnp.float32),
                               jnp.sum(has_neg).astype(jnp.float32)),
        "accidental_hits": jnp.sum(candidate & hit).astype(jnp.float32),
    }
    return loss, aux


# -------------------------------------------------------------------------- NAL_in-batch

def in_batch_negatives(emb: Array, mask: Array, user_id: Array, key: Array, num_negatives: int,
                       codes: Optional[Array] = None, *, num_tries: int = 8
                       ) -> Tuple[Array, Array, Optional[Array]]:
    """NAL_in-batch negatives (paper §3.3.2): tokens of another, randomly chosen user of the batch.

    For each example i a source example j != i is drawn: ``num_tries`` independent uniform draws
    among the other N-1 rows (``j = (i + s) mod N`` with s uniform in [1, N-1]), keeping the first
    draw whose ``user_id`` differs from i's. The kept draw is uniform over the rows of other users.
    (A batch holds one row per (request, candidate), so many rows share a user; retrying keeps those
    from wasting the negatives.) If every draw hits the same user, the row gets no negatives (mask
    all False): negatives of the same user are not "another user". Then up to ``num_negatives``
    valid tokens of j's sequence are taken: all of them if it has at most that many, otherwise a
    uniformly random subset. Deterministic given ``key``.

    Args:
      emb: (N, T, D) token embeddings, e.g. the dequantized S_RT[:r] segment of S_all.
      mask: (N, T) bool, valid tokens.
      user_id: (N,) integer user ids (with jax x64 disabled they are truncated to 32 bits; a
        collision can only mask more, never let a same-user negative through).
      key: a ``jax.random`` key.
      num_negatives: M, static.
      codes: optional (N, T, D) int8 codes of the tokens, gathered alongside (for accidental hits).
      num_tries: static number of draws per example.

    Returns:
      ``(neg_emb (N, M, D), neg_mask (N, M) bool, neg_codes (N, M, D) or None)``; masked slots
      hold 0.
    """
    emb = jnp.asarray(emb)
    mask = jnp.asarray(mask).astype(bool)
    user_id = jnp.asarray(user_id)
    n, t = mask.shape
    m = int(num_negatives)
    codes = None if codes is None else jnp.asarray(codes)
    if n < 2 or m == 0:  # static: no other example to draw from
        neg_codes = None if codes is None else jnp.zeros((n, m) + codes.shape[2:], codes.dtype)
        return (jnp.zeros((n, m) + emb.shape[2:], emb.dtype), jnp.zeros((n, m), bool), neg_codes)

    # one uniform draw serves both choices (a single threefry call: cheaper to compile than two)
    r = jax.random.uniform(key, (num_tries * n + n * t,))
    rows = jnp.arange(n)
    shifts = 1 + jnp.minimum(jnp.floor(r[:num_tries * n] * (n - 1)), n - 2).astype(jnp.int32)
    shifts = shifts.reshape(num_tries, n)                                  # uniform in [1, N-1]
    cand = (rows[None, :] + shifts) % n                                    # (tries, N), never i
    differs = user_id[cand] != user_id[None, :]
    first = jnp.argmax(differs, axis=0)                     # first success (0 if none succeeds)
    src = cand[first, rows]                                                # (N,)
    other_user = differs[first, rows]

    src_mask = mask[src]                                                   # (N, T)
    scores = jnp.where(src_mask, r[num_tries * n:].reshape(n, t), 2.0)  # valid tokens first
    take = min(m, t)
    order = jnp.argsort(scores, axis=1)[:, :take]                          # (N, take)
    neg_mask = jnp.take_along_axis(src_mask, order, axis=1) & other_user[:, None]

    def gather(x: Array) -> Array:
        g = x[src[:, None], order]                                         # (N, take, ...)
        keep = neg_mask.reshape(neg_mask.shape + (1,) * (g.ndim - 2))
        g = jnp.where(keep, g, jnp.zeros((), g.dtype))
        if take < m:
            g = jnp.pad(g, [(0, 0), (0, m - take)] + [(0, 0)] * (g.ndim - 2))
        return g

    neg_emb = gather(emb)
    neg_codes = None if codes is None else gather(codes)
    if take < m:
        neg_mask = jnp.pad(neg_mask, [(0, 0), (0, m - take)])
    return neg_emb, neg_mask, neg_codes


# ------------------------------------------------------------------------------------ eq. 7

def total_loss(ce: Array, nal: Array, w_nal: float = DEFAULT_W_NAL) -> Array:
    """Eq. 7: ``L = L_CE + w_NAL * L_NAL``."""
    return ce + w_nal * nal
