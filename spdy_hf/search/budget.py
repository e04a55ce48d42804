"""SPDY's budget arithmetic: where a forward pass's time goes, what a target speedup leaves for the searched units,
and whether any profile fits. Pure: arrays in, numbers out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..errors import SPDYError
from .dp import check_times, solve_dp

logger = logging.getLogger(__name__)


@dataclass
class Budget:
    """Where the time of one forward pass goes, and what a target leaves for the searched units."""

    base_ms: float  # the dense model, measured end to end: speedups are relative to it
    prunable_ms: float  # sum of the searched units' dense times
    constant_ms: float  # everything not searched: reference - prunable (skipped layers, attention, norms, ...)
    target_speedup: float
    budget_ms: float  # time the searched units may take: base / target - constant
    min_prunable_ms: float  # every unit at its fastest level

    @property
    def max_reachable_speedup(self) -> float:
        return self.base_ms / (self.constant_ms + self.min_prunable_ms)

    @property
    def reachable(self) -> bool:
        return self.min_prunable_ms <= self.budget_ms

    def predicted_speedup(self, unit_times_ms: np.ndarray) -> float:
        return self.base_ms / (self.constant_ms + float(np.sum(unit_times_ms)))


@dataclass(frozen=True)
class Budgets:
    """What the budget stage hands on: the target's budget, and the one the search aims at (the target raised by
    `search.speedup_margin` where it can be)."""

    target: Budget
    search: Budget

    def report(self) -> dict:
        return {"max_reachable_speedup": self.target.max_reachable_speedup,
                "search_target_speedup": self.search.target_speedup,
                "budget": {"base_ms": self.target.base_ms, "prunable_ms": self.target.prunable_ms,
                           "constant_ms": self.target.constant_ms, "budget_ms": self.search.budget_ms}}


def compute_budget(
    times: np.ndarray, base_ms: float, target_speedup: float, reference_ms: float | None = None,
    names: list[str] | None = None,
) -> Budget:
    """The time budget of the searched units for a target speedup.

    Args:
        times: (U, K) unit times with the dense level first; inf where a level cannot run.
        base_ms: the dense model's time; the speedup is measured against it.
        reference_ms: the time of the model whose units run in the form `times` were measured in, all dense
            (on the cpu backend, every unit a dense `FastLinear`); the constant is `reference_ms - sum of dense
            unit times`. Defaults to `base_ms`.
        names: the units' names, for error messages.

    Raises:
        SPDYError: a time that is negative or not a number (naming the unit and level), a dense time that is not
            finite, a non-positive model time, or searched units that take longer than the whole model.
    """
    times = check_times(times, names)
    for name, value in (("base_ms", base_ms), ("reference_ms", reference_ms), ("target_speedup", target_speedup)):
        if value is not None and not (np.isfinite(value) and value > 0):
            raise SPDYError(f"The budget needs a positive, finite {name}; got {value!r}.")
    prunable = float(times[:, 0].sum())
    reference = base_ms if reference_ms is None else reference_ms
    constant = reference - prunable
    if constant < 0:
        raise SPDYError(
            f"The latency table says the searched units alone take {prunable:.3f} ms, longer than the whole dense "
            f"model ({reference:.3f} ms): the table and the model time disagree (measured on a busy machine, or for "
            "another model or regime), so no speedup it predicts can be trusted. Measure the table again on an "
            "idle machine (delete its file under the latency cache, or drop --latency-table).")
    return Budget(
        base_ms=float(base_ms),
        prunable_ms=prunable,
        constant_ms=constant,
        target_speedup=float(target_speedup),
        budget_ms=base_ms / target_speedup - constant,
        min_prunable_ms=float(times.min(axis=1).sum()),
    )


def fits(times: np.ndarray, budget: Budget, buckets: int) -> bool:
    """Whether some profile fits the budget once times are rounded up to DP buckets (the true times may fit where
    the rounded ones do not)."""
    return budget.budget_ms > 0 and solve_dp(np.zeros_like(times), times, budget.budget_ms, buckets) is not None


def with_margin(times: np.ndarray, budget: Budget, margin: float, buckets: int,
                reference_ms: float | None = None) -> Budget:
    """The budget the search aims at: the target raised by `margin` (a fraction) for timing error, as far as it is
    reachable and fits the DP's buckets; else `budget` itself. A margin cut short or dropped is logged as a warning
    naming `search.speedup_margin`: the profile then has less room for timing error. `reference_ms` as in
    `compute_budget`."""
    if margin <= 0:
        return budget
    wanted = budget.target_speedup * (1 + margin)
    aim = min(wanted, budget.max_reachable_speedup)
    if aim <= budget.target_speedup:
        _margin_lost(budget, margin, wanted, "the target is already the fastest this model reaches")
        return budget
    raised = compute_budget(times, budget.base_ms, aim, reference_ms=reference_ms)
    if not fits(times, raised, buckets):
        _margin_lost(budget, margin, wanted, f"no profile fits {aim:.3f}x once times are rounded up to "
                     f"{buckets} buckets (search.dp_buckets)")
        return budget
    if aim < wanted:
        logger.warning("The search aims at %.3fx, not %.3fx (target %.3gx with search.speedup_margin %.0f%%): %.3fx "
                       "is the most this model reaches, so the margin for timing error is %.1f%%.", aim, wanted,
                       budget.target_speedup, 100 * margin, aim, 100 * (aim / budget.target_speedup - 1))
    else:
        logger.info("Searching for %.3fx (target %.3gx with a margin of %.0f%% for timing error).",
                    aim, budget.target_speedup, 100 * margin)
    return raised


def _margin_lost(budget: Budget, margin: float, wanted: float, why: str) -> None:
    logger.warning("The search aims at the target itself, %.3gx, not %.3fx (search.speedup_margin %.0f%%): %s. A "
                   "measured speedup then has no room for timing error and may fall short of the target.",
                   budget.target_speedup, wanted, 100 * margin, why)


def anchor_level(times: np.ndarray, budget_ms: float) -> int:
    """The uniform level that meets the budget: the smallest level k >= 1 whose every-unit-at-k profile fits,
    else the level with the least total time. Data-aware databases calibrate later blocks on the outputs of
    earlier ones pruned to this level: the level the search's profiles are, on average, near."""
    totals = np.asarray(times, dtype=np.float64).sum(axis=0)  # (K,)
    for k in range(1, len(totals)):
        if totals[k] <= budget_ms:
            return k
    return int(np.argmin(np.where(np.isfinite(totals), totals, np.inf)[1:])) + 1 if len(totals) > 1 else 0
