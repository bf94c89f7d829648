"""The rule book of ranking requests: every per-field rule of a :class:`RequestBatch`, written once.

``RequestBatch.validate`` (raise the first problem), the serving boundary (fail one request, score the
rest: ``transact_jax.serving.validation``) and the validators of the other containers
(``TokenFields``, ``JaggedSequences``, the token and candidate fields of ``TrainingExamples``) all
apply the rules below. Background: docs/design.md, "Bad input and errors".

**Structure** (:func:`check_structure`): types, dtypes and shapes of every field, the offsets of the
three sequence families (``offsets[0] = 0``, non-decreasing, last offset = number of tokens, one
sequence per request) and ``cand_to_req`` in ``[0, U)``. A batch with a structural problem cannot be
split into requests, so the first one raises :class:`SchemaError` naming the field at once.

**Content** (:func:`request_problems`): values, each attributable to one request:

* tokens (``ll.tokens.*``, ``rt.tokens.*``, ``imp.tokens.*``): only the A configured action bits may be
  set; surface ids lie in ``[0, S)``; int8 embedding codes lie in ``[-127, 127]``: the code -128 is
  never produced by the codec (``pallas_kernels.int8_codec``) and is rejected wherever codes enter;
* chronological order (field ``ll.tokens.timestamps`` etc.): within each request's sequence the
  token timestamps never decrease (index 0 the oldest; equal timestamps are fine). Truncation keeps
  the last tokens as the most recent ones, so an out-of-order sequence would be scored on the wrong
  tokens; the problem names the position in the sequence;
* sequence lengths (field ``ll``/``rt``/``imp``): at most ``SelectionConfig.max_lengths[family]``.
  Serving may instead truncate: a sequence longer than its maximum keeps its most recent tokens
  (``RequestBatch.truncate_recent``; docs/design.md, "Truncation and over-long sequences"). Empty
  sequences are valid (their S_all segments are padding);
* candidates: ``cand_embedding`` codes as above; ``dense`` finite (no NaN/inf) and within
  ``[-DENSE_BOUND, DENSE_BOUND]`` (:data:`DENSE_BOUND` = 1e6: far larger magnitudes, although finite,
  overflow float32 inside the model and score NaN; scale such features before serving or training);
  ``categorical[:, c]`` in ``[0, categorical_vocab_sizes[c])``; ``labels`` (when present) 0 or 1;
* at least one candidate per request (serving only: a request with nothing to rank; a logged batch
  may hold requests whose candidates were all dropped).

Every check is vectorized: a cheap min/max pass over the whole batch, and a per-element search only
when something is wrong.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple

import numpy as np

from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data.schema import (
    JaggedSequences,
    RequestBatch,
    SchemaError,
    TokenFields,
    check_array,
)

UNUSED_CODE = -128
"""The int8 code the codec never produces (codes are symmetric, in ``[-127, 127]``)."""
CODE_PROBLEM = "int8 code -128 is outside the codec's [-127, 127]"
DENSE_BOUND = 1e6
"""Largest magnitude of a dense feature value: ``|dense| <= DENSE_BOUND`` (module docstring)."""
DENSE_PROBLEM = (f"value {{value}} is outside [-{DENSE_BOUND:g}, {DENSE_BOUND:g}] "
                 "(DENSE_BOUND; scale the feature)")
"""The problem of a dense value beyond the bound; ``{value}`` stands for the value."""


@dataclasses.dataclass(frozen=True)
class Breach:
    """The rows of one field that break one rule.

    Attributes:
      field: the field's name (``"rt.tokens.surfaces"``, ``"categorical[:, 1]"``, ...).
      rows: ascending flat indices over the field's leading axes ``shape`` (tokens, sequences or
        candidates) of the offending rows.
      values: the offending value of each row (its first one, for a row of several values).
      problem: what is wrong; ``{value}`` in it stands for the row's value.
      shape: the leading axes ``rows`` index (for the position in an error message).
      unit: what a row is (``"token"``, ``"sequence"``, ``"candidate"``, ``"request"``).
    """

    field: str
    rows: np.ndarray
    values: np.ndarray
    problem: str
    shape: Tuple[int, ...]
    unit: str

    def text(self, i: int = 0) -> str:
        """The problem of the ``i``-th offending row."""
        return self.problem.replace("{value}", str(self.values[i]))

    def error(self) -> SchemaError:
        """A SchemaError for the first offending row, with its position."""
        row = int(self.rows[0])
        where = tuple(int(i) for i in np.unravel_index(row, self.shape)) if len(self.shape) > 1 else row
        return SchemaError(self.field, f"{self.text(0)} (first at {self.unit} {where})")


def _breach(field: str, bad: np.ndarray, values: np.ndarray, problem: str, shape: Tuple[int, ...],
            unit: str) -> Breach:
    """A Breach of the rows where ``bad`` (over the flattened leading axes) holds."""
    rows = np.flatnonzero(bad)
    return Breach(field, rows, values[rows], problem, tuple(shape), unit)


def _rows(x: np.ndarray, lead: int) -> np.ndarray:
    """``x`` as (rows, values per row): the first ``lead`` axes flattened, the rest too."""
    n = int(np.prod(x.shape[:lead], dtype=np.int64))
    return x.reshape(n, -1)


def _first_where(bad: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per row of (rows, k) arrays, the value of ``x`` at the row's first ``bad`` position."""
    return x[np.arange(len(x)), np.argmax(bad, axis=1)]


def _out_of_range(x: np.ndarray, high: int) -> bool:
    """Cheap test: any value outside ``[0, high)`` (signed ints viewed unsigned: negatives wrap high)."""
    if not x.size:
        return False
    u = x.view(np.dtype(f"u{x.itemsize}")) if x.dtype.kind == "i" else x
    return int(u.max()) >= high


# ----------------------------------------------------------------------------------- element rules

def code_breach(field: str, codes: np.ndarray, unit: str = "row") -> Optional[Breach]:
    """Rows of int8 codes ``(..., D)`` holding the unused code -128."""
    if not codes.size or int(codes.min()) != UNUSED_CODE:
        return None
    flat = _rows(codes, codes.ndim - 1)
    return _breach(field, (flat == UNUSED_CODE).any(axis=1), np.full(len(flat), UNUSED_CODE),
                   CODE_PROBLEM, codes.shape[:-1], unit)


def token_breaches(name: str, tokens: TokenFields, feat: FeatureConfig) -> Iterator[Breach]:
    """Content rules of tokens of any leading shape (fields ``{name}.actions`` etc.): action bits, surface
    ids, int8 codes. The fields must have the right dtypes (:func:`check_token_arrays`)."""
    shape = tokens.shape
    actions = tokens.actions.reshape(-1)
    if actions.size and int(actions.max()) >= 1 << feat.num_actions:
        yield _breach(f"{name}.actions", actions >= 1 << feat.num_actions, actions,
                      f"action bits beyond the {feat.num_actions} configured action types are set",
                      shape, "token")
    surfaces = tokens.surfaces.reshape(-1)
    if _out_of_range(surfaces, feat.num_surfaces):
        yield _breach(f"{name}.surfaces", (surfaces < 0) | (surfaces >= feat.num_surfaces), surfaces,
                      f"surface id {{value}} out of range [0, {feat.num_surfaces})", shape, "token")
    codes = code_breach(f"{name}.embeddings", tokens.embeddings, "token")
    if codes is not None:
        yield codes


def order_breach(name: str, seqs: JaggedSequences) -> Optional[Breach]:
    """Tokens of jagged ``seqs`` (field ``{name}.tokens.timestamps``, one row per token) whose timestamp
    is earlier than the previous token's of the same sequence; the problem names the position in the
    sequence and both timestamps. Offsets must be valid (:func:`check_jagged`)."""
    t = seqs.tokens.timestamps
    if len(t) < 2:
        return None
    earlier = np.zeros(len(t), bool)
    earlier[1:] = t[1:] < t[:-1]
    if not earlier.any():
        return None
    offsets = seqs.offsets
    earlier[offsets[:-1][offsets[:-1] < len(t)]] = False   # a sequence's first token has no previous
    rows = np.flatnonzero(earlier)
    if not rows.size:
        return None
    position = rows - offsets[np.searchsorted(offsets, rows, side="right") - 1]
    values = np.array([f"token {p} (timestamp {t[r]}) is earlier than token {p - 1} (timestamp "
                       f"{t[r - 1]})" for p, r in zip(position.tolist(), rows.tolist())])
    return Breach(f"{name}.tokens.timestamps", rows, values,
                  "{value}: sequences must be chronological, oldest first", t.shape, "token")


def length_breach(name: str, lengths: np.ndarray, max_len: int) -> Optional[Breach]:
    """Sequences longer than ``max_len`` (field ``name``, one row per sequence)."""
    if not lengths.size or int(lengths.max()) <= max_len:
        return None
    return _breach(name, lengths > max_len, lengths,
                   f"sequence has {{value}} tokens, more than the configured maximum {max_len}",
                   lengths.shape, "sequence")


def candidate_breaches(feat: FeatureConfig, embedding: Tuple[str, np.ndarray], dense: np.ndarray,
                       categorical: np.ndarray, labels: Optional[np.ndarray]) -> Iterator[Breach]:
    """Content rules of per-candidate features (one row per candidate): the candidate embedding's
    codes (``embedding`` = (field name, codes)), finite ``dense`` within ``DENSE_BOUND``,
    ``categorical[:, c]`` ids within their vocabularies and 0/1 ``labels`` (None: not checked)."""
    name, codes = embedding
    found = code_breach(name, codes, "candidate")
    if found is not None:
        yield found
    n = len(dense)
    if dense.size and not (dense.min() >= -DENSE_BOUND and dense.max() <= DENSE_BOUND):  # NaN fails
        nonfinite = ~np.isfinite(dense)
        if nonfinite.any():
            yield _breach("dense", nonfinite.any(axis=1), _first_where(nonfinite, dense),
                          "contains NaN/inf", (n,), "candidate")
        large = np.abs(np.where(nonfinite, 0, dense)) > DENSE_BOUND
        if large.any():
            yield _breach("dense", large.any(axis=1), _first_where(large, dense), DENSE_PROBLEM,
                          (n,), "candidate")
    for c, vocab in enumerate(feat.categorical_vocab_sizes):
        col = categorical[:, c]
        if _out_of_range(col, vocab):
            yield _breach(f"categorical[:, {c}]", (col < 0) | (col >= vocab), col,
                          f"id {{value}} out of range [0, {vocab})", (n,), "candidate")
    if labels is not None and labels.size and int(labels.max()) > 1:
        bad = labels > 1
        yield _breach("labels", bad.any(axis=1), _first_where(bad, labels), "label {value} is not 0 or 1",
                      (n,), "candidate")


def raise_first(breaches: Iterable[Optional[Breach]]) -> None:
    """Raise the SchemaError of the first breach (None entries are skipped)."""
    for b in breaches:
        if b is not None:
            raise b.error()


def check_codes(name: str, codes: np.ndarray, unit: str = "row") -> None:
    """Reject the unused int8 code -128 in ``codes`` (``(..., D)``; a row is one ``unit``)."""
    raise_first([code_breach(name, codes, unit)])


# -------------------------------------------------------------------------------------- structure

def _expect(name: str, x, dtype, shape) -> None:
    """``check_array`` with a fast path: the common valid case costs one comparison chain."""
    if not (isinstance(x, np.ndarray) and x.dtype == dtype and x.shape == shape):
        check_array(name, x, dtype, shape)   # raises, naming the field and the problem


def check_token_arrays(tokens, feat: FeatureConfig, name: str, shape: Tuple) -> None:
    """Types, dtypes and shapes of the four token fields (``shape`` leading, ``None`` = any)."""
    if not isinstance(tokens, TokenFields):
        raise SchemaError(name, f"expected TokenFields, got {type(tokens).__name__}")
    shape = tuple(shape)
    _expect(f"{name}.timestamps", tokens.timestamps, np.int64, shape)
    _expect(f"{name}.actions", tokens.actions, feat.action_dtype, shape)
    _expect(f"{name}.surfaces", tokens.surfaces, np.int16, shape)
    _expect(f"{name}.embeddings", tokens.embeddings, np.int8, shape + (feat.embedding_dim,))


def check_jagged(seqs, feat: FeatureConfig, name: str, num_sequences: Optional[int] = None) -> None:
    """Structure of jagged sequences: offsets (``num_sequences + 1`` of them when given) from 0,
    non-decreasing, ending at the number of tokens; flat (T,) tokens of the right dtypes."""
    if not isinstance(seqs, JaggedSequences):
        raise SchemaError(name, f"expected JaggedSequences, got {type(seqs).__name__}")
    offsets = seqs.offsets
    _expect(f"{name}.offsets", offsets, np.int64, (None,) if num_sequences is None else (num_sequences + 1,))
    if len(offsets) < 1 or offsets[0] != 0:
        raise SchemaError(f"{name}.offsets", "must start with 0")
    if len(offsets) > 2 and np.any(offsets[1:] < offsets[:-1]):
        raise SchemaError(f"{name}.offsets", "must be non-decreasing")
    tok = seqs.tokens
    if not isinstance(tok, TokenFields):
        raise SchemaError(f"{name}.tokens", f"expected TokenFields, got {type(tok).__name__}")
    # the timestamps first, so that a wrong type or shape of the flat tokens names the tokens
    t = check_array(f"{name}.tokens.timestamps", tok.timestamps, np.int64, (None,)).shape[0]
    if offsets[-1] != t:
        raise SchemaError(f"{name}.offsets", f"last offset {offsets[-1]} != number of tokens {t}")
    check_token_arrays(tok, feat, f"{name}.tokens", (t,))


def check_structure(batch: RequestBatch, feat: FeatureConfig, labels: bool = False) -> None:
    """Types, dtypes, shapes, offsets and ``cand_to_req`` of a whole batch (module docstring); the
    labels too when ``labels`` (serving ignores them)."""
    if not isinstance(batch, RequestBatch):
        raise SchemaError("requests", f"expected a RequestBatch, got {type(batch).__name__}")
    u = check_array("user_id", batch.user_id, np.int64, (None,)).shape[0]
    _expect("request_id", batch.request_id, np.int64, (u,))
    _expect("request_timestamp", batch.request_timestamp, np.int64, (u,))
    for name, seqs in batch.sequences():
        check_jagged(seqs, feat, name, u)
    n = check_array("cand_item_id", batch.cand_item_id, np.int64, (None,)).shape[0]
    _expect("cand_embedding", batch.cand_embedding, np.int8, (n, feat.embedding_dim))
    c2r = batch.cand_to_req
    _expect("cand_to_req", c2r, np.int32, (n,))
    if n and (c2r.min() < 0 or c2r.max() >= u):
        bad = c2r[(c2r < 0) | (c2r >= u)][0]
        raise SchemaError("cand_to_req", f"value {bad} out of range [0, {u})")
    _expect("dense", batch.dense, np.float32, (n, feat.num_dense))
    _expect("categorical", batch.categorical, np.int32, (n, len(feat.categorical_vocab_sizes)))
    if labels and batch.labels is not None:
        _expect("labels", batch.labels, np.uint8, (n, feat.num_heads))


# --------------------------------------------------------------------------------------- requests

@dataclasses.dataclass(frozen=True)
class RequestProblem:
    """A content problem of one request: its index in the batch, the field and what is wrong."""

    request: int
    field: str
    problem: str


def request_problems(batch: RequestBatch, feat: FeatureConfig, sel: SelectionConfig, *,
                     lengths: bool = True, labels: bool = True,
                     candidates: bool = False) -> Dict[int, RequestProblem]:
    """The first content problem of each request of a structurally valid batch, ``{request index:
    problem}`` in request order (module docstring lists the rules, in the order they are applied).

    ``lengths``: apply the maximum sequence lengths (False where over-long sequences are truncated);
    ``labels``: check the labels (when present); ``candidates``: a request needs a candidate.
    """
    found: Dict[int, RequestProblem] = {}

    def note(breach: Optional[Breach], owner: Callable[[np.ndarray], np.ndarray]) -> None:
        if breach is None:
            return
        requests, first = np.unique(owner(breach.rows), return_index=True)
        for r, i in zip(requests.tolist(), first.tolist()):
            if r not in found:
                found[r] = RequestProblem(r, breach.field, breach.text(i))

    def same(rows: np.ndarray) -> np.ndarray:
        return rows

    limits = sel.max_lengths
    for name, seqs in batch.sequences():
        if lengths:
            note(length_breach(name, seqs.lengths, limits[name]), same)
        for b in (*token_breaches(f"{name}.tokens", seqs.tokens, feat), order_breach(name, seqs)):
            note(b, lambda rows, offsets=seqs.offsets: np.searchsorted(offsets, rows, side="right") - 1)
    c2r = batch.cand_to_req
    if candidates:
        empty = np.bincount(c2r, minlength=batch.num_requests) == 0
        if empty.any():
            note(_breach("candidates", empty, np.zeros(len(empty), np.int64),
                         "empty candidate list: the request has no candidates to rank",
                         empty.shape, "request"), same)
    for b in candidate_breaches(feat, ("cand_embedding", batch.cand_embedding), batch.dense,
                                batch.categorical, batch.labels if labels else None):
        note(b, lambda rows: c2r[rows])
    return dict(sorted(found.items()))


def validate_requests(batch: RequestBatch, feat: FeatureConfig, sel: SelectionConfig) -> None:
    """Every rule (sequence lengths and labels included): raise :class:`SchemaError` for the first
    structural problem, else for the first request's first content problem."""
    check_structure(batch, feat, labels=True)
    problems = request_problems(batch, feat, sel)
    if problems:
        p = next(iter(problems.values()))
        raise SchemaError(p.field, f"{p.problem} (request {p.request})")


__all__ = [
    "CODE_PROBLEM", "DENSE_BOUND", "DENSE_PROBLEM", "UNUSED_CODE", "Breach", "RequestProblem",
    "candidate_breaches", "check_codes", "check_jagged", "check_structure", "check_token_arrays",
    "code_breach", "length_breach", "order_breach", "raise_first", "request_problems",
    "token_breaches", "validate_requests",
]
