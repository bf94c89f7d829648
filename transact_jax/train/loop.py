"""The training loop and evaluation over example sources (feature logs or any ``ExampleSource``).

``train(cfg, train_log, workdir=..., eval_log=...)`` runs ``cfg.train.steps`` jitted steps over the
grain pipeline, with a progress bar (loss, examples/s), JSON-lines metrics (``metrics.jsonl``),
periodic and final orbax checkpoints (``checkpoints/``) and resume from the latest checkpoint.
``evaluate(...)`` computes HIT@K, AUC and NE per head over a whole log.

``metrics.jsonl`` holds one JSON object per line: ``{"type": "train", "step", "loss", "loss_ce",
"grad_norm", "examples_per_second"}`` (plus ``"loss_nal", "nal_accuracy", "nal_pairs"`` when the Next
Action Loss is on) every ``log_every`` steps and at the last step, and ``{"type": "eval", "step", ...}``
with the keys of :func:`evaluate` (``hit@K/<head>``, ``auc/<head>``, ``ne/<head>``, ``num_users``,
``num_chunks``, ``num_examples``). A run from step 0 rewrites the file; a resumed run keeps the
records up to the step it resumes from (a killed run may have logged steps after its last
checkpoint: they run again and are logged once) and appends, so every step appears once.

Non-finite values: the train step returns an on-device flag (loss and gradient norm finite); the
loop keeps the flags of the steps since its last check and reads them at every logged step, before
every evaluation and before every checkpoint. A NaN or an infinity therefore stops the run with a
FloatingPointError naming the first bad step at most ``log_every - 1`` steps after it happened
(sooner if an evaluation or a checkpoint comes first), without a host sync on the other steps, and
is never written into a checkpoint (:meth:`Checkpointer.save` also refuses non-finite parameters).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import warnings
from typing import Any, Callable, Dict, Optional

import jax
import numpy as np
from tqdm.auto import tqdm

from transact_jax.data.pipeline import make_loader
from transact_jax.data.schema import TrainingExamples
from transact_jax.data.source import ExampleSource
from transact_jax.eval.metrics import MetricAccumulator
from transact_jax.model.inputs import ModelInputs
from transact_jax.model.builder import ModelDef
from transact_jax.run.checkpoint import Checkpointer, CheckpointWarning
from transact_jax.run.config import ExperimentConfig
from transact_jax.run.state import TrainState, init_state
from transact_jax.train.early_stopping import EarlyStopping
from transact_jax.train.nal_check import resolve_nal_negatives
from transact_jax.train.objective import Targets
from transact_jax.train.step import (
    data_mesh,
    make_predict,
    make_train_step,
    replicate,
    shard_batch,
    to_local,
)


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns: final state, model definition, last metrics, eval metrics."""

    state: TrainState
    model_def: ModelDef
    metrics: Dict[str, float]
    eval_metrics: Optional[Dict[str, float]]
    examples_per_second: float  # steady state: logged intervals after the first (which compiles)
    config: Optional[ExperimentConfig] = None  # the config trained (after resolve_nal_negatives)
    best_step: Optional[int] = None            # early stopping (train.early_stopping_metric):
    best_params: Any = None                    # the best evaluation's step, parameters (host)
    best_eval_metrics: Optional[Dict[str, float]] = None   # and metrics


class _StopTraining(Exception):
    pass


class _FiniteGuard:
    """The on-device finite flags of the steps since the last check (module docstring)."""

    def __init__(self):
        self.pending = []   # (step, device metrics of that step)

    def add(self, step: int, metrics: Dict[str, jax.Array]) -> None:
        self.pending.append((step, metrics))

    def check(self, ckpt: Optional[Checkpointer]) -> None:
        """FloatingPointError naming the first pending step whose loss or gradient is not finite."""
        flags = jax.device_get([m["finite"] for _, m in self.pending])
        bad = next((i for i, ok in enumerate(flags) if not ok), None)
        if bad is None:
            self.pending.clear()
            return
        step, m = self.pending[bad]
        loss, grad_norm = (float(v) for v in jax.device_get((m["loss"], m["grad_norm"])))
        what = (f"non-finite loss ({loss})" if not math.isfinite(loss)
                else f"non-finite gradient (grad_norm {grad_norm})")
        latest = ckpt.latest_step() if ckpt is not None else None
        where = ("no checkpoint directory (workdir=None)" if ckpt is None else
                 f"no checkpoint written in {ckpt.directory}" if latest is None else
                 f"last finite checkpoint is step {latest}")
        raise FloatingPointError(f"step {step}: {what}; {where}")


def _source_name(source: ExampleSource) -> str:
    """A feature log's path, otherwise the source's repr."""
    return str(getattr(source, "path", None) or repr(source))


def _open_metrics(path: str, start: int):
    """``metrics.jsonl`` for a run starting at ``start`` (module docstring); returns the file, open
    for appending, and the steps of the evaluation records it keeps."""
    kept, eval_steps = [], set()
    if start and os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:   # a line cut short by a killed run
                    continue
                if isinstance(record, dict) and record.get("step", 0) <= start:
                    kept.append(line.rstrip("\n") + "\n")
                    if record.get("type") == "eval":
                        eval_steps.add(record["step"])
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
    return open(path, "a"), eval_steps


def _local_batch_size(global_batch: int) -> int:
    n_dev = jax.device_count()
    if global_batch % n_dev:
        raise ValueError(f"train.batch_size: {global_batch} is not divisible by the {n_dev} devices")
    return global_batch // jax.process_count()


def train(cfg: ExperimentConfig, train_log: ExampleSource, *, workdir: Optional[str] = None,
          eval_log: Optional[ExampleSource] = None, resume: bool = True, progress: bool = True,
          stop_after: Optional[int] = None,
          on_step: Optional[Callable[[int, Dict[str, float]], None]] = None) -> TrainResult:
    """Train ``cfg`` on ``train_log``, any random-access source of examples with the same feature
    and selection configs (a :class:`~transact_jax.data.feature_log.FeatureLog`, an in-memory
    :class:`~transact_jax.data.source.InMemoryExamples`, ...).

    Args:
      workdir: where ``metrics.jsonl`` and ``checkpoints/`` go (None: no files, no resume).
      eval_log: evaluated every ``train.eval_every`` steps and at the end.
      resume: continue from the latest checkpoint in ``workdir`` if there is one; False starts over
        and deletes the workdir's existing checkpoints.
      progress: show a tqdm progress bar.
      stop_after: stop (as if killed) once this step is reached, without a final checkpoint; for
        tests of crash recovery.
      on_step: called with (step, metrics) after every logged step.

    A non-finite loss or gradient raises FloatingPointError naming the step, at most
    ``train.log_every - 1`` steps after it (module docstring); no checkpoint of it is written.
    Resuming skips a corrupt latest checkpoint for the newest intact one, with a warning, and renames
    the corrupt one (:mod:`transact_jax.run.checkpoint`).
    """
    for name, log in (("train_log", train_log), ("eval_log", eval_log)):
        if log is not None and len(log) == 0:
            raise ValueError(f"{name}: {_source_name(log)} has no examples")
    if train_log.feat != cfg.feature or train_log.sel != cfg.selection:
        raise ValueError("train_log: written with other feature/selection configs than cfg")
    cfg = resolve_nal_negatives(cfg, train_log)
    tc = cfg.train
    stopper = None
    if tc.early_stopping_metric:
        if eval_log is None:
            raise ValueError("train.early_stopping_metric: needs an eval_log to evaluate on")
        stopper = EarlyStopping(tc.early_stopping_metric, tc.early_stopping_patience)
    mesh = data_mesh()
    mdef, state, opt = init_state(cfg)
    token_ages = "age" in cfg.model.token_features

    def to_device(batch: TrainingExamples):
        # runs in the loader's threads: conversion and host-to-device copy overlap with the step
        return (shard_batch(ModelInputs.from_examples(batch, token_ages), mesh),
                shard_batch(Targets.from_examples(batch), mesh))

    loader = make_loader(train_log, batch_size=_local_batch_size(tc.batch_size), seed=tc.seed,
                         num_epochs=None, shard_index=jax.process_index(),
                         shard_count=jax.process_count(), prefetch=tc.prefetch,
                         num_threads=tc.loader_threads, transform=to_device)
    it = iter(loader)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), tc.keep_checkpoints) if workdir else None
    if ckpt is not None and ckpt.latest_step() is not None:
        if resume:
            try:
                loaded = ckpt.load(expect=cfg)
                for step in loaded.skipped:   # this run writes those steps again
                    moved = ckpt.set_aside(step)
                    warnings.warn(f"resuming from checkpoint step {loaded.step}; the corrupt "
                                  f"checkpoint step {step} was moved to {moved}", CheckpointWarning)
            except Exception:
                ckpt.close()
                raise
            state = loaded.state
            it.set_state(_checked_data_state(loaded.data_state, train_log, loaded.step))
        else:  # start over: the old run's checkpoints would shadow this run's (same step numbers)
            ckpt.clear()
    state = replicate(state, mesh)
    step_fn = make_train_step(mdef, cfg, opt, mesh)
    start = int(jax.device_get(state.step))
    metrics_file, logged_evals = None, set()
    if workdir and jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(cfg.to_json())
        metrics_file, logged_evals = _open_metrics(os.path.join(workdir, "metrics.jsonl"), start)

    bar = tqdm(total=tc.steps, initial=start, disable=not progress, desc=cfg.name, unit="step")
    last: Dict[str, float] = {}
    eval_metrics, eval_step, done = None, None, start
    t_log, n_log, t_all, n_all = time.perf_counter(), 0, 0.0, 0
    first_logged = False
    guard = _FiniteGuard()

    def run_eval(at: int) -> bool:
        nonlocal eval_metrics, eval_step
        guard.check(ckpt)
        t0 = time.perf_counter()
        if progress:
            tqdm.write(f"step {at}: evaluating on {len(eval_log)} examples...", file=sys.stderr)
        eval_metrics, eval_step = evaluate(cfg, mdef, state.params, eval_log), at
        if progress:
            tqdm.write(f"step {at}: evaluation done in {time.perf_counter() - t0:.1f} s",
                       file=sys.stderr)
        if at not in logged_evals:   # (a finished run resumed: its final evaluation is logged)
            _write(metrics_file, {"type": "eval", "step": at, **eval_metrics})
        return stopper is not None and stopper.update(at, eval_metrics, state.params)

    def save_checkpoint(force: bool = False) -> None:
        guard.check(ckpt)
        ckpt.save(state, {**it.get_state(), TRAINING_DATA_KEY: getattr(train_log, "log_id", None)},
                  cfg, force=force)

    try:
        for step in range(start, tc.steps):
            inputs, targets = next(it)
            state, m = step_fn(state, inputs, targets)
            n_log += tc.batch_size
            done = step + 1
            guard.add(done, m)
            if done % tc.log_every == 0 or done == tc.steps:
                guard.check(ckpt)
                last = {k: float(v) for k, v in jax.device_get(m).items() if k != "finite"}
                now = time.perf_counter()
                last.update(step=done, examples_per_second=n_log / (now - t_log))
                if first_logged:  # the first interval holds compilation: keep it out of the rate
                    t_all, n_all = t_all + now - t_log, n_all + n_log
                first_logged = True
                t_log, n_log = now, 0
                bar.set_postfix(loss=f"{last['loss']:.4f}", ex_s=f"{last['examples_per_second']:.0f}")
                _write(metrics_file, {"type": "train", **last})
                if on_step:
                    on_step(done, last)
                if ckpt is not None:
                    ckpt.seal(block=False)   # checksum a finished checkpoint as soon as possible
            bar.update(1)
            stop = False
            if eval_log is not None and tc.eval_every and done % tc.eval_every == 0 and done < tc.steps:
                stop = run_eval(done)
            if ckpt is not None and tc.checkpoint_every and done % tc.checkpoint_every == 0:
                save_checkpoint()
            if stop_after is not None and done >= stop_after:
                raise _StopTraining
            if stop:   # early stopping: patience used up
                break
        if ckpt is not None:
            save_checkpoint(force=True)
        if eval_log is not None and eval_step != done:
            run_eval(done)
    except _StopTraining:
        pass
    finally:
        bar.close()
        if ckpt is not None:
            ckpt.close()
        if metrics_file is not None:
            metrics_file.close()
    eps = n_all / t_all if t_all else 0.0
    best = (stopper.best_step, stopper.best_params, stopper.best_metrics) if stopper else (None,) * 3
    return TrainResult(state, mdef, last, eval_metrics, eps, cfg, *best)


TRAINING_DATA_KEY = "training_data_log_id"
"""Key of the training log's identity (``FeatureLog.log_id``) in a checkpoint's input position."""


def _checked_data_state(data_state: Dict[str, Any], train_log: ExampleSource, step: int) -> Dict[str, Any]:
    """The checkpoint's input position, after checking that ``train_log`` is the log it was saved
    on: a log regenerated at the same path has another identity, and resuming an input position
    in it would silently read other examples."""
    data_state = dict(data_state)
    saved = data_state.pop(TRAINING_DATA_KEY, None)
    current = getattr(train_log, "log_id", None)
    if saved and current and saved != current:
        raise ValueError(f"train_log: {getattr(train_log, 'path', train_log)!r} is not the log "
                         f"checkpoint step {step} was trained on (log_id {current}, checkpoint "
                         f"{saved}): it was rewritten since; train in a new workdir or with "
                         f"resume=False")
    return data_state


def _write(f, record: Dict[str, Any]) -> None:
    if f is not None:
        f.write(json.dumps(record) + "\n")
        f.flush()


def predict_log(cfg: ExperimentConfig, mdef: ModelDef, params, log: ExampleSource,
                batch_size: int = 4096):
    """Yield ``(probs (n, H), examples)`` over ``log`` in stored order (last batch padded on device,
    trimmed on return). Runs on this process's devices: with several processes each one scores the
    whole log by itself (the parameters are replicated, so every process gets the same result)."""
    mesh = data_mesh(local=True)
    batch_size = max(batch_size - batch_size % jax.local_device_count(), jax.local_device_count())
    predict = make_predict(mdef, mesh)
    params = replicate(to_local(params), mesh)
    for start in range(0, len(log), batch_size):
        ex = log.read(np.arange(start, min(start + batch_size, len(log))))
        n = len(ex)
        padded = ex if n == batch_size else ex.select(np.concatenate(
            [np.arange(n), np.zeros(batch_size - n, np.int64)]))
        probs = np.asarray(jax.device_get(predict(params, shard_batch(
            ModelInputs.from_examples(padded, "age" in cfg.model.token_features), mesh))))[:n]
        yield probs, ex


def evaluate(cfg: ExperimentConfig, mdef: ModelDef, params, log: ExampleSource, ks=(3,),
             batch_size: int = 4096) -> Dict[str, float]:
    """HIT@K / AUC / NE per head over a whole example source (paper §4.2.1)."""
    acc = MetricAccumulator(cfg.feature.heads, cfg.train.ranking_weights, ks=ks, ties="average")
    for probs, ex in predict_log(cfg, mdef, params, log, batch_size):
        acc.add(probs, ex.labels, ex.user_id, ex.request_id)
    return {k: float(v) for k, v in acc.result().items()}
