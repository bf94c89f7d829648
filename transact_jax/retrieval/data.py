"""Per-user chronological item sequences with a leave-one-out split, the traditional sequential
recommendation setting of "Generative Recommenders" (§4.1.1, Table 4).

From an :class:`~transact_jax.data.interactions.Interactions` table (MovieLens ratings through
:func:`~transact_jax.data.public.read_movielens`, or the generic interactions CSV through
:func:`~transact_jax.data.public.read_interactions_csv`):

1. **Engagements.** Every rating is a positive (its presence, not its value; ``min_rating`` keeps
   only ratings at or above it). Impressions (``exposed`` rows, ``action == "impression"``) are not
   engagements and are dropped.
2. **Sequences.** Each user's engagements sorted by timestamp; ties keep the file's order (a stable
   sort), so a re-run gives the same sequences.
3. **Items** are renumbered 1..V in the order of their original ids; 0 is padding. Every engaged item
   is in the corpus, also one seen only as a validation or test target.
4. **Leave-one-out.** For a user with n >= 3 engagements: the last item is the test target (input:
   the n - 1 items before it), the second-to-last the validation target (input: the n - 2 before
   it), and the first n - 2 items are the training sequence (next-item targets at every position).
   Users with fewer than 3 engagements are not evaluated; their whole sequence is training data.
5. **Length.** Inputs keep the most recent ``max_len`` items (200 for ML-1M in the paper); positions
   count from the first kept item.

Timestamps are kept (seconds, shifted so that the data's first one is 0, int32) for the temporal
relative attention bias of HSTU. Sets are jagged numpy arrays (:class:`SequenceSet`); :func:`batches`
cuts them into fixed-shape :class:`JaggedBatch` es for jitted steps. :func:`subsample_training`
applies Stochastic Length (:mod:`transact_jax.data.stochastic_length`) to a training set.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import jax
import numpy as np

from transact_jax.data.interactions import Interactions
from transact_jax.data.public import read_interactions_csv, read_movielens
from transact_jax.data.schema import SchemaError
from transact_jax.data.stochastic_length import StochasticLengthConfig, subsample

PAD = 0
"""Item id of padding (items are 1..V)."""

PathLike = Union[str, os.PathLike]


@dataclasses.dataclass(frozen=True)
class SequenceSet:
    """Jagged sequences: sequence ``i`` is rows ``offsets[i]:offsets[i + 1]`` of ``items`` (remapped
    ids), ``timestamps`` (int32 seconds) and ``targets`` (the item to predict from that position, 0
    for none). Training sets have a target at every position; evaluation sets only at the last."""

    items: np.ndarray
    timestamps: np.ndarray
    targets: np.ndarray
    offsets: np.ndarray

    @property
    def num_sequences(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


@dataclasses.dataclass(frozen=True)
class LeaveOneOut:
    """The three sets of one data set, the corpus size ``num_items`` (V; ids 1..V) and the item
    counts in the training set (``train_counts[i]`` for id i, 0 for padding), the popularity that
    negative sampling may use. ``item_ids[i]`` is the original id of item i (``item_ids[0] = -1``)
    and ``eval_users`` the original ids of the users of the validation and test sets, in order."""

    train: SequenceSet
    valid: SequenceSet
    test: SequenceSet
    num_items: int
    max_len: int
    item_ids: np.ndarray
    eval_users: np.ndarray
    train_counts: np.ndarray

    def summary(self) -> dict:
        return {"users": int(self.eval_users.size), "items": self.num_items,
                "train_sequences": self.train.num_sequences,
                "train_targets": int((self.train.targets > 0).sum()), "max_len": self.max_len,
                "mean_train_length": float(self.train.lengths.mean()) if self.train.num_sequences
                else 0.0}


def _engagements(data: Interactions, min_rating: Optional[float]) -> np.ndarray:
    keep = np.ones(len(data.user_id), bool)
    if data.exposed is not None:
        keep &= ~np.asarray(data.exposed, bool)
    if data.action is not None:
        keep &= np.asarray(data.action) != "impression"
    if min_rating is not None:
        if data.rating is None:
            raise SchemaError("rating", "min_rating needs a rating column")
        keep &= np.asarray(data.rating, np.float64) >= min_rating
    if not keep.any():
        raise SchemaError("user_id", "no engagements left after dropping impressions / low ratings")
    return np.flatnonzero(keep)


def _pack(pieces: List[Tuple[np.ndarray, np.ndarray, np.ndarray]]) -> SequenceSet:
    lengths = np.asarray([len(p[0]) for p in pieces], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    def cat(j, dtype):
        return (np.concatenate([p[j] for p in pieces]).astype(dtype) if pieces
                else np.zeros(0, dtype))
    return SequenceSet(cat(0, np.int32), cat(1, np.int32), cat(2, np.int32), offsets)


def leave_one_out(data: Interactions, max_len: int = 200, *,
                  min_rating: Optional[float] = None) -> LeaveOneOut:
    """The leave-one-out split of ``data`` (module docstring)."""
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
        raise ValueError(f"max_len: expected an int >= 1, got {max_len!r}")
    rows = _engagements(data, min_rating)
    user = np.asarray(data.user_id, np.int64)[rows]
    item = np.asarray(data.item_id, np.int64)[rows]
    time = np.asarray(data.timestamp, np.int64)[rows]
    span = int(time.max() - time.min())
    if span >= 2 ** 31:
        raise SchemaError("timestamp", f"spans {span} s, more than int32 seconds hold")
    time = (time - time.min()).astype(np.int32)
    item_ids, item = np.unique(item, return_inverse=True)
    item = item.astype(np.int32) + 1
    order = np.lexsort((time, user))          # by user, then time; stable: ties keep file order
    user, item, time = user[order], item[order], time[order]
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    bounds = np.r_[starts, len(user)]

    def piece(s: np.ndarray, t: np.ndarray, target_every_position: bool, target=None):
        if target_every_position:             # inputs s[:-1], next-item targets s[1:]
            s, t, y = s[:-1], t[:-1], s[1:]
        else:                                 # one target after the last input
            y = np.zeros_like(s)
            y[-1] = target
        return s[-max_len:], t[-max_len:], y[-max_len:]

    train, valid, test, eval_users = [], [], [], []
    for b, e in zip(bounds[:-1], bounds[1:]):
        s, t = item[b:e], time[b:e]
        n = len(s)
        if n >= 3:
            valid.append(piece(s[:n - 2], t[:n - 2], False, s[n - 2]))
            test.append(piece(s[:n - 1], t[:n - 1], False, s[n - 1]))
            eval_users.append(user[b])
            s, t = s[:n - 2], t[:n - 2]
        if len(s) >= 2:
            train.append(piece(s, t, True))
    train_set = _pack(train)
    counts = np.bincount(train_set.targets, minlength=len(item_ids) + 1).astype(np.int64)
    if len(train):                            # the first item of each sequence is seen too
        counts += np.bincount(train_set.items[train_set.offsets[:-1]], minlength=len(counts))
    counts[PAD] = 0
    return LeaveOneOut(train_set, _pack(valid), _pack(test), int(len(item_ids)), max_len,
                       np.concatenate([[-1], item_ids]), np.asarray(eval_users, np.int64), counts)


def read_sequences(path: PathLike, max_len: int = 200, *,
                   min_rating: Optional[float] = None) -> LeaveOneOut:
    """:func:`leave_one_out` of a MovieLens ratings file (``ratings.dat`` / ``ratings.csv``) or a
    generic interactions CSV (header starting ``user_id``), by the file's first line."""
    with open(os.fspath(path), encoding="utf-8-sig") as f:
        first = f.readline()
    reader = read_interactions_csv if first.startswith("user_id") else read_movielens
    return leave_one_out(reader(path), max_len, min_rating=min_rating)


def subsample_training(data: SequenceSet, cfg: StochasticLengthConfig,
                       rng: np.random.Generator) -> SequenceSet:
    """Stochastic Length (:mod:`transact_jax.data.stochastic_length`, eq. (4) of "Actions Speak
    Louder than Words") on a training set: every sequence is kept whole or replaced by L of its
    tokens in chronological order (``cfg.threshold``), its timestamps following.

    A subsampled sequence is the model's whole input, so its targets are next-item targets over the
    subsequence: with kept positions i_0 < ... < i_{L-1} of the original sequence, kept position k <
    L - 1 predicts the next kept item ``items[i_{k+1}]``, and the last kept position keeps its
    original target ``targets[i_{L-1}]`` (the item that followed it in the full history: the
    sequence's final target when the last token is kept). Sequences kept whole keep their targets.
    """
    new_offsets, kept = subsample(data.offsets, data.timestamps,
                                  {"items": data.items, "timestamps": data.timestamps,
                                   "targets": data.targets}, cfg, rng)
    new_lengths = np.diff(new_offsets)
    shortened = new_lengths < data.lengths
    targets = kept["targets"].copy()
    inner = np.repeat(shortened, new_lengths)
    inner[new_offsets[1:][shortened] - 1] = False                # the last kept token of each
    targets[:-1][inner[:-1]] = kept["items"][1:][inner[:-1]]
    return SequenceSet(kept["items"], kept["timestamps"], targets, new_offsets)


# ------------------------------------------------------------------------------------------ batches


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class JaggedBatch:
    """A fixed-shape batch: ``items``, ``timestamps``, ``targets`` (capacity,) with the real tokens
    first (``offsets[-1]`` of them) and padding rows after (item 0, target 0); ``offsets`` (B+1,)
    int32. A batch with fewer than B sequences repeats its last offset (empty sequences)."""

    items: np.ndarray
    timestamps: np.ndarray
    targets: np.ndarray
    offsets: np.ndarray


def token_capacity(data: SequenceSet, batch_size: int) -> int:
    """The largest number of tokens any ``batch_size`` sequences of ``data`` hold (one shape for
    every batch, so a jitted step compiles once)."""
    lengths = np.sort(data.lengths)[::-1]
    return max(1, int(lengths[:batch_size].sum()))


def batches(data: SequenceSet, batch_size: int, order: Optional[Sequence[int]] = None,
            capacity: Optional[int] = None) -> Iterator[JaggedBatch]:
    """``data``'s sequences in ``order`` (default: as stored), ``batch_size`` per batch, every batch
    padded to ``capacity`` tokens (default :func:`token_capacity`)."""
    order = np.arange(data.num_sequences) if order is None else np.asarray(order)
    capacity = token_capacity(data, batch_size) if capacity is None else capacity
    for start in range(0, len(order), batch_size):
        seqs = order[start:start + batch_size]
        rows = np.concatenate([np.arange(data.offsets[i], data.offsets[i + 1]) for i in seqs])
        if len(rows) > capacity:
            raise ValueError(f"capacity: {capacity} tokens, the batch holds {len(rows)}")
        lengths = data.lengths[seqs]
        offsets = np.full(batch_size + 1, len(rows), np.int32)
        offsets[:len(seqs) + 1] = np.concatenate([[0], np.cumsum(lengths)])

        def pad(a):
            out = np.zeros(capacity, np.int32)
            out[:len(rows)] = a[rows]
            return out
        yield JaggedBatch(pad(data.items), pad(data.timestamps), pad(data.targets), offsets)


__all__ = ["PAD", "JaggedBatch", "LeaveOneOut", "SequenceSet", "batches", "leave_one_out",
           "read_sequences", "subsample_training", "token_capacity"]
