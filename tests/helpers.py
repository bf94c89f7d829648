"""Builders of small random inputs for tests (not a test module)."""
from __future__ import annotations

import numpy as np

from transact_jax.config import FeatureConfig
from transact_jax.data.schema import JaggedSequences, RequestBatch, TokenFields


def random_jagged(rng: np.random.Generator, lengths, feat: FeatureConfig = FeatureConfig(),
                  t0: int = 1_600_000_000) -> JaggedSequences:
    """Random valid jagged sequences with the given lengths, chronological timestamps."""
    lengths = np.asarray(lengths, np.int64)
    t = int(lengths.sum())
    tokens = TokenFields(
        timestamps=(t0 + np.sort(rng.integers(0, 10**7, t))).astype(np.int64),
        actions=rng.integers(0, 1 << feat.num_actions, t).astype(feat.action_dtype),
        surfaces=rng.integers(0, feat.num_surfaces, t).astype(np.int16),
        embeddings=rng.integers(-127, 128, (t, feat.embedding_dim)).astype(np.int8),
    )
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return JaggedSequences(tokens, offsets)


def random_requests(rng: np.random.Generator, ll_lens, rt_lens, imp_lens, cands_per_request,
                    feat: FeatureConfig = FeatureConfig(), labels: bool = True) -> RequestBatch:
    """A random valid :class:`RequestBatch` with the given sequence lengths and candidate counts."""
    u = len(ll_lens)
    counts = np.asarray(cands_per_request)
    n = int(counts.sum())
    return RequestBatch(
        ll=random_jagged(rng, ll_lens, feat), rt=random_jagged(rng, rt_lens, feat),
        imp=random_jagged(rng, imp_lens, feat),
        user_id=rng.integers(0, 10**6, u).astype(np.int64),
        request_id=np.arange(u, dtype=np.int64),
        request_timestamp=np.full(u, 1_700_000_000, np.int64),
        cand_item_id=rng.integers(0, 10**9, n).astype(np.int64),
        cand_embedding=rng.integers(-127, 128, (n, feat.embedding_dim)).astype(np.int8),
        cand_to_req=np.repeat(np.arange(u), counts).astype(np.int32),
        dense=rng.normal(size=(n, feat.num_dense)).astype(np.float32),
        categorical=np.stack([rng.integers(0, v, n) for v in feat.categorical_vocab_sizes], 1).astype(np.int32),
        labels=rng.integers(0, 2, (n, feat.num_heads)).astype(np.uint8) if labels else None,
    )
