"""The run layer: what defines a run and how it is stored, shared by training and serving.

* :mod:`.config` - :class:`TrainConfig` and :class:`ExperimentConfig` (features, S_all selection,
  model, training), to and from JSON.
* :mod:`.presets` - the models of the paper's Table 2 as experiment configs.
* :mod:`.state` - :class:`TrainState` (parameters, optimizer state, step, PRNG key), the optimizer
  and the initial state of a config.
* :mod:`.checkpoint` - orbax checkpoints (:class:`Checkpointer`) and :func:`load_run`, the one way
  a stored run is read back (training resume, ``evaluate``, ``Ranker.from_checkpoint``).

Training (``transact_jax.train``) and serving (``transact_jax.serving``) both import this package;
neither imports the other.
"""
from transact_jax.run.config import ExperimentConfig, TrainConfig

__all__ = ["ExperimentConfig", "TrainConfig"]
