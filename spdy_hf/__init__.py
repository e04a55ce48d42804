"""spdy_hf: speedup-targeted pruning (SPDY, Frantar & Alistarh, ICML 2022) for Hugging Face models.

Importing the package is cheap: it loads no model code, initialises no CUDA and imports no Trainer; the
public names below are resolved on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .version import VERSION as __version__

_LAZY = {
    "SPDYConfig": "config",
    "RegimeConfig": "config",
    "CalibrationConfig": "config",
    "DatabaseConfig": "config",
    "SearchConfig": "config",
    "TimingConfig": "config",
    "StructuredConfig": "config",
    "find_structured_groups": "modeling.groups",
    "SPDYPruner": "pruner",
    "PruningResult": "output.result",
    "LatencyTable": "latency.table",
    "SPDYError": "errors",
    "ConfigError": "errors",
    "UnreachableTargetError": "errors",
    "find_units": "modeling.units",
    "FastLinear": "deploy.kernels",
    "load_pretrained": "output.load",
    "prune_pretrained": "pruner",
    "SPDYPruningCallback": "integrations.trainer",
    "SPDYHeldZerosCallback": "integrations.trainer",
    "RecoveryConfig": "config",
    "export_model": "export",
}

__all__ = [
    "CalibrationConfig", "ConfigError", "DatabaseConfig", "FastLinear", "LatencyTable", "PruningResult", "RegimeConfig", "SPDYConfig",
    "SPDYError", "SPDYPruner", "SearchConfig", "TimingConfig", "UnreachableTargetError", "__version__", "find_units",
    "load_pretrained", "prune_pretrained", "SPDYPruningCallback", "SPDYHeldZerosCallback", "RecoveryConfig",
    "StructuredConfig", "find_structured_groups", "export_model",
]

if TYPE_CHECKING:  # pragma: no cover
    from .config import (
        CalibrationConfig,
        DatabaseConfig,
        RecoveryConfig,
        RegimeConfig,
        SearchConfig,
        SPDYConfig,
        StructuredConfig,
        TimingConfig,
    )
    from .deploy.kernels import FastLinear
    from .errors import ConfigError, SPDYError, UnreachableTargetError
    from .export import export_model
    from .integrations.trainer import SPDYHeldZerosCallback, SPDYPruningCallback
    from .latency.table import LatencyTable
    from .modeling.groups import find_structured_groups
    from .modeling.units import find_units
    from .output.load import load_pretrained
    from .output.result import PruningResult
    from .pruner import SPDYPruner, prune_pretrained


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
