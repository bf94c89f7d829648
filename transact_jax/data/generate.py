"""Write synthetic train / eval feature logs (the data side of the quickstart, CLI and ablation)."""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Callable, List, Optional, TextIO, Tuple, Union

import numpy as np

from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data.feature_log import FeatureLog, FeatureLogWriter
from transact_jax.data.features import log_nn_features
from transact_jax.data.synthetic import SyntheticConfig, iter_chunks

ProgressFn = Callable[[str, int, int, int], None]
"""``progress(split, users_done, users_total, examples_so_far)``, called after every chunk of users."""


class PrintProgress:
    """A :data:`ProgressFn` printing ``generated N / M <split> users (E examples, T s)`` lines to
    ``stream`` (default stderr): at most one every ``interval_s`` seconds, and always a split's last."""

    def __init__(self, stream: Optional[TextIO] = None, interval_s: float = 2.0):
        self.stream, self.interval_s = stream, float(interval_s)
        self._start = self._last = time.monotonic()

    def __call__(self, split: str, done: int, total: int, examples: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < self.interval_s:
            return
        self._last = now
        print(f"generated {done:,} / {total:,} {split} users ({examples:,} examples, "
              f"{now - self._start:.0f} s)", file=self.stream or sys.stderr, flush=True)


def _check_users(name: str, value: int, least: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
        what = "a positive" if least > 0 else "a non-negative"
        raise ValueError(f"{name}: must be {what} number of users, got {value!r}")


def write_synthetic_logs(out_dir: str, feat: FeatureConfig, sel: SelectionConfig,
                         cfg: SyntheticConfig, train_users: int, eval_users: int,
                         progress: Union[bool, ProgressFn, None] = False
                         ) -> Tuple[FeatureLog, FeatureLog]:
    """Logs ``out_dir/train`` and ``out_dir/eval`` of disjoint users of the same world.

    Eval users are generated with a different seed stream (``seed + 1_000_003``) and user ids from
    10^9 on, over the same item catalog and mechanisms: new users, as in the paper's later evaluation
    window.

    Existing logs there are replaced atomically: both new logs are written completely beside the old
    ones before either is swapped in (``FeatureLogWriter.finish`` / ``publish``), so a run killed
    while generating leaves the old pair readable.

    Args:
      train_users, eval_users: users per split (ValueError naming the argument otherwise):
        ``train_users`` positive; ``eval_users`` non-negative, 0 writes an empty eval log (for
        callers that need a train log only, e.g. ``examples/serve.py``).
      progress: ``True`` prints ``generated N / M <split> users`` lines to stderr (about every 2 s);
        a callable gets ``(split, users_done, users_total, examples_so_far)`` after each chunk;
        ``False`` / ``None`` is quiet.
    """
    _check_users("train_users", train_users, 1)
    _check_users("eval_users", eval_users, 0)
    report: Optional[ProgressFn] = PrintProgress() if progress is True else (progress or None)
    splits = (("train", int(train_users), cfg.seed, cfg.user_id_offset),
              ("eval", int(eval_users), cfg.seed + 1_000_003, cfg.user_id_offset + 1_000_000_000))
    writers: List[FeatureLogWriter] = []
    try:
        for split, users, seed, offset in splits:
            split_cfg = dataclasses.replace(cfg, seed=seed, user_id_offset=offset)
            writer = FeatureLogWriter(os.path.join(out_dir, split), feat, sel, overwrite=True)
            writers.append(writer)
            done = 0
            for chunk in iter_chunks(split_cfg, feat, sel, users, catalog_seed=cfg.seed):
                writer.write(log_nn_features(chunk.requests, feat, sel, validate=False))
                done = min(users, done + cfg.users_per_chunk)
                if report is not None:
                    report(split, done, users, writer.num_examples)
            writer.finish()
        for writer in writers:
            writer.publish()
    except BaseException:
        for writer in writers:
            writer.abort()  # a published writer ignores this
        raise
    return FeatureLog(writers[0].path, feat, sel), FeatureLog(writers[1].path, feat, sel)
