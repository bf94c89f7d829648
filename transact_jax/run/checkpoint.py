"""Orbax checkpoints of a run, and :func:`load_run`, the one way a stored run is read back.

A checkpoint holds the :class:`~transact_jax.run.state.TrainState` (parameters, optimizer state,
step, PRNG key), the input pipeline's position (grain iterator state, JSON) and the
:class:`~transact_jax.run.config.ExperimentConfig` (JSON). The config stored with the checkpoint is
the source of truth when a run is loaded (a workdir's ``config.json`` is a copy for people).

Training resumes with :meth:`Checkpointer.load` (``expect=`` its own config: a checkpoint written
under another config is refused with an error naming the differing field, except for the fields in
:data:`RESUMABLE_DIFFERENCES`), and a killed run continues exactly where the last checkpoint left
it: it loses at most the steps since that checkpoint and ends with the same parameters as an
uninterrupted run. ``evaluate`` and ``Ranker.from_checkpoint`` call :func:`load_run` on a path.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Optional, Union

import jax
import orbax.checkpoint as ocp

from transact_jax.config_json import config_to_dict
from transact_jax.run.config import ExperimentConfig
from transact_jax.run.state import TrainState, init_state

RESUMABLE_DIFFERENCES = frozenset({
    "train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.prefetch", "train.loader_threads", "model.encoder_impl"})
"""Config fields that may differ between the run that wrote a checkpoint and the one loading it
(bookkeeping, and the encoder implementation, which computes the same function of the same
parameters: train with "xla", serve with "pallas_triton")."""


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def check_compatible(saved: Union[ExperimentConfig, Dict[str, Any]], cfg: ExperimentConfig) -> None:
    """Raise ValueError naming the first config field that differs from the checkpoint's
    (``saved``: the stored config or its dict form)."""
    if isinstance(saved, ExperimentConfig):
        saved = saved.to_dict()
    mine, theirs = _flatten(cfg.to_dict()), _flatten(config_to_dict(ExperimentConfig.from_dict(saved)))
    for key in sorted(set(mine) | set(theirs)):
        if key in RESUMABLE_DIFFERENCES or key == "name":
            continue
        if theirs.get(key) != mine.get(key):
            raise ValueError(f"checkpoint config mismatch: {key} is {theirs.get(key)!r} in the "
                             f"checkpoint, {mine.get(key)!r} in this run")


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    """A run read back from a checkpoint: its ``config`` (as stored), ``params`` (= ``state.params``),
    the whole ``state``, the input position ``data_state`` and the checkpoint's ``step``."""

    config: ExperimentConfig
    state: TrainState
    data_state: Dict[str, Any]
    step: int

    @property
    def params(self):
        return self.state.params


def _abstract_state(cfg: ExperimentConfig) -> TrainState:
    """Shapes, dtypes and placement of ``cfg``'s TrainState, without initializing anything (the
    restore target; a resumed run or a Ranker does not pay for a throw-away initialization)."""
    shapes = jax.eval_shape(lambda: init_state(cfg)[1])
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


class Checkpointer:
    """Thin wrapper over ``orbax.checkpoint.CheckpointManager`` for a run's state, input position
    and config."""

    def __init__(self, directory: str, keep: int = 2):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, state: TrainState, data_state: Dict[str, Any], cfg: ExperimentConfig,
             force: bool = False) -> None:
        step = int(jax.device_get(state.step))
        if self.latest_step() == step:
            return  # already saved (a periodic checkpoint at the final step)
        self.manager.save(step, force=force, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(cfg.to_dict())))

    def stored_config(self, step: int) -> ExperimentConfig:
        saved = self.manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore()))["config"]
        return ExperimentConfig.from_dict(saved)

    def load(self, step: Optional[int] = None,
             expect: Optional[ExperimentConfig] = None) -> LoadedRun:
        """Read checkpoint ``step`` (default: the latest). With ``expect``, the stored config must
        be compatible with it (:func:`check_compatible`)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        cfg = self.stored_config(step)
        if expect is not None:
            check_compatible(cfg, expect)
        abstract = _abstract_state(cfg)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        return LoadedRun(cfg, out["state"], out["data"], step)

    def clear(self) -> None:
        """Delete every checkpoint in the directory (a run that starts over)."""
        for step in self.manager.all_steps():
            self.manager.delete(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def checkpoint_dir(path: str) -> str:
    """The checkpoint directory of ``path``: a training workdir (holding ``checkpoints/``) or the
    checkpoint directory itself."""
    directory = os.path.join(path, "checkpoints")
    if not os.path.isdir(directory):
        directory = path
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"path: no checkpoint directory at {path}")
    return directory


def load_run(path: str, *, step: Optional[int] = None,
             expect: Optional[ExperimentConfig] = None) -> LoadedRun:
    """Load a stored run: ``path`` is a training workdir or its ``checkpoints/`` directory, ``step``
    defaults to the latest checkpoint. ``run.config, run.params`` are what scoring needs."""
    directory = checkpoint_dir(path)
    ckpt = Checkpointer(directory)
    try:
        if ckpt.latest_step() is None and step is None:
            raise FileNotFoundError(f"path: no checkpoint in {directory}")
        return ckpt.load(step, expect)
    finally:
        ckpt.close()
