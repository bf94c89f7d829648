"""The jitted serving forward: staged bytes -> S_all on device -> ranking model -> probabilities.

One jitted function per (experiment config, layout, NN implementation), compiled once per bucket
(its arena layout is a static argument, so each bucket has its own executable and nothing else
varies). Inside:

1. unpack the staged uint8 buffer into typed arrays (:meth:`~.layout.ArenaLayout.unpack`);
2. NN selection and S_all assembly (SPEC §2) on the device:

   * dedup layout: :func:`transact_jax.data.device_features.select_s_all_device`, which runs the NN
     search on the de-duplicated jagged sequences (``impl="pallas"``: the fused int8 kernel
     ``nn_search_jagged``, one copy of each sequence per request; ``impl="xla"``: the jnp reference);
   * broadcast layout (the naive baseline): NN search on each candidate's own copy of the sequences
     (:func:`select_s_all_broadcast`), the way a server that broadcasts request features per
     candidate computes it;

3. the ranking model on S_all and the candidate features (encoder by SKUT or XLA, as the model
   config says), sigmoid per head.

Both layouts select exactly the tokens of the logged-feature path (tests compare them), so serving
scores equal the trained model's scores on logged features.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict

import jax
import jax.numpy as jnp

from pallas_kernels.int8_codec import dequantize_int8, l2_normalize
from pallas_kernels.nn_search import nn_search_jagged
from pallas_kernels.nn_search_reference import masked_top_k, normalized_sequence
from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data.device_features import (
    DeviceSAll,
    DeviceSequences,
    assemble_s_all,
    recent_index,
    select_s_all_device,
)
from transact_jax.model.inputs import ModelInputs
from transact_jax.serving.layout import ArenaLayout
from transact_jax.train.config import ExperimentConfig
from transact_jax.train.state import model_def

NN_IMPLS = ("pallas", "xla")


def _dense_search(emb: jax.Array, lengths: jax.Array, cand: jax.Array, k: int, scale: float,
                  impl: str) -> jax.Array:
    """NN(S_n, c_n; k) where candidate n has its own sequence ``emb[n]`` (N, L, D) int8."""
    n, width, d = emb.shape
    if k == 0:
        return jnp.zeros((n, 0), jnp.int32)
    if impl == "pallas":
        offsets = jnp.arange(n, dtype=jnp.int32) * width
        idx, _ = nn_search_jagged(emb.reshape(n * width, d), offsets, lengths, cand,
                                  jnp.arange(n, dtype=jnp.int32), k=k, scale=scale)
        return idx
    # the reference's arithmetic (elementwise product + sum: position-invariant), per candidate
    scores = jnp.sum(l2_normalize(cand)[:, None, :] * normalized_sequence(emb, scale), axis=-1)
    valid = jnp.arange(width, dtype=jnp.int32)[None, :] < lengths[:, None]
    idx, _ = masked_top_k(scores, valid, k)
    return idx


def _take(a: jax.Array, idx: jax.Array) -> jax.Array:
    """``a[n, idx[n, j]]`` for (N, L, ...) ``a``, zeros where ``idx == -1``."""
    mask = idx >= 0
    safe = jnp.where(mask, idx, 0)
    extra = a.ndim - 2
    got = jnp.take_along_axis(a, safe.reshape(safe.shape + (1,) * extra), axis=1)
    keep = mask.reshape(mask.shape + (1,) * extra)
    return jnp.where(keep, got, jnp.zeros((), a.dtype))


def select_s_all_broadcast(fams: Dict[str, Dict[str, jax.Array]], cand_embedding: jax.Array, *,
                           feat: FeatureConfig, sel: SelectionConfig, impl: str) -> DeviceSAll:
    """S_all from the broadcast layout: ``fams[f]`` holds ``embeddings`` (N, L_f, D), ``actions``,
    ``surfaces`` (N, L_f) and ``lengths`` (N,) of candidate n's own copy of family f."""
    scale = feat.quant_scale
    cand = dequantize_int8(cand_embedding, scale, jnp.float32)
    ll, rt, imp = fams["ll"], fams["rt"], fams["imp"]
    rt_old = jnp.maximum(rt["lengths"] - sel.r, 0)
    index = {
        "ll": (ll, _dense_search(ll["embeddings"], ll["lengths"], cand, sel.k_ll, scale, impl)),
        "rt_recent": (rt, recent_index(rt["lengths"], sel.r)),
        "rt_nn": (rt, _dense_search(rt["embeddings"], rt_old, cand, sel.k_rt, scale, impl)),
        "imp": (imp, _dense_search(imp["embeddings"], imp["lengths"], cand, sel.k_imp, scale, impl)),
    }

    def gather(fam, idx):
        return (_take(fam["embeddings"], idx), _take(fam["actions"], idx),
                _take(fam["surfaces"], idx), idx >= 0)

    return assemble_s_all(index, gather, sel)


def _s_all(arrays: Dict[str, jax.Array], layout: ArenaLayout, feat: FeatureConfig,
           sel: SelectionConfig, impl: str) -> DeviceSAll:
    if layout.bucket.layout == "dedup":
        seqs = [DeviceSequences(arrays[f"{f}.embeddings"], arrays[f"{f}.actions"],
                                arrays[f"{f}.surfaces"], arrays[f"{f}.offsets"],
                                arrays[f"{f}.lengths"]) for f in ("ll", "rt", "imp")]
        return select_s_all_device(*seqs, arrays["cand_embedding"], arrays["cand_to_req"],
                                   feat=feat, sel=sel, impl=impl)
    fams = {f: {k: arrays[f"{f}.{k}"] for k in ("embeddings", "actions", "surfaces", "lengths")}
            for f in ("ll", "rt", "imp")}
    return select_s_all_broadcast(fams, arrays["cand_embedding"], feat=feat, sel=sel, impl=impl)


@functools.lru_cache(maxsize=64)
def make_forward(cfg: ExperimentConfig, nn_impl: str) -> Callable:
    """``forward(params, staged_u8, layout) -> probabilities (N_bucket, H)``, jitted with ``layout``
    static (one executable per bucket). Cached per (config, NN implementation), so Rankers with the
    same config share compiled executables."""
    if nn_impl not in NN_IMPLS:
        raise ValueError(f"nn_impl: expected one of {NN_IMPLS}, got {nn_impl!r}")
    mdef = model_def(cfg)
    feat, sel = cfg.feature, cfg.selection

    def forward(params, staged: jax.Array, layout: ArenaLayout) -> jax.Array:
        arrays = layout.unpack(staged)
        n = layout.bucket.candidates
        if cfg.model.uses_sequence:
            s_all = _s_all(arrays, layout, feat, sel, nn_impl)
            emb, act, surf, mask = s_all.embeddings, s_all.actions, s_all.surfaces, s_all.mask
        else:  # Wide&Deep reads no sequence: skip the NN search
            s = sel.s_all_len
            emb = jnp.zeros((n, s, feat.embedding_dim), jnp.int8)
            act = jnp.zeros((n, s), feat.action_dtype)
            surf = jnp.zeros((n, s), jnp.int16)
            mask = jnp.zeros((n, s), bool)
        inputs = ModelInputs(embeddings=emb, actions=act, surfaces=surf.astype(jnp.int32), mask=mask,
                             candidate_embedding=arrays["cand_embedding"], dense=arrays["dense"],
                             categorical=arrays["categorical"])
        return jax.nn.sigmoid(mdef.bind(params)(inputs).logits.astype(jnp.float32))

    return jax.jit(forward, static_argnames=("layout",))
