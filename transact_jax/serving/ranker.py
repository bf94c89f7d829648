"""The Ranker: scores ranking requests with full sequences on the accelerator (paper §3.4).

Path of a batch::

    requests (RequestBatch parts) -> validate -> plan + bucket -> collate into a host arena
      -> host-to-device copy (one buffer) -> jitted forward for the bucket:
         [unpack -> NN search + S_all on device -> ranking model (encoder: SKUT or XLA) -> heads]
      -> device-to-host copy of (N_bucket, H) probabilities -> padding rows sliced off

Options (:class:`RankerConfig`):

* ``dedup``: True sends each request's sequences once (request-level de-duplication, paper Figure
  5) and runs the NN search on the de-duplicated jagged layout; False is the baseline a naive server
  implements: every candidate carries its own copy of its request's sequences (the broadcast layout)
  and the NN search runs on those copies.
* ``nn_impl``: the ``impl`` of :func:`pallas_kernels.nn_search.api.nn_search`: "pallas_triton" (the
  fused int8 NN-search kernel) or "xla" (the jnp reference); "auto" picks "pallas_triton" on a GPU
  and "xla" elsewhere (Pallas interpret mode is for tests, not for serving).
* ``encoder_impl``: the ``impl`` of :func:`pallas_kernels.skut.api.skut`: "pallas_triton" (the fused
  SKUT encoder kernel) or "xla"; "auto" as above. Overrides the checkpoint's ``model.encoder_impl``
  (both compute the same function of the same parameters).
* ``pinned``: stage batches in pinned host memory (:mod:`.staging`; falls back off GPU).
* ``buckets``: the shape ladders (:mod:`.buckets`); ``overlong``: "truncate" (keep the most recent
  tokens, the policy of the logged-feature path) or "reject".

Timing: ``score_batch(..., timing=True)`` waits for each phase (``block_until_ready``) and reports
seconds for batch preparation (``prep``), pageable-to-pinned copy (``pin``, "pinned_copy" staging
only), host-to-device (``h2d``), forward and device-to-host (``d2h``). Without it nothing blocks
between phases and only ``prep`` and the total are measured.

Threads: a Ranker may be called from several threads (the :mod:`.batcher` prepares up to its
``pipeline_depth`` batches at once, each on its own thread); each batch uses its own arena from a
per-bucket pool (``staging_slots`` deep), so up to that many batches of a bucket can be in flight.
The pool never grows: a batch that finds every arena of its bucket busy waits until one is released
(by ``InFlight.finish``), so arenas are reused and never reallocated in steady state. Keep
``staging_slots`` >= the batcher's ``pipeline_depth`` (both default to 3) so that no batch waits.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import jax
import numpy as np

from pallas_kernels._common import IMPLS, resolve_impl
from transact_jax.data.schema import RequestBatch
from transact_jax.serving.buckets import Bucket, BucketConfig
from transact_jax.serving.collate import BatchPlan, plan, write_broadcast, write_dedup
from transact_jax.serving.forward import make_forward
from transact_jax.serving.layout import ArenaLayout, layout_for
from transact_jax.serving.staging import Stager, StagingInfo
from transact_jax.serving.validation import (
    OVERLONG_POLICIES,
    RequestError,
    candidate_order,
    check_structure,
    request_errors,
    select_requests,
    validate_request,
)
from transact_jax.run.checkpoint import load_run
from transact_jax.run.config import ExperimentConfig


@dataclasses.dataclass(frozen=True)
class RankerConfig:
    """Serving options (module docstring). ``staging_slots``: arenas per bucket, i.e. batches of
    one bucket in flight at once (keep >= the batcher's ``pipeline_depth``; module docstring)."""

    nn_impl: str = "auto"
    encoder_impl: str = "auto"
    dedup: bool = True
    pinned: bool = True
    buckets: Optional[BucketConfig] = None
    overlong: str = "truncate"
    staging_slots: int = 3

    def __post_init__(self):
        for name in ("nn_impl", "encoder_impl"):
            if getattr(self, name) not in IMPLS:
                raise ValueError(f"{name}: expected one of {IMPLS}, got {getattr(self, name)!r}")
        if self.overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong: expected one of {OVERLONG_POLICIES}, got {self.overlong!r}")
        if self.staging_slots < 1:
            raise ValueError(f"staging_slots: need >= 1, got {self.staging_slots}")

    def resolved(self, platform: str) -> "RankerConfig":
        """With "auto" replaced: kernels on a GPU, XLA elsewhere."""
        return dataclasses.replace(
            self, nn_impl=resolve_impl(self.nn_impl, field="nn_impl", platform=platform),
            encoder_impl=resolve_impl(self.encoder_impl, field="encoder_impl", platform=platform))


@dataclasses.dataclass(frozen=True)
class BatchReport:
    """What one scored batch cost.

    Attributes:
      bucket: the padded shape it ran in.
      num_requests, num_candidates: real (unpadded) U and N.
      h2d_bytes: bytes copied host-to-device per part ("sequences", "candidates") plus "total"
        (the whole staged buffer, alignment included); padded sizes, i.e. what was really copied.
      sequence_tokens: tokens of sequence features shipped for real requests (broadcast: one copy
        per candidate), unpadded.
      times: seconds per phase: "prep" always; "pin", "h2d", "forward", "d2h" when timed; "total".
    """

    bucket: Bucket
    num_requests: int
    num_candidates: int
    h2d_bytes: Dict[str, int]
    sequence_tokens: int
    times: Dict[str, float]


@dataclasses.dataclass(frozen=True)
class ScoreResult:
    """``probs`` (N, H) float32 for every candidate of the batch (NaN rows for candidates of
    rejected requests), ``errors`` {request index: RequestError}, ``report`` (None if nothing ran)."""

    probs: np.ndarray
    errors: Dict[int, RequestError]
    report: Optional[BatchReport]

    def request_probs(self, requests: RequestBatch, u: int) -> np.ndarray:
        """Probabilities of request ``u``'s candidates (raises its error if it was rejected)."""
        if u in self.errors:
            raise self.errors[u]
        return self.probs[requests.cand_to_req == u]


class InFlight:
    """A dispatched batch: :meth:`finish` waits for the result and returns per-part probabilities."""

    def __init__(self, ranker: "Ranker", arena, out: jax.Array, parts_n: List[int], report: dict,
                 timing: bool, t_start: float):
        self._ranker, self._arena, self._out = ranker, arena, out
        self._parts_n, self._report, self._timing, self._t_start = parts_n, report, timing, t_start
        self._done = False

    def finish(self) -> Tuple[List[np.ndarray], BatchReport]:
        if self._done:
            raise RuntimeError("InFlight.finish: already finished")
        self._done = True
        times = dict(self._report.pop("times"))
        try:
            t0 = time.perf_counter()
            probs = np.asarray(jax.device_get(self._out))
            if self._timing:
                times["d2h"] = time.perf_counter() - t0
        finally:
            self._ranker._stager.release(self._arena)
        times["total"] = time.perf_counter() - self._t_start
        out, start = [], 0
        for n in self._parts_n:
            out.append(probs[start:start + n])
            start += n
        return out, BatchReport(times=times, **self._report)


class Ranker:
    """Scores :class:`~transact_jax.data.schema.RequestBatch` requests (module docstring).

    Args:
      cfg: the experiment config the parameters were trained with.
      params: the model's parameter dict (``TrainState.params``).
      config: :class:`RankerConfig`; keyword arguments override its fields
        (``Ranker(cfg, params, dedup=False, pinned=False)``).
      device: where to run (default: the first device).
    """

    def __init__(self, cfg: ExperimentConfig, params, config: Optional[RankerConfig] = None, *,
                 device=None, **options):
        config = dataclasses.replace(config or RankerConfig(), **options)
        self.device = device or jax.devices()[0]
        self.config = config.resolved(self.device.platform)
        model = dataclasses.replace(cfg.model, encoder_impl=self.config.encoder_impl)
        self.cfg = dataclasses.replace(cfg, model=model)
        self.feat, self.sel = cfg.feature, cfg.selection
        self.buckets = self.config.buckets or BucketConfig.for_selection(self.sel)
        self.layout_kind = "dedup" if self.config.dedup else "broadcast"
        self.params = jax.device_put(params, self.device)
        self._forward = make_forward(self.cfg, self.config.nn_impl)
        self._stager = Stager(self.device, self.config.pinned, self.config.staging_slots)
        self._layouts: Dict[Bucket, ArenaLayout] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(cls, path: str, *, step: Optional[int] = None,
                        config: Optional[RankerConfig] = None, device=None, **options) -> "Ranker":
        """Load the parameters and experiment config of a training run.

        ``path`` is a training ``workdir`` (holding ``checkpoints/``) or the checkpoint directory
        itself; ``step`` defaults to the newest intact checkpoint (a corrupt newer one is skipped
        with a warning, :func:`~transact_jax.run.checkpoint.load_run`). The config stored with the
        checkpoint is used (the encoder implementation is then chosen by ``encoder_impl``).
        """
        run = load_run(path, step=step)
        return cls(run.config, run.params, config, device=device, **options)

    # --------------------------------------------------------------------------------- properties
    @property
    def staging(self) -> StagingInfo:
        """The staging mode in use and, if pinned staging fell back, why."""
        return self._stager.info

    @property
    def staging_host_bytes(self) -> int:
        """Host memory held by this Ranker's staging arenas."""
        return self._stager.allocated_bytes()

    @property
    def num_compiled(self) -> int:
        """Executables compiled by this Ranker's forward (one per bucket seen, shared with other
        Rankers of the same config and NN implementation)."""
        return self._forward._cache_size()

    def layout(self, bucket: Bucket) -> ArenaLayout:
        with self._lock:
            if bucket not in self._layouts:
                self._layouts[bucket] = layout_for(bucket, self.feat)
            return self._layouts[bucket]

    def bucket_for(self, parts: Sequence[RequestBatch]) -> Bucket:
        return plan(parts, self.sel).bucket(self.buckets, self.layout_kind)

    # -------------------------------------------------------------------------------- validation
    def validate_request(self, request: RequestBatch) -> Optional[RequestError]:
        """The error of a single request submitted on its own, or None (see :mod:`.validation`)."""
        return validate_request(request, self.feat, self.sel, self.config.overlong)

    # ---------------------------------------------------------------------------------- scoring
    def dispatch(self, parts: Sequence[RequestBatch], timing: bool = False) -> InFlight:
        """Prepare, copy and launch the forward for already validated ``parts`` (each a
        RequestBatch); returns at once unless ``timing``. Call :meth:`InFlight.finish` for the
        probabilities, one (N_p, H) array per part."""
        if not parts:
            raise ValueError("parts: nothing to score")
        t_start = time.perf_counter()
        bplan: BatchPlan = plan(parts, self.sel)
        if bplan.num_candidates == 0:
            raise ValueError("parts: the batch has no candidates")
        bucket = bplan.bucket(self.buckets, self.layout_kind)
        layout = self.layout(bucket)
        arena = self._stager.acquire(layout)
        try:
            if bucket.layout == "dedup":
                write_dedup(arena.views, parts, bplan)
                seq_tokens = sum(bplan.total_tokens.values())
            else:
                write_broadcast(arena.views, parts, bplan)
                seq_tokens = sum(bplan.broadcast_tokens.values())
            t_prep = time.perf_counter()
            times = {"prep": t_prep - t_start}
            staged, copy_times = self._stager.transfer(arena, sync=timing)
            times.update(copy_times)
            t0 = time.perf_counter()
            out = self._forward(self.params, staged, layout=layout)
            if timing:
                out.block_until_ready()
                times["forward"] = time.perf_counter() - t0
        except BaseException:
            self._stager.release(arena)
            raise
        h2d = layout.part_nbytes()
        h2d["total"] = layout.nbytes
        report = dict(bucket=bucket, num_requests=bplan.num_requests,
                      num_candidates=bplan.num_candidates, h2d_bytes=h2d,
                      sequence_tokens=seq_tokens, times=times)
        return InFlight(self, arena, out, [p.num_candidates for p in parts], report, timing, t_start)

    def score_batch(self, requests: RequestBatch, *, timing: bool = False,
                    validate: bool = True) -> ScoreResult:
        """Score every valid request of ``requests``; bad requests get a :class:`RequestError` in
        ``errors`` (and NaN rows) while the others are scored. A batch whose structure is broken
        (dtypes, shapes, offsets) raises :class:`~transact_jax.data.schema.SchemaError`."""
        h = self.feat.num_heads
        if validate:
            check_structure(requests, self.feat)
            errors = request_errors(requests, self.feat, self.sel, self.config.overlong)
        else:
            errors = {}
        probs = np.full((requests.num_candidates, h), np.nan, np.float32)
        good = [u for u in range(requests.num_requests) if u not in errors]
        if not good or requests.num_candidates == 0:
            return ScoreResult(probs, errors, None)
        if errors:
            part = select_requests(requests, good)
            rows = candidate_order(requests, good)
        else:
            part, rows = requests, slice(None)
        (out,), report = self.dispatch([part], timing=timing).finish()
        probs[rows] = out
        return ScoreResult(probs, errors, report)

    def score(self, requests: RequestBatch) -> np.ndarray:
        """Probabilities (N, H) per candidate and head (``cfg.feature.heads``); raises the first
        :class:`RequestError` if any request is bad (use :meth:`score_batch` to score the rest)."""
        result = self.score_batch(requests)
        if result.errors:
            raise next(iter(result.errors.values()))
        return result.probs

    # ---------------------------------------------------------------------------------- warm-up
    def warmup(self, buckets: Iterable[Bucket]) -> int:
        """Compile the forward for each bucket (an all-padding batch) and allocate its staging
        arenas; returns how many executables were compiled."""
        before = self.num_compiled
        for bucket in buckets:
            if bucket.layout != self.layout_kind:
                raise ValueError(f"warmup: bucket layout {bucket.layout!r} != this Ranker's "
                                 f"{self.layout_kind!r}")
            layout = self.layout(bucket)
            self._stager.preallocate(layout)
            arena = self._stager.acquire(layout)
            try:   # zeros: every sequence empty, every candidate at request 0; same copy path
                arena.buffer[:] = 0
                staged, _ = self._stager.transfer(arena, sync=True)
                jax.block_until_ready(self._forward(self.params, staged, layout=layout))
            finally:
                self._stager.release(arena)
        return self.num_compiled - before

    def warmup_batches(self, batches: Iterable[Union[RequestBatch, Sequence[RequestBatch]]]) -> int:
        """Compile the buckets of these example batches (each a RequestBatch or a list of parts)."""
        buckets = []
        for b in batches:
            parts = [b] if isinstance(b, RequestBatch) else list(b)
            buckets.append(self.bucket_for(parts))
        return self.warmup(dict.fromkeys(buckets))
