"""The builder: event logs -> de-duplicated :class:`~transact_jax.data.schema.RequestBatch` and logged
:class:`~transact_jax.data.schema.TrainingExamples`, with the sequence reconstruction (multi-hot
merging, S_LL / S_RT / S_imp per request, no leakage). The semantics are documented in
:mod:`transact_jax.data.events`.

Everything is vectorized numpy: events are sorted once by (user, time) and each request finds its
sequences with ``searchsorted``; tens of thousands of events take well under a second.
"""
from __future__ import annotations

import dataclasses
from typing import Tuple

import numpy as np

from transact_jax.config import FeatureConfig, SelectionConfig
from transact_jax.data.events.columns import INT64_MAX
from transact_jax.data.events.tables import EventLog, EventLogConfig, ItemTable, RequestTable
from transact_jax.data.features import log_nn_features
from transact_jax.data.quantization import quantize
from transact_jax.data.schema import (
    JaggedSequences,
    RequestBatch,
    SchemaError,
    TokenFields,
    TrainingExamples,
)


# ------------------------------------------------------------------------------- vectorized helpers

class _SortedPairs:
    """(group, key) int pairs sorted lexicographically; finds the first pair >= a query, vectorized.

    Keys are replaced by their rank among the distinct keys, so ``group * (n_keys + 1) + rank`` is one
    sorted int64 (no overflow for any realistic size) and ``np.searchsorted`` does the work.
    """

    def __init__(self, group: np.ndarray, key: np.ndarray):
        self.keys = np.unique(key)
        self.stride = len(self.keys) + 1
        self.flat = group.astype(np.int64) * self.stride + np.searchsorted(self.keys, key)

    def first_at_or_after(self, group: np.ndarray, key: np.ndarray) -> np.ndarray:
        """Index of the first stored pair ``>= (group, key)`` (= number of pairs before it)."""
        q = group.astype(np.int64) * self.stride + np.searchsorted(self.keys, key)
        return np.searchsorted(self.flat, q, side="left")


def _ranges(lo: np.ndarray, hi: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Concatenated ``arange(lo[i], hi[i])`` and the (U + 1,) offsets of each range."""
    lengths = np.maximum(hi - lo, 0).astype(np.int64)
    offsets = np.zeros(len(lo) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    index = np.repeat(lo.astype(np.int64) - offsets[:-1], lengths) + np.arange(offsets[-1])
    return index, offsets


def _segment_or(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Bitwise OR of ``values[lo[i]:hi[i]]`` for each i (requires ``hi > lo``)."""
    if len(lo) == 0:
        return np.zeros(0, values.dtype)
    padded = np.append(values, np.zeros(1, values.dtype))
    return np.bitwise_or.reduceat(padded, np.stack([lo, hi], 1).ravel())[::2]


@dataclasses.dataclass(frozen=True)
class _Tokens:
    """Merged explicit tokens of all users (token ids in merge order: sorted by user, item, time).

    ``event_*`` are the explicit events in merge order; token ``j`` owns events
    ``event_lo[j] : event_lo[j + 1]``. ``group_*`` describe the distinct (user, item) pairs.
    """

    user: np.ndarray
    item_row: np.ndarray
    time: np.ndarray
    last_time: np.ndarray
    action: np.ndarray
    surface: np.ndarray
    event_lo: np.ndarray
    event_token: np.ndarray
    event_time: np.ndarray
    event_bit: np.ndarray
    group_user: np.ndarray
    group_item_row: np.ndarray
    group_first_time: np.ndarray


def _window_ends(group: np.ndarray, time: np.ndarray, starts: np.ndarray, window: int,
                 pairs: "_SortedPairs") -> np.ndarray:
    """Per token start ``s`` (events sorted by (group, time)), the first event of its group at or after
    ``time[s] + window``, or the group's end. Overflow-safe: where ``time[s] + window`` exceeds int64,
    no event is that late and the token runs to the end of its group."""
    t0 = time[starts]
    saturated = t0 > INT64_MAX - window
    end = np.searchsorted(group, group[starts], side="right")
    fits = ~saturated
    end[fits] = pairs.first_at_or_after(group[starts[fits]], t0[fits] + window)
    return end


def _anchored_starts(group: np.ndarray, time: np.ndarray, window: int) -> np.ndarray:
    """Token start positions in events sorted by (group, time): a token covers ``[t0, t0 + window)``.

    Pointer-chasing from each group's first event, all groups at once; the number of rounds is the
    largest number of tokens in one (user, item) group.
    """
    n = len(group)
    is_start = np.zeros(n, bool)
    pairs = _SortedPairs(group, time)
    active = np.flatnonzero(np.r_[True, group[1:] != group[:-1]]) if n else np.zeros(0, np.int64)
    while active.size:
        is_start[active] = True
        nxt = np.maximum(_window_ends(group, time, active, window, pairs), active + 1)
        inside = nxt < n
        src, nxt = active[inside], nxt[inside]
        active = nxt[group[nxt] == group[src]]
    return np.flatnonzero(is_start)


def _merge_explicit(user: np.ndarray, item_row: np.ndarray, time: np.ndarray, bit: np.ndarray,
                    surface: np.ndarray, window: int) -> _Tokens:
    """Merge explicit events of one (user, item) within ``window`` seconds into multi-hot tokens."""
    order = np.lexsort((time, item_row, user))
    u, v, t, b, s = user[order], item_row[order], time[order], bit[order], surface[order]
    n = len(u)
    new_group = np.r_[True, (u[1:] != u[:-1]) | (v[1:] != v[:-1])] if n else np.zeros(0, bool)
    group = np.cumsum(new_group) - 1
    starts = _anchored_starts(group, t, window)
    ends = np.append(starts[1:], n).astype(np.int64) if n else starts
    is_start = np.zeros(n, np.int64)
    is_start[starts] = 1
    token_of_event = np.cumsum(is_start) - 1
    g_starts = np.flatnonzero(new_group)
    return _Tokens(
        user=u[starts], item_row=v[starts], time=t[starts], last_time=t[ends - 1] if n else t[:0],
        action=_segment_or(b, starts, ends), surface=s[starts], event_lo=starts,
        event_token=token_of_event, event_time=t, event_bit=b,
        group_user=u[g_starts], group_item_row=v[g_starts], group_first_time=t[g_starts])


def _actions_before(tok: _Tokens, ids: np.ndarray, cutoff: np.ndarray) -> np.ndarray:
    """Action bitmasks of tokens ``ids`` counting only their events with time < ``cutoff``."""
    actions = tok.action[ids].copy()
    late = tok.last_time[ids] >= cutoff
    if late.any():
        pairs = _SortedPairs(tok.event_token, tok.event_time)
        hi = pairs.first_at_or_after(ids[late], cutoff[late])
        actions[late] = _segment_or(tok.event_bit, tok.event_lo[ids[late]], hi)
    return actions


def _first_engagement(tok: _Tokens, user: np.ndarray, item_row: np.ndarray) -> np.ndarray:
    """Earliest explicit-event time of each (user, item) pair (int64 max when never engaged)."""
    out = np.full(len(user), INT64_MAX, np.int64)
    if len(tok.group_user) == 0 or len(user) == 0:
        return out
    q = _SortedPairs(tok.group_user, tok.group_item_row).first_at_or_after(user, item_row)
    qc = np.minimum(q, len(tok.group_user) - 1)
    hit = (q < len(tok.group_user)) & (tok.group_user[qc] == user) & (tok.group_item_row[qc] == item_row)
    out[hit] = tok.group_first_time[qc[hit]]
    return out


def _recent_eligible(lo: np.ndarray, hi: np.ndarray, eligible_until: np.ndarray, cutoff: np.ndarray,
                     count: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per request i, the ``count`` last positions p in ``[lo[i], hi[i])`` with
    ``eligible_until[p] >= cutoff[i]``, chronological. Returns (flat positions, offsets).

    Scans a window of the last ``count`` positions and doubles it for requests that found too few.
    """
    reqs, picks = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    active = np.flatnonzero(hi > lo) if count > 0 else np.zeros(0, np.int64)
    width = max(count, 1)
    while active.size:
        a_lo, a_hi = lo[active], hi[active]
        start = np.maximum(a_hi - width, a_lo)
        pos = start[:, None] + np.arange(width)[None, :]
        inside = pos < a_hi[:, None]
        pos = np.where(inside, pos, a_lo[:, None])
        ok = inside & (eligible_until[pos] >= cutoff[active][:, None])
        from_right = np.cumsum(ok[:, ::-1], axis=1)[:, ::-1]
        done = (from_right[:, 0] >= count) | (start == a_lo)
        rows, cols = np.nonzero(ok & (from_right <= count) & done[:, None])
        reqs.append(active[rows])
        picks.append(pos[rows, cols])
        active, width = active[~done], width * 2
    req, pick = np.concatenate(reqs), np.concatenate(picks)
    order = np.argsort(req, kind="stable")
    offsets = np.zeros(len(lo) + 1, np.int64)
    np.cumsum(np.bincount(req, minlength=len(lo)), out=offsets[1:])
    return pick[order], offsets


# -------------------------------------------------------------------------------------------- builder

def _check_compatible(log: EventLog, feat: FeatureConfig) -> None:
    """The log was loaded under a config with the same names and widths as ``feat``."""
    if log.events.action_names != tuple(feat.action_names):
        raise SchemaError("events.action", "log was loaded with different FeatureConfig.action_names")
    if log.events.surface_names != tuple(feat.surface_names):
        raise SchemaError("events.surface", "log was loaded with different FeatureConfig.surface_names")
    if log.items.embedding.shape[1] != feat.embedding_dim:
        raise SchemaError("items.embedding", f"width {log.items.embedding.shape[1]} != embedding_dim "
                          f"{feat.embedding_dim}")
    r = log.requests
    if r.heads != tuple(feat.heads) or r.dense.shape[1] != feat.num_dense or \
            r.categorical.shape[1] != len(feat.categorical_vocab_sizes):
        raise SchemaError("requests", "log was loaded with different heads / num_dense / categorical "
                          "features than this FeatureConfig")


@dataclasses.dataclass(frozen=True)
class _ItemIndex:
    """Item ids sorted, with their int8 codes."""

    ids: np.ndarray
    codes: np.ndarray

    @classmethod
    def build(cls, items: ItemTable, feat: FeatureConfig) -> "_ItemIndex":
        order = np.argsort(items.item_id, kind="stable")
        codes = quantize(items.embedding[order], feat.quant_scale, "items.embedding", feat.embedding_dim)
        return cls(items.item_id[order], codes)

    def rows(self, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Row of each id in ``codes`` and whether it exists."""
        row = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return row, self.ids[row] == ids


def _resolve_items(ids: np.ndarray, index: _ItemIndex, field: str,
                   policy: str) -> Tuple[np.ndarray, np.ndarray]:
    """(item rows, kept mask) for ``ids``; raises for missing items unless ``policy == "drop"``."""
    row, found = index.rows(ids)
    if policy == "raise" and not found.all():
        bad = int(np.argmax(~found))
        raise SchemaError(field, f"row {bad}: item id {ids[bad]} is not in the item embedding table "
                          f"(EventLogConfig(on_missing_item='drop') skips such rows)")
    return row, found


def _group_requests(req: RequestTable) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows sorted by request (first-appearance order, stable) -> (row order, request of each sorted
    row, first row of each request). Checks that a request's rows agree on user and time."""
    _, first, inverse = np.unique(req.request_id, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    by_appearance = np.argsort(first, kind="stable")
    rank = np.empty_like(by_appearance)
    rank[by_appearance] = np.arange(len(first))
    req_of_row = rank[inverse]
    head = first[by_appearance]
    for name in ("user_id", "timestamp"):
        col = getattr(req, name)
        bad = col != col[head[req_of_row]]
        if bad.any():
            row = int(np.argmax(bad))
            raise SchemaError(f"requests.{name}", f"row {row}: request {req.request_id[row]} has rows "
                              f"with different {name} ({col[head[req_of_row[row]]]} vs {col[row]})")
    order = np.argsort(req_of_row, kind="stable")
    return order, req_of_row[order], head


def _token_fields(times, actions, surfaces, item_rows, index: _ItemIndex, feat: FeatureConfig) -> TokenFields:
    return TokenFields(timestamps=times.astype(np.int64), actions=actions.astype(feat.action_dtype),
                       surfaces=surfaces.astype(np.int16), embeddings=index.codes[item_rows])


def _explicit_sequences(tok: _Tokens, req_user: np.ndarray, req_time: np.ndarray, index: _ItemIndex,
                        feat: FeatureConfig, sel: SelectionConfig) -> Tuple[JaggedSequences, JaggedSequences]:
    """S_LL and S_RT of each request from the merged explicit tokens (semantics:
    :mod:`transact_jax.data.events`)."""
    seq_order = np.lexsort((index.ids[tok.item_row], tok.time, tok.user))
    user, time = tok.user[seq_order], tok.time[seq_order]
    first = np.searchsorted(user, req_user, side="left")
    end = _SortedPairs(user, time).first_at_or_after(req_user, req_time)
    rt_lo = np.maximum(first, end - sel.max_rt_len)
    ll_lo = np.maximum(first, rt_lo - sel.max_ll_len)
    out = []
    for lo, hi in ((ll_lo, rt_lo), (rt_lo, end)):
        pos, offsets = _ranges(lo, hi)
        ids = seq_order[pos]
        cutoff = np.repeat(req_time, np.diff(offsets))
        fields = _token_fields(tok.time[ids], _actions_before(tok, ids, cutoff), tok.surface[ids],
                               tok.item_row[ids], index, feat)
        out.append(JaggedSequences(fields, offsets))
    return out[0], out[1]


def _impression_sequences(user: np.ndarray, item_row: np.ndarray, time: np.ndarray, surface: np.ndarray,
                          tok: _Tokens, req_user: np.ndarray, req_time: np.ndarray, index: _ItemIndex,
                          feat: FeatureConfig, sel: SelectionConfig) -> JaggedSequences:
    """S_imp: recent impressions before the request of items the user had not engaged with."""
    order = np.lexsort((index.ids[item_row], time, user))
    user, item_row, time, surface = user[order], item_row[order], time[order], surface[order]
    engaged_at = _first_engagement(tok, user, item_row)
    lo = np.searchsorted(user, req_user, side="left")
    hi = _SortedPairs(user, time).first_at_or_after(req_user, req_time)
    pos, offsets = _recent_eligible(lo, hi, engaged_at, req_time, sel.max_imp_len)
    fields = _token_fields(time[pos], np.zeros(len(pos), np.int64), surface[pos], item_row[pos], index, feat)
    return JaggedSequences(fields, offsets)


def build_requests(log: EventLog, feat: FeatureConfig = FeatureConfig(),
                   sel: SelectionConfig = SelectionConfig(),
                   cfg: EventLogConfig = EventLogConfig()) -> RequestBatch:
    """De-duplicated :class:`RequestBatch` (one request per ``request_id``) from an event log.

    Sequences follow the semantics documented in :mod:`transact_jax.data.events`; labels are set when
    the requests table has label columns. The result is validated against ``feat`` and ``sel``.
    """
    _check_compatible(log, feat)
    index = _ItemIndex.build(log.items, feat)
    ev = log.events
    ev_rows, keep = _resolve_items(ev.item_id, index, "events.item_id", cfg.on_missing_item)
    ev, ev_rows = ev.select(keep), ev_rows[keep]
    rq = log.requests
    cand_rows, keep = _resolve_items(rq.item_id, index, "requests.item_id", cfg.on_missing_item)
    rq, cand_rows = rq.select(keep), cand_rows[keep]

    order, cand_to_req, head = _group_requests(rq)
    users = np.unique(np.concatenate([ev.user_id, rq.user_id]))
    ev_user = np.searchsorted(users, ev.user_id)
    req_user = np.searchsorted(users, rq.user_id[head])
    req_time = rq.timestamp[head]

    explicit = ~ev.is_impression
    bit = np.left_shift(np.ones(1, np.uint32), ev.action[explicit].astype(np.uint32))
    tok = _merge_explicit(ev_user[explicit], ev_rows[explicit], ev.timestamp[explicit], bit,
                          ev.surface[explicit], int(cfg.merge_window_s))
    ll, rt = _explicit_sequences(tok, req_user, req_time, index, feat, sel)
    imp_mask = ev.is_impression
    imp = _impression_sequences(ev_user[imp_mask], ev_rows[imp_mask], ev.timestamp[imp_mask],
                                ev.surface[imp_mask], tok, req_user, req_time, index, feat, sel)
    batch = RequestBatch(
        ll=ll, rt=rt, imp=imp,
        user_id=rq.user_id[head], request_id=rq.request_id[head], request_timestamp=req_time,
        cand_item_id=rq.item_id[order], cand_embedding=index.codes[cand_rows[order]],
        cand_to_req=cand_to_req.astype(np.int32), dense=rq.dense[order],
        categorical=rq.categorical[order],
        labels=None if rq.labels is None else rq.labels[order])
    batch.validate(feat, sel)
    return batch


def build_training_examples(log: EventLog, feat: FeatureConfig = FeatureConfig(),
                            sel: SelectionConfig = SelectionConfig(),
                            cfg: EventLogConfig = EventLogConfig()) -> TrainingExamples:
    """Logged training examples (one per request row): ``log_nn_features(build_requests(...))``.

    The requests table must have label columns.
    """
    batch = build_requests(log, feat, sel, cfg)
    if batch.labels is None:
        raise SchemaError("requests.labels", f"training examples need label columns {list(feat.heads)}")
    return log_nn_features(batch, feat, sel)
