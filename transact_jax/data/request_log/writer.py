"""Writing a request log: :class:`RequestLogWriter` and :func:`write_synthetic_request_log`.

Atomic replace, staging directory and the cleanup after killed writers are the feature log's
(:class:`~transact_jax.data.feature_log.writer.ShardedLogWriter`, whose module docstring has the
details).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Optional

import numpy as np

from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data.feature_log.format import PathLike, encode_columns
from transact_jax.data.feature_log.writer import ShardedLogWriter
from transact_jax.data.request_log.format import (
    CANDIDATE_FIELDS,
    FAMILIES,
    FORMAT_NAME,
    FORMAT_VERSION,
    REQUEST_FIELDS,
    REQUEST_LOG,
    SHARD_SUFFIX,
    TOKEN_FIELDS,
    column_table,
)
from transact_jax.data.schema import RequestBatch, SchemaError
from transact_jax.data.synthetic import SyntheticConfig, iter_chunks


def _by_request(batch: RequestBatch) -> RequestBatch:
    """``batch`` with its candidates grouped by request (stable: their order within a request kept)."""
    c2r = batch.cand_to_req
    if len(c2r) < 2 or np.all(c2r[1:] >= c2r[:-1]):
        return batch
    order = np.argsort(c2r, kind="stable")
    return dataclasses.replace(batch, **{name: getattr(batch, name)[order] for name in CANDIDATE_FIELDS})


def _request_columns(batch: RequestBatch, lo: int, hi: int) -> Dict[str, np.ndarray]:
    """Requests ``[lo, hi)`` of a batch whose candidates are grouped by request, as the log's
    columns (``cand_to_req`` renumbered from 0)."""
    out: Dict[str, np.ndarray] = {}
    for fam in FAMILIES:
        seqs = getattr(batch, fam)
        a, b = int(seqs.offsets[lo]), int(seqs.offsets[hi])
        for field in TOKEN_FIELDS:
            out[f"{fam}.{field}"] = getattr(seqs.tokens, field)[a:b]
        out[f"{fam}.lengths"] = np.diff(seqs.offsets[lo:hi + 1])
    for name in REQUEST_FIELDS:
        out[name] = getattr(batch, name)[lo:hi]
    c_lo, c_hi = np.searchsorted(batch.cand_to_req, [lo, hi])
    for name in CANDIDATE_FIELDS:
        out[name] = getattr(batch, name)[c_lo:c_hi]
    out["cand_to_req"] = out["cand_to_req"] - lo
    return out


class RequestLogWriter(ShardedLogWriter):
    """Writes labelled :class:`RequestBatch` es into a request log directory (format: the package
    docstring). Each :meth:`write` is validated by the rule book (``RequestBatch.validate``: token
    and candidate fields, chronological sequences, lengths within ``sel.max_lengths``, labels) and
    written at once as ``ceil(U / requests_per_shard)`` shards; :meth:`close` writes the manifest
    and swaps the log into ``path`` (nothing is visible before). Use as a context manager: an
    exception inside the ``with`` block aborts and leaves ``path`` untouched.

    Args:
      path: the log directory (if it exists: empty, or a request log replaced only with
        ``overwrite=True``).
      feat, sel: the configs the requests follow (stored in the manifest).
      requests_per_shard: most requests per shard file.
    """

    what = "request log"
    suffix = SHARD_SUFFIX
    format_name = FORMAT_NAME
    format_version = FORMAT_VERSION

    def __init__(self, path: PathLike, feat: FeatureConfig, sel: SelectionConfig, *,
                 requests_per_shard: int = 4096, overwrite: bool = False):
        if not isinstance(requests_per_shard, (int, np.integer)) or requests_per_shard <= 0:
            raise ValueError(f"requests_per_shard: must be a positive int, got {requests_per_shard!r}")
        self.feat, self.sel = feat, sel
        self.requests_per_shard = int(requests_per_shard)
        self._column_table = column_table(feat)
        self.num_requests = self.num_candidates = 0
        super().__init__(path, overwrite)

    def write(self, requests: RequestBatch) -> None:
        """Validate and write ``requests`` (they need labels)."""
        self._check_open()
        if not isinstance(requests, RequestBatch):
            raise SchemaError("requests", f"expected a RequestBatch, got {type(requests).__name__}")
        if requests.labels is None:
            raise SchemaError("requests.labels", "a request log stores labelled requests; got none")
        requests.validate(self.feat, self.sel)
        batch = _by_request(requests)
        for lo in range(0, batch.num_requests, self.requests_per_shard):
            self._write_shard(_request_columns(batch, lo, min(lo + self.requests_per_shard, batch.num_requests)))

    def _write_shard(self, cols: Dict[str, np.ndarray]) -> None:
        counts = {"requests": len(cols["user_id"]), "candidates": len(cols["cand_item_id"]),
                  **{f"tokens.{f}": len(cols[f"{f}.timestamps"]) for f in FAMILIES}}
        shard = encode_columns([(spec, cols[spec["name"]]) for spec in self._column_table],
                               {"log_id": self.log_id, "shard": len(self._shards),
                                "num_examples": counts["requests"], "counts": counts}, REQUEST_LOG)
        self._add_shard(shard, {"num_examples": counts["requests"], "counts": counts})
        self.num_requests += counts["requests"]
        self.num_candidates += counts["candidates"]

    def _columns(self) -> List[Dict[str, Any]]:
        return self._column_table

    def _totals(self) -> Dict[str, int]:
        return {"num_requests": self.num_requests, "num_candidates": self.num_candidates}

    def _discard(self) -> None:
        self.num_requests = self.num_candidates = 0


def write_synthetic_request_log(path: PathLike, feat: FeatureConfig, sel: SelectionConfig,
                                syn: SyntheticConfig, num_users: int, *,
                                catalog_seed: Optional[int] = None, requests_per_shard: int = 4096,
                                overwrite: bool = False):
    """The labelled requests of ``num_users`` users of the synthetic world ``syn`` (held-out users:
    another ``syn.seed`` with ``catalog_seed`` the training seed, as ``generate`` does for its eval
    split), sequences truncated to ``sel.max_lengths`` (most recent tokens kept), as a request log;
    returns it opened."""
    from transact_jax.data.request_log.reader import RequestLog
    with RequestLogWriter(path, feat, sel, requests_per_shard=requests_per_shard,
                          overwrite=overwrite) as w:
        for chunk in iter_chunks(syn, feat, sel, num_users, catalog_seed=catalog_seed):
            w.write(chunk.requests.truncate_recent(sel))
    return RequestLog(os.fspath(path), feat, sel)

