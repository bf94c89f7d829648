"""Building the ranking model: its static definition and its parameters.

The NNX model is split once into a static ``graphdef`` and a parameter pytree (a plain nested dict,
which optax, orbax and ``jax.sharding`` handle directly). :class:`ModelDef` rebinds parameters to the
definition inside jitted functions (training step, evaluation, serving forward).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, Tuple

import jax
from flax import nnx

from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.model.config import ModelConfig
from transact_jax.model.ranking import RankingModel

Params = Dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """The static half of an NNX model: ``graphdef`` plus a state template (shapes and dtypes,
    no arrays) to rebuild it."""

    graphdef: Any
    template: Any

    def bind(self, params: Params) -> nnx.Module:
        """The model with ``params`` (works inside jit)."""
        state = jax.tree_util.tree_map(lambda v: v, self.template)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)


def module_def(make: Callable[[], nnx.Module]) -> ModelDef:
    """The static definition of the module ``make()`` builds (shapes only, no parameters are
    initialized: the template must not alias parameters, which a train step may donate)."""
    graphdef, template = nnx.split(nnx.eval_shape(make))
    return ModelDef(graphdef, template)


def model_def(feat: FeatureConfig, sel: SelectionConfig, model: ModelConfig) -> ModelDef:
    """The ranking model's static definition (shapes only, no parameters are initialized)."""
    return module_def(lambda: RankingModel(feat, sel, model, rngs=nnx.Rngs(0)))


def init_params(feat: FeatureConfig, sel: SelectionConfig, model: ModelConfig, seed: int) -> Params:
    """Freshly initialized parameters (a nested dict) for ``seed``."""
    return _initializer(feat, sel, model)(jax.random.key(seed))


def build_model(feat: FeatureConfig, sel: SelectionConfig, model: ModelConfig,
                seed: int) -> Tuple[ModelDef, Params]:
    """Initialize the model; returns its static definition and the parameter dict."""
    return model_def(feat, sel, model), init_params(feat, sel, model, seed)


@functools.lru_cache(maxsize=32)
def _initializer(feat, sel, model_cfg) -> Callable:
    """A compiled ``key -> parameter dict`` (eager init would compile every small op; this compiles
    one program per model config and reuses it for every seed)."""
    def init(key):
        return nnx.state(RankingModel(feat, sel, model_cfg, rngs=nnx.Rngs(key))).to_pure_dict()
    return jax.jit(init)
