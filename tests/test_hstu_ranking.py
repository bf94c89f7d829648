"""HSTU as the ranking tower's sequence model (``sequence_model="hstu"``, the ``hstu`` preset) and
the M-FALCON micro-batching of "Actions Speak Louder than Words" (Section 3.4): the family builds
and trains through the tower, the jagged packing (non-prefix masks, padding, other examples),
bf16, the Pallas attention kernel against XLA, config errors, and M-FALCON's b_m candidates per
pass scoring each candidate exactly as its own pass does."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels.hstu_attention.reference import NUM_POS_BUCKETS
from transact_jax.config_json import ConfigError
from transact_jax.model.builder import build_model, model_def
from transact_jax.model.config import ALL_SEGMENTS, ModelConfig
from transact_jax.model.hstu import HSTUConfig, HSTUEncoder, mfalcon_pack, mfalcon_target_outputs
from transact_jax.model.sequence.hstu import HSTUSequence, attention_impl, pack_jagged
from transact_jax.run.config import ExperimentConfig, TrainConfig
from transact_jax.run.presets import PRESET_NAMES, preset
from transact_jax.run.state import init_state
from transact_jax.train.objective import Targets
from transact_jax.train.step import make_train_step
from tests.test_model import FEAT, L, N, SEL, garbage_at, random_inputs, replace


def base(**model) -> ExperimentConfig:
    return ExperimentConfig(selection=SEL, model=ModelConfig(mlp_dims=(32,), **model))


@functools.lru_cache(maxsize=None)
def built(dtype: str = "float32"):
    """(cfg, model definition, params, jitted forward) of the ``hstu`` preset on a tiny config."""
    cfg = preset("hstu", base(dtype=dtype))
    mdef, params = build_model(cfg.feature, cfg.selection, cfg.model, 0)
    return cfg, mdef, params, jax.jit(lambda p, x: mdef.bind(p)(x))


def logits(x, params=None, dtype="float32") -> np.ndarray:
    _, _, p, fwd = built(dtype)
    return np.asarray(fwd(p if params is None else params, x).logits, np.float32)


def make_sequence(cfg: ModelConfig, length: int) -> HSTUSequence:
    """The family's module, initialized in one compiled program (eager init compiles every op)."""
    return nnx.jit(lambda: HSTUSequence(FEAT, cfg, length, rngs=nnx.Rngs(0)))()


@nnx.jit
def encode(encoder: HSTUEncoder, tokens, offsets, num_targets=None):
    return encoder(tokens, offsets, num_targets=num_targets)


def with_random_rab(encoder: HSTUEncoder, seed: int = 1) -> HSTUEncoder:
    """Nonzero positional biases (they start at zero), so that positions change the outputs."""
    for i, layer in enumerate(encoder.layers):
        layer.rab_pos[...] = jax.random.normal(jax.random.key(seed + i), (NUM_POS_BUCKETS,))
    return encoder


# ------------------------------------------------------------------------- family and preset


def test_preset_builds_and_runs():
    cfg, mdef, params, fwd = built()
    assert "hstu" in PRESET_NAMES
    assert (cfg.model.sequence_model, cfg.model.segments, cfg.train.nal_negatives) == \
        ("hstu", ALL_SEGMENTS, "none")
    assert set(params["sequence"]) == {"tokens", "item_proj", "target", "encoder", "out"}
    enc = mdef.bind(params).sequence.encoder.cfg
    assert (enc.max_seq_len, enc.d_qk, enc.d_v, enc.num_heads, enc.num_layers) == (L + 1, 64, 64, 1, 2)
    assert enc.use_rab_pos and not enc.use_rab_time and enc.attention_impl == "xla"
    out = fwd(params, random_inputs())
    assert out.logits.shape == (N, FEAT.num_heads) and out.nal_user is None
    assert np.all(np.isfinite(np.asarray(out.logits)))
    assert np.ptp(np.asarray(out.logits), axis=0).max() > 1e-4


def test_pack_jagged_compacts_rows_in_order_and_appends_the_target():
    history = jnp.arange(2 * 4, dtype=jnp.float32).reshape(2, 4, 1) + 1.0     # tokens 1..8
    mask = jnp.array([[False, True, False, True], [False, False, False, False]])
    target = jnp.array([[-1.0], [-2.0]])
    tokens, offsets, rows = jax.jit(pack_jagged)(history, mask, target)
    np.testing.assert_array_equal(offsets, [0, 3, 4])
    np.testing.assert_array_equal(rows, [2, 3])
    np.testing.assert_array_equal(tokens[:, 0], [2.0, 4.0, -1.0, -2.0, 0, 0, 0, 0, 0, 0])


def test_padding_and_masked_out_tokens_do_not_matter():
    x = random_inputs(3)
    mask = np.asarray(x.mask)
    lx = logits(x)
    np.testing.assert_allclose(logits(garbage_at(x, ~mask, seed=4)), lx, rtol=1e-6, atol=1e-6)
    # masking a valid token out == that token being anything else, masked out
    one = np.zeros_like(mask)
    one[1, np.flatnonzero(mask[1])[2]] = True
    off = replace(x, mask=mask & ~one)
    np.testing.assert_allclose(logits(garbage_at(off, one, seed=5)), logits(off), rtol=1e-6,
                               atol=1e-6)
    assert np.abs(logits(off)[1] - lx[1]).max() > 1e-5              # it did matter while valid
    np.testing.assert_allclose(logits(off)[[0, 2, 3, 4, 5]], lx[[0, 2, 3, 4, 5]], rtol=1e-5,
                               atol=1e-6)
    # the history is read: the same garbage on valid tokens changes the logits
    assert np.abs(logits(garbage_at(x, mask, seed=4)) - lx).max() > 1e-4


def test_other_examples_do_not_matter():
    x, other = random_inputs(5), random_inputs(6)
    lx = logits(x)
    perm = np.array([3, 0, 5, 1, 4, 2])
    shuffled = jax.tree_util.tree_map(lambda a: np.asarray(a)[perm], x)
    np.testing.assert_allclose(logits(shuffled), lx[perm], rtol=1e-5, atol=1e-6)
    mixed = jax.tree_util.tree_map(lambda a, b: np.concatenate([np.asarray(a)[:2],
                                                                np.asarray(b)[2:]]), x, other)
    np.testing.assert_allclose(logits(mixed)[:2], lx[:2], rtol=1e-5, atol=1e-6)


def test_all_masked_rows_are_finite():
    x = random_inputs(13)
    m = np.array(x.mask)
    m[::2] = False
    lg = logits(replace(x, mask=m))
    assert np.all(np.isfinite(lg))


def test_bf16_close_to_f32():
    x = random_inputs(15)
    _, _, p32, _ = built()
    lg32, lg16 = logits(x), logits(x, p32, "bfloat16")
    err = np.abs(lg16 - lg32).max()
    assert np.all(np.isfinite(lg16)) and 0 < err < 0.05 + 0.05 * np.abs(lg32).max(), err


def test_train_step_reduces_the_loss():
    """The training loop's jitted step on the preset (with dropout): finite, and the loss of a
    fixed tiny batch goes down."""
    cfg = preset("hstu", dataclasses.replace(
        base(dropout=0.1), train=TrainConfig(batch_size=N, warmup_steps=1, learning_rate=3e-3)))
    mdef, state, opt = init_state(cfg)
    step = make_train_step(mdef, cfg, opt)
    x = random_inputs(17)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (N, FEAT.num_heads)).astype(np.float32)
    r = SEL.r
    targets = Targets(labels=labels, nal_target_mask=np.zeros((N, r), bool),
                      nal_negatives=np.zeros((N, r, FEAT.embedding_dim), np.int8),
                      nal_negative_mask=np.zeros((N, r), bool),
                      user_id=np.arange(N, dtype=np.int32), example_weight=np.ones(N, np.float32))
    losses = []
    for _ in range(8):
        state, m = step(state, x, targets)
        assert bool(m["finite"]) and float(m["grad_norm"]) > 0
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0], losses


# ----------------------------------------------------------------- kernel, token features, errors


def _sequence_inputs(n=3, length=6, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(n, length, FEAT.embedding_dim)), jnp.float32),
            jnp.asarray(rng.integers(0, 1 << FEAT.num_actions, (n, length)), FEAT.action_dtype),
            jnp.asarray(rng.integers(0, FEAT.num_surfaces, (n, length)), jnp.int32),
            jnp.asarray(rng.random((n, length)) < 0.7),
            jnp.asarray(rng.normal(size=(n, FEAT.embedding_dim)), jnp.float32))


def test_pallas_kernel_matches_xla():
    """encoder_impl="pallas_triton" (Pallas interpret mode on CPU) against "xla", per-head width 16:
    the sequence vector and its gradients."""
    emb, acts, surf, mask, cand = _sequence_inputs()
    res = {}
    for impl in ("xla", "pallas_triton"):
        cfg = ModelConfig(sequence_model="hstu", d_model=32, num_heads=2, num_layers=1,
                          encoder_impl=impl)
        module = make_sequence(cfg, emb.shape[1])
        with_random_rab(module.encoder)
        assert module.encoder.cfg.attention_impl == impl

        @nnx.jit
        def value_and_grads(m):
            def vector(m):
                return m(emb, acts, surf, mask, cand, jnp.float32)[0]
            return vector(m), nnx.state(nnx.grad(lambda m: jnp.sum(vector(m) ** 2))(m), nnx.Param)

        res[impl] = value_and_grads(module)
    np.testing.assert_allclose(res["pallas_triton"][0], res["xla"][0], rtol=1e-4, atol=1e-5)
    for (path, g), (_, want) in zip(jax.tree_util.tree_leaves_with_path(res["pallas_triton"][1]),
                                    jax.tree_util.tree_leaves_with_path(res["xla"][1])):
        np.testing.assert_allclose(g, want, rtol=1e-3, atol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_token_features_are_added_to_history_tokens():
    emb, acts, surf, mask, cand = _sequence_inputs()
    cfg = ModelConfig(sequence_model="hstu", d_model=32, token_features=("similarity", "age"))
    module = make_sequence(cfg, emb.shape[1])
    vector = nnx.jit(lambda m, age: m(emb, acts, surf, mask, cand, jnp.float32, None, age))
    age = jnp.full(mask.shape, 5.0)
    v, nal = vector(module, age)
    assert v.shape == (3, cfg.seq_out_dim) and nal is None
    assert not np.allclose(vector(module, age * 100)[0], v)
    with pytest.raises(ValueError, match="token_features"):
        vector(module, None)


@pytest.mark.parametrize("model", [dict(d_model=48, num_heads=1), dict(d_model=64, num_heads=8)])
def test_kernel_width_errors_name_encoder_impl(model):
    with pytest.raises(ConfigError, match="encoder_impl"):
        ModelConfig(sequence_model="hstu", encoder_impl="pallas_triton", **model)
    with pytest.raises(ConfigError, match=r"model\.encoder_impl"):
        ExperimentConfig.from_dict({"model": {"sequence_model": "hstu",
                                              "encoder_impl": "pallas_triton", **model},
                                    "train": {"nal_negatives": "none"}})
    # "auto" falls back to XLA where the kernel cannot run; other families are not concerned
    assert attention_impl(ModelConfig(sequence_model="hstu", encoder_impl="auto", **model)) == "xla"
    ModelConfig(sequence_model="transact", encoder_impl="pallas_triton", **model)


def test_hstu_has_no_next_action_loss_and_needs_no_early_fusion():
    with pytest.raises(ValueError, match=r"train\.nal_negatives"):
        ExperimentConfig(model=ModelConfig(sequence_model="hstu"))
    cfg = preset("hstu", base(d_model=48, num_heads=3))          # d_model != 2 x embedding_dim
    params = model_def(cfg.feature, cfg.selection, cfg.model).template["sequence"]
    assert params["item_proj"]["kernel"].shape == (FEAT.embedding_dim, 48)


# ------------------------------------------------------------------------------------ M-FALCON

N_HIST, M, B_M = 5, 7, 3
ENC = HSTUConfig(num_layers=2, num_heads=2, d_model=16, d_qk=8, d_v=8, max_seq_len=N_HIST + B_M,
                 attention_impl="xla")


@pytest.fixture(scope="module")
def mfalcon_case():
    encoder = with_random_rab(nnx.jit(lambda: HSTUEncoder(ENC, rngs=nnx.Rngs(0)))())
    kh, kc = jax.random.split(jax.random.key(3))
    return (encoder, jax.random.normal(kh, (N_HIST, ENC.d_model)),
            jax.random.normal(kc, (M, ENC.d_model)))


def one_pass_per_candidate(encoder, history, candidates) -> np.ndarray:
    """Each candidate in its own pass: history + that candidate, a plain causal mask."""
    offsets = jnp.array([0, N_HIST + 1], jnp.int32)
    return np.stack([np.asarray(encode(encoder, jnp.concatenate([history, c[None]]), offsets)[N_HIST])
                     for c in candidates])


def test_mfalcon_layout():
    tokens, offsets, num_targets = mfalcon_pack(jnp.arange(N_HIST) * 10, jnp.arange(M) + 100, B_M)
    np.testing.assert_array_equal(offsets, [0, 8, 16, 22])       # ceil(7 / 3) = 3, the last ragged
    np.testing.assert_array_equal(num_targets, [3, 3, 1])
    hist = [0, 10, 20, 30, 40]
    np.testing.assert_array_equal(tokens, hist + [100, 101, 102] + hist + [103, 104, 105] + hist
                                  + [106])
    np.testing.assert_array_equal(mfalcon_target_outputs(tokens, N_HIST, M, B_M), np.arange(M) + 100)
    with pytest.raises(ValueError, match="b_m"):
        mfalcon_pack(jnp.zeros((2, 4)), jnp.zeros((3, 4)), 0)
    with pytest.raises(ValueError, match="outputs"):
        mfalcon_target_outputs(tokens[:-1], N_HIST, M, B_M)


def test_mfalcon_equals_one_pass_per_candidate(mfalcon_case):
    """b_m = 3 candidates per pass (3 micro-batches, the last ragged) score like 7 separate passes;
    without the target rule (plain causal) later candidates of a micro-batch see earlier ones."""
    encoder, history, candidates = mfalcon_case
    tokens, offsets, num_targets = mfalcon_pack(history, candidates, B_M)
    want = one_pass_per_candidate(encoder, history, candidates)
    got = mfalcon_target_outputs(encode(encoder, tokens, offsets, num_targets), N_HIST, M, B_M)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    causal = np.asarray(mfalcon_target_outputs(encode(encoder, tokens, offsets), N_HIST, M, B_M))
    first = np.arange(M) % B_M == 0                  # the first candidate of each micro-batch
    np.testing.assert_allclose(causal[first], want[first], rtol=1e-5, atol=1e-5)
    assert np.abs(causal[~first] - want[~first]).max(axis=-1).min() > 1e-3


def test_mfalcon_scores_a_request_like_the_ranking_family():
    """One request's m candidates through the family's own token encoding and encoder, packed
    b_m per pass, give the sequence vectors of m separate examples sharing that history. (The
    "seq_len" normalizer divides by the encoder's max_seq_len = L + 1, so a micro-batch of the
    trained encoder holds n + b_m <= L + 1 rows: here n = 3 of L = 6 slots are valid.)"""
    emb, acts, surf, _, cand = _sequence_inputs(n=M, seed=4)
    mask = jnp.array([[True, False, True, False, False, True]] * M)
    emb, acts, surf = (jnp.broadcast_to(a[:1], a.shape) for a in (emb, acts, surf))
    cfg = ModelConfig(sequence_model="hstu", d_model=16, num_heads=1, num_layers=2)
    module = make_sequence(cfg, emb.shape[1])
    with_random_rab(module.encoder)
    history_rows = np.flatnonzero(np.asarray(mask[0]))

    @nnx.jit
    def both(m):
        want, _ = m(emb, acts, surf, mask, cand, jnp.float32)
        tokens = m.item_proj(emb[0]) + m.tokens(acts[:1], surf[:1])[0]
        packed, offsets, num_targets = mfalcon_pack(tokens[history_rows],
                                                    m.item_proj(cand) + m.target[...], B_M)
        out = m.encoder(packed, offsets, num_targets=num_targets)
        return want, m.out(mfalcon_target_outputs(out, len(history_rows), M, B_M))

    want, got = both(module)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
