"""Per-request validation at the serving boundary.

A batch handed to the Ranker may mix good and bad requests; a bad one must get its own clear error
while the others are still scored. The rules themselves are the rule book of
:mod:`transact_jax.data.request_rules` (the same rules as ``RequestBatch.validate``); this module adds
what is specific to serving:

* **structure** (:func:`check_structure`, from the rule book): types, dtypes, shapes, offsets and
  ``cand_to_req``. If these are wrong the batch cannot be split into requests at all, so the whole
  call fails with a :class:`~transact_jax.data.schema.SchemaError` naming the field. A single request
  submitted to the batcher is checked the same way, and its structure errors become that request's
  error.
* **content** (:func:`request_errors`): the rule book's per-request problems, each a
  :class:`RequestError` naming the request (index and ``request_id``), field and problem: action
  bits, surface ids, the int8 code -128, sequences out of chronological order (field
  ``ll.tokens.timestamps`` etc.; the problem names the token's position in the sequence), dense
  features that are NaN/inf or outside ``[-DENSE_BOUND, DENSE_BOUND]`` (``DENSE_BOUND`` = 1e6,
  :data:`transact_jax.data.request_rules.DENSE_BOUND`: larger finite values overflow float32 inside
  the model and would score NaN), categorical ids, and an empty candidate list.
* **over-long sequences**, by the ``overlong`` policy: ``"truncate"`` (the default) is not an error:
  a sequence longer than its configured maximum keeps its most recent tokens, exactly as the
  logged-feature path does (``RequestBatch.truncate_recent``); ``"reject"`` makes it the request's
  error. Empty sequences are valid (their S_all segments are padding). Labels, if present, are
  ignored by serving.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data.request_rules import check_structure, request_problems
from transact_jax.data.schema import JaggedSequences, RequestBatch, SchemaError

OVERLONG_POLICIES = ("truncate", "reject")


class RequestError(SchemaError):
    """A bad request: ``request_index`` (position in the batch), ``request_id``, ``field``, problem."""

    def __init__(self, request_index: int, field: str, problem: str, request_id: Optional[int] = None):
        self.request_index = request_index
        self.request_id = request_id
        super().__init__(field, problem)
        who = f"request {request_index}" + ("" if request_id is None else f" (request_id {request_id})")
        self.args = (f"{who}: {field}: {problem}",)

    def __str__(self) -> str:
        return self.args[0]


def request_errors(batch: RequestBatch, feat: FeatureConfig, sel: SelectionConfig,
                   overlong: str = "truncate") -> Dict[int, RequestError]:
    """Content errors of each request of a structurally valid batch: ``{request index: error}``
    (the first problem found per request; module docstring)."""
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong: expected one of {OVERLONG_POLICIES}, got {overlong!r}")
    problems = request_problems(batch, feat, sel, lengths=overlong == "reject", labels=False,
                                candidates=True)
    return {r: RequestError(r, p.field, p.problem, int(batch.request_id[r])) for r, p in problems.items()}


def validate_request(request: RequestBatch, feat: FeatureConfig, sel: SelectionConfig,
                     overlong: str = "truncate") -> Optional[RequestError]:
    """Structure and content of a request submitted on its own (a one-request batch); returns the
    error or None. Structure errors are reported as this request's error."""
    try:
        check_structure(request, feat)
    except SchemaError as e:
        return RequestError(0, e.field, e.problem)
    if request.num_requests != 1:
        return RequestError(0, "requests", f"expected exactly one request, got {request.num_requests}"
                            " (split a batch with split_requests())")
    errors = request_errors(request, feat, sel, overlong)
    return errors.get(0)


# ---------------------------------------------------------------------------------- split / select

def select_requests(batch: RequestBatch, rows: Sequence[int]) -> RequestBatch:
    """Requests ``rows`` (in that order) of a structurally valid batch, with their candidates."""
    rows = np.asarray(rows, np.int64)
    new_index = np.full(batch.num_requests, -1, np.int64)
    new_index[rows] = np.arange(len(rows))
    order = candidate_order(batch, rows)

    def pick(a):
        return None if a is None else a[order]

    return RequestBatch(
        ll=batch.ll.select(rows), rt=batch.rt.select(rows), imp=batch.imp.select(rows),
        user_id=batch.user_id[rows], request_id=batch.request_id[rows],
        request_timestamp=batch.request_timestamp[rows],
        cand_item_id=batch.cand_item_id[order], cand_embedding=batch.cand_embedding[order],
        cand_to_req=new_index[batch.cand_to_req[order]].astype(np.int32), dense=batch.dense[order],
        categorical=batch.categorical[order], labels=pick(batch.labels))


def candidate_order(batch: RequestBatch, rows: Sequence[int]) -> np.ndarray:
    """Positions in ``batch`` of the candidates of :func:`select_requests` ``(batch, rows)``."""
    rows = np.asarray(rows, np.int64)
    new_index = np.full(batch.num_requests, -1, np.int64)
    new_index[rows] = np.arange(len(rows))
    cand = np.flatnonzero(new_index[batch.cand_to_req] >= 0)
    return cand[np.argsort(new_index[batch.cand_to_req[cand]], kind="stable")]


def split_requests(batch: RequestBatch) -> List[RequestBatch]:
    """One single-request batch per request (sequence tokens are views, not copies)."""
    order = np.argsort(batch.cand_to_req, kind="stable")
    bounds = np.searchsorted(batch.cand_to_req[order], np.arange(batch.num_requests + 1))
    out = []
    for u in range(batch.num_requests):
        cands = order[bounds[u]:bounds[u + 1]]
        contiguous = len(cands) == 0 or (cands[-1] - cands[0] + 1 == len(cands))
        index = slice(int(cands[0]), int(cands[-1]) + 1) if contiguous and len(cands) else cands

        def one(seqs: JaggedSequences, u=u) -> JaggedSequences:
            return JaggedSequences(seqs.sequence(u), np.array([0, seqs.lengths[u]], np.int64))

        out.append(RequestBatch(
            ll=one(batch.ll), rt=one(batch.rt), imp=one(batch.imp),
            user_id=batch.user_id[u:u + 1], request_id=batch.request_id[u:u + 1],
            request_timestamp=batch.request_timestamp[u:u + 1],
            cand_item_id=batch.cand_item_id[index], cand_embedding=batch.cand_embedding[index],
            cand_to_req=np.zeros(len(cands), np.int32), dense=batch.dense[index],
            categorical=batch.categorical[index],
            labels=None if batch.labels is None else batch.labels[index]))
    return out
