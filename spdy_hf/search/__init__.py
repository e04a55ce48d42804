"""SPDY's search: a dynamic program for a sensitivity vector, and a local search over sensitivities."""

from .dp import solve_dp
from .spdy import Budget, SearchResult, compute_budget, error_prior, spdy_search

__all__ = ["solve_dp", "Budget", "SearchResult", "compute_budget", "error_prior", "spdy_search"]
