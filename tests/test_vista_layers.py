"""VISTA's layers: stage-1 summaries (seeds never see each other, padding never matters, causal
option, QLA and softmax variants), the reconstruction loss (no leak of the next token, gradients
reach the seeds) and stage-2 target attention (candidates independent)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transact_jax.config_json import ConfigError
from transact_jax.model.vista import (
    QlaLayer,
    ReconstructionDecoder,
    TargetAttention,
    VistaConfig,
    VistaSummarizer,
    pack_with_seeds,
)

CFG = VistaConfig(num_seeds=4, d_model=16, num_heads=2, num_layers=2, attention_impl="xla")
LENGTHS = [5, 0, 7]          # an empty history included


def histories(seed=0, length=8, lengths=LENGTHS, garbage=0.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(len(lengths), length, CFG.d_model)).astype(np.float32)
    mask = np.arange(length)[None, :] < np.asarray(lengths)[:, None]
    x[~mask] = garbage
    return jnp.asarray(x), jnp.asarray(mask)


# a perturbation along a random direction (adding a constant to every feature would vanish in the
# layer norms)
BUMP = jnp.asarray(np.random.default_rng(99).normal(size=16).astype(np.float32))


def summarizer(cfg=CFG, seed=1):
    return VistaSummarizer(cfg, rngs=nnx.Rngs(seed))


def test_pack_with_seeds_layout():
    x, mask = histories()
    seeds = jnp.arange(4 * 16, dtype=jnp.float32).reshape(4, 16) + 100
    tokens, offsets, rows = pack_with_seeds(x, mask, seeds)
    np.testing.assert_array_equal(offsets, [0, 9, 13, 24])
    np.testing.assert_array_equal(rows, [[5, 6, 7, 8], [9, 10, 11, 12], [20, 21, 22, 23]])
    np.testing.assert_array_equal(tokens[:5], x[0, :5])
    np.testing.assert_array_equal(tokens[13:20], x[2, :7])
    np.testing.assert_array_equal(tokens[rows[1]], seeds)
    assert not np.asarray(tokens[24:]).any()


@pytest.mark.parametrize("attention", ["qla", "softmax"])
def test_seeds_never_see_each_other_and_padding_never_matters(attention):
    cfg = dataclasses.replace(CFG, attention=attention, max_seq_len=16)
    model = summarizer(cfg)
    x, mask = histories()
    base = np.asarray(model(x, mask))
    assert base.shape == (3, 4, 16) and np.isfinite(base).all()
    x_bad, _ = histories(garbage=1e3)                  # padding tokens with large values
    np.testing.assert_allclose(np.asarray(model(x_bad, mask)), base, rtol=1e-5, atol=1e-5)
    seeds = np.asarray(model.seeds[...]).copy()
    seeds[2] += 5.0
    model.seeds[...] = jnp.asarray(seeds)
    moved = np.asarray(model(x, mask))
    others = [0, 1, 3]
    np.testing.assert_allclose(moved[:, others], base[:, others], rtol=1e-5, atol=1e-5)
    assert np.abs(moved[:, 2] - base[:, 2]).max() > 1e-3


def test_histories_change_their_own_summary_only():
    model = summarizer()
    x, mask = histories()
    base = np.asarray(model(x, mask))
    x2 = x.at[2, 3].add(BUMP)
    moved = np.asarray(model(x2, mask))
    np.testing.assert_allclose(moved[:2], base[:2], rtol=1e-6, atol=1e-6)
    assert np.abs(moved[2] - base[2]).max() > 1e-4
    # the empty history: the seeds see only themselves, whatever the others hold
    np.testing.assert_allclose(np.asarray(model(x * 3.0, mask))[1], base[1], rtol=1e-6, atol=1e-6)


def test_causal_history_rows_ignore_later_tokens():
    cfg = dataclasses.replace(CFG, causal=True)
    layer = QlaLayer(cfg, rngs=nnx.Rngs(3))
    x, mask = histories()
    seeds = jnp.asarray(np.random.default_rng(7).normal(size=(4, 16)).astype(np.float32))
    tokens, offsets, _ = pack_with_seeds(x, mask, seeds)
    nt = jnp.full((3,), 4, jnp.int32)
    base = np.asarray(layer(tokens, offsets, nt))
    later = np.asarray(layer(tokens.at[3].add(BUMP), offsets, nt))      # history row 3 of user 0
    np.testing.assert_allclose(later[:3], base[:3], rtol=1e-6, atol=1e-6)
    assert np.abs(later[4] - base[4]).max() > 1e-4                      # a later row sees it
    assert np.abs(later[5:9] - base[5:9]).max() > 1e-4                  # so do the seeds
    np.testing.assert_allclose(later[9:], base[9:], rtol=1e-6, atol=1e-6)   # other users do not
    full = QlaLayer(dataclasses.replace(CFG, causal=False), rngs=nnx.Rngs(3))
    assert np.abs(np.asarray(full(tokens.at[3].add(BUMP), offsets, nt))[:3]
                  - np.asarray(full(tokens, offsets, nt))[:3]).max() > 1e-4


def test_reconstruction_loss_does_not_leak_the_next_token_and_trains_the_seeds():
    model, dec = summarizer(), ReconstructionDecoder(CFG, rngs=nnx.Rngs(4))
    x, mask = histories()
    s = model(x, mask)
    v = np.asarray(dec.outputs(s, x))
    v2 = np.asarray(dec.outputs(s, x.at[0, 4].add(BUMP)))              # change u_5 of user 0
    np.testing.assert_allclose(v2[0, :4], v[0, :4], rtol=1e-6, atol=1e-6)   # v_1..v_4 do not see it
    assert np.abs(v2[0, 4:] - v[0, 4:]).max() > 1e-4                    # v_5 on do
    loss = float(dec(s, x, mask))
    assert np.isfinite(loss) and loss > 0

    def total(m):
        return dec(m(x, mask), x, mask)

    grads = nnx.grad(total)(model)
    assert float(jnp.abs(grads.seeds[...]).max()) > 0
    # only pairs of valid tokens count: garbage in the padding changes nothing
    x_bad, _ = histories(garbage=50.0)
    assert float(dec(s, x_bad, mask)) == pytest.approx(loss, rel=1e-5)
    with pytest.raises(ConfigError, match="attention"):
        VistaConfig(attention="linear")
    with pytest.raises(ConfigError, match="num_heads"):
        VistaConfig(d_model=10, num_heads=3)


def test_target_attention_scores_candidates_independently():
    stage2 = TargetAttention(CFG, rngs=nnx.Rngs(5))
    rng = np.random.default_rng(6)
    cands = jnp.asarray(rng.normal(size=(5, 16)).astype(np.float32))
    summary = jnp.asarray(rng.normal(size=(5, 4, 16)).astype(np.float32))
    out = np.asarray(stage2(cands, summary))
    out2 = np.asarray(stage2(cands.at[1].add(BUMP), summary.at[3].add(BUMP)))
    np.testing.assert_allclose(out2[[0, 2, 4]], out[[0, 2, 4]], rtol=1e-6, atol=1e-6)
    assert np.abs(out2[1] - out[1]).max() > 1e-4 and np.abs(out2[3] - out[3]).max() > 1e-4
    jit_out = np.asarray(jax.jit(lambda c, s: stage2(c, s))(cands, summary))
    np.testing.assert_allclose(jit_out, out, rtol=1e-5, atol=1e-5)
