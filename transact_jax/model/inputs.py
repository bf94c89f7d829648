"""What the model reads from a batch: :class:`ModelInputs` (device-friendly, no int64 fields)."""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import numpy as np

from transact_jax.data.schema import TrainingExamples


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelInputs:
    """Model inputs for N examples (a JAX pytree).

    Attributes:
      embeddings: (N, |S_all|, D) int8 codes of the S_all tokens.
      actions: (N, |S_all|) action bitmasks; surfaces: (N, |S_all|) surface ids; mask: (N, |S_all|) bool.
      candidate_embedding: (N, D) int8 codes of the candidate (e_c).
      dense: (N, num_dense) float32; categorical: (N, C) int32.
      token_age_hours: (N, |S_all|) float32 hours from each S_all token to its request (0 on
        padding), or None where token timestamps are not available (serving).
    """

    embeddings: jax.Array
    actions: jax.Array
    surfaces: jax.Array
    mask: jax.Array
    candidate_embedding: jax.Array
    dense: jax.Array
    categorical: jax.Array
    token_age_hours: Optional[jax.Array] = None

    @classmethod
    def from_examples(cls, ex: TrainingExamples, token_ages: bool = False) -> "ModelInputs":
        """Take the model's fields of a logged batch (ids and timestamps stay on the host; with
        ``token_ages`` the token timestamps become ages in hours relative to the request)."""
        age = None
        if token_ages:
            age = (ex.request_timestamp[:, None] - ex.s_all.timestamps) / 3600.0
            age = np.where(ex.s_all_mask, np.maximum(age, 0.0), 0.0).astype(np.float32)
        return cls(embeddings=ex.s_all.embeddings, actions=ex.s_all.actions,
                   surfaces=ex.s_all.surfaces.astype(np.int32), mask=ex.s_all_mask,
                   candidate_embedding=ex.candidate_embedding, dense=ex.dense,
                   categorical=ex.categorical, token_age_hours=age)
