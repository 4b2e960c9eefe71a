"""Building config dataclasses from plain dicts: unknown keys and wrong types fail with the fix.

A constant file's sections are plain dicts; :func:`build` turns one into its frozen dataclass and
checks every key and value against the dataclass's fields and annotations *before* the
dataclass's own ``__post_init__`` checks ranges and combinations. An unknown key names the
section, the key and the closest valid keys (``difflib``); a wrong type names the field, the
expected type and the value. Nested config fields (a dataclass-typed field) accept a dict.

Overrides (``training.lr=4e-3``) are parsed by :func:`parse_override`: the value goes through
``ast.literal_eval`` (numbers, booleans, ``None``, tuples, lists) and stays a string otherwise,
then meets the same type check. Hand-written because the type check is a few lines over
``typing.get_type_hints``; pydantic or a CLI framework would bring a second model of the same
dataclasses, and nanoGPT's configurator (the model followed here) is a page of code.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")


class ConfigError(ValueError):
    """A config section holds an unknown key or a value out of range; the message names the fix."""


class ConfigTypeError(ConfigError, TypeError):
    """A config value has the wrong type; the message names the field and the expected type."""


RENAMED = {"n_documents": ("n_windows", "the analysis encodes held-out windows drawn as training draws them"),
           "eval_documents": ("eval_windows", "evaluation scores held-out windows drawn as training draws them")}
"""Keys an earlier version had: the key that replaced each, and why (named in the error)."""


def closest(name: str, choices: typing.Iterable[str]) -> str:
    """``"did you mean: a, b"`` from the closest of ``choices`` (or all of them when none is close)."""
    choices = sorted(choices)
    if name in RENAMED and RENAMED[name][0] in choices:
        return f"it was replaced by {RENAMED[name][0]!r} ({RENAMED[name][1]})"
    near = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    return f"closest valid keys: {', '.join(near)}" if near else f"valid keys: {', '.join(choices)}"


def describe(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin is Literal:
        return " | ".join(repr(v) for v in typing.get_args(kind))
    if origin in (Union, types.UnionType):
        return " | ".join(describe(a) for a in typing.get_args(kind))
    if kind is type(None):
        return "None"
    return getattr(kind, "__name__", str(kind))


def _matches(value: Any, kind: Any) -> bool:
    """Whether ``value`` fits the annotation ``kind`` (lists count as tuples; ints as floats)."""
    if kind is Any:
        return True
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args, strict=True))
    if origin in (dict, Mapping) or kind in (dict, Mapping):
        return isinstance(value, Mapping)
    if dataclasses.is_dataclass(kind):
        return isinstance(value, (kind, Mapping))
    return isinstance(value, origin or kind)


def _nested_type(kind: Any) -> type | None:
    """The dataclass a field holds (``X`` or ``X | None``), else None."""
    candidates = typing.get_args(kind) if typing.get_origin(kind) in (Union, types.UnionType) else (kind,)
    found = [c for c in candidates if dataclasses.is_dataclass(c)]
    return found[0] if found else None


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The init fields of a config dataclass and their resolved annotations."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def build(cls: type[T], values: Mapping[str, Any] | T | None, section: str) -> T:
    """``cls(**values)`` after checking every key and value; ``section`` names it in errors."""
    if isinstance(values, cls):
        return values
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigTypeError(f"{section} should be a dict of {cls.__name__} fields, got {type(values).__name__}")
    kinds = field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in kinds:
            raise ConfigError(f"{section}: unknown key {key!r}; {closest(str(key), kinds)}")
        nested = _nested_type(kinds[key])
        if nested is not None and isinstance(value, Mapping):
            value = build(nested, value, f"{section}.{key}")
        elif not _matches(value, kinds[key]):
            raise ConfigTypeError(f"{section}.{key} should be {describe(kinds[key])}, "
                                  f"got {value!r} ({type(value).__name__})")
        if isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:  # a __post_init__ range check: name the section
        raise ConfigError(f"{section}: {error}") from error


def check_fields(config: Any) -> None:
    """Every field of a config against its annotation, however it was constructed (the first step of
    each config's ``__post_init__``; :func:`build` checks the same before, naming the section)."""
    for name, kind in field_types(type(config)).items():
        value = getattr(config, name)
        if not _matches(value, kind):
            raise ConfigTypeError(f"{type(config).__name__}.{name} should be {describe(kind)}, "
                                  f"got {value!r} ({type(value).__name__})")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"training.lr=4e-3"`` -> ``(["training", "lr"], 0.004)``; strings need no quotes."""
    path, sep, raw = text.partition("=")
    if not sep or not path or any(not part for part in path.split(".")):
        raise ConfigError(f"override {text!r} should read section.key=value, e.g. optimizer.lr=4e-3")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return path.split("."), value


def to_json(config: Any) -> Any:
    """A config (nested dataclasses, tuples) as JSON-ready dicts and lists."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_json(getattr(config, f.name)) for f in dataclasses.fields(config) if f.repr}
    if isinstance(config, (tuple, list)):
        return [to_json(v) for v in config]
    if isinstance(config, Mapping):
        return {str(k): to_json(v) for k, v in config.items()}
    return config


def positive(problems: list[str], **values: float | None) -> None:
    """Append a problem for every value that is not None and not > 0."""
    for name, value in values.items():
        if value is not None and not value > 0:
            problems.append(f"{name} must be positive, got {value}")


def raise_problems(cls_name: str, problems: list[str]) -> None:
    if problems:
        raise ConfigError(f"invalid {cls_name}: " + "; ".join(problems))


def owners(cls: type, key: str, prefix: str = "") -> list[str]:
    """Dotted paths under ``cls`` whose last part is ``key`` (own fields first, then nested configs)."""
    kinds = field_types(cls)
    if key in kinds:  # a knob, or a whole section given as one value
        return [prefix + key]
    found = []
    for name, kind in kinds.items():
        nested = _nested_type(kind)
        if nested is not None:
            found += owners(nested, key, f"{prefix}{name}.")
    return found


def route(cls: type, values: Mapping[str, Any], section: str) -> dict[str, Any]:
    """Nest flat keys under the sub-config that defines them: ``{"k": 4}`` -> ``{"sae": {"k": 4}}``.

    Every knob is defined in exactly one config, so a flat name is unambiguous; a name that is
    defined nowhere fails with the closest valid names.
    """
    nested: dict[str, Any] = {}
    for key, value in values.items():
        paths = owners(cls, key)
        if not paths:
            everything = {p.rsplit(".", 1)[-1] for name in field_types(cls) for p in _all_paths(cls, name)}
            raise ConfigError(f"{section}: unknown key {key!r}; {closest(key, everything)}")
        *parents, last = paths[0].split(".")
        target = nested
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = value
    return nested


def _all_paths(cls: type, name: str) -> list[str]:
    nested = _nested_type(field_types(cls)[name])
    if nested is None:
        return [name]
    return [f"{name}.{p}" for sub in field_types(nested) for p in _all_paths(nested, sub)]


def build_flat(cls: type[T], section: str = "config", **values: Any) -> T:
    """``cls`` from flat keyword knobs routed to the sub-configs that own them (:func:`route`)."""
    return build(cls, route(cls, values, section), section)


def with_overrides(config: T, section: str = "config", **values: Any) -> T:
    """A copy of ``config`` with flat knobs replaced, each routed to the sub-config that owns it."""
    if not values:
        return config
    return _deep_replace(config, route(type(config), values, section), section)


def _deep_replace(config: Any, nested: Mapping[str, Any], section: str) -> Any:
    kinds, changes = field_types(type(config)), {}
    for key, value in nested.items():
        current = getattr(config, key)
        if isinstance(value, Mapping) and dataclasses.is_dataclass(current):
            changes[key] = _deep_replace(current, value, f"{section}.{key}")
        elif not _matches(value, kinds[key]):
            raise ConfigTypeError(f"{section}.{key} should be {describe(kinds[key])}, "
                                  f"got {value!r} ({type(value).__name__})")
        else:
            changes[key] = tuple(value) if isinstance(value, list) else value
    try:
        return dataclasses.replace(config, **changes)
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{section}: {error}") from error
