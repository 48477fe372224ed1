"""Loading run configs (SPEC §5, presets): YAML presets shipped in the package, files, dotted ``--set`` overrides.

Presets live in ``kaleido_bert/configs/*.yaml`` and are loaded with :func:`load_config`; ``--set a.b=value``
overrides are parsed with ``ast.literal_eval`` and type-checked against the field's annotation
(:func:`apply_overrides`, :func:`config_from_dict`): an unknown key or a wrong type is one line naming the key.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from kaleido_bert.config.sections import ConfigError, RunConfig

PRESET_NAMES = ("tiny", "demo", "small", "real", "paper")


# ---------------------------------------------------------------------------------------------- typed building
def _check_value(key: str, value: Any, annotation: Any) -> Any:
    """Return ``value`` converted to ``annotation`` or raise a one-line ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(key, value, option)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_check_value(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if origin is dict:
        key_type, item_type = typing.get_args(annotation)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return {_check_value(f"{key} key", k, key_type): _check_value(f"{key}.{k}", v, item_type)
                for k, v in value.items()}
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: {value!r} is not a finite number")
    if annotation in (int, float, str, bool):
        if isinstance(value, bool) and annotation is not bool or not isinstance(value, annotation):
            raise ConfigError(f"{key}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {annotation!r}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_value(f"{prefix}{name}", value, hint)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from None


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Build a validated RunConfig from a (possibly partial) nested dict."""
    return _build(RunConfig, data)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare word is a string: --set features.mode=roi
    if raw.strip().lower() in ("none", "null"):
        value = None
    if raw.strip().lower() in ("true", "false"):
        value = raw.strip().lower() == "true"
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides to a nested dict; unknown keys and wrong types fail in :func:`_build`."""
    for text in overrides:
        path, value = _parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def preset_path(name: str) -> Path:
    return Path(str(resources.files("kaleido_bert") / "configs" / f"{name}.yaml"))


def load_config(name_or_path: str | Path = "demo", overrides: list[str] | None = None) -> RunConfig:
    """Load a shipped preset by name or a YAML file by path, then apply ``--set`` overrides.

    Raises:
        ConfigError: unknown preset or file, unknown key, wrong type, or an invalid value (one line, names the key).
    """
    text = str(name_or_path)
    path = Path(text)
    if text in PRESET_NAMES:
        path, label = preset_path(text), text
    elif path.suffix in (".yaml", ".yml") or path.exists():
        label = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} {'is a directory' if path.is_dir() else 'does not exist'}")
    else:
        raise ConfigError(f"unknown preset {text!r}: use one of {', '.join(PRESET_NAMES)} or a YAML file path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read ({type(err).__name__}): not a YAML text file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    data.setdefault("name", label)
    apply_overrides(data, list(overrides or []))
    return config_from_dict(data)
