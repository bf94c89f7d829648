"""Training loop, checkpoints, evaluation and CLI.

Every ``train()`` call jit-compiles its step (10-20 s on a 2-core CPU), so the module shares one
uninterrupted run (fixture ``run_a``) and one crashed + resumed run (``run_b``), and turns on JAX's
persistent compilation cache (in a temporary directory, for this module only): the crashed and the
resumed run compile the very same program as the uninterrupted one and load it from the cache.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from tests.helpers import persistent_compile_cache
from transact_jax.__main__ import main as cli
from transact_jax.config import SelectionConfig
from transact_jax.data.generate import write_synthetic_logs
from transact_jax.data.source import InMemoryExamples
from transact_jax.data.synthetic import SyntheticConfig
from transact_jax.model.config import ModelConfig
from transact_jax.run.presets import preset
from transact_jax.run.checkpoint import Checkpointer, check_compatible, load_run
from transact_jax.run.config import ExperimentConfig, TrainConfig
from transact_jax.train.loop import evaluate, train
from transact_jax.run.state import init_state

SEL = SelectionConfig(k_ll=8, r=8, k_rt=4, k_imp=4, num_nal_negatives=4, max_ll_len=500)
SYN = SyntheticConfig(num_items=3000, users_per_chunk=64)
STEPS, CKPT_EVERY, CRASH_AT = 30, 10, 15
CFG = preset("transact_v2", ExperimentConfig(
    selection=SEL, model=ModelConfig(mlp_dims=(32,), dropout=0.1),
    train=TrainConfig(batch_size=32, steps=STEPS, log_every=1, checkpoint_every=CKPT_EVERY,
                      warmup_steps=5, learning_rate=3e-3)))
TRAIN_KEYS = {"type", "step", "loss", "loss_ce", "grad_norm", "examples_per_second", "loss_nal",
              "nal_accuracy", "nal_pairs"}


# run A also evaluates every 10 steps (B does not): evaluation must not perturb training
CFG_A = dataclasses.replace(CFG, train=dataclasses.replace(CFG.train, eval_every=CKPT_EVERY))


def eval_keys(heads, ks=(3,)):
    return ({f"hit@{k}/{h}" for k in ks for h in heads} | {f"auc/{h}" for h in heads}
            | {f"ne/{h}" for h in heads} | {"num_users", "num_chunks", "num_examples"})


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    with persistent_compile_cache(str(tmp_path_factory.mktemp("jax_cache"))):
        yield


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return write_synthetic_logs(str(tmp_path_factory.mktemp("data")), CFG.feature, SEL, SYN, 64, 32)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def leaves(params):
    return jax.tree_util.tree_leaves_with_path(jax.device_get(params))


@pytest.fixture(scope="module")
def run_a(logs, tmp_path_factory):
    """Uninterrupted run (with evaluation every 10 steps and at the end)."""
    workdir = str(tmp_path_factory.mktemp("run_a"))
    steps = []
    result = train(CFG_A, logs[0], workdir=workdir, eval_log=logs[1], progress=False,
                   on_step=lambda s, m: steps.append((s, m)))
    return workdir, result, steps


@pytest.fixture(scope="module")
def run_b(logs, tmp_path_factory):
    """The same run killed after step CRASH_AT, then resumed from its last checkpoint."""
    workdir = str(tmp_path_factory.mktemp("run_b"))
    first, second = [], []
    train(CFG, logs[0], workdir=workdir, progress=False, stop_after=CRASH_AT,
          on_step=lambda s, m: first.append(s))
    latest = Checkpointer(os.path.join(workdir, "checkpoints")).latest_step()
    result = train(CFG, logs[0], workdir=workdir, progress=False,
                   on_step=lambda s, m: second.append((s, m)))
    return workdir, result, first, latest, second


# ------------------------------------------------------------------------------ (a) resume


def test_resume_equals_uninterrupted(run_a, run_b):
    _, a, a_steps = run_a
    workdir, b, first, latest, second = run_b
    assert first == list(range(1, CRASH_AT + 1))
    assert latest == CKPT_EVERY * (CRASH_AT // CKPT_EVERY)  # the crash lost the steps after it
    assert [s for s, _ in second] == list(range(latest + 1, STEPS + 1))  # resumed from that step
    assert int(jax.device_get(a.state.step)) == int(jax.device_get(b.state.step)) == STEPS
    la, lb = leaves(a.state.params), leaves(b.state.params)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    # optimizer state too, and the per-step losses after the resume point
    for x, y in zip(jax.tree_util.tree_leaves(jax.device_get(a.state.opt_state)),
                    jax.tree_util.tree_leaves(jax.device_get(b.state.opt_state))):
        np.testing.assert_array_equal(x, y)
    a_loss = {s: m["loss"] for s, m in a_steps}
    for s, m in second:
        assert m["loss"] == a_loss[s], s
    # the resumed run kept the crashed run's records up to its checkpoint and logged the steps it
    # ran again once: every step once
    train_steps = [r["step"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
                   if r["type"] == "train"]
    assert train_steps == list(range(1, STEPS + 1))


def test_any_example_source_trains_the_same(run_a, logs):
    """train() takes any ExampleSource: the same examples held in memory give the parameters and
    the evaluation of the run on the feature log."""
    _, a, _ = run_a
    in_memory = [InMemoryExamples(log.read(np.arange(len(log))), log.feat, log.sel) for log in logs]
    m = train(CFG_A, in_memory[0], eval_log=in_memory[1], progress=False)
    for (path, x), (_, y) in zip(leaves(a.state.params), leaves(m.state.params)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    assert m.eval_metrics == a.eval_metrics


def test_parameters_moved(run_a):
    _, a, _ = run_a
    mdef, init, _ = init_state(CFG)
    diffs = [np.abs(np.asarray(x) - np.asarray(y)).max()
             for (_, x), (_, y) in zip(leaves(init.params), leaves(a.state.params))]
    assert max(diffs) > 1e-3
    # the returned model definition does not hold (donated, hence deleted) parameter arrays
    repr(a)
    assert not any(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(a.model_def.template))
    out = a.model_def.bind(a.state.params)
    assert out.head.kernel[...].shape == a.state.params["head"]["kernel"].shape


def test_bf16_train_step_close_to_f32(logs):
    """The bf16 compute option trains: finite loss close to the f32 one, float32 parameters."""
    from transact_jax.model.inputs import ModelInputs
    from transact_jax.train.objective import Targets
    from transact_jax.train.step import data_mesh, make_train_step, shard_batch

    batch = logs[0].read(np.arange(CFG.train.batch_size))
    mesh = data_mesh()
    out = {}
    for dtype in ("float32", "bfloat16"):
        cfg = dataclasses.replace(CFG, model=dataclasses.replace(CFG.model, dtype=dtype))
        mdef, state, opt = init_state(cfg)
        step = make_train_step(mdef, cfg, opt, mesh)
        state, m = step(state, shard_batch(ModelInputs.from_examples(batch), mesh),
                        shard_batch(Targets.from_examples(batch), mesh))
        out[dtype] = (jax.device_get(m), jax.device_get(state.params))
    m32, p32 = out["float32"]
    m16, p16 = out["bfloat16"]
    assert np.isfinite(m16["loss"]) and np.isfinite(m16["grad_norm"])
    assert m16["loss"] == pytest.approx(m32["loss"], rel=0.02)
    assert m16["grad_norm"] == pytest.approx(m32["grad_norm"], rel=0.1)
    assert m16["loss"] != m32["loss"]
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(p16))


# --------------------------------------------------------------------------- (b) loss decreases


def test_loss_decreases(run_a):
    _, _, steps = run_a
    losses = np.array([m["loss"] for _, m in steps])
    assert len(losses) == STEPS and np.all(np.isfinite(losses))
    first, last = losses[:5].mean(), losses[-5:].mean()
    assert last < 0.8 * first, (first, last)


# ----------------------------------------------------------------------- (c) metrics and config


def test_metrics_jsonl_and_config_json(run_a):
    workdir, a, _ = run_a
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    train_recs = [r for r in records if r["type"] == "train"]
    eval_recs = [r for r in records if r["type"] == "eval"]
    assert len(train_recs) + len(eval_recs) == len(records)
    assert [r["step"] for r in train_recs] == list(range(1, STEPS + 1))
    for r in train_recs:
        assert set(r) == TRAIN_KEYS
        assert all(isinstance(r[k], (int, float)) and np.isfinite(r[k]) for k in TRAIN_KEYS - {"type"})
        assert r["examples_per_second"] > 0 and r["nal_pairs"] > 0 and 0 <= r["nal_accuracy"] <= 1
        assert abs(r["loss"] - (r["loss_ce"] + CFG.train.w_nal * r["loss_nal"])) < 1e-4
    assert train_recs[-1] == {"type": "train", **a.metrics}
    assert [r["step"] for r in eval_recs] == list(range(CKPT_EVERY, STEPS + 1, CKPT_EVERY))
    for r in eval_recs:
        assert set(r) == eval_keys(CFG.feature.heads) | {"type", "step"}
    assert eval_recs[0] != eval_recs[-1]
    assert ExperimentConfig.from_json(os.path.join(workdir, "config.json")) == CFG_A
    assert Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == STEPS


# ---------------------------------------------------------------------------- (d) compatibility


def test_restore_under_other_model_config_names_field(run_a):
    workdir, _, _ = run_a
    other = dataclasses.replace(CFG, model=dataclasses.replace(CFG.model, num_layers=1))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        with pytest.raises(ValueError, match=r"model\.num_layers"):
            ckpt.load(expect=other)
        # fields a resumed run may change (more steps, other logging) are accepted
        longer = dataclasses.replace(CFG, train=dataclasses.replace(CFG.train, steps=99, log_every=7))
        run = ckpt.load(expect=longer)
        assert int(run.state.step) == STEPS and isinstance(run.data_state, dict)
        assert run.step == STEPS and run.config == CFG_A
    finally:
        ckpt.close()
    # load_run: the same, by path (a workdir or its checkpoints/ directory)
    run = load_run(workdir)
    assert run.config == CFG_A and run.step == STEPS
    jax.tree_util.tree_map(np.testing.assert_array_equal, run.params,
                           load_run(os.path.join(workdir, "checkpoints"), step=STEPS).params)
    with pytest.raises(FileNotFoundError, match="path"):
        load_run(os.path.join(workdir, "nowhere"))


def test_check_compatible_names_field():
    saved = json.loads(CFG.to_json())
    check_compatible(saved, CFG)
    for cfg, field in [
        (dataclasses.replace(CFG, model=dataclasses.replace(CFG.model, mlp_dims=(64,))), "model.mlp_dims"),
        (dataclasses.replace(CFG, selection=dataclasses.replace(SEL, k_imp=5)), "selection.k_imp"),
        (dataclasses.replace(CFG, train=dataclasses.replace(CFG.train, learning_rate=1e-3)),
         "train.learning_rate"),
        (preset("transact_nal_imp", CFG), "model.segments"),
    ]:
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            check_compatible(saved, cfg)


def test_train_refuses_checkpoint_of_other_model(run_a, logs):
    workdir, _, _ = run_a
    other = dataclasses.replace(CFG, model=dataclasses.replace(CFG.model, ff_dim=16))
    with pytest.raises(ValueError, match=r"model\.ff_dim"):
        train(other, logs[0], workdir=workdir, progress=False)


# ----------------------------------------------------------------------------- (e) evaluation


def test_evaluate_keys_and_counts(run_a, logs):
    workdir, a, _ = run_a
    ev = logs[1]
    m = evaluate(CFG, a.model_def, a.state.params, ev, ks=(1, 3), batch_size=256)
    assert set(m) == eval_keys(CFG.feature.heads, ks=(1, 3))
    assert m["num_examples"] == len(ev)
    assert m["num_users"] == len(np.unique(ev.read_range(0, len(ev)).user_id))
    for h in CFG.feature.heads:
        assert 0.0 <= m[f"auc/{h}"] <= 1.0 and m[f"ne/{h}"] > 0
        assert 0.0 <= m[f"hit@1/{h}"] <= m[f"hit@3/{h}"]
    # the batch size of evaluation does not matter; it matches the end-of-training eval record
    logged = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["type"] == "eval"][-1]
    for k in eval_keys(CFG.feature.heads):
        assert m[k] == pytest.approx(logged[k], rel=1e-5, abs=1e-6), k
        assert a.eval_metrics[k] == logged[k]


# ------------------------------------------------------------------------------------- (f) CLI


def test_cli_generate_train_evaluate(tmp_path, capsys):
    cfg = preset("wide_deep", dataclasses.replace(CFG, train=dataclasses.replace(
        CFG.train, batch_size=16, steps=50, log_every=10, checkpoint_every=0)))
    cfg_path = tmp_path / "exp.json"
    cfg_path.write_text(cfg.to_json())
    data, workdir = str(tmp_path / "data"), str(tmp_path / "run")

    assert cli(["generate", "--out", data, "--train-users", "24", "--eval-users", "12",
                "--num-items", "2000", "--config", str(cfg_path)]) == 0
    assert "train and" in capsys.readouterr().out
    assert os.path.isdir(os.path.join(data, "train")) and os.path.isdir(os.path.join(data, "eval"))

    assert cli(["train", "--config", str(cfg_path), "--data", data, "--workdir", workdir,
                "--steps", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["train"]["step"] == 3 and np.isfinite(out["train"]["loss"])
    assert set(out["eval"]) == eval_keys(cfg.feature.heads)
    saved = ExperimentConfig.from_json(os.path.join(workdir, "config.json"))
    assert saved == dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=3))
    assert Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == 3

    assert cli(["evaluate", "--workdir", workdir, "--data", data]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert set(ev) == eval_keys(cfg.feature.heads)
    for k in ev:
        assert ev[k] == pytest.approx(out["eval"][k], rel=1e-5, abs=1e-6), k

    # --no-resume starts over in the same workdir: its checkpoint and metrics replace the old run's
    assert cli(["train", "--config", str(cfg_path), "--data", data, "--workdir", workdir,
                "--steps", "3", "--seed", "1", "--no-resume"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["train"]["loss"] != out["train"]["loss"]
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in records] == [3, 3] and records[0]["loss"] == again["train"]["loss"]
    assert cli(["evaluate", "--workdir", workdir, "--data", data]) == 0
    ev1 = json.loads(capsys.readouterr().out)
    for k in ev1:
        assert ev1[k] == pytest.approx(again["eval"][k], rel=1e-5, abs=1e-6), k
    assert ev1["auc/click"] != ev["auc/click"]

    assert cli(["presets"]) == 0
    listing = capsys.readouterr().out
    assert "transact_v2" in listing and "wide_deep" in listing


def test_cli_rejects_unknown_command():
    with pytest.raises(SystemExit):
        cli(["fly"])
