"""Data layer: schema, int8 quantization, NN feature logging, synthetic data, input pipelines.

Knows nothing of the model, training or serving.
"""
from transact_jax.data.schema import (
    BroadcastBatch,
    JaggedSequences,
    RequestBatch,
    SchemaError,
    SequenceBatch,
    TokenFields,
    TrainingExamples,
    broadcast,
)
from transact_jax.data.features import SAll, log_nn_features, select_s_all

__all__ = [
    "BroadcastBatch", "JaggedSequences", "RequestBatch", "SchemaError", "SequenceBatch",
    "TokenFields", "TrainingExamples", "broadcast", "SAll", "log_nn_features", "select_s_all",
]
