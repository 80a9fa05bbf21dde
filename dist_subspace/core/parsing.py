"""Reading typed configs: a YAML mapping (a file, then dotted ``key=value`` overrides parsed as YAML) built into a
dataclass whose fields' annotations are checked; unknown keys and wrong types are refused by name with a hint.
Used for the run config (:mod:`dist_subspace.core.config`) and the study's spec."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration mistake; the message says how to fix it."""


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against a field's annotation; YAML-parse strings from the command line."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(key, value, inner[0])
        for alternative in inner:  # the first type the value fits (``list[str] | str``: a list, or a string)
            try:
                return _coerce(key, value, alternative)
            except ConfigError:
                pass
        names = " or ".join(str(a) if typing.get_origin(a) else a.__name__ for a in inner)
        raise ConfigError(f"{key} must be {names}, got {value!r} ({type(value).__name__})")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is list:
        if isinstance(value, list):
            return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return {str(k): _coerce(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    else:
        return value
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{key} must be {name}, got {value!r} ({type(value).__name__})")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {prefix + key!r}{hint}")
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{key} is a section; give it as a mapping, e.g. {prefix}{key}.x=...")
            kwargs[key] = _build(hints[key], value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(f"{prefix}{key}", value, hints[key])
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    node = tree
    for part in path:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted}: {part} is not a section")
    node[last] = value


def load_tree(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), what: str = "config") -> dict:
    """A YAML mapping from an optional file, then dotted ``key=value`` overrides (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{what} file {str(path)!r} does not exist; pass an existing YAML file")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{what} file {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{what} file {str(path)!r} must hold a mapping of keys")
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. simplex.vertices=4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not valid YAML; quote it") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def build_dataclass(cls: type, tree: dict[str, Any]) -> Any:
    """``cls`` (a dataclass, possibly of dataclass sections) from a mapping; unknown keys and wrong types are
    refused by name with a hint."""
    return _build(cls, tree, "")
