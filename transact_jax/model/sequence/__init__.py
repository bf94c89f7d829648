"""Sequence models, chosen by name (``ModelConfig.sequence_model``) from a registry.

``none`` (no user sequence: Wide&Deep), ``bst`` (:mod:`.bst`), ``transact`` (:mod:`.transact`),
``hstu`` (:mod:`.hstu`), ``vista`` (:mod:`.vista`).
Importing this package registers them; :mod:`.registry` describes the interface.
"""
from transact_jax.model.sequence import bst, transact  # noqa: F401  (registers the families)
from transact_jax.model.sequence import hstu  # noqa: F401  (after them: names() lists them in order)
from transact_jax.model.sequence import vista  # noqa: F401
from transact_jax.model.sequence.registry import (
    SequenceModelEntry,
    names,
    register,
    sequence_model_entry,
)

__all__ = ["SequenceModelEntry", "names", "register", "sequence_model_entry"]
