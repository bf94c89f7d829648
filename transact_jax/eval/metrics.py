"""Offline ranking metrics of TransAct V2 (paper §4.2.1): HIT@K, AUC and normalized entropy.

Notation (paper §4.2.1), explained once here:

* ``h in H`` - a prediction head (e.g. click, repin, hide); ``f(x)_h`` is the model's predicted
  probability for head ``h`` (the sigmoid of that head's logit).
* ``w_h`` - the ranking weight of head ``h``. The final ranking score of a candidate is
  ``S = sum_h w_h f(x)_h`` (:func:`ranking_score`). Negative-engagement heads such as hide usually get
  a negative weight, so a likely hide pushes the candidate down.
* chunk ``c = [p_1, ..., p_n]`` - the candidates (Pins) recommended to a user in one ranking request.
  An evaluation row carries a user id ``u`` and a chunk id; here the chunk id is ``request_id``
  (:class:`transact_jax.data.schema.TrainingExamples`). Rows are grouped by the pair
  ``(user_id, request_id)``, so a request id only has to be unique per user.
* ``gamma_{c,h}`` - HIT@K of chunk ``c`` for head ``h``: the number of the K highest-S candidates of
  the chunk whose label for ``h`` is 1. A chunk with fewer than K candidates counts all of them.
* ``HIT@K/h = (sum_{u in U} sum_{c in C_u} gamma_{c,h}) / |U|`` - the sum over every chunk of every
  user, divided by the number of distinct users ``|U|`` (not by the number of chunks). Higher is better
  for positive heads (click, repin), lower is better for negative heads (hide).

Ties in S. ``ties="first"`` (the default) breaks ties deterministically by the original row order: of
two candidates with exactly equal S in the same chunk, the one that comes first in the input ranks
higher. That is reproducible, but it lets a model with constant scores collect whatever hits the input
order happens to put first. ``ties="average"`` instead returns the expected HIT@K under a uniformly
random order of tied candidates: a block of ``m`` tied candidates that straddles the top-K boundary
with ``s`` of its positions inside the top K contributes ``s / m`` times its number of positives.
A constant model then scores exactly ``K / n`` of each chunk's positives.

AUC (:func:`auc`) is the exact Mann-Whitney statistic, the probability that a random positive scores
above a random negative, with ties counting 1/2. Normalized entropy (:func:`normalized_entropy`) is the
mean binary cross entropy of the predictions divided by the entropy of the base rate ``p`` (the
fraction of positives): 1 for a model that always predicts ``p``, below 1 for a better one.

Everything is vectorized numpy (sorts, no Python loop over chunks); about a million rows take well
under a second per call. Scores are compared in float64. Inputs may be numpy or JAX arrays.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "MetricInputError",
    "ranking_score",
    "hit_at_k",
    "auc",
    "normalized_entropy",
    "evaluate",
    "MetricAccumulator",
    "lift_pct",
]

ArrayLike = Any
Weights = Union[Sequence[float], Mapping[str, float], np.ndarray]

#: default clipping of probabilities in the cross entropy, so that ``log(0)`` never occurs.
NE_EPS = 1e-7
_TIES = ("first", "average")


class MetricInputError(ValueError):
    """Bad metric input; ``argument`` names the offending argument, the message says what is wrong."""

    def __init__(self, argument: str, problem: str):
        self.argument = argument
        self.problem = problem
        super().__init__(f"{argument}: {problem}")


# --------------------------------------------------------------------------------------- validation

def _as_array(name: str, x: ArrayLike) -> np.ndarray:
    try:
        return np.asarray(x)
    except Exception as e:  # pragma: no cover - exotic inputs
        raise MetricInputError(name, f"cannot convert to an array ({e})") from e


def _check_ndim(name: str, x: np.ndarray, ndim: int, n: Optional[int] = None) -> None:
    if x.ndim != ndim:
        want = "(N,)" if ndim == 1 else "(N, H)"
        raise MetricInputError(name, f"expected shape {want}, got {x.shape}")
    if n is not None and x.shape[0] != n:
        raise MetricInputError(name, f"expected {n} rows (as the first argument), got {x.shape[0]}")


def _float_values(name: str, x: ArrayLike, ndim: int, n: Optional[int] = None,
                  unit_interval: bool = False) -> np.ndarray:
    """Finite real values as float64 (optionally in [0, 1])."""
    x = _as_array(name, x)
    _check_ndim(name, x, ndim, n)
    if x.dtype.kind not in "biuf":
        raise MetricInputError(name, f"expected real numbers, got dtype {x.dtype}")
    x = x.astype(np.float64, copy=False)
    if not np.all(np.isfinite(x)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(x))[0])
        raise MetricInputError(name, f"contains NaN/inf (first at index {bad})")
    if unit_interval and x.size and (x.min() < 0.0 or x.max() > 1.0):
        bad = tuple(int(i) for i in np.argwhere((x < 0.0) | (x > 1.0))[0])
        raise MetricInputError(name, f"probabilities must lie in [0, 1], got {x[bad]} at index {bad}")
    return x


def _binary_labels(name: str, x: ArrayLike, ndim: int, n: Optional[int] = None) -> np.ndarray:
    """Labels in {0, 1} (any real or bool dtype) as float64."""
    x = _as_array(name, x)
    _check_ndim(name, x, ndim, n)
    if x.dtype.kind not in "biuf":
        raise MetricInputError(name, f"expected 0/1 labels, got dtype {x.dtype}")
    if x.dtype.kind != "b":
        ok = (x == 0) | (x == 1)
        if not np.all(ok):
            bad = tuple(int(i) for i in np.argwhere(~ok)[0])
            raise MetricInputError(name, f"labels must be 0 or 1, got {x[bad]} at index {bad}")
    return x.astype(np.float64, copy=False)


def _ids(name: str, x: ArrayLike, n: int) -> np.ndarray:
    x = _as_array(name, x)
    _check_ndim(name, x, 1, n)
    if x.dtype.kind not in "iu":
        raise MetricInputError(name, f"expected integer ids, got dtype {x.dtype}")
    return x


def _nonempty(name: str, x: np.ndarray) -> None:
    if x.shape[0] == 0:
        raise MetricInputError(name, "is empty (no examples)")


def _check_k(k: Any) -> int:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
        raise MetricInputError("k", f"expected a positive integer, got {k!r}")
    return int(k)


def _check_ties(ties: str) -> str:
    if ties not in _TIES:
        raise MetricInputError("ties", f"expected one of {_TIES}, got {ties!r}")
    return ties


def _check_heads(heads: Sequence[str]) -> Tuple[str, ...]:
    if isinstance(heads, str):
        raise MetricInputError("heads", "expected a sequence of head names, got a single string")
    heads = tuple(heads)
    if not heads or not all(isinstance(h, str) and h for h in heads):
        raise MetricInputError("heads", f"expected non-empty head names, got {heads!r}")
    if len(set(heads)) != len(heads):
        raise MetricInputError("heads", f"duplicate head names in {heads!r}")
    return heads


def _weights_vector(weights: Weights, heads: Optional[Tuple[str, ...]], num_heads: int) -> np.ndarray:
    """``w_h`` as a float64 (H,) vector; a mapping is looked up by head name."""
    if isinstance(weights, Mapping):
        if heads is None:
            raise MetricInputError("weights", "a mapping of weights needs head names")
        missing = [h for h in heads if h not in weights]
        extra = sorted(set(weights) - set(heads))
        if missing or extra:
            raise MetricInputError("weights", f"missing heads {missing}, unknown heads {extra}")
        weights = [weights[h] for h in heads]
    w = _float_values("weights", weights, 1)
    if w.shape[0] != num_heads:
        raise MetricInputError("weights", f"expected {num_heads} weights (one per head), got {w.shape[0]}")
    return w


# ------------------------------------------------------------------------------------------ HIT@K

def ranking_score(probs: ArrayLike, weights: Weights, heads: Optional[Sequence[str]] = None) -> np.ndarray:
    """The final ranking score ``S = sum_h w_h f(x)_h`` of each candidate.

    Args:
      probs: (N, H) predicted probabilities ``f(x)_h`` in [0, 1] (sigmoid of the logits, not logits).
      weights: (H,) ranking weights ``w_h``, or a mapping ``{head: w_h}`` together with ``heads``.
      heads: head names in column order of ``probs``; needed only when ``weights`` is a mapping.

    Returns:
      (N,) float64 scores.
    """
    p = _float_values("probs", probs, 2, unit_interval=True)
    hs = _check_heads(heads) if heads is not None else None
    if hs is not None and len(hs) != p.shape[1]:
        raise MetricInputError("heads", f"{len(hs)} names for {p.shape[1]} columns of probs")
    w = _weights_vector(weights, hs, p.shape[1])
    return p @ w


def _chunk_key(user_id: np.ndarray, request_id: np.ndarray) -> np.ndarray:
    """One int64 per row, equal iff (user_id, request_id) are equal and ordered user-major."""

    def offset(x: np.ndarray) -> Tuple[np.ndarray, int]:
        lo, hi = int(x.min()), int(x.max())
        span = hi - lo + 1
        if span <= 2 ** 62:
            return (x - x.dtype.type(lo)).astype(np.int64), span
        inverse = np.unique(x, return_inverse=True)[1].reshape(-1).astype(np.int64)
        return inverse, int(inverse.max()) + 1

    u, span_u = offset(user_id)
    r, span_r = offset(request_id)
    if span_u * span_r > 2 ** 62:       # compact both to dense ranks (< N each)
        u = np.unique(u, return_inverse=True)[1].reshape(-1).astype(np.int64)
        r = np.unique(r, return_inverse=True)[1].reshape(-1).astype(np.int64)
        span_r = int(r.max()) + 1
    return u * span_r + r


class _Grouping:
    """Rows sorted by (user, chunk, descending S, original index), with chunk and tie-block structure.

    Attributes:
      order: (N,) permutation sorting the rows.
      rank: (N,) 0-based position of each sorted row inside its chunk.
      block_rank: (N,) position (inside the chunk) of the first row of the row's tie block.
      block_size: (N,) number of rows in the row's tie block (rows of one chunk with equal S).
      num_users, num_chunks: |U| and the number of (user, chunk) groups.
    """

    def __init__(self, scores: np.ndarray, user_id: np.ndarray, request_id: np.ndarray):
        n = scores.shape[0]
        idx = np.arange(n)
        # Two stable sorts (faster than np.lexsort): by descending S, then by chunk. Stability makes the
        # order of exact ties explicit: "first" = the lower input index ranks higher.
        by_score = np.argsort(-scores, kind="stable")
        key = _chunk_key(user_id, request_id)
        self.order = by_score[np.argsort(key[by_score], kind="stable")]
        u = user_id[self.order]
        r = request_id[self.order]
        s = scores[self.order]
        new_user = np.empty(n, dtype=bool)
        new_user[0] = True
        np.not_equal(u[1:], u[:-1], out=new_user[1:])
        new_chunk = new_user.copy()
        new_chunk[1:] |= r[1:] != r[:-1]
        new_block = new_chunk.copy()
        new_block[1:] |= s[1:] != s[:-1]
        self.num_users = int(np.count_nonzero(new_user))
        self.num_chunks = int(np.count_nonzero(new_chunk))
        chunk_start = np.maximum.accumulate(np.where(new_chunk, idx, 0))
        block_starts = np.flatnonzero(new_block)
        block_sizes = np.diff(np.append(block_starts, n))
        block_start = np.repeat(block_starts, block_sizes)
        self.rank = idx - chunk_start
        self.block_rank = block_start - chunk_start
        self.block_size = np.repeat(block_sizes, block_sizes)

    def topk_weight(self, k: int, ties: str) -> np.ndarray:
        """(N,) how much each sorted row counts towards the chunk's top K (1/0, or a fraction for ties)."""
        if ties == "first":
            return (self.rank < k).astype(np.float64)
        inside = np.clip(k - self.block_rank, 0, self.block_size)
        return inside / self.block_size


def _hits(grouping: _Grouping, labels: np.ndarray, k: int, ties: str) -> np.ndarray:
    """``sum_u sum_c gamma_{c,h} / |U|`` for all heads, given the grouping."""
    w = grouping.topk_weight(k, ties)
    inside = np.flatnonzero(w)                    # rows that reach a top K (few when chunks are long)
    return (w[inside] @ labels[grouping.order[inside]]) / grouping.num_users


def hit_at_k(scores: ArrayLike, labels: ArrayLike, user_id: ArrayLike, request_id: ArrayLike,
             k: int = 3, ties: str = "first") -> np.ndarray:
    """HIT@K per head, paper §4.2.1: ``HIT@K/h = sum_{u} sum_{c in C_u} gamma_{c,h} / |U|``.

    Rows are grouped into chunks by the pair ``(user_id, request_id)``; inside each chunk the K rows
    with the highest ``scores`` are the top K and ``gamma_{c,h}`` counts those with ``labels[:, h] == 1``
    (all rows of a chunk with fewer than K rows count). The sum over all chunks is divided by the number
    of distinct users.

    Args:
      scores: (N,) final ranking score S of each row (see :func:`ranking_score`); any finite reals.
      labels: (N, H) 0/1 labels (bool or any numeric dtype), one column per head.
      user_id: (N,) integer user ids.
      request_id: (N,) integer chunk (ranking request) ids; need only be unique per user.
      k: K, the number of top-ranked candidates per chunk.
      ties: ``"first"``: rows with equal S keep their input order (the earlier row ranks higher),
        deterministic. ``"average"``: expected HIT@K under a uniformly random order of tied rows.

    Returns:
      (H,) float64 HIT@K per head.

    Raises:
      MetricInputError (a ValueError) naming the bad argument: wrong shape, NaN/inf scores, labels
      other than 0/1, non-integer ids, empty input, bad ``k`` or ``ties``.
    """
    k = _check_k(k)
    ties = _check_ties(ties)
    s = _float_values("scores", scores, 1)
    _nonempty("scores", s)
    n = s.shape[0]
    y = _binary_labels("labels", labels, 2, n)
    u = _ids("user_id", user_id, n)
    r = _ids("request_id", request_id, n)
    return _hits(_Grouping(s, u, r), y, k, ties)


# ------------------------------------------------------------------------------------ AUC and NE

def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    n = scores.shape[0]
    n_pos = float(labels.sum())
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores)                    # tie blocks get average ranks: stability not needed
    s = scores[order]
    y = labels[order]
    starts = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1])))
    ends = np.append(starts[1:], n)
    midrank = (starts + 1 + ends) / 2.0           # 1-based average rank of each tie block
    pos_per_block = np.add.reduceat(y, starts)
    rank_sum = float(np.dot(midrank, pos_per_block))
    u_stat = rank_sum - n_pos * (n_pos + 1) / 2.0
    return u_stat / (n_pos * n_neg)


def auc(probs: ArrayLike, labels: ArrayLike) -> float:
    """Exact ROC AUC (Mann-Whitney U / (n_pos * n_neg)) of one head; ties count 1/2.

    ``AUC = P(score of a random positive > score of a random negative) + 0.5 * P(equal)``, computed
    from average ranks in O(N log N). Only the order of ``probs`` matters, so logits work as well.

    Args:
      probs: (N,) finite scores (typically predicted probabilities).
      labels: (N,) 0/1 labels.

    Returns:
      The AUC as a float, or ``nan`` when ``labels`` has only one class (AUC is undefined then).
    """
    s = _float_values("probs", probs, 1)
    _nonempty("probs", s)
    y = _binary_labels("labels", labels, 1, s.shape[0])
    return _auc(s, y)


def _normalized_entropy(p: np.ndarray, y: np.ndarray, eps: float) -> float:
    base = float(y.mean())
    if base <= 0.0 or base >= 1.0:
        return float("nan")
    q = np.clip(p, eps, 1.0 - eps)
    bce = -float(np.mean(y * np.log(q) + (1.0 - y) * np.log1p(-q)))
    base_entropy = -(base * math.log(base) + (1.0 - base) * math.log1p(-base))
    return bce / base_entropy


def normalized_entropy(probs: ArrayLike, labels: ArrayLike, eps: float = NE_EPS) -> float:
    """Normalized entropy of one head: mean binary cross entropy / entropy of the base rate.

    ``NE = -mean(y log q + (1 - y) log(1 - q)) / -(p log p + (1 - p) log(1 - p))`` with
    ``q = clip(probs, eps, 1 - eps)`` (so no ``log(0)``) and ``p = mean(labels)``. NE is 1 for a model
    that always predicts the base rate and below 1 for a better one; lower is better.

    Args:
      probs: (N,) predicted probabilities in [0, 1].
      labels: (N,) 0/1 labels.
      eps: clipping of the probabilities.

    Returns:
      NE as a float, or ``nan`` when ``labels`` has only one class (the base-rate entropy is 0).
    """
    if not 0.0 < eps < 0.5:
        raise MetricInputError("eps", f"expected 0 < eps < 0.5, got {eps!r}")
    p = _float_values("probs", probs, 1, unit_interval=True)
    _nonempty("probs", p)
    y = _binary_labels("labels", labels, 1, p.shape[0])
    return _normalized_entropy(p, y, eps)


# --------------------------------------------------------------------------------------- evaluate

def evaluate(probs: ArrayLike, labels: ArrayLike, user_id: ArrayLike, request_id: ArrayLike,
             heads: Sequence[str], weights: Weights, ks: Sequence[int] = (3,),
             ties: str = "first", eps: float = NE_EPS) -> Dict[str, float]:
    """All metrics of all heads in one call.

    The chunks are ranked once by ``S = sum_h w_h probs[:, h]`` (float64); HIT@K is computed for each
    K in ``ks``, AUC and NE per head on all rows.

    Args:
      probs: (N, H) predicted probabilities ``f(x)_h`` in [0, 1].
      labels: (N, H) 0/1 labels.
      user_id, request_id: (N,) integer ids; ``(user_id, request_id)`` identifies a chunk.
      heads: the H head names, in column order.
      weights: (H,) ranking weights ``w_h`` or a mapping ``{head: w_h}``.
      ks: the K values of HIT@K.
      ties: tie handling of HIT@K, see :func:`hit_at_k`.
      eps: probability clipping of NE.

    Returns:
      ``{"hit@{k}/{head}": ..., "auc/{head}": ..., "ne/{head}": ..., "num_users": |U|,
      "num_chunks": ..., "num_examples": N}``; AUC and NE are ``nan`` for a head with one class only.
    """
    hs = _check_heads(heads)
    ties = _check_ties(ties)
    ks = tuple(_check_k(k) for k in (ks if not isinstance(ks, (int, np.integer)) else (ks,)))
    if not ks:
        raise MetricInputError("ks", "expected at least one K")
    if not 0.0 < eps < 0.5:
        raise MetricInputError("eps", f"expected 0 < eps < 0.5, got {eps!r}")
    p = _float_values("probs", probs, 2, unit_interval=True)
    _nonempty("probs", p)
    n, num_heads = p.shape
    if num_heads != len(hs):
        raise MetricInputError("heads", f"{len(hs)} names for {num_heads} columns of probs")
    y = _binary_labels("labels", labels, 2, n)
    if y.shape[1] != num_heads:
        raise MetricInputError("labels", f"expected {num_heads} columns (as probs), got {y.shape[1]}")
    u = _ids("user_id", user_id, n)
    r = _ids("request_id", request_id, n)
    w = _weights_vector(weights, hs, num_heads)

    grouping = _Grouping(p @ w, u, r)
    out: Dict[str, float] = {}
    for k in ks:
        hits = _hits(grouping, y, k, ties)
        for j, h in enumerate(hs):
            out[f"hit@{k}/{h}"] = float(hits[j])
    p_cols, y_cols = np.ascontiguousarray(p.T), np.ascontiguousarray(y.T)
    for j, h in enumerate(hs):
        out[f"auc/{h}"] = _auc(p_cols[j], y_cols[j])
        out[f"ne/{h}"] = _normalized_entropy(p_cols[j], y_cols[j], eps)
    out["num_users"] = grouping.num_users
    out["num_chunks"] = grouping.num_chunks
    out["num_examples"] = n
    return out


class MetricAccumulator:
    """Streaming form of :func:`evaluate`: ``add`` batches, then ``result``.

    The rows of one chunk may arrive in different batches. The accumulator keeps a host copy of every
    batch (N * (2H + 2) numbers; exact AUC and HIT@K need all rows) and ``result()`` returns exactly
    ``evaluate`` on the concatenation of all batches in the order they were added (so ``ties="first"``
    refers to that order).

    Example::

        acc = MetricAccumulator(("click", "repin", "hide"), {"click": 1, "repin": 1, "hide": -1})
        for batch in batches:
            acc.add(jax.nn.sigmoid(logits), batch.labels, batch.user_id, batch.request_id)
        print(acc.result()["hit@3/repin"])
    """

    def __init__(self, heads: Sequence[str], weights: Weights, ks: Sequence[int] = (3,),
                 ties: str = "first", eps: float = NE_EPS):
        self.heads = _check_heads(heads)
        self.weights = _weights_vector(weights, self.heads, len(self.heads))
        self.ks = tuple(_check_k(k) for k in (ks if not isinstance(ks, (int, np.integer)) else (ks,)))
        if not self.ks:
            raise MetricInputError("ks", "expected at least one K")
        self.ties = _check_ties(ties)
        if not 0.0 < eps < 0.5:
            raise MetricInputError("eps", f"expected 0 < eps < 0.5, got {eps!r}")
        self.eps = eps
        self.reset()

    def reset(self) -> None:
        """Forget all added batches."""
        self._probs: List[np.ndarray] = []
        self._labels: List[np.ndarray] = []
        self._users: List[np.ndarray] = []
        self._requests: List[np.ndarray] = []

    @property
    def num_examples(self) -> int:
        return int(sum(x.shape[0] for x in self._probs))

    def add(self, probs: ArrayLike, labels: ArrayLike, user_id: ArrayLike, request_id: ArrayLike) -> None:
        """Add one batch: probs and labels (B, H), user_id and request_id (B,); numpy or JAX arrays.

        The batch is validated now (so a bad batch is reported where it comes from) and copied.
        """
        num_heads = len(self.heads)
        p = _float_values("probs", probs, 2, unit_interval=True)
        n = p.shape[0]
        if p.shape[1] != num_heads:
            raise MetricInputError("probs", f"expected {num_heads} columns (one per head), got {p.shape[1]}")
        y = _binary_labels("labels", labels, 2, n)
        if y.shape[1] != num_heads:
            raise MetricInputError("labels", f"expected {num_heads} columns (one per head), got {y.shape[1]}")
        u = _ids("user_id", user_id, n)
        r = _ids("request_id", request_id, n)
        self._probs.append(np.array(p, dtype=np.float64, copy=True))
        self._labels.append(np.array(y, dtype=np.uint8, copy=True))
        self._users.append(np.array(u, dtype=np.int64, copy=True))
        self._requests.append(np.array(r, dtype=np.int64, copy=True))

    def result(self) -> Dict[str, float]:
        """``evaluate`` on everything added so far; raises MetricInputError when nothing was added."""
        if not self._probs or self.num_examples == 0:
            raise MetricInputError("probs", "no examples were added")
        return evaluate(np.concatenate(self._probs), np.concatenate(self._labels),
                        np.concatenate(self._users), np.concatenate(self._requests),
                        self.heads, self.weights, self.ks, self.ties, self.eps)


# -------------------------------------------------------------------------------------------- lift

def _lift(model: float, baseline: float, name: str) -> float:
    if not (math.isfinite(model) and math.isfinite(baseline)):
        return float("nan")
    if baseline == 0.0:
        raise MetricInputError("baseline", f"is 0 for {name}; relative lift is undefined")
    return 100.0 * (model - baseline) / baseline


def lift_pct(model: Union[float, ArrayLike, Mapping[str, float]],
             baseline: Union[float, ArrayLike, Mapping[str, float]]):
    """Relative lift in percent, ``100 * (m - b) / b``, as reported in the paper's Table 2.

    For a negative-engagement head (hide) a negative lift is the improvement.

    Args:
      model, baseline: floats, arrays of the same shape (element-wise lift), or two ``evaluate``
        dicts (lift of every metric key present in both, except the ``num_*`` counts).

    Returns:
      A float, an array, or a dict. ``nan`` where either input is ``nan``.

    Raises:
      MetricInputError (a ValueError) naming ``baseline`` when a baseline value is 0.
    """
    if isinstance(model, Mapping) or isinstance(baseline, Mapping):
        if not (isinstance(model, Mapping) and isinstance(baseline, Mapping)):
            raise MetricInputError("baseline", "model and baseline must both be mappings or both numbers")
        return {key: _lift(float(model[key]), float(baseline[key]), key)
                for key in model if key in baseline and not key.startswith("num_")}
    m = np.asarray(model, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if m.ndim == 0 and b.ndim == 0:
        return _lift(float(m), float(b), "the value")
    try:
        m, b = np.broadcast_arrays(m, b)
    except ValueError as e:
        raise MetricInputError("baseline", f"shape {b.shape} does not match model shape {m.shape}") from e
    finite = np.isfinite(m) & np.isfinite(b)
    if np.any(finite & (b == 0.0)):
        raise MetricInputError("baseline", "contains 0; relative lift is undefined")
    with np.errstate(invalid="ignore", divide="ignore"):
        out = 100.0 * (m - b) / b
    return np.where(finite, out, np.nan)
