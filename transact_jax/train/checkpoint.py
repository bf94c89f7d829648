"""Orbax checkpoints of the train state plus the input pipeline's position (SPEC §5, §9).

A checkpoint holds the :class:`~transact_jax.train.state.TrainState` (parameters, optimizer state,
step, PRNG key), the grain iterator state (JSON) and the experiment config (JSON). Resuming restores
all three, so a killed run continues exactly where the last checkpoint left it: it loses at most the
steps since that checkpoint, and ends with the same parameters as an uninterrupted run.
A checkpoint written under another config is refused with an error naming the differing field.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp

from transact_jax.train.config import ExperimentConfig
from transact_jax.train.state import TrainState

# Fields that may differ between the run that wrote a checkpoint and the one resuming it (the
# encoder implementation computes the same function of the same parameters: train with "xla",
# serve with "skut").
_RESUMABLE_DIFFERENCES = {"train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
                          "train.keep_checkpoints", "train.prefetch", "train.loader_threads",
                          "model.encoder_impl"}


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def check_compatible(saved: Dict[str, Any], cfg: ExperimentConfig) -> None:
    """Raise ValueError naming the first config field that differs from the checkpoint's."""
    mine = _flatten(cfg.to_dict())
    theirs = _flatten(saved)
    for key in sorted(set(mine) | set(theirs)):
        if key in _RESUMABLE_DIFFERENCES or key == "name":
            continue
        a, b = theirs.get(key), mine.get(key)
        if isinstance(a, list):
            a = tuple(a)
        if isinstance(b, list):
            b = tuple(b)
        if a != b:
            raise ValueError(f"checkpoint config mismatch: {key} is {a!r} in the checkpoint, "
                             f"{b!r} in this run")


class Checkpointer:
    """Thin wrapper over ``orbax.checkpoint.CheckpointManager`` for train state + data position."""

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

    def restore(self, template: TrainState, cfg: ExperimentConfig,
                step: Optional[int] = None) -> Tuple[TrainState, Dict[str, Any]]:
        """Restore ``step`` (default: latest) into the structure of ``template``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        saved_cfg = self.manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore()))["config"]
        check_compatible(saved_cfg, cfg)
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        return out["state"], out["data"]

    def clear(self) -> None:
        """Delete every checkpoint in the directory (a run that starts over)."""
        for step in self.manager.all_steps():
            self.manager.delete(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
