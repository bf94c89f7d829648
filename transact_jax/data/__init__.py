"""Data layer: schema and request rules, int8 quantization, NN feature logging, feature logs and other
example sources, event logs (bring-your-own-logs), synthetic data, input pipelines.

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
from transact_jax.data.source import ExampleSource, InMemoryExamples
from transact_jax.data.feature_log import FeatureLog, FeatureLogError, FeatureLogWriter
from transact_jax.data.events import EventLog, EventLogConfig, build_requests, build_training_examples

__all__ = [
    "BroadcastBatch", "JaggedSequences", "RequestBatch", "SchemaError", "SequenceBatch",
    "TokenFields", "TrainingExamples", "broadcast", "SAll", "log_nn_features", "select_s_all",
    "ExampleSource", "InMemoryExamples", "FeatureLog", "FeatureLogError", "FeatureLogWriter",
    "EventLog", "EventLogConfig", "build_requests", "build_training_examples",
]
