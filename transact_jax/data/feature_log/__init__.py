"""On-disk storage of logged NN features: the *feature log* (paper §3.4.1).

Training reads logged S_all (|S_all| tokens per example, O(1) in the sequence length) instead of the
users' full sequences. :class:`FeatureLogWriter` stores :class:`~transact_jax.data.schema.TrainingExamples`;
:class:`FeatureLog` reads them back with O(1) random access through memory maps and is an
:class:`~transact_jax.data.source.ExampleSource` for the input pipeline. This package is the storage
format only: the NN selection that turns labelled requests into examples runs before it
(``writer.write(log_nn_features(requests, feat, sel))``, :mod:`transact_jax.data.features`).

Format (version 1)
==================

A feature log is a directory::

    my_log/
      manifest.json        # written last; without it the directory holds no log
      shard-00000.tfl      # examples [0, n_0)
      shard-00001.tfl      # examples [n_0, n_0 + n_1)
      shard-NNNNN.tfl      # one file per shard, in example order

``manifest.json`` is a UTF-8 JSON object:

* ``"format"``: ``"transact-jax feature log"``; ``"version"``: ``1``.
* ``"feature_config"`` / ``"selection_config"``: the :class:`~transact_jax.config.FeatureConfig` /
  :class:`~transact_jax.config.SelectionConfig` the examples were logged with, as
  :func:`transact_jax.config_json.config_to_dict` writes them (one key per field, tuples become lists).
* ``"columns"``: ``[{"name", "dtype", "shape"}, ...]``, one per column of
  ``TrainingExamples.column_specs(feat, sel)``, in that order. ``name`` is the flat column name of
  ``TrainingExamples.columns()`` (e.g. ``"s_all.embeddings"``, ``"labels"``), ``dtype`` numpy's
  little-endian type string (``"<i8"``, ``"|i1"``, ``"|b1"``, ``"<f4"``, ...), ``shape`` the
  per-example shape (a list; ``[]`` for a scalar per example).
* ``"shards"``: ``[{"file", "num_examples", "nbytes"}, ...]`` in example order: the file name
  (relative to the directory), how many examples it holds and its exact size in bytes. Global example
  ``i`` lives in the first shard whose cumulative count exceeds ``i``.
* ``"num_examples"``: the total.

A shard file (``*.tfl``; all integers little-endian):

=========  ========  ==============================================================================
offset     size      content
=========  ========  ==============================================================================
0          8         magic ``b"TJXFLOG\\x00"``
8          4 (u32)   format version, ``1``
12         4 (u32)   header length ``H`` in bytes
16         4 (u32)   CRC-32 (``zlib.crc32``) of the ``H`` header bytes
20         4 (u32)   reserved, ``0``
24         ``H``     UTF-8 JSON header: ``{"num_examples": n, "nbytes": <file size>, "columns":
                     [{"name", "dtype", "shape", "offset", "nbytes", "crc32"}, ...]}``
...                  column data
=========  ========  ==============================================================================

Each column is the C-order array of shape ``(n, *shape)`` stored raw at ``offset`` (absolute, a
multiple of 64), ``nbytes = n * prod(shape) * itemsize`` long; ``crc32`` is ``zlib.crc32`` of those
bytes. Columns follow the manifest's order, zero padding fills the gaps, and the file ends right after
the last column. So any column is one memory map away::

    np.memmap(shard_path, dtype=col["dtype"], mode="r", offset=col["offset"],
              shape=(n, *col["shape"]))

Writing is crash-safe: every shard and the manifest are written to a temporary file in the same
directory, flushed, fsync'ed and moved into place with ``os.replace``; the manifest comes last. A
reader only opens files the manifest lists and checks their sizes, so a writer killed at any point
leaves either the previous state or a directory with no (new) manifest, never a half-written shard
that is accepted.

Verification when opening (``verify=``): ``"header"`` (default) checks the manifest, every shard's
magic, version, header CRC, column layout against the manifest and file size; ``"full"`` also checks
every column's CRC-32 (reads all data once); ``"none"`` opens shards lazily on first access, checking
only what is needed to read them safely (magic, layout, bounds). Problems raise :class:`FeatureLogError`
naming the file and what is wrong (for a config in the manifest that is not valid, also the config
field, e.g. ``"selection_config.k_ll"``); a config that differs from the one given raises
:class:`~transact_jax.data.schema.SchemaError` naming the config field.

Modules: :mod:`.format` (constants, shard encoding and decoding, manifest helpers, crash-safe writes),
:mod:`.writer` (:class:`FeatureLogWriter`, :func:`write_feature_log`), :mod:`.reader`
(:class:`FeatureLog`).
"""

from transact_jax.data.feature_log.format import (
    ALIGN,
    FORMAT_NAME,
    FORMAT_VERSION,
    MAGIC,
    MANIFEST,
    SHARD_SUFFIX,
    VERIFY_MODES,
    FeatureLogError,
    PathLike,
    encode_shard,
)
from transact_jax.data.feature_log.reader import FeatureLog
from transact_jax.data.feature_log.writer import FeatureLogWriter, write_feature_log

__all__ = [
    "ALIGN", "FORMAT_NAME", "FORMAT_VERSION", "MAGIC", "MANIFEST", "SHARD_SUFFIX", "VERIFY_MODES",
    "FeatureLog", "FeatureLogError", "FeatureLogWriter", "PathLike", "encode_shard", "write_feature_log",
]
