"""A measured latency table is checked before it is used or cached: a busy machine can produce times that no model
obeys (the searched parts taking longer than the whole model), and such a table, once cached, would mislead every
later run. Every table must have a non-negative constant (`constant_problem`); a newly measured one must also
predict the speedups of a few random profiles, measured end to end, within `timing.check_tolerance`
(`prediction_problem`). A table that fails is measured again, a bounded number of times; one that still fails
stops the job and is never cached."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import numpy as np

from ..errors import SPDYError
from .table import LatencyTable

logger = logging.getLogger(__name__)

# what a refused table's error says of its cause (callers that retry a busy machine look for it)
BUSY_MACHINE = "The machine was most likely busy while timing"


def constant_problem(model_ms: float, searched_ms: float, what: str) -> str | None:
    """Why a table whose searched parts take `searched_ms` of a `model_ms` model cannot be right, or None."""
    if searched_ms > model_ms:
        return (f"the {what} take {searched_ms:.3f} ms by the table, longer than the whole dense model "
                f"({model_ms:.3f} ms)")
    return None


def prediction_problem(pairs: list[tuple[float, float]], tolerance: float) -> str | None:
    """Why a table whose predicted speedups of random profiles (`pairs`: predicted, measured end to end) are more
    than `tolerance` (a fraction) apart from the measured ones cannot be trusted, or None."""
    if not pairs:
        return None
    predicted, measured = max(pairs, key=lambda p: abs(p[0] / p[1] - 1))
    if abs(predicted / measured - 1) > tolerance:
        return (f"it predicts a random profile {predicted:.3f}x faster than the dense model, and that profile measured "
                f"{measured:.3f}x end to end ({abs(predicted / measured - 1):.1%} apart; timing.check_tolerance is "
                f"{tolerance:.0%})")
    return None


def judge_profiles(pairs: list[tuple[float, float]], tolerance: float, record: dict) -> str | None:
    """The random-profile check: logs each pair, stores the check in `record["profile_check"]` (a part of the
    table), and returns `prediction_problem`'s verdict. Nothing is recorded when no profile was checked."""
    if not pairs:
        return None
    for predicted, measured in pairs:
        logger.info("Latency table check: a random profile predicted at %.3fx measured %.3fx end to end.", predicted,
                    measured)
    problem = prediction_problem(pairs, tolerance)
    record["profile_check"] = {"predicted_speedup": [p for p, _ in pairs], "measured_speedup": [m for _, m in pairs],
                               "tolerance": tolerance, "passed": problem is None}
    return problem


def random_profiles(times: np.ndarray, n: int, seed: int = 0) -> list[np.ndarray]:
    """`n` random profiles over the levels of `times` ((U, K) ms; inf: no such level): each unit stays dense with
    probability 1/2, else takes one of its other levels, uniformly. Mixed, like the profiles the search produces."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        profile = np.zeros(len(times), dtype=np.int64)
        for u, row in enumerate(times):
            other = np.flatnonzero(np.isfinite(row[1:])) + 1
            if len(other) and rng.random() < 0.5:
                profile[u] = rng.choice(other)
        out.append(profile)
    return out


def measure_until_sound(measure: Callable[[], LatencyTable], check: Callable[[LatencyTable], str | None],
                        attempts: int, what: str) -> LatencyTable:
    """`measure()` until `check(table)` finds nothing wrong (and the table's own validation passes), at most
    `attempts` times; raises `SPDYError` naming the figures when every attempt failed. Nothing is cached here."""
    problem = None
    for attempt in range(1, attempts + 1):
        try:
            table = measure()
            problem = check(table)
        except SPDYError as e:  # figures the table itself refuses (negative, not finite)
            problem = str(e)
        if problem is None:
            return table
        if attempt < attempts:
            logger.warning("The %s just measured cannot be right (%s; attempt %d of %d): measuring again.", what,
                           problem, attempt, attempts)
    raise SPDYError(
        f"The {what} failed its check {attempts} times: {problem}. {BUSY_MACHINE} "
        "(another heavy process shares its cores); nothing was cached. Run again when it is idle (timing."
        "attempts sets how often to retry).")


def cached_or_measured(path: str, measure: Callable[[], LatencyTable], check: Callable[[LatencyTable], str | None],
                       attempts: int, what: str,
                       confirm: Callable[[LatencyTable], str | None] | None = None) -> LatencyTable:
    """The table cached at `path` when it loads and passes `check`; else measured until it passes `check` and
    `confirm` (the end-to-end check of random profiles, run on new tables only) and cached there."""
    if os.path.isfile(path):
        try:
            cached = LatencyTable.load(path)
            problem = check(cached)
            if problem is None:
                logger.info("Reusing the %s cached at %s.", what, path)
                return cached
            logger.warning("Ignoring the cached %s %s: %s; measuring again.", what, path, problem)
        except SPDYError as e:
            logger.warning("Ignoring the unreadable cached %s %s (%s); measuring again.", what, path, e)
    table = measure_until_sound(measure, lambda t: check(t) or (confirm(t) if confirm is not None else None),
                                attempts, what)
    table.save(path)
    logger.info("The %s is cached at %s.", what, path)
    return table
