"""The registry of level families: each family's module registers its class (`register_family`); the package
(`spdy_hf.families`) imports every such module, and the names a job and the CLI accept are read from here, so a new
family is one new module."""

from __future__ import annotations

FAMILIES: dict[str, type] = {}


def register_family(cls: type) -> type:
    """Class decorator: makes a `Family` subclass known by its `name`."""
    if not cls.name or cls.name in FAMILIES:
        raise ValueError(f"A level family needs a name of its own; {cls.__name__} has {cls.name!r}.")
    FAMILIES[cls.name] = cls
    return cls
