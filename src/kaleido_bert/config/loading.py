"""Loading run configs (the presets of docs/cli.md): YAML presets shipped in the package, files, dotted ``--set`` overrides.

Presets live in ``kaleido_bert/configs/*.yaml`` and are loaded with :func:`load_config`; ``--set a.b=value``
overrides are parsed with ``ast.literal_eval`` (:func:`apply_overrides`) and type-checked against the field's
annotation when the config is built (:func:`~kaleido_bert.config.sections.config_from_dict`): an unknown key or a
wrong type is one line naming the key.
"""

from __future__ import annotations

import ast
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from kaleido_bert.config.sections import RunConfig, config_from_dict
from kaleido_bert.config.validation import RETIRED, ConfigError

PRESET_NAMES = ("tiny", "demo", "small", "real", "paper")


# ---------------------------------------------------------------------------------------------- overrides
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
    """Apply ``a.b=value`` overrides to a nested dict; unknown keys and wrong types fail in :func:`~kaleido_bert.config.validation.build`."""
    for text in overrides:
        path, value = _parse_override(text)
        if ".".join(path) in RETIRED:
            raise ConfigError(f"override {text!r}: {'.'.join(path)} was removed ({RETIRED['.'.join(path)]})")
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read ({type(err).__name__}): not a YAML text file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return data


def _with_base(path: Path, data: dict[str, Any], *, seen: set[str]) -> dict[str, Any]:
    """A config built on another preset (``base: NAME``): that preset's sections (its own base resolved first),
    with this file's keys over them."""
    base = data.pop("base", None)
    if base is None:
        return data
    if base not in PRESET_NAMES or base in seen:
        raise ConfigError(f"config file {path}: base {base!r} must be another preset ({', '.join(PRESET_NAMES)}) "
                          "that does not lead back to this one")
    found = preset_path(base)
    return _merged(_with_base(found, _read_yaml(found), seen=seen | {base}), data)


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over``'s keys on top of ``base``, section by section (a section's fields are merged, values replaced)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


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
    data = _with_base(path, _read_yaml(path), seen={text})
    data.setdefault("name", label)
    apply_overrides(data, list(overrides or []))
    return config_from_dict(data)
