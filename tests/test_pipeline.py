"""grain input pipeline (transact_jax.data.pipeline): order, epochs, seeds, resume, sharding."""
from __future__ import annotations

import dataclasses
import json

import grain
import numpy as np
import pytest

from tests.helpers import random_requests
from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data.feature_log import FeatureLog, write_feature_log
from transact_jax.data.features import log_nn_features
from transact_jax.data.pipeline import (
    LoggedExampleSource,
    derive_seed,
    make_dataset,
    make_loader,
    shard_range,
)
from transact_jax.data.schema import TrainingExamples

FEAT = FeatureConfig()
SEL = SelectionConfig(max_ll_len=200)
N = 50


@pytest.fixture(scope="module")
def examples() -> TrainingExamples:
    """N examples whose item_id is their index, so batches can be traced back."""
    rng = np.random.default_rng(3)
    counts = np.full(10, 5)
    req = random_requests(rng, rng.integers(0, 200, 10), rng.integers(0, 60, 10),
                          rng.integers(0, 60, 10), counts)
    ex = log_nn_features(req, FEAT, SEL)
    assert len(ex) == N
    return dataclasses.replace(ex, item_id=np.arange(N, dtype=np.int64))


@pytest.fixture(scope="module")
def log(tmp_path_factory, examples) -> FeatureLog:
    path = tmp_path_factory.mktemp("pipeline") / "log"
    return write_feature_log(path, examples, FEAT, SEL, examples_per_shard=8)


def ids(batches) -> np.ndarray:
    return np.concatenate([b.item_id for b in batches]) if batches else np.zeros(0, np.int64)


def assert_batch_matches_log(batch: TrainingExamples, examples: TrainingExamples) -> None:
    want = examples.select(batch.item_id).columns()
    for name, col in batch.columns().items():
        assert col.dtype == want[name].dtype, name
        np.testing.assert_array_equal(col, want[name], err_msg=name)


# ---------------------------------------------------------------------------------- source

def test_source_is_a_grain_data_source(log, examples):
    source = LoggedExampleSource(log)
    assert isinstance(source, grain.sources.RandomAccessDataSource)
    assert len(source) == N
    ds = grain.MapDataset.source(source)
    row = ds[31]
    for name, col in examples.columns().items():
        np.testing.assert_array_equal(row[name], col[31], err_msg=name)
    assert "num_examples=50" in repr(source)


# ---------------------------------------------------------------------------------- order

def test_one_epoch_every_example_once(log, examples):
    batches = list(make_dataset(log, batch_size=8, seed=1, drop_remainder=False))
    assert [len(b) for b in batches] == [8] * 6 + [2]
    got = ids(batches)
    assert sorted(got.tolist()) == list(range(N))
    assert got.tolist() != list(range(N))  # shuffled
    for b in batches:
        assert_batch_matches_log(b, examples)  # every column, shuffled order kept inside the batch
    # drop_remainder keeps full batches only
    assert [len(b) for b in make_dataset(log, batch_size=8, seed=1)] == [8] * 6


def test_epochs_are_different_permutations(log, examples):
    ds = make_dataset(log, batch_size=7, seed=5, num_epochs=3, drop_remainder=False)
    assert len(ds) == -(-3 * N // 7)
    flat = ids(list(ds))
    assert len(flat) == 3 * N
    epochs = flat.reshape(3, N)
    for e in epochs:
        assert sorted(e.tolist()) == list(range(N))
    assert len({tuple(e) for e in epochs}) == 3
    # a full-batch run loses only the final partial batch
    full = list(make_dataset(log, batch_size=7, seed=5, num_epochs=3))
    assert all(len(b) == 7 for b in full) and len(full) == 3 * N // 7
    np.testing.assert_array_equal(ids(full), flat[:len(full) * 7])


def test_order_is_deterministic_per_seed(log):
    def order(seed, **kw):
        return ids(list(make_dataset(log, batch_size=10, seed=seed, num_epochs=2, **kw)))

    np.testing.assert_array_equal(order(0), order(0))
    assert not np.array_equal(order(0), order(1))
    assert not np.array_equal(order(1), order(2))
    # epoch 1 of seed 0 is not epoch 0 of seed 1 (seeds are mixed, not just offset)
    assert not np.array_equal(order(0)[N:], order(1)[:N])
    np.testing.assert_array_equal(order(0, shuffle=False), np.tile(np.arange(N), 2))
    with pytest.raises(ValueError, match="seed"):
        derive_seed(-1)


def test_infinite_repeat(log):
    it = iter(make_dataset(log, batch_size=10, seed=2, num_epochs=None))
    flat = ids([next(it) for _ in range(25)])  # 5 epochs
    for e in flat.reshape(5, N):
        assert sorted(e.tolist()) == list(range(N))


def test_loader_prefetch_gives_the_dataset_order(log, examples):
    kw = dict(batch_size=6, seed=9, num_epochs=2)
    want = ids(list(make_dataset(log, **kw)))
    for threads, prefetch in ((0, 0), (1, 2), (2, 8)):
        batches = list(make_loader(log, **kw, prefetch=prefetch, num_threads=threads))
        np.testing.assert_array_equal(ids(batches), want)
        assert_batch_matches_log(batches[3], examples)


def test_transform_runs_in_the_loader_and_keeps_order_and_state(log):
    """A per-batch transform (the training loop's host-to-device step) runs in the reader threads:
    same order as without it, and a saved state resumes the transformed stream exactly."""
    import threading
    kw = dict(batch_size=7, seed=5, num_epochs=None, prefetch=4, num_threads=2)
    plain = iter(make_loader(log, **kw))
    want = [next(plain).item_id for _ in range(6)]
    threads = set()

    def transform(batch):
        threads.add(threading.get_ident())
        return batch.item_id * 2

    it = iter(make_loader(log, **kw, transform=transform))
    got = [next(it) for _ in range(3)]
    saved = it.get_state()
    got += [next(it) for _ in range(3)]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w * 2)
    assert threading.get_ident() not in threads          # not on the consumer's thread
    resumed = iter(make_loader(log, **kw, transform=transform))
    resumed.set_state(saved)
    for w in want[3:]:
        np.testing.assert_array_equal(next(resumed), w * 2)


# ---------------------------------------------------------------------------------- resume

@pytest.mark.parametrize("stop_after", [3, 9])  # mid-epoch 0, and in epoch 1 after a straddling batch
def test_resume_gives_identical_next_batches(log, stop_after):
    kw = dict(batch_size=8, seed=11, num_epochs=None, prefetch=4, num_threads=2)
    it = iter(make_loader(log, **kw))
    for _ in range(stop_after):
        next(it)
    saved = json.loads(json.dumps(it.get_state()))  # checkpoints store JSON
    expected = [next(it) for _ in range(4)]
    fresh = iter(make_loader(log, **kw))
    next(fresh)  # a fresh iterator that has already moved is reset by set_state
    fresh.set_state(saved)
    for want in expected:
        got = next(fresh)
        for name, col in want.columns().items():
            np.testing.assert_array_equal(got.columns()[name], col, err_msg=name)


def test_resume_on_a_finite_run_ends_at_the_same_place(log):
    kw = dict(batch_size=8, seed=4, num_epochs=2)
    it = iter(make_loader(log, **kw))
    head = [next(it) for _ in range(5)]
    state = it.get_state()
    rest = list(it)
    fresh = iter(make_loader(log, **kw))
    fresh.set_state(state)
    np.testing.assert_array_equal(ids(list(fresh)), ids(rest))
    assert len(head) + len(rest) == 2 * N // 8


# ---------------------------------------------------------------------------------- sharding

def test_two_processes_read_disjoint_covering_slices(log, examples):
    seen = []
    for p in range(2):
        batches = list(make_loader(log, batch_size=5, seed=0, shard_index=p, shard_count=2,
                                   num_epochs=2))
        flat = ids(batches).reshape(2, N // 2)
        assert sorted(flat[0].tolist()) == sorted(flat[1].tolist())  # each epoch: the same slice
        assert not np.array_equal(flat[0], flat[1])
        assert_batch_matches_log(batches[0], examples)
        seen.append(set(flat[0].tolist()))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(N))


def test_uneven_sharding(log):
    assert list(shard_range(7, 0, 2)) == [0, 2, 4] and list(shard_range(7, 1, 2)) == [1, 3, 5]
    assert list(shard_range(7, 0, 2, even_shards=False)) == [0, 2, 4, 6]
    parts = [ids(list(make_dataset(log, batch_size=1, seed=0, shard_index=p, shard_count=3)))
             for p in range(3)]
    assert [len(p) for p in parts] == [16, 16, 16]  # 50 % 3 = 2 examples left out
    assert len(set(np.concatenate(parts).tolist())) == 48
    parts = [ids(list(make_dataset(log, batch_size=1, seed=0, shard_index=p, shard_count=3,
                                   even_shards=False))) for p in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(N))
    with pytest.raises(ValueError, match="shard_index"):
        make_dataset(log, batch_size=4, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="batch_size"):
        make_dataset(log, batch_size=0)
    with pytest.raises(ValueError, match="num_epochs"):
        make_dataset(log, batch_size=4, num_epochs=0)
