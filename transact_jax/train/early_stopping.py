"""Early stopping on a validation metric: keep the best parameters, stop after ``patience``
evaluations without improvement.

A metric is "higher is better" except normalized entropy (``ne/<head>``), where lower is better.
The best parameters live in host memory (a copy taken at the evaluation), not in checkpoints: a run
that is killed and resumed starts tracking the best again from the resumed step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

import jax


@dataclasses.dataclass
class EarlyStopping:
    """Tracks ``metric`` over evaluations (``patience`` 0: never stop, only keep the best)."""

    metric: str
    patience: int = 0
    best_value: Optional[float] = None
    best_step: Optional[int] = None
    best_params: Any = None
    best_metrics: Optional[Dict[str, float]] = None
    since_best: int = 0

    @property
    def lower_is_better(self) -> bool:
        return self.metric.startswith("ne/")

    def update(self, step: int, metrics: Dict[str, float], params) -> bool:
        """Record one evaluation; True when training should stop."""
        if self.metric not in metrics:
            raise ValueError(f"train.early_stopping_metric: {self.metric!r} is not an evaluation "
                             f"metric; choose one of {sorted(metrics)}")
        value = float(metrics[self.metric])
        better = (self.best_value is None
                  or (value < self.best_value if self.lower_is_better else value > self.best_value))
        if better:
            self.best_value, self.best_step = value, step
            self.best_params = jax.device_get(params)
            self.best_metrics = dict(metrics)
            self.since_best = 0
        else:
            self.since_best += 1
        return bool(self.patience) and self.since_best >= self.patience
