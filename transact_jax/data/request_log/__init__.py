"""On-disk storage of labelled ranking requests with their *full* sequences: the *request log*.

The feature log (:mod:`transact_jax.data.feature_log`) stores one row per (request, candidate) with
the NN-selected S_all (192 tokens): what TransAct V2 trains on. Sequence models that read the whole
history (HSTU over thousands of tokens, VISTA summarising it) need each request's full S_LL, S_RT
and S_imp once, with all its candidates and their labels: that is a
:class:`~transact_jax.data.schema.RequestBatch` with labels, stored here. :class:`RequestLogWriter`
writes them (validated by the rule book, sequences at most ``SelectionConfig.max_lengths``), and
:class:`RequestLog` reads any requests back by index (a random-access source for an input pipeline).
:func:`write_synthetic_request_log` builds one from the synthetic world; a ``RequestBatch`` from
event logs (``transact_jax.data.events.build_requests`` with labels) is written the same way.

Format (version 1)
==================

A request log is a directory like a feature log, and uses its shard encoding
(:func:`transact_jax.data.feature_log.format.encode_columns`: a checked prefix and JSON header, then
raw 64-byte-aligned columns, each with a CRC-32) and its atomic replace (a private staging directory
swapped in by rename when the writer closes)::

    my_requests/
      manifest.json        # written last
      shard-00000.trl      # requests [0, u_0)
      shard-NNNNN.trl      # one file per shard, in request order

``manifest.json``: ``"format"`` ``"transact-jax request log"``, ``"version"`` 1, ``"log_id"`` (a
random UUID repeated in every shard header), ``"feature_config"``, ``"selection_config"``,
``"columns"`` (:func:`column_table`: ``name``, little-endian ``dtype``, per-row ``shape`` and
``rows``, the count that sizes the column's leading axis), ``"shards"`` (``file``,
``num_examples`` = its requests U, ``counts``, ``nbytes``, ``crc32`` per column) and the totals
``"num_requests"``, ``"num_candidates"``.

A shard holds U requests. Its ``counts`` are ``requests`` (U), ``candidates`` (N) and
``tokens.ll``, ``tokens.rt``, ``tokens.imp`` (T per family). Columns, in order: per family f the
token fields ``f.timestamps`` (<i8), ``f.actions`` (the action dtype), ``f.surfaces`` (<i2),
``f.embeddings`` (|i1, D), rows ``tokens.f``, and ``f.lengths`` (<i8, rows ``requests``); the
request fields ``user_id``, ``request_id``, ``request_timestamp`` (<i8); the candidate fields
``cand_item_id`` (<i8), ``cand_embedding`` (|i1, D), ``cand_to_req`` (<i4, the request within the
shard), ``dense`` (<f4, F), ``categorical`` (<i4, C), ``labels`` (|u1, H). Candidates are stored
grouped by request (their order within a request kept), so a request's candidates are one range.
"""
from transact_jax.data.request_log.format import REQUEST_LOG, RequestLogError, column_table
from transact_jax.data.request_log.reader import RequestLog
from transact_jax.data.request_log.writer import RequestLogWriter, write_synthetic_request_log

__all__ = ["REQUEST_LOG", "RequestLogError", "column_table", "RequestLog", "RequestLogWriter",
           "write_synthetic_request_log"]
