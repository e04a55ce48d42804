"""Level families: what the search may do to a model. One module per family, one class each, behind one
interface (`Family`); the pipeline (`spdy_hf.pipeline`) runs the same stages for all of them.

- `structured` (the default): each block's attention and FFN is a unit; its levels remove heads / neurons.
- `unstructured`: each linear layer is a unit; its levels are the backend's sparse levels (CSR or 2:4).
- `mixed`: the structured units, whose levels may also be sparse, or both at once.

A new family is one new module with a `Family` subclass, named in `FAMILIES` here and in `spdy_hf.config.FAMILIES`
(the names a config accepts).
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import Entries, Family, Measurement, Plan
from .mixed import MixedFamily
from .structured import StructuredFamily
from .unstructured import UnstructuredFamily

FAMILIES: dict[str, type[Family]] = {
    "structured": StructuredFamily,
    "unstructured": UnstructuredFamily,
    "mixed": MixedFamily,
}


def get_family(name: str) -> type[Family]:
    """The family class registered as `name`."""
    if name not in FAMILIES:
        raise ConfigError(f"family={name!r} is not a known level family; known: {', '.join(sorted(FAMILIES))}.")
    return FAMILIES[name]


__all__ = ["Entries", "FAMILIES", "Family", "Measurement", "MixedFamily", "Plan", "StructuredFamily",
           "UnstructuredFamily", "get_family"]
