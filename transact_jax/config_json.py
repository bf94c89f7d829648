"""Frozen config dataclasses to and from JSON: one helper for feature logs, checkpoints and
experiment files.

``config_to_dict`` turns a (possibly nested) frozen dataclass into JSON-compatible values (tuples
become lists). ``config_from_dict`` rebuilds it: nested dataclass fields are rebuilt from their own
sections, lists become tuples, missing fields keep their defaults, and anything unexpected (an unknown
field, a section that is not an object, a value the dataclass refuses) raises
:class:`ConfigError` whose ``field`` is the dotted path of the problem (``"train.steps"``).
"""
from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Dict, Mapping, Optional, Type, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config dict or JSON file does not describe a valid config; ``field`` is the dotted path."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"{field}: {problem}" if field else problem)


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    """JSON-compatible nested dict of a config dataclass (tuples as lists)."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"expected a dataclass instance, got {type(cfg).__name__}")
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_to_json(cfg: Any) -> str:
    """``config_to_dict`` as indented JSON text."""
    return json.dumps(config_to_dict(cfg), indent=2)


def _nested_types(cls: type) -> Dict[str, type]:
    """Fields of ``cls`` whose declared type is itself a dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)
            if dataclasses.is_dataclass(hints.get(f.name))}


def _tupled(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tupled(v) for v in value)
    return value


def config_from_dict(cls: Type[T], data: Any, where: str = "",
                     aliases: Optional[Mapping[str, Mapping[Any, Any]]] = None) -> T:
    """Rebuild ``cls`` from ``data`` (module docstring). ``where`` prefixes error paths.

    ``aliases`` maps a dotted field path to {old value: new value}, for values that were renamed
    (applied before the dataclass checks them).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(where, f"expected a JSON object for {cls.__name__}, got "
                                 f"{type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(where, f"unknown fields {unknown} for {cls.__name__}")
    nested = _nested_types(cls)
    kwargs: Dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key in nested:
            kwargs[key] = config_from_dict(nested[key], value, path, aliases)
            continue
        value = _tupled(value)
        renames = (aliases or {}).get(path, {})
        if isinstance(value, (str, int, float, bool)) and value in renames:
            value = renames[value]
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(where, f"not a valid {cls.__name__}: {e}") from e


def config_from_json(cls: Type[T], path: str,
                     aliases: Optional[Mapping[str, Mapping[Any, Any]]] = None) -> T:
    """Read ``cls`` from a JSON file; errors name the file and the field."""
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError("", f"{path}: not valid JSON ({e})") from e
    try:
        return config_from_dict(cls, data, "", aliases)
    except ConfigError as e:
        raise ConfigError(e.field, f"{e.problem} (in {path})") from e
