"""SPDY's dynamic program: the cheapest level per unit whose summed time fits a budget. Pure numpy."""

from __future__ import annotations

import numpy as np

from ..errors import SPDYError


def check_times(times, names: list[str] | None = None, dense_finite: bool = True) -> np.ndarray:
    """`times` as a (U, K) float array, after checking that every time is a number >= 0 (inf: the level cannot
    run) and, with `dense_finite`, every dense time (level 0) finite; raises `SPDYError` naming the first bad unit
    and level."""
    times = np.asarray(times, dtype=np.float64)
    if times.ndim != 2 or times.shape[1] < 1:
        raise SPDYError(f"Times must be a (units, levels) array with the dense level first; got shape {times.shape}.")
    bad = np.isnan(times) | (times < 0)
    if dense_finite:
        bad[:, 0] |= ~np.isfinite(times[:, 0])
    if bad.any():
        u, k = (int(i) for i in np.argwhere(bad)[0])
        name = names[u] if names is not None else f"#{u}"
        raise SPDYError(f"Invalid latency for unit {name} at level {k}: {float(times[u, k])} ms (times must be numbers "
                        ">= 0, and finite at the dense level 0). The latency table is corrupt or was edited; measure "
                        "it again.")
    return times


def bucket_weights(times: np.ndarray, budget: float, buckets: int) -> np.ndarray:
    """Times (U, K) in whole buckets of size budget / buckets, rounded UP; unrunnable levels get buckets + 1.

    Rounding up makes the guarantee strict: if the bucket counts fit in `buckets`, the true times fit in
    `budget` (the reference code rounded to nearest and could overshoot).
    """
    # exact to float precision: a sum of times sitting on bucket edges may exceed the budget by ~1e-16 relative
    size = budget / buckets
    with np.errstate(invalid="ignore", over="ignore"):
        w = np.ceil(np.asarray(times, dtype=np.float64) / size)
    w[~np.isfinite(w) | (w > buckets)] = buckets + 1
    return w.astype(np.int64)


def solve_dp(costs: np.ndarray, times: np.ndarray, budget: float, buckets: int = 10_000) -> np.ndarray | None:
    """Minimises sum_u costs[u, k_u] subject to sum_u times[u, k_u] <= budget (times rounded up to buckets).

    Args:
        costs: (U, K) cost of each unit at each level.
        times: (U, K) time of each unit at each level; inf where a level cannot run.
        budget: the time the searched units may take in all.
        buckets: number of time buckets B; the DP is O(U * K * B), vectorised over B.

    Returns:
        (U,) level index per unit, or None when no choice fits the budget.
    """
    costs = np.asarray(costs, dtype=np.float64)
    times = check_times(times, dense_finite=False)  # the DP itself needs no runnable dense level
    if costs.shape != times.shape or np.isnan(costs).any():
        raise SPDYError(f"The DP needs one cost per unit and level, no NaN: costs {costs.shape}, times {times.shape}.")
    n_units, n_levels = costs.shape
    if budget <= 0 or n_units == 0:
        return None if n_units else np.zeros(0, dtype=np.int64)
    w = bucket_weights(times, budget, buckets)  # (U, K)
    # best[b]: least cost of the units so far using at most b buckets; monotone non-increasing in b
    best = np.zeros(buckets + 1)
    choice = np.full((n_units, buckets + 1), -1, dtype=np.int32)
    for u in range(n_units):
        new = np.full(buckets + 1, np.inf)
        for k in range(n_levels):
            wk = w[u, k]
            if wk > buckets:
                continue
            cand = best[: buckets + 1 - wk] + costs[u, k]  # goes to buckets wk..B
            better = cand < new[wk:]
            new[wk:][better] = cand[better]
            choice[u, wk:][better] = k
        best = new
    if not np.isfinite(best[buckets]):
        return None
    profile = np.empty(n_units, dtype=np.int64)
    b = buckets
    for u in range(n_units - 1, -1, -1):
        k = choice[u, b]
        profile[u] = k
        b -= w[u, k]
    return profile
