"""SPDY's search: the budget arithmetic, a dynamic program for a sensitivity vector, a local search over
sensitivities (pure numpy: no model, hook or device), and the search stage that runs it on the live model
(`run_search`: candidates stitched by `LiveProfile`, scored by `DistanceScorer`)."""

from .budget import Budget, Budgets, anchor_level, compute_budget, fits, with_margin
from .dp import solve_dp
from .run import SearchOutcome, run_search
from .spdy import SearchResult, error_prior, spdy_search
from .stitch import LiveProfile

__all__ = ["Budget", "Budgets", "LiveProfile", "SearchOutcome", "SearchResult", "anchor_level", "compute_budget", "error_prior", "fits", "run_search",
           "solve_dp", "spdy_search", "with_margin"]

