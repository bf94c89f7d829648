"""Frozen training configuration and the experiment bundle.

``ExperimentConfig`` is everything that defines a run: the :class:`~transact_jax.config.FeatureConfig`,
the :class:`~transact_jax.config.SelectionConfig` of S_all, the
:class:`~transact_jax.model.config.ModelConfig` and the :class:`TrainConfig`. It is stored with every
checkpoint and can be written to / read from JSON (``to_json`` / ``from_json``; missing fields keep
their defaults, unknown fields are refused with the dotted field name).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Tuple

from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.config_json import (
    AT_LEAST_ONE,
    NON_NEGATIVE,
    POSITIVE,
    Bound,
    ConfigError,
    check_fields,
    config_from_dict,
    config_from_json,
    config_to_dict,
    config_to_json,
)
from transact_jax.model.config import ModelConfig
from transact_jax.model.sequence import sequence_model_entry

NAL_NEGATIVES = ("none", "impression", "in_batch")
NAL_WITHOUT_IMPRESSIONS = ("warn", "in_batch", "error")
NAL_KINDS = ("sampled_softmax", "bce")
LEGACY_VALUES = {"model.encoder_impl": {"skut": "pallas_triton"}}
"""Values renamed since configs were first stored (read from old checkpoints and JSON files)."""
TRAIN_BOUNDS = {
    **{name: AT_LEAST_ONE for name in ("batch_size", "steps", "log_every", "num_in_batch_negatives",
                                        "keep_checkpoints")},
    **{name: NON_NEGATIVE for name in ("warmup_steps", "weight_decay", "head_loss_weights", "w_nal",
                                        "seed", "eval_every", "checkpoint_every",
                                        "early_stopping_patience", "prefetch", "loader_threads")},
    "learning_rate": POSITIVE, "clip_norm": POSITIVE, "end_lr_fraction": Bound(0, 1)}
"""The range of each numeric TrainConfig field (every float field must also be finite)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimization, objective and bookkeeping.

    Attributes:
      batch_size: global batch (split over all devices; must be divisible by their number).
      steps: optimizer steps of the whole run.
      learning_rate, warmup_steps, end_lr_fraction: AdamW with linear warmup then cosine decay to
        ``learning_rate * end_lr_fraction``.
      weight_decay: AdamW decoupled weight decay (matrices only; biases, norms, tables exempt).
      clip_norm: global gradient-norm clipping.
      head_loss_weights: w_h of eq. 1, one per head (FeatureConfig.heads order).
      ranking_weights: w_h of the ranking score S = sum_h w_h f(x)_h used by HIT@K (§4.2.1); the hide
        head gets a negative weight so that likely hides rank low.
      w_nal: w_NAL of eq. 7 (0 disables the Next Action Loss).
      nal_negatives: "impression" (NAL_imp), "in_batch" (NAL_in-batch) or "none".
      nal_kind: "sampled_softmax" (eq. 5) or "bce" (Table 7's cross-entropy NAL).
      nal_without_impressions: what ``train()`` does when ``nal_negatives="impression"`` but the
        training data carries no impression negatives at all (e.g. rating logs such as MovieLens),
        where the Next Action Loss would have no negatives and contribute nothing: "warn" (the
        default: a warning, then training as configured), "in_batch" (train with in-batch negatives
        instead, with a warning saying so) or "error" (refuse).
      num_in_batch_negatives: negatives per example for NAL_in-batch.
      seed: parameter init, dropout and data order.
      log_every, eval_every, checkpoint_every: in steps (0 disables eval / periodic checkpoints;
        a final checkpoint is always written when a checkpoint directory is given).
      early_stopping_metric: an evaluation metric (e.g. "auc/click", "hit@3/click"; "ne/..." is
        lower-is-better) on ``eval_log`` to keep the best parameters by ("" disables); needs
        ``eval_every`` > 0. ``train()`` then returns them as ``TrainResult.best_params``.
      early_stopping_patience: stop after this many evaluations without improvement (0: never stop
        early, only keep the best).
      keep_checkpoints: how many checkpoints orbax keeps.
      prefetch: batches the input pipeline reads ahead.
      loader_threads: threads that read batches from the feature log.

    Every field is checked on construction (:func:`~transact_jax.config_json.check_fields`): its
    type, finite floats, and the ranges of :data:`TRAIN_BOUNDS`.
    """

    batch_size: int = 512
    steps: int = 2000
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    end_lr_fraction: float = 0.05
    weight_decay: float = 1e-4
    clip_norm: float = 1.0
    head_loss_weights: Tuple[float, ...] = (1.0, 1.0, 1.0)
    ranking_weights: Tuple[float, ...] = (1.0, 1.0, -1.0)
    w_nal: float = 0.01
    nal_negatives: str = "impression"
    nal_kind: str = "sampled_softmax"
    nal_without_impressions: str = "warn"
    num_in_batch_negatives: int = 32
    seed: int = 0
    log_every: int = 50
    eval_every: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    early_stopping_metric: str = ""
    early_stopping_patience: int = 0
    prefetch: int = 4
    loader_threads: int = 2

    def __post_init__(self):
        check_fields(self, TRAIN_BOUNDS)
        for name, allowed in (("nal_negatives", NAL_NEGATIVES), ("nal_kind", NAL_KINDS),
                              ("nal_without_impressions", NAL_WITHOUT_IMPRESSIONS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(name, f"expected one of {allowed}, got {getattr(self, name)!r}")
        if self.early_stopping_metric and not self.eval_every:
            raise ConfigError("early_stopping_metric", "needs eval_every > 0 (evaluations to compare)")

    @property
    def uses_nal(self) -> bool:
        return self.w_nal > 0 and self.nal_negatives != "none"


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything that defines a run: features, S_all selection, model and training."""

    name: str = "transact_v2"
    feature: FeatureConfig = FeatureConfig()
    selection: SelectionConfig = SelectionConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()

    def __post_init__(self):
        check_fields(self)
        h = self.feature.num_heads
        for name in ("head_loss_weights", "ranking_weights"):
            if len(getattr(self.train, name)) != h:
                raise ConfigError(f"train.{name}", f"need {h} weights for heads {self.feature.heads}")
        if self.train.uses_nal and (not sequence_model_entry(self.model.sequence_model).next_action_loss
                                    or "rt_recent" not in self.model.segments):
            raise ConfigError("train.nal_negatives", "the Next Action Loss needs a sequence model that "
                              "produces P u(t) (e.g. 'transact') reading the 'rt_recent' segment")

    def to_dict(self) -> Dict[str, Any]:
        return config_to_dict(self)

    def to_json(self) -> str:
        return config_to_json(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ExperimentConfig":
        """Build from a (possibly partial) nested dict; missing fields keep their defaults.
        Problems raise :class:`~transact_jax.config_json.ConfigError` naming the dotted field."""
        return config_from_dict(cls, d, aliases=LEGACY_VALUES)

    @classmethod
    def from_json(cls, path: str) -> "ExperimentConfig":
        return config_from_json(cls, path, aliases=LEGACY_VALUES)
