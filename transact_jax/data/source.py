"""Random-access sources of training examples: what the input pipeline reads from.

:class:`ExampleSource` is the protocol: the configs the examples were logged with, a length, and
``read(indices)``, one batch of examples for any int array of indices (any order, repeats allowed,
negative indices count from the end). Two implementations:

* :class:`~transact_jax.data.feature_log.FeatureLog` - a feature log on disk (memory-mapped shards);
* :class:`InMemoryExamples` - :class:`~transact_jax.data.schema.TrainingExamples` already in memory
  (tests, small experiments, examples built on the fly from an event log).

A source's ``repr`` identifies its data: the pipeline's grain adapter uses it to match a source
against a saved iterator state, so it must be the same for the same data and differ for other data
(a feature log: its path; in-memory examples: their length and a content digest).
"""
from __future__ import annotations

import zlib
from typing import Protocol, Sequence, Union, runtime_checkable

import numpy as np

from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data.schema import SchemaError, TrainingExamples

Indices = Union[Sequence[int], np.ndarray]


@runtime_checkable
class ExampleSource(Protocol):
    """Random access to logged training examples (module docstring).

    Attributes:
      feat, sel: the configs the examples were logged with.
    """

    feat: FeatureConfig
    sel: SelectionConfig

    def __len__(self) -> int:
        """The number of examples."""

    def read(self, indices: Indices) -> TrainingExamples:
        """Examples at ``indices`` (a 1-D int array; any order, repeats allowed), in that order."""


def check_indices(indices: Indices, length: int, what: str) -> np.ndarray:
    """``indices`` as a 1-D int64 array in ``[0, length)`` (negative ones count from the end);
    TypeError for a non-integer or non-1-D input, IndexError naming ``what`` for one out of range."""
    idx = np.asarray(indices)
    if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
        raise TypeError(f"indices: expected a 1-D integer array, got {idx.dtype} {idx.shape}")
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < -length or idx.max() >= length):
        bad = idx[(idx < -length) | (idx >= length)][0]
        raise IndexError(f"indices: {bad} out of range for {what} of {length} examples")
    return np.where(idx < 0, idx + length, idx)


def _digest(examples: TrainingExamples, rows: int = 64) -> int:
    """A cheap content digest: CRC-32 of the id columns of every example and of every column of up
    to ``rows`` evenly spaced examples."""
    n = len(examples)
    crc = zlib.crc32(np.int64(n).tobytes())
    for ids in (examples.request_id, examples.item_id, examples.user_id):
        crc = zlib.crc32(np.ascontiguousarray(ids), crc)
    sample = np.unique(np.linspace(0, n - 1, min(n, rows)).astype(np.int64)) if n else np.zeros(0, np.int64)
    for name, col in sorted(examples.columns().items()):
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(np.ascontiguousarray(col[sample]), crc)
    return crc


class InMemoryExamples:
    """An :class:`ExampleSource` over :class:`TrainingExamples` held in memory.

    The examples are validated against ``feat`` and ``sel`` on construction (a bad one raises
    :class:`~transact_jax.data.schema.SchemaError` naming the field). ``read`` copies (fancy
    indexing), so batches do not alias the stored examples.
    """

    def __init__(self, examples: TrainingExamples, feat: FeatureConfig, sel: SelectionConfig):
        if not isinstance(examples, TrainingExamples):
            raise SchemaError("examples", f"expected TrainingExamples, got {type(examples).__name__}")
        examples.validate(feat, sel)
        self.examples = examples
        self.feat, self.sel = feat, sel
        self._len = len(examples)
        self._digest = _digest(examples)

    def __len__(self) -> int:
        return self._len

    def read(self, indices: Indices) -> TrainingExamples:
        """Examples at ``indices`` (any order, repeats allowed), in that order, as one batch."""
        return self.examples.select(check_indices(indices, self._len, "in-memory examples"))

    def __repr__(self) -> str:
        return f"InMemoryExamples(num_examples={self._len}, crc32={self._digest:08x})"


__all__ = ["ExampleSource", "InMemoryExamples", "check_indices"]
