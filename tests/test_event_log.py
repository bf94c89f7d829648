"""Bring-your-own-logs: event-log format, loaders, writers and the builder (transact_jax.data.events).

The tests write a small hand-made event log themselves (as CSV and as npz) and check exactly which
tokens land in S_LL / S_RT / S_imp, plus a brute-force per-request reference on a random log.
"""
from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import jax
import numpy as np
import pytest

from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data.events import (
    EventLog,
    EventLogConfig,
    build_requests,
    build_training_examples,
    write_event_log_csv,
    write_event_log_npz,
)
from transact_jax.data.quantization import quantize
from transact_jax.data.schema import SchemaError

FEAT = FeatureConfig()
SEL = SelectionConfig(max_ll_len=2, max_rt_len=3, max_imp_len=2, k_ll=2, r=2, k_rt=1, k_imp=2,
                      num_nal_negatives=2)
CFG = EventLogConfig()  # merge_window_s = 3600

# (user, item, action, surface, timestamp)
EVENTS = [
    (1, 10, "click", "homefeed", 100),
    (1, 10, "repin", "search", 200),        # merges into the click at 100 (same item, < 3600 s)
    (1, 11, "click", "search", 1000),
    (1, 12, "closeup", "related", 2000),
    (1, 13, "click", "homefeed", 3000),
    (1, 14, "share", "board", 4000),
    (1, 15, "click", "homefeed", 5000),
    (1, 16, "impression", "homefeed", 5500),
    (1, 13, "impression", "homefeed", 5600),  # item 13 engaged at 3000: never in S_imp
    (1, 17, "impression", "related", 5700),
    (1, 18, "impression", "search", 5800),
    (1, 19, "impression", "homefeed", 5900),  # engaged at 7000: in S_imp at T=6000, not at T=8000
    (1, 15, "hide", "homefeed", 6000),        # at T=6000 exactly: invisible then; merges with 5000
    (1, 20, "impression", "homefeed", 6000),  # at T=6000 exactly: invisible then
    (1, 19, "click", "profile", 7000),
    (2, 10, "click", "homefeed", 0),
    (2, 11, "click", "search", 10),
    (2, 11, "comment", "search", 3609),       # 3599 s after the first: merged
    (2, 10, "repin", "board", 3600),          # 3600 s after the first: a new token
    (2, 12, "impression", "shopping", 4000),
    (9, 11, "click", "homefeed", 10),         # another user: never leaks into users 1..3
]
ITEMS = np.arange(10, 21)
# (request_id, user_id, timestamp, item_id, click, repin, hide); extra features set below
REQUESTS = [
    (100, 1, 6000, 20, 1, 0, 0),
    (200, 2, 5000, 13, 1, 1, 0),
    (100, 1, 6000, 11, 0, 1, 0),
    (101, 1, 8000, 12, 0, 0, 1),
    (300, 3, 100, 14, 0, 0, 0),
]


def item_embeddings() -> np.ndarray:
    emb = np.random.default_rng(7).normal(scale=0.3, size=(len(ITEMS), 32))
    emb[ITEMS.tolist().index(20), 0] = 0.9  # beyond the 0.65 scale: clamps to code 127
    return emb


def columns():
    """The hand-made log as three ``{column: array}`` tables."""
    u, i, a, s, t = zip(*EVENTS)
    events = {"user_id": np.array(u, np.int64), "item_id": np.array(i, np.int64), "action": np.array(a),
              "surface": np.array(s), "timestamp": np.array(t, np.int64)}
    items = {"item_id": ITEMS.astype(np.int64), "embedding": item_embeddings()}
    rid, uid, ts, item, click, repin, hide = (np.array(c, np.int64) for c in zip(*REQUESTS))
    requests = {"request_id": rid, "user_id": uid, "timestamp": ts, "item_id": item,
                "click": click, "repin": repin, "hide": hide,
                "dense_0": np.array([0.5, -1.25, 0.0, 2.0, 0.0]),
                "cat_1": np.array([0, 3, 0, 63, 0], np.int64)}
    return events, items, requests


def write_csv(path: Path, cols) -> None:
    """Plain CSV writer used by the tests (independent of the library's writer)."""
    names = list(cols)
    lines = [",".join(names)]
    for row in zip(*(cols[n] for n in names)):
        lines.append(",".join(repr(float(v)) if isinstance(v, np.floating) else str(v) for v in row))
    path.write_text("\n".join(lines) + "\n")


def write_log(tmp: Path, fmt: str):
    events, items, requests = columns()
    if fmt == "csv":
        items = {"item_id": items["item_id"],
                 **{f"emb_{k}": items["embedding"][:, k] for k in range(32)}}
    paths = []
    for name, cols in (("events", events), ("items", items), ("requests", requests)):
        path = tmp / f"{name}.{fmt}"
        if fmt == "csv":
            write_csv(path, cols)
        else:
            np.savez(path, **cols)
        paths.append(path)
    return paths


@pytest.fixture(scope="module", params=["csv", "npz", "dict"])
def log(request, tmp_path_factory) -> EventLog:
    if request.param == "dict":
        return EventLog.load(*columns())
    return EventLog.load(*write_log(tmp_path_factory.mktemp(request.param), request.param))


@pytest.fixture(scope="module")
def batch(log):
    return build_requests(log, FEAT, SEL, CFG)


def bits(*names) -> int:
    return FEAT.action_mask(names)


def surf(name) -> int:
    return FEAT.surface_names.index(name)


def codes(item_ids) -> np.ndarray:
    rows = [ITEMS.tolist().index(i) for i in item_ids]
    return quantize(item_embeddings()[rows].astype(np.float32)).reshape(len(rows), 32)


def seq(batch, name, u):
    return getattr(batch, name).sequence(u)


# ----------------------------------------------------------------------------- exact sequences

def test_requests_and_candidates_grouped_in_first_appearance_order(batch):
    np.testing.assert_array_equal(batch.request_id, [100, 200, 101, 300])
    np.testing.assert_array_equal(batch.user_id, [1, 2, 1, 3])
    np.testing.assert_array_equal(batch.request_timestamp, [6000, 5000, 8000, 100])
    np.testing.assert_array_equal(batch.cand_item_id, [20, 11, 13, 12, 14])
    np.testing.assert_array_equal(batch.cand_to_req, [0, 0, 1, 2, 3])
    np.testing.assert_array_equal(batch.labels, [[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0]])
    assert batch.labels.dtype == np.uint8
    np.testing.assert_array_equal(batch.dense[:, 0], [0.5, 0.0, -1.25, 2.0, 0.0])
    assert not batch.dense[:, 1:].any()
    np.testing.assert_array_equal(batch.categorical[:, 1], [0, 0, 3, 63, 0])
    assert not batch.categorical[:, [0, 2]].any()


def test_candidate_embeddings_quantized(batch):
    np.testing.assert_array_equal(batch.cand_embedding, codes([20, 11, 13, 12, 14]))
    assert batch.cand_embedding[0, 0] == 127  # 0.9 > 0.65 clamps
    assert batch.cand_embedding.dtype == np.int8


def test_request_at_6000_sequences(batch):
    rt, ll, imp = seq(batch, "rt", 0), seq(batch, "ll", 0), seq(batch, "imp", 0)
    # explicit tokens before 6000: 10@100 11@1000 12@2000 13@3000 14@4000 15@5000
    np.testing.assert_array_equal(rt.timestamps, [3000, 4000, 5000])
    np.testing.assert_array_equal(rt.actions, [bits("click"), bits("share"), bits("click")])  # no hide yet
    np.testing.assert_array_equal(rt.surfaces, [surf("homefeed"), surf("board"), surf("homefeed")])
    np.testing.assert_array_equal(rt.embeddings, codes([13, 14, 15]))
    np.testing.assert_array_equal(ll.timestamps, [1000, 2000])  # max_ll_len=2 keeps the most recent
    np.testing.assert_array_equal(ll.embeddings, codes([11, 12]))
    np.testing.assert_array_equal(ll.actions, [bits("click"), bits("closeup")])
    # impressions before 6000 not engaged: 16, 17, 18, 19 (13 was engaged) -> the 2 most recent
    np.testing.assert_array_equal(imp.timestamps, [5800, 5900])
    np.testing.assert_array_equal(imp.embeddings, codes([18, 19]))
    np.testing.assert_array_equal(imp.surfaces, [surf("search"), surf("homefeed")])
    assert not imp.actions.any()


def test_request_at_8000_sequences(batch):
    rt, ll, imp = seq(batch, "rt", 2), seq(batch, "ll", 2), seq(batch, "imp", 2)
    np.testing.assert_array_equal(rt.timestamps, [4000, 5000, 7000])
    np.testing.assert_array_equal(rt.actions, [bits("share"), bits("click", "hide"), bits("click")])
    np.testing.assert_array_equal(rt.surfaces, [surf("board"), surf("homefeed"), surf("profile")])
    np.testing.assert_array_equal(ll.timestamps, [2000, 3000])
    # 19 is engaged at 7000 < 8000 now; 20 (shown at 6000) became visible
    np.testing.assert_array_equal(imp.embeddings, codes([18, 20]))
    np.testing.assert_array_equal(imp.timestamps, [5800, 6000])


def test_merge_window_boundary_and_multi_hot(batch):
    rt, ll, imp = seq(batch, "rt", 1), seq(batch, "ll", 1), seq(batch, "imp", 1)
    np.testing.assert_array_equal(rt.timestamps, [0, 10, 3600])
    np.testing.assert_array_equal(rt.embeddings, codes([10, 11, 10]))
    np.testing.assert_array_equal(rt.actions, [bits("click"), bits("click", "comment"), bits("repin")])
    np.testing.assert_array_equal(rt.surfaces, [surf("homefeed"), surf("search"), surf("board")])
    assert len(ll.timestamps) == 0
    np.testing.assert_array_equal(imp.embeddings, codes([12]))


def test_first_token_merges_click_and_repin(log):
    wide = dataclasses.replace(SEL, max_ll_len=10)
    ll = build_requests(log, FEAT, wide, CFG).ll.sequence(0)
    np.testing.assert_array_equal(ll.timestamps, [100, 1000, 2000])
    assert ll.actions[0] == bits("click", "repin")
    assert ll.surfaces[0] == surf("homefeed")  # the first event's surface


def test_user_without_history_has_empty_sequences(batch):
    for name in ("ll", "rt", "imp"):
        assert getattr(batch, name).lengths[3] == 0


def test_no_event_at_or_after_request_time(batch):
    for name in ("ll", "rt", "imp"):
        s = getattr(batch, name)
        req_of_token = np.repeat(np.arange(batch.num_requests), s.lengths)
        assert np.all(s.tokens.timestamps < batch.request_timestamp[req_of_token])
        for u in range(batch.num_requests):
            assert np.all(np.diff(s.sequence(u).timestamps) >= 0)  # chronological


@pytest.mark.parametrize("only", ["impression", "explicit"])
def test_log_with_one_kind_of_event(only):
    events, items, requests = columns()
    keep = (events["action"] == "impression") == (only == "impression")
    log = EventLog.load({k: v[keep] for k, v in events.items()}, items, requests)
    batch = build_requests(log, FEAT, SEL)
    if only == "impression":
        assert batch.ll.offsets[-1] == batch.rt.offsets[-1] == 0
        np.testing.assert_array_equal(batch.imp.lengths, [2, 1, 2, 0])
    else:
        assert batch.imp.offsets[-1] == 0
        np.testing.assert_array_equal(batch.rt.lengths, [3, 3, 3, 0])
    build_training_examples(log, FEAT, SEL).validate(FEAT, SEL)


def test_merge_window_zero_disables_merging(log):
    batch = build_requests(log, FEAT, SEL, EventLogConfig(merge_window_s=0))
    rt = batch.rt.sequence(2)  # request at 8000
    np.testing.assert_array_equal(rt.timestamps, [5000, 6000, 7000])
    np.testing.assert_array_equal(rt.actions, [bits("click"), bits("hide"), bits("click")])
    np.testing.assert_array_equal(rt.embeddings, codes([15, 15, 19]))


def test_training_examples_validate_and_match_requests(log, batch):
    ex = build_training_examples(log, FEAT, SEL, CFG)
    ex.validate(FEAT, SEL)
    assert len(ex) == 5
    np.testing.assert_array_equal(ex.item_id, batch.cand_item_id)
    np.testing.assert_array_equal(ex.request_id, [100, 100, 200, 101, 300])
    np.testing.assert_array_equal(ex.user_id, [1, 1, 2, 1, 3])
    np.testing.assert_array_equal(ex.labels, batch.labels)
    np.testing.assert_array_equal(ex.candidate_embedding, batch.cand_embedding)
    # Segments are small enough that every valid token is selected: S_all is fully determined.
    # slots: ll (2) | rt_recent (2) | rt_nn (1) | imp (2); 0 = padding
    want = {
        100: [1000, 2000, 4000, 5000, 3000, 5800, 5900],
        200: [0, 0, 10, 3600, 0, 4000, 0],
        101: [2000, 3000, 5000, 7000, 4000, 5800, 6000],
        300: [0] * 7,
    }
    for n, rid in enumerate(ex.request_id):
        np.testing.assert_array_equal(ex.s_all.timestamps[n], want[int(rid)])
        np.testing.assert_array_equal(ex.s_all_mask[n], np.array(want[int(rid)]) > 0 if rid != 200
                                      else [0, 0, 1, 1, 1, 1, 0])
    # token contents come from the request's sequences
    np.testing.assert_array_equal(ex.s_all.embeddings[0, 2:4], codes([14, 15]))
    np.testing.assert_array_equal(ex.s_all.actions[3, 2:4], [bits("click", "hide"), bits("click")])
    # NAL: next token of the S_RT[:r] segment is a positive engagement
    np.testing.assert_array_equal(ex.nal_target_mask, [[1, 0], [1, 0], [1, 0], [1, 0], [0, 0]])
    np.testing.assert_array_equal(ex.nal_negatives[0], codes([18, 19]))
    np.testing.assert_array_equal(ex.nal_negative_mask, [[1, 1], [1, 1], [1, 0], [1, 1], [0, 0]])


# ------------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("writer", [write_event_log_csv, write_event_log_npz])
def test_writers_round_trip(tmp_path, writer):
    log = EventLog.load(*columns())
    writer(log, tmp_path)
    again = EventLog.load_dir(tmp_path)
    for table in ("events", "items", "requests"):
        a, b = getattr(log, table), getattr(again, table)
        for f in dataclasses.fields(a):
            x, y = getattr(a, f.name), getattr(b, f.name)
            if isinstance(x, np.ndarray):
                assert x.dtype == y.dtype, (table, f.name)
                np.testing.assert_array_equal(x, y, err_msg=f"{table}.{f.name}")
            else:
                assert x == y
    b1, b2 = build_requests(log, FEAT, SEL), build_requests(again, FEAT, SEL)
    for x, y in zip(jax.tree_util.tree_leaves(b1), jax.tree_util.tree_leaves(b2)):
        np.testing.assert_array_equal(x, y)


def test_serving_requests_without_labels():
    events, items, requests = columns()
    for h in FEAT.heads:
        del requests[h]
    log = EventLog.load(events, items, requests)
    batch = build_requests(log, FEAT, SEL)
    assert batch.labels is None
    with pytest.raises(SchemaError) as e:
        build_training_examples(log, FEAT, SEL)
    assert e.value.field == "requests.labels"


def test_drop_missing_items():
    events, items, requests = columns()
    keep = items["item_id"] != 15
    items = {"item_id": items["item_id"][keep], "embedding": items["embedding"][keep]}
    with pytest.raises(SchemaError) as e:
        build_requests(EventLog.load(events, items, requests), FEAT, SEL)
    assert e.value.field == "events.item_id" and "15" in str(e.value)
    batch = build_requests(EventLog.load(events, items, requests), FEAT, SEL,
                           EventLogConfig(on_missing_item="drop"))
    np.testing.assert_array_equal(batch.rt.sequence(2).timestamps, [3000, 4000, 7000])  # no 15 token


def test_drop_missing_candidate_items_and_empty_requests():
    events, items, requests = columns()
    keep = items["item_id"] != 14  # request 300 has only item 14
    items = {"item_id": items["item_id"][keep], "embedding": items["embedding"][keep]}
    with pytest.raises(SchemaError) as e:
        build_requests(EventLog.load(events, items, requests), FEAT, SEL)
    assert e.value.field == "events.item_id"  # events are checked first (item 14 has a share)
    batch = build_requests(EventLog.load(events, items, requests), FEAT, SEL,
                           EventLogConfig(on_missing_item="drop"))
    np.testing.assert_array_equal(batch.request_id, [100, 200, 101])
    events = {k: v[events["item_id"] != 14] for k, v in events.items()}
    with pytest.raises(SchemaError) as e:
        build_requests(EventLog.load(events, items, requests), FEAT, SEL)
    assert e.value.field == "requests.item_id"


# ----------------------------------------------------------------- brute-force reference, speed

def reference(events, req_user, req_time, sel: SelectionConfig, window: int):
    """Per-request Python implementation of the documented semantics: (ll, rt, imp) as lists of
    (timestamp, action bits, surface id, item)."""
    mine = [e for e in events if e[0] == req_user and e[4] < req_time]
    explicit = sorted((e for e in mine if e[2] != "impression"), key=lambda e: (e[1], e[4]))
    tokens = []
    for item, group in itertools.groupby(explicit, key=lambda e: e[1]):
        current = None
        for e in group:
            if current is None or e[4] >= current[0] + window:
                current = [e[4], 0, surf(e[3]), item]
                tokens.append(current)
            current[1] |= bits(e[2])
    tokens = [tuple(t) for t in sorted(tokens, key=lambda t: (t[0], t[3]))]

    def last(xs, k):
        return xs[max(len(xs) - k, 0):]

    rt = last(tokens, sel.max_rt_len)
    ll = last(tokens[:len(tokens) - len(rt)], sel.max_ll_len)
    engaged = {e[1] for e in explicit}
    imps = sorted((e for e in mine if e[2] == "impression" and e[1] not in engaged),
                  key=lambda e: (e[4], e[1]))
    imp = [(e[4], 0, surf(e[3]), e[1]) for e in last(imps, sel.max_imp_len)]
    return ll, rt, imp


def random_log(rng, num_events, num_users, num_items, num_requests, t_max):
    actions = np.array(list(FEAT.action_names) + ["impression"] * 4)
    events = {
        "user_id": rng.integers(0, num_users, num_events),
        "item_id": rng.integers(0, num_items, num_events) * 3 + 5,  # sparse ids
        "action": actions[rng.integers(0, len(actions), num_events)],
        "surface": np.array(FEAT.surface_names)[rng.integers(0, FEAT.num_surfaces, num_events)],
        "timestamp": rng.integers(0, t_max, num_events),
    }
    items = {"item_id": np.arange(num_items) * 3 + 5,
             "embedding": rng.normal(scale=0.3, size=(num_items, 32))}
    cands = rng.integers(1, 4, num_requests)
    req = np.repeat(np.arange(num_requests), cands)
    requests = {
        "request_id": req + 1000, "user_id": rng.integers(0, num_users + 1, num_requests)[req],
        "timestamp": rng.integers(0, t_max + 10, num_requests)[req],
        "item_id": rng.integers(0, num_items, len(req)) * 3 + 5,
        **{h: rng.integers(0, 2, len(req)) for h in FEAT.heads},
    }
    return events, items, requests


@pytest.mark.parametrize("sel,window", [
    (SelectionConfig(max_ll_len=5, max_rt_len=4, max_imp_len=3, r=2), 300),
    (SelectionConfig(max_ll_len=10_000, max_rt_len=100, max_imp_len=0, r=0), 0),
    (SelectionConfig(max_ll_len=0, max_rt_len=7, max_imp_len=100, r=7), 5000),
])
def test_matches_brute_force_reference(sel, window):
    rng = np.random.default_rng(window)
    events, items, requests = random_log(rng, 3000, 6, 25, 40, 4000)  # dense in time: many ties
    log = EventLog.load(events, items, requests)
    batch = build_requests(log, FEAT, sel, EventLogConfig(merge_window_s=window))
    rows = list(zip(*(events[k].tolist() for k in ("user_id", "item_id", "action", "surface", "timestamp"))))
    code_of = {int(i): c for i, c in zip(items["item_id"], quantize(items["embedding"].astype(np.float32)))}
    for u in range(batch.num_requests):
        want = reference(rows, int(batch.user_id[u]), int(batch.request_timestamp[u]), sel, window)
        for name, w in zip(("ll", "rt", "imp"), want):
            got = getattr(batch, name).sequence(u)
            assert len(got.timestamps) == len(w), (u, name)
            if not w:
                continue
            t, a, s, item = zip(*w)
            np.testing.assert_array_equal(got.timestamps, t, err_msg=f"{u} {name}")
            np.testing.assert_array_equal(got.actions, a, err_msg=f"{u} {name}")
            np.testing.assert_array_equal(got.surfaces, s, err_msg=f"{u} {name}")
            np.testing.assert_array_equal(got.embeddings, np.stack([code_of[i] for i in item]))
    # the random log is not trivial: every non-zero limit yields tokens, merging yields multi-hot ones
    for name, limit in sel.max_lengths.items():
        assert (getattr(batch, name).offsets[-1] > 0) == (limit > 0), name
    popcount = np.unpackbits(batch.rt.tokens.actions[:, None].view(np.uint8), axis=1).sum(1)
    assert (popcount.max() > 1) == (window > 0)


def test_tens_of_thousands_of_events():
    rng = np.random.default_rng(0)
    events, items, requests = random_log(rng, 60_000, 500, 5000, 5000, 10**7)
    log = EventLog.load(events, items, requests)
    batch = build_requests(log, FEAT, SelectionConfig())
    assert batch.num_requests == 5000
    assert batch.rt.lengths.max() == 100 and batch.ll.lengths.sum() > 0


# ------------------------------------------------------------------------------------- bad input

def _set(table, col, value):
    def mutate(events, items, requests):
        t = {"events": events, "items": items, "requests": requests}[table]
        t[col] = value(t[col].copy()) if callable(value) else value
    return mutate


def _setitem(table, col, row, value):
    def mutate(events, items, requests):
        t = {"events": events, "items": items, "requests": requests}[table]
        a = t[col].astype(object) if isinstance(value, str) else t[col].copy()
        a[row] = value
        t[col] = a
    return mutate


def _copy(table, src, dst):
    def mutate(events, items, requests):
        t = {"events": events, "items": items, "requests": requests}[table]
        t[dst] = t[src].copy()
    return mutate


def _drop(table, col):
    def mutate(events, items, requests):
        del {"events": events, "items": items, "requests": requests}[table][col]
    return mutate


def _empty(table):
    def mutate(events, items, requests):
        t = {"events": events, "items": items, "requests": requests}[table]
        for k in t:
            t[k] = t[k][:0]
    return mutate


BAD = {
    "unknown action": (_setitem("events", "action", 3, "like"), "events.action"),
    "unknown surface": (_setitem("events", "surface", 0, "tv"), "events.surface"),
    "float timestamps": (_set("events", "timestamp", lambda a: a + 0.5), "events.timestamp"),
    "non-int timestamp string": (_setitem("events", "timestamp", 2, "12.5"), "events.timestamp"),
    "negative user id": (_setitem("events", "user_id", 1, -4), "events.user_id"),
    "negative item id": (_setitem("events", "item_id", 1, -4), "events.item_id"),
    "missing column": (_drop("events", "surface"), "events.surface"),
    "empty events": (_empty("events"), "events.user_id"),
    "ragged column": (_set("events", "timestamp", lambda a: a[:-1]), "events.timestamp"),
    "action ids not names": (_set("events", "action", lambda a: np.zeros(len(a), np.int64)), "events.action"),
    "nan embedding": (_setitem("items", "embedding", (2, 5), np.nan), "items.embedding"),
    "inf embedding": (_setitem("items", "embedding", (0, 0), np.inf), "items.embedding"),
    "embedding width": (_set("items", "embedding", lambda a: a[:, :16]), "items.embedding"),
    "duplicate item id": (_setitem("items", "item_id", 3, 10), "items.item_id"),
    "missing embedding": (_drop("items", "embedding"), "items.embedding"),
    "negative request id": (_setitem("requests", "request_id", 0, -1), "requests.request_id"),
    "label not 0/1": (_setitem("requests", "repin", 1, 2), "requests.repin"),
    "partial labels": (_drop("requests", "hide"), "requests.hide"),
    "nan dense": (_setitem("requests", "dense_0", 1, np.nan), "requests.dense_0"),
    "dense beyond config": (_copy("requests", "dense_0", "dense_8"), "requests.dense_8"),
    "categorical out of range": (_setitem("requests", "cat_1", 2, 64), "requests.cat_1"),
    "missing request column": (_drop("requests", "timestamp"), "requests.timestamp"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_names_the_field(case):
    mutate, field = BAD[case]
    tables = columns()
    mutate(*tables)
    with pytest.raises(SchemaError) as e:
        EventLog.load(*tables)
    assert e.value.field == field, str(e.value)


@pytest.mark.parametrize("col,value", [("user_id", 2), ("timestamp", 5999)])
def test_request_rows_must_agree(col, value):
    events, items, requests = columns()
    requests[col] = requests[col].copy()
    requests[col][2] = value  # second row of request 100
    with pytest.raises(SchemaError) as e:
        build_requests(EventLog.load(events, items, requests), FEAT, SEL)
    assert e.value.field == f"requests.{col}"


def test_truncated_csv_and_corrupt_npz(tmp_path):
    ev, it, rq = write_log(tmp_path, "csv")
    text = ev.read_text()
    ev.write_text(text[: text.rindex(",")] + "\n")  # last row loses its last field
    with pytest.raises(SchemaError) as e:
        EventLog.load(ev, it, rq)
    assert e.value.field == "events"
    ev.write_text("")
    with pytest.raises(SchemaError) as e:
        EventLog.load(ev, it, rq)
    assert e.value.field == "events"
    npz_dir = tmp_path / "npz"
    npz_dir.mkdir()
    ev2, it2, rq2 = write_log(npz_dir, "npz")
    it2.write_bytes(it2.read_bytes()[:100])
    with pytest.raises(SchemaError) as e:
        EventLog.load(ev2, it2, rq2)
    assert e.value.field == "items"
    with pytest.raises(SchemaError) as e:
        EventLog.load(ev2, tmp_path / "items.parquet", rq2)
    assert e.value.field == "items"


def test_csv_bad_embedding_value(tmp_path):
    ev, it, rq = write_log(tmp_path, "csv")
    lines = it.read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + ",nan"
    it.write_text("\n".join(lines) + "\n")
    with pytest.raises(SchemaError) as e:
        EventLog.load(ev, it, rq)
    assert e.value.field == "items.embedding"


def test_config_validation():
    with pytest.raises(SchemaError) as e:
        EventLogConfig(merge_window_s=-1)
    assert e.value.field == "merge_window_s"
    with pytest.raises(SchemaError) as e:
        EventLogConfig(on_missing_item="ignore")
    assert e.value.field == "on_missing_item"
