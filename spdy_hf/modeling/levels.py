"""Sparsity levels: the SPDY reference grid, the 2:4 pattern, or a user's list.

A level has a sparsity and a pattern: "dense" (level 0, always first), "unstructured" (any entries, the grid's
levels) or "2:4" (2 of every 4 consecutive inputs, sparsity 0.5; what NVIDIA's sparse tensor cores run).
A list may mix patterns (e.g. `[0.5, "2:4", 0.9]`): levels need not be nested across patterns.
"""

from __future__ import annotations

# The reference grid (SPDY paper and code): densities 0.6 * delta^k, delta = (0.01 / 0.6)^(1/40), k = 0..40,
# i.e. sparsities 0.40, 0.4584, 0.5111, ..., 0.99. Level 0 (dense) is always prepended by `get_levels`.
_GRID_FIRST_DENSITY = 0.6
_GRID_LAST_DENSITY = 0.01
_GRID_STEPS = 40

PATTERN_SPARSITY = {"2:4": 0.5}


def spdy_grid() -> list[float]:
    """The 41 sparse levels of the SPDY reference grid, as sparsities in increasing order."""
    delta = (_GRID_LAST_DENSITY / _GRID_FIRST_DENSITY) ** (1.0 / _GRID_STEPS)
    return [1.0 - _GRID_FIRST_DENSITY * delta**k for k in range(_GRID_STEPS + 1)]


def _entries(levels) -> list[tuple[float, str]]:
    if levels == "spdy":
        return [(s, "unstructured") for s in spdy_grid()]
    if isinstance(levels, str):
        if levels in PATTERN_SPARSITY:
            return [(PATTERN_SPARSITY[levels], levels)]
        raise ValueError(f"Unknown levels {levels!r}.")
    entries = [(PATTERN_SPARSITY[x], x) if isinstance(x, str) else (float(x), "unstructured") for x in levels]
    return sorted(entries, key=lambda e: (e[0], e[1] != "unstructured"))


def get_levels(levels) -> list[float]:
    """The sparsity of every level of a search, dense (0.0) first, then increasing sparsity."""
    return [0.0] + [s for s, _ in _entries(levels)]


def get_patterns(levels) -> list[str]:
    """The pattern of every level, aligned with `get_levels`: "dense", then "unstructured" or "2:4"."""
    return ["dense"] + [p for _, p in _entries(levels)]
