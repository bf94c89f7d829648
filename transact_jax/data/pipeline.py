"""grain input pipeline over any example source: shuffle, batch, repeat, shard, prefetch.

The source is any :class:`~transact_jax.data.source.ExampleSource` (a
:class:`~transact_jax.data.feature_log.FeatureLog` on disk,
:class:`~transact_jax.data.source.InMemoryExamples`, or anything else with the configs, ``len`` and
``read(indices)``). A :class:`~transact_jax.data.request_log.RequestLog` is such a source too: its
"examples" are requests, and its batches are labelled ``RequestBatch`` es (each request's full
sequences with all its candidates; ``batch_size`` counts requests). The pipeline shuffles and batches example
*indices*, then turns each batch of indices into a :class:`~transact_jax.data.schema.TrainingExamples`
batch with one vectorized gather (``source.read(indices)``), never one read per example::

    range(this process's slice) -> shuffle(seed) -> repeat(num_epochs) -> batch(indices) -> read

Order and epochs:

* Epoch ``e`` is a permutation of this process's examples (grain's index shuffle, seeded by
  ``derived_seed + e``; ``derived_seed`` mixes the user seed through ``np.random.SeedSequence`` so
  that seeds ``s`` and ``s + 1`` do not share permutations). Same seed -> same order, always.
* Epochs are concatenated *before* batching: every batch has exactly ``batch_size`` examples and no
  example is dropped inside a run; epoch ``e`` is positions ``[e * m, (e + 1) * m)`` of the flat index
  stream (``m`` examples in this process's slice), so a batch may straddle two epochs.
  ``drop_remainder`` only concerns the last, partial batch of a finite run. Within a batch the
  shuffled order is kept.
* ``num_epochs=None`` repeats forever.

Data parallelism: process ``shard_index`` of ``shard_count`` reads examples
``shard_index, shard_index + shard_count, ...``, disjoint from the other processes. With
``even_shards=True`` (default) the last ``len(source) % shard_count`` examples are left out so all
processes have the same number of examples (and batches) per epoch, which keeps lock-step training
loops from stalling.

Resuming: the iterator of :func:`make_loader` has ``get_state()`` (a small JSON-compatible dict) and
``set_state(state)``; a fresh iterator of an identically configured loader restored from a saved state
yields exactly the batches the original would have yielded next. grain matches the source by its
``repr`` (:class:`GrainSource` shows the source's own ``repr``, which identifies its data).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Union

import grain
import numpy as np

from transact_jax.data.schema import TrainingExamples
from transact_jax.data.source import ExampleSource


class GrainSource:
    """A grain ``RandomAccessDataSource`` over an :class:`ExampleSource`: one example per index.

    ``source[i]`` is ``{column: array}`` (the flat columns of ``TrainingExamples.columns()``, without the
    example axis). For batches, :meth:`read_batch` gathers many examples at once.
    """

    def __init__(self, source: ExampleSource):
        if not isinstance(source, ExampleSource):
            raise TypeError(f"source: expected an ExampleSource (feat, sel, len() and read(indices)), "
                            f"got {type(source).__name__}")
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Union[Dict[str, np.ndarray], Any]:
        batch = self.source.read(np.array([index], np.int64))
        if not isinstance(batch, TrainingExamples):   # e.g. a RequestLog: a one-request batch
            return batch
        return {name: a[0] for name, a in batch.columns().items()}

    def read_batch(self, indices: Union[Sequence[int], np.ndarray]) -> TrainingExamples:
        """Examples at ``indices``, in that order, in one gather."""
        return self.source.read(indices)

    def __repr__(self) -> str:  # grain uses the repr to match sources in checkpoints
        return f"GrainSource({self.source!r})"


class _GatherBatch:
    """Map function: a batch of indices -> TrainingExamples (picklable, unlike a lambda)."""

    def __init__(self, source: GrainSource):
        self.source = source

    def __call__(self, indices: np.ndarray) -> TrainingExamples:
        return self.source.read_batch(indices)


def _stack_indices(indices: Sequence[int]) -> np.ndarray:
    return np.asarray(indices, dtype=np.int64)


def _as_grain(data: Union[ExampleSource, GrainSource]) -> GrainSource:
    return data if isinstance(data, GrainSource) else GrainSource(data)


def derive_seed(seed: int) -> int:
    """The 32-bit shuffle seed used for user seed ``seed`` (epoch ``e`` uses ``derive_seed(seed) + e``)."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: must be a non-negative int, got {seed!r}")
    return int(np.random.SeedSequence(int(seed)).generate_state(1, np.uint32)[0])


def shard_range(num_examples: int, shard_index: int = 0, shard_count: int = 1,
                even_shards: bool = True) -> range:
    """Global example indices read by process ``shard_index`` of ``shard_count`` (see module doc)."""
    if not isinstance(shard_count, (int, np.integer)) or shard_count < 1:
        raise ValueError(f"shard_count: must be a positive int, got {shard_count!r}")
    if not isinstance(shard_index, (int, np.integer)) or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index: must be in [0, {shard_count}), got {shard_index!r}")
    usable = num_examples - num_examples % shard_count if even_shards else num_examples
    return range(int(shard_index), int(usable), int(shard_count))


def _no_examples(source: ExampleSource, shard_index: int, shard_count: int) -> str:
    """The error for a process with nothing to read, naming the source (a feature log: its path)."""
    path = getattr(source, "path", None)
    what = f"the feature log {path}" if path is not None else f"the example source {source!r}"
    if len(source) == 0:
        return f"{what} has 0 examples: nothing to read (regenerate it with some users/examples)"
    return (f"{what} has {len(source)} examples, which leaves 0 for process {shard_index} of "
            f"{shard_count}")


def make_dataset(source: Union[ExampleSource, GrainSource], *, batch_size: int, seed: int = 0,
                 shuffle: bool = True, num_epochs: Optional[int] = 1, drop_remainder: bool = True,
                 shard_index: int = 0, shard_count: int = 1,
                 even_shards: bool = True) -> grain.MapDataset:
    """A ``grain.MapDataset`` of :class:`TrainingExamples` batches (order: module docstring).

    Args:
      source: the examples: any :class:`ExampleSource` (or a :class:`GrainSource` over one).
      batch_size: examples per batch.
      seed: shuffle seed; the order is a deterministic function of (seed, shard, epoch).
      shuffle: False keeps the stored order (every epoch the same).
      num_epochs: passes over the data; ``None`` repeats forever.
      drop_remainder: drop the final partial batch of a finite run (True keeps shapes static for jit).
      shard_index, shard_count: this process's data-parallel slice.
      even_shards: give every process the same number of examples (drops ``len % shard_count``).

    A source (or process slice) with 0 examples raises ValueError naming the source (a feature log:
    its path) instead of giving an iterator that stops at once.
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: must be a positive int, got {batch_size!r}")
    if num_epochs is not None and (not isinstance(num_epochs, (int, np.integer)) or num_epochs < 1):
        raise ValueError(f"num_epochs: must be a positive int or None, got {num_epochs!r}")
    grain_source = _as_grain(source)
    rows = shard_range(len(grain_source), shard_index, shard_count, even_shards)
    if len(rows) == 0:
        raise ValueError(_no_examples(grain_source.source, shard_index, shard_count))
    ds = grain.MapDataset.range(rows.start, rows.stop, rows.step)
    if shuffle:
        ds = ds.shuffle(seed=derive_seed(seed))
    else:
        derive_seed(seed)  # validate it all the same
    ds = ds.repeat(num_epochs, reseed_each_epoch=True)
    ds = ds.batch(int(batch_size), drop_remainder=drop_remainder, batch_fn=_stack_indices)
    return ds.map(_GatherBatch(grain_source))


def make_loader(source: Union[ExampleSource, GrainSource], *, batch_size: int, seed: int = 0,
                shuffle: bool = True, num_epochs: Optional[int] = 1, drop_remainder: bool = True,
                shard_index: int = 0, shard_count: int = 1, even_shards: bool = True,
                prefetch: int = 4, num_threads: int = 2,
                transform: Optional[Callable[[TrainingExamples], Any]] = None) -> grain.IterDataset:
    """:func:`make_dataset` as a prefetching ``grain.IterDataset``.

    ``prefetch`` batches (at least ``num_threads`` when prefetching) are read ahead by ``num_threads``
    threads (``grain.ReadOptions``; ``prefetch=0`` disables prefetching). Batches come out in order
    regardless of threads. ``transform`` (e.g. conversion to model inputs and the host-to-device
    copy) runs on each batch inside the reader threads, so it overlaps with training too.
    ``iter(loader)`` gives an iterator with ``get_state()`` / ``set_state()`` for checkpointing
    (module docstring); prefetched batches do not count as consumed.
    """
    if prefetch < 0 or num_threads < 0:
        raise ValueError(f"prefetch, num_threads: must be >= 0, got {prefetch}, {num_threads}")
    ds = make_dataset(source, batch_size=batch_size, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                      drop_remainder=drop_remainder, shard_index=shard_index,
                      shard_count=shard_count, even_shards=even_shards)
    if transform is not None:
        ds = ds.map(transform)
    # grain uses at most prefetch_buffer_size threads: keep the buffer at least as deep as the threads
    buffer = max(int(prefetch), int(num_threads)) if prefetch else 0
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=int(num_threads),
                                                prefetch_buffer_size=buffer))
