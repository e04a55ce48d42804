"""Sparsity levels: the SPDY reference grid, or a user's list."""

from __future__ import annotations

# The reference grid (SPDY paper and code): densities 0.6 * delta^k, delta = (0.01 / 0.6)^(1/40), k = 0..40,
# i.e. sparsities 0.40, 0.4584, 0.5111, ..., 0.99. Level 0 (dense) is always prepended by `get_levels`.
_GRID_FIRST_DENSITY = 0.6
_GRID_LAST_DENSITY = 0.01
_GRID_STEPS = 40


def spdy_grid() -> list[float]:
    """The 41 sparse levels of the SPDY reference grid, as sparsities in increasing order."""
    delta = (_GRID_LAST_DENSITY / _GRID_FIRST_DENSITY) ** (1.0 / _GRID_STEPS)
    return [1.0 - _GRID_FIRST_DENSITY * delta**k for k in range(_GRID_STEPS + 1)]


def get_levels(levels: str | list[float]) -> list[float]:
    """All levels of a search, dense (0.0) first, then increasing sparsity."""
    sparse = spdy_grid() if levels == "spdy" else sorted(float(x) for x in levels)
    return [0.0] + sparse
