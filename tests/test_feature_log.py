"""Feature log (transact_jax.data.feature_log): format, round trips, corruption, crash safety."""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import struct

import numpy as np
import pytest

from tests.helpers import random_requests
from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data import feature_log as fl
from transact_jax.data.feature_log import format as fl_format
from transact_jax.data.feature_log import writer as fl_writer
from transact_jax.data.feature_log import FeatureLog, FeatureLogError, FeatureLogWriter, write_feature_log
from transact_jax.data.features import example_nbytes, log_nn_features
from transact_jax.data.schema import SchemaError, TrainingExamples, broadcast

FEAT = FeatureConfig()
SEL = SelectionConfig(max_ll_len=400)


@pytest.fixture(scope="module")
def requests():
    rng = np.random.default_rng(7)
    u = 16
    return random_requests(rng, rng.integers(0, 400, u), rng.integers(0, 100, u),
                           rng.integers(0, 100, u), rng.integers(1, 9, u))


@pytest.fixture(scope="module")
def examples(requests) -> TrainingExamples:
    ex = log_nn_features(requests, FEAT, SEL)
    assert 40 <= len(ex) <= 140
    return ex


def assert_same(got: TrainingExamples, want: TrainingExamples) -> None:
    g, w = got.columns(), want.columns()
    assert g.keys() == w.keys()
    for name in w:
        assert g[name].dtype == w[name].dtype, name
        assert g[name].shape == w[name].shape, name
        np.testing.assert_array_equal(g[name], w[name], err_msg=name)


def write(path, ex, per_shard=16, parts=(10, 25)):
    """Write ``ex`` in uneven write() calls: rows [0,10), [10,35), [35,n)."""
    cuts = [0, *np.cumsum(parts), len(ex)]
    with FeatureLogWriter(path, FEAT, SEL, examples_per_shard=per_shard) as w:
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            w.write(ex.select(slice(lo, hi)))
    return path


# ---------------------------------------------------------------------------------- round trips

def test_round_trip_across_shards(tmp_path, examples):
    n = len(examples)
    write(tmp_path / "log", examples, per_shard=16)
    log = FeatureLog(tmp_path / "log", FEAT, SEL)
    assert len(log) == n
    assert log.num_shards == -(-n // 16)
    assert log.shard_sizes.tolist() == [16] * (n // 16) + ([n % 16] if n % 16 else [])
    assert_same(log.read(np.arange(n)), examples)
    assert_same(log.read_range(5, 37), examples.select(slice(5, 37)))
    # the manifest carries the configs and column specs as documented
    manifest = json.loads((tmp_path / "log" / "manifest.json").read_text())
    assert manifest["version"] == 2 and manifest["num_examples"] == n
    assert len(manifest["log_id"]) == 32
    assert manifest["feature_config"] == json.loads(json.dumps(dataclasses.asdict(FEAT)))
    assert manifest["selection_config"]["max_ll_len"] == 400
    assert [c["name"] for c in manifest["columns"]] == list(TrainingExamples.column_specs(FEAT, SEL))
    assert {c["name"]: c["shape"] for c in manifest["columns"]}["s_all.embeddings"] == [192, 32]
    assert [s["num_examples"] for s in manifest["shards"]] == log.shard_sizes.tolist()
    assert [s["nbytes"] for s in manifest["shards"]] == [os.path.getsize(f) for f in log.shard_files]
    assert all(len(s["crc32"]) == len(manifest["columns"]) for s in manifest["shards"])
    # stored configs come back when none are given
    assert FeatureLog(tmp_path / "log").feat == FEAT and FeatureLog(tmp_path / "log").sel == SEL


def test_random_order_reads(tmp_path, examples):
    n = len(examples)
    log = write_feature_log(tmp_path / "log", examples, FEAT, SEL, examples_per_shard=13)
    rng = np.random.default_rng(0)
    for idx in (rng.permutation(n), rng.integers(0, n, 40), np.array([n - 1, 0, 0, 14, 13, 12]),
                np.array([2, 0, 0]), np.array([-1, -n])):
        assert_same(log.read(idx), examples.select(idx))
    one = log[17]
    for name, col in examples.columns().items():
        np.testing.assert_array_equal(one[name], col[17], err_msg=name)
    assert len(log.read([])) == 0
    with pytest.raises(IndexError, match="out of range"):
        log.read([0, n])
    with pytest.raises(TypeError, match="indices"):
        log.read(np.zeros((2, 2), np.int64))


def test_documented_layout_is_memmappable(tmp_path, examples):
    """A reader that knows only the module docstring can np.memmap every column."""
    write_feature_log(tmp_path / "log", examples, FEAT, SEL, examples_per_shard=32)
    manifest = json.loads((tmp_path / "log" / "manifest.json").read_text())
    start = 0
    for shard in manifest["shards"]:
        path = tmp_path / "log" / shard["file"]
        raw = path.read_bytes()
        magic, version, hlen, hcrc, reserved = struct.unpack("<8sIIII", raw[:24])
        assert (magic, version, reserved) == (b"TJXFLOG\x00", 2, 0)
        header = json.loads(raw[24:24 + hlen])
        n = header["num_examples"]
        assert n == shard["num_examples"] and header["nbytes"] == len(raw)
        assert header["log_id"] == manifest["log_id"]
        assert header["shard"] == manifest["shards"].index(shard)
        assert [c["crc32"] for c in header["columns"]] == shard["crc32"]
        last = header["columns"][-1]
        assert last["offset"] + last["nbytes"] == len(raw)
        for col in header["columns"]:
            assert col["offset"] % 64 == 0
            arr = np.memmap(path, dtype=col["dtype"], mode="r", offset=col["offset"],
                            shape=(n, *col["shape"]))
            np.testing.assert_array_equal(arr, examples.columns()[col["name"]][start:start + n])
        start += n
    assert start == len(examples)


def test_bytes_per_example(tmp_path, requests, examples):
    log = write_feature_log(tmp_path / "log", examples, FEAT, SEL, examples_per_shard=64)
    on_disk = sum(os.path.getsize(f) for f in log.shard_files)
    assert log.bytes_per_example() == pytest.approx(on_disk / len(examples))
    assert log.column_bytes_per_example() == example_nbytes(examples)
    # 192 tokens x (8 + 1 + 2 + 32) bytes + the rest; headers and padding add < 3 %
    assert log.column_bytes_per_example() > 192 * 43
    assert log.column_bytes_per_example() < log.bytes_per_example() < 1.03 * log.column_bytes_per_example()
    # full sequences, one copy per candidate, cost more even with these short (<= 400) sequences
    full = broadcast(requests).sequence_nbytes() / requests.num_candidates
    assert full > log.bytes_per_example()


def test_few_open_maps(tmp_path, examples):
    write_feature_log(tmp_path / "log", examples, FEAT, SEL, examples_per_shard=5)
    log = FeatureLog(tmp_path / "log", max_open_shards=2)
    idx = np.random.default_rng(1).permutation(len(examples))
    assert_same(log.read(idx), examples.select(idx))
    assert len(log._maps.open_maps) == 2
    log.close()
    assert len(log._maps.open_maps) == 0
    assert_same(log.read(idx[:9]), examples.select(idx[:9]))  # maps again after close()


def test_pickle_reopens(tmp_path, examples):
    log = write_feature_log(tmp_path / "log", examples, FEAT, SEL, examples_per_shard=20)
    clone = pickle.loads(pickle.dumps(log))
    assert_same(clone.read([3, 2, 50]), log.read([3, 2, 50]))


# ---------------------------------------------------------------------------------- configs

def test_config_mismatch_names_the_field(tmp_path, examples):
    write_feature_log(tmp_path / "log", examples, FEAT, SEL, examples_per_shard=64)
    with pytest.raises(SchemaError) as e:
        FeatureLog(tmp_path / "log", dataclasses.replace(FEAT, num_dense=4), SEL)
    assert e.value.field == "feature_config.num_dense"
    with pytest.raises(SchemaError) as e:
        FeatureLog(tmp_path / "log", FEAT, dataclasses.replace(SEL, k_ll=64))
    assert e.value.field == "selection_config.k_ll"
    with pytest.raises(SchemaError) as e:
        FeatureLog(tmp_path / "log", FEAT, SelectionConfig())  # default max_ll_len=10_000
    assert e.value.field == "selection_config.max_ll_len" and "400" in str(e.value)


def test_manifest_problems(tmp_path, examples):
    path = tmp_path / "log"
    write_feature_log(path, examples, FEAT, SEL, examples_per_shard=64)
    manifest = json.loads((path / "manifest.json").read_text())
    bad = dict(manifest, version=99)
    (path / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(FeatureLogError, match="version 99"):
        FeatureLog(path)
    for key, value, field in (("selection_config", dict(manifest["selection_config"], k_ll=-1), "k_ll"),
                              ("feature_config", dict(manifest["feature_config"], colour="red"), "colour"),
                              ("selection_config", [1, 2], "selection_config")):
        (path / "manifest.json").write_text(json.dumps(dict(manifest, **{key: value})))
        with pytest.raises(FeatureLogError) as e:
            FeatureLog(path)
        assert e.value.field.endswith("manifest.json") and field in str(e.value)
        assert f"manifest.json: {key}" in str(e.value)
    (path / "manifest.json").write_text("{ not json")
    with pytest.raises(FeatureLogError, match="manifest.json: not valid JSON"):
        FeatureLog(path)
    (path / "manifest.json").unlink()
    with pytest.raises(FeatureLogError, match="manifest.json: missing"):
        FeatureLog(path)


# ---------------------------------------------------------------------------------- corruption

def test_truncated_shard(tmp_path, examples):
    path = write(tmp_path / "log", examples, per_shard=16)
    shard = path / "shard-00001.tfl"
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(FeatureLogError, match="truncated") as e:
        FeatureLog(path)
    assert e.value.field.endswith("shard-00001.tfl")
    assert f"{size - 100} bytes" in str(e.value)
    # verify="none" opens lazily but still refuses to read past the end of the file
    log = FeatureLog(path, verify="none")
    assert_same(log.read([0, 5]), examples.select([0, 5]))
    with pytest.raises(FeatureLogError, match=r"shard-00001.tfl: truncated: column 'nal_negative_mask'"):
        log.read([20])
    with open(shard, "r+b") as f:
        f.truncate(10)
    with pytest.raises(FeatureLogError, match="shorter than the 24-byte shard prefix"):
        FeatureLog(path, verify="none").read([20])


def test_flipped_data_byte_caught_on_first_read_or_full_verify(tmp_path, examples):
    path = write(tmp_path / "log", examples, per_shard=16)
    shard = path / "shard-00002.tfl"
    raw = bytearray(shard.read_bytes())
    hlen = struct.unpack("<I", raw[12:16])[0]
    col = {c["name"]: c for c in json.loads(raw[24:24 + hlen])["columns"]}["dense"]
    raw[col["offset"] + 5] ^= 0x10
    shard.write_bytes(bytes(raw))
    log = FeatureLog(path, verify="header")  # headers and sizes are fine: only the CRCs see it
    assert_same(log.read([0, 20, 50]), examples.select([0, 20, 50]))  # other shards read fine
    with pytest.raises(FeatureLogError, match="shard-00002.tfl: corrupt data: CRC-32 mismatch in "
                                              "column 'dense'"):
        log.read([33])  # the first read of shard 2 checks its data
    with pytest.raises(FeatureLogError, match="corrupt data: CRC-32 mismatch in column 'dense'") as e:
        FeatureLog(path, verify="full")
    assert e.value.field.endswith("shard-00002.tfl")
    with pytest.raises(FeatureLogError, match="CRC-32"):
        FeatureLog(path, verify="header").verify_all()
    FeatureLog(path, verify="none").read([33])  # "none" checks no CRCs


def test_corrupt_header_and_magic(tmp_path, examples):
    path = write(tmp_path / "log", examples, per_shard=16)
    shard = path / "shard-00000.tfl"
    good = shard.read_bytes()
    raw = bytearray(good)
    raw[40] ^= 0x01  # inside the JSON header
    shard.write_bytes(bytes(raw))
    with pytest.raises(FeatureLogError, match="shard-00000.tfl: corrupt header: CRC-32 mismatch"):
        FeatureLog(path)
    shard.write_bytes(b"NOTALOG!" + good[8:])
    with pytest.raises(FeatureLogError, match="bad magic"):
        FeatureLog(path)
    shard.unlink()
    with pytest.raises(FeatureLogError, match="shard-00000.tfl: cannot open"):
        FeatureLog(path)


# ---------------------------------------------------------------------------------- writer

def test_writer_refuses_invalid_examples(tmp_path, examples):
    path = tmp_path / "log"
    with FeatureLogWriter(path, FEAT, SEL, examples_per_shard=16) as w:
        w.write(examples.select(slice(0, 10)))
        bad_labels = dataclasses.replace(examples.select(slice(10, 20)),
                                         labels=np.full((10, 3), 2, np.uint8))
        with pytest.raises(SchemaError) as e:
            w.write(bad_labels)
        assert e.value.field == "labels"
        with pytest.raises(SchemaError) as e:
            w.write(dataclasses.replace(examples.select(slice(10, 20)),
                                        dense=examples.dense[10:20].astype(np.float64)))
        assert e.value.field == "dense"
        nan = examples.dense[10:20].copy()
        nan[3, 1] = np.nan
        with pytest.raises(SchemaError, match="dense"):
            w.write(dataclasses.replace(examples.select(slice(10, 20)), dense=nan))
        other = SelectionConfig(max_ll_len=400, k_ll=64)  # examples from another selection config
        with pytest.raises(SchemaError):
            FeatureLogWriter(tmp_path / "other", FEAT, other).write(examples)
        with pytest.raises(SchemaError, match="examples"):
            w.write(examples.columns())
        w.write(examples.select(slice(20, 30)))
    log = FeatureLog(path, FEAT, SEL)
    assert_same(log.read(np.arange(20)),
                TrainingExamples.concatenate([examples.select(slice(0, 10)),
                                              examples.select(slice(20, 30))]))
    with pytest.raises(ValueError, match="examples_per_shard"):
        FeatureLogWriter(tmp_path / "x", FEAT, SEL, examples_per_shard=0)


def test_existing_log_is_not_overwritten_by_accident(tmp_path, examples):
    path = tmp_path / "log"
    write_feature_log(path, examples, FEAT, SEL, examples_per_shard=16)
    with pytest.raises(FileExistsError, match="manifest.json"):
        FeatureLogWriter(path, FEAT, SEL)
    log = write_feature_log(path, examples.select(slice(0, 5)), FEAT, SEL, overwrite=True)
    assert len(log) == 5 and sorted(os.listdir(path)) == ["manifest.json", "shard-00000.tfl"]
    assert sorted(os.listdir(tmp_path)) == ["log"]  # no staging or old directory left


def test_logged_requests_round_trip(tmp_path, requests, examples):
    """The writer stores examples only; NN selection runs before it (log_nn_features)."""
    with FeatureLogWriter(tmp_path / "log", FEAT, SEL, examples_per_shard=50) as w:
        w.write(log_nn_features(requests, FEAT, SEL))
        assert w.num_examples == len(examples)
    assert_same(FeatureLog(tmp_path / "log").read(np.arange(len(examples))), examples)


# ---------------------------------------------------------------------------------- crashes

def test_unclosed_writer_is_invisible(tmp_path, examples):
    path = tmp_path / "log"
    w = FeatureLogWriter(path, FEAT, SEL, examples_per_shard=16)
    w.write(examples)  # full shards reach the staging directory, but are never published ("crash")
    staged = os.listdir(w.staging_path)
    assert len([f for f in staged if f.endswith(".tfl")]) == len(examples) // 16
    assert "manifest.json" not in staged
    assert os.path.dirname(w.staging_path) == str(tmp_path) and not path.exists()
    with pytest.raises(FeatureLogError, match="manifest.json: missing"):
        FeatureLog(path)
    w.finish()  # the manifest is written, but the log is still not at ``path``
    with pytest.raises(FeatureLogError, match="manifest.json: missing"):
        FeatureLog(path)
    w.publish()
    assert len(FeatureLog(path)) == len(examples) and not os.path.exists(w.staging_path)


def test_crash_while_writing_leaves_the_old_log(tmp_path, examples, monkeypatch):
    path = tmp_path / "log"
    write_feature_log(path, examples.select(slice(0, 20)), FEAT, SEL, examples_per_shard=16)
    before = {f: (path / f).read_bytes() for f in os.listdir(path)}
    real_write = fl_format._write_file
    calls = []

    def dying_write(file, chunks):  # the process "dies" while writing the 2nd shard
        calls.append(file)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real_write(file, chunks)

    monkeypatch.setattr(fl_writer, "_write_file", dying_write)
    w = FeatureLogWriter(path, FEAT, SEL, examples_per_shard=16, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        w.write(examples)
    assert {f: (path / f).read_bytes() for f in os.listdir(path)} == before
    assert_same(FeatureLog(path, verify="full").read(np.arange(20)), examples.select(slice(0, 20)))


def test_leftovers_beside_a_good_log_are_ignored(tmp_path, examples):
    path = tmp_path / "log"
    write_feature_log(path, examples, FEAT, SEL, examples_per_shard=32)
    (path / ".shard-00003.tfl.abc123.tmp").write_bytes(b"TJXFLOG\x00half-written")
    (path / "shard-00099.tfl").write_bytes(b"garbage")
    log = FeatureLog(path, verify="full")
    assert len(log) == len(examples) and log.num_shards == -(-len(examples) // 32)
    assert_same(log.read(np.arange(len(examples))), examples)


def test_exception_inside_with_aborts(tmp_path, examples):
    path = tmp_path / "log"
    with pytest.raises(RuntimeError, match="boom"):
        with FeatureLogWriter(path, FEAT, SEL, examples_per_shard=16) as w:
            w.write(examples)
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []  # neither the log nor the staging directory


def test_empty_log(tmp_path):
    with FeatureLogWriter(tmp_path / "log", FEAT, SEL):
        pass
    log = FeatureLog(tmp_path / "log", FEAT, SEL, verify="full")
    assert len(log) == 0 and log.num_shards == 0 and log.bytes_per_example() == 0.0
    assert len(log.read([])) == 0
