"""NN feature selection and S_all assembly for whole request batches (SPEC §2, paper §3.4.1).

:func:`select_s_all` runs NN selection (the pure-jnp reference in ``pallas_kernels``) for every
candidate of a de-duplicated :class:`~transact_jax.data.schema.RequestBatch` and gathers the selected
tokens into the fixed S_all slots::

    S_all = NN(S_LL, c; K_LL) ⊕ S_RT[:r] ⊕ NN(S_RT[r:], c; K_RT) ⊕ NN(S_imp, c; K_imp)

With sequences stored chronologically, ``S_RT[:r]`` (the r most recent real-time actions) are the
*last* r tokens of S_RT and ``S_RT[r:]`` the older prefix. :func:`log_nn_features` turns requests
with labels into :class:`~transact_jax.data.schema.TrainingExamples`: the "NN feature logging" of
paper §3.4.1, which stores |S_all| tokens per example instead of the full O(L) sequences.

Work is grouped by request, never broadcast: each request's sequence is scored against all of its
candidates at once (``nn_search_grouped_reference``), and requests are processed in chunks of similar
lifelong length with bucketed shapes so that jit compiles a handful of shapes only.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import numpy as np

from pallas_kernels.int8_codec import dequantize_int8
from pallas_kernels.nn_search_reference import PAD_INDEX, nn_search_grouped_reference
from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data.schema import (
    JaggedSequences,
    RequestBatch,
    SchemaError,
    TokenFields,
    TrainingExamples,
)

_SCORE_BUDGET = 1 << 25  # score-matrix elements (U x N x L) per jitted call: 128 MB of float32


@dataclasses.dataclass(frozen=True)
class SAll:
    """S_all of N candidates: ``tokens`` (N, |S_all|), ``mask`` (N, |S_all|), ``source_index``
    (N, |S_all|) int32 position of each token in its source sequence (-1 for padding)."""

    tokens: TokenFields
    mask: np.ndarray
    source_index: np.ndarray


def bucket_length(n: int) -> int:
    """Shape bucket for a sequence length: powers of two up to 1024, then multiples of 1024."""
    if n <= 16:
        return 16
    if n <= 1024:
        return 1 << (n - 1).bit_length()
    return -(-n // 1024) * 1024


def _group_candidates(cand_to_req: np.ndarray, num_req: int) -> Tuple[np.ndarray, np.ndarray]:
    """Slot of each candidate in a (num_req, N_max) grid: returns (rank_in_request, counts)."""
    order = np.argsort(cand_to_req, kind="stable")
    counts = np.bincount(cand_to_req, minlength=num_req)
    starts = np.zeros(num_req, np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    rank = np.empty(len(cand_to_req), np.int64)
    rank[order] = np.arange(len(cand_to_req)) - starts[cand_to_req[order]]
    return rank, counts


def nn_select(seqs: JaggedSequences, lengths: np.ndarray, cand: np.ndarray, cand_to_req: np.ndarray,
              k: int, scale: float) -> np.ndarray:
    """NN(S, c; k) indices (N, k) for candidates ``cand`` (N, D) float against jagged ``seqs``.

    Indices are positions inside each request's sequence (-1 for padding). ``lengths`` (U,) is the
    searched prefix of each sequence (``seqs.lengths``, or less to search only ``S_RT[r:]``).
    Requests are processed in chunks of similar length, each padded to a shape bucket; only the
    chunk's rows are ever densified.
    """
    n = len(cand_to_req)
    out = np.full((n, k), PAD_INDEX, np.int32)
    if n == 0 or k == 0:
        return out
    u = len(lengths)
    rank, counts = _group_candidates(cand_to_req, u)
    order = np.argsort(lengths, kind="stable")  # similar lengths share a chunk
    order = order[counts[order] > 0]            # requests without candidates need no search
    emb = seqs.tokens.embeddings
    start = 0
    while start < len(order):
        # grow the chunk while the bucketed score matrix stays within budget
        stop, n_max = start + 1, int(counts[order[start]])
        while stop < len(order):
            l_b = bucket_length(max(int(lengths[order[stop]]), 1))
            n_next = max(n_max, int(counts[order[stop]]))
            if bucket_length(stop + 1 - start) * bucket_length(n_next) * l_b > _SCORE_BUDGET:
                break
            stop, n_max = stop + 1, n_next
        rows = order[start:stop]
        l_b = bucket_length(max(int(lengths[rows].max()), 1))
        u_b, n_b = bucket_length(len(rows)), bucket_length(n_max)
        pos = np.arange(l_b)[None, :]
        inside = pos < lengths[rows, None]
        src = np.where(inside, seqs.offsets[rows, None] + pos, 0)
        seq = np.zeros((u_b, l_b, emb.shape[-1]), np.int8)
        seq[:len(rows)] = np.where(inside[..., None], emb[src] if len(emb) else 0, 0)
        lens = np.zeros(u_b, np.int32)
        lens[:len(rows)] = lengths[rows]
        slot_of_req = np.full(u, -1, np.int64)
        slot_of_req[rows] = np.arange(len(rows))
        mine = np.nonzero(slot_of_req[cand_to_req] >= 0)[0]
        grid = np.zeros((u_b, n_b, cand.shape[-1]), np.float32)
        grid[slot_of_req[cand_to_req[mine]], rank[mine]] = cand[mine]
        idx, _ = nn_search_grouped_reference(seq, lens, grid, k=k, scale=scale)
        out[mine] = np.asarray(idx)[slot_of_req[cand_to_req[mine]], rank[mine]]
        start = stop
    return out


def _recent_index(lengths: np.ndarray, count: int) -> np.ndarray:
    """(U, count) positions of the ``count`` most recent tokens, chronological, -1 padding last."""
    start = np.maximum(lengths.astype(np.int64) - count, 0)[:, None]
    idx = start + np.arange(count)[None, :]
    return np.where(idx < lengths[:, None], idx, PAD_INDEX).astype(np.int32)


def _gather_into(out: TokenFields, slots: slice, seqs: JaggedSequences, rows: np.ndarray,
                 idx: np.ndarray) -> np.ndarray:
    """Write tokens ``seqs[rows[i]][idx[i, j]]`` into ``out[i, slots]``; returns the (N, k) mask.

    Slots where ``idx == -1`` are left as they are (zeros in a fresh buffer).
    """
    mask = idx >= 0
    if not mask.any():
        return mask
    flat = np.where(mask, seqs.offsets[rows][:, None] + idx, 0)
    for f in dataclasses.fields(TokenFields):
        got = getattr(seqs.tokens, f.name)[flat]
        got[~mask] = 0
        getattr(out, f.name)[:, slots] = got
    return mask


def select_s_all(requests: RequestBatch, feat: FeatureConfig, sel: SelectionConfig) -> SAll:
    """Build S_all for every candidate of ``requests`` (see module docstring)."""
    cand = dequantize_int8(requests.cand_embedding, feat.quant_scale)
    c2r = requests.cand_to_req
    rt_len = requests.rt.lengths
    rt_old = np.maximum(rt_len - sel.r, 0).astype(np.int32)
    segment_index = {
        "ll": nn_select(requests.ll, requests.ll.lengths, cand, c2r, sel.k_ll, feat.quant_scale),
        "rt_recent": _recent_index(rt_len, sel.r)[c2r],
        "rt_nn": nn_select(requests.rt, rt_old, cand, c2r, sel.k_rt, feat.quant_scale),
        "imp": nn_select(requests.imp, requests.imp.lengths, cand, c2r, sel.k_imp, feat.quant_scale),
    }
    source = {"ll": requests.ll, "rt_recent": requests.rt, "rt_nn": requests.rt, "imp": requests.imp}
    n = len(c2r)
    tokens = TokenFields.empty((n, sel.s_all_len), feat)
    mask = np.zeros((n, sel.s_all_len), bool)
    index = np.full((n, sel.s_all_len), PAD_INDEX, np.int32)
    for name, slots in sel.segments:
        mask[:, slots] = _gather_into(tokens, slots, source[name], c2r, segment_index[name])
        index[:, slots] = segment_index[name]
    return SAll(tokens, mask, index)


def nal_target_mask(s_all: TokenFields, mask: np.ndarray, feat: FeatureConfig,
                    sel: SelectionConfig) -> np.ndarray:
    """(N, r) NAL targets: S_RT[:r] slot t and t+1 valid and token t+1 a positive engagement."""
    seg = sel.segment("rt_recent")
    actions = s_all.actions[:, seg]
    valid = mask[:, seg]
    target = np.zeros_like(valid)
    positive = (actions[:, 1:] & feat.positive_mask) != 0
    target[:, :-1] = valid[:, :-1] & valid[:, 1:] & positive
    return target


def log_nn_features(requests: RequestBatch, feat: FeatureConfig, sel: SelectionConfig,
                    validate: bool = True) -> TrainingExamples:
    """NN feature logging: one :class:`TrainingExamples` row per (request, candidate) pair.

    ``requests`` must carry labels. Over-long sequences are truncated to their most recent tokens.
    """
    if requests.labels is None:
        raise SchemaError("labels", "logging training examples needs labelled requests")
    requests = requests.truncate_recent(sel)
    if validate:
        requests.validate(feat, sel)
    s_all = select_s_all(requests, feat, sel)
    c2r = requests.cand_to_req
    negatives = TokenFields.empty((len(c2r), sel.num_nal_negatives), feat)
    neg_index = _recent_index(requests.imp.lengths, sel.num_nal_negatives)[c2r]
    neg_mask = _gather_into(negatives, slice(0, sel.num_nal_negatives), requests.imp, c2r, neg_index)
    return TrainingExamples(
        s_all=s_all.tokens,
        s_all_mask=s_all.mask,
        candidate_embedding=requests.cand_embedding,
        item_id=requests.cand_item_id,
        user_id=requests.user_id[c2r],
        request_id=requests.request_id[c2r],
        request_timestamp=requests.request_timestamp[c2r],
        dense=requests.dense,
        categorical=requests.categorical,
        labels=requests.labels,
        nal_target_mask=nal_target_mask(s_all.tokens, s_all.mask, feat, sel),
        nal_negatives=negatives.embeddings,
        nal_negative_mask=neg_mask,
    )


def example_nbytes(examples: TrainingExamples) -> float:
    """Average stored bytes per logged example."""
    cols: Dict[str, np.ndarray] = examples.columns()
    return sum(a.nbytes for a in cols.values()) / max(len(examples), 1)
