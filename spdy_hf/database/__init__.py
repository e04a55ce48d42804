"""Pruning databases: for every unit and every level, the pruned weights."""

from .base import PruningDatabase
from .magnitude import MagnitudeDatabase

__all__ = ["PruningDatabase", "MagnitudeDatabase", "build_database"]


def build_database(method: str, units, levels) -> PruningDatabase:
    if method == "magnitude":
        return MagnitudeDatabase(units, levels)
    raise ValueError(f"Unknown pruning method {method!r}.")
