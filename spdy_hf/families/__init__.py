"""Level families: what the search may do to a model. One module per family, one class each, behind one
interface (`Family`); the pipeline (`spdy_hf.pipeline`) runs the same stages for all of them.

- `structured` (the default): each block's attention and FFN is a unit; its levels remove heads / neurons.
- `unstructured`: each linear layer is a unit; its levels are the backend's sparse levels (CSR or 2:4).
- `mixed`: the structured units, whose levels may also be sparse, or both at once.

A new family is one new module with a `Family` subclass decorated with `register_family`, imported here; the
names a config accepts come from the registry (`family_names`).
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import Databases, Entries, Family, LevelGrid, Measurement, Plan
from .mixed import MixedFamily
from .registry import FAMILIES, register_family
from .structured import StructuredFamily, StructuredLayout
from .unstructured import UnstructuredFamily


def family_names() -> tuple[str, ...]:
    """The names of the registered families, in the order they registered (the default, "structured", first)."""
    return tuple(FAMILIES)


def get_family(name: str) -> type[Family]:
    """The family class registered as `name`."""
    if name not in FAMILIES:
        raise ConfigError(f"family={name!r} is not a known level family; known: {', '.join(FAMILIES)}.")
    return FAMILIES[name]


def family_for(config) -> type[Family]:
    """The family class `config.family` names, after checking that it takes the config's regime dtype on its
    backend (`Family.backend_dtypes`)."""
    family = get_family(config.family)
    allowed = family.backend_dtypes.get(config.backend, ())
    if config.regime.dtype not in allowed:
        raise ConfigError(
            f"family={config.family!r} cannot profile regime.dtype={config.regime.dtype!r} on backend "
            f"{config.backend!r}: its kernels there take {', '.join(map(repr, allowed))}. Choose one of those, or "
            "family='structured', whose levels remove heads and neurons and run in any dtype the backend has."
        )
    return family


__all__ = ["Databases", "Entries", "FAMILIES", "Family", "LevelGrid", "Measurement", "MixedFamily", "Plan",
           "StructuredFamily", "StructuredLayout", "UnstructuredFamily", "family_for", "family_names", "get_family",
           "register_family"]
