"""The jitted serving forward: staged bytes -> S_all on device -> ranking model -> probabilities.

One jitted function per (experiment config, layout, NN implementation), compiled once per bucket
(its arena layout is a static argument, so each bucket has its own executable and nothing else
varies). Inside:

1. unpack the staged uint8 buffer into typed arrays (:meth:`~.layout.ArenaLayout.unpack`);
2. NN selection and S_all on the device, by
   :func:`transact_jax.data.device_features.select_s_all_device` (the slot semantics of
   :mod:`transact_jax.data.s_all`, shared with offline logging), with the NN search's ``impl``
   (``"pallas_triton"``: the fused int8 kernel; ``"xla"``: the jnp reference):

   * dedup layout: the search runs on the de-duplicated jagged sequences, one copy per request;
   * broadcast layout (the naive baseline): each candidate carries its own dense copy of its
     request's sequences and the search runs on those copies, the way a server that broadcasts
     request features per candidate computes it;

3. the ranking model on S_all and the candidate features (encoder by SKUT or XLA, as the model
   config says), sigmoid per head.

One history per request (a family that scores a request's candidates after one shared history,
HSTU's M-FALCON with ``ModelConfig.b_m`` > 1 or VISTA's per-user summary, reading a history that
does not depend on the candidate: :func:`transact_jax.model.sequence.hstu.shared_history`), dedup
layout: S_all is built once per request instead of per candidate and the model reads it once for
all of the request's candidates (:func:`transact_jax.model.request_forward.request_logits`); the
scores are the same.

Both layouts select exactly the tokens of the logged-feature path (tests compare them), so serving
scores equal the trained model's scores on logged features.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict

import jax
import jax.numpy as jnp

from pallas_kernels._common import IMPLS
from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data.device_features import DeviceSAll, DeviceSequences, select_s_all_device
from transact_jax.model.builder import model_def
from transact_jax.model.inputs import ModelInputs
from transact_jax.model.request_forward import request_logits
from transact_jax.model.sequence.hstu import shared_history
from transact_jax.run.config import ExperimentConfig
from transact_jax.serving.layout import ArenaLayout

def _s_all(arrays: Dict[str, jax.Array], layout: ArenaLayout, feat: FeatureConfig,
           sel: SelectionConfig, impl: str) -> DeviceSAll:
    """S_all from the unpacked arena: jagged sequences with ``cand_to_req`` (dedup) or one dense
    copy per candidate (broadcast)."""
    dedup = layout.bucket.layout == "dedup"
    seqs = [DeviceSequences(arrays[f"{f}.embeddings"], arrays[f"{f}.actions"],
                            arrays[f"{f}.surfaces"], arrays[f"{f}.lengths"],
                            arrays[f"{f}.offsets"] if dedup else None) for f in ("ll", "rt", "imp")]
    return select_s_all_device(*seqs, arrays["cand_embedding"],
                               arrays["cand_to_req"] if dedup else None,
                               feat=feat, sel=sel, impl=impl)


@functools.lru_cache(maxsize=64)
def make_forward(cfg: ExperimentConfig, nn_impl: str) -> Callable:
    """``forward(params, staged_u8, layout) -> probabilities (N_bucket, H)``, jitted with ``layout``
    static (one executable per bucket). Cached per (config, NN implementation), so Rankers with the
    same config share compiled executables. ``nn_impl`` is the NN search's ``impl``."""
    if nn_impl not in IMPLS:
        raise ValueError(f"nn_impl: expected one of {IMPLS}, got {nn_impl!r}")
    if "age" in cfg.model.token_features:
        raise ValueError("model.token_features: the serving engine does not ship token timestamps, "
                         "so it cannot serve a model with the 'age' token feature")
    mdef = model_def(cfg.feature, cfg.selection, cfg.model)
    feat, sel = cfg.feature, cfg.selection
    mfalcon = shared_history(sel, cfg.model) is None

    def forward(params, staged: jax.Array, layout: ArenaLayout) -> jax.Array:
        arrays = layout.unpack(staged)
        n = layout.bucket.candidates
        if mfalcon and layout.bucket.layout == "dedup":
            return jax.nn.sigmoid(request_logits(mdef.bind(params), arrays, feat, sel,
                                                 nn_impl).astype(jnp.float32))
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
