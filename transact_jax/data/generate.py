"""Write synthetic train / eval feature logs (the data side of the quickstart, CLI and ablation)."""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional, Tuple

from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data.feature_log import FeatureLog, FeatureLogWriter
from transact_jax.data.features import log_nn_features
from transact_jax.data.synthetic import SyntheticConfig, iter_chunks


def write_synthetic_logs(out_dir: str, feat: FeatureConfig, sel: SelectionConfig,
                         cfg: SyntheticConfig, train_users: int, eval_users: int,
                         progress: Optional[Callable[[str, int], None]] = None
                         ) -> Tuple[FeatureLog, FeatureLog]:
    """Logs ``out_dir/train`` and ``out_dir/eval`` of disjoint users of the same world.

    Eval users are generated with a different seed stream (``seed + 1_000_003``) and user ids from
    10^9 on, over the same item catalog and mechanisms: new users, as in the paper's later evaluation
    window.
    """
    logs = []
    splits = (("train", train_users, cfg.seed, cfg.user_id_offset),
              ("eval", eval_users, cfg.seed + 1_000_003, cfg.user_id_offset + 1_000_000_000))
    for split, users, seed, offset in splits:
        path = os.path.join(out_dir, split)
        split_cfg = dataclasses.replace(cfg, seed=seed, user_id_offset=offset)
        with FeatureLogWriter(path, feat, sel, overwrite=True) as writer:
            for chunk in iter_chunks(split_cfg, feat, sel, users, catalog_seed=cfg.seed):
                writer.write(log_nn_features(chunk.requests, feat, sel, validate=False))
                if progress:
                    progress(split, writer.num_examples)
        logs.append(FeatureLog(path, feat, sel))
    return logs[0], logs[1]
