"""Pruning databases: for every unit and every level, the pruned weights."""

from .base import PruningDatabase
from .magnitude import MagnitudeDatabase
from .obs_database import EncodedDatabase, build_obs_database, load_obs_database
from .structured_database import StructuredDatabase, build_structured_database

__all__ = ["EncodedDatabase", "MagnitudeDatabase", "PruningDatabase", "StructuredDatabase", "build_obs_database",
           "build_structured_database",
           "load_obs_database"]
