"""Public interaction data: MovieLens readers (both layouts), the generic interactions CSV, the
request recipe (sessions, labels, negatives, exposures), the time split without leakage, the CLI."""
from __future__ import annotations

import numpy as np
import pytest

from transact_jax.__main__ import main as cli
from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data.events import build_requests
from transact_jax.data.feature_log import FeatureLog
from transact_jax.data.interactions import (
    InteractionRecipe,
    Interactions,
    build_event_logs,
    feature_config_for,
)
from transact_jax.data.public import read_interactions_csv, read_movielens
from transact_jax.data.schema import SchemaError

FEAT = FeatureConfig()
SEL = SelectionConfig(max_ll_len=50, max_rt_len=10, max_imp_len=10, k_ll=8, r=4, k_rt=4, k_imp=4,
                      num_nal_negatives=4)
DAY = 86_400


def ratings(seed=0, users=12, items=60, sessions=5, per_session=6):
    """Users rate a few items per session, sessions a day apart (timestamps within a session a
    minute apart), half-star ratings."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        t = 1_000_000 + int(rng.integers(0, DAY))
        for _ in range(sessions):
            for it in rng.choice(items, per_session, replace=False):
                rows.append((u + 1, int(it) + 1, float(rng.integers(1, 11)) / 2, t))
                t += 60
            t += DAY
    return rows


def write_csv(path, rows):
    path.write_text("userId,movieId,rating,timestamp\n" + "".join(
        f"{u},{i},{r:g},{t}\n" for u, i, r, t in rows))


def write_dat(path, rows):
    path.write_text("".join(f"{u}::{i}::{r:g}::{t}\n" for u, i, r, t in rows))


def test_both_movielens_layouts_read_the_same(tmp_path):
    rows = ratings()
    write_csv(tmp_path / "ratings.csv", rows)
    write_dat(tmp_path / "ratings.dat", rows)
    a, b = read_movielens(tmp_path / "ratings.csv"), read_movielens(tmp_path / "ratings.dat")
    for field in ("user_id", "item_id", "timestamp", "rating"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert len(a.user_id) == len(rows) and a.rating.dtype == np.float64


@pytest.mark.parametrize("text,where", [
    ("user,movie,rating,time\n1,2,3,4\n", "ratings.csv:1"),
    ("userId,movieId,rating,timestamp\n1,2,3.5,4\n1,x,3,5\n", "ratings.csv:3: item"),
    ("userId,movieId,rating,timestamp\n1,2,nan,4\n", "ratings.csv:2: rating"),
    ("userId,movieId,rating,timestamp\n1,2,3\n", "ratings.csv:2"),
    ("userId,movieId,rating,timestamp\n", "ratings.csv"),
])
def test_bad_movielens_files_name_file_line_and_column(tmp_path, text, where):
    path = tmp_path / "ratings.csv"
    path.write_text(text)
    with pytest.raises(SchemaError) as e:
        read_movielens(path)
    assert e.value.field.endswith(where), e.value.field


def test_generic_interactions_with_actions_and_exposures(tmp_path):
    path = tmp_path / "interactions.csv"
    path.write_text("user_id,item_id,timestamp,action,exposed\n"
                    "1,10,100,click,0\n1,11,100,,1\n1,12,160,repin,0\n2,10,200,hide,0\n")
    data = read_interactions_csv(path)
    assert data.exposed.tolist() == [False, True, False, False]
    assert data.action.tolist() == ["click", "", "repin", "hide"]
    path.write_text("user_id,item_id,timestamp,action\n1,10,100,like\n")
    with pytest.raises(SchemaError, match="unknown action 'like'"):
        build_event_logs(read_interactions_csv(path))
    path.write_text("user_id,item_id,timestamp\n1,10,100\n")
    with pytest.raises(SchemaError, match="one of rating / action"):
        read_interactions_csv(path)
    path.write_text("user_id,item_id,timestamp,rating,exposed\n1,10,100,4,2\n")
    with pytest.raises(SchemaError) as e:
        read_interactions_csv(path)
    assert e.value.field.endswith(":2: exposed")


def interactions(rows) -> Interactions:
    a = np.asarray(rows, dtype=np.float64)
    return Interactions(a[:, 0].astype(np.int64), a[:, 1].astype(np.int64), a[:, 3].astype(np.int64),
                        rating=a[:, 2])


@pytest.fixture(scope="module")
def logs():
    return build_event_logs(interactions(ratings()), InteractionRecipe(negatives_per_request=5))


def test_split_by_time_and_no_leakage(logs):
    times = {k: v.requests.timestamp for k, v in logs.items()}
    assert times["train"].max() < times["eval"].min() <= times["eval"].max() < times["test"].min()
    for name, log in logs.items():
        batch = build_requests(log, FEAT, SEL)
        for fam, seqs in batch.sequences():
            owner = np.repeat(np.arange(batch.num_requests), seqs.lengths)
            assert (seqs.tokens.timestamps < batch.request_timestamp[owner]).all(), (name, fam)
        assert (batch.ll.lengths + batch.rt.lengths).max() > 0


def test_sessions_labels_and_sampled_negatives(logs):
    data = interactions(ratings())
    log = logs["train"]
    rq = log.requests
    req_ids, first = np.unique(rq.request_id, return_index=True)
    # every session is one request at its first timestamp, candidates = its rated items + negatives
    assert len(np.unique(np.concatenate([l.requests.request_id for l in logs.values()]))) == 12 * 5
    for r in req_ids[:20]:
        rows = rq.request_id == r
        user, t0 = rq.user_id[rows][0], rq.timestamp[rows][0]
        mine = (data.user_id == user) & (data.timestamp >= t0) & (data.timestamp < t0 + DAY // 2)
        rated = dict(zip(data.item_id[mine].tolist(), data.rating[mine].tolist()))
        cand = rq.item_id[rows]
        labels = {h: rq.labels[rows, j] for j, h in enumerate(FEAT.heads)}
        for k, item in enumerate(cand.tolist()):
            if item in rated:
                rating = rated[item]
                assert labels["click"][k] == (rating > 2.0) and labels["repin"][k] == (rating >= 4.0)
                assert labels["hide"][k] == (rating <= 2.0)
            else:   # a sampled negative: never an item the user rated up to the session's end
                assert not labels["click"][k] and not labels["repin"][k] and not labels["hide"][k]
                before = (data.user_id == user) & (data.timestamp <= t0 + 300)
                assert item not in set(data.item_id[before].tolist())
        assert (~np.isin(cand, list(rated))).sum() == 5


def test_exposures_become_impressions_and_real_negatives():
    rows = [(1, 10, 100, "click", 0), (1, 11, 100, "", 1), (1, 12, 160, "repin", 0),
            (1, 13, 5000, "click", 0), (1, 14, 5000, "", 1), (1, 15, 9000, "click", 0)]
    data = Interactions(np.array([r[0] for r in rows]), np.array([r[1] for r in rows]),
                        np.array([r[2] for r in rows]), action=np.array([r[3] for r in rows]),
                        exposed=np.array([r[4] for r in rows], bool))
    out = build_event_logs(data, InteractionRecipe(negatives_per_request=1, eval_quantile=1.0,
                                                   test_quantile=1.0))
    rq = out["train"].requests
    first = rq.request_id == rq.request_id[0]
    assert sorted(rq.item_id[first].tolist()) == [10, 11, 12]       # 11: the session's exposure
    assert rq.labels[first][rq.item_id[first] == 11].sum() == 0
    batch = build_requests(out["train"], FEAT, SEL)
    assert batch.imp.lengths.tolist() == [0, 1, 2]      # later requests see the exposures of 11, 14
    assert out["eval"] is None and out["test"] is None


def test_deterministic_in_the_seed():
    data = interactions(ratings())
    a = build_event_logs(data, InteractionRecipe(seed=3))["train"].requests
    b = build_event_logs(data, InteractionRecipe(seed=3))["train"].requests
    c = build_event_logs(data, InteractionRecipe(seed=4))["train"].requests
    np.testing.assert_array_equal(a.item_id, b.item_id)
    assert not np.array_equal(a.item_id, c.item_id)


@pytest.mark.parametrize("kwargs,field", [(dict(negative_rating=4.0), "negative_rating"),
                                          (dict(eval_quantile=0.9, test_quantile=0.8), "eval_quantile"),
                                          (dict(surface="tv"), "surface")])
def test_recipe_errors_name_the_field(kwargs, field):
    with pytest.raises(SchemaError) as e:
        build_event_logs(interactions(ratings()), InteractionRecipe(**kwargs))
    assert e.value.field == field


def test_cli_writes_feature_logs_ready_for_training(tmp_path, capsys):
    write_dat(tmp_path / "ratings.dat", ratings())
    out = tmp_path / "data"
    assert cli(["data", "movielens", "--ratings", str(tmp_path / "ratings.dat"), "--out", str(out),
                "--negatives", "3"]) == 0
    assert "train" in capsys.readouterr().out
    for split in ("train", "eval", "test"):
        log = FeatureLog(str(out / split))
        assert len(log) > 0 and log.feat == FEAT


def test_new_items_do_not_give_the_label_away():
    """Items first seen after the training period (zero embeddings) appear among the sampled
    negatives of later splits too, not only among their positives."""
    rows = ratings(users=20, items=80, sessions=6)
    t_split = np.quantile([r[3] for r in rows], 0.8)
    rows = [(u, i + 1000 if t >= t_split and i % 2 else i, r, t) for u, i, r, t in rows]  # new items
    logs = build_event_logs(interactions(rows), InteractionRecipe(negatives_per_request=10))
    zero = logs["train"].items.item_id[~logs["train"].items.embedding.any(axis=1)]
    for split in ("eval", "test"):
        rq = logs[split].requests
        new = np.isin(rq.item_id, zero)
        positive = rq.labels.any(axis=1)
        assert new[positive].any() and new[~positive].any(), split


def test_item_id_feature_full_vocabulary_is_the_training_period():
    """``item_id_feature="full"``: training-period items get categories 1..V by id order, every
    other item (first seen later) the out-of-vocabulary category 0; the same item gets the same
    category in every split."""
    rows = ratings(users=20, items=80, sessions=6)
    t_split = np.quantile([r[3] for r in rows], 0.8)
    rows = [(u, i + 1000 if t >= t_split and i % 2 else i, r, t) for u, i, r, t in rows]
    data = interactions(rows)
    recipe = InteractionRecipe(negatives_per_request=5, item_id_feature="full", item_id_column=1)
    feat = feature_config_for(data, recipe, FEAT)
    assert feat.categorical_vocab_sizes[1] == len(np.unique(data.item_id)) + 1
    assert feat.categorical_vocab_sizes[0] == FEAT.categorical_vocab_sizes[0]
    logs = build_event_logs(data, recipe, feat)
    train_rq = logs["train"].requests
    ev = logs["train"].events
    vocab = np.unique(ev.item_id[(ev.timestamp < logs["eval"].requests.timestamp.min())
                                 & ~ev.is_impression])
    seen = {}
    for split in ("train", "eval", "test"):
        rq = logs[split].requests
        cat = rq.categorical[:, 1]
        assert (rq.categorical[:, [0, 2]] == 0).all()
        for it, c in zip(rq.item_id.tolist(), cat.tolist()):
            assert seen.setdefault(it, c) == c           # one category per item everywhere
            if it >= 1000:                               # first seen after the training period
                assert c == 0
    known = np.isin(train_rq.item_id, vocab)
    np.testing.assert_array_equal(train_rq.categorical[known, 1],
                                  np.searchsorted(vocab, train_rq.item_id[known]) + 1)
    assert any(c == 0 for it, c in seen.items() if it >= 1000)


def test_item_id_feature_hashed_and_errors():
    data = interactions(ratings())
    recipe = InteractionRecipe(negatives_per_request=3, item_id_feature="hashed")
    assert feature_config_for(data, recipe, FEAT) == FEAT
    rq = build_event_logs(data, recipe, FEAT)["train"].requests
    cats = rq.categorical[:, 0]
    assert cats.min() >= 0 and cats.max() < FEAT.categorical_vocab_sizes[0]
    assert len(np.unique(cats)) > 0.8 * len(np.unique(rq.item_id))   # few collisions in 1,000
    for it in np.unique(rq.item_id)[:10]:
        assert len(np.unique(cats[rq.item_id == it])) == 1
    small = FeatureConfig(categorical_vocab_sizes=(10, 64, 32))
    with pytest.raises(SchemaError) as e:
        build_event_logs(data, InteractionRecipe(item_id_feature="full"), small)
    assert e.value.field == "categorical_vocab_sizes[0]"
    for kwargs, field in ((dict(item_id_feature="ids"), "item_id_feature"),
                          (dict(item_id_column=-1), "item_id_column")):
        with pytest.raises(SchemaError) as e:
            InteractionRecipe(**kwargs)
        assert e.value.field == field
    with pytest.raises(SchemaError) as e:
        build_event_logs(data, InteractionRecipe(item_id_feature="hashed", item_id_column=3), FEAT)
    assert e.value.field == "item_id_column"


def test_cli_item_id_feature_then_train_reads_the_stored_configs(tmp_path, capsys):
    """``data --item-id full`` sizes the vocabulary; ``train --preset`` without ``--config`` uses
    the feature and selection configs stored with the log."""
    write_csv(tmp_path / "ratings.csv", ratings())
    out = tmp_path / "data"
    assert cli(["data", "movielens", "--ratings", str(tmp_path / "ratings.csv"), "--out", str(out),
                "--negatives", "3", "--item-id", "full", "--config", str(_sel_config(tmp_path))]) == 0
    log = FeatureLog(str(out / "train"))
    assert log.feat.categorical_vocab_sizes[0] == FEAT.categorical_vocab_sizes[0]  # --config wins
    assert cli(["data", "movielens", "--ratings", str(tmp_path / "ratings.csv"), "--out",
                str(tmp_path / "d2"), "--negatives", "3", "--item-id", "full"]) == 0
    log = FeatureLog(str(tmp_path / "d2" / "train"))
    assert log.feat.categorical_vocab_sizes[0] == 61      # 60 items + out of vocabulary
    assert cli(["train", "--preset", "wide_deep", "--data", str(tmp_path / "d2"), "--workdir",
                str(tmp_path / "run"), "--steps", "2", "--batch-size", "8"]) == 0
    capsys.readouterr()


def _sel_config(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text('{"selection": {"max_ll_len": 50, "k_ll": 8}}')
    return path


def test_timestamp_unit_of_interactions():
    """Millisecond timestamps: refused as seconds (named), read with ``timestamp_unit="ms"`` to the
    same requests as the seconds file."""
    rows = [(u, i, r, t + 1_500_000_000) for u, i, r, t in ratings()]   # 2017 in Unix seconds
    ms = [(u, i, r, t * 1000 + 999) for u, i, r, t in rows]
    with pytest.raises(SchemaError) as e:
        build_event_logs(interactions(ms), InteractionRecipe(negatives_per_request=3))
    assert e.value.field == "timestamp" and "timestamp_unit='ms'" in str(e.value)
    a = build_event_logs(interactions(rows), InteractionRecipe(negatives_per_request=3))
    b = build_event_logs(interactions(ms), InteractionRecipe(negatives_per_request=3,
                                                             timestamp_unit="ms"))
    for split in ("train", "eval", "test"):
        np.testing.assert_array_equal(a[split].requests.timestamp, b[split].requests.timestamp)
        np.testing.assert_array_equal(a[split].requests.item_id, b[split].requests.item_id)
