"""Builders of small random inputs for tests, and shared test settings (not a test module)."""
from __future__ import annotations

import contextlib

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


@contextlib.contextmanager
def persistent_compile_cache(directory: str):
    """JAX's persistent compilation cache in ``directory``, for everything compiled inside (so a test
    module's repeated training runs compile each step once); the previous settings after."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    cc.reset_cache()
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    try:
        yield
    finally:
        for n, v in old.items():
            jax.config.update(n, v)
        cc.reset_cache()
