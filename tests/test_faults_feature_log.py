"""Real faults against the feature log (transact_jax.data.feature_log) and what reads it: writers
killed with SIGKILL mid-way, flipped bytes, shards from another log, truncated files, old formats,
the umask, empty logs, and the guards of write_synthetic_logs."""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.helpers import random_requests
from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data.feature_log import FeatureLog, FeatureLogError, FeatureLogWriter, write_feature_log
from transact_jax.data.features import log_nn_features
from transact_jax.data.generate import write_synthetic_logs
from transact_jax.data.pipeline import make_dataset, make_loader
from transact_jax.data.schema import TrainingExamples
from transact_jax.data.synthetic import SyntheticConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 4 action types, so that action bits 4..7 of the uint8 bitmask are out of domain
FEAT = FeatureConfig(action_names=("click", "repin", "closeup", "hide"),
                     positive_actions=("click", "repin", "closeup"), negative_actions=("hide",))
SEL = SelectionConfig(k_ll=8, r=8, k_rt=4, k_imp=4, num_nal_negatives=4, max_ll_len=300)
SYN = SyntheticConfig(num_items=2000, users_per_chunk=8)
PER_SHARD = 16


@pytest.fixture(scope="module")
def examples() -> TrainingExamples:
    rng = np.random.default_rng(11)
    u = 12
    req = random_requests(rng, rng.integers(0, 300, u), rng.integers(0, 60, u), rng.integers(0, 60, u),
                          rng.integers(4, 8, u), feat=FEAT)
    ex = log_nn_features(req, FEAT, SEL)
    assert len(ex) >= 3 * PER_SHARD
    return ex


def write(path, examples) -> FeatureLog:
    return write_feature_log(path, examples, FEAT, SEL, examples_per_shard=PER_SHARD)


def snapshot(path) -> dict:
    """Every file of a directory and its bytes."""
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


def assert_same(got: TrainingExamples, want: TrainingExamples) -> None:
    for name, col in want.columns().items():
        np.testing.assert_array_equal(got.columns()[name], col, err_msg=name)


def column(shard, name) -> dict:
    """The header entry (offset, nbytes, dtype, shape) of column ``name`` of a shard file."""
    raw = shard.read_bytes()
    hlen = struct.unpack("<I", raw[12:16])[0]
    return {c["name"]: c for c in json.loads(raw[24:24 + hlen])["columns"]}[name]


def overwrite_bytes(path, offset, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def spawn(code: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def kill_when(proc: subprocess.Popen, line_starts: str) -> None:
    """SIGKILL ``proc`` as soon as it prints a line starting with ``line_starts``."""
    for line in proc.stdout:
        if line.startswith(line_starts):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()


def siblings(path, tag) -> list:
    return [n for n in os.listdir(path.parent) if n.startswith(f".{path.name}.{tag}-")]


# ---------------------------------------------------------------------------------- killed writers

def test_sigkill_mid_write_leaves_the_old_log(tmp_path, examples):
    """A writer replacing a log is killed (SIGKILL) after some shards: the old log is untouched and
    fully readable, and the next writer removes the dead writer's staging directory."""
    path = tmp_path / "log"
    write(path, examples)
    before = snapshot(path)
    proc = spawn(f"""
        import time
        from transact_jax.data.feature_log import FeatureLog, FeatureLogWriter
        old = FeatureLog({str(path)!r})
        ex = old.read(range(len(old)))
        with FeatureLogWriter({str(path)!r}, old.feat, old.sel, examples_per_shard={PER_SHARD},
                              overwrite=True) as w:
            for i in range(1000):           # about a minute: it is killed long before the end
                w.write(ex)
                print("wrote", i, flush=True)
                time.sleep(0.05)
    """)
    kill_when(proc, "wrote 3")
    assert snapshot(path) == before
    log = FeatureLog(path, FEAT, SEL, verify="full")
    assert_same(log.read(np.arange(len(examples))), examples)
    [stale] = siblings(path, "tmp")
    assert len(os.listdir(path.parent / stale)) >= 4 * (len(examples) // PER_SHARD)  # shards, no manifest
    assert "manifest.json" not in os.listdir(path.parent / stale)
    w = FeatureLogWriter(path, FEAT, SEL, overwrite=True)  # tidies the dead writer's directory
    assert siblings(path, "tmp") == [os.path.basename(w.staging_path)]
    w.abort()
    assert sorted(os.listdir(tmp_path)) == ["log"] and snapshot(path) == before


def test_sigkill_between_the_renames_is_rolled_back(tmp_path, examples):
    """Killed inside the one window of the swap (old log moved aside, new one not yet in): readers
    are told where the old log is, and the next writer puts it back."""
    path = tmp_path / "log"
    write(path, examples)
    before = snapshot(path)
    proc = spawn(f"""
        import os, signal
        from transact_jax.data.feature_log import FeatureLog, write_feature_log
        old = FeatureLog({str(path)!r})
        real_rename = os.rename

        def rename(src, dst):
            if os.path.basename(src).startswith(".log.tmp-") and not os.path.lexists(dst):
                print("in the window", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            real_rename(src, dst)

        os.rename = rename
        write_feature_log({str(path)!r}, old.read([0, 1]), old.feat, old.sel, overwrite=True)
    """)
    kill_when(proc, "in the window")
    assert not path.exists()
    [retired] = siblings(path, "old")
    with pytest.raises(FeatureLogError, match=f"manifest.json: missing: .* the old log is in .*{retired}"):
        FeatureLog(path)
    with pytest.raises(FileExistsError, match="already exists"):  # restored, then not overwritten
        FeatureLogWriter(path, FEAT, SEL)
    assert snapshot(path) == before and siblings(path, "old") == [] and siblings(path, "tmp") == []
    assert_same(FeatureLog(path, verify="full").read(np.arange(len(examples))), examples)


def test_killed_generate_keeps_the_old_train_and_eval_logs(tmp_path, capsys):
    """write_synthetic_logs (``python -m transact_jax generate``) killed while writing the eval split,
    after the new train split is complete: the old train and eval logs are both still there."""
    out = tmp_path / "data"
    old_train, old_eval = write_synthetic_logs(str(out), FEAT, SEL, SYN, 16, 8, progress=True)
    assert "generated 16 / 16 train users" in capsys.readouterr().err
    before = {split: snapshot(out / split) for split in ("train", "eval")}
    proc = spawn(f"""
        import time
        from transact_jax.data.feature_log import FeatureLog
        from transact_jax.data.generate import write_synthetic_logs
        from transact_jax.data.synthetic import SyntheticConfig
        old = FeatureLog({str(out / "train")!r})
        syn = SyntheticConfig(num_items={SYN.num_items}, users_per_chunk={SYN.users_per_chunk}, seed=5)

        def progress(split, done, total, examples):
            print(split, done, total, flush=True)
            time.sleep(0.2)

        write_synthetic_logs({str(out)!r}, old.feat, old.sel, syn, 16, 64, progress=progress)
    """)
    kill_when(proc, "eval 16 64")
    for split in ("train", "eval"):
        assert snapshot(out / split) == before[split], split
    assert len(FeatureLog(out / "train", verify="full")) == len(old_train)
    assert len(FeatureLog(out / "eval", verify="full")) == len(old_eval)


# ---------------------------------------------------------------------------------- corrupt bytes

def test_flipped_label_bytes_are_named(tmp_path, examples):
    """30 bytes of 0xFF in shard 1's labels: refused on the first read of that shard (default
    verify) or at open (full), naming the shard file and the column; never read as label 255."""
    path = tmp_path / "log"
    write(path, examples)
    shard = path / "shard-00001.tfl"
    overwrite_bytes(shard, column(shard, "labels")["offset"], b"\xff" * 30)
    log = FeatureLog(path)  # headers are intact
    assert_same(log.read([0, 40]), examples.select([0, 40]))
    with pytest.raises(FeatureLogError) as e:
        log.read([PER_SHARD + 3])
    assert e.value.field == str(shard) and "CRC-32 mismatch in column 'labels'" in str(e.value)
    with pytest.raises(FeatureLogError, match=r"shard-00001.tfl: corrupt data: .* column 'labels'"):
        FeatureLog(path, verify="full")
    with pytest.raises(FeatureLogError):  # every loader batch goes through read()
        list(make_loader(log, batch_size=8, prefetch=0, num_threads=0))


@pytest.mark.parametrize("name, bad, problem", [
    ("labels", b"\xff", "label 255 is not 0 or 1"),
    ("s_all.actions", b"\xf0", "action bits beyond the 4 configured"),
    ("s_all.surfaces", b"\xff\x7f", "surface id 32767 out of range"),
    ("categorical", b"\xff\xff\xff\xff", "id -1 out of range [0, 1000)"),
    ("dense", b"\xff\xff\xff\xff", "contains NaN/inf"),
    ("candidate_embedding", b"\x80", "int8 code -128"),
    ("nal_target_mask", b"\x02", "byte 2 is not a bool"),
])
def test_out_of_domain_values_are_refused_per_batch(tmp_path, examples, name, bad, problem):
    """A shard changed on disk after its CRCs were checked (a map of it is already open): the batch
    reader still refuses values no writer stores, naming the shard, the column and the example."""
    path = tmp_path / "log"
    write(path, examples)
    log = FeatureLog(path)
    log.read(np.arange(len(examples)))  # every shard verified and mapped
    shard = path / "shard-00002.tfl"
    overwrite_bytes(shard, column(shard, name)["offset"], bad)  # example 0 of shard 2
    assert_same(log.read([0, 20]), examples.select([0, 20]))
    with pytest.raises(FeatureLogError) as e:
        log.read([5, 2 * PER_SHARD, 7])
    assert e.value.field == str(shard)
    assert f"column '{name}" in str(e.value) and problem in str(e.value)
    assert f"example 0 of this shard, {2 * PER_SHARD} of the log" in str(e.value)
    FeatureLog(path, verify="none").read([2 * PER_SHARD])  # "none" checks nothing


def test_shard_from_another_log_is_refused(tmp_path, examples):
    """Same configs, same examples, same shard sizes: only the identity tells the shards apart."""
    a, b = tmp_path / "a", tmp_path / "b"
    write(a, examples)
    write(b, examples)
    assert (a / "shard-00001.tfl").stat().st_size == (b / "shard-00001.tfl").stat().st_size
    shutil.copyfile(b / "shard-00001.tfl", a / "shard-00001.tfl")
    for verify in ("header", "full"):
        with pytest.raises(FeatureLogError, match="shard-00001.tfl: belongs to another feature log"):
            FeatureLog(a, verify=verify)
    with pytest.raises(FeatureLogError, match="belongs to another feature log"):
        FeatureLog(a, verify="none").read([PER_SHARD])
    # a shard moved within its own log is refused too
    write(tmp_path / "c", examples)
    shutil.copyfile(tmp_path / "c" / "shard-00000.tfl", tmp_path / "c" / "shard-00001.tfl")
    with pytest.raises(FeatureLogError, match="shard-00001.tfl: is shard 0 of its log, the manifest "
                                              "lists it as shard 1"):
        FeatureLog(tmp_path / "c")


def test_log_replaced_while_open(tmp_path, examples):
    """A reader of the old log keeps its open maps; a shard it had not opened yet now belongs to the
    new log and is refused rather than mixed in."""
    path = tmp_path / "log"
    old = write(path, examples)
    assert_same(old.read([0]), examples.select([0]))
    write_feature_log(path, examples, FEAT, SEL, examples_per_shard=PER_SHARD, overwrite=True)
    assert_same(old.read([1]), examples.select([1]))  # shard 0 is mapped: the old inode
    with pytest.raises(FeatureLogError, match="shard-00001.tfl: is no longer the file checked when "
                                              "the log was opened: .*open it again"):
        old.read([PER_SHARD])  # its header was checked at open, in the old log
    old.close()  # drops the maps: shard 0 is mapped again from its name ...
    with pytest.raises(FeatureLogError, match="shard-00000.tfl: is no longer the file"):
        old.read([0])
    lazy = FeatureLog(path, verify="none")  # ... and a lazily opened shard is checked on first use
    write_feature_log(path, examples, FEAT, SEL, examples_per_shard=PER_SHARD, overwrite=True)
    with pytest.raises(FeatureLogError, match="belongs to another feature log .*open it again"):
        lazy.read([0])


def test_truncated_files(tmp_path, examples):
    path = tmp_path / "log"
    write(path, examples)
    shard = path / "shard-00001.tfl"
    size = shard.stat().st_size
    os.truncate(shard, size // 2)
    with pytest.raises(FeatureLogError, match=f"shard-00001.tfl: truncated: file has {size // 2} bytes"):
        FeatureLog(path)
    manifest = path / "manifest.json"
    text = manifest.read_bytes()
    manifest.write_bytes(text[:len(text) // 2])
    with pytest.raises(FeatureLogError, match="manifest.json: not valid JSON"):
        FeatureLog(path)
    manifest.write_bytes(b"")
    with pytest.raises(FeatureLogError, match="manifest.json: not valid JSON"):
        FeatureLog(path)


def test_old_format_version_says_regenerate(tmp_path, examples):
    path = tmp_path / "log"
    write(path, examples)
    manifest = json.loads((path / "manifest.json").read_text())
    v1 = {k: v for k, v in manifest.items() if k != "log_id"}
    v1.update(version=1, shards=[{k: v for k, v in s.items() if k != "crc32"} for s in manifest["shards"]])
    (path / "manifest.json").write_text(json.dumps(v1))
    with pytest.raises(FeatureLogError, match=r"manifest.json: format version 1, .* reads feature logs "
                                              r"of version 2 only: regenerate the log"):
        FeatureLog(path)
    (path / "manifest.json").write_text(json.dumps(manifest))
    overwrite_bytes(path / "shard-00002.tfl", 8, struct.pack("<I", 1))
    with pytest.raises(FeatureLogError, match="shard-00002.tfl: shard format version 1, .* regenerate"):
        FeatureLog(path)


# ---------------------------------------------------------------------------------- the writer

@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_files_respect_the_umask(tmp_path, examples, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        write(tmp_path / "log", examples)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "log").stat().st_mode) == dir_mode
    for name in os.listdir(tmp_path / "log"):
        assert stat.S_IMODE((tmp_path / "log" / name).stat().st_mode) == file_mode, name


def test_directory_with_other_files_is_not_replaced(tmp_path, examples):
    path = tmp_path / "log"
    write(path, examples)
    (path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt: not part of a feature log"):
        FeatureLogWriter(path, FEAT, SEL, overwrite=True)
    assert (path / "notes.txt").read_text() == "mine" and len(FeatureLog(path)) == len(examples)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        FeatureLogWriter(tmp_path / "file", FEAT, SEL, overwrite=True)


def test_empty_log_is_refused_by_the_loader(tmp_path):
    path = tmp_path / "empty"
    with FeatureLogWriter(path, FEAT, SEL):
        pass
    log = FeatureLog(path)
    assert len(log) == 0
    for build in (make_loader, make_dataset):
        with pytest.raises(ValueError, match=f"feature log {path} has 0 examples"):
            build(log, batch_size=4)


def test_loader_slice_without_examples_is_refused(tmp_path, examples):
    log = write(tmp_path / "log", examples.select(slice(0, 3)))
    with pytest.raises(ValueError, match="has 3 examples, which leaves 0 for process 3 of 4"):
        make_loader(log, batch_size=1, shard_index=3, shard_count=4, even_shards=False)


def test_write_synthetic_logs_refuses_no_users(tmp_path):
    for train, ev, problem in ((-5, 8, "train_users: must be a positive"),
                               (0, 8, "train_users: must be a positive"),
                               (8, -1, "eval_users: must be a non-negative")):
        with pytest.raises(ValueError, match=problem):
            write_synthetic_logs(str(tmp_path / "d"), FEAT, SEL, SYN, train, ev)
    assert not (tmp_path / "d").exists()
