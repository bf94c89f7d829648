"""Frozen config dataclasses: field checks, and conversion to and from JSON. One helper for feature
logs, checkpoints and experiment files.

:func:`check_fields` is what every config's ``__post_init__`` calls first: each field is checked
against its annotation (``int`` fields take ints but not bools, ``float`` fields finite numbers,
``bool``, ``str``, ``Tuple[X, ...]`` element by element, nested config dataclasses) and against an
optional :class:`Bound`; problems raise :class:`ConfigError` naming the field
(``learning_rate: must be a finite number > 0, got nan``).

``config_to_dict`` turns a (possibly nested) frozen dataclass into JSON-compatible values (tuples
become lists). ``config_from_dict`` rebuilds it: nested dataclass fields are rebuilt from their own
sections, lists become tuples, missing fields keep their defaults, and anything unexpected (an unknown
field, a section that is not an object, a value of the wrong type, a value the dataclass refuses)
raises :class:`ConfigError` whose ``field`` is the dotted path of the problem (``"train.steps"``).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import reprlib
import typing
from typing import Any, Dict, Mapping, Optional, Type, TypeVar, Union

import numpy as np

T = TypeVar("T")
_BOOLS = (bool, np.bool_)


class ConfigError(ValueError):
    """A config (a dataclass, a dict or a JSON file) is not valid; ``field`` is the dotted path."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"{field}: {problem}" if field else problem)

    def under(self, prefix: str) -> "ConfigError":
        """The same problem with ``prefix`` (a section's dotted path) in front of the field."""
        return ConfigError(_join(prefix, self.field), self.problem)


def _join(prefix: str, field: str) -> str:
    return ".".join(p for p in (prefix, field) if p)


# ------------------------------------------------------------------------------------ field checks


@dataclasses.dataclass(frozen=True)
class Bound:
    """The interval a numeric field (or each element of a tuple field) must lie in: ``low`` /
    ``high`` (None: unbounded), ``low_open`` / ``high_open`` exclude the end."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.low is None and self.high is None:
            return "(unbounded)"
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high}"
        return (f"in {'(' if self.low_open else '['}{self.low}, "
                f"{self.high}{')' if self.high_open else ']'}")


POSITIVE = Bound(0, low_open=True)
NON_NEGATIVE = Bound(0)
AT_LEAST_ONE = Bound(1)

_show = reprlib.Repr()
_show.maxstring, _show.maxother, _show.maxlist, _show.maxtuple = 60, 60, 8, 8


def _describe(tp: Any) -> str:
    """``tp`` in words: "an int", "a list of numbers", "a TrainConfig", ..."""
    if typing.get_origin(tp) is tuple:
        return f"a list of {_describe(typing.get_args(tp)[0]).split(' ', 1)[1]}s"
    if dataclasses.is_dataclass(tp):
        return f"a {tp.__name__}"
    return {int: "an int", float: "a number", bool: "a bool", str: "a string"}.get(tp, repr(tp))


def _wrong(name: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(name, f"expected {_describe(tp)}, got {_show.repr(value)}")


def check_value(name: str, value: Any, tp: Any, bound: Optional[Bound] = None, *,
                type_only: bool = False) -> Any:
    """``value`` of a field ``name`` annotated ``tp``, normalized (numpy scalars to Python ones, an
    int in a float field to float, a list to a tuple); ConfigError naming ``name`` (``name[i]`` for
    an element of a tuple) if it has another type or (unless ``type_only``) is not finite (floats)
    or lies outside ``bound``. Annotations other than int, float, bool, str, ``Tuple[X, ...]``,
    ``Optional[X]`` and dataclasses are not checked."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union and type(None) in args:
        if value is None:
            return None
        rest = [a for a in args if a is not type(None)]
        return check_value(name, value, rest[0], bound, type_only=type_only) if len(rest) == 1 else value
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, (tuple, list)):
            raise _wrong(name, tp, value)
        return tuple(check_value(f"{name}[{i}]", v, args[0], bound, type_only=type_only)
                     for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, _BOOLS):
            raise _wrong(name, tp, value)
        return bool(value)
    if tp is str:
        if not isinstance(value, str):
            raise _wrong(name, tp, value)
        return value
    if tp in (int, float):
        if isinstance(value, _BOOLS) or not isinstance(
                value, numbers.Integral if tp is int else numbers.Real):
            raise _wrong(name, tp, value)
        value = tp(value)
        finite = tp is int or math.isfinite(value)
        if not type_only and (not finite or (bound is not None and value not in bound)):
            kind = "an int" if tp is int else "a finite number"
            raise ConfigError(name, f"must be {kind}{f' {bound}' if bound else ''}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp) and not isinstance(value, tp):
        raise _wrong(name, tp, value)
    return value


@functools.lru_cache(maxsize=None)
def field_types(cls: type) -> Dict[str, Any]:
    """The resolved annotation of every field of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def check_fields(cfg: Any, bounds: Optional[Mapping[str, Bound]] = None) -> None:
    """Check every field of the frozen dataclass instance ``cfg`` with :func:`check_value` (its
    annotation and ``bounds[name]``), storing the normalized values; call first in ``__post_init__``."""
    bounds = bounds or {}
    for name, tp in field_types(type(cfg)).items():
        value = check_value(name, getattr(cfg, name), tp, bounds.get(name))
        object.__setattr__(cfg, name, value)


# -------------------------------------------------------------------------------------------- JSON


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    """JSON-compatible nested dict of a config dataclass (tuples as lists)."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"expected a dataclass instance, got {type(cfg).__name__}")
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_to_json(cfg: Any) -> str:
    """``config_to_dict`` as indented JSON text."""
    return json.dumps(config_to_dict(cfg), indent=2)


def _tupled(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tupled(v) for v in value)
    return value


def config_from_dict(cls: Type[T], data: Any, where: str = "",
                     aliases: Optional[Mapping[str, Mapping[Any, Any]]] = None) -> T:
    """Rebuild ``cls`` from ``data`` (module docstring). ``where`` prefixes error paths.

    ``aliases`` maps a dotted field path to {old value: new value}, for values that were renamed
    (applied before the value is checked).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(where, f"expected an object, got {_show.repr(data)}")
    types = field_types(cls)
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise ConfigError(where, f"unknown fields {unknown} for {cls.__name__}")
    kwargs: Dict[str, Any] = {}
    for key, value in data.items():
        path = _join(where, key)
        if dataclasses.is_dataclass(types[key]):
            kwargs[key] = config_from_dict(types[key], value, path, aliases)
            continue
        value = _tupled(value)
        renames = (aliases or {}).get(path, {})
        if isinstance(value, (str, int, float, bool)) and value in renames:
            value = renames[value]
        kwargs[key] = check_value(path, value, types[key], type_only=True)  # ranges: cls checks them
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e.under(where) from e
    except (TypeError, ValueError) as e:
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
