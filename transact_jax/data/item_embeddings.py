"""Item embeddings for data that has none: learned from the training period's interactions.

TransAct V2's tokens and candidates carry a 32-d content embedding ("PinSage" in the paper) that NN
selection and early fusion read. Public interaction logs (MovieLens, ...) come without one. This
module learns fixed embeddings from who interacted with what, using **only interactions before a
cutoff** (the end of the training period), so nothing of the validation or test period leaks into
the features:

1. the user x item matrix of the training period, one entry per (user, item) pair, weight
   ``1 / sqrt(number of items of the user)`` (heavy users do not dominate the factors);
2. its rank-``dim`` truncated SVD, ``A ~ U S V^T``, computed by randomized subspace iteration
   (Halko, Martinsson and Tropp, "Finding structure with randomness", 2011) with sparse products in
   numpy, so it scales to millions of interactions without a dense matrix or a SciPy dependency;
3. item ``i``'s embedding is ``V[i] * sqrt(S)``; the component signs are fixed (largest-magnitude
   item loading positive) so results do not depend on the solver's sign choice;
4. one global scale maps the ``clip_quantile`` quantile of ``|component|`` to the int8 codec's
   0.65 (``pallas_kernels.int8_codec``), so quantization keeps the spread and clamps only the tail.

Items with fewer than ``min_count`` training-period interactions (in particular items first seen
after the cutoff) are **unseen**: their embedding is the zero vector and ``ItemEmbeddings.seen`` is
False. A zero embedding has cosine 0 with every candidate, so NN selection treats such tokens as
neither similar nor dissimilar, and the model sees an all-zero content vector for such candidates.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from pallas_kernels.int8_codec import QUANT_SCALE
from transact_jax.data.schema import SchemaError


@dataclasses.dataclass(frozen=True)
class ItemEmbeddingConfig:
    """Options of :func:`learn_item_embeddings`.

    Attributes:
      dim: embedding width (the FeatureConfig's ``embedding_dim``, 32 by default).
      min_count: training-period interactions an item needs to get a learned embedding.
      clip_quantile: quantile of ``|component|`` mapped to the codec's scale (0.65).
      oversample, power_iterations: randomized SVD accuracy knobs (extra subspace columns, passes).
      seed: random test matrix of the randomized SVD.
    """

    dim: int = 32
    min_count: int = 1
    clip_quantile: float = 0.999
    oversample: int = 16
    power_iterations: int = 4
    seed: int = 0

    def __post_init__(self):
        for name in ("dim", "min_count"):
            if not isinstance(getattr(self, name), (int, np.integer)) or getattr(self, name) < 1:
                raise SchemaError(name, f"must be an int >= 1, got {getattr(self, name)!r}")
        for name in ("oversample", "power_iterations", "seed"):
            if not isinstance(getattr(self, name), (int, np.integer)) or getattr(self, name) < 0:
                raise SchemaError(name, f"must be an int >= 0, got {getattr(self, name)!r}")
        if not 0.5 <= self.clip_quantile <= 1.0:
            raise SchemaError("clip_quantile", f"must be in [0.5, 1], got {self.clip_quantile!r}")


@dataclasses.dataclass(frozen=True)
class ItemEmbeddings:
    """``item_id`` (M,) int64 sorted, ``embedding`` (M, dim) float32 in the codec's range,
    ``seen`` (M,) bool (False: fewer than ``min_count`` training-period interactions, zero vector),
    ``count`` (M,) int64 training-period interactions."""

    item_id: np.ndarray
    embedding: np.ndarray
    seen: np.ndarray
    count: np.ndarray

    def columns(self) -> dict:
        """The items table of an event log (``transact_jax.data.events``): ``item_id``, ``embedding``."""
        return {"item_id": self.item_id, "embedding": self.embedding}


def _int_column(name: str, x) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise SchemaError(name, f"expected a 1-D integer array, got {a.dtype} {a.shape}")
    return a.astype(np.int64)


def _spmm(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n_rows: int,
          dense: np.ndarray) -> np.ndarray:
    """``A @ dense`` for the sparse A with entries ``A[rows, cols] = vals``."""
    out = np.zeros((n_rows, dense.shape[1]), np.float64)
    np.add.at(out, rows, vals[:, None] * dense[cols])
    return out


def _randomized_svd(rows, cols, vals, shape, rank: int, oversample: int, iterations: int,
                    seed: int):
    """Top-``rank`` singular values and right singular vectors of the sparse matrix."""
    n_rows, n_cols = shape
    width = min(rank + oversample, n_rows, n_cols)
    omega = np.random.default_rng(seed).standard_normal((n_cols, width))
    q, _ = np.linalg.qr(_spmm(rows, cols, vals, n_rows, omega))
    for _ in range(iterations):         # subspace iteration, re-orthonormalized each half step
        z, _ = np.linalg.qr(_spmm(cols, rows, vals, n_cols, q))
        q, _ = np.linalg.qr(_spmm(rows, cols, vals, n_rows, z))
    b_t = _spmm(cols, rows, vals, n_cols, q)           # (Q^T A)^T: (n_cols, width)
    v, s, _ = np.linalg.svd(b_t, full_matrices=False)  # B^T = V S W^T
    return s[:rank], v[:, :rank]


def learn_item_embeddings(user_id, item_id, timestamp, cutoff: int,
                          cfg: ItemEmbeddingConfig = ItemEmbeddingConfig(),
                          items: Optional[np.ndarray] = None) -> ItemEmbeddings:
    """Item embeddings from interactions ``(user_id, item_id, timestamp)`` strictly before
    ``cutoff`` (module docstring).

    ``items`` lists every item that needs an embedding (default: every item in ``item_id``, any
    time); items without enough training-period interactions get zeros and ``seen=False``.
    """
    user_id = _int_column("user_id", user_id)
    item_id = _int_column("item_id", item_id)
    timestamp = _int_column("timestamp", timestamp)
    if not len(user_id) == len(item_id) == len(timestamp):
        raise SchemaError("item_id", f"user_id, item_id and timestamp differ in length: "
                                     f"{len(user_id)}, {len(item_id)}, {len(timestamp)}")
    universe = np.unique(item_id if items is None else _int_column("items", items))
    if items is not None and not np.isin(item_id, universe).all():
        missing = item_id[~np.isin(item_id, universe)][0]
        raise SchemaError("items", f"item {missing} has interactions but is not in items")
    train = timestamp < cutoff
    pairs = np.unique(np.stack([user_id[train], item_id[train]], axis=1), axis=0)
    count = np.zeros(len(universe), np.int64)
    item_row = np.searchsorted(universe, pairs[:, 1]) if len(pairs) else np.zeros(0, np.int64)
    np.add.at(count, item_row, 1)
    seen = count >= cfg.min_count
    embedding = np.zeros((len(universe), cfg.dim), np.float32)
    keep = seen[item_row]
    if keep.any():
        users, user_row = np.unique(pairs[keep, 0], return_inverse=True)
        cols = item_row[keep]
        per_user = np.bincount(user_row, minlength=len(users))
        vals = 1.0 / np.sqrt(per_user[user_row])
        rank = min(cfg.dim, len(users), int(seen.sum()))
        s, v = _randomized_svd(user_row, cols, vals, (len(users), len(universe)), rank,
                               cfg.oversample, cfg.power_iterations, cfg.seed)
        factors = v * np.sqrt(s)[None, :]
        sign = np.sign(factors[np.argmax(np.abs(factors), axis=0), np.arange(rank)])
        factors = factors * np.where(sign == 0, 1.0, sign)[None, :]
        factors[~seen] = 0.0
        top = np.quantile(np.abs(factors[seen]), cfg.clip_quantile)
        if top > 0:
            embedding[:, :rank] = (factors * (QUANT_SCALE / top)).astype(np.float32)
    return ItemEmbeddings(universe, embedding, seen, count)
