"""Bring-your-own-logs: an event-log format and a builder to requests and training examples.

An event log is three tables. Each can be given as a CSV file with a header row (``*.csv``, UTF-8 with
or without a byte-order mark), a numpy archive (``*.npz``, one array per column, read with
``allow_pickle=False``) or an in-memory ``{column: array}`` mapping. Column order does not matter;
columns not listed here are ignored.

**(a) events** - one row per user action or impression:

=============  =========  ==============================================================================
column         type       meaning
=============  =========  ==============================================================================
``user_id``    int64      user, ``>= 0``
``item_id``    int64      item, ``>= 0``; must be in the item table (see ``on_missing_item``)
``action``     string     one of ``FeatureConfig.action_names`` (default ``click, repin, closeup,
                          long_click, share, comment, download, hide``), or ``impression`` for an item
                          shown to the user but not engaged with
``surface``    string     one of ``FeatureConfig.surface_names`` (default ``homefeed, search, related,
                          board, profile, notification, shopping, other``)
``timestamp``  int64      seconds (any epoch; only order and differences matter), or milliseconds /
                          microseconds with ``EventLogConfig(timestamp_unit="ms" | "us")``: converted
                          to whole seconds (rounded down) when loaded; values that look like a finer
                          unit than the configured one (median above 1e11 seconds) are an error
=============  =========  ==============================================================================

**(b) items** - the item content ("PinSage") embeddings, float, quantized to int8 by the builder with
``q = clamp(round(e / 0.65 * 127), -127, 127)`` (:func:`transact_jax.data.quantization.quantize`):

* ``item_id`` (int64, ``>= 0``, unique), and
* the ``(M, D)`` float matrix (``D = FeatureConfig.embedding_dim = 32``) either as one 2-D array
  ``embedding`` (npz / mapping) or as ``D`` columns ``emb_0 .. emb_{D-1}`` (CSV, or npz / mapping).

**(c) requests** - one row per (ranking request, candidate):

* ``request_id``, ``user_id``, ``timestamp`` (int64, in the events' unit; all rows of one request
  must agree on user and time), ``item_id`` (int64, the candidate; must be in the item table);
* one 0/1 label column per head, named like the head (``FeatureConfig.heads``, default ``click``,
  ``repin``, ``hide``). Give all of them (training data) or none (serving requests, ``labels=None``);
* optional ``dense_0 .. dense_{num_dense-1}`` (float, ``|x| <= 1e6``, ``request_rules.DENSE_BOUND``)
  and ``cat_0 .. cat_{C-1}`` (int in ``[0, categorical_vocab_sizes[c])``); a missing one is 0.
  ``dense_k`` / ``cat_k`` beyond the config are an error (probably a config mismatch), other unknown
  columns are ignored.

Every table needs at least one row. Bad input raises :class:`~transact_jax.data.schema.SchemaError`
whose ``field`` names ``<table>.<column>`` (e.g. ``events.action``, ``items.embedding``,
``requests.click``) or the table for an unreadable file: unknown action/surface names, non-integer or
negative ids, non-integer timestamps or timestamps in another unit than ``timestamp_unit``, NaN/inf
embeddings or dense features, dense features beyond the bound, duplicate item ids, labels other than
0/1 (e.g. 0.5), missing, empty or ragged columns, truncated CSV rows, corrupt npz archives.

**Semantics of the builder** (:func:`build_requests`, :func:`build_training_examples`). For a request of
user ``u`` at time ``T``:

1. *No leakage*: only events of ``u`` with ``timestamp < T`` are used.
2. *Multi-hot merging* (paper §3.2.1): explicit (non-impression) events of one (user, item) merge into
   one token when they fall within ``merge_window_s`` of the token's first event: the first event opens
   a token at time ``t0``; every later event of the pair with ``t < t0 + merge_window_s`` joins it, the
   next one opens a new token. The token's action bitmask ORs its events' actions (only those before
   ``T``), its timestamp and surface are the first event's. ``merge_window_s = 0`` disables merging;
   any window up to the int64 maximum is valid (its end saturates instead of overflowing).
3. *Explicit tokens* before ``T`` in chronological order (ties: by item id, then row order): ``S_RT`` is the
   ``SelectionConfig.max_rt_len`` most recent, ``S_LL`` the ``max_ll_len`` most recent of the ones
   before those. Older tokens are dropped: every sequence keeps its most recent tokens (docs/design.md,
   "Truncation and over-long sequences").
4. *Impressions*: ``S_imp`` is the ``max_imp_len`` most recent impression events before ``T`` whose item
   ``u`` did not engage with explicitly (any action, hide included) before ``T``. Impressions are not
   merged (an item shown twice gives two tokens, ties ordered like explicit tokens); their action
   bitmask is 0. A user without events gets empty (fully masked) sequences.
5. All sequences are chronological, index 0 the oldest. Token embeddings and candidate embeddings are
   the quantized item embeddings.
6. Requests appear in order of the first row of each ``request_id``; the candidates of a request keep
   their row order, so ``RequestBatch`` candidate ``i`` (and ``TrainingExamples`` row ``i``) is the
   ``i``-th row of the requests table after a stable sort by request.
7. ``on_missing_item``: an event or candidate whose item is not in the item table raises (``"raise"``,
   the default) or is dropped (``"drop"``; a request left without candidates disappears).

Example::

    from transact_jax.data.events import (EventLog, EventLogConfig, build_requests,
                                          build_training_examples, write_event_log_npz)

    log = EventLog.load("events.csv", "items.npz", "requests.csv")    # timestamps in seconds
    log_ms = EventLog.load("events.csv", "items.npz", "requests.csv",
                           cfg=EventLogConfig(timestamp_unit="ms"))
    batch = build_requests(log, FeatureConfig(), SelectionConfig())          # serving layout
    examples = build_training_examples(log, FeatureConfig(), SelectionConfig())
    write_event_log_npz(log, "my_log/")                                      # round-trip
    log2 = EventLog.load_dir("my_log/")

Modules: :mod:`.files` (reading / writing CSV and npz), :mod:`.columns` (column parsing and typing),
:mod:`.tables` (the validated tables, :class:`EventLog`, :class:`EventLogConfig`), :mod:`.builder`
(:func:`build_requests`, :func:`build_training_examples`).
"""
from transact_jax.data.events.builder import build_requests, build_training_examples
from transact_jax.data.events.files import (
    TableSource,
    read_table,
    write_event_log_csv,
    write_event_log_npz,
)
from transact_jax.data.events.tables import (
    IMPRESSION,
    IMPRESSION_CODE,
    TABLES,
    EventLog,
    EventLogConfig,
    EventTable,
    ItemTable,
    RequestTable,
)

__all__ = [
    "IMPRESSION", "IMPRESSION_CODE", "TABLES", "EventLog", "EventLogConfig", "EventTable", "ItemTable",
    "RequestTable", "TableSource", "build_requests", "build_training_examples", "read_table",
    "write_event_log_csv", "write_event_log_npz",
]
