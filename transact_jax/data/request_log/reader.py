"""Reading a request log: :class:`RequestLog`, random access to labelled requests by index."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data.feature_log.format import (
    VERIFY_MODES,
    PathLike,
    MappedLog,
    ShardMaps,
    _Shard,
    load_manifest,
)
from transact_jax.data.request_log.format import (
    CANDIDATE_FIELDS,
    COUNTS,
    FAMILIES,
    FORMAT_NAME,
    REQUEST_FIELDS,
    REQUEST_LOG,
    TOKEN_FIELDS,
    RequestLogError,
    column_rows,
    column_table,
)
from transact_jax.data.schema import JaggedSequences, RequestBatch, SchemaError, TokenFields
from transact_jax.data.source import check_indices


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenated ``arange(start, start + length)`` of every pair (one vectorized index)."""
    total = int(lengths.sum())
    if not total:
        return np.zeros(0, np.int64)
    shift = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return np.arange(total, dtype=np.int64) + shift


class RequestLog(MappedLog):
    """Read-only, random-access view of a request log directory (format: the package docstring).

    Args:
      path: the log directory.
      feat, sel: the configs the caller expects; ``None`` accepts the stored ones (a difference
        raises :class:`~transact_jax.data.schema.SchemaError` naming the field).
      verify: ``"header"`` (default): every shard header at open, each shard's data CRC-32s the
        first time it is read, and every batch read by the rule book (``RequestBatch.validate``);
        ``"full"``: also all data CRC-32s at open; ``"none"``: only the checks needed to read safely.
      max_open_shards: memory maps kept open at once (least recently used ones are closed).

    Attributes:
      feat, sel, log_id: the stored configs and the log's identity.
      num_candidates: candidates over all requests.
    """

    def __init__(self, path: PathLike, feat: Optional[FeatureConfig] = None,
                 sel: Optional[SelectionConfig] = None, verify: str = "header",
                 max_open_shards: int = 64):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify: must be one of {VERIFY_MODES}, got {verify!r}")
        self.path, self.verify, self.max_open_shards = os.fspath(path), verify, int(max_open_shards)
        m = load_manifest(self.path, FORMAT_NAME, REQUEST_LOG,
                          lambda: "missing: no request log here (a writer that never finished "
                                  "leaves no manifest)", feat, sel)
        self.log_id, self.feat, self.sel = m.log_id, m.feat, m.sel
        self._columns = column_table(self.feat)
        if m.data.get("columns") != self._columns:
            raise RequestLogError(m.path, "column table does not match the stored feature config")
        self._entries = self._parse_shards(m.path, m.data.get("shards"))
        sizes = np.array([e["num_examples"] for e in self._entries], np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._len = int(self.shard_starts[-1])
        self.num_candidates = sum(e["counts"]["candidates"] for e in self._entries)
        if (m.data.get("num_requests"), m.data.get("num_candidates")) != (self._len, self.num_candidates):
            raise RequestLogError(m.path, f"totals {m.data.get('num_requests')} requests, "
                                  f"{m.data.get('num_candidates')} candidates != the shards' "
                                  f"{self._len}, {self.num_candidates}")
        self._starts: List[Optional[Dict[str, np.ndarray]]] = [None] * len(self._entries)
        self._maps = ShardMaps(self._make_shard, len(self._entries), verify, self.max_open_shards)
        if verify != "none":
            for i in range(len(self._entries)):
                self._maps.shard(i)
        if verify == "full":
            for i in range(len(self._entries)):
                self._maps.verify(i, again=True)

    def _parse_shards(self, manifest_path: str, shards: Any) -> List[Dict[str, Any]]:
        try:
            entries = [{"file": str(s["file"]), "num_examples": int(s["num_examples"]),
                        "counts": {k: int(s["counts"][k]) for k in COUNTS},
                        "nbytes": int(s["nbytes"]), "crc32": [int(c) for c in s["crc32"]]}
                       for s in shards]
        except (KeyError, TypeError, ValueError) as e:
            raise RequestLogError(manifest_path, f"bad shard list: {e}") from e
        for e in entries:
            if (os.path.basename(e["file"]) != e["file"] or e["num_examples"] <= 0
                    or e["counts"]["requests"] != e["num_examples"]
                    or min(e["counts"].values()) < 0 or len(e["crc32"]) != len(self._columns)):
                raise RequestLogError(manifest_path, f"bad shard entry {e}")
        return entries

    def _make_shard(self, i: int) -> _Shard:
        e = self._entries[i]
        return _Shard(os.path.join(self.path, e["file"]), e, self._columns, self.verify, self.log_id, i,
                      fmt=REQUEST_LOG, rows=column_rows(self._columns, e["counts"]))

    def _shard_starts(self, i: int, cols: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Where each request's tokens (per family) and candidates start in shard ``i``; checked
        against the shard's counts once."""
        starts = self._starts[i]
        if starts is None:
            counts, starts = self._entries[i]["counts"], {}
            for fam in FAMILIES:
                lengths = cols[f"{fam}.lengths"]
                if np.any(lengths < 0) or int(lengths.sum()) != counts[f"tokens.{fam}"]:
                    raise RequestLogError(self.shard_files[i], f"column '{fam}.lengths' does not "
                                          f"add up to the shard's {counts[f'tokens.{fam}']} tokens")
                starts[fam] = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            c2r = cols["cand_to_req"]
            if len(c2r) and (np.any(np.diff(c2r) < 0) or c2r[0] < 0 or c2r[-1] >= len(cols["user_id"])):
                raise RequestLogError(self.shard_files[i], "column 'cand_to_req' is not grouped by "
                                      "request within [0, requests)")
            bounds = np.searchsorted(c2r, np.arange(len(cols["user_id"]) + 1))
            starts["candidates"], starts["cand_count"] = bounds[:-1], np.diff(bounds)
            self._starts[i] = starts
        return starts

    # -- structure

    def __len__(self) -> int:
        """Requests in the log."""
        return self._len

    @property
    def num_shards(self) -> int:
        return len(self._entries)

    @property
    def shard_files(self) -> List[str]:
        return [os.path.join(self.path, e["file"]) for e in self._entries]

    # -- reading

    def read(self, indices: Union[Sequence[int], np.ndarray]) -> RequestBatch:
        """Requests at ``indices`` (any order, repeats allowed), in that order, as one labelled
        :class:`RequestBatch` (``cand_to_req`` numbered in that order). Unless ``verify="none"``, a
        shard's data is checked against its CRC-32s the first time it is read and the batch by the
        rule book: a bad value raises :class:`RequestLogError` naming the log and the field."""
        idx = check_indices(indices, self._len, "a request log")
        if not len(idx):
            return self._empty()
        shard_of = np.searchsorted(self.shard_starts, idx, side="right") - 1
        parts: Dict[str, List[np.ndarray]] = {}
        for s in np.unique(shard_of):
            pick = np.flatnonzero(shard_of == s)
            self._gather(int(s), idx[pick] - self.shard_starts[s], pick, parts)
        batch = self._assemble(parts, len(idx))
        if self.verify != "none":
            try:
                batch.validate(self.feat, self.sel)
            except SchemaError as e:
                raise RequestLogError(self.path, f"{e} (a RequestLogWriter never writes this: the "
                                      f"log is corrupt)") from e
        return batch

    def _gather(self, s: int, local: np.ndarray, where: np.ndarray, parts: Dict[str, List]) -> None:
        """Requests ``local`` of shard ``s`` (destined for batch positions ``where``) into ``parts``."""
        cols = self._maps.columns(s)
        starts = self._shard_starts(s, cols)
        parts.setdefault("where", []).append(where)
        for fam in FAMILIES:
            lengths = cols[f"{fam}.lengths"][local]
            rows = _ranges(starts[fam][local], lengths)
            parts.setdefault(f"{fam}.lengths", []).append(lengths)
            for field in TOKEN_FIELDS:
                parts.setdefault(f"{fam}.{field}", []).append(cols[f"{fam}.{field}"][rows])
        for name in REQUEST_FIELDS:
            parts.setdefault(name, []).append(cols[name][local])
        counts = starts["cand_count"][local]
        rows = _ranges(starts["candidates"][local], counts)
        parts.setdefault("cand_count", []).append(counts)
        for name in CANDIDATE_FIELDS:
            if name != "cand_to_req":
                parts.setdefault(name, []).append(cols[name][rows])

    def _assemble(self, parts: Dict[str, List[np.ndarray]], n: int) -> RequestBatch:
        """One batch in the requested order from per-shard gathers (requests of one shard together,
        then reordered to the batch positions)."""
        where = np.concatenate(parts.pop("where")) if parts else np.zeros(0, np.int64)
        order = np.argsort(where, kind="stable")     # gathered position of batch request j

        def requests_of(name: str) -> np.ndarray:
            return np.concatenate(parts[name])[order]

        def jagged_of(lengths: np.ndarray, values: np.ndarray) -> np.ndarray:
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            return values[_ranges(starts[order], lengths[order])]

        seqs = {}
        for fam in FAMILIES:
            lengths = np.concatenate(parts[f"{fam}.lengths"])
            tokens = TokenFields(*(jagged_of(lengths, np.concatenate(parts[f"{fam}.{f}"]))
                                   for f in TOKEN_FIELDS))
            offsets = np.concatenate([[0], np.cumsum(lengths[order])]).astype(np.int64)
            seqs[fam] = JaggedSequences(tokens, offsets)
        counts = np.concatenate(parts["cand_count"])
        cand = {name: jagged_of(counts, np.concatenate(parts[name]))
                for name in CANDIDATE_FIELDS if name != "cand_to_req"}
        return RequestBatch(**seqs, **{name: requests_of(name) for name in REQUEST_FIELDS},
                            cand_to_req=np.repeat(np.arange(n, dtype=np.int32), counts[order]),
                            **cand)

    def _empty(self) -> RequestBatch:
        """A batch of no requests, with this log's dtypes and widths."""
        cols = {c["name"]: np.zeros((0, *c["shape"]), np.dtype(c["dtype"])) for c in self._columns}
        seqs = {fam: JaggedSequences(TokenFields(*(cols[f"{fam}.{f}"] for f in TOKEN_FIELDS)),
                                     np.zeros(1, np.int64)) for fam in FAMILIES}
        return RequestBatch(**seqs, **{n: cols[n] for n in REQUEST_FIELDS + CANDIDATE_FIELDS})

    def read_range(self, start: int, stop: int) -> RequestBatch:
        """Requests ``[start, stop)`` in order."""
        return self.read(np.arange(start, stop, dtype=np.int64))

    def __repr__(self) -> str:
        # the identity is part of it, as for FeatureLog (grain matches a saved state's source by repr)
        return (f"RequestLog({self.path!r}, log_id={self.log_id}, requests={self._len}, "
                f"candidates={self.num_candidates}, shards={self.num_shards})")
