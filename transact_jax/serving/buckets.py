"""Shape buckets: pad every batch to one of a few fixed shapes so jitted code never recompiles.

A jitted function compiles once per distinct input shape. Serving batches vary in every dimension
(number of requests U, candidates N, tokens per sequence family), so each dimension is padded up to
the next rung of a :class:`Ladder`; a :class:`Bucket` is the resulting padded shape, and the Ranker
compiles one forward per bucket. After warm-up over the buckets that the traffic reaches, steady
state compiles nothing.

Two layouts (paper §3.4.2, Figure 5):

* ``"dedup"`` (request-level de-duplication): the full sequences are stored once per *request*,
  concatenated (jagged, with offsets). A bucket pads U (requests), N (candidates) and, per sequence
  family (S_LL, S_RT, S_imp), the *total* token count T of the batch.
* ``"broadcast"`` (a naive server): each *candidate* carries its own copy of its request's
  sequences, as dense (N, L) rows. A bucket pads N and, per family, the row width L (the longest
  sequence of the batch).

Padding never changes a real candidate's score: padded candidates point at an empty padding request
(dedup) or carry empty sequences (broadcast), every candidate is scored independently, and padded
rows are sliced off. The dedup layout always reserves at least one padding request for that
(``requests >= U + 1``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Tuple

from transact_jax.config import SelectionConfig

LAYOUTS = ("dedup", "broadcast")


@dataclasses.dataclass(frozen=True)
class Ladder:
    """Increasing sizes ("rungs") that one dimension is padded up to.

    ``pick(n)`` is the smallest rung >= n. A size above the top rung is rounded up to a multiple of
    the top rung (a new shape, compiled once); size the ladder so that this does not happen in
    steady state.
    """

    rungs: Tuple[int, ...]

    def __post_init__(self):
        rungs = tuple(self.rungs)
        if not rungs:
            raise ValueError("Ladder.rungs: need at least one rung")
        if any(not isinstance(r, int) or r < 1 for r in rungs):
            raise ValueError(f"Ladder.rungs: rungs must be positive ints, got {rungs}")
        if any(b <= a for a, b in zip(rungs, rungs[1:])):
            raise ValueError(f"Ladder.rungs: rungs must be strictly increasing, got {rungs}")
        object.__setattr__(self, "rungs", rungs)

    @classmethod
    def powers_of_two(cls, lo: int, hi: int) -> "Ladder":
        """Powers of two from ``lo`` (rounded up to one) to ``hi``; ``hi`` is the top rung even when
        it is not a power of two (e.g. a configured maximum length of 10,000)."""
        if not 1 <= lo <= hi:
            raise ValueError(f"Ladder.powers_of_two: need 1 <= lo <= hi, got {lo}, {hi}")
        rungs, r = [], 1 << (lo - 1).bit_length()
        while r < hi:
            rungs.append(r)
            r *= 2
        return cls(tuple(rungs) + (hi,))

    @classmethod
    def geometric(cls, lo: int, hi: int, ratio: float = 1.25, multiple: int = 64) -> "Ladder":
        """Rungs growing by ``ratio`` from ``lo`` up to at least ``hi``, each rounded up to a multiple
        of ``multiple``. A ratio of 1.25 wastes at most 25% of a padded dimension (powers of two:
        up to 50%) for about three times as many rungs."""
        if not 1 <= lo <= hi or ratio <= 1.0 or multiple < 1:
            raise ValueError(f"Ladder.geometric: need 1 <= lo <= hi, ratio > 1, multiple >= 1; got "
                             f"{lo}, {hi}, {ratio}, {multiple}")
        rungs, r = [], float(lo)
        while True:
            rung = -(-math.ceil(r) // multiple) * multiple
            if not rungs or rung > rungs[-1]:
                rungs.append(rung)
            if rung >= hi:
                return cls(tuple(rungs))
            r *= ratio

    def pick(self, n: int) -> int:
        """The padded size for ``n`` (see the class docstring)."""
        if n < 0:
            raise ValueError(f"Ladder.pick: negative size {n}")
        for r in self.rungs:
            if r >= n:
                return r
        top = self.rungs[-1]
        return -(-n // top) * top


@dataclasses.dataclass(frozen=True)
class Bucket:
    """One padded batch shape (hashable: one compiled forward each).

    Attributes:
      layout: "dedup" or "broadcast" (module docstring).
      candidates: padded N.
      requests: padded U (dedup; 0 for broadcast).
      ll, rt, imp: dedup: padded total tokens of S_LL, S_RT, S_imp in the batch; broadcast: padded
        per-candidate row width of each family.
    """

    layout: str
    candidates: int
    requests: int
    ll: int
    rt: int
    imp: int

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"Bucket.layout: expected one of {LAYOUTS}, got {self.layout!r}")

    def family(self, name: str) -> int:
        return {"ll": self.ll, "rt": self.rt, "imp": self.imp}[name]


@dataclasses.dataclass(frozen=True)
class BucketConfig:
    """The ladders of every padded dimension.

    Attributes:
      candidates: ladder of N (both layouts).
      requests: ladder of U (dedup), applied to U + 1 (one padding request is always reserved).
      ll_tokens, rt_tokens, imp_tokens: dedup: ladders of the batch's total tokens per family.
      ll_width, rt_width, imp_width: broadcast: ladders of the per-candidate row width per family
        (top rung = the configured maximum length, which truncation guarantees is never exceeded).
    """

    candidates: Ladder
    requests: Ladder
    ll_tokens: Ladder
    rt_tokens: Ladder
    imp_tokens: Ladder
    ll_width: Ladder
    rt_width: Ladder
    imp_width: Ladder

    @classmethod
    def for_selection(cls, sel: SelectionConfig, max_candidates: int = 8192,
                      max_requests: int = 1024, token_ratio: float = 1.25) -> "BucketConfig":
        """Defaults: powers of two for N (16 ... max_candidates) and U (2 ... max_requests); token
        totals on a geometric ladder (``token_ratio``) up to ``max_requests`` full sequences; row
        widths on powers of two up to the configured maximum length."""
        def tokens(max_len: int, lo: int) -> Ladder:
            return Ladder.geometric(lo, max(lo, max_requests * max(max_len, 1)), token_ratio)

        def width(max_len: int) -> Ladder:
            return Ladder.powers_of_two(min(16, max(max_len, 1)), max(max_len, 1))

        return cls(
            candidates=Ladder.powers_of_two(16, max(16, max_candidates)),
            requests=Ladder.powers_of_two(2, max(2, max_requests)),
            ll_tokens=tokens(sel.max_ll_len, 1024), rt_tokens=tokens(sel.max_rt_len, 128),
            imp_tokens=tokens(sel.max_imp_len, 128),
            ll_width=width(sel.max_ll_len), rt_width=width(sel.max_rt_len),
            imp_width=width(sel.max_imp_len))

    def dedup(self, num_candidates: int, num_requests: int,
              total_tokens: Tuple[int, int, int]) -> Bucket:
        """Bucket of a de-duplicated batch: U requests, N candidates, (T_LL, T_RT, T_imp) tokens."""
        t_ll, t_rt, t_imp = total_tokens
        return Bucket("dedup", self.candidates.pick(num_candidates),
                      self.requests.pick(num_requests + 1), self.ll_tokens.pick(t_ll),
                      self.rt_tokens.pick(t_rt), self.imp_tokens.pick(t_imp))

    def broadcast(self, num_candidates: int, max_lengths: Tuple[int, int, int]) -> Bucket:
        """Bucket of a broadcast batch: N candidates, longest (S_LL, S_RT, S_imp) of the batch."""
        l_ll, l_rt, l_imp = max_lengths
        return Bucket("broadcast", self.candidates.pick(num_candidates), 0,
                      self.ll_width.pick(l_ll), self.rt_width.pick(l_rt), self.imp_width.pick(l_imp))
