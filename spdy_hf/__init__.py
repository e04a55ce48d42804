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
    "find_structured_groups": "structured",
    "SPDYPruner": "pruner",
    "PruningResult": "result",
    "LatencyTable": "latency.table",
    "SPDYError": "errors",
    "ConfigError": "errors",
    "UnreachableTargetError": "errors",
    "find_units": "units",
    "FastLinear": "apply",
    "load_pretrained": "loading",
    "prune_pretrained": "pruner",
    "SPDYPruningCallback": "integrations.trainer",
    "SPDYHeldZerosCallback": "integrations.trainer",
    "RecoveryConfig": "config_training",
}

__all__ = [
    "CalibrationConfig", "ConfigError", "DatabaseConfig", "FastLinear", "LatencyTable", "PruningResult", "RegimeConfig", "SPDYConfig",
    "SPDYError", "SPDYPruner", "SearchConfig", "TimingConfig", "UnreachableTargetError", "__version__", "find_units",
    "load_pretrained", "prune_pretrained", "SPDYPruningCallback", "SPDYHeldZerosCallback", "RecoveryConfig",
    "StructuredConfig", "find_structured_groups",
]

if TYPE_CHECKING:  # pragma: no cover
    from .apply import FastLinear
    from .config import (
        CalibrationConfig,
        DatabaseConfig,
        RegimeConfig,
        SearchConfig,
        SPDYConfig,
        StructuredConfig,
        TimingConfig,
    )
    from .config_training import RecoveryConfig
    from .errors import ConfigError, SPDYError, UnreachableTargetError
    from .integrations.trainer import SPDYHeldZerosCallback, SPDYPruningCallback
    from .latency.table import LatencyTable
    from .loading import load_pretrained
    from .pruner import SPDYPruner, prune_pretrained
    from .result import PruningResult
    from .structured import find_structured_groups
    from .units import find_units


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
