"""Column parsing for the event-log tables: required columns, integer / float / name / label /
timestamp conversion with errors that name ``<table>.<column>`` and the first bad row, and the
numbered column families (``emb_k``, ``dense_k``, ``cat_k``) of the item and request tables."""
from __future__ import annotations

import re
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

from transact_jax.config import FeatureConfig
from transact_jax.data.request_rules import DENSE_BOUND, DENSE_PROBLEM
from transact_jax.data.schema import SchemaError, check_finite

INT64_MAX = np.iinfo(np.int64).max


def column(cols: Mapping[str, np.ndarray], table: str, name: str, n: Optional[int]) -> np.ndarray:
    """A required 1-D, non-empty column of ``n`` rows (any length when ``n`` is None)."""
    field = f"{table}.{name}"
    if name not in cols:
        raise SchemaError(field, f"missing column (have {sorted(cols)})")
    a = np.asarray(cols[name])
    if a.ndim != 1:
        raise SchemaError(field, f"expected a 1-D column, got shape {a.shape}")
    if a.size == 0:
        raise SchemaError(field, "column is empty (the table needs at least one row)")
    if n is not None and len(a) != n:
        raise SchemaError(field, f"has {len(a)} rows, other columns have {n}")
    return a


def _parse_int64(x: str) -> int:
    """``int(x)`` for a decimal integer string within int64; ValueError/OverflowError otherwise."""
    value = int(x)
    if not -INT64_MAX - 1 <= value <= INT64_MAX:
        raise OverflowError(x)
    return value


def _first_bad(strings: np.ndarray, parse) -> Tuple[int, str]:
    """Row and value of the first string that ``parse`` rejects."""
    for i, s in enumerate(strings):
        try:
            parse(s)
        except (ValueError, OverflowError):
            return i, s
    return -1, ""


def to_int64(a: np.ndarray, field: str, non_negative: bool = False) -> np.ndarray:
    """Integers (int dtype or decimal strings) as int64; floats are rejected, not rounded."""
    if a.dtype.kind in "USO":
        s = np.char.strip(a.astype(str))
        try:
            out = s.astype(np.int64)
        except (ValueError, OverflowError):
            row, bad = _first_bad(s, _parse_int64)
            raise SchemaError(field, f"row {row}: {bad!r} is not an int64 integer") from None
    elif a.dtype.kind in "iu":
        if a.dtype == np.uint64 and a.size and a.max() > INT64_MAX:
            raise SchemaError(field, f"value {a.max()} out of int64 range")
        out = a.astype(np.int64)
    else:
        raise SchemaError(field, f"expected integers, got dtype {a.dtype}")
    if non_negative and out.size and out.min() < 0:
        row = int(np.argmax(out < 0))
        raise SchemaError(field, f"row {row}: negative id {out[row]}")
    return out


def _to_numbers(a: np.ndarray, field: str) -> np.ndarray:
    """Numbers (float/int/bool dtype, or decimal strings parsed as float64), not yet checked."""
    if a.dtype.kind in "USO":
        s = np.char.strip(a.astype(str))
        try:
            return s.astype(np.float64)
        except ValueError:
            row, bad = _first_bad(s, float)
            raise SchemaError(field, f"row {row}: {bad!r} is not a number") from None
    if a.dtype.kind not in "fiub":
        raise SchemaError(field, f"expected numbers, got dtype {a.dtype}")
    return a


def to_float32(a: np.ndarray, field: str) -> np.ndarray:
    """Finite floats (float/int dtype or decimal strings) as float32."""
    a = _to_numbers(a, field)
    check_finite(field, a.astype(np.float64))
    with np.errstate(over="ignore"):
        out = a.astype(np.float32)
    check_finite(field, out)
    return out


TIMESTAMP_UNITS = {"s": 1, "ms": 1_000, "us": 1_000_000}
"""Units of timestamp columns: ticks per second."""
_UNIT_NAMES = {"s": "seconds", "ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds"}
_TICKS = {**TIMESTAMP_UNITS, "ns": 1_000_000_000}
PLAUSIBLE_SECONDS = 1e11
"""Largest median ``|timestamp|`` in seconds taken at face value (about the year 5000 since 1970);
a larger median means the values are in a finer unit than declared (today: ~1.7e9 s, 1.7e12 ms)."""


def _short(x: float) -> str:
    """``1.6e12`` style: two significant digits, no ``+`` or leading zeros in the exponent."""
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def to_seconds(a: np.ndarray, field: str, unit: str = "s") -> np.ndarray:
    """Integer timestamps in ``unit`` (:data:`TIMESTAMP_UNITS`) as int64 whole seconds, rounded down
    (so the order of two timestamps never flips; times within one second may become equal).

    Values whose median magnitude is too large for ``unit`` (over :data:`PLAUSIBLE_SECONDS` seconds)
    look like a finer unit and are rejected, naming it: millisecond timestamps read as seconds would
    silently make every time window 1000 times shorter.
    """
    if unit not in TIMESTAMP_UNITS:
        raise SchemaError("timestamp_unit", f"expected one of {list(TIMESTAMP_UNITS)}, got {unit!r}")
    t = to_int64(a, field)
    median = float(np.median(np.abs(t.astype(np.float64)))) if t.size else 0.0
    if median / TIMESTAMP_UNITS[unit] > PLAUSIBLE_SECONDS:
        looks = next((u for u, ticks in _TICKS.items() if median / ticks <= PLAUSIBLE_SECONDS), "ns")
        fix = (f"set timestamp_unit={looks!r}" if looks in TIMESTAMP_UNITS else
               f"convert them to one of {list(TIMESTAMP_UNITS)}")
        raise SchemaError(field, f"values look like {_UNIT_NAMES[looks]} (median {_short(median)}), "
                          f"not {_UNIT_NAMES[unit]}; {fix}")
    return t // TIMESTAMP_UNITS[unit] if unit != "s" else t


def to_codes(a: np.ndarray, field: str, vocab: Mapping[str, int]) -> np.ndarray:
    """Names (strings) to integer codes through ``vocab``; unknown names are rejected."""
    if a.dtype.kind not in "USO":
        raise SchemaError(field, f"expected names (strings), got dtype {a.dtype}")
    s = np.char.strip(a.astype(str))
    names, inverse = np.unique(s, return_inverse=True)
    for name in names:
        if name not in vocab:
            row = int(np.argmax(s == name))
            raise SchemaError(field, f"row {row}: unknown name {name!r}; expected one of {sorted(vocab)}")
    return np.array([vocab[n] for n in names], np.int64)[inverse.reshape(-1)]


def to_labels(a: np.ndarray, field: str) -> np.ndarray:
    """0/1 labels (ints, bools, floats such as 0.0 / 1.0, or strings of those) as uint8; any other
    value (0.5, 2, NaN, ...) is an error naming the row and the value."""
    v = _to_numbers(a, field)
    bad = (v != 0) & (v != 1)   # NaN compares unequal to both: reported too
    if bad.any():
        row = int(np.argmax(bad))
        shown = str(a[row]).strip() if a.dtype.kind in "USO" else str(v[row])
        raise SchemaError(field, f"row {row}: label {shown} is not 0 or 1")
    return v.astype(np.uint8)


def numbered_columns(cols: Mapping[str, np.ndarray], table: str, prefix: str, count: int) -> Dict[int, str]:
    """``{k: name}`` of the present columns ``{prefix}{k}``; ``k >= count`` is an error."""
    found = {}
    for name in cols:
        m = re.fullmatch(re.escape(prefix) + r"(\d+)", name)
        if m:
            k = int(m.group(1))
            if k >= count:
                raise SchemaError(f"{table}.{name}", f"unexpected column: the config has {count} "
                                  f"{prefix}* columns ({prefix}0..{prefix}{count - 1})")
            found[k] = name
    return found



def embedding_matrix(cols: Mapping[str, np.ndarray], n: int, dim: int) -> np.ndarray:
    """The (n, dim) float32 embedding from ``embedding`` or ``emb_0..emb_{dim-1}``; finite values only."""
    if "embedding" in cols:
        e = np.asarray(cols["embedding"])
        if e.ndim != 2 or e.shape != (n, dim):
            raise SchemaError("items.embedding", f"expected shape ({n}, {dim}), got {e.shape}")
    else:
        present = numbered_columns(cols, "items", "emb_", dim)
        if not present:
            raise SchemaError("items.embedding", f"missing: give an (M, {dim}) 'embedding' array or "
                              f"columns emb_0..emb_{dim - 1}")
        for k in range(dim):
            if k not in present:
                raise SchemaError(f"items.emb_{k}", "missing column")
        e = np.stack([column(cols, "items", f"emb_{k}", n) for k in range(dim)], axis=1)
    if e.dtype.kind in "USO":
        flat = to_float32(e.reshape(-1), "items.embedding")
        e = flat.reshape(n, dim)
    elif e.dtype.kind not in "fiu":
        raise SchemaError("items.embedding", f"expected floats, got dtype {e.dtype}")
    check_finite("items.embedding", e)
    with np.errstate(over="ignore"):
        out = e.astype(np.float32)
    check_finite("items.embedding", out)
    return out


def label_columns(cols: Mapping[str, np.ndarray], n: int, feat: FeatureConfig) -> Optional[np.ndarray]:
    """(N, H) labels when every head has a column, None when none has; partial sets are an error."""
    present = [h for h in feat.heads if h in cols]
    if not present:
        return None
    for h in feat.heads:
        if h not in cols:
            raise SchemaError(f"requests.{h}", f"missing label column: give all of {list(feat.heads)} "
                              f"(training) or none (serving)")
    return np.stack([to_labels(column(cols, "requests", h, n), f"requests.{h}") for h in feat.heads], 1)


def dense_columns(cols: Mapping[str, np.ndarray], n: int, feat: FeatureConfig) -> np.ndarray:
    """(N, num_dense) float32 from ``dense_k`` columns (a missing one is 0); values must be finite
    and within ``DENSE_BOUND`` (:mod:`transact_jax.data.request_rules`)."""
    out = np.zeros((n, feat.num_dense), np.float32)
    for k, name in numbered_columns(cols, "requests", "dense_", feat.num_dense).items():
        out[:, k] = to_float32(column(cols, "requests", name, n), f"requests.{name}")
        large = np.abs(out[:, k]) > DENSE_BOUND
        if large.any():
            row = int(np.argmax(large))
            raise SchemaError(f"requests.{name}",
                              f"row {row}: {DENSE_PROBLEM.replace('{value}', str(out[row, k]))}")
    return out


def categorical_columns(cols: Mapping[str, np.ndarray], n: int, feat: FeatureConfig) -> np.ndarray:
    vocab = feat.categorical_vocab_sizes
    out = np.zeros((n, len(vocab)), np.int32)
    for k, name in numbered_columns(cols, "requests", "cat_", len(vocab)).items():
        v = to_int64(column(cols, "requests", name, n), f"requests.{name}")
        bad = (v < 0) | (v >= vocab[k])
        if bad.any():
            row = int(np.argmax(bad))
            raise SchemaError(f"requests.{name}", f"row {row}: value {v[row]} out of range [0, {vocab[k]})")
        out[:, k] = v
    return out
