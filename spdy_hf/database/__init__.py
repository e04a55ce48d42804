"""Pruning databases: for every unit and every level, the pruned weights."""

from .base import PruningDatabase
from .magnitude import MagnitudeDatabase
from .obs_database import EncodedDatabase, build_obs_database, load_obs_database

__all__ = ["PruningDatabase", "MagnitudeDatabase", "EncodedDatabase", "build_obs_database", "load_obs_database"]
