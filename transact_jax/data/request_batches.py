"""Labelled requests as fixed-shape training batches (the request-level input of whole-request
models, e.g. HSTU scored with M-FALCON: ``transact_jax.train.requests``).

A jitted step needs static shapes, and requests vary in tokens and candidates. :class:`RequestCapacity`
fixes them: at most ``requests`` requests, ``candidates`` candidates and ``tokens`` per sequence
family per batch. :func:`pad_request_batch` lays a :class:`~transact_jax.data.schema.RequestBatch`
out in them, with the de-duplicated layout the serving engine uses (each request's tokens once per
family, jagged, with per-request ``offsets`` and ``lengths``; candidates with ``cand_to_req``):

* padding requests have length 0 and start at the end of the real tokens; padding tokens are zero;
* padding candidates have zero features and weight 0, and point at the first padding request (or at
  the last request when the batch is full), so they add no loss and change no real score.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import numpy as np

from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data.schema import RequestBatch, SchemaError

FAMILIES = ("ll", "rt", "imp")
TOKEN_FIELDS = ("embeddings", "actions", "surfaces")
CANDIDATE_FIELDS = ("cand_embedding", "dense", "categorical")


@dataclasses.dataclass(frozen=True)
class RequestCapacity:
    """Static batch shape: most ``requests``, ``candidates`` and ``tokens`` (ll, rt, imp) per batch."""

    requests: int
    candidates: int
    tokens: Tuple[int, int, int]

    def __post_init__(self):
        if self.requests < 1 or self.candidates < 1 or len(self.tokens) != 3 or min(self.tokens) < 0:
            raise ValueError(f"RequestCapacity: need requests, candidates >= 1 and three token counts "
                             f">= 0, got {self}")

    @classmethod
    def for_batch(cls, sel: SelectionConfig, requests: int, candidates_per_request: int) -> "RequestCapacity":
        """Room for ``requests`` requests with full-length sequences (``sel.max_lengths``) and up to
        ``candidates_per_request`` candidates each on average."""
        limits = sel.max_lengths
        return cls(requests, requests * candidates_per_request,
                   tuple(requests * int(limits[f]) for f in FAMILIES))


def pad_request_batch(batch: RequestBatch, cap: RequestCapacity,
                      feat: FeatureConfig) -> Dict[str, np.ndarray]:
    """``batch`` (labelled, sequences within ``max_lengths``) in the fixed shapes of ``cap``: the
    arrays of :mod:`transact_jax.model.request_forward` plus ``"labels"`` (N, H) float32 and
    ``"weight"`` (N,) float32 (1 for real candidates, 0 for padding). A batch that does not fit
    raises :class:`~transact_jax.data.schema.SchemaError` naming the count."""
    u, n = batch.num_requests, batch.num_candidates
    if batch.labels is None:
        raise SchemaError("requests.labels", "training batches need labels")
    for what, have, room in (("requests", u, cap.requests), ("candidates", n, cap.candidates)):
        if have > room:
            raise SchemaError(what, f"{have} exceed the batch capacity {room} (RequestCapacity)")
    out: Dict[str, np.ndarray] = {}
    for fam, room in zip(FAMILIES, cap.tokens):
        seqs = getattr(batch, fam)
        t = int(seqs.offsets[-1])
        if t > room:
            raise SchemaError(f"{fam}.tokens", f"{t} tokens exceed the batch capacity {room} "
                              f"(RequestCapacity; truncate sequences to max_lengths first)")
        for field in TOKEN_FIELDS:
            src = getattr(seqs.tokens, field)
            buf = np.zeros((room,) + src.shape[1:], src.dtype)
            buf[:t] = src
            out[f"{fam}.{field}"] = buf
        offsets = np.full(cap.requests, t, np.int32)
        offsets[:u] = seqs.offsets[:-1]
        lengths = np.zeros(cap.requests, np.int32)
        lengths[:u] = np.diff(seqs.offsets)
        out[f"{fam}.offsets"], out[f"{fam}.lengths"] = offsets, lengths
    for name in CANDIDATE_FIELDS:
        src = getattr(batch, name)
        buf = np.zeros((cap.candidates,) + src.shape[1:], src.dtype)
        buf[:n] = src
        out[name] = buf
    c2r = np.full(cap.candidates, min(u, cap.requests - 1), np.int32)
    c2r[:n] = batch.cand_to_req
    out["cand_to_req"] = c2r
    labels = np.zeros((cap.candidates, feat.num_heads), np.float32)
    labels[:n] = batch.labels
    weight = np.zeros(cap.candidates, np.float32)
    weight[:n] = 1.0
    out["labels"], out["weight"] = labels, weight
    return out
