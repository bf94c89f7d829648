"""grain input pipeline (transact_jax.data.pipeline): order, epochs, seeds, resume, sharding; every test
runs over a feature log on disk and over the same examples in memory (two ExampleSources)."""
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
    GrainSource,
    derive_seed,
    make_dataset,
    make_loader,
    shard_range,
)
from transact_jax.data.schema import SchemaError, TrainingExamples
from transact_jax.data.source import ExampleSource, InMemoryExamples

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
def feature_log(tmp_path_factory, examples) -> FeatureLog:
    path = tmp_path_factory.mktemp("pipeline") / "log"
    return write_feature_log(path, examples, FEAT, SEL, examples_per_shard=8)


@pytest.fixture(scope="module", params=["feature_log", "in_memory"])
def source(request, examples, feature_log) -> ExampleSource:
    """The examples as a feature log on disk, or held in memory."""
    if request.param == "feature_log":
        return feature_log
    return InMemoryExamples(examples, FEAT, SEL)


def ids(batches) -> np.ndarray:
    return np.concatenate([b.item_id for b in batches]) if batches else np.zeros(0, np.int64)


def assert_batch_matches_log(batch: TrainingExamples, examples: TrainingExamples) -> None:
    want = examples.select(batch.item_id).columns()
    for name, col in batch.columns().items():
        assert col.dtype == want[name].dtype, name
        np.testing.assert_array_equal(col, want[name], err_msg=name)


# ---------------------------------------------------------------------------------- source

def test_source_is_a_grain_data_source(source, examples):
    assert isinstance(source, ExampleSource)
    grain_source = GrainSource(source)
    assert isinstance(grain_source, grain.sources.RandomAccessDataSource)
    assert len(grain_source) == N
    ds = grain.MapDataset.source(grain_source)
    row = ds[31]
    for name, col in examples.columns().items():
        np.testing.assert_array_equal(row[name], col[31], err_msg=name)
    assert repr(grain_source) == f"GrainSource({source!r})"
    with pytest.raises(TypeError, match="ExampleSource"):
        GrainSource(examples)


def test_source_reprs_identify_the_data(feature_log, examples):
    """grain matches sources by repr: stable for the same data, different for other data."""
    assert repr(feature_log) == repr(FeatureLog(feature_log.path))
    assert str(feature_log.path) in repr(GrainSource(feature_log))
    mem = InMemoryExamples(examples, FEAT, SEL)
    assert repr(mem) == repr(InMemoryExamples(examples, FEAT, SEL))
    assert "num_examples=50" in repr(mem)
    other = dataclasses.replace(examples, labels=1 - examples.labels)
    assert repr(InMemoryExamples(other, FEAT, SEL)) != repr(mem)
    assert repr(InMemoryExamples(examples.select(slice(0, 49)), FEAT, SEL)) != repr(mem)


def test_in_memory_source_reads_like_a_feature_log(feature_log, examples):
    mem = InMemoryExamples(examples, FEAT, SEL)
    assert len(mem) == N and (mem.feat, mem.sel) == (FEAT, SEL)
    idx = np.array([7, 3, 3, -1, 0])           # any order, repeats, negative from the end
    assert_batch_matches_log(mem.read(idx), examples)
    want, got = feature_log.read(idx).columns(), mem.read(idx).columns()
    for name, col in want.items():
        np.testing.assert_array_equal(got[name], col, err_msg=name)
    with pytest.raises(IndexError, match="50 examples"):
        mem.read([50])
    with pytest.raises(TypeError, match="1-D integer"):
        mem.read(np.array([0.5]))
    with pytest.raises(SchemaError) as e:       # validated on construction
        InMemoryExamples(dataclasses.replace(examples, labels=examples.labels + 2), FEAT, SEL)
    assert e.value.field == "labels"


def test_both_sources_give_the_same_batches(feature_log, examples):
    kw = dict(batch_size=7, seed=3, num_epochs=2, drop_remainder=False)
    on_disk = list(make_dataset(feature_log, **kw))
    in_memory = list(make_loader(InMemoryExamples(examples, FEAT, SEL), **kw, prefetch=2, num_threads=2))
    assert len(on_disk) == len(in_memory) == -(-2 * N // 7)
    for a, b in zip(on_disk, in_memory):
        for name, col in a.columns().items():
            np.testing.assert_array_equal(b.columns()[name], col, err_msg=name)


# ---------------------------------------------------------------------------------- order

def test_one_epoch_every_example_once(source, examples):
    batches = list(make_dataset(source, batch_size=8, seed=1, drop_remainder=False))
    assert [len(b) for b in batches] == [8] * 6 + [2]
    got = ids(batches)
    assert sorted(got.tolist()) == list(range(N))
    assert got.tolist() != list(range(N))  # shuffled
    for b in batches:
        assert_batch_matches_log(b, examples)  # every column, shuffled order kept inside the batch
    # drop_remainder keeps full batches only
    assert [len(b) for b in make_dataset(source, batch_size=8, seed=1)] == [8] * 6


def test_epochs_are_different_permutations(source, examples):
    ds = make_dataset(source, batch_size=7, seed=5, num_epochs=3, drop_remainder=False)
    assert len(ds) == -(-3 * N // 7)
    flat = ids(list(ds))
    assert len(flat) == 3 * N
    epochs = flat.reshape(3, N)
    for e in epochs:
        assert sorted(e.tolist()) == list(range(N))
    assert len({tuple(e) for e in epochs}) == 3
    # a full-batch run loses only the final partial batch
    full = list(make_dataset(source, batch_size=7, seed=5, num_epochs=3))
    assert all(len(b) == 7 for b in full) and len(full) == 3 * N // 7
    np.testing.assert_array_equal(ids(full), flat[:len(full) * 7])


def test_order_is_deterministic_per_seed(source):
    def order(seed, **kw):
        return ids(list(make_dataset(source, batch_size=10, seed=seed, num_epochs=2, **kw)))

    np.testing.assert_array_equal(order(0), order(0))
    assert not np.array_equal(order(0), order(1))
    assert not np.array_equal(order(1), order(2))
    # epoch 1 of seed 0 is not epoch 0 of seed 1 (seeds are mixed, not just offset)
    assert not np.array_equal(order(0)[N:], order(1)[:N])
    np.testing.assert_array_equal(order(0, shuffle=False), np.tile(np.arange(N), 2))
    with pytest.raises(ValueError, match="seed"):
        derive_seed(-1)


def test_infinite_repeat(source):
    it = iter(make_dataset(source, batch_size=10, seed=2, num_epochs=None))
    flat = ids([next(it) for _ in range(25)])  # 5 epochs
    for e in flat.reshape(5, N):
        assert sorted(e.tolist()) == list(range(N))


def test_loader_prefetch_gives_the_dataset_order(source, examples):
    kw = dict(batch_size=6, seed=9, num_epochs=2)
    want = ids(list(make_dataset(source, **kw)))
    for threads, prefetch in ((0, 0), (1, 2), (2, 8)):
        batches = list(make_loader(source, **kw, prefetch=prefetch, num_threads=threads))
        np.testing.assert_array_equal(ids(batches), want)
        assert_batch_matches_log(batches[3], examples)


def test_transform_runs_in_the_loader_and_keeps_order_and_state(source):
    """A per-batch transform (the training loop's host-to-device step) runs in the reader threads:
    same order as without it, and a saved state resumes the transformed stream exactly."""
    import threading
    kw = dict(batch_size=7, seed=5, num_epochs=None, prefetch=4, num_threads=2)
    plain = iter(make_loader(source, **kw))
    want = [next(plain).item_id for _ in range(6)]
    threads = set()

    def transform(batch):
        threads.add(threading.get_ident())
        return batch.item_id * 2

    it = iter(make_loader(source, **kw, transform=transform))
    got = [next(it) for _ in range(3)]
    saved = it.get_state()
    got += [next(it) for _ in range(3)]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w * 2)
    assert threading.get_ident() not in threads          # not on the consumer's thread
    resumed = iter(make_loader(source, **kw, transform=transform))
    resumed.set_state(saved)
    for w in want[3:]:
        np.testing.assert_array_equal(next(resumed), w * 2)


# ---------------------------------------------------------------------------------- resume

@pytest.mark.parametrize("stop_after", [3, 9])  # mid-epoch 0, and in epoch 1 after a straddling batch
def test_resume_gives_identical_next_batches(source, stop_after):
    kw = dict(batch_size=8, seed=11, num_epochs=None, prefetch=4, num_threads=2)
    it = iter(make_loader(source, **kw))
    for _ in range(stop_after):
        next(it)
    saved = json.loads(json.dumps(it.get_state()))  # checkpoints store JSON
    expected = [next(it) for _ in range(4)]
    fresh = iter(make_loader(source, **kw))
    next(fresh)  # a fresh iterator that has already moved is reset by set_state
    fresh.set_state(saved)
    for want in expected:
        got = next(fresh)
        for name, col in want.columns().items():
            np.testing.assert_array_equal(got.columns()[name], col, err_msg=name)


def test_resume_on_a_finite_run_ends_at_the_same_place(source):
    kw = dict(batch_size=8, seed=4, num_epochs=2)
    it = iter(make_loader(source, **kw))
    head = [next(it) for _ in range(5)]
    state = it.get_state()
    rest = list(it)
    fresh = iter(make_loader(source, **kw))
    fresh.set_state(state)
    np.testing.assert_array_equal(ids(list(fresh)), ids(rest))
    assert len(head) + len(rest) == 2 * N // 8


# ---------------------------------------------------------------------------------- sharding

def test_two_processes_read_disjoint_covering_slices(source, examples):
    seen = []
    for p in range(2):
        batches = list(make_loader(source, batch_size=5, seed=0, shard_index=p, shard_count=2,
                                   num_epochs=2))
        flat = ids(batches).reshape(2, N // 2)
        assert sorted(flat[0].tolist()) == sorted(flat[1].tolist())  # each epoch: the same slice
        assert not np.array_equal(flat[0], flat[1])
        assert_batch_matches_log(batches[0], examples)
        seen.append(set(flat[0].tolist()))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(N))


def test_uneven_sharding(source):
    assert list(shard_range(7, 0, 2)) == [0, 2, 4] and list(shard_range(7, 1, 2)) == [1, 3, 5]
    assert list(shard_range(7, 0, 2, even_shards=False)) == [0, 2, 4, 6]
    parts = [ids(list(make_dataset(source, batch_size=1, seed=0, shard_index=p, shard_count=3)))
             for p in range(3)]
    assert [len(p) for p in parts] == [16, 16, 16]  # 50 % 3 = 2 examples left out
    assert len(set(np.concatenate(parts).tolist())) == 48
    parts = [ids(list(make_dataset(source, batch_size=1, seed=0, shard_index=p, shard_count=3,
                                   even_shards=False))) for p in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(N))
    with pytest.raises(ValueError, match="shard_index"):
        make_dataset(source, batch_size=4, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="batch_size"):
        make_dataset(source, batch_size=0)
    with pytest.raises(ValueError, match="num_epochs"):
        make_dataset(source, batch_size=4, num_epochs=0)
