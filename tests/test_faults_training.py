"""Faults in configs, training and checkpoints, injected for real: ill-typed and non-finite
hyper-parameters, a NaN in the middle of a run, an empty log, and checkpoints with truncated
metadata, a flipped byte of array data or deleted files.

Tiny Wide&Deep runs on an in-memory source; one uninterrupted run (fixture ``run``) is shared and
JAX's persistent compilation cache (in a temporary directory, for this module only) lets later runs
of the same program skip the compiler.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import persistent_compile_cache, random_requests
from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.config_json import ConfigError
from transact_jax.data.features import log_nn_features
from transact_jax.data.source import InMemoryExamples
from transact_jax.model.config import ModelConfig
from transact_jax.run.checkpoint import (
    CHECKSUM_FILE,
    Checkpointer,
    CheckpointCorruptError,
    CheckpointWarning,
    load_run,
)
from transact_jax.run.config import ExperimentConfig, TrainConfig
from transact_jax.run.presets import preset
from transact_jax.run.state import all_finite, init_state
from transact_jax.serving.ranker import Ranker
from transact_jax.train import loop

FEAT = FeatureConfig()
SEL = SelectionConfig(k_ll=4, r=4, k_rt=2, k_imp=2, num_nal_negatives=2, max_ll_len=40,
                      max_rt_len=10, max_imp_len=10)
STEPS, CKPT_EVERY = 12, 5            # checkpoints at steps 5, 10 and 12 (the final one)
CFG = preset("wide_deep", ExperimentConfig(
    selection=SEL, model=ModelConfig(mlp_dims=(16,), cat_embed_dim=4, num_cross_layers=1),
    train=TrainConfig(batch_size=16, steps=STEPS, warmup_steps=2, log_every=1,
                      checkpoint_every=CKPT_EVERY, keep_checkpoints=3)))
NAN = float("nan")


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    with persistent_compile_cache(str(tmp_path_factory.mktemp("jax_cache"))):
        yield


@pytest.fixture(scope="module")
def source() -> InMemoryExamples:
    rng = np.random.default_rng(0)
    u = 12
    req = random_requests(rng, rng.integers(0, 40, u), rng.integers(4, 10, u), rng.integers(0, 10, u),
                          np.full(u, 4), FEAT)
    return InMemoryExamples(log_nn_features(req, FEAT, SEL), FEAT, SEL)


@pytest.fixture(scope="module")
def run(source, tmp_path_factory):
    """An uninterrupted run with a workdir: checkpoints at 5, 10 and 12."""
    workdir = str(tmp_path_factory.mktemp("run"))
    result = loop.train(CFG, source, workdir=workdir, progress=False)
    return workdir, result


def leaves(params):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(params))]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def copy_run(run, tmp_path) -> str:
    workdir = str(tmp_path / "copy")
    shutil.copytree(run[0], workdir)
    return workdir


def step_dir(workdir: str, step: int) -> str:
    return os.path.join(workdir, "checkpoints", str(step))


def array_file(workdir: str, step: int) -> str:
    """The largest array data file orbax wrote for the state of checkpoint ``step``."""
    state = os.path.join(step_dir(workdir, step), "state")
    files = [os.path.join(r, f) for r, _, fs in os.walk(state) for f in fs if os.sep + "d" + os.sep
             in os.path.join(r, f)]
    return max(files, key=os.path.getsize)


def truncate_metadata(workdir: str, step: int) -> str:
    path = os.path.join(step_dir(workdir, step), "state", "_METADATA")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return path


def flip_byte(path: str, offset: int = 1000) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


# ------------------------------------------------------------------- 1. hyper-parameter checks


@pytest.mark.parametrize("make,message", [
    (lambda: TrainConfig(learning_rate=NAN), "learning_rate: must be a finite number > 0, got nan"),
    (lambda: TrainConfig(learning_rate=float("inf")), "learning_rate: must be a finite number > 0"),
    (lambda: TrainConfig(clip_norm=NAN), "clip_norm: must be a finite number > 0, got nan"),
    (lambda: TrainConfig(w_nal=NAN), "w_nal: must be a finite number >= 0, got nan"),
    (lambda: TrainConfig(warmup_steps=-1), "warmup_steps: must be an int >= 0, got -1"),
    (lambda: TrainConfig(checkpoint_every=-1), "checkpoint_every: must be an int >= 0, got -1"),
    (lambda: TrainConfig(log_every=0), "log_every: must be an int >= 1, got 0"),
    (lambda: TrainConfig(batch_size=1.5), "batch_size: expected an int, got 1.5"),
    (lambda: TrainConfig(steps=True), "steps: expected an int, got True"),
    (lambda: TrainConfig(head_loss_weights=(1.0, NAN, 1.0)), "head_loss_weights[1]: must be a finite"),
    (lambda: TrainConfig(end_lr_fraction=2.0), "end_lr_fraction: must be a finite number in [0, 1]"),
    (lambda: ModelConfig(dropout=NAN), "dropout: must be a finite number in [0, 1), got nan"),
    (lambda: ModelConfig(num_heads=0), "num_heads: must be an int >= 1, got 0"),
    (lambda: ModelConfig(mlp_dims=(16, 0)), "mlp_dims[1]: must be an int >= 1, got 0"),
    (lambda: SelectionConfig(k_ll=2.0), "k_ll: expected an int, got 2.0"),
    (lambda: FeatureConfig(quant_scale=NAN), "quant_scale: must be a finite number > 0, got nan"),
    (lambda: FeatureConfig(embedding_dim=0), "embedding_dim: must be an int >= 1, got 0"),
    (lambda: dataclasses.replace(CFG, train=5), "train: expected a TrainConfig, got 5"),
])
def test_python_api_refuses_bad_values_naming_the_field(make, message):
    with pytest.raises(ConfigError) as e:
        make()
    assert str(e.value).startswith(message)


def test_json_config_errors_name_the_dotted_field(tmp_path):
    for data, message in [({"train": 5}, "train: expected an object, got 5"),
                          ({"train": {"steps": "100"}}, "train.steps: expected an int, got '100'"),
                          ({"train": {"learning_rate": NAN}},
                           "train.learning_rate: must be a finite number > 0, got nan"),
                          ({"model": {"wide": "yes"}}, "model.wide: expected a bool, got 'yes'")]:
        path = tmp_path / "exp.json"
        path.write_text(json.dumps(data))           # (NaN is written as the JSON extension NaN)
        with pytest.raises(ConfigError) as e:
            ExperimentConfig.from_json(str(path))
        assert str(e.value).startswith(message) and str(path) in str(e.value)


# ------------------------------------------------------------------------------- 2. training


def poisoned_at(bad_step: int):
    """``make_train_step`` whose step ``bad_step`` sees NaN dense features (on device, no sync)."""
    real = loop.make_train_step

    def make(mdef, cfg, opt, mesh=None):
        step = real(mdef, cfg, opt, mesh)

        def poisoned(state, inputs, targets):
            dense = jnp.where(state.step == bad_step - 1, jnp.nan, inputs.dense)
            return step(state, dataclasses.replace(inputs, dense=dense), targets)
        return poisoned
    return make


def test_nan_mid_interval_names_its_step_and_the_last_checkpoint(source, run, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "make_train_step", poisoned_at(7))
    cfg = dataclasses.replace(CFG, train=dataclasses.replace(CFG.train, log_every=4))
    workdir = str(tmp_path / "w")
    with pytest.raises(FloatingPointError,
                       match=r"^step 7: non-finite loss \(nan\); last finite checkpoint is step 5$"):
        loop.train(cfg, source, workdir=workdir, progress=False)   # detected at the log of step 8
    assert Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == 5
    assert all_finite(load_run(workdir).state)
    assert [r["step"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))] == [4]


def test_nan_is_caught_before_a_checkpoint_is_written(source, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "make_train_step", poisoned_at(3))
    cfg = dataclasses.replace(CFG, train=dataclasses.replace(CFG.train, log_every=100))
    workdir = str(tmp_path / "w")
    with pytest.raises(FloatingPointError, match=r"^step 3: non-finite loss \(nan\); no checkpoint"):
        loop.train(cfg, source, workdir=workdir, progress=False)   # detected before saving step 5
    assert Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() is None


def test_diverging_learning_rate_stops_the_run(source):
    cfg = dataclasses.replace(CFG, train=dataclasses.replace(
        CFG.train, learning_rate=1e30, warmup_steps=0, log_every=3, checkpoint_every=0))
    with pytest.raises(FloatingPointError, match=r"^step \d+: non-finite (loss|gradient)"):
        loop.train(cfg, source, progress=False)


def test_checkpointer_refuses_non_finite_state(tmp_path):
    _, state, _ = init_state(CFG)
    bad = dataclasses.replace(state, step=jnp.asarray(3, jnp.int32), params=jax.tree_util.tree_map(
        lambda x: x.at[(0,) * x.ndim].set(jnp.inf), state.params))
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    try:
        with pytest.raises(FloatingPointError, match="step 3: non-finite parameters"):
            ckpt.save(bad, {}, CFG)
        assert ckpt.latest_step() is None
    finally:
        ckpt.close()


def test_empty_log_is_refused_up_front(source):
    empty = InMemoryExamples(source.examples.select(np.zeros(0, np.int64)), FEAT, SEL)
    with pytest.raises(ValueError, match=r"^train_log: InMemoryExamples\(num_examples=0.*has no examples"):
        loop.train(CFG, empty, progress=False)

    class EmptyLog:   # a feature log is named by its path
        feat, sel, path = FEAT, SEL, "/data/logs/empty"

        def __len__(self):
            return 0

    with pytest.raises(ValueError, match="eval_log: /data/logs/empty has no examples"):
        loop.train(CFG, source, eval_log=EmptyLog(), progress=False)


# ---------------------------------------------------------------------------- 3. checkpoints


def test_every_checkpoint_carries_checksums(run):
    workdir, _ = run
    for step in (5, 10, STEPS):
        with open(os.path.join(step_dir(workdir, step), CHECKSUM_FILE)) as f:
            files = json.load(f)["files"]
        assert "state/_METADATA" in files and any("/d/" in name for name in files)


def test_truncated_metadata_falls_back_to_the_previous_checkpoint(run, tmp_path):
    workdir = copy_run(run, tmp_path)
    bad = truncate_metadata(workdir, STEPS)
    with pytest.warns(CheckpointWarning, match=f"skipping corrupt checkpoint step {STEPS}: {bad}"):
        loaded = load_run(workdir)
    assert loaded.step == 10 and loaded.skipped == (STEPS,)
    with pytest.warns(CheckpointWarning, match=f"step {STEPS}"):
        ranker = Ranker.from_checkpoint(workdir)
    for x, y in zip(leaves(ranker.params), leaves(loaded.params)):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(CheckpointCorruptError, match=f"checkpoint step {STEPS}: {bad}: content differs"):
        load_run(workdir, step=STEPS)


def test_flipped_array_byte_is_detected(run, tmp_path):
    workdir = copy_run(run, tmp_path)
    path = array_file(workdir, STEPS)
    flip_byte(path)
    with pytest.raises(CheckpointCorruptError) as e:
        load_run(workdir, step=STEPS)
    assert e.value.step == STEPS and e.value.path == path and "checksum mismatch" in str(e.value)
    with pytest.warns(CheckpointWarning, match=f"step {STEPS}"):
        assert load_run(workdir).step == 10


def test_deleted_files_and_no_intact_checkpoint(run, tmp_path):
    workdir = copy_run(run, tmp_path)
    os.remove(os.path.join(step_dir(workdir, STEPS), "data", "metadata"))
    with pytest.raises(CheckpointCorruptError, match=r"data/metadata: missing"):
        load_run(workdir, step=STEPS)
    os.remove(array_file(workdir, 10))
    truncate_metadata(workdir, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        with pytest.raises(CheckpointCorruptError) as e:
            load_run(workdir)
    directory = os.path.join(workdir, "checkpoints")
    assert e.value.path == directory and str(e.value).startswith(f"{directory}: no intact checkpoint")
    assert all(f"step {s}:" in str(e.value) for s in (5, 10, STEPS))


def test_checkpoint_without_checksums_is_still_guarded(run, tmp_path):
    """A checkpoint from before checksums: loaded unverified with a warning; if orbax cannot read
    it, it counts as corrupt like any other."""
    workdir = copy_run(run, tmp_path)
    os.remove(os.path.join(step_dir(workdir, STEPS), CHECKSUM_FILE))
    with pytest.warns(CheckpointWarning, match="unverified"):
        assert load_run(workdir).step == STEPS
    truncate_metadata(workdir, STEPS)
    with pytest.warns(CheckpointWarning) as record:
        assert load_run(workdir).step == 10
    assert [str(w.message).split(":")[0] for w in record] == [
        f"checkpoint step {STEPS} in {os.path.join(workdir, 'checkpoints')} has no {CHECKSUM_FILE} "
        "(written before checksums were kept, or its run stopped before sealing it)",
        f"skipping corrupt checkpoint step {STEPS}"]
    assert "unreadable (JSONDecodeError" in str(record[1].message)


def test_resume_skips_corrupt_checkpoints_and_logs_each_step_once(run, source, tmp_path, capsys):
    """Checkpoints 10 and 12 damaged: the run resumes from 5, sets the damaged ones aside, ends
    with the parameters of the uninterrupted run, and its metrics hold every step once."""
    workdir = copy_run(run, tmp_path)
    truncate_metadata(workdir, STEPS)
    flip_byte(array_file(workdir, 10))
    with pytest.warns(CheckpointWarning) as record:
        result = loop.train(CFG, source, workdir=workdir, eval_log=source, progress=True)
    messages = "\n".join(str(w.message) for w in record)
    assert "skipping corrupt checkpoint step 12" in messages and "resuming from checkpoint step 5" in messages
    assert os.path.isdir(step_dir(workdir, 10) + ".corrupt")
    assert os.path.isdir(step_dir(workdir, STEPS) + ".corrupt")
    assert load_run(workdir).step == STEPS
    for x, y in zip(leaves(run[1].state.params), leaves(result.state.params)):
        np.testing.assert_array_equal(x, y)
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, STEPS + 1))
    assert [r["step"] for r in records if r["type"] == "eval"] == [STEPS]
    err = capsys.readouterr().err
    assert f"step {STEPS}: evaluating on {len(source)} examples..." in err
    assert f"step {STEPS}: evaluation done in" in err


def test_killed_run_logs_each_step_once(source, tmp_path):
    workdir = str(tmp_path / "w")
    loop.train(CFG, source, workdir=workdir, progress=False, stop_after=8)   # last checkpoint: 5
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"type": "train", "st')                                    # a line cut short
    loop.train(CFG, source, workdir=workdir, progress=False)
    steps = [r["step"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))]
    assert steps == list(range(1, STEPS + 1))


def test_resume_on_a_rewritten_log_is_refused(source, tmp_path):
    """A checkpoint records the identity of the feature log it trained on: resuming after the log
    was rewritten at the same path (other examples) is a named error, not a silent mix."""
    from transact_jax.data.feature_log import FeatureLog, write_feature_log
    path = str(tmp_path / "log")
    write_feature_log(path, source.read(np.arange(len(source))), FEAT, SEL)
    workdir = str(tmp_path / "run")
    short = dataclasses.replace(CFG, train=dataclasses.replace(CFG.train, steps=CKPT_EVERY))
    loop.train(short, FeatureLog(path), workdir=workdir, progress=False)
    loop.train(dataclasses.replace(short, train=dataclasses.replace(short.train, steps=CKPT_EVERY + 1)),
               FeatureLog(path), workdir=workdir, progress=False)       # same log: resumes
    write_feature_log(path, source.read(np.arange(len(source))[::-1]), FEAT, SEL, overwrite=True)
    with pytest.raises(ValueError, match="is not the log checkpoint step 6 was trained on"):
        loop.train(CFG, FeatureLog(path), workdir=workdir, progress=False)
