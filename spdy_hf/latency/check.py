"""A measured latency table is checked before it is used or cached: a busy machine can produce times that no model
obeys (the searched parts taking longer than the whole model), and such a table, once cached, would mislead every
later run. A table that fails is measured again, a bounded number of times; one that still fails stops the job."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from ..errors import SPDYError
from .table import LatencyTable

logger = logging.getLogger(__name__)


def constant_problem(model_ms: float, searched_ms: float, what: str) -> str | None:
    """Why a table whose searched parts take `searched_ms` of a `model_ms` model cannot be right, or None."""
    if searched_ms > model_ms:
        return (f"the {what} take {searched_ms:.3f} ms by the table, longer than the whole dense model "
                f"({model_ms:.3f} ms)")
    return None


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
        f"The {what} failed its check {attempts} times: {problem}. The machine was most likely busy while timing "
        "(another heavy process shares its cores); nothing was cached. Run again when it is idle (timing."
        "attempts sets how often to retry).")


def cached_or_measured(path: str, measure: Callable[[], LatencyTable], check: Callable[[LatencyTable], str | None],
                       attempts: int, what: str) -> LatencyTable:
    """The table cached at `path` when it loads and passes `check`; else measured until sound and cached there."""
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
    table = measure_until_sound(measure, check, attempts, what)
    table.save(path)
    logger.info("The %s is cached at %s.", what, path)
    return table
