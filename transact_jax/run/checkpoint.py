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

Integrity: a checkpoint holding non-finite parameters or optimizer state is never written
(FloatingPointError). Once orbax has finished writing a step, its directory gets
:data:`CHECKSUM_FILE`, the BLAKE2b digest of every file in it, written atomically; a load verifies
the files first, so truncated metadata, a changed byte of array data or a deleted file raise
:class:`CheckpointCorruptError` naming the step and the file. Loading "the latest" checkpoint means
the newest intact one: a corrupt newer checkpoint is skipped with a :class:`CheckpointWarning`
saying which step and why (a resumed run also renames it to ``<step>.corrupt`` so that it can write
that step again); with none intact the error names the directory. A checkpoint without the checksum
file (written before checksums were kept, or by a run killed before its directory was sealed) is
loaded unverified, with a warning.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import jax
import orbax.checkpoint as ocp

from transact_jax.config_json import config_to_dict
from transact_jax.run.config import ExperimentConfig
from transact_jax.run.state import TrainState, all_finite, init_state

CHECKSUM_FILE = "checksums.json"
"""Written into each step directory once orbax has finished it: ``{"algorithm": "blake2b",
"files": {relative path: hex digest}}`` over every other file of the step."""

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


class CheckpointCorruptError(RuntimeError):
    """A checkpoint cannot be read back as it was written: ``path`` is the file (or directory) at
    fault, ``step`` the checkpoint's step (None: a whole directory without an intact checkpoint)."""

    def __init__(self, path: str, problem: str, step: Optional[int] = None):
        self.path, self.problem, self.step = path, problem, step
        where = f"checkpoint step {step}: " if step is not None else ""
        super().__init__(f"{where}{path}: {problem}")


class CheckpointWarning(UserWarning):
    """A corrupt checkpoint was skipped, or one without checksums was loaded unverified."""


def _file_digest(path: str) -> str:
    h = hashlib.blake2b()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _step_files(step_dir: str) -> List[str]:
    """Every file of a step directory but the checksum file, as sorted relative paths."""
    out = []
    for root, _, files in os.walk(step_dir):
        out += [os.path.relpath(os.path.join(root, f), step_dir) for f in files]
    return sorted(f for f in out if not f.startswith(CHECKSUM_FILE))


def write_checksums(step_dir: str) -> None:
    """Write :data:`CHECKSUM_FILE` for a finished step directory (atomically: a temporary file
    renamed into place)."""
    record = {"algorithm": "blake2b",
              "files": {f: _file_digest(os.path.join(step_dir, f)) for f in _step_files(step_dir)}}
    path = os.path.join(step_dir, CHECKSUM_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def verify_checksums(step_dir: str, step: Optional[int] = None) -> bool:
    """Check a step directory's files against its :data:`CHECKSUM_FILE`: False if it has none (an
    unverified checkpoint), True if every listed file is there with its digest, otherwise
    :class:`CheckpointCorruptError` naming the first missing or changed file."""
    path = os.path.join(step_dir, CHECKSUM_FILE)
    if not os.path.exists(path):
        return False
    try:
        with open(path) as f:
            files = json.load(f)["files"]
        expected = {str(name): str(digest) for name, digest in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointCorruptError(path, f"unreadable checksum file ({type(e).__name__}: {e})",
                                     step) from e
    for name, digest in expected.items():
        file = os.path.join(step_dir, name)
        if not os.path.isfile(file):
            raise CheckpointCorruptError(file, "missing (listed in the checksum file)", step)
        if _file_digest(file) != digest:
            raise CheckpointCorruptError(file, "content differs from when it was written "
                                               "(checksum mismatch)", step)
    return True


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    """A run read back from a checkpoint: its ``config`` (as stored), ``params`` (= ``state.params``),
    the whole ``state``, the input position ``data_state``, the checkpoint's ``step`` and the newer
    checkpoints ``skipped`` as corrupt on the way to it (newest first)."""

    config: ExperimentConfig
    state: TrainState
    data_state: Dict[str, Any]
    step: int
    skipped: Tuple[int, ...] = ()

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
    and config, with the integrity checks of the module docstring."""

    def __init__(self, directory: str, keep: int = 2):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
        self._unsealed: List[int] = []   # saved steps whose checksum file is not written yet

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, state: TrainState, data_state: Dict[str, Any], cfg: ExperimentConfig,
             force: bool = False) -> None:
        """Start writing ``state`` (asynchronously); FloatingPointError, and nothing written, if its
        parameters or optimizer state hold a NaN or an infinity."""
        step = int(jax.device_get(state.step))
        if self.latest_step() == step:
            return  # already saved (a periodic checkpoint at the final step)
        if not all_finite((state.params, state.opt_state)):
            raise FloatingPointError(f"step {step}: non-finite parameters or optimizer state; no "
                                     f"checkpoint written to {self.directory}")
        self.seal()   # orbax waits for the previous save before it starts this one anyway
        if self.manager.save(step, force=force, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(cfg.to_dict()))):
            self._unsealed.append(step)

    def seal(self, block: bool = True) -> None:
        """Write the checksum file of every finished save (``block``: wait for the one in flight;
        otherwise leave it for a later call)."""
        if not self._unsealed or (not block and self.manager.is_saving_in_progress()):
            return
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            for step in self._unsealed:
                if os.path.isdir(self.step_dir(step)):   # (not already deleted by max_to_keep)
                    write_checksums(self.step_dir(step))
        self._unsealed.clear()

    def _read(self, step: int, restore: Callable[[], Any]) -> Any:
        """``restore()``, with any failure of orbax to read step ``step`` as CheckpointCorruptError."""
        try:
            return restore()
        except Exception as e:  # orbax, tensorstore and json report damage with many types
            raise CheckpointCorruptError(self.step_dir(step), f"unreadable ({type(e).__name__}: "
                                                              f"{e})", step) from e

    def stored_config(self, step: int) -> ExperimentConfig:
        saved = self._read(step, lambda: self.manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore())))["config"]
        return ExperimentConfig.from_dict(saved)

    def _load_step(self, step: int, expect: Optional[ExperimentConfig]) -> LoadedRun:
        if step not in self.manager.all_steps():
            raise FileNotFoundError(f"step: no checkpoint of step {step} in {self.directory}")
        if not verify_checksums(self.step_dir(step), step):
            warnings.warn(f"checkpoint step {step} in {self.directory} has no {CHECKSUM_FILE} "
                          f"(written before checksums were kept, or its run stopped before sealing "
                          f"it): loading it unverified", CheckpointWarning, stacklevel=3)
        cfg = self.stored_config(step)
        if expect is not None:
            check_compatible(cfg, expect)
        abstract = _abstract_state(cfg)
        out = self._read(step, lambda: self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())))
        return LoadedRun(cfg, out["state"], out["data"], step)

    def load(self, step: Optional[int] = None,
             expect: Optional[ExperimentConfig] = None) -> LoadedRun:
        """Read and verify checkpoint ``step`` (default: the newest intact one; see the module
        docstring). With ``expect``, the stored config must be compatible with it
        (:func:`check_compatible`; a mismatch raises at once, it is not corruption)."""
        if step is not None:
            return self._load_step(step, expect)
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        problems: List[CheckpointCorruptError] = []
        for candidate in steps:
            try:
                run = self._load_step(candidate, expect)
            except CheckpointCorruptError as e:
                problems.append(e)
                warnings.warn(f"skipping corrupt checkpoint step {candidate}: {e.path}: {e.problem}",
                              CheckpointWarning, stacklevel=2)
                continue
            return dataclasses.replace(run, skipped=tuple(e.step for e in problems))
        raise CheckpointCorruptError(self.directory, "no intact checkpoint (" + "; ".join(
            f"step {e.step}: {e.path}: {e.problem}" for e in problems) + ")")

    def set_aside(self, step: int) -> str:
        """Rename checkpoint ``step`` to ``<step>.corrupt`` (``.corrupt-N`` if taken), out of orbax's
        sight, so that the step can be written again; returns the new path."""
        target, n = self.step_dir(step) + ".corrupt", 1
        while os.path.exists(target):
            target, n = f"{self.step_dir(step)}.corrupt-{n}", n + 1
        os.rename(self.step_dir(step), target)
        self.manager.reload()
        return target

    def clear(self) -> None:
        """Delete every checkpoint in the directory (a run that starts over)."""
        self.seal()
        for step in self.manager.all_steps():
            self.manager.delete(step)

    def wait(self) -> None:
        self.seal()

    def close(self) -> None:
        self.seal()
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
    defaults to the newest intact checkpoint (a corrupt newer one is skipped with a
    :class:`CheckpointWarning`; nothing is renamed or deleted). ``run.config, run.params`` are what
    scoring needs."""
    directory = checkpoint_dir(path)
    ckpt = Checkpointer(directory)
    try:
        if ckpt.latest_step() is None and step is None:
            raise FileNotFoundError(f"path: no checkpoint in {directory}")
        return ckpt.load(step, expect)
    finally:
        ckpt.close()
