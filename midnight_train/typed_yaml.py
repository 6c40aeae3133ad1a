"""Plain YAML values <-> typed dataclasses: ``build_dataclass`` checks every key against the
dataclass (an unknown key is an error naming the known ones) and coerces values to the field
types; ``to_plain`` turns dataclasses back into what YAML and JSON accept."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    pass


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None or hint is Any:
        return value
    if origin in (typing.Union, getattr(types, "UnionType", None)):
        for arg in args:
            if arg is not type(None):
                try:
                    return _coerce(value, arg, where)
                except ConfigError:
                    continue
        raise ConfigError(f"{where}: {value!r} does not fit {hint}")
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, where)
    if hint is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)  # PyYAML reads "1e-4" as a string
        except ValueError as err:
            raise ConfigError(f"{where}: {value!r} is not a number") from err
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if hint in (int, float, bool, str) and not isinstance(value, hint):
        raise ConfigError(f"{where}: {value!r} is not {hint.__name__}")
    return value


def build_dataclass(cls: type, values: Any, where: str = "") -> Any:
    """``cls(**values)`` with unknown keys reported as errors and values checked/coerced."""
    if dataclasses.is_dataclass(values):
        return values
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {values!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                          f"known keys in {where or 'the top level'}: {', '.join(sorted(names))}")
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # foreign dataclasses with unresolvable annotations: no coercion
        hints = {}
    kwargs = {k: _coerce(v, hints.get(k, Any), f"{where}.{k}" if where else k)
              for k, v in values.items()}
    return cls(**kwargs)


def to_plain(obj: Any) -> Any:
    """Dataclasses/tuples -> dicts/lists that ``yaml.safe_dump`` and JSON accept."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
