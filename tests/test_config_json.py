"""The one config <-> JSON helper (feature logs, checkpoints, experiment files)."""
from __future__ import annotations

import json

import pytest

from transact_jax.config import SelectionConfig
from transact_jax.config_json import (
    ConfigError,
    config_from_dict,
    config_from_json,
    config_to_dict,
    config_to_json,
)
from transact_jax.model.config import ModelConfig
from transact_jax.run.config import ExperimentConfig, TrainConfig


def test_round_trip_of_nested_configs_with_tuples():
    cfg = ExperimentConfig(selection=SelectionConfig(k_ll=7), model=ModelConfig(mlp_dims=(8, 4)),
                           train=TrainConfig(steps=3))
    d = config_to_dict(cfg)
    assert d["model"]["mlp_dims"] == [8, 4] and json.loads(config_to_json(cfg)) == d
    assert config_from_dict(ExperimentConfig, d) == cfg


def test_partial_dicts_keep_defaults(tmp_path):
    assert config_from_dict(ExperimentConfig, {"train": {"steps": 5}}) == ExperimentConfig(
        train=TrainConfig(steps=5))
    path = tmp_path / "exp.json"
    path.write_text(json.dumps({"selection": {"k_imp": 3}}))
    assert config_from_json(ExperimentConfig, str(path)).selection.k_imp == 3


@pytest.mark.parametrize("data,field,message", [
    ({"model": {"layers": 3}}, "model", "unknown fields"),          # unknown field of a section
    ({"optimizer": {}}, "", "unknown fields"),                       # unknown section
    ({"train": 5}, "train", "expected an object, got 5"),             # a section that is not an object
    ({"selection": {"k_ll": -1}}, "selection.k_ll", "must be an int >= 0, got -1"),   # out of range
    ({"train": {"steps": "100"}}, "train.steps", "expected an int, got '100'"),      # wrong types
    ({"train": {"batch_size": 1.5}}, "train.batch_size", "expected an int, got 1.5"),
    ({"train": {"steps": True}}, "train.steps", "expected an int, got True"),
    ({"train": {"learning_rate": "0.1"}}, "train.learning_rate", "expected a number, got '0.1'"),
    ({"train": {"learning_rate": float("nan")}}, "train.learning_rate",
     "must be a finite number > 0, got nan"),
    ({"train": {"head_loss_weights": [1, 1, float("inf")]}}, "train.head_loss_weights[2]",
     "must be a finite number >= 0, got inf"),
    ({"train": {"head_loss_weights": [1.0]}}, "train.head_loss_weights", "need 3 weights"),
    ({"model": {"mlp_dims": 8}}, "model.mlp_dims", "expected a list of ints, got 8"),
    ({"model": {"mlp_dims": [8, "4"]}}, "model.mlp_dims[1]", "expected an int, got '4'"),
    ({"model": {"wide": 1}}, "model.wide", "expected a bool, got 1"),
    ({"model": {"dropout": 1.0}}, "model.dropout", "must be a finite number in [0, 1), got 1.0"),
    ({"model": {"sequence_model": "lstm"}}, "model.sequence_model", "expected one of"),
    ({"feature": {"heads": "click"}}, "feature.heads", "expected a list of strings, got 'click'"),
    ({"feature": {"categorical_vocab_sizes": [10, 0]}}, "feature.categorical_vocab_sizes[1]",
     "must be an int >= 1, got 0"),
    ({"name": 7}, "name", "expected a string, got 7"),
])
def test_errors_name_the_dotted_field(data, field, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict(ExperimentConfig, data)
    assert e.value.field == field
    assert message in e.value.problem and str(e.value).startswith(f"{field}: " if field else "")


def test_json_numbers_and_lists_are_normalized():
    cfg = config_from_dict(ExperimentConfig, {"train": {"learning_rate": 1, "head_loss_weights": [1, 2, 0]},
                                              "model": {"mlp_dims": [8, 4]}})
    assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.head_loss_weights == (1.0, 2.0, 0.0) and cfg.model.mlp_dims == (8, 4)
    assert config_from_dict(ExperimentConfig, config_to_dict(cfg)) == cfg


def test_bad_json_file_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="broken.json"):
        config_from_json(ExperimentConfig, str(path))
    path.write_text(json.dumps({"model": {"layers": 3}}))
    with pytest.raises(ConfigError, match=r"broken\.json") as e:
        config_from_json(ExperimentConfig, str(path))
    assert e.value.field == "model"


def test_renamed_values_are_read_through_aliases():
    d = config_to_dict(ExperimentConfig())
    d["model"]["encoder_impl"] = "skut"
    assert ExperimentConfig.from_dict(d).model.encoder_impl == "pallas_triton"
    with pytest.raises(ConfigError, match="encoder_impl"):
        config_from_dict(ExperimentConfig, d)          # without the alias table: refused


def test_only_instances_are_serialized():
    with pytest.raises(TypeError):
        config_to_dict(ExperimentConfig)
