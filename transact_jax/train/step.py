"""The jitted train step, the jitted prediction function and data-parallel sharding.

The train step is a pure function of ``(TrainState, ModelInputs, Targets)`` over the parameter dict
of :mod:`transact_jax.model.builder`, jitted with the state donated.

Data parallelism: a 1-D ``Mesh`` over every device of every process (axis ``"data"``); the batch is
sharded along its first axis, the state replicated. XLA inserts the gradient all-reduce. On several
hosts, call :func:`initialize_distributed` first; each process feeds its own slice of the batch
(``jax.make_array_from_process_local_data``).
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from transact_jax.model.builder import ModelDef
from transact_jax.model.inputs import ModelInputs
from transact_jax.model.ranking import ModelOutput
from transact_jax.run.config import ExperimentConfig
from transact_jax.run.state import TrainState
from transact_jax.train.objective import Targets, objective


def make_train_step(mdef: ModelDef, cfg: ExperimentConfig, opt: optax.GradientTransformation,
                    mesh: Optional[Mesh] = None) -> Callable:
    """``step(state, inputs, targets) -> (state, metrics)``, jitted, state donated.

    ``metrics`` holds the loss and its parts, ``grad_norm`` and ``finite``, a bool scalar: the loss
    and the gradient norm of this step are finite (computed on device; the training loop reads it
    only at its checks, so it costs no host sync)."""

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
        metrics["finite"] = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
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


def data_mesh(local: bool = False) -> Mesh:
    """A 1-D mesh, axis ``"data"``, over all devices of all processes (or, with ``local``, over
    this process's devices only)."""
    return Mesh(np.asarray(jax.local_devices() if local else jax.devices()), ("data",))


def to_local(tree):
    """Replicated arrays that span several processes as arrays on this process's first device (each
    process holds the full value); other leaves unchanged."""
    def local(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return a.addressable_data(0)
        return a
    return jax.tree_util.tree_map(local, tree)


def initialize_distributed(*, cpu_collectives: str = "gloo", **kwargs) -> None:
    """Multi-process setup: ``jax.distributed.initialize(**kwargs)`` (``coordinator_address``,
    ``num_processes``, ``process_id``, or auto-detected on managed clusters). Call before any other
    JAX call, in every process.

    One process per GPU (on one host or several) is the GPU layout. ``cpu_collectives`` picks the
    cross-process collectives of the CPU backend ("gloo"; "none" leaves jax's default), so the same
    launch also runs as several CPU processes on one machine (how the tests check it)."""
    if cpu_collectives != "none":
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(**kwargs)


def shard_batch(tree, mesh: Mesh):
    """Place this process's part of a batch on the mesh, sharded along the first axis."""
    sharding = NamedSharding(mesh, P("data"))
    return jax.tree_util.tree_map(
        lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), tree)


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, NamedSharding(mesh, P()))
