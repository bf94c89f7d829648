"""The request log's columns, shard format identity and errors (format: the package docstring)."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping

import numpy as np

from transact_jax.config import FeatureConfig
from transact_jax.data.feature_log.format import ShardFormat, _le
from transact_jax.data.schema import SchemaError

FORMAT_NAME = "transact-jax request log"
FORMAT_VERSION = 1
SHARD_SUFFIX = ".trl"
FAMILIES = ("ll", "rt", "imp")
TOKEN_FIELDS = ("timestamps", "actions", "surfaces", "embeddings")
REQUEST_FIELDS = ("user_id", "request_id", "request_timestamp")
CANDIDATE_FIELDS = ("cand_item_id", "cand_embedding", "cand_to_req", "dense", "categorical", "labels")
COUNTS = ("requests", "candidates") + tuple(f"tokens.{f}" for f in FAMILIES)


class RequestLogError(SchemaError):
    """A request log file is missing, truncated or corrupt; ``field`` is the file's path."""


REQUEST_LOG = ShardFormat("request log", b"TJXRLOG\x00", FORMAT_VERSION,
                          "write it again with this version's RequestLogWriter", RequestLogError)


def column_table(feat: FeatureConfig) -> List[Dict[str, Any]]:
    """The manifest's ``"columns"`` list (package docstring)."""
    d, f, c, h = feat.embedding_dim, feat.num_dense, len(feat.categorical_vocab_sizes), feat.num_heads
    out: List[Dict[str, Any]] = []

    def col(name: str, dtype, shape, rows: str) -> None:
        out.append({"name": name, "dtype": _le(np.dtype(dtype)).str, "shape": list(shape), "rows": rows})

    for fam in FAMILIES:
        rows = f"tokens.{fam}"
        col(f"{fam}.timestamps", np.int64, [], rows)
        col(f"{fam}.actions", feat.action_dtype, [], rows)
        col(f"{fam}.surfaces", np.int16, [], rows)
        col(f"{fam}.embeddings", np.int8, [d], rows)
        col(f"{fam}.lengths", np.int64, [], "requests")
    for name in REQUEST_FIELDS:
        col(name, np.int64, [], "requests")
    for name, dtype, shape in (("cand_item_id", np.int64, []), ("cand_embedding", np.int8, [d]),
                               ("cand_to_req", np.int32, []), ("dense", np.float32, [f]),
                               ("categorical", np.int32, [c]), ("labels", np.uint8, [h])):
        col(name, dtype, shape, "candidates")
    return out


def column_rows(columns: List[Mapping[str, Any]], counts: Mapping[str, int]) -> Dict[str, int]:
    """Each column's leading length in a shard with these ``counts``."""
    return {c["name"]: int(counts[c["rows"]]) for c in columns}
