"""Sequential retrieval (transact_jax.retrieval): the leave-one-out split of a ratings file, jagged
batches, HR@K / NDCG@K on hand-made scores, the models' causality and padding, negative sampling,
config validation, and a tiny training run beating random ranking."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transact_jax.config_json import ConfigError
from transact_jax.data.interactions import Interactions
from transact_jax.retrieval.data import batches, leave_one_out, read_sequences, token_capacity
from transact_jax.retrieval.models import (
    RetrievalModelConfig,
    scaled,
    to_jagged,
    to_padded,
    token_positions,
)
from transact_jax.retrieval.train import (
    RetrievalTrainConfig,
    fit,
    hit_rate,
    make_rank_fn,
    model_fns,
    ndcg,
    popularity_baseline,
    popularity_tables,
    ranking_metrics,
    sample_negatives,
    target_ranks,
)

# user, movie, rating, timestamp. User 1: items 50, 10, 30 (tie at t=200 keeps file order), 20, 40;
# user 2: 3 items; user 3: 2 items (train only); user 4: 1 item (nothing).
RATINGS = """userId,movieId,rating,timestamp
1,30,4.0,200
1,50,3.5,100
2,10,1.0,300
1,20,2.0,300
2,20,5.0,100
1,40,5.0,400
3,50,4.0,10
1,10,0.5,200
2,40,3.0,200
3,10,4.0,20
4,30,4.0,10
"""


@pytest.fixture
def ratings_file(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_text(RATINGS)
    return path


def seqs(s):
    return [s.items[a:b].tolist() for a, b in zip(s.offsets[:-1], s.offsets[1:])]


def test_leave_one_out_split(ratings_file):
    d = read_sequences(ratings_file, max_len=200)
    assert d.num_items == 5 and d.item_ids.tolist() == [-1, 10, 20, 30, 40, 50]
    # remapped: 10->1, 20->2, 30->3, 40->4, 50->5.  user 1 in time order: 50, 30, 10 (tie: file
    # order), 20, 40
    assert d.eval_users.tolist() == [1, 2]
    assert seqs(d.test) == [[5, 3, 1, 2], [2, 4]]
    assert d.test.targets[d.test.offsets[1:] - 1].tolist() == [4, 1]
    assert seqs(d.valid) == [[5, 3, 1], [2]]
    assert d.valid.targets[d.valid.offsets[1:] - 1].tolist() == [2, 4]
    assert np.all(np.delete(d.valid.targets, d.valid.offsets[1:] - 1) == 0)   # one target each
    # training: user 1's first n - 2 items, user 2's first one (no target: not a sequence), user 3
    # (2 items, not evaluated) as a whole; user 4 has nothing to predict
    assert seqs(d.train) == [[5, 3], [5]]
    assert [d.train.targets[a:b].tolist() for a, b in zip(d.train.offsets[:-1],
                                                           d.train.offsets[1:])] == [[3, 1], [1]]
    assert d.train_counts.tolist() == [0, 2, 0, 1, 0, 2]      # seen in training: 5 5 3 1 1
    assert d.valid.timestamps.tolist() == [90, 190, 190, 90]    # the data starts at t = 0


def test_max_len_keeps_the_most_recent_items(ratings_file):
    d = read_sequences(ratings_file, max_len=2)
    assert seqs(d.test) == [[1, 2], [2, 4]]
    assert seqs(d.train) == [[5, 3], [5]]                # inputs 5, 3 -> targets 3, 1
    assert d.max_len == 2 and max(d.train.lengths.max(), d.test.lengths.max()) <= 2
    with pytest.raises(ValueError, match="max_len"):
        read_sequences(ratings_file, max_len=0)


def test_min_rating_and_the_generic_csv_drops_impressions(tmp_path, ratings_file):
    d = read_sequences(ratings_file, min_rating=3.0)
    assert d.eval_users.tolist() == [1]                  # user 2 keeps 2 ratings >= 3
    path = tmp_path / "interactions.csv"
    path.write_text("user_id,item_id,timestamp,action,exposed\n"
                    "7,1,10,click,0\n7,2,20,impression,1\n7,3,30,click,0\n7,4,40,click,0\n")
    g = read_sequences(path)
    assert g.num_items == 3 and seqs(g.test) == [[1, 2]]       # item 2 was only shown


def test_batches_have_one_shape_and_jagged_offsets(ratings_file):
    d = read_sequences(ratings_file)
    cap = token_capacity(d.test, 4)
    out = list(batches(d.test, 4))
    assert len(out) == 1
    b = out[0]
    assert b.items.shape == (cap,) and b.offsets.tolist() == [0, 4, 6, 6, 6]
    assert b.items.tolist() == [5, 3, 1, 2, 2, 4] and b.targets[[3, 5]].tolist() == [4, 1]
    b2 = list(batches(d.test, 1, order=[1, 0], capacity=8))
    assert [x.items[:x.offsets[-1]].tolist() for x in b2] == [[2, 4], [5, 3, 1, 2]]
    assert all(x.items.shape == (8,) and np.all(x.items[x.offsets[-1]:] == 0) for x in b2)
    with pytest.raises(ValueError, match="capacity"):
        list(batches(d.test, 2, capacity=3))


def test_metrics_on_hand_made_scores():
    scores = jnp.array([[9.0, 0.1, 0.5, 0.3, 0.9],      # col 0 is padding: never counts
                        [0.0, 0.2, 0.2, 0.2, 0.1],      # a tie counts against the target
                        [0.0, 0.5, 0.4, 0.3, 0.2]])
    ranks = np.asarray(target_ranks(scores, jnp.array([2, 1, 1])))
    assert ranks.tolist() == [1, 2, 0]
    assert hit_rate(ranks, 1) == pytest.approx(1 / 3)
    assert hit_rate(ranks, 2) == pytest.approx(2 / 3)
    assert ndcg(ranks, 1) == pytest.approx(1 / 3)
    assert ndcg(ranks, 10) == pytest.approx((1 / np.log2(3) + 1 / np.log2(4) + 1) / 3)
    m = ranking_metrics(np.array([0, 9, 10, 49, 199, 200]))
    assert m["hr@10"] == pytest.approx(2 / 6) and m["hr@50"] == pytest.approx(4 / 6)
    assert m["hr@200"] == pytest.approx(5 / 6) and m["users"] == 6
    assert m["ndcg@10"] == pytest.approx((1 + 1 / np.log2(11)) / 6)


def test_jagged_padded_round_trip():
    offsets = jnp.array([0, 2, 2, 5], jnp.int32)
    x = jnp.arange(7, dtype=jnp.float32) + 1                     # rows 5, 6 are padding
    pad, valid = to_padded(x, offsets, 4)
    assert pad.tolist() == [[1, 2, 0, 0], [0, 0, 0, 0], [3, 4, 5, 0]]
    assert valid.sum() == 5
    assert to_jagged(pad, offsets, 7).tolist() == [1, 2, 3, 4, 5, 0, 0]
    seq, local = token_positions(offsets, 7)
    assert seq.tolist() == [0, 0, 2, 2, 2, 3, 3] and local[:5].tolist() == [0, 1, 0, 1, 2]


TINY = RetrievalModelConfig(num_items=30, max_len=6, d_model=16, num_layers=1, num_heads=2,
                            dropout=0.0, d_qk=8, d_v=8, attention_impl="xla")


@pytest.mark.parametrize("model", ["sasrec", "hstu"])
def test_user_vectors_are_causal_and_ignore_padding(model):
    cfg = dataclasses.replace(TINY, model=model)
    fns = model_fns(cfg)
    m = fns.bind(fns.init(0))
    offsets = jnp.array([0, 4, 6], jnp.int32)
    items = jnp.array([3, 7, 1, 9, 4, 5, 0, 0], jnp.int32)
    ts = jnp.arange(8, dtype=jnp.int32) * 100
    u = np.asarray(m.user_vectors(items, ts, offsets))
    assert u.shape == (8, 16) and np.all(u[6:] == 0)
    np.testing.assert_allclose(np.linalg.norm(u[:6], axis=1), 1.0, rtol=1e-5)   # l2-normalized
    u2 = np.asarray(m.user_vectors(items.at[2:4].set(jnp.array([11, 12])).at[6:].set(13),
                                   ts.at[6:].set(5), offsets))
    np.testing.assert_allclose(u2[:2], u[:2], atol=1e-6)           # earlier positions unchanged
    np.testing.assert_allclose(u2[4:6], u[4:6], atol=1e-6)         # the other sequence unchanged
    assert not np.allclose(u2[2:4], u[2:4])
    assert m.item_vectors().shape == (31, 16)


def test_model_config_errors_name_the_field():
    for field, value in [("model", "gru"), ("num_items", 0), ("dropout", 1.0),
                         ("attention_impl", "x"), ("normalizer", "softmax")]:
        with pytest.raises(ConfigError) as err:
            RetrievalModelConfig(**{"model": "hstu", field: value})
        assert err.value.field == field
    with pytest.raises(ConfigError, match="num_heads"):
        RetrievalModelConfig(model="sasrec", d_model=50, num_heads=3)
    large = scaled(RetrievalModelConfig(model="hstu", num_layers=2, num_heads=1))
    assert (large.num_layers, large.num_heads) == (8, 2)
    for field, value in [("negatives", "hard"), ("ks", (50,)), ("learning_rate", 0.0),
                         ("batch_size", 0)]:
        with pytest.raises(ConfigError) as err:
            RetrievalTrainConfig(**{field: value})
        assert err.value.field == field


def test_popularity_sampler_follows_counts():
    cdf = jnp.cumsum(jnp.array([0.0, 1.0, 3.0, 0.0]))               # items 1..4: weights 0,1,3,0
    s = np.asarray(sample_negatives(jax.random.key(0), (20000,), 4, cdf))
    assert set(np.unique(s)) == {2, 3}
    assert np.mean(s == 3) == pytest.approx(0.75, abs=0.02)
    u = np.asarray(sample_negatives(jax.random.key(0), (20000,), 4, None))
    assert u.min() == 1 and u.max() == 4
    # from training counts: (count + 1) ** power, so an item never seen in training is still drawn
    log_q, cdf = popularity_tables(np.array([0, 0, 1, 3, 7]), power=1.0)    # weights 1, 2, 4, 8
    np.testing.assert_allclose(np.asarray(cdf), np.array([1, 3, 7, 15]) / 15, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(log_q), np.log([1.0, 4 / 15, 8 / 15, 16 / 15, 32 / 15]),
                               rtol=1e-6)
    p = np.asarray(sample_negatives(jax.random.key(1), (30000,), 4, cdf))
    assert np.mean(p == 1) == pytest.approx(1 / 15, abs=0.01)


def cyclic_data(users=120, items=40, seed=0):
    """Every user walks the items in a fixed cycle from a random start: next item = item + 1."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        n, start = int(rng.integers(6, 14)), int(rng.integers(items))
        rows += [(u, 1000 + (start + i) % items, 60 * i) for i in range(n)]
    user, item, t = (np.array(c) for c in zip(*rows))
    return leave_one_out(Interactions(user, item, t, rating=np.ones(len(user))), max_len=8)


def test_exclude_seen_removes_the_input_items():
    d = cyclic_data()
    cfg = dataclasses.replace(TINY, model="sasrec", num_items=d.num_items, max_len=8)
    params = model_fns(cfg).init(0)
    b = jax.tree_util.tree_map(jnp.asarray, next(batches(d.test, 16)))
    plain = np.asarray(make_rank_fn(cfg, False)(params, b))
    excl = np.asarray(make_rank_fn(cfg, True)(params, b))
    assert np.all(excl <= plain) and np.any(excl < plain)


@pytest.mark.parametrize("model", ["hstu", "sasrec"])
def test_a_tiny_training_run_beats_random(model):
    d = cyclic_data()
    cfg = dataclasses.replace(TINY, model=model, num_items=d.num_items, max_len=8, num_heads=1,
                              dropout=0.1)
    tcfg = RetrievalTrainConfig(batch_size=32, learning_rate=5e-3, max_epochs=8, num_negatives=16,
                                eval_every=4, patience=2, ks=(1, 10))
    r = fit(cfg, tcfg, d, seed=0)
    random_hr10 = 10 / d.num_items                                    # 0.25
    assert r["test"]["hr@10"] > random_hr10 + 0.25, r["test"]
    assert r["test"]["users"] == 120 and r["best_epoch"] in (4, 8)
    assert r["curve"]["epoch"] == [4, 8] and np.isfinite(r["curve"]["train_loss"]).all()


def test_popularity_baseline(ratings_file):
    d = read_sequences(ratings_file)
    # training counts 1: 2, 3: 1, 5: 2; test targets 4 (count 0: last of 5) and 1 (behind 5: rank 1)
    test = popularity_baseline(d, ks=(1, 2, 10))["test"]
    assert (test["hr@1"], test["hr@2"], test["hr@10"]) == (0.0, 0.5, 1.0)
