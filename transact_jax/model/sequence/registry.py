"""The sequence-model registry: the ranking tower gets its sequence vector from the entry named by
``ModelConfig.sequence_model``.

A sequence model is an ``nnx.Module`` called as
``module(emb, actions, surfaces, mask, cand, dtype, dropout_key, token_age_hours) -> (vector,
nal_user)``:

* ``emb`` (N, L, D) float32 dequantized S_all token embeddings (the segments the model reads, in
  S_all order), ``actions`` (N, L) action bitmasks, ``surfaces`` (N, L) int32, ``mask`` (N, L) bool,
  ``cand`` (N, D) float32 candidate embedding e_c, ``dtype`` the compute dtype, ``dropout_key`` a PRNG
  key or None (no dropout), ``token_age_hours`` (N, L) float32 hours between each token and the
  request, or None when the inputs carry no token timestamps (``ModelConfig.token_features``);
* ``vector`` (N, ModelConfig.seq_out_dim) goes into the DCN-v2 tower; ``nal_user`` is ``P u(t)``
  (N, r, D) on the S_RT[:r] slots for the Next Action Loss, or None. A module may return a third
  element, an auxiliary loss (a weighted scalar, e.g. VISTA's reconstruction loss) that the
  training objective adds.

A family whose entry has ``scores_requests`` also has ``module.mfalcon(emb, actions, surfaces,
mask, cand, cand_to_req, b_m, dtype, dropout_key=None) -> vector`` (U requests' histories, N
candidates): each request's history is read once for all its candidates (HSTU's M-FALCON; VISTA's
per-user summary), used when the history does not depend on the candidate
(:func:`transact_jax.model.sequence.hstu.shared_history`).

Adding a family is adding a module that calls :func:`register` and importing it in
``transact_jax/model/sequence/__init__.py``; the tower is never edited.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Tuple

from flax import nnx


@dataclasses.dataclass(frozen=True)
class SequenceModelEntry:
    """One registered sequence model.

    Attributes:
      name: the ``ModelConfig.sequence_model`` value that selects it.
      build: ``(feat, cfg, length, rt_slots, rngs) -> nnx.Module`` (or None for "no sequence");
        ``length`` is the number of S_all slots the model reads, ``rt_slots`` where S_RT[:r] sits
        among them (None if it reads no such segment).
      next_action_loss: whether the module returns ``P u(t)`` (the Next Action Loss needs it).
      scores_requests: whether the module has ``mfalcon`` (module docstring).
    """

    name: str
    build: Callable[..., Optional[nnx.Module]]
    next_action_loss: bool = False
    scores_requests: bool = False


_REGISTRY: Dict[str, SequenceModelEntry] = {}


def register(entry: SequenceModelEntry) -> SequenceModelEntry:
    """Add ``entry``; a name can be registered once."""
    if entry.name in _REGISTRY:
        raise ValueError(f"sequence_model: {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry
    return entry


def sequence_model_entry(name: str) -> SequenceModelEntry:
    """The registered entry ``name`` (ValueError naming ``sequence_model`` if unknown)."""
    if name not in _REGISTRY:
        raise ValueError(f"sequence_model: expected one of {names()}, got {name!r}")
    return _REGISTRY[name]


def names() -> Tuple[str, ...]:
    return tuple(_REGISTRY)


register(SequenceModelEntry(name="none", build=lambda *args: None))
