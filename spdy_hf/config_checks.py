"""Checks of config values, each raising a `ConfigError` that names the field and what it accepts."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any

from .errors import ConfigError

logger = logging.getLogger("spdy_hf.config")


def check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not supported; allowed values: {', '.join(map(repr, allowed))}.")


def check_fields(section, prefix: str) -> None:
    """Every field whose metadata names a "min" must be an integer at least that; every text field a string (a
    path object becomes its string), or null where the field allows it."""
    for f in dataclasses.fields(section):
        name, value, optional = f"{prefix}{f.name}", getattr(section, f.name), "None" in str(f.type)
        if "min" in f.metadata:
            check_int(name, value, f.metadata["min"])
        elif str(f.type) in ("str", "str | None") and isinstance(value, os.PathLike):
            setattr(section, f.name, os.fspath(value))
        elif str(f.type) in ("str", "str | None") and not (isinstance(value, str) or (value is None and optional)):
            raise ConfigError(f"{name}={value!r} must be a string{' or null' if optional else ''}.")


def check_number(name: str, value: Any, in_range: Callable[[float], bool], interval: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not in_range(value):
        raise ConfigError(f"{name}={value!r} must be a number in {interval}.")


def check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an integer >= {minimum}.")


def build_section(cls, data: dict[str, Any], strict: bool, prefix: str, sections: dict, root: type):
    """A config section (or the whole config, `root`) from a dict: unknown keys an error with `strict`, else a
    warning; nested sections built the same way."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        names = ", ".join(prefix + k for k in unknown)
        if strict:
            raise ConfigError(f"Unknown config key(s): {names}. Known keys: {', '.join(prefix + k for k in known)}.")
        logger.warning("Ignoring unknown config key(s) %s (written by another spdy_hf version?).", names)
    kwargs = {name: build_section(sections[name], value, strict, f"{prefix}{name}.", sections, root)
              if cls is root and name in sections and isinstance(value, dict) else value
              for name, value in data.items() if name in known}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a wrong type that __post_init__ did not catch
        raise ConfigError(f"Invalid config: {e}") from e
