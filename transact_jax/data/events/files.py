"""Reading and writing event-log tables: ``.csv`` (header row, any column order), ``.npz`` (one array
per column, no pickles) or an in-memory ``{column: array}`` mapping. The format is described in
:mod:`transact_jax.data.events`."""
from __future__ import annotations

import csv
import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Mapping, Union

import numpy as np

from transact_jax.data.schema import SchemaError

if TYPE_CHECKING:  # the writers only call EventLog's to_columns()
    from transact_jax.data.events.tables import EventLog

TableSource = Union[str, os.PathLike, Mapping[str, np.ndarray]]
"""A table: a ``.csv`` / ``.npz`` path or a ``{column: array}`` mapping."""


def _read_csv(path: Path, table: str) -> Dict[str, np.ndarray]:
    """Columns of a CSV file with a header row, as string arrays. UTF-8, with or without a byte-order
    mark (spreadsheet exports start with one; it is not part of the first column's name)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [row for row in csv.reader(f) if row]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SchemaError(table, f"cannot read {path}: {e}") from e
    if not rows:
        raise SchemaError(table, f"{path} is empty (no header row)")
    header = [h.strip() for h in rows[0]]
    for j, h in enumerate(header):
        if not h or h in header[:j]:
            raise SchemaError(f"{table}.{h}", f"{path}: empty or duplicate column name in the header")
    body = rows[1:]
    for i, row in enumerate(body):
        if len(row) != len(header):
            raise SchemaError(table, f"{path} data row {i}: {len(row)} fields, the header has "
                              f"{len(header)} (truncated or corrupt file?)")
    grid = np.array(body, dtype=str).reshape(len(body), len(header))
    return {h: grid[:, j] for j, h in enumerate(header)}


def _read_npz(path: Path, table: str) -> Dict[str, np.ndarray]:
    """Arrays of an ``.npz`` archive (no pickles)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise SchemaError(table, f"{path} is not an .npz archive")
            return {k: archive[k] for k in archive.files}
    except SchemaError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, AttributeError) as e:
        raise SchemaError(table, f"cannot read {path}: {e}") from e


def read_table(source: TableSource, table: str) -> Dict[str, np.ndarray]:
    """Raw columns of one table from a ``.csv`` / ``.npz`` path or a mapping (no validation yet)."""
    if isinstance(source, Mapping):
        return {str(k): np.asarray(v) for k, v in source.items()}
    if not isinstance(source, (str, os.PathLike)):
        raise SchemaError(table, f"expected a path or a mapping of columns, got {type(source).__name__}")
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path, table)
    if suffix == ".npz":
        return _read_npz(path, table)
    raise SchemaError(table, f"{path}: unsupported file type {suffix!r} (use .csv or .npz)")


def _write_csv(path: Path, cols: Mapping[str, np.ndarray]) -> None:
    """Write columns as CSV; floats in float64 repr so float32 values round-trip exactly."""
    text = [np.asarray(c, np.float64).astype(str) if np.asarray(c).dtype.kind == "f" else
            np.asarray(c).astype(str) for c in cols.values()]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(list(cols))
        writer.writerows(zip(*text))


def write_event_log_csv(log: "EventLog", directory: Union[str, os.PathLike]) -> Dict[str, Path]:
    """Write ``events.csv``, ``items.csv`` (``emb_k`` columns) and ``requests.csv``; returns the paths."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tables = {"events": log.events.to_columns(), "items": log.items.to_columns(split=True),
              "requests": log.requests.to_columns()}
    paths = {}
    for name, cols in tables.items():
        paths[name] = out / f"{name}.csv"
        _write_csv(paths[name], cols)
    return paths


def write_event_log_npz(log: "EventLog", directory: Union[str, os.PathLike]) -> Dict[str, Path]:
    """Write ``events.npz``, ``items.npz`` (an ``embedding`` matrix) and ``requests.npz``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tables = {"events": log.events.to_columns(), "items": log.items.to_columns(),
              "requests": log.requests.to_columns()}
    paths = {}
    for name, cols in tables.items():
        paths[name] = out / f"{name}.npz"
        np.savez(paths[name], **cols)
    return paths
