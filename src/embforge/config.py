"""Strict configuration: dataclass schemas filled from YAML, with CLI overrides.

Config files are plain YAML mapped onto dataclasses by :func:`from_dict`. Nothing is
silently dropped: an unknown key raises :class:`ConfigError` naming its full key path and
the closest valid key, a wrong type or an invalid ``Literal`` choice names the path too.
``--set a.b=c`` overrides are applied to the raw mapping before validation, so they get
exactly the same checks as the file.

This module imports only the standard library and PyYAML (no torch).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from embforge.errors import ConfigError

T = TypeVar("T")

# a PyTorch model's numeric precision (embforge.precision: what ``auto`` resolves to), the one list of its names
PrecisionName = Literal["auto", "fp32", "bf16"]


def did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert nested dataclasses."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"{path}: {value!r} is not one of {list(args)}" + did_you_mean(str(value), [str(a) for a in args])
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        item_tp = args[0] if args else Any
        return [_convert(v, item_tp, _join(path, i)) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        key_tp, val_tp = args if args else (Any, Any)
        return {_convert(k, key_tp, path): _convert(v, val_tp, _join(path, str(k))) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads 2e-5 as a string: accept numeric strings for float fields
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported annotation {tp!r} in the schema")  # a schema bug, not user input


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types.

    Args:
        cls: a dataclass type whose fields are annotated with str/int/float/bool,
            ``Literal[...]``, ``list[...]``, ``dict[...]``, ``X | None`` or nested dataclasses.
        data: the mapping (e.g. parsed YAML).
        path: key path of ``data`` inside the whole file, used in error messages.

    Returns:
        An instance of ``cls``.
    """
    where = path or "<top level>"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise ConfigError(f"unknown key {_join(path, str(key))!r}" + did_you_mean(str(key), fields))
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], _join(path, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {_join(path, name)!r}")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(path)
    return obj


def to_dict(obj: Any) -> Any:
    """The inverse of :func:`from_dict`: a plain, YAML-serialisable structure."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``"a.b.c=value"`` into (``["a", "b", "c"]``, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key path")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from exc
    return parts, value


def apply_overrides(data: dict, overrides: typing.Iterable[str]) -> dict:
    """Apply ``--set`` overrides to a raw config mapping (in place) and return it.

    Integer path parts index into lists (``stages.1.lr=1e-5``). Unknown keys are not
    checked here but by :func:`from_dict` afterwards, with the same did-you-mean error.
    """
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            here = ".".join(parts[: i + 1])
            if isinstance(node, list):
                node = _list_item(node, part, here)
            elif isinstance(node, dict):
                node = node.setdefault(part, {})
            else:
                raise ConfigError(f"override {text!r}: {here!r} is a {type(node).__name__}, not a mapping")
        last = parts[-1]
        if isinstance(node, list):
            _list_item(node, last, ".".join(parts))
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"override {text!r}: cannot set a key inside a {type(node).__name__}")
    return data


def _list_item(node: list, part: str, here: str) -> Any:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override path {here!r}: expected an index below {len(node)}")
    return node[int(part)]


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, naming the file in every error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path, overrides: typing.Iterable[str] = ()) -> T:
    """Read YAML ``path``, apply ``--set`` overrides, and validate it strictly into ``cls``."""
    data = apply_overrides(read_yaml(path), overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
