"""Item embeddings learned from training-period interactions (data without content embeddings)."""
from __future__ import annotations

import numpy as np
import pytest

from pallas_kernels.int8_codec import QUANT_SCALE, quantize_int8
from transact_jax.config import FeatureConfig
from transact_jax.data.events import ItemTable
from transact_jax.data.item_embeddings import ItemEmbeddingConfig, learn_item_embeddings
from transact_jax.data.schema import SchemaError

CUTOFF = 1_000


def clustered(seed=0, users=60, items=40, per_user=12):
    """Two groups of users, each interacting with its own half of the items (plus a little noise),
    before the cutoff; item 999 appears only after it."""
    rng = np.random.default_rng(seed)
    u, i, t = [], [], []
    for user in range(users):
        group = user % 2
        pool = np.arange(items)[np.arange(items) % 2 == group]
        picks = rng.choice(pool, per_user - 1, replace=False).tolist() + [int(rng.integers(items))]
        u += [user] * per_user
        i += picks
        t += rng.integers(0, CUTOFF, per_user).tolist()
    u += [0, 1]
    i += [999, 3]
    t += [CUTOFF + 5, CUTOFF]          # at or after the cutoff: not training period
    return np.array(u), np.array(i), np.array(t)


def cosine(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_items_of_one_group_are_closer_than_across_groups():
    emb = learn_item_embeddings(*clustered(), cutoff=CUTOFF, cfg=ItemEmbeddingConfig(dim=8))
    vec = dict(zip(emb.item_id.tolist(), emb.embedding))
    same = np.mean([cosine(vec[a], vec[b]) for a in range(0, 40, 2) for b in range(2, 40, 2) if a < b])
    cross = np.mean([cosine(vec[a], vec[b]) for a in range(0, 40, 2) for b in range(1, 40, 2)])
    assert same > cross + 0.3, (same, cross)
    # each item's nearest neighbour (cosine) is almost always an item of its own group
    ids = np.arange(40)
    mat = np.stack([vec[k] / np.linalg.norm(vec[k]) for k in ids])
    sims = mat @ mat.T
    np.fill_diagonal(sims, -np.inf)
    assert np.mean(ids[np.argmax(sims, axis=1)] % 2 == ids % 2) >= 0.9


def test_only_the_training_period_counts():
    u, i, t = clustered()
    base = learn_item_embeddings(u, i, t, cutoff=CUTOFF)
    assert not base.seen[base.item_id == 999][0] and not base.embedding[base.item_id == 999].any()
    # changing what happens at or after the cutoff changes nothing
    late = t >= CUTOFF
    i2 = i.copy()
    i2[late] = 7
    moved = learn_item_embeddings(u, i2, t, cutoff=CUTOFF, items=base.item_id)
    np.testing.assert_array_equal(moved.embedding, base.embedding)
    np.testing.assert_array_equal(moved.count, base.count)


def test_scaled_into_the_codec_range_and_deterministic():
    cfg = ItemEmbeddingConfig(dim=8, clip_quantile=0.99)
    a = learn_item_embeddings(*clustered(), cutoff=CUTOFF, cfg=cfg)
    b = learn_item_embeddings(*clustered(), cutoff=CUTOFF, cfg=cfg)
    np.testing.assert_array_equal(a.embedding, b.embedding)
    comps = np.abs(a.embedding[a.seen])
    assert np.quantile(comps, 0.99) == pytest.approx(QUANT_SCALE, rel=1e-5)
    assert (comps <= QUANT_SCALE * (1 + 1e-6)).mean() >= 0.98
    codes = quantize_int8(a.embedding)
    assert np.abs(codes[a.seen]).max() == 127 and np.abs(codes[a.seen]).mean() > 10


def test_min_count_and_wider_dim_than_rank():
    u, i, t = clustered(users=6, items=10, per_user=4)
    emb = learn_item_embeddings(u, i, t, cutoff=CUTOFF, cfg=ItemEmbeddingConfig(dim=32, min_count=2))
    assert emb.embedding.shape == (len(emb.item_id), 32)
    assert (emb.seen == (emb.count >= 2)).all()
    assert not emb.embedding[~emb.seen].any()
    assert not emb.embedding[:, 6:].any()          # rank is at most the 6 users


def test_feeds_the_event_log_items_table():
    emb = learn_item_embeddings(*clustered(), cutoff=CUTOFF)
    table = ItemTable.from_columns(emb.columns(), FeatureConfig())
    np.testing.assert_array_equal(table.item_id, emb.item_id)


@pytest.mark.parametrize("kwargs,field", [
    (dict(user_id=np.zeros(3, np.float32)), "user_id"),
    (dict(timestamp=np.zeros(2, np.int64)), "item_id"),
    (dict(items=np.array([1, 2])), "items"),
])
def test_bad_input_names_the_field(kwargs, field):
    args = dict(user_id=np.arange(3), item_id=np.array([1, 2, 5]), timestamp=np.zeros(3, np.int64))
    args.update(kwargs)
    with pytest.raises(SchemaError) as e:
        learn_item_embeddings(cutoff=CUTOFF, **args)
    assert e.value.field == field


@pytest.mark.parametrize("kwargs,field", [(dict(dim=0), "dim"), (dict(clip_quantile=0.1), "clip_quantile"),
                                          (dict(min_count=0), "min_count")])
def test_config_validation(kwargs, field):
    with pytest.raises(SchemaError) as e:
        ItemEmbeddingConfig(**kwargs)
    assert e.value.field == field
