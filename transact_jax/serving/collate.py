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

Vectorized: batch preparation runs once per batch on the serving host's critical path, so nothing
loops over requests doing copies. :func:`plan` reads every part's offsets with one concatenation per
family; lengths, offsets and ``cand_to_req`` are whole-batch array operations; the de-duplicated
tokens of each field are copied with one ``np.concatenate(..., out=)`` over the parts' contiguous
token ranges (a part holding several requests of which one is truncated is not contiguous: it adds
one range per request, or for short sequences is gathered with one ``np.take(..., out=)`` on
per-token indices, ``GATHER_BELOW_TOKENS``). The copies release the GIL, so batches prepared on
several threads (:mod:`.batcher`) overlap.

Padding (see :mod:`.buckets`): padding requests have length 0 and start at the end of the real
tokens; padding candidates point at the first padding request, with zero features. Token slots past
a sequence's length are left as they are (stale bytes from an earlier batch): nothing reads them,
because NN selection and S_all only ever address positions below a sequence's length.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np

from transact_jax.config import SelectionConfig
from transact_jax.data.schema import RequestBatch
from transact_jax.serving.buckets import Bucket, BucketConfig
from transact_jax.serving.layout import FAMILIES

TOKEN_FIELDS = ("embeddings", "actions", "surfaces")   # the token fields shipped (layout.py)
CANDIDATE_FIELDS = ("cand_embedding", "dense", "categorical")


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Sizes of a batch after truncation, and where each request's tokens are.

    Requests and candidates are numbered across the batch, part after part.

    Attributes:
      num_requests, num_candidates: U and N (real, unpadded).
      request_starts: (P + 1,) the first request of each part (and U).
      cand_to_req: (N,) each candidate's request in the batch.
      kept: per family, (U,) the kept length of each request.
      token_ends: per family, (U,) where each request's tokens end in its part's token arrays (the
        kept tokens, the most recent ones, are ``[token_ends - kept, token_ends)``).
      truncated_parts: per family, (P,) whether a part has a truncated request.
      total_tokens: per family, the batch's kept tokens (the dedup layout's T).
      longest: per family, the longest kept sequence (the broadcast layout's width).
      broadcast_tokens: per family, the tokens a broadcast layout holds: sum over candidates of
        their request's kept length.
    """

    num_requests: int
    num_candidates: int
    request_starts: np.ndarray
    cand_to_req: np.ndarray
    kept: Dict[str, np.ndarray]
    token_ends: Dict[str, np.ndarray]
    truncated_parts: Dict[str, np.ndarray]
    total_tokens: Dict[str, int]
    longest: Dict[str, int]
    broadcast_tokens: Dict[str, int]

    def bucket(self, buckets: BucketConfig, layout: str) -> Bucket:
        fams = tuple(self.total_tokens[f] for f in FAMILIES)
        if layout == "dedup":
            return buckets.dedup(self.num_candidates, self.num_requests, fams)
        return buckets.broadcast(self.num_candidates, tuple(self.longest[f] for f in FAMILIES))


def _starts(counts: np.ndarray) -> np.ndarray:
    """(len + 1,) exclusive prefix sums of ``counts``: where each block starts, then the total."""
    out = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def _per_part_any(flags: np.ndarray, request_starts: np.ndarray) -> np.ndarray:
    """(P,) whether any request of each part has ``flags`` set (parts may have no requests)."""
    counts = _starts(flags)
    return counts[request_starts[1:]] > counts[request_starts[:-1]]


def plan(parts: Sequence[RequestBatch], sel: SelectionConfig) -> BatchPlan:
    """Measure ``parts`` (validated requests) as one batch: see :class:`BatchPlan`."""
    limits = sel.max_lengths
    request_starts = _starts(np.fromiter((p.num_requests for p in parts), np.int64, len(parts)))
    candidates = np.fromiter((p.num_candidates for p in parts), np.int64, len(parts))
    u = int(request_starts[-1])
    cand_to_req = (np.concatenate([p.cand_to_req for p in parts]).astype(np.int64)
                   + np.repeat(request_starts[:-1], candidates))
    # Every part's offsets, concatenated: (U + P,). Pair i (offsets[i], offsets[i + 1]) is a request
    # unless it straddles two parts, i.e. i is the last offset of a part.
    pair = np.ones(u + len(parts), bool)
    pair[request_starts[1:] + np.arange(len(parts))] = False
    pair = pair[:-1]
    kept, ends, truncated, total, longest, bcast = {}, {}, {}, {}, {}, {}
    for fam in FAMILIES:
        flat = np.concatenate([getattr(p, fam).offsets for p in parts])
        fam_ends = flat[1:][pair]
        lengths = fam_ends - flat[:-1][pair]
        fam_kept = np.minimum(lengths, limits[fam])
        kept[fam], ends[fam] = fam_kept, fam_ends
        truncated[fam] = _per_part_any(fam_kept < lengths, request_starts)
        total[fam] = int(fam_kept.sum())
        longest[fam] = int(fam_kept.max()) if u else 0
        bcast[fam] = int(fam_kept[cand_to_req].sum())
    return BatchPlan(u, len(cand_to_req), request_starts, cand_to_req, kept, ends, truncated, total,
                     longest, bcast)


# A run of the de-duplicated token copy: either contiguous source ranges, (part, start, stop) each,
# copied with one concatenation, or one part's per-token gather indices.
_Ranges = List[Tuple[int, int, int]]
_Gather = Tuple[int, np.ndarray]

# A part of several requests with a truncated one is not contiguous. Its kept tokens are gathered on
# per-token indices when its requests keep fewer tokens than this on average, else copied as one
# range per request: a range costs about a microsecond of Python per request and field, a gather a
# few nanoseconds more per token than a plain copy (measured on the CPU: at 10,000 tokens per
# request ranges take half the time of a gather, at 100 tokens twice as long).
GATHER_BELOW_TOKENS = 512


def _token_runs(fam: str, bplan: BatchPlan) -> List[Tuple[int, int, Union[_Ranges, _Gather]]]:
    """(destination start, stop, source) runs that copy family ``fam``'s kept tokens in batch order.

    A part contributes the contiguous range of its kept tokens, unless it has several requests and
    one of them is truncated: then one range per request, or (short sequences) one gather on
    indices computed at once (``GATHER_BELOW_TOKENS``)."""
    kept, ends = bplan.kept[fam], bplan.token_ends[fam]
    dst = _starts(kept)                       # where each request's tokens go in the batch
    src_lo = ends - kept                      # where its kept tokens start in its part
    lo_list, hi_list = src_lo.tolist(), ends.tolist()
    rs = bplan.request_starts.tolist()
    runs: List[Tuple[int, int, Union[_Ranges, _Gather]]] = []
    ranges: _Ranges = []
    begin = 0
    for p, (first, stop, cut) in enumerate(zip(rs[:-1], rs[1:], bplan.truncated_parts[fam].tolist())):
        if stop == first:
            continue
        if not cut or stop - first == 1:      # the part's kept tokens are one contiguous range
            ranges.append((p, lo_list[first], hi_list[stop - 1]))
            continue
        k = kept[first:stop]
        total = int(k.sum())
        if total >= GATHER_BELOW_TOKENS * (stop - first):
            ranges.extend((p, a, b) for a, b in zip(lo_list[first:stop], hi_list[first:stop]))
            continue
        if ranges:
            runs.append((begin, int(dst[first]), ranges))
            ranges = []
        shift = src_lo[first:stop] - (dst[first:stop] - dst[first])
        runs.append((int(dst[first]), int(dst[stop]), (p, np.arange(total) + np.repeat(shift, k))))
        begin = int(dst[stop])
    if ranges:
        runs.append((begin, int(dst[-1]), ranges))
    return runs


def _write_tokens(views: Dict[str, np.ndarray], parts: Sequence[RequestBatch], bplan: BatchPlan,
                  fam: str) -> None:
    for lo, hi, source in _token_runs(fam, bplan):
        for field in TOKEN_FIELDS:
            out = views[f"{fam}.{field}"][lo:hi]
            if isinstance(source, list):
                np.concatenate([getattr(getattr(parts[p], fam).tokens, field)[a:b]
                                for p, a, b in source], axis=0, out=out)
            else:
                p, index = source
                np.take(getattr(getattr(parts[p], fam).tokens, field), index, axis=0, out=out,
                        mode="clip")          # indices are in range: "clip" writes without a buffer


def _write_candidates(views: Dict[str, np.ndarray], parts: Sequence[RequestBatch], n_real: int) -> None:
    for name in CANDIDATE_FIELDS:
        np.concatenate([getattr(p, name) for p in parts], axis=0, out=views[name][:n_real])
        views[name][n_real:] = 0


def write_dedup(views: Dict[str, np.ndarray], parts: Sequence[RequestBatch], bplan: BatchPlan) -> None:
    """Collate ``parts`` into the de-duplicated arena ``views`` (module docstring)."""
    u = bplan.num_requests
    for fam in FAMILIES:
        kept = bplan.kept[fam]
        views[f"{fam}.lengths"][:u] = kept
        views[f"{fam}.lengths"][u:] = 0
        offsets = _starts(kept)
        views[f"{fam}.offsets"][:u] = offsets[:-1]
        views[f"{fam}.offsets"][u:] = offsets[-1]
        _write_tokens(views, parts, bplan, fam)
    c2r, n = views["cand_to_req"], bplan.num_candidates
    c2r[:n] = bplan.cand_to_req
    c2r[n:] = u                           # padding candidates -> the first (empty) padding request
    _write_candidates(views, parts, n)


def _runs(cand_to_req: np.ndarray) -> List[Tuple[int, int, int]]:
    """(request, start, stop) runs of equal ``cand_to_req`` (candidates of a request are usually
    contiguous; non-contiguous ones just give more runs)."""
    if not len(cand_to_req):
        return []
    change = np.flatnonzero(np.diff(cand_to_req)) + 1
    starts = np.concatenate([[0], change])
    stops = np.concatenate([change, [len(cand_to_req)]])
    return list(zip(cand_to_req[starts].tolist(), starts.tolist(), stops.tolist()))


def write_broadcast(views: Dict[str, np.ndarray], parts: Sequence[RequestBatch],
                    bplan: BatchPlan) -> None:
    """Collate ``parts`` into the broadcast arena ``views``: every candidate row gets a copy of its
    request's (truncated) sequences, as a naive server would build it (one broadcast copy per run
    of candidates of one request and field)."""
    n = bplan.num_candidates
    part_of = np.repeat(np.arange(len(parts)), np.diff(bplan.request_starts)).tolist()
    runs = _runs(bplan.cand_to_req)
    for fam in FAMILIES:
        kept = bplan.kept[fam]
        views[f"{fam}.lengths"][:n] = kept[bplan.cand_to_req]
        views[f"{fam}.lengths"][n:] = 0
        hi = bplan.token_ends[fam].tolist()
        lo = (bplan.token_ends[fam] - kept).tolist()
        for u, a, b in runs:
            count = hi[u] - lo[u]
            if not count:
                continue
            src = getattr(parts[part_of[u]], fam).tokens
            for field in TOKEN_FIELDS:
                views[f"{fam}.{field}"][a:b, :count] = getattr(src, field)[lo[u]:hi[u]][None]
    _write_candidates(views, parts, n)
