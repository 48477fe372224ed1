"""How run-config values are checked (paper §4.1 settings, typed): one-line :class:`ConfigError` naming the key.

:func:`check_ranges` refuses a section's value outside its range (each section's ``__post_init__`` calls it);
:func:`build` makes a config dataclass from a (possibly partial) nested dict, converting each value to its field's
annotation (``int``, ``float``, ``str``, ``bool``, ``list[...]``, ``dict[...]``, unions, nested sections) and refusing
an unknown key or a wrong type. Overrides (``--set``) and files are parsed in :mod:`kaleido_bert.config.loading`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from kaleido_bert.errors import KaleidoError


class ConfigError(KaleidoError):
    """A config file, preset name or override is invalid."""


def check_ranges(section: str, config: Any, *, positive: tuple[str, ...] = (), at_least_one: tuple[str, ...] = (),
                 non_negative: tuple[str, ...] = (), fractions: tuple[str, ...] = ()) -> None:
    """Refuse, in one line naming ``section.field``, the first value outside its range (or not finite)."""
    rules = ((positive, lambda v: v > 0, "> 0"), (at_least_one, lambda v: v >= 1, "at least 1"),
             (non_negative, lambda v: v >= 0, "at least 0"), (fractions, lambda v: 0 <= v <= 1, "between 0 and 1"))
    for names, ok, wanted in rules:
        for name in names:
            value = getattr(config, name)
            if not ok(value) or (isinstance(value, float) and not math.isfinite(value)):
                raise ConfigError(f"{section}.{name}={value!r} must be {wanted}")


def check_value(key: str, value: Any, annotation: Any) -> Any:
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
                return check_value(key, value, option)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [check_value(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if origin is dict:
        key_type, item_type = typing.get_args(annotation)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return {check_value(f"{key} key", k, key_type): check_value(f"{key}.{k}", v, item_type)
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


RETIRED = {
    "train.itc_queue": "ITC against a queue of earlier positives tied with the batch alone on validation",
}
"""Fields a run config once had, with why they went: a file (an older run's ``run.yaml``) that sets one still
loads without it, since none changes how a trained model is evaluated; ``--set`` refuses it."""


def build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """A ``cls`` dataclass from the nested dict ``data``, each value checked against its field's annotation;
    :data:`RETIRED` keys are left out.

    Raises:
        ConfigError: an unknown key, a wrong type or an invalid value (one line naming ``prefix`` + the key).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    data = {key: value for key, value in data.items() if f"{prefix}{key}" not in RETIRED}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build(hint, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = check_value(f"{prefix}{name}", value, hint)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from None
