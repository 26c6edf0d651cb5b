"""Generic building: a dict read from YAML becomes a typed, frozen config dataclass.

`build()` walks the dataclass fields, checks types (finite floats, 64-bit ints, literals, tuples, string
maps, keyword-argument maps of plain YAML values), refuses unknown keys with the list of valid ones and
the closest match.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal

from jobs.schema.errors import ConfigError, short

def build(cls: type, data: Any, src: str, prefix: str = "") -> Any:
    """Turn a dict into dataclass `cls`, checking keys and types; `src` names the file in errors."""
    where = prefix or "(top level)"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(src, where, f"expected a mapping of keys, got {type(data).__name__} {short(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(_word(key), list(fields), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(src, _join(prefix, key), "unknown key",
                              f"{hint}valid keys are: {', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _convert(hints[name], data[name], src, _join(prefix, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(src, _join(prefix, name), "is required")
    return cls(**values)


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _word(value: Any) -> str:
    """What difflib compares: a string's start (its cost grows with the length), nothing for other values."""
    return value[:100] if isinstance(value, str) else ""


def _convert(tp: Any, value: Any, src: str, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(inner[0], value, src, key)
        return _either(inner, value, src, key)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, src, key)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(_word(value), [str(a) for a in args], n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(src, key, f"invalid value {short(value)}",
                              f"{hint}choose one of: {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(src, key, f"expected a list, got {type(value).__name__} {short(value)}")
        item_types = [args[0]] * len(value) if (len(args) == 2 and args[1] is Ellipsis) else list(args)
        if len(item_types) != len(value):
            raise ConfigError(src, key, f"expected {len(item_types)} items, got {len(value)}: {short(value)}")
        return tuple(_convert(t, v, src, f"{key}[{i}]") for i, (t, v) in enumerate(zip(item_types, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(src, key, f"expected a mapping, got {type(value).__name__} {short(value)}")
        if args and args[1] is Any:  # keyword arguments for user code: passed through as parsed
            return {str(k): _plain(v, src, f"{key}.{k}") for k, v in value.items()}
        return {str(k): _scalar(str, v, src, f"{key}.{k}") for k, v in value.items()}
    return _scalar(tp, value, src, key)


def _either(types_: list[Any], value: Any, src: str, key: str) -> Any:
    """A value of one of several types (`int | Literal["auto"]`): the first that takes it."""
    for tp in types_:
        try:
            return _convert(tp, value, src, key)
        except ConfigError:
            continue
    shown = " or ".join(", ".join(repr(a) for a in typing.get_args(t)) if typing.get_origin(t) is Literal
                        else t.__name__ for t in types_)
    raise ConfigError(src, key, f"expected {shown}, got {type(value).__name__} {short(value)}")


def _plain(value: Any, src: str, key: str) -> Any:
    """A value of a `dict[str, Any]` field: any YAML null, bool, number, string, list or mapping with string
    keys, checked all the way down. A date, binary or set is refused: the resolved config is written to
    the run directory and hashed as JSON, and the ranks read it back as the same value."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, src, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                raise ConfigError(src, key, f"a mapping key must be a string, got {type(k).__name__} {short(k)}")
        return {k: _plain(v, src, f"{key}.{k}") for k, v in value.items()}
    raise ConfigError(src, key, f"{type(value).__name__} {short(value)} cannot be passed on",
                      "use null, a bool, a number, a string, a list or a mapping")


_INT_BOUND = 2**63  # every int field ends up in a C int64 somewhere (torch, Slurm); beyond that it is a typo


def _scalar(tp: type, value: Any, src: str, key: str) -> Any:
    if tp is float:
        return _finite_float(value, src, key)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # env values such as 1 or 0.5
    if tp is bool and not isinstance(value, bool) or tp is not bool and isinstance(value, bool) \
            or not isinstance(value, tp):
        raise ConfigError(src, key, f"expected {tp.__name__}, got {type(value).__name__} {short(value)}")
    if tp is int and not -_INT_BOUND < value < _INT_BOUND:
        raise ConfigError(src, key, f"{short(value)} is out of range (more than 64 bits)")
    return value


def _finite_float(value: Any, src: str, key: str) -> float:
    """Every float field of every section: NaN and infinity pass `> 0` checks, so they are refused here, once."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(src, key, f"expected float, got {type(value).__name__} {short(value)}")
    try:
        number = float(value)  # YAML 1.1 reads `1e-3` (no dot) as a string
    except ValueError:
        raise ConfigError(src, key, f"expected float, got {type(value).__name__} {short(value)}") from None
    except OverflowError:  # an int beyond the float range
        number = math.inf
    if not math.isfinite(number):
        raise ConfigError(src, key, f"{short(value)} is not a finite number", "use a finite value, e.g. 0.001")
    return number
