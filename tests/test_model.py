"""The ranking model: presets, eq. 4 feature encoding, masks, segments, causality, dtypes,
and the model / experiment configs (validation, JSON round trip, Table 2 presets)."""
from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels.int8_codec import dequantize_int8
from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.model import layers
from transact_jax.model.config import ALL_SEGMENTS, ModelConfig
from transact_jax.model.inputs import ModelInputs
from transact_jax.model.sequence import registry
from transact_jax.run.presets import PRESET_NAMES, RT_SEGMENTS, preset
from transact_jax.run.config import ExperimentConfig, TrainConfig
from transact_jax.model.builder import build_model

FEAT = FeatureConfig()
SEL = SelectionConfig(k_ll=8, r=8, k_rt=4, k_imp=4, num_nal_negatives=4, max_ll_len=500)
L = SEL.s_all_len  # 24
N = 6


def base(dtype: str = "float32") -> ExperimentConfig:
    return ExperimentConfig(selection=SEL, model=ModelConfig(mlp_dims=(32,), dtype=dtype))


@functools.lru_cache(maxsize=None)
def built(name: str, dtype: str = "float32"):
    """(cfg, model definition, params, jitted forward) of a preset on the tiny selection config."""
    cfg = preset(name, base(dtype))
    mdef, params = build_model(cfg.feature, cfg.selection, cfg.model, 0)
    fwd = jax.jit(lambda p, x: mdef.bind(p)(x))
    return cfg, mdef, params, fwd


def random_inputs(seed: int = 0, n: int = N) -> ModelInputs:
    """Random inputs; inside each segment valid tokens come first (ragged), as the logs store them.
    Row 0 has every segment full, so causality tests have valid tokens everywhere."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((n, L), bool)
    for _, s in SEL.segments:
        size = s.stop - s.start
        counts = rng.integers(1, size + 1, n)
        counts[0] = size
        mask[:, s] = np.arange(size)[None, :] < counts[:, None]
    return ModelInputs(
        embeddings=rng.integers(-127, 128, (n, L, FEAT.embedding_dim)).astype(np.int8),
        actions=rng.integers(1, 1 << FEAT.num_actions, (n, L)).astype(FEAT.action_dtype),
        surfaces=rng.integers(0, FEAT.num_surfaces, (n, L)).astype(np.int32),
        mask=mask,
        candidate_embedding=rng.integers(-127, 128, (n, FEAT.embedding_dim)).astype(np.int8),
        dense=rng.normal(size=(n, FEAT.num_dense)).astype(np.float32),
        categorical=np.stack([rng.integers(0, v, n) for v in FEAT.categorical_vocab_sizes],
                             1).astype(np.int32))


def replace(x: ModelInputs, **fields) -> ModelInputs:
    return dataclasses.replace(x, **fields)


def garbage_at(x: ModelInputs, where: np.ndarray, seed: int) -> ModelInputs:
    """``x`` with random embeddings / actions / surfaces at the (N, L) positions ``where``."""
    rng = np.random.default_rng(seed)
    emb = np.array(x.embeddings)
    emb[where] = rng.integers(-127, 128, emb[where].shape).astype(np.int8)
    act = np.array(x.actions)
    act[where] = rng.integers(0, 1 << FEAT.num_actions, act[where].shape).astype(act.dtype)
    surf = np.array(x.surfaces)
    surf[where] = rng.integers(0, FEAT.num_surfaces, surf[where].shape).astype(surf.dtype)
    return replace(x, embeddings=emb, actions=act, surfaces=surf)


def logits(name, x, params=None, dtype="float32"):
    _, _, p, fwd = built(name, dtype)
    out = fwd(p if params is None else params, x)
    return np.asarray(out.logits, np.float32), (None if out.nal_user is None
                                                else np.asarray(out.nal_user, np.float32))


# ------------------------------------------------------------------------------------ presets


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_preset_builds_and_runs(name):
    cfg, _, _, _ = built(name)
    x = random_inputs()
    lg, nal = logits(name, x)
    assert lg.shape == (N, FEAT.num_heads)
    assert np.all(np.isfinite(lg))
    nal_capable = cfg.model.sequence_model == "transact" and "rt_recent" in cfg.model.segments
    if nal_capable:
        assert nal.shape == (N, SEL.r, FEAT.embedding_dim)
        assert np.all(np.isfinite(nal))
    else:
        assert nal is None
    # logits depend on the example: not a constant model
    assert np.ptp(lg, axis=0).max() > 1e-4


def test_presets_match_table2():
    want = {  # name: (sequence_model, segments, nal_negatives, uses_nal)
        "wide_deep": ("none", (), "none", False),
        "bst": ("bst", ("rt_recent", "rt_nn"), "none", False),
        "transact": ("transact", ("rt_recent", "rt_nn"), "none", False),
        "transact_nal_inbatch": ("transact", ("rt_recent", "rt_nn"), "in_batch", True),
        "transact_nal_imp": ("transact", ("rt_recent", "rt_nn"), "impression", True),
        "transact_v2": ("transact", ("ll", "rt_recent", "rt_nn", "imp"), "impression", True),
        "hstu": ("hstu", ("ll", "rt_recent", "rt_nn", "imp"), "none", False),
        "vista": ("vista", ("ll", "rt_recent", "rt_nn", "imp"), "none", False),
    }
    assert PRESET_NAMES == tuple(want)
    assert RT_SEGMENTS == ("rt_recent", "rt_nn") and ALL_SEGMENTS == ("ll", "rt_recent", "rt_nn", "imp")
    b = ExperimentConfig(selection=SEL, model=ModelConfig(mlp_dims=(7,), d_model=64, num_layers=1),
                         train=TrainConfig(batch_size=12, w_nal=0.05, steps=3))
    for name, (seq, segs, neg, uses_nal) in want.items():
        c = preset(name, b, seed=5)
        assert c.name == name
        assert (c.model.sequence_model, c.model.segments, c.train.nal_negatives) == (seq, segs, neg)
        assert c.train.uses_nal == uses_nal
        # everything else comes from the base: same tower, same data, same training budget
        assert c.model.mlp_dims == (7,) and c.model.num_layers == 1
        assert c.selection == SEL and c.feature == b.feature
        assert (c.train.batch_size, c.train.w_nal, c.train.steps, c.train.seed) == (12, 0.05, 3, 5)
    with pytest.raises(ValueError, match="preset"):
        preset("transact_v3")
    # train overrides win over the preset's negatives (Table 4: TransAct V2 with in-batch negatives)
    c = preset("transact_v2", b, nal_negatives="in_batch")
    assert c.train.nal_negatives == "in_batch" and c.model.segments == ALL_SEGMENTS
    with pytest.raises(ValueError, match="train.nal_negatives"):
        preset("wide_deep", b, nal_negatives="impression")  # NAL needs a TransAct model


def test_presets_share_the_non_sequence_tower():
    """Every preset has the same categorical / cross / MLP / head parameters (shapes) apart from the
    pooled sequence vector's slot in the tower input."""
    seq_width = ModelConfig().seq_out_dim
    _, _, wd, _ = built("wide_deep")
    assert "sequence" not in wd
    for name in PRESET_NAMES[1:]:
        _, _, p, _ = built(name)
        assert set(p) == set(wd) | {"sequence"}
        for part in ("categorical", "wide", "head"):
            assert jax.tree_util.tree_map(np.shape, p[part]) == jax.tree_util.tree_map(np.shape, wd[part])
        width = wd["input_norm"]["scale"].shape[0]          # nnx.List -> {index: layer}
        assert p["input_norm"]["scale"].shape == (width + seq_width,)
        assert [c["linear"]["kernel"].shape for c in p["cross"].values()] == \
               [(width + seq_width, width + seq_width)] * len(wd["cross"])
        assert [m["kernel"].shape[1] for m in p["mlp"].values()] == \
               [m["kernel"].shape[1] for m in wd["mlp"].values()]


# ------------------------------------------------------------------------------- eq. 4 encoding


def _capture_encoder_input(monkeypatch, name, x, params=None):
    """Run ``name`` eagerly and return what the transformer encoder received (F of eq. 4)."""
    seen = []
    real = layers.skut

    def spy(h, mask, weights, **kw):
        seen.append((np.asarray(h), np.asarray(mask)))
        return real(h, mask, weights, **kw)

    monkeypatch.setattr(layers, "skut", spy)
    _, mdef, p, _ = built(name)
    mdef.bind(p if params is None else params)(x)
    monkeypatch.setattr(layers, "skut", real)
    assert len(seen) == 1
    return seen[0]


def test_eq4_feature_encoding(monkeypatch):
    """F = concat(E_PinSage(S_all), e_c) + multi_hot(actions) W_act + E_surf[surface] + E_pos."""
    x = random_inputs(1)
    f, mask = _capture_encoder_input(monkeypatch, "transact_v2", x)
    _, _, p, _ = built("transact_v2")
    tok = jax.tree_util.tree_map(np.asarray, p["sequence"]["tokens"])
    emb = np.asarray(dequantize_int8(np.asarray(x.embeddings), FEAT.quant_scale))
    cand = np.asarray(dequantize_int8(np.asarray(x.candidate_embedding), FEAT.quant_scale))
    bits = (np.asarray(x.actions)[..., None].astype(np.int64) >> np.arange(FEAT.num_actions)) & 1
    want = (np.concatenate([emb, np.broadcast_to(cand[:, None], emb.shape)], -1)
            + bits.astype(np.float32) @ tok["w_act"]
            + tok["surface"]["embedding"][np.asarray(x.surfaces)]
            + tok["position"][None])
    assert f.shape == (N, L, 2 * FEAT.embedding_dim) == want.shape
    np.testing.assert_allclose(f, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(mask, np.asarray(x.mask))


def test_action_bits_enter_only_through_e_act(monkeypatch):
    x = random_inputs(2)
    acts = np.array(x.actions)
    i, t = 0, 10                                    # a valid rt_recent token of row 0
    assert x.mask[i, t]
    acts[i, t] ^= 0b1011                           # flip click, repin, long_click
    y = replace(x, actions=acts)
    f0, _ = _capture_encoder_input(monkeypatch, "transact_v2", x)
    f1, _ = _capture_encoder_input(monkeypatch, "transact_v2", y)
    _, _, p, _ = built("transact_v2")
    w_act = np.asarray(p["sequence"]["tokens"]["w_act"])
    # expected change: (multi_hot(new) - multi_hot(old)) @ W_act at that one token, nothing else
    delta = np.zeros_like(f0)
    old = (int(x.actions[i, t]) >> np.arange(8)) & 1
    new = (int(acts[i, t]) >> np.arange(8)) & 1
    delta[i, t] = (new - old).astype(np.float32) @ w_act
    np.testing.assert_allclose(f1 - f0, delta, atol=1e-6)
    # end to end: the logits move, but not once W_act is zero
    assert np.abs(logits("transact_v2", y)[0] - logits("transact_v2", x)[0]).max() > 1e-5
    zero = jax.tree_util.tree_map(lambda a: a, p)
    zero["sequence"]["tokens"]["w_act"] = jnp.zeros_like(p["sequence"]["tokens"]["w_act"])
    np.testing.assert_array_equal(logits("transact_v2", y, zero)[0], logits("transact_v2", x, zero)[0])


@pytest.mark.parametrize("name", ["bst", "transact", "transact_v2"])
def test_masked_tokens_do_not_matter(name):
    x = random_inputs(3)
    assert (~np.asarray(x.mask)).sum() > 10
    y = garbage_at(x, ~np.asarray(x.mask), seed=4)
    lx, nx = logits(name, x)
    ly, ny = logits(name, y)
    np.testing.assert_allclose(ly, lx, rtol=1e-6, atol=1e-6)
    if nx is not None:  # P u(t) on valid rt_recent slots is unaffected as well
        valid = np.asarray(x.mask)[:, SEL.segment("rt_recent")]
        np.testing.assert_allclose(ny[valid], nx[valid], rtol=1e-6, atol=1e-6)
    # sanity: the same garbage on valid tokens does change the logits
    z = garbage_at(x, np.asarray(x.mask), seed=4)
    assert np.abs(logits(name, z)[0] - lx).max() > 1e-4


@pytest.mark.parametrize("name,reads_ll", [("bst", False), ("transact", False),
                                            ("transact_nal_imp", False), ("transact_v2", True)])
def test_unlisted_segments_do_not_influence_output(name, reads_ll):
    x = random_inputs(5)
    ll = np.zeros((N, L), bool)
    ll[:, SEL.segment("ll")] = True
    y = garbage_at(x, ll, seed=6)
    m = np.array(x.mask)
    m[:, SEL.segment("ll")] = ~m[:, SEL.segment("ll")]   # and a different LL validity mask
    y = replace(y, mask=m)
    lx, nx = logits(name, x)
    ly, ny = logits(name, y)
    if reads_ll:
        assert np.abs(ly - lx).max() > 1e-4
        assert np.abs(ny - nx).max() > 1e-4
    else:
        np.testing.assert_array_equal(ly, lx)
        if nx is not None:
            np.testing.assert_array_equal(ny, nx)


def test_imp_segment_influences_v2_but_not_rt_models():
    x = random_inputs(7)
    imp = np.zeros((N, L), bool)
    imp[:, SEL.segment("imp")] = True
    y = garbage_at(x, imp & np.asarray(x.mask), seed=8)
    assert np.abs(logits("transact_v2", y)[0] - logits("transact_v2", x)[0]).max() > 1e-4
    np.testing.assert_array_equal(logits("transact", y)[0], logits("transact", x)[0])


def test_wide_deep_ignores_the_sequence():
    x = random_inputs(9)
    y = garbage_at(x, np.ones((N, L), bool), seed=10)
    y = replace(y, mask=~np.asarray(x.mask))
    np.testing.assert_array_equal(logits("wide_deep", y)[0], logits("wide_deep", x)[0])


@pytest.mark.parametrize("name", ["transact_v2", "transact_nal_imp"])
def test_nal_user_is_causal(name):
    """P u(t) at rt_recent slot t depends only on S_all tokens at model positions <= t."""
    cfg, _, _, _ = built(name)
    x = random_inputs(11)
    rt = SEL.segment("rt_recent")
    for t in (0, 3, SEL.r - 2):
        after = np.zeros((N, L), bool)
        after[:, rt.start + t + 1:] = True          # later rt_recent slots, rt_nn and imp
        y = garbage_at(x, after, seed=12 + t)
        _, nx = logits(name, x)
        _, ny = logits(name, y)
        np.testing.assert_allclose(ny[:, :t + 1], nx[:, :t + 1], rtol=1e-6, atol=1e-6)
        assert np.abs(ny[0, t + 1:] - nx[0, t + 1:]).max() > 1e-4  # later slots do see them


def test_all_masked_row_gives_finite_logits():
    x = random_inputs(13)
    m = np.array(x.mask)
    m[0] = False
    m[2, :] = False
    y = replace(x, mask=m)
    for name in PRESET_NAMES:
        lg, nal = logits(name, y)
        assert np.all(np.isfinite(lg)), name
        if nal is not None:
            assert np.all(np.isfinite(nal)), name
    # a fully masked row equals the same row with its tokens replaced by anything
    z = garbage_at(y, np.ones((N, L), bool) & ~m, seed=14)
    for name in ("bst", "transact_v2"):
        np.testing.assert_allclose(logits(name, z)[0][[0, 2]], logits(name, y)[0][[0, 2]],
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["bst", "transact_v2"])
def test_all_masked_rows_give_finite_gradients(name):
    x = random_inputs(16)
    m = np.array(x.mask)
    m[::2] = False                       # every other row has no valid token at all
    x = replace(x, mask=m)
    _, mdef, p, _ = built(name)

    def total(params):
        out = mdef.bind(params)(x)
        s = jnp.sum(out.logits)
        return s if out.nal_user is None else s + jnp.sum(out.nal_user)

    grads = jax.jit(jax.grad(total))(p)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(np.asarray(g))), jax.tree_util.keystr(path)
    assert np.abs(np.asarray(grads["sequence"]["encoder"]["w_qkv"])).max() > 0


@pytest.mark.parametrize("name", ["bst", "transact_v2"])
def test_bf16_close_to_f32(name):
    x = random_inputs(15)
    _, _, p32, _ = built(name)
    cfg16, _, _, fwd16 = built(name, "bfloat16")
    assert cfg16.model.dtype == "bfloat16"
    out = fwd16(p32, x)  # the same float32 parameters, bf16 compute
    lg16 = np.asarray(out.logits, np.float32)
    lg32, nal32 = logits(name, x)
    assert np.all(np.isfinite(lg16))
    err = np.abs(lg16 - lg32).max()
    assert err < 0.05 + 0.05 * np.abs(lg32).max(), err
    assert err > 0  # bf16 really ran
    if nal32 is not None:
        np.testing.assert_allclose(np.asarray(out.nal_user, np.float32), nal32, atol=0.1, rtol=0.1)


# ----------------------------------------------------------------------------- config checks


@pytest.mark.parametrize("kwargs,field", [
    (dict(sequence_model="lstm"), "sequence_model"),
    (dict(encoder_impl="cuda"), "encoder_impl"),
    (dict(dtype="float16"), "dtype"),
    (dict(segments=("ll", "foo")), "segments"),
    (dict(segments=("rt_recent", "ll")), "segments"),
    (dict(sequence_model="transact", segments=()), "segments"),
    (dict(num_heads=3), "num_heads"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
])
def test_model_config_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kwargs)


def test_model_d_model_must_fit_early_fusion():
    cfg = preset("transact", ExperimentConfig(selection=SEL, model=ModelConfig(d_model=48, num_heads=1)))
    with pytest.raises(ValueError, match="d_model"):
        build_model(cfg.feature, cfg.selection, cfg.model, 0)


@pytest.mark.parametrize("make,field", [
    (lambda: ExperimentConfig(train=TrainConfig(head_loss_weights=(1.0, 1.0))), "train.head_loss_weights"),
    (lambda: ExperimentConfig(train=TrainConfig(ranking_weights=(1.0,))), "train.ranking_weights"),
    (lambda: ExperimentConfig(model=ModelConfig(sequence_model="none", segments=())),
     "train.nal_negatives"),
    (lambda: ExperimentConfig(model=ModelConfig(sequence_model="bst")), "train.nal_negatives"),
    (lambda: ExperimentConfig(model=ModelConfig(segments=("ll", "imp"))), "train.nal_negatives"),
    (lambda: TrainConfig(batch_size=0), "batch_size"),
    (lambda: TrainConfig(steps=0), "steps"),
    (lambda: TrainConfig(nal_negatives="random"), "nal_negatives"),
    (lambda: TrainConfig(nal_kind="hinge"), "nal_kind"),
    (lambda: TrainConfig(learning_rate=0.0), "learning_rate"),
    (lambda: ExperimentConfig.from_dict({"model": {"layers": 3}}), "model"),
    (lambda: ExperimentConfig.from_dict({"optimizer": {}}), "optimizer"),
    (lambda: ExperimentConfig.from_dict({"model": {"sequence_model": "rnn"}}), "sequence_model"),
])
def test_experiment_config_validation_names_field(make, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        make()


def test_nal_off_allows_non_transact_models():
    c = ExperimentConfig(model=ModelConfig(sequence_model="bst"), train=TrainConfig(w_nal=0.0))
    assert not c.train.uses_nal


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_experiment_config_json_round_trip(name):
    cfg = preset(name, ExperimentConfig(
        feature=FeatureConfig(heads=("click", "repin"), categorical_vocab_sizes=(10, 20)),
        selection=SEL, model=ModelConfig(mlp_dims=(32, 16), dropout=0.1, dtype="bfloat16"),
        train=TrainConfig(head_loss_weights=(1.0, 2.0), ranking_weights=(1.0, 0.5), steps=7)))
    back = ExperimentConfig.from_dict(json.loads(cfg.to_json()))
    assert back == cfg
    assert isinstance(back.model.mlp_dims, tuple) and isinstance(back.feature.heads, tuple)
    # a partial dict keeps the defaults of what it leaves out
    part = ExperimentConfig.from_dict({"model": {"num_layers": 1}})
    assert part == dataclasses.replace(ExperimentConfig(), model=ModelConfig(num_layers=1))


# ------------------------------------------------------------------- sequence-model registry


class _MeanPool(nnx.Module):
    """A family defined outside the package: mean of the valid token embeddings, projected."""

    def __init__(self, feat, cfg, *, rngs):
        self.proj = nnx.Linear(feat.embedding_dim, cfg.seq_out_dim, rngs=rngs)

    def __call__(self, emb, actions, surfaces, mask, cand, dtype, dropout_key=None, token_age_hours=None):
        w = mask[..., None].astype(jnp.float32)
        mean = jnp.sum(emb * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
        return self.proj(mean), None


@pytest.fixture
def mean_pool_family():
    entry = registry.SequenceModelEntry(
        "test_mean_pool", lambda feat, cfg, length, rt_slots, rngs: _MeanPool(feat, cfg, rngs=rngs))
    registry.register(entry)
    yield entry
    del registry._REGISTRY[entry.name]


def test_a_new_family_is_one_registry_entry(mean_pool_family):
    """Registering a module is enough: the tower, the builder and the configs take it by name."""
    assert "test_mean_pool" in registry.names()
    with pytest.raises(ValueError, match="already registered"):
        registry.register(mean_pool_family)
    model = ModelConfig(sequence_model="test_mean_pool", mlp_dims=(32,))
    cfg = ExperimentConfig(selection=SEL, model=model, train=TrainConfig(nal_negatives="none"))
    mdef, params = build_model(cfg.feature, cfg.selection, cfg.model, 0)
    assert set(params["sequence"]) == {"proj"}
    x = random_inputs(3)
    out = mdef.bind(params)(x)
    assert out.logits.shape == (N, FEAT.num_heads) and out.nal_user is None
    # the sequence vector is used: other token embeddings change the logits
    other = dataclasses.replace(x, embeddings=np.zeros_like(x.embeddings))
    assert not np.allclose(mdef.bind(params)(other).logits, out.logits)
    # it produces no P u(t), so the Next Action Loss is refused by name
    with pytest.raises(ValueError, match="train.nal_negatives"):
        ExperimentConfig(selection=SEL, model=model)


def test_unknown_sequence_model_lists_the_registry():
    with pytest.raises(ValueError,
                       match=r"sequence_model: expected one of \('none', 'bst', 'transact', 'hstu', 'vista'\)"):
        ModelConfig(sequence_model="mamba")


# ------------------------------------------------------------------------------- token features


def test_token_feature_buckets():
    emb = jnp.asarray([[[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    cand = jnp.asarray([[2.0, 0.0]])
    np.testing.assert_array_equal(layers.similarity_bucket(emb, cand),
                                  [[layers.SIMILARITY_BUCKETS - 1, 0, layers.SIMILARITY_BUCKETS // 2,
                                    layers.SIMILARITY_BUCKETS // 2]])
    ages = jnp.asarray([[0.0, 0.99, 1.0, 1.99, 2.0, 3.9, 4.0, 1e12]])
    np.testing.assert_array_equal(layers.age_bucket(ages),
                                  [[0, 0, 1, 1, 2, 2, 3, layers.AGE_BUCKETS - 1]])


@pytest.mark.parametrize("name", ["bst", "transact_v2"])
def test_token_features_change_the_model_only_through_their_inputs(name):
    """``similarity`` reads the token and candidate embeddings, ``age`` the token ages: with the
    features on, changing valid tokens' ages changes the logits, changing padded tokens' ages does
    not; without token ages the ``age`` model refuses to run."""
    cfg = preset(name, dataclasses.replace(
        base(), model=dataclasses.replace(base().model, token_features=("similarity", "age"))))
    mdef, params = build_model(cfg.feature, cfg.selection, cfg.model, 0)
    fwd = jax.jit(lambda p, x: mdef.bind(p)(x).logits)
    x = random_inputs(11)
    mask = np.asarray(x.mask)
    rng = np.random.default_rng(0)
    age = np.where(mask, rng.uniform(0, 5000, mask.shape), 0.0).astype(np.float32)
    out = np.asarray(fwd(params, replace(x, token_age_hours=age)))
    assert np.isfinite(out).all()
    older = np.where(mask, age * 64 + 100, 0.0).astype(np.float32)
    assert np.abs(np.asarray(fwd(params, replace(x, token_age_hours=older))) - out).max() > 1e-5
    padded = np.where(mask, age, 1e6).astype(np.float32)
    np.testing.assert_allclose(np.asarray(fwd(params, replace(x, token_age_hours=padded))), out,
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="token_age_hours"):
        mdef.bind(params)(x)


def test_token_features_are_validated():
    with pytest.raises(ValueError, match="token_features"):
        ModelConfig(token_features=("recency",))
    with pytest.raises(ValueError, match="token_features"):
        ModelConfig(token_features=("age", "age"))
