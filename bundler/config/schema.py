"""Frozen dataclasses as the schema: their fields say the key, the type and the default.

``load(cls, data, where)`` turns parsed JSON or TOML into an instance of the dataclass ``cls``,
checking every value against the field's annotation (str, int, float, bool, ``X | None``,
``tuple[X, ...]``, ``dict[str, X]``, nested dataclasses) and against ``check=`` functions from
:mod:`bundler.config.values` given in the field's metadata. Adding a key is one edit: a field.

Every error reads ``WHERE: KEY: problem`` with the dotted key, the bad value and what is
allowed, and unknown keys get a did-you-mean.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from bundler.errors import UserError, did_you_mean, one_of

Check = Callable[[Any], "str | None"]


class SchemaError(UserError):
    """A value that does not fit its dataclass field."""


def field(*, default: Any = dataclasses.MISSING, check: Check | None = None, doc: str = "",
          key: str | None = None) -> Any:
    """A dataclass field with a value check, a one-line doc, and the key it is read from."""
    meta = {"check": check, "doc": doc, "key": key}
    if isinstance(default, (dict, list)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def key_of(f: dataclasses.Field) -> str:
    return f.metadata.get("key") or f.name


def _type_name(t: Any) -> str:
    origin = typing.get_origin(t)
    if t is str:
        return "a string"
    if t is bool:
        return "true or false"
    if t is int:
        return "an integer"
    if t is float:
        return "a number"
    if origin is tuple:
        return f"an array of {_type_name(typing.get_args(t)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict or t is dict:
        return "a table"
    if dataclasses.is_dataclass(t):
        return "a table"
    return getattr(t, "__name__", str(t))


def _show(v: Any) -> str:
    return repr(v) if isinstance(v, str) else f"{v!r} ({type(v).__name__})"


def _convert(t: Any, v: Any, where: str, key: str, checks: bool = True) -> Any:
    origin = typing.get_origin(t)
    args = typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], v, where, key, checks)
    if t is Any:
        return v
    if dataclasses.is_dataclass(t):
        if not isinstance(v, Mapping):
            raise SchemaError(f"{where}: {key}: expected a table, got {_show(v)}")
        return load(t, v, where, prefix=f"{key}.", checks=checks)
    if origin is tuple:
        if not isinstance(v, (list, tuple)):
            raise SchemaError(f"{where}: {key}: expected {_type_name(t)}, got {_show(v)}")
        return tuple(_convert(args[0], x, where, f"{key}[{i}]", checks) for i, x in enumerate(v))
    if origin is dict or t is dict:
        if not isinstance(v, Mapping):
            raise SchemaError(f"{where}: {key}: expected a table, got {_show(v)}")
        vt = args[1] if args else Any
        return {str(k): _convert(vt, x, where, f"{key}.{k}", checks) for k, x in v.items()}
    if t is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SchemaError(f"{where}: {key}: expected a number, got {_show(v)}")
        return float(v)
    if t is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise SchemaError(f"{where}: {key}: expected an integer, got {_show(v)}")
        return v
    if t in (str, bool):
        if not isinstance(v, t):
            raise SchemaError(f"{where}: {key}: expected {_type_name(t)}, got {_show(v)}")
        return v
    raise TypeError(f"schema: no conversion for {t!r}")


def load(cls: type, data: Mapping[str, Any], where: str, prefix: str = "", checks: bool = True) -> Any:
    """An instance of dataclass ``cls`` from ``data``; raises :class:`SchemaError`.

    ``checks=False`` converts types but runs no value checks: only tests use it, to hand a reader
    what a crafted file would contain."""
    hints = typing.get_type_hints(cls)
    fields = {key_of(f): f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        raise SchemaError(f"{where}: {prefix}{k}: unknown key{did_you_mean(k, fields)}; "
                          f"allowed{' in ' + prefix.rstrip('.') if prefix else ''}: {one_of(sorted(fields))}")
    values = {}
    for k, f in fields.items():
        dotted = f"{prefix}{k}"
        if k not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SchemaError(f"{where}: {dotted}: missing; expected {_type_name(hints[f.name])}")
            continue
        v = _convert(hints[f.name], data[k], where, dotted, checks)
        check = f.metadata.get("check")
        if checks and check is not None and v is not None:
            problem = check(v)
            if problem:
                raise SchemaError(f"{where}: {dotted}: {problem}")
        values[f.name] = v
    return cls(**values)


def dump(obj: Any) -> Any:
    """The JSON-ready form of a schema dataclass (the inverse of :func:`load`)."""
    if dataclasses.is_dataclass(obj):
        return {key_of(f): dump(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, tuple):
        return [dump(x) for x in obj]
    if isinstance(obj, dict):
        return {k: dump(v) for k, v in obj.items()}
    return obj
