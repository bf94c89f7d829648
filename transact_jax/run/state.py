"""The state of a training run and its optimizer.

:class:`TrainState` is what a checkpoint holds besides the input position and the config: the
parameter dict, the optax optimizer state, the step and the PRNG key. It lives in the run layer
because serving reads checkpoints too (:func:`transact_jax.run.checkpoint.load_run` needs the
state's structure to restore it).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Tuple

import jax
import jax.numpy as jnp
import optax

from transact_jax.model.builder import ModelDef, Params, build_model
from transact_jax.run.config import ExperimentConfig, TrainConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """``params`` (nested dict), ``opt_state`` (optax), ``step`` (int32 scalar), ``key`` (PRNG key data)."""

    params: Params
    opt_state: Any
    step: jax.Array
    key: jax.Array


def _decay_mask(params: Params) -> Params:
    """Weight decay on weight matrices only (not biases, norms, embedding tables, E_pos)."""
    def mask(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        return x.ndim >= 2 and name in ("kernel", "w_qkv", "w_o", "w_1", "w_2", "w_act")
    return jax.tree_util.tree_map_with_path(mask, params)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warmup + cosine decay and global-norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.learning_rate, warmup_steps=min(tc.warmup_steps, tc.steps),
        decay_steps=max(tc.steps, tc.warmup_steps + 1), end_value=tc.learning_rate * tc.end_lr_fraction)
    return optax.chain(optax.clip_by_global_norm(tc.clip_norm),
                       optax.adamw(schedule, weight_decay=tc.weight_decay, mask=_decay_mask))


def init_state(cfg: ExperimentConfig) -> Tuple[ModelDef, TrainState, optax.GradientTransformation]:
    """Model definition, the initial train state and the optimizer."""
    mdef, params = build_model(cfg.feature, cfg.selection, cfg.model, cfg.train.seed)
    opt = make_optimizer(cfg.train)
    key = jax.random.key_data(jax.random.key(cfg.train.seed + 1))
    return mdef, TrainState(params, opt.init(params), jnp.zeros((), jnp.int32), key), opt


@jax.jit
def _finite_flags(tree) -> jax.Array:
    flags = [jnp.isfinite(x).all() for x in jax.tree_util.tree_leaves(tree)
             if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(flags).all() if flags else jnp.asarray(True)


def all_finite(tree: Any) -> bool:
    """Whether every floating-point value of ``tree`` (e.g. a TrainState) is finite (one jitted
    reduction on device, one scalar copied back)."""
    return bool(jax.device_get(_finite_flags(tree)))
