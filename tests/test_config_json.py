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


@pytest.mark.parametrize("data,field", [
    ({"model": {"layers": 3}}, "model"),                  # unknown field of a section
    ({"optimizer": {}}, ""),                               # unknown section
    ({"train": 5}, "train"),                               # a section that is not an object
    ({"selection": {"k_ll": -1}}, "selection"),            # a value the dataclass refuses
])
def test_errors_name_the_dotted_field(data, field):
    with pytest.raises(ConfigError) as e:
        config_from_dict(ExperimentConfig, data)
    assert e.value.field == field


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
