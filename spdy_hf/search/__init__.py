"""SPDY's search: the budget arithmetic, a dynamic program for a sensitivity vector, and a local search over
sensitivities. Pure numpy: no model, hook or device."""

from .budget import Budget, anchor_level, compute_budget, fits, with_margin
from .dp import solve_dp
from .spdy import SearchResult, error_prior, spdy_search

__all__ = ["Budget", "SearchResult", "anchor_level", "compute_budget", "error_prior", "fits", "solve_dp",
           "spdy_search", "with_margin"]
