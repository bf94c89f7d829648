"""On-disk storage of logged NN features: the *feature log* (paper §3.4.1).

Training reads logged S_all (|S_all| tokens per example, O(1) in the sequence length) instead of the
users' full sequences. :class:`FeatureLogWriter` stores :class:`~transact_jax.data.schema.TrainingExamples`;
:class:`FeatureLog` reads them back with O(1) random access through memory maps and is an
:class:`~transact_jax.data.source.ExampleSource` for the input pipeline. This package is the storage
format only: the NN selection that turns labelled requests into examples runs before it
(``writer.write(log_nn_features(requests, feat, sel))``, :mod:`transact_jax.data.features`).

Format (version 2)
==================

A feature log is a directory::

    my_log/
      manifest.json        # written last; without it the directory holds no log
      shard-00000.tfl      # examples [0, n_0)
      shard-00001.tfl      # examples [n_0, n_0 + n_1)
      shard-NNNNN.tfl      # one file per shard, in example order

``manifest.json`` is a UTF-8 JSON object:

* ``"format"``: ``"transact-jax feature log"``; ``"version"``: ``2``.
* ``"log_id"``: the log's identity, a random UUID (32 hex digits) drawn by the writer; every shard
  header repeats it, so a shard file of another log is refused.
* ``"feature_config"`` / ``"selection_config"``: the :class:`~transact_jax.config.FeatureConfig` /
  :class:`~transact_jax.config.SelectionConfig` the examples were logged with, as
  :func:`transact_jax.config_json.config_to_dict` writes them (one key per field, tuples become lists).
* ``"columns"``: ``[{"name", "dtype", "shape"}, ...]``, one per column of
  ``TrainingExamples.column_specs(feat, sel)``, in that order. ``name`` is the flat column name of
  ``TrainingExamples.columns()`` (e.g. ``"s_all.embeddings"``, ``"labels"``), ``dtype`` numpy's
  little-endian type string (``"<i8"``, ``"|i1"``, ``"|b1"``, ``"<f4"``, ...), ``shape`` the
  per-example shape (a list; ``[]`` for a scalar per example).
* ``"shards"``: ``[{"file", "num_examples", "nbytes", "crc32"}, ...]`` in example order: the file name
  (relative to the directory), how many examples it holds, its exact size in bytes and the
  ``zlib.crc32`` of each column's data (a list in ``"columns"`` order). Global example ``i`` lives in
  the first shard whose cumulative count exceeds ``i``.
* ``"num_examples"``: the total.

A shard file (``*.tfl``; all integers little-endian):

=========  ========  ==============================================================================
offset     size      content
=========  ========  ==============================================================================
0          8         magic ``b"TJXFLOG\\x00"``
8          4 (u32)   format version, ``2``
12         4 (u32)   header length ``H`` in bytes
16         4 (u32)   CRC-32 (``zlib.crc32``) of the ``H`` header bytes
20         4 (u32)   reserved, ``0``
24         ``H``     UTF-8 JSON header: ``{"log_id": <the manifest's>, "shard": <its position in the
                     manifest's list>, "num_examples": n, "nbytes": <file size>, "columns":
                     [{"name", "dtype", "shape", "offset", "nbytes", "crc32"}, ...]}``
...                  column data
=========  ========  ==============================================================================

Each column is the C-order array of shape ``(n, *shape)`` stored raw at ``offset`` (absolute, a
multiple of 64), ``nbytes = n * prod(shape) * itemsize`` long; ``crc32`` is ``zlib.crc32`` of those
bytes (the same value as in the manifest). Columns follow the manifest's order, zero padding fills the
gaps, and the file ends right after the last column. So any column is one memory map away::

    np.memmap(shard_path, dtype=col["dtype"], mode="r", offset=col["offset"],
              shape=(n, *col["shape"]))

Logs of format version 1 (no ``log_id``, no CRC-32s in the manifest) are refused with an error naming
the file and saying to regenerate the log.

Writing replaces atomically (details in :mod:`.writer`): the writer writes the shards and then the
manifest into a staging directory beside the log (``.NAME.tmp-*``, same parent) and only
:meth:`FeatureLogWriter.close` swaps it in with ``os.rename``, after the manifest. A reader sees the
old complete log or the new one; the only gap is the instant between renaming the old log aside and
the new one in, when the path is absent. A writer killed at any point leaves the old log intact and
readable (killed inside that instant: under its ``.NAME.old-*`` name, which the next writer for the
path moves back); the next writer also deletes a killed one's staging directory. Files and
directories get the usual modes (``0o666`` / ``0o777`` masked by the process umask). A reader that
had the old log open keeps its open maps, and refuses to open a shard of the new log in its place
("replaced while it was open").

Verification (``FeatureLog(path, verify=...)``):

* ``"header"`` (default): at open, the manifest and every shard's magic, version, header CRC, identity
  (``log_id`` and position), column layout, CRC-32s against the manifest's and file size; the first
  time a shard is read, its data against the manifest's CRC-32s (a shard read later costs nothing
  extra); and every batch read for values no writer stores (the content rules of
  :mod:`~transact_jax.data.request_rules`: labels not 0/1, action bits beyond ``num_actions``, surface
  or categorical ids out of range, the int8 code -128, non-finite dense; and bool bytes other than
  0/1).
* ``"full"``: as ``"header"``, but every shard's data is checked at open.
* ``"none"``: shards are opened lazily on first access with only what is needed to read them safely
  (magic, version, identity, layout, bounds); no CRCs, no value checks.

Cost, measured on a 200,000-example log of the default configs (1.93 GB, 13 shards of 16,384, page
cache warm, a shared 2-core machine; ``zlib.crc32`` was the fastest checksum there at 2.5 GB/s in
memory, against 1.0 for sha1 and 0.5 for blake2b): checking all data takes 1.1-1.3 s (1.5-1.7
GB/s; reading the same files from the page cache takes 0.2 s); opening with ``"header"`` 2.5 ms;
the value checks 0.1 ms on a 7 ms read of 512 random examples. A shuffled loader touches every shard
in its first batch, so with ``"header"`` that batch pays for checking the whole log (1.2 s here),
later ones nothing.

Problems raise :class:`FeatureLogError` naming the file and what is wrong (a column's data: the
column; a bad value: the column and the example; a config in the manifest that is not valid: the
config field, e.g. ``"selection_config.k_ll"``); a config that differs from the one given raises
:class:`~transact_jax.data.schema.SchemaError` naming the config field.

Modules: :mod:`.format` (constants, shard encoding and decoding, manifest helpers, durable writes),
:mod:`.writer` (:class:`FeatureLogWriter`, :func:`write_feature_log`, the atomic replace),
:mod:`.reader` (:class:`FeatureLog`, the value checks).
"""

from transact_jax.data.feature_log.format import (
    ALIGN,
    FORMAT_NAME,
    FORMAT_VERSION,
    MAGIC,
    MANIFEST,
    SHARD_SUFFIX,
    VERIFY_MODES,
    EncodedShard,
    FeatureLogError,
    PathLike,
    encode_shard,
)
from transact_jax.data.feature_log.reader import FeatureLog
from transact_jax.data.feature_log.writer import FeatureLogWriter, write_feature_log

__all__ = [
    "ALIGN", "FORMAT_NAME", "FORMAT_VERSION", "MAGIC", "MANIFEST", "SHARD_SUFFIX", "VERIFY_MODES",
    "EncodedShard", "FeatureLog", "FeatureLogError", "FeatureLogWriter", "PathLike", "encode_shard",
    "write_feature_log",
]
