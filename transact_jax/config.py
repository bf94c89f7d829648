"""Frozen configuration dataclasses for features and NN selection.

Notation from the paper (arXiv 2506.02267, Table 1), explained once here:

* ``S_LL``  - lifelong sequence: the user's explicit actions (clicks, repins, hides, ...) over years,
  up to ``L_LL = 10,000`` most recent tokens, excluding the real-time window.
* ``S_RT``  - real-time sequence: the user's most recent actions (up to 100).
* ``S_imp`` - impression sequence: items recently shown to the user but not engaged with (up to 100).
* ``r``     - ``S_RT[:r]`` are the r most recent real-time actions, kept regardless of similarity.
* ``K``     - how many tokens NN selection keeps from a sequence (``K_LL``, ``K_RT``, ``K_imp``).
* ``S_all`` - ``NN(S_LL; K_LL) ⊕ S_RT[:r] ⊕ NN(S_RT[r:]; K_RT) ⊕ NN(S_imp; K_imp)``, the encoder input.
* ``w_NAL`` - weight of the Next Action Loss (training config, not here).

Sequences are stored chronologically (index 0 is the oldest token).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import numpy as np

from pallas_kernels.int8_codec import QUANT_SCALE
from transact_jax.config_json import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, ConfigError, check_fields

DEFAULT_ACTIONS: Tuple[str, ...] = (
    "click", "repin", "closeup", "long_click", "share", "comment", "download", "hide")
DEFAULT_SURFACES: Tuple[str, ...] = (
    "homefeed", "search", "related", "board", "profile", "notification", "shopping", "other")


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """What one sequence token and one candidate carry.

    Attributes:
      action_names: the A action types; a token's actions are a multi-hot set over them, stored as a
        bitmask (bit ``a`` set <=> action ``action_names[a]``).
      positive_actions: types that count as positive engagement (NAL positives, §3.3.2).
      negative_actions: types that count as negative engagement.
      surface_names: the S surfaces a token can come from.
      embedding_dim: size of the item content embedding (32, "PinSage" in the paper).
      quant_scale: int8 quantization scale (0.65, §3.2.1).
      heads: prediction heads, one label and one logit each.
      num_dense: number of dense (float) user/item/context features per example.
      categorical_vocab_sizes: vocabulary size of each categorical feature per example.
    """

    action_names: Tuple[str, ...] = DEFAULT_ACTIONS
    positive_actions: Tuple[str, ...] = (
        "click", "repin", "closeup", "long_click", "share", "comment", "download")
    negative_actions: Tuple[str, ...] = ("hide",)
    surface_names: Tuple[str, ...] = DEFAULT_SURFACES
    embedding_dim: int = 32
    quant_scale: float = QUANT_SCALE
    heads: Tuple[str, ...] = ("click", "repin", "hide")
    num_dense: int = 8
    categorical_vocab_sizes: Tuple[int, ...] = (1000, 64, 32)

    def __post_init__(self):
        check_fields(self, {"embedding_dim": AT_LEAST_ONE, "quant_scale": POSITIVE,
                            "num_dense": NON_NEGATIVE, "categorical_vocab_sizes": AT_LEAST_ONE})
        if not 1 <= len(self.action_names) <= 32:
            raise ConfigError("action_names", f"need 1..32 action types, got {len(self.action_names)}")
        for field in ("positive_actions", "negative_actions"):
            unknown = set(getattr(self, field)) - set(self.action_names)
            if unknown:
                raise ConfigError(field, f"unknown action types {sorted(unknown)}")
        if set(self.positive_actions) & set(self.negative_actions):
            raise ConfigError("negative_actions", "overlaps positive_actions")
        if not 1 <= len(self.surface_names) <= 32767:
            raise ConfigError("surface_names", f"need 1..32767 surfaces, got {len(self.surface_names)}")

    @property
    def num_actions(self) -> int:
        """A, the number of action types."""
        return len(self.action_names)

    @property
    def num_surfaces(self) -> int:
        """S, the number of surfaces."""
        return len(self.surface_names)

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    @property
    def action_dtype(self) -> np.dtype:
        """Smallest unsigned integer type that holds the A-bit action bitmask."""
        a = self.num_actions
        return np.dtype(np.uint8 if a <= 8 else np.uint16 if a <= 16 else np.uint32)

    def action_bit(self, name: str) -> int:
        """Bitmask value of one action type."""
        return 1 << self.action_names.index(name)

    def action_mask(self, names: Tuple[str, ...]) -> int:
        """Bitmask with the bits of ``names`` set."""
        mask = 0
        for name in names:
            mask |= self.action_bit(name)
        return mask

    @property
    def positive_mask(self) -> int:
        return self.action_mask(self.positive_actions)

    @property
    def negative_mask(self) -> int:
        return self.action_mask(self.negative_actions)


LL_SELECTIONS = ("nn", "recent", "random")


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    """Sequence limits and the NN selection that builds S_all (paper §3.2.2; docs/design.md, "NN
    selection" and "S_all slots and ordering").

    S_all has fixed slots: ``[0, K_LL)`` hold NN(S_LL), the next ``r`` hold S_RT[:r], then ``K_RT``
    slots for NN(S_RT[r:]) and ``K_imp`` for NN(S_imp). Inside a segment, valid tokens come first in
    chronological order, padding after; a validity mask travels with S_all.

    Attributes:
      max_ll_len: L_LL, longest lifelong sequence kept.
      max_rt_len: longest real-time sequence kept.
      max_imp_len: longest impression sequence kept. A sequence longer than its maximum keeps its
        most recent tokens (docs/design.md, "Truncation and over-long sequences").
      k_ll, r, k_rt, k_imp: segment sizes (K_LL, r, K_RT, K_imp).
      num_nal_negatives: M, the user's M most recent impressions logged per example as NAL negatives
        (chronological, padding last).
      ll_selection: how the K_LL lifelong tokens are chosen: ``"nn"`` (the paper's NN(S_LL, c;
        K_LL), the default), ``"recent"`` (the K_LL most recent tokens of S_LL) or ``"random"``
        (K_LL tokens drawn across the whole of S_LL, one per equal stratum, deterministically):
        ablations, the same tokens for every candidate of a request, that separate the value of the
        lifelong history from the value of selecting in it by similarity.
    """

    max_ll_len: int = 10_000
    max_rt_len: int = 100
    max_imp_len: int = 100
    k_ll: int = 96
    r: int = 32
    k_rt: int = 32
    k_imp: int = 32
    num_nal_negatives: int = 32
    ll_selection: str = "nn"

    def __post_init__(self):
        check_fields(self, {f.name: NON_NEGATIVE for f in dataclasses.fields(self)
                            if f.name != "ll_selection"})
        if self.ll_selection not in LL_SELECTIONS:
            raise ConfigError("ll_selection", f"expected one of {LL_SELECTIONS}, got {self.ll_selection!r}")
        if self.s_all_len == 0:
            raise ConfigError("", "S_all would be empty: k_ll + r + k_rt + k_imp must be > 0")
        if self.r > self.max_rt_len:
            raise ConfigError("r", f"{self.r} exceeds max_rt_len={self.max_rt_len}")

    @property
    def s_all_len(self) -> int:
        """|S_all| = K_LL + r + K_RT + K_imp (192 by default, the paper's choice, §4.4.2)."""
        return self.k_ll + self.r + self.k_rt + self.k_imp

    @property
    def max_lengths(self) -> Dict[str, int]:
        """Longest sequence kept per family: ``{"ll": max_ll_len, "rt": max_rt_len, "imp":
        max_imp_len}`` (the family names of ``RequestBatch.sequences()``)."""
        return {"ll": self.max_ll_len, "rt": self.max_rt_len, "imp": self.max_imp_len}

    @property
    def segments(self) -> Tuple[Tuple[str, slice], ...]:
        """``(name, slots)`` of the four S_all segments, in order."""
        out, start = [], 0
        for name, size in (("ll", self.k_ll), ("rt_recent", self.r), ("rt_nn", self.k_rt),
                           ("imp", self.k_imp)):
            out.append((name, slice(start, start + size)))
            start += size
        return tuple(out)

    def segment(self, name: str) -> slice:
        return dict(self.segments)[name]
