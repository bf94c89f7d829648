"""Per-request validation at the serving boundary (SPEC §9).

A batch handed to the Ranker may mix good and bad requests; a bad one must get its own clear error
while the others are still scored. Checks come in two kinds:

* **structure** (:func:`check_structure`): types, dtypes, shapes, offsets and ``cand_to_req``. If
  these are wrong the batch cannot be split into requests at all, so the whole call fails with a
  :class:`~transact_jax.data.schema.SchemaError` naming the field. A single request submitted to the
  batcher is checked the same way, and its structure errors become that request's error.
* **content** (:func:`request_errors`): values of one request: action bits beyond the configured A
  types, surface ids out of range, the unused int8 code -128 (embeddings), NaN/inf dense features,
  categorical ids out of range, an empty candidate list, and (with ``overlong="reject"``) sequences
  longer than the configured maximum. The checks run vectorized over the whole batch (a fast
  min/max pass, then a per-token search only when something is wrong) and attribute each failure to
  its request: a :class:`RequestError` per bad request, naming the request, field and problem.

Over-long sequences (``overlong="truncate"``, the default and SPEC §9's documented policy) are not
an error: they keep their most recent tokens, exactly as the logged-feature path does
(``RequestBatch.truncate_recent``). Empty sequences are valid (their S_all segments are padding).
Labels, if present, are ignored by serving.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data.schema import (
    JaggedSequences,
    RequestBatch,
    SchemaError,
    TokenFields,
    check_array,
)

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


# ------------------------------------------------------------------------------------- structure

def _expect(name: str, x, dtype, shape) -> None:
    """``check_array`` with a fast path: the common valid case costs one comparison chain."""
    if not (isinstance(x, np.ndarray) and x.dtype == dtype and x.shape == shape):
        check_array(name, x, dtype, shape)   # raises, naming the field and the problem


def _check_family(name: str, seqs, feat: FeatureConfig, u: int) -> None:
    if not isinstance(seqs, JaggedSequences):
        raise SchemaError(name, f"expected JaggedSequences, got {type(seqs).__name__}")
    tok = seqs.tokens
    if not isinstance(tok, TokenFields):
        raise SchemaError(f"{name}.tokens", f"expected TokenFields, got {type(tok).__name__}")
    offsets = seqs.offsets
    _expect(f"{name}.offsets", offsets, np.int64, (u + 1,))
    if offsets[0] != 0:
        raise SchemaError(f"{name}.offsets", "must start with 0")
    if u > 1 and np.any(offsets[1:] < offsets[:-1]):
        raise SchemaError(f"{name}.offsets", "must be non-decreasing")
    t = check_array(f"{name}.tokens.timestamps", tok.timestamps, np.int64, (None,)).shape[0]
    if offsets[-1] != t:
        raise SchemaError(f"{name}.offsets", f"last offset {offsets[-1]} != number of tokens {t}")
    _expect(f"{name}.tokens.actions", tok.actions, feat.action_dtype, (t,))
    _expect(f"{name}.tokens.surfaces", tok.surfaces, np.int16, (t,))
    _expect(f"{name}.tokens.embeddings", tok.embeddings, np.int8, (t, feat.embedding_dim))


def check_structure(batch: RequestBatch, feat: FeatureConfig) -> None:
    """Types, dtypes, shapes, offsets and ``cand_to_req`` of a whole batch (module docstring)."""
    if not isinstance(batch, RequestBatch):
        raise SchemaError("requests", f"expected a RequestBatch, got {type(batch).__name__}")
    u = check_array("user_id", batch.user_id, np.int64, (None,)).shape[0]
    _expect("request_id", batch.request_id, np.int64, (u,))
    _expect("request_timestamp", batch.request_timestamp, np.int64, (u,))
    for name, seqs in batch.sequences():
        _check_family(name, seqs, feat, u)
    n = check_array("cand_item_id", batch.cand_item_id, np.int64, (None,)).shape[0]
    _expect("cand_embedding", batch.cand_embedding, np.int8, (n, feat.embedding_dim))
    c2r = batch.cand_to_req
    _expect("cand_to_req", c2r, np.int32, (n,))
    if n and (c2r.min() < 0 or c2r.max() >= u):
        bad = c2r[(c2r < 0) | (c2r >= u)][0]
        raise SchemaError("cand_to_req", f"value {bad} out of range [0, {u})")
    _expect("dense", batch.dense, np.float32, (n, feat.num_dense))
    _expect("categorical", batch.categorical, np.int32, (n, len(feat.categorical_vocab_sizes)))


# --------------------------------------------------------------------------------------- content

class _Errors:
    """First error per request."""

    def __init__(self, batch: RequestBatch):
        self.batch = batch
        self.errors: Dict[int, RequestError] = {}

    def add(self, requests: np.ndarray, field: str, problem) -> None:
        if not len(requests):
            return
        for r in np.unique(requests):
            r = int(r)
            if r not in self.errors:
                text = problem(r) if callable(problem) else problem
                self.errors[r] = RequestError(r, field, text, int(self.batch.request_id[r]))


def _token_checks(errs: _Errors, name: str, seqs: JaggedSequences, feat: FeatureConfig) -> None:
    tok = seqs.tokens
    if not len(tok.actions):
        return

    def owners(bad_tokens: np.ndarray) -> np.ndarray:
        return np.searchsorted(seqs.offsets, np.flatnonzero(bad_tokens), side="right") - 1

    limit = 1 << feat.num_actions
    if int(tok.actions.max()) >= limit:
        errs.add(owners(tok.actions >= limit), f"{name}.tokens.actions",
                 f"action bits beyond the {feat.num_actions} configured action types are set")
    if int(tok.surfaces.view(np.uint16).max()) >= feat.num_surfaces:   # negative ids wrap high
        errs.add(owners((tok.surfaces < 0) | (tok.surfaces >= feat.num_surfaces)),
                 f"{name}.tokens.surfaces", f"surface id out of range [0, {feat.num_surfaces})")
    if int(tok.embeddings.min()) == -128:
        errs.add(owners((tok.embeddings == -128).any(axis=1)), f"{name}.tokens.embeddings",
                 "int8 code -128 is outside the codec's [-127, 127]")


def request_errors(batch: RequestBatch, feat: FeatureConfig, sel: SelectionConfig,
                   overlong: str = "truncate") -> Dict[int, RequestError]:
    """Content errors of each request of a structurally valid batch: ``{request index: error}``
    (first problem found per request; module docstring lists the checks)."""
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong: expected one of {OVERLONG_POLICIES}, got {overlong!r}")
    errs = _Errors(batch)
    limits = {"ll": sel.max_ll_len, "rt": sel.max_rt_len, "imp": sel.max_imp_len}
    for name, seqs in batch.sequences():
        if overlong == "reject":
            lengths = seqs.lengths
            over = np.flatnonzero(lengths > limits[name])
            errs.add(over, name, lambda r, lengths=lengths, name=name: (
                f"sequence has {lengths[r]} tokens, more than the configured maximum "
                f"{limits[name]} (overlong='reject')"))
        _token_checks(errs, name, seqs, feat)
    c2r = batch.cand_to_req
    counts = np.bincount(c2r, minlength=batch.num_requests)
    errs.add(np.flatnonzero(counts == 0), "candidates",
             "empty candidate list: the request has no candidates to rank")
    if batch.num_candidates:
        if int(batch.cand_embedding.min()) == -128:
            errs.add(c2r[(batch.cand_embedding == -128).any(axis=1)], "cand_embedding",
                     "int8 code -128 is outside [-127, 127]")
        if batch.dense.size and not np.isfinite(batch.dense).all():
            errs.add(c2r[~np.isfinite(batch.dense).all(axis=1)], "dense", "contains NaN/inf")
        vocabs = np.asarray(feat.categorical_vocab_sizes, np.uint32)
        if len(vocabs) and np.any(batch.categorical.view(np.uint32).max(axis=0) >= vocabs):
            for c, vocab in enumerate(feat.categorical_vocab_sizes):   # negative ids wrap high
                col = batch.categorical[:, c]
                errs.add(c2r[(col < 0) | (col >= vocab)], f"categorical[:, {c}]",
                         f"id out of range [0, {vocab})")
    return dict(sorted(errs.errors.items()))


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
