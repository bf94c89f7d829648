"""Batch preparation: collate validated requests straight into a staged arena (no intermediate copy).

A batch is a list of *parts*, each a :class:`~transact_jax.data.schema.RequestBatch` (a single
request from the batcher, or a whole batch handed to ``Ranker.score``). :func:`plan` measures the
batch after truncation (sizes that pick the :class:`~.buckets.Bucket`); :func:`write_dedup` and
:func:`write_broadcast` copy it into the arena's typed views:

* de-duplicated: each request's tokens once, concatenated per family, with per-request offsets and
  lengths, and each candidate's ``cand_to_req`` shifted to its request's position in the batch;
* broadcast (the naive baseline): each candidate's row gets a full copy of its request's sequences.

Over-long sequences (longer than ``SelectionConfig.max_lengths``) keep their most recent tokens (the
truncation policy, docs/design.md "Truncation and over-long sequences"; the same truncation the
logged-feature path applies), done here while copying.

Padding (see :mod:`.buckets`): padding requests have length 0 and start at the end of the real
tokens; padding candidates point at the first padding request, with zero features. Token slots past
a sequence's length are left as they are (stale bytes from an earlier batch): nothing reads them,
because NN selection and S_all only ever address positions below a sequence's length.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence, Tuple

import numpy as np

from transact_jax.config import SelectionConfig
from transact_jax.data.schema import JaggedSequences, RequestBatch
from transact_jax.serving.buckets import Bucket, BucketConfig
from transact_jax.serving.layout import FAMILIES


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Sizes of a batch after truncation.

    Attributes:
      num_requests, num_candidates: U and N (real, unpadded).
      kept: per family, per part, the (U_p,) kept length of each request.
      total_tokens: per family, the batch's kept tokens (the dedup layout's T).
      longest: per family, the longest kept sequence (the broadcast layout's width).
      broadcast_tokens: per family, the tokens a broadcast layout holds: sum over candidates of
        their request's kept length.
    """

    num_requests: int
    num_candidates: int
    kept: Dict[str, Tuple[np.ndarray, ...]]
    total_tokens: Dict[str, int]
    longest: Dict[str, int]
    broadcast_tokens: Dict[str, int]

    def bucket(self, buckets: BucketConfig, layout: str) -> Bucket:
        fams = tuple(self.total_tokens[f] for f in FAMILIES)
        if layout == "dedup":
            return buckets.dedup(self.num_candidates, self.num_requests, fams)
        return buckets.broadcast(self.num_candidates, tuple(self.longest[f] for f in FAMILIES))


def plan(parts: Sequence[RequestBatch], sel: SelectionConfig) -> BatchPlan:
    limits = sel.max_lengths
    kept, total, longest, bcast = {}, {}, {}, {}
    for fam in FAMILIES:
        per_part = []
        for p in parts:
            lens = np.minimum(getattr(p, fam).lengths, limits[fam])
            per_part.append(lens)
        kept[fam] = tuple(per_part)
        total[fam] = int(sum(int(k.sum()) for k in per_part))
        longest[fam] = int(max((int(k.max()) for k in per_part if len(k)), default=0))
        bcast[fam] = int(sum(int(k[p.cand_to_req].sum()) for k, p in zip(per_part, parts)))
    return BatchPlan(sum(p.num_requests for p in parts), sum(p.num_candidates for p in parts),
                     kept, total, longest, bcast)


def _token_slices(seqs: JaggedSequences, kept: np.ndarray) -> List[Tuple[int, int]]:
    """(start, stop) of the kept (most recent) tokens of each sequence."""
    ends = seqs.offsets[1:]
    return [(int(e) - int(k), int(e)) for e, k in zip(ends, kept)]


def _write_candidates(views: Dict[str, np.ndarray], parts: Sequence[RequestBatch], n_real: int) -> None:
    start = 0
    for p in parts:
        stop = start + p.num_candidates
        views["cand_embedding"][start:stop] = p.cand_embedding
        views["dense"][start:stop] = p.dense
        views["categorical"][start:stop] = p.categorical
        start = stop
    for name in ("cand_embedding", "dense", "categorical"):
        views[name][n_real:] = 0


def write_dedup(views: Dict[str, np.ndarray], parts: Sequence[RequestBatch], bplan: BatchPlan) -> None:
    """Collate ``parts`` into the de-duplicated arena ``views`` (module docstring)."""
    for fam in FAMILIES:
        emb, act, surf = views[f"{fam}.embeddings"], views[f"{fam}.actions"], views[f"{fam}.surfaces"]
        offsets, lengths = views[f"{fam}.offsets"], views[f"{fam}.lengths"]
        tok, req = 0, 0
        for p, kept in zip(parts, bplan.kept[fam]):
            seqs: JaggedSequences = getattr(p, fam)
            u = p.num_requests
            lengths[req:req + u] = kept
            starts = np.zeros(u, np.int64)
            if u > 1:
                np.cumsum(kept[:-1], out=starts[1:])
            offsets[req:req + u] = tok + starts
            src = seqs.tokens
            if np.array_equal(kept, seqs.lengths):   # nothing truncated: one copy per field
                count = int(seqs.offsets[-1])
                emb[tok:tok + count] = src.embeddings[:count]
                act[tok:tok + count] = src.actions[:count]
                surf[tok:tok + count] = src.surfaces[:count]
                tok += count
            else:
                for lo, hi in _token_slices(seqs, kept):
                    count = hi - lo
                    emb[tok:tok + count] = src.embeddings[lo:hi]
                    act[tok:tok + count] = src.actions[lo:hi]
                    surf[tok:tok + count] = src.surfaces[lo:hi]
                    tok += count
            req += u
        lengths[req:] = 0
        offsets[req:] = tok
    c2r = views["cand_to_req"]
    start, req = 0, 0
    for p in parts:
        c2r[start:start + p.num_candidates] = p.cand_to_req + req
        start += p.num_candidates
        req += p.num_requests
    c2r[start:] = req                     # padding candidates -> the first (empty) padding request
    _write_candidates(views, parts, bplan.num_candidates)


def _runs(cand_to_req: np.ndarray) -> List[Tuple[int, int, int]]:
    """(request, start, stop) runs of equal ``cand_to_req`` (candidates of a request are usually
    contiguous; non-contiguous ones just give more runs)."""
    if not len(cand_to_req):
        return []
    change = np.flatnonzero(np.diff(cand_to_req)) + 1
    starts = np.concatenate([[0], change])
    stops = np.concatenate([change, [len(cand_to_req)]])
    return [(int(cand_to_req[a]), int(a), int(b)) for a, b in zip(starts, stops)]


def write_broadcast(views: Dict[str, np.ndarray], parts: Sequence[RequestBatch],
                    bplan: BatchPlan) -> None:
    """Collate ``parts`` into the broadcast arena ``views``: every candidate row gets a copy of its
    request's (truncated) sequences, as a naive server would build it."""
    for fam in FAMILIES:
        emb, act, surf = views[f"{fam}.embeddings"], views[f"{fam}.actions"], views[f"{fam}.surfaces"]
        lengths = views[f"{fam}.lengths"]
        base = 0
        for p, kept in zip(parts, bplan.kept[fam]):
            seqs: JaggedSequences = getattr(p, fam)
            slices = _token_slices(seqs, kept)
            src = seqs.tokens
            for u, a, b in _runs(p.cand_to_req):
                lo, hi = slices[u]
                count = hi - lo
                rows = slice(base + a, base + b)
                lengths[rows] = count
                if count:
                    emb[rows, :count] = src.embeddings[lo:hi][None]
                    act[rows, :count] = src.actions[lo:hi][None]
                    surf[rows, :count] = src.surfaces[lo:hi][None]
            base += p.num_candidates
        lengths[base:] = 0
    _write_candidates(views, parts, bplan.num_candidates)
