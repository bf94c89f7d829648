"""Serving: score ranking requests with full user sequences on an accelerator (paper §3.4).

Names from the paper, explained once: **S_LL** is the user's lifelong action sequence (up to
L_LL = 10,000 tokens), **S_RT** the real-time sequence (up to 100), **S_imp** the impressions shown
but not engaged (up to 100); **S_all** (192 tokens) is what the model reads: the K_LL tokens of S_LL
nearest to the candidate, the r most recent real-time tokens, the K_RT nearest of the older real-time
tokens and the K_imp nearest impressions ("NN selection"). Training reads S_all from logs ("logged
NN features"); serving recomputes it on the device from the full sequences, with the same result.

Pieces, one module each:

* :mod:`.buckets` - shape ladders and :class:`Bucket`: every batch is padded to a fixed shape so
  the jitted forward never recompiles in steady state.
* :mod:`.layout` - one staged buffer per batch (the "memory arena"), typed views on the host,
  unpacked on the device.
* :mod:`.staging` - reused host arenas per bucket, in pinned host memory when available
  (``pinned_host`` memory kind), with a clean fallback.
* :mod:`.collate` - batch preparation: requests written straight into the arena, de-duplicated
  (one copy of each request's sequences, paper Figure 5) or broadcast (one copy per candidate: the
  naive baseline).
* :mod:`.validation` - per-request checks (the rule book of ``transact_jax.data``): a bad request gets its own error naming the
  field; the rest of the batch is still scored.
* :mod:`.forward` - the jitted forward: on-device NN search (fused Pallas kernel or XLA) and S_all
  (the same slot semantics as offline logging), ranking model (SKUT or XLA encoder), per-head
  probabilities.
* :mod:`.ranker` - :class:`Ranker`: a stored run (``transact_jax.run.load_run``) -> ``score``, timing
  and byte accounting.
* :mod:`.batcher` - :class:`DynamicBatcher`: thread-safe dynamic batching with per-request futures,
  back-pressure and clean shutdown.
* :mod:`.shared_slots` and :mod:`.frontend` - serving from several processes: front-end processes
  validate and pack requests into shared-memory slots, one :class:`~.frontend.EngineHost` process
  batches and scores them on the device.
* :mod:`.summary_store` - per-user summaries (SQLite embedded, or Redis) for models that serve a
  cached summary of the history.
"""
from transact_jax.serving.batcher import (
    BatcherClosed,
    BatcherConfig,
    DynamicBatcher,
    Overloaded,
    RequestTiming,
    ScoreFuture,
)
from transact_jax.serving.buckets import Bucket, BucketConfig, Ladder
from transact_jax.serving.ranker import BatchReport, Ranker, RankerConfig, ScoreResult
from transact_jax.serving.staging import StagingInfo
from transact_jax.serving.validation import RequestError, split_requests

__all__ = [
    "BatcherClosed", "BatcherConfig", "DynamicBatcher", "Overloaded", "RequestTiming", "ScoreFuture",
    "Bucket", "BucketConfig", "Ladder", "BatchReport", "Ranker", "RankerConfig", "ScoreResult",
    "StagingInfo", "RequestError", "split_requests",
]
