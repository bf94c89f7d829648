"""Scoring whole requests with M-FALCON: each request's history once, then all its candidates.

Shared by training on request-level data (``transact_jax.train.requests``) and the serving
forward: both hold a batch of U requests as jagged sequence families and N candidates with
``cand_to_req`` (the de-duplicated layout), as a dict of device arrays named like the serving
arena's leaves (``"ll.embeddings"`` (T, D) int8, ``"ll.actions"``, ``"ll.surfaces"``,
``"ll.offsets"`` (U,) int32, ``"ll.lengths"`` (U,) int32, the same for ``rt`` and ``imp``, and
``"cand_embedding"`` (N, D) int8, ``"dense"``, ``"categorical"``, ``"cand_to_req"`` (N,) int32).

For a model whose history does not depend on the candidate
(:func:`transact_jax.model.sequence.hstu.shared_history`: HSTU with b_m > 1 reading S_LL by recency
and S_RT[:r]), :func:`request_logits` builds the S_all of one stand-in candidate per request (the
segments it reads are the same for every candidate) and scores b_m candidates of a request per
encoder pass after that history ("Actions Speak Louder than Words", Section 3.4). The logits equal
the model's on each candidate's own logged S_all.
"""
from __future__ import annotations

from typing import Mapping, Optional

import jax
import jax.numpy as jnp

from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data.device_features import DeviceSequences, select_s_all_device
from transact_jax.model.inputs import ModelInputs

FAMILIES = ("ll", "rt", "imp")


def request_logits(model, arrays: Mapping[str, jax.Array], feat: FeatureConfig,
                   sel: SelectionConfig, impl: str,
                   dropout_key: Optional[jax.Array] = None) -> jax.Array:
    """Logits (N, H) of every candidate of the requests in ``arrays`` (module docstring) through
    ``model`` (a bound :class:`~transact_jax.model.ranking.RankingModel`); ``impl``: the NN
    search's (unused segments aside, S_all assembly goes through it); ``dropout_key``: training."""
    u = arrays["ll.lengths"].shape[0]
    seqs = [DeviceSequences(arrays[f"{f}.embeddings"], arrays[f"{f}.actions"], arrays[f"{f}.surfaces"],
                            arrays[f"{f}.lengths"], arrays[f"{f}.offsets"]) for f in FAMILIES]
    stand_in = jnp.zeros((u, feat.embedding_dim), jnp.int8)
    h = select_s_all_device(*seqs, stand_in, jnp.arange(u, dtype=jnp.int32), feat=feat, sel=sel,
                            impl=impl)
    history = ModelInputs(embeddings=h.embeddings, actions=h.actions,
                          surfaces=h.surfaces.astype(jnp.int32), mask=h.mask,
                          candidate_embedding=stand_in,
                          dense=jnp.zeros((u, feat.num_dense), jnp.float32),
                          categorical=jnp.zeros((u, len(feat.categorical_vocab_sizes)), jnp.int32))
    n = arrays["cand_embedding"].shape[0]
    cands = ModelInputs(embeddings=jnp.zeros((n, 0, feat.embedding_dim), jnp.int8),
                        actions=jnp.zeros((n, 0), feat.action_dtype),
                        surfaces=jnp.zeros((n, 0), jnp.int32), mask=jnp.zeros((n, 0), bool),
                        candidate_embedding=arrays["cand_embedding"], dense=arrays["dense"],
                        categorical=arrays["categorical"])
    return model.mfalcon_logits(history, cands, arrays["cand_to_req"], dropout_key=dropout_key)
