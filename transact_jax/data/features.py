"""NN feature selection and S_all on the host for whole request batches (paper §3.4.1).

:func:`select_s_all` runs NN selection (``pallas_kernels.nn_search.api.nn_search`` with
``impl="xla"``, the jnp reference) for every candidate of a de-duplicated
:class:`~transact_jax.data.schema.RequestBatch` and lays the selected tokens into the fixed S_all
slots with :mod:`transact_jax.data.s_all` (the slot semantics, shared with serving).
:func:`log_nn_features` turns requests
with labels into :class:`~transact_jax.data.schema.TrainingExamples`: the "NN feature logging" of
paper §3.4.1, which stores |S_all| tokens per example instead of the full O(L) sequences.

Work is grouped by request, never broadcast: each request's sequence is scored against all of its
candidates at once (the API's grouped layout), and requests are processed in chunks of similar
lifelong length with bucketed shapes so that jit compiles a handful of shapes only.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import numpy as np

from pallas_kernels.int8_codec import dequantize_int8
from pallas_kernels.nn_search.api import nn_search
from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data import s_all as slots
from transact_jax.data.s_all import PAD_INDEX
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
        idx, _ = nn_search(seq, lens, grid, k=k, scale=scale, impl="xla")   # grouped layout
        out[mine] = np.asarray(idx)[slot_of_req[cand_to_req[mine]], rank[mine]]
        start = stop
    return out


def _host_gather(seqs: JaggedSequences, rows: np.ndarray, idx: np.ndarray) -> Dict[str, np.ndarray]:
    """Token fields of ``seqs[rows[i]][idx[i, j]]`` (N, k, ...), zeros where ``idx == -1``."""
    mask = idx >= 0
    out = {}
    for f in dataclasses.fields(TokenFields):
        column = getattr(seqs.tokens, f.name)
        if not mask.any():
            out[f.name] = np.zeros(idx.shape + column.shape[1:], column.dtype)
            continue
        got = column[np.where(mask, seqs.offsets[rows][:, None] + idx, 0)]
        got[~mask] = 0
        out[f.name] = got
    return out


def select_s_all(requests: RequestBatch, feat: FeatureConfig, sel: SelectionConfig) -> SAll:
    """Build S_all for every candidate of ``requests`` (see module docstring)."""
    cand = dequantize_int8(requests.cand_embedding, feat.quant_scale)
    c2r = requests.cand_to_req
    source = {"ll": requests.ll, "rt": requests.rt, "imp": requests.imp}

    def search(family: str, lengths: np.ndarray, k: int) -> np.ndarray:
        return nn_select(source[family], lengths, cand, c2r, k, feat.quant_scale)

    lengths = {name: seqs.lengths for name, seqs in source.items()}
    index = slots.segment_indices(lengths, sel, search, lambda a: a[c2r], np)
    fields, mask, source_index = slots.assemble(
        index, sel, lambda family, idx: _host_gather(source[family], c2r, idx), np)
    return SAll(TokenFields(**fields), mask, source_index)


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
    neg_index = slots.recent_index(requests.imp.lengths, sel.num_nal_negatives, np)[c2r]
    negatives = _host_gather(requests.imp, c2r, neg_index)["embeddings"]
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
        nal_negatives=negatives,
        nal_negative_mask=neg_index >= 0,
    )


def example_nbytes(examples: TrainingExamples) -> float:
    """Average stored bytes per logged example."""
    cols: Dict[str, np.ndarray] = examples.columns()
    return sum(a.nbytes for a in cols.values()) / max(len(examples), 1)
