"""Readers of public interaction files into :class:`~transact_jax.data.interactions.Interactions`,
and the one call that turns such a file into feature logs ready for training.

Formats:

* **MovieLens** ``ratings.dat`` (ML-1M, ML-10M): ``UserID::MovieID::Rating::Timestamp`` per line,
  no header;
* **MovieLens** ``ratings.csv`` (ml-latest, ml-latest-small, ML-20M, ML-25M): header
  ``userId,movieId,rating,timestamp``;
* **generic interactions** CSV with a header: ``user_id``, ``item_id``, ``timestamp`` (int seconds),
  and ``rating`` (number) or ``action`` (a ``FeatureConfig.action_names`` name or ``impression``),
  optionally ``exposed`` (0/1: the row is an impression, the item was shown).

Bad files raise :class:`~transact_jax.data.schema.SchemaError` naming the file, the line and the
column. The data itself never enters the repository: the readers take a path.
"""
from __future__ import annotations

import csv
import os
from typing import Dict, List, Union

import numpy as np

from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data.events import build_training_examples
from transact_jax.data.feature_log import write_feature_log
from transact_jax.data.interactions import (
    SPLITS,
    InteractionRecipe,
    Interactions,
    build_event_logs,
)
from transact_jax.data.schema import SchemaError

PathLike = Union[str, os.PathLike]
MOVIELENS_CSV_HEADER = ("userId", "movieId", "rating", "timestamp")


def _number(text: str, kind: type, where: str):
    try:
        value = kind(text)
    except ValueError:
        raise SchemaError(where, f"expected {'an integer' if kind is int else 'a number'}, got "
                                 f"{text!r}") from None
    if kind is float and not np.isfinite(value):
        raise SchemaError(where, f"expected a finite number, got {text!r}")
    return value


def _columns(rows: List[List[str]], names, kinds, path: str, first_line: int) -> Dict[str, list]:
    out = {n: [] for n in names}
    for i, row in enumerate(rows):
        line = first_line + i
        if len(row) != len(names):
            raise SchemaError(f"{path}:{line}", f"expected {len(names)} fields "
                                                f"({', '.join(names)}), got {len(row)}")
        for name, kind, text in zip(names, kinds, row):
            if kind is not str:
                out[name].append(_number(text.strip(), kind, f"{path}:{line}: {name}"))
            else:
                out[name].append(text.strip())
    if not rows:
        raise SchemaError(path, "no interactions in the file")
    return out


def read_movielens(path: PathLike) -> Interactions:
    """MovieLens ratings, ``ratings.dat`` (``::``) or ``ratings.csv`` (by the file's first line)."""
    path = os.fspath(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        first = f.readline()
        if "::" in first:
            rows = [first.rstrip("\r\n").split("::")] + [ln.rstrip("\r\n").split("::") for ln in f
                                                         if ln.strip()]
            start = 1
        else:
            header = next(csv.reader([first]), [])
            if tuple(h.strip() for h in header) != MOVIELENS_CSV_HEADER:
                raise SchemaError(f"{path}:1", f"expected the header {','.join(MOVIELENS_CSV_HEADER)} "
                                               f"(ratings.csv) or '::' fields (ratings.dat), got "
                                               f"{first.strip()!r}")
            rows = [r for r in csv.reader(f) if r]
            start = 2
    cols = _columns(rows, ("user", "item", "rating", "timestamp"), (int, int, float, int), path, start)
    return Interactions(np.asarray(cols["user"], np.int64), np.asarray(cols["item"], np.int64),
                        np.asarray(cols["timestamp"], np.int64),
                        rating=np.asarray(cols["rating"], np.float64))


def read_interactions_csv(path: PathLike) -> Interactions:
    """The generic interactions CSV (module docstring)."""
    path = os.fspath(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        rows = [r for r in reader if r]
    required = ("user_id", "item_id", "timestamp")
    missing = [c for c in required if c not in header]
    kinds = [c for c in ("rating", "action") if c in header]
    if missing or len(kinds) != 1:
        raise SchemaError(f"{path}:1", f"expected columns {', '.join(required)} and one of rating / "
                                       f"action (optional exposed), got {header}")
    types = {"user_id": int, "item_id": int, "timestamp": int, "rating": float, "action": str,
             "exposed": int}
    unknown = [h for h in header if h not in types]
    if unknown:
        raise SchemaError(f"{path}:1", f"unknown columns {unknown}")
    cols = _columns(rows, header, [types[h] for h in header], path, 2)
    exposed = None
    if "exposed" in cols:
        exposed = np.asarray(cols["exposed"], np.int64)
        if not np.isin(exposed, (0, 1)).all():
            bad = int(np.flatnonzero(~np.isin(exposed, (0, 1)))[0])
            raise SchemaError(f"{path}:{bad + 2}: exposed", f"expected 0 or 1, got {exposed[bad]}")
        exposed = exposed.astype(bool)
    return Interactions(np.asarray(cols["user_id"], np.int64), np.asarray(cols["item_id"], np.int64),
                        np.asarray(cols["timestamp"], np.int64),
                        rating=np.asarray(cols["rating"], np.float64) if "rating" in cols else None,
                        action=np.asarray(cols["action"]) if "action" in cols else None,
                        exposed=exposed)


def write_feature_logs(data: Interactions, out: PathLike, feat: FeatureConfig = FeatureConfig(),
                       sel: SelectionConfig = SelectionConfig(),
                       recipe: InteractionRecipe = InteractionRecipe()) -> Dict[str, int]:
    """Requests from ``data`` by ``recipe``, NN-logged into ``out/train``, ``out/eval`` and
    ``out/test`` (the layout ``python -m transact_jax train --data out`` reads); returns the number of
    examples per split (a split without requests is not written)."""
    counts = {}
    for name, log in build_event_logs(data, recipe, feat).items():
        if log is None:
            continue
        examples = build_training_examples(log, feat, sel)
        write_feature_log(os.path.join(os.fspath(out), name), examples, feat, sel)
        counts[name] = len(examples)
    return counts


__all__ = ["MOVIELENS_CSV_HEADER", "SPLITS", "read_interactions_csv", "read_movielens",
           "write_feature_logs"]
