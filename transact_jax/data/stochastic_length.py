"""Stochastic Length (SL): algorithmically increased sparsity of user histories, from "Actions Speak
Louder than Words: Trillion-Parameter Sequential Transducers for Generative Recommendations"
(§3.2, eq. (4); Appendix F).

**Symbols.** A user history has n tokens (``n_j`` for sequence j). ``N_c`` is the maximum history
length: the paper defines it as ``max_j n_{c,j}``; for histories truncated to a fixed length (as
every data path here is) that maximum is the truncation length, so it is the configured ``max_len``,
not the longest sequence of the batch at hand (which would make the outcome depend on how the data
is batched). ``alpha`` in (1, 2] sets the threshold ``L = floor(N_c ** (alpha / 2))``.

**Selection** (eq. (4)), independently per sequence:

- ``n <= L``: the whole sequence;
- ``n > L``: the whole sequence with probability ``N_c ** alpha / n ** 2``, otherwise a subsequence
  of L tokens, kept in their original (chronological) order.

A sequence's expected attention cost ``E[n'^2] = p n^2 + (1 - p) L^2`` (n' its kept length, p
the keep-whole probability) is then at most ``2 N_c ** alpha``. With ``alpha = 2``, ``L = N_c``
and every sequence of at most ``N_c`` tokens is kept whole: SL is off
(:attr:`StochasticLengthConfig.enabled`). Sequences longer than ``N_c`` are allowed and follow the
same rule (keep-whole probability below 1), with any alpha.

**Subsequence selection** (Appendix F.1), with ``f_i = t_n - t_i`` the time elapsed between token
i and the sequence's latest token (``t_n``: the largest timestamp of the sequence):

- ``"greedy"``: the L tokens with the smallest ``f_i`` (the most recent; ties prefer later
  positions);
- ``"random"``: L tokens uniformly without replacement;
- ``"feature_weighted"`` (the default: the best model quality in the paper's Table 13): L tokens
  drawn without replacement, each draw proportional to ``w_i = 1 - f_i / sum_j f_j`` among the
  tokens not yet drawn. The paper's formula is garbled in print (``1 f_{n,i} / (sum f_{j,i})``);
  this reads it as one minus the token's share of the total elapsed time, so recent tokens are
  likelier. The tilt is mild for long sequences (the weights lie in [1 - 2/n, 1] for evenly spaced
  tokens). If every token has the same timestamp (``sum_j f_j = 0``) the weights are uniform. A
  weight is 0 only for a token holding all the elapsed time (all others share the latest
  timestamp); the other n - 1 >= L weights are then positive, so the draw is always defined. The
  draw is the Gumbel-top-k trick (the L largest ``log w_i + Gumbel noise``), equivalent to
  successive sampling.

**Sparsity** (Appendix F.2): :func:`sparsity` is one minus the mean length over ``N_c``;
:func:`attention_sparsity_s2` (the paper's s_2) the same for the attention matrices, taking a
sequence's attention cost as ``n ** 2`` (the eq. (4) cost model): one minus ``sum_j n_j ** 2`` over
``num_sequences * N_c ** 2``.

Everything is host-side numpy over jagged arrays (sequence j is rows ``offsets[j]:offsets[j+1]``)
and deterministic given the ``np.random.Generator``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, Mapping, Tuple

import numpy as np

from transact_jax.config_json import AT_LEAST_ONE, Bound, ConfigError, check_fields

METHODS = ("feature_weighted", "greedy", "random")
"""Subsequence selection methods (Appendix F.1)."""

ALPHA = Bound(1, 2, low_open=True)
"""The range of ``alpha``: (1, 2]."""


@dataclasses.dataclass(frozen=True)
class StochasticLengthConfig:
    """Stochastic Length (module docstring).

    Attributes:
      max_len: N_c, the maximum (truncation) length of the histories.
      alpha: in (1, 2]; 2 keeps every sequence of at most ``max_len`` tokens whole.
      method: the subsequence selection, one of :data:`METHODS`.
    """

    max_len: int
    alpha: float = 2.0
    method: str = "feature_weighted"

    def __post_init__(self):
        check_fields(self, {"max_len": AT_LEAST_ONE, "alpha": ALPHA})
        if self.method not in METHODS:
            raise ConfigError("method", f"expected one of {METHODS}, got {self.method!r}")

    @property
    def enabled(self) -> bool:
        """Whether SL can change a sequence of at most ``max_len`` tokens (``alpha < 2``)."""
        return self.alpha < 2.0

    @property
    def threshold(self) -> int:
        """L = floor(N_c ** (alpha / 2)), the subsequence length (a 1e-9 slack absorbs rounding of
        exact powers such as 1024 ** 0.8 = 256)."""
        return int(math.floor(self.max_len ** (self.alpha / 2.0) + 1e-9))


def keep_whole_probability(lengths: np.ndarray, cfg: StochasticLengthConfig) -> np.ndarray:
    """The probability that a sequence of each of ``lengths`` is kept whole: 1 up to L, else
    ``min(1, N_c ** alpha / n ** 2)``."""
    n = np.asarray(lengths, np.float64)
    p = np.minimum(1.0, float(cfg.max_len) ** cfg.alpha / np.maximum(n, 1.0) ** 2)
    return np.where(n <= cfg.threshold, 1.0, p)


def _check_jagged(offsets: np.ndarray, timestamps: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    offsets = np.asarray(offsets, np.int64)
    timestamps = np.asarray(timestamps)
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        raise ValueError("offsets: expected a non-decreasing 1-D array starting at 0")
    if timestamps.shape != (offsets[-1],):
        raise ValueError(f"timestamps: expected shape ({offsets[-1]},) (offsets[-1] tokens), got "
                         f"{timestamps.shape}")
    return offsets, timestamps


def _scores(method: str, elapsed: np.ndarray, seg: np.ndarray, num_segments: int,
            rng: np.random.Generator) -> np.ndarray:
    """Per-token scores whose L largest in each segment are the tokens kept."""
    if method == "greedy":
        return -elapsed
    if method == "random":
        return rng.gumbel(size=len(elapsed))
    total = np.bincount(seg, weights=elapsed, minlength=num_segments)[seg]
    share = np.divide(elapsed, total, out=np.zeros_like(elapsed), where=total > 0)
    with np.errstate(divide="ignore"):
        return np.log1p(-share) + rng.gumbel(size=len(elapsed))


def _top_per_segment(score: np.ndarray, seg: np.ndarray, starts: np.ndarray, k: int) -> np.ndarray:
    """Indices (into ``score``) of the ``k`` highest scores of every segment (ties: the later
    index). ``seg`` is sorted; segment s starts at ``starts[s]``."""
    index = np.arange(len(score))
    order = np.lexsort((-index, -score, seg))
    rank = index - starts[seg[order]]
    return order[rank < k]


def select(offsets: np.ndarray, timestamps: np.ndarray, cfg: StochasticLengthConfig,
           rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Stochastic Length on jagged sequences (module docstring): ``(keep_index, new_offsets)``, the
    sorted int64 indices of the kept tokens into the flat arrays (so tokens stay in chronological
    order and sequences in order) and the kept sequences' offsets (int64, one entry per input
    offset). ``timestamps`` (flat, one per token) drive the subsequence selection."""
    offsets, timestamps = _check_jagged(offsets, timestamps)
    lengths = np.diff(offsets)
    cut = lengths > cfg.threshold
    cut[cut] = rng.random(int(cut.sum())) >= keep_whole_probability(lengths[cut], cfg)
    seg_of_token = np.repeat(np.arange(len(lengths)), lengths)
    keep = ~cut[seg_of_token]
    rows = np.flatnonzero(~keep)
    if rows.size:
        cut_ids = np.flatnonzero(cut)
        seg = np.repeat(np.arange(len(cut_ids)), lengths[cut_ids])
        starts = np.concatenate([[0], np.cumsum(lengths[cut_ids])[:-1]])
        times = timestamps[rows].astype(np.float64)
        elapsed = np.maximum.reduceat(times, starts)[seg] - times
        score = _scores(cfg.method, elapsed, seg, len(cut_ids), rng)
        keep[rows[_top_per_segment(score, seg, starts, cfg.threshold)]] = True
    new_lengths = np.where(cut, cfg.threshold, lengths)
    new_offsets = np.concatenate([[0], np.cumsum(new_lengths)]).astype(np.int64)
    return np.flatnonzero(keep).astype(np.int64), new_offsets


def subsample(offsets: np.ndarray, timestamps: np.ndarray, arrays: Mapping[str, np.ndarray],
              cfg: StochasticLengthConfig, rng: np.random.Generator
              ) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """:func:`select`, applied: ``(new_offsets, {name: array[keep_index]})`` for every flat
    per-token array of ``arrays`` (each aligned with ``timestamps``; include the timestamps there
    to keep them)."""
    for name, a in arrays.items():
        if np.shape(a)[:1] != np.shape(timestamps)[:1]:
            raise ValueError(f"{name}: expected {np.shape(timestamps)[0]} rows (one per token), "
                             f"got shape {np.shape(a)}")
    keep, new_offsets = select(offsets, timestamps, cfg, rng)
    return new_offsets, {name: np.asarray(a)[keep] for name, a in arrays.items()}


def _lengths(lengths: np.ndarray, max_len: int) -> np.ndarray:
    n = np.asarray(lengths, np.float64)
    if n.ndim != 1 or n.size == 0:
        raise ValueError(f"lengths: expected a non-empty 1-D array, got shape {n.shape}")
    if not isinstance(max_len, (int, np.integer)) or isinstance(max_len, bool) or max_len < 1:
        raise ValueError(f"max_len: expected an int >= 1, got {max_len!r}")
    return n


def sparsity(lengths: np.ndarray, max_len: int) -> float:
    """Sequence sparsity (Appendix F.2): ``1 - mean(lengths) / max_len``."""
    n = _lengths(lengths, max_len)
    return float(1.0 - n.mean() / max_len)


def attention_sparsity_s2(lengths: np.ndarray, max_len: int) -> float:
    """The paper's s_2 (Appendix F.2), with a sequence's attention cost taken as ``n ** 2``:
    ``1 - sum(lengths ** 2) / (len(lengths) * max_len ** 2)``."""
    n = _lengths(lengths, max_len)
    return float(1.0 - np.sum(n ** 2) / (n.size * float(max_len) ** 2))


__all__ = ["ALPHA", "METHODS", "StochasticLengthConfig", "attention_sparsity_s2",
           "keep_whole_probability", "select", "sparsity", "subsample"]
