"""Training on whole requests: each request's history once with all its candidates and labels.

The logged-feature path (:mod:`transact_jax.train.loop`) trains on one row per (request,
candidate) carrying its own S_all. A model whose history does not depend on the candidate
(:func:`transact_jax.model.sequence.hstu.shared_history`: HSTU with ``b_m`` > 1, or VISTA, reading
S_LL by recency, ``ll_selection="recent"``, and S_RT[:r]) can instead read each request's history
once for all its candidates (HSTU: b_m candidates per encoder pass, M-FALCON, "Actions Speak Louder
than Words" Section 3.4; VISTA: one summary per request), as the serving engine does. VISTA's
reconstruction loss is not part of this path. Here the same forward (:func:`transact_jax.model.request_forward.
request_logits`) is trained, on a :class:`~transact_jax.data.request_log.RequestLog` (or any source
whose ``read(indices)`` gives labelled ``RequestBatch`` es) through the grain pipeline, each batch
laid out in a fixed :class:`~transact_jax.data.request_batches.RequestCapacity` (so the step
compiles once). Loss: the multi-head cross-entropy of the logged-feature path over the real
candidates (padding has weight 0); no Next Action Loss (the family has none).

What this does not do yet: checkpoints, resume and the metrics log of :func:`~transact_jax.train.
loop.train`, and data parallelism (one device).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from transact_jax.data.pipeline import make_loader
from transact_jax.data.request_batches import RequestCapacity, pad_request_batch
from transact_jax.eval.metrics import auc
from transact_jax.model.builder import ModelDef
from transact_jax.model.losses import multi_head_bce
from transact_jax.model.request_forward import request_logits
from transact_jax.model.sequence.hstu import shared_history
from transact_jax.run.config import ExperimentConfig
from transact_jax.run.state import TrainState, init_state


def check_request_model(cfg: ExperimentConfig) -> None:
    """Raise ValueError (naming the reason) unless ``cfg``'s model reads a history shared by a
    request's candidates."""
    why = shared_history(cfg.selection, cfg.model)
    if why is not None:
        raise ValueError(f"model: training on whole requests needs a history shared by a request's "
                         f"candidates (M-FALCON), but {why}")


def make_request_step(mdef: ModelDef, cfg: ExperimentConfig, opt: optax.GradientTransformation,
                      nn_impl: str = "auto") -> Callable:
    """``step(state, arrays) -> (state, metrics)`` on one padded request batch, jitted, state donated;
    metrics: ``loss``, ``grad_norm``, ``finite``."""
    heads = jnp.asarray(cfg.train.head_loss_weights, jnp.float32)

    def loss_fn(params, arrays, key):
        dropout = key if cfg.model.dropout > 0 else None
        logits = request_logits(mdef.bind(params), arrays, cfg.feature, cfg.selection, nn_impl,
                                dropout_key=dropout)
        return multi_head_bce(logits, arrays["labels"], heads, example_weight=arrays["weight"])

    def step(state: TrainState, arrays: Dict[str, jax.Array]):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, arrays, key)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        norm = optax.global_norm(grads)
        metrics = {"loss": loss, "grad_norm": norm, "finite": jnp.isfinite(loss) & jnp.isfinite(norm)}
        return TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1,
                          state.key), metrics

    return jax.jit(step, donate_argnums=0)


def make_request_predict(mdef: ModelDef, cfg: ExperimentConfig, nn_impl: str = "auto") -> Callable:
    """``predict(params, arrays) -> probabilities (N, H)`` of a padded request batch, jitted."""
    def predict(params, arrays):
        logits = request_logits(mdef.bind(params), arrays, cfg.feature, cfg.selection, nn_impl)
        return jax.nn.sigmoid(logits.astype(jnp.float32))
    return jax.jit(predict)


@dataclasses.dataclass
class RequestTrainResult:
    """What :func:`train_on_requests` returns: the model, its final state, the logged training
    metrics (one dict per ``log_every`` steps), examples (candidates) per second over the run
    after the first (compiling) step, and the evaluation (per-head AUC) if an eval source was
    given."""

    model_def: ModelDef
    state: TrainState
    metrics: List[Dict[str, float]]
    candidates_per_second: float
    evaluation: Optional[Dict[str, float]]


def _batches(source, cap: RequestCapacity, cfg: ExperimentConfig, *, seed: int,
             num_epochs: Optional[int], shuffle: bool):
    loader = make_loader(source, batch_size=cap.requests, seed=seed, num_epochs=num_epochs,
                         shuffle=shuffle, drop_remainder=num_epochs is None,
                         transform=lambda b: (pad_request_batch(b, cap, cfg.feature),
                                              b.num_candidates))
    return iter(loader)


def train_on_requests(cfg: ExperimentConfig, source, *, candidates_per_request: int,
                      eval_source=None, nn_impl: str = "auto", log_every: int = 10) -> RequestTrainResult:
    """Train ``cfg``'s model for ``cfg.train.steps`` steps of ``cfg.train.batch_size`` *requests*
    from ``source`` (module docstring), batches shuffled with ``cfg.train.seed``, repeated as needed;
    then, with ``eval_source``, the per-head AUC of its requests.

    ``candidates_per_request``: the average candidates per request a batch has room for
    (:meth:`RequestCapacity.for_batch`); a batch with more raises a SchemaError naming
    ``candidates``."""
    check_request_model(cfg)
    if source.sel != cfg.selection or source.feat != cfg.feature:
        raise ValueError("source: written with other feature/selection configs than cfg's")
    cap = RequestCapacity.for_batch(cfg.selection, cfg.train.batch_size, candidates_per_request)
    mdef, state, opt = init_state(cfg)
    step = make_request_step(mdef, cfg, opt, nn_impl)
    batches = _batches(source, cap, cfg, seed=cfg.train.seed, num_epochs=None, shuffle=True)
    metrics: List[Dict[str, float]] = []
    t_first, seen = None, 0
    for i in range(cfg.train.steps):
        arrays, n = next(batches)
        state, m = step(state, arrays)
        if i == 0:
            jax.block_until_ready(m["loss"])
            t_first = time.perf_counter()
        else:
            seen += n
        if (i + 1) % log_every == 0 or i + 1 == cfg.train.steps:
            host = {k: float(v) for k, v in m.items()}
            if not host["finite"]:
                raise FloatingPointError(f"step {i + 1}: non-finite loss {host['loss']} or gradient "
                                         f"norm {host['grad_norm']}")
            metrics.append({"step": i + 1, **host})
    jax.block_until_ready(state.params)
    rate = seen / (time.perf_counter() - t_first) if t_first and seen else 0.0
    evaluation = None
    if eval_source is not None:
        evaluation = evaluate_requests(mdef, state.params, cfg, eval_source, cap, nn_impl)
    return RequestTrainResult(mdef, state, metrics, rate, evaluation)


def evaluate_requests(mdef: ModelDef, params, cfg: ExperimentConfig, source, cap: RequestCapacity,
                      nn_impl: str = "auto") -> Dict[str, float]:
    """Per-head AUC (``"auc_<head>"``) over every request of ``source`` (one pass, stored order)."""
    predict = make_request_predict(mdef, cfg, nn_impl)
    probs, labels = [], []
    for arrays, n in _batches(source, cap, cfg, seed=0, num_epochs=1, shuffle=False):
        probs.append(np.asarray(predict(params, arrays))[:n])
        labels.append(arrays["labels"][:n])
    p, y = np.concatenate(probs), np.concatenate(labels)
    return {f"auc_{h}": auc(p[:, k], y[:, k]) for k, h in enumerate(cfg.feature.heads)}
