"""Typed options: dataclass fields that carry their help and bounds, checked against YAML values.

A pass (or a recipe section) declares its options as a frozen dataclass whose fields are made
with `option(...)`. `parse_options` turns a YAML mapping into an instance or raises one
QGraphError that names the file, the key path, the bad value and what to write instead;
`describe_options` lists each field's value, type, default and help for `qgraph recipes NAME`.
Supported field types: bool, int, float, str, Literal[...], tuple[X, ...] and unions of them
(with None).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

from qgraph.errors import QGraphError

NO_DEFAULT = dataclasses.MISSING


def option(default: Any = NO_DEFAULT, help: str = "", *, ge: float | None = None, gt: float | None = None,  # noqa: A002
           le: float | None = None, choices: Callable[[], tuple[str, ...]] | None = None, example: Any = None,
           aliases: tuple[str, ...] = ()) -> Any:
    """A dataclass field with its one-line help and bounds (on a number, or on each number of a list).

    choices: a function returning the allowed strings (called when needed, so it may import lazily);
    example: what the error's fix suggests when there is no default; aliases: keys users write for
    this one (`bits` for `format`), named in the did-you-mean.
    """
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "choices": choices, "example": example, "aliases": aliases}
    return dataclasses.field(default=default, metadata=meta)


@functools.cache
def _fields(cls: type) -> tuple[tuple[dataclasses.Field, Any], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f, hints[f.name]) for f in dataclasses.fields(cls))


def _arms(tp: Any) -> tuple[Any, ...]:
    """The members of a union (X | Y, Optional[X]); a single type for anything else."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _bounds(meta: dict) -> str:
    lo = (f"[{meta['ge']:g}", meta["ge"]) if meta.get("ge") is not None else (f"({meta['gt']:g}", meta.get("gt"))
    if meta.get("le") is not None:
        return f" in {lo[0]}, {meta['le']:g}]" if lo[1] is not None else f" <= {meta['le']:g}"
    if lo[1] is None:
        return ""
    return f" >= {meta['ge']:g}" if meta.get("ge") is not None else f" > {meta['gt']:g}"


def _arm_words(arm: Any, meta: dict, plural: bool) -> tuple[str, str]:
    """One union member as (type name, what it accepts in words): ('float', 'a number in [0, 1]')."""
    origin = typing.get_origin(arm)
    if arm is type(None):
        return "null", "null"
    if origin is Literal or (arm is str and meta.get("choices")):
        names = typing.get_args(arm) if origin is Literal else meta["choices"]()
        return " | ".join(map(str, names)), repr(names[0]) if len(names) == 1 else "one of " + ", ".join(map(str, names))
    if origin is tuple:
        name, words = _arm_words(typing.get_args(arm)[0], meta, plural=True)
        return f"list[{name}]", f"a list of {words}"
    if arm is bool:
        return "bool", "true or false"
    if arm is str:
        return "str", "text" if plural else "a text"
    noun = {int: ("an integer", "integers"), float: ("a number", "numbers")}[arm][plural]
    return arm.__name__, noun + _bounds(meta)


def expected(tp: Any, meta: dict) -> str:
    """What a field accepts, in words: 'a number in [0, 1] or 'search''."""
    return " or ".join(_arm_words(arm, meta, False)[1] for arm in _arms(tp))


def type_name(tp: Any, meta: dict) -> str:
    """A field's type as users read it: 'float | search', 'list[float]', 'int8 | uint8 | ...'."""
    return " | ".join(_arm_words(arm, meta, False)[0] for arm in _arms(tp))


class _Mismatch(Exception):
    """A value the declared type does not take."""


def _in_bounds(x: float, meta: dict) -> bool:
    return ((meta.get("ge") is None or x >= meta["ge"]) and (meta.get("gt") is None or x > meta["gt"])
            and (meta.get("le") is None or x <= meta["le"]))


def _convert_arm(value: Any, arm: Any, meta: dict) -> Any:
    origin = typing.get_origin(arm)
    if arm is type(None) and value is None:
        return None
    if origin is Literal and any(value == a and type(value) is type(a) for a in typing.get_args(arm)):
        return value  # Literal["a", "b"] or Literal[2, 4, 8]; True is not 1 here
    if origin is tuple and isinstance(value, (list, tuple)) and value:  # an empty search grid searches nothing
        return tuple(_convert(v, typing.get_args(arm)[0], meta) for v in value)
    if arm is bool and isinstance(value, bool):
        return value
    if arm in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        if (arm is float or isinstance(value, int)) and _in_bounds(value, meta):
            return arm(value)
    if arm is str and isinstance(value, str) and (not meta.get("choices") or value in meta["choices"]()):
        return value
    raise _Mismatch


def _convert(value: Any, tp: Any, meta: dict) -> Any:
    for arm in _arms(tp):
        try:
            return _convert_arm(value, arm, meta)
        except _Mismatch:
            continue
    raise _Mismatch


def _only_choices(tp: Any, meta: dict) -> bool:
    """A field that takes one of a few names (format, granularity): its error says 'unknown ...'."""
    return all(typing.get_origin(a) is Literal or (a is str and meta.get("choices")) for a in _arms(tp))


def check_keys(data: Any, allowed: set[str], where: str, origin: str, aliases: dict[str, str] | None = None) -> dict:
    """The mapping at `where`, refusing unknown keys with a did-you-mean; None is an empty mapping.

    aliases: keys users write for an allowed one, mapped to the suggestion ("'format' (one of int8, ...)").
    """
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise QGraphError(f"recipe {origin}: {where} must be a mapping, got {kind_of(data)}",
                          f"write {where} as key: value lines")
    unknown = sorted((k for k in data if k not in allowed), key=str)
    if unknown:
        import difflib

        if not allowed:
            raise QGraphError(f"recipe {origin}: {where} takes no options, got {', '.join(map(repr, unknown))}",
                              f"drop them: write `- {where.rpartition('.')[2]}`")
        aliases = aliases or {}
        hints = [aliases.get(k) or next((repr(m) for m in difflib.get_close_matches(str(k), allowed, n=1)), None)
                 for k in unknown]
        did = "; ".join(f"{k!r} -> did you mean {h}?" for k, h in zip(unknown, hints, strict=True) if h)
        raise QGraphError(
            f"recipe {origin}: unknown key(s) {', '.join(map(repr, unknown))} in {where}",
            (did + "; " if did else "") + f"allowed keys: {', '.join(sorted(allowed))}",
        )
    return data


def kind_of(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "text"}.get(type(value), type(value).__name__)


def parse_options(cls: type, data: Any, where: str, origin: str, keys: set[str] | None = None) -> Any:
    """An instance of the options dataclass `cls` from a YAML mapping at key path `where` of recipe `origin`.

    keys: the fields this section accepts (default all); the others keep their defaults.
    """
    fields = {f.name: (f, tp) for f, tp in _fields(cls) if keys is None or f.name in keys}
    aliases = {a: f"{name!r} ({expected(tp, f.metadata)})" for name, (f, tp) in fields.items()
               for a in f.metadata.get("aliases", ())}
    data = check_keys(data, set(fields), where, origin, aliases)
    values = {}
    for name, (f, tp) in fields.items():
        meta = f.metadata
        if name not in data:
            if f.default is NO_DEFAULT:
                raise QGraphError(f"recipe {origin}: {where} has no {name}", f"add e.g. `{name}: {meta['example']}`")
            continue
        try:
            values[name] = _convert(data[name], tp, meta)
        except _Mismatch:
            path, value = f"{where}.{name}", data[name]
            if _only_choices(tp, meta):
                raise QGraphError(f"recipe {origin}: {path}: unknown {name} {_shown(value)}",
                                  f"use {expected(tp, meta)}") from None
            default = meta["example"] is None and f.default is not NO_DEFAULT
            raise QGraphError(f"recipe {origin}: {path}: {_shown(value)} is not {expected(tp, meta)}",
                              f"write e.g. `{name}: {_yaml(f.default if default else meta['example'])}`"
                              + (" (the default)" if default else "")) from None
    return cls(**values)


def _shown(value: Any) -> str:
    """A bad value in an error: text quoted, the rest as YAML spells it (true, null, [1, 2])."""
    if isinstance(value, str):
        return repr(value)
    return _yaml(tuple(value)) if isinstance(value, list) else _yaml(value)


def _yaml(value: Any) -> str:
    """A default as a user writes it in YAML."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, tuple):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value) if not isinstance(value, dict) else repr(value)


def describe_options(options: Any, given: dict | None = None) -> list[dict]:
    """One row per field of an options instance: name, value, type, default (or required), help, set in the recipe."""
    rows = []
    for f, tp in _fields(type(options)):
        value = getattr(options, f.name)
        rows.append({"name": f.name, "value": _plain(value), "type": type_name(tp, f.metadata),
                     "default": None if f.default is NO_DEFAULT else _plain(f.default),
                     "required": f.default is NO_DEFAULT, "help": f.metadata.get("help", ""),
                     "set": given is not None and f.name in given})
    return rows


def _plain(value: Any) -> Any:
    """JSON-able: tuples as lists, numpy scalars as Python numbers."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value.item() if hasattr(value, "item") else value


def show(value: Any) -> str:
    """A value as `qgraph recipes NAME` prints it (YAML spelling)."""
    return _yaml(tuple(value) if isinstance(value, list) else value)


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """For a pass that takes no options: any key is an unknown key."""
