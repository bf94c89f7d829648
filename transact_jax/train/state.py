"""Train state, optimizer, the jitted train step and data-parallel sharding (SPEC §5).

The NNX model is split once into a static ``graphdef`` and a parameter pytree (a plain nested dict,
which optax, orbax and ``jax.sharding`` handle directly); the train step is a pure function of
``(TrainState, ModelInputs, Targets)``, jitted with the state donated.

Data parallelism: a 1-D ``Mesh`` over every device of every process (axis ``"data"``); the batch is
sharded along its first axis, the state replicated. XLA inserts the gradient all-reduce. On several
hosts, call :func:`initialize_distributed` first; each process feeds its own slice of the batch
(``jax.make_array_from_process_local_data``).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from transact_jax.model.inputs import ModelInputs
from transact_jax.model.ranking import ModelOutput, RankingModel
from transact_jax.train.config import ExperimentConfig, TrainConfig
from transact_jax.train.objective import Targets, objective

Params = Dict[str, Any]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """``params`` (nested dict), ``opt_state`` (optax), ``step`` (int32 scalar), ``key`` (PRNG key data)."""

    params: Params
    opt_state: Any
    step: jax.Array
    key: jax.Array


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """The static half of an NNX model: ``graphdef`` plus a state template (shapes and dtypes,
    no arrays) to rebuild it."""

    graphdef: Any
    template: Any

    def bind(self, params: Params) -> RankingModel:
        """The model with ``params`` (works inside jit)."""
        state = jax.tree_util.tree_map(lambda v: v, self.template)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)


def model_def(cfg: ExperimentConfig) -> ModelDef:
    """The model's static definition (shapes only, no parameters are initialized)."""
    # Shapes only: the template must not alias the parameters, which the train step donates.
    graphdef, template = nnx.split(nnx.eval_shape(
        lambda: RankingModel(cfg.feature, cfg.selection, cfg.model, rngs=nnx.Rngs(0))))
    return ModelDef(graphdef, template)


def build_model(cfg: ExperimentConfig, seed: int) -> Tuple[ModelDef, Params]:
    """Initialize the model; returns its static definition and the parameter dict."""
    init = _initializer(cfg.feature, cfg.selection, cfg.model)
    return model_def(cfg), init(jax.random.key(seed))


@functools.lru_cache(maxsize=32)
def _initializer(feat, sel, model_cfg) -> Callable:
    """A compiled ``key -> parameter dict`` (eager init would compile every small op; this compiles
    one program per model config and reuses it for every seed)."""
    def init(key):
        return nnx.state(RankingModel(feat, sel, model_cfg, rngs=nnx.Rngs(key))).to_pure_dict()
    return jax.jit(init)


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
    mdef, params = build_model(cfg, cfg.train.seed)
    opt = make_optimizer(cfg.train)
    key = jax.random.key_data(jax.random.key(cfg.train.seed + 1))
    return mdef, TrainState(params, opt.init(params), jnp.zeros((), jnp.int32), key), opt


def make_train_step(mdef: ModelDef, cfg: ExperimentConfig, opt: optax.GradientTransformation,
                    mesh: Optional[Mesh] = None) -> Callable:
    """``step(state, inputs, targets) -> (state, metrics)``, jitted, state donated."""

    def loss_fn(params, inputs, targets, key):
        dkey, nkey = jax.random.split(key)
        out: ModelOutput = mdef.bind(params)(
            inputs, dropout_key=dkey if cfg.model.dropout > 0 else None)
        return objective(out, inputs, targets, cfg, nkey)

    def step(state: TrainState, inputs: ModelInputs, targets: Targets):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, inputs, targets, key)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.global_norm(grads)
        return TrainState(params, opt_state, state.step + 1, state.key), metrics

    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(step, donate_argnums=0, in_shardings=(repl, data, data), out_shardings=(repl, repl))


def make_predict(mdef: ModelDef, mesh: Optional[Mesh] = None) -> Callable:
    """``predict(params, inputs) -> probabilities (N, H)``, jitted."""

    def predict(params, inputs):
        return jax.nn.sigmoid(mdef.bind(params)(inputs).logits.astype(jnp.float32))

    if mesh is None:
        return jax.jit(predict)
    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(predict, in_shardings=(repl, data), out_shardings=data)


def data_mesh() -> Mesh:
    """A 1-D mesh over all devices (of all processes), axis ``"data"``."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def initialize_distributed(**kwargs) -> None:
    """Multi-host setup: ``jax.distributed.initialize(**kwargs)`` (coordinator address, process
    count and id, or auto-detected on managed clusters). Call before any other JAX call."""
    jax.distributed.initialize(**kwargs)


def shard_batch(tree, mesh: Mesh):
    """Place this process's part of a batch on the mesh, sharded along the first axis."""
    sharding = NamedSharding(mesh, P("data"))
    return jax.tree_util.tree_map(
        lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), tree)


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, NamedSharding(mesh, P()))
