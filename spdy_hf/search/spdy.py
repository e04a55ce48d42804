"""SPDY's local search over unit sensitivities (Frantar & Alistarh, ICML 2022).

Pure: the search sees times as arrays and scores candidates through a callback; it owns no model.

`max_candidates` bounds the candidates, random starts included (None: SPDY's open-ended schedule); each
neighbourhood size then gets at most an equal share of those left, so the search still ends on size 1.

`starts` are given sensitivities (other targets' searches, re-solved here for this budget), tried before the random
starts; with `only_starts` they replace them, and the local search redraws one unit's sensitivity at a time from the
best of them.

`subsets` name (U, K) boolean masks of levels (a family's kinds of level, say). The first half of the random starts
is shared in turn between every level and each subset that can reach the budget, the second half goes to the space
whose start scored best so far (where the search will go on), a candidate's DP keeps to its subset, and the local
search mutates the best candidate within the best's subset. Within one unit the prior fixes the order of its
levels, which no sensitivity changes: where it ranks one kind of level too well, only a search kept to the other
kind can find profiles of that kind, and the scores decide between them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from ..errors import ConfigError, NonFiniteScoreError, NoProfileFitsError
from .dp import solve_dp

logger = logging.getLogger(__name__)


def error_prior(n_levels: int) -> np.ndarray:
    """SPDY's reference prior e(k) = (k / (K - 1))^2 over the sorted level index, dense = 0."""
    if n_levels == 1:
        return np.zeros(1)
    return (np.arange(n_levels, dtype=np.float64) / (n_levels - 1)) ** 2


@dataclass
class SearchResult:
    profile: np.ndarray  # (U,) level index per unit
    sensitivities: np.ndarray  # (U,) the c that produced it
    score: float
    candidates: int  # sensitivity vectors tried
    evaluations: int  # distinct profiles scored (identical profiles are scored once)
    history: list[float] = field(default_factory=list)  # best score after each candidate
    cut_short: bool = False  # `max_candidates` ended a neighbourhood size before its `patience` failures
    schedule: list[tuple[int, int]] = field(default_factory=list)  # (neighbourhood size, candidates tried at it)
    subset: str | None = None  # the level subset the profile was found in (None: every level)
    allowed: np.ndarray | None = None  # (U, K) bool, that subset's levels: a re-solve of the DP keeps to them
    # the best distinct profiles scored, best first, each with the sensitivities that first produced it and its score
    top: list[tuple[np.ndarray, np.ndarray, float]] = field(default_factory=list)
    # a staged selection's scores of `top` on unseen windows, with their search scores ([unseen, search] each)
    selection: list[list[float]] | None = None
    started_from: str = "random"  # "random", or "N searches": the sensitivities of other targets' searches
    unused_scores: int = 0  # profiles scored ahead of their turn (`width` > 1) that no candidate reached

    def improvements(self) -> list[tuple[int, float]]:
        """(candidate number, counted from 1, new best score) at every improvement: how the search converged."""
        out, best = [], np.inf
        for i, score in enumerate(self.history, 1):
            if score < best:
                out.append((i, score))
                best = score
        return out


def _unit_prior(prior: np.ndarray | None, n_units: int, n_levels: int) -> np.ndarray:
    """The DP's error prior as (1, K) (one curve for every unit, SPDY's reference prior by default) or (U, K)."""
    prior = error_prior(n_levels) if prior is None else np.asarray(prior, dtype=np.float64)
    if prior.ndim == 1:
        prior = prior[None, :]
    if prior.shape not in ((1, n_levels), (n_units, n_levels)) or not np.isfinite(prior).all():
        raise ValueError(f"The error prior must be finite, of shape ({n_levels},) or ({n_units}, {n_levels}); "
                         f"got {prior.shape}.")
    return prior


def spdy_search(
    evaluate: Callable[[np.ndarray], float],
    times: np.ndarray,
    budget_ms: float,
    *,
    num_random_inits: int = 100,
    patience: int = 100,
    neighbourhood_fraction: float = 0.1,
    max_candidates: int | None = None,
    buckets: int = 10_000,
    seed: int = 0,
    prior: np.ndarray | None = None,
    subsets: Mapping[str, np.ndarray] | None = None,
    allowed: np.ndarray | None = None,
    keep_top: int = 1,
    starts: Sequence[np.ndarray] | None = None,
    only_starts: bool = False,
    progress: bool = True,
    evaluate_many: Callable[[list[np.ndarray]], list[float]] | None = None,
    width: int = 1,
) -> SearchResult:
    """SPDY's search: random sensitivities first, then local search with a shrinking neighbourhood.

    Each candidate c in [0, 1]^U becomes a profile through the DP with costs c_u * e(k) (or c_u * e_u(k) with a
    per-unit prior of shape (U, K), such as measured errors); `evaluate(profile)` returns its score (lower is
    better). `max_candidates` and `subsets`: see the module docstring. `allowed` (U, K), bool: the only levels
    any candidate may take (`bounded_levels`); the result's `allowed` keeps to it. `keep_top`: how many of the best
    distinct profiles the result lists (`SearchResult.top`), for a selection on other windows. `starts`: sensitivity
    vectors tried first, each in every level space (`max_candidates` counts them); `only_starts`: no random starts
    after them, and the local search begins at neighbourhood size 1.

    `evaluate_many(profiles)` scores up to `width` profiles at once (processes scoring side by side): when a candidate
    needs a score, the next candidates the search would try if this one does not improve are scored with it. The
    search still takes its steps one candidate at a time, each from the best so far: a score taken ahead is used
    only when a candidate reaches it, so the result is the one-at-a-time search's, for any width.
    """
    times = np.asarray(times, dtype=np.float64)
    if allowed is not None:
        times = np.where(allowed, times, np.inf)
    n_units, n_levels = times.shape
    prior = _unit_prior(prior, n_units, n_levels)
    starts = None if starts is None else [np.asarray(c, dtype=np.float64) for c in starts]
    if starts is not None and (not starts or any(c.shape != (n_units,) for c in starts)):
        raise ValueError(f"Search starts must be one or more sensitivity vectors of shape ({n_units},).")
    only_starts = only_starts and starts is not None
    if not only_starts and max_candidates is not None and max_candidates < num_random_inits:
        raise ConfigError(f"search.max_candidates ({max_candidates}) must be at least search.num_random_inits "
                          f"({num_random_inits}): the random starts count toward it. Raise it, or set it to null.")
    spaces = _level_spaces(times, budget_ms, buckets, subsets)
    rng = np.random.default_rng(seed)
    scores: dict[tuple[int, ...], float] = {}
    # the sensitivities that first produced each profile, and the level space they were solved in
    origin: dict[tuple[int, ...], tuple[np.ndarray, int]] = {}
    if evaluate_many is None:
        def evaluate_many(profiles: list[np.ndarray]) -> list[float]:
            return [evaluate(p) for p in profiles]
    spare: dict[tuple[int, ...], float] = {}  # scores taken ahead of their candidate's turn
    solved: dict[tuple[bytes, int], np.ndarray | None] = {}  # DP solutions of candidates looked at ahead

    def solve(c: np.ndarray, space: int) -> np.ndarray | None:
        key = (c.tobytes(), space)
        if key not in solved:
            solved[key] = solve_dp(c[:, None] * prior, spaces[space][1], budget_ms, buckets)
        return solved[key]

    def score_of(profile: np.ndarray, c: np.ndarray, space: int, ahead: Callable[[], Iterator]) -> float:
        key = tuple(int(k) for k in profile)
        if key not in scores:
            if key not in spare:
                score_with_ahead(profile, ahead)
            scores[key] = spare.pop(key)
            origin[key] = (c, space)
        return scores[key]

    def score_with_ahead(profile: np.ndarray, ahead: Callable[[], Iterator]) -> None:
        """Scores `profile` and, beside it, the next new profiles `ahead` gives, up to `width` in all."""
        batch, keys = [profile], {tuple(int(k) for k in profile)}
        for c, space in ahead() if width > 1 else ():
            if len(batch) >= width:
                break
            nxt = solve(c, space)
            if nxt is None:
                break
            key = tuple(int(k) for k in nxt)
            if key not in scores and key not in spare and key not in keys:
                batch.append(nxt)
                keys.add(key)
        for p, score in zip(batch, evaluate_many(batch)):
            spare[tuple(int(k) for k in p)] = float(score)

    best_c, best_profile, best_score, best_space, history = None, None, np.inf, 0, []
    k = 1 if only_starts else max(1, int(round(neighbourhood_fraction * n_units)))
    first = (0 if only_starts else num_random_inits) + (0 if starts is None else len(starts) * len(spaces))
    cap = np.inf if max_candidates is None else max_candidates
    bar = tqdm(desc="SPDY search", unit="cand", disable=not progress, total=int(min(cap, first + k * patience)))
    candidates, cut_short, schedule = 0, False, []  # schedule: (neighbourhood size, candidates tried at it)

    def consider(c: np.ndarray, space: int, ahead: Callable[[], Iterator] = lambda: iter(())) -> bool:
        """Tries one candidate; `ahead`: the candidates after it, as they will be if it does not improve."""
        nonlocal best_c, best_profile, best_score, best_space, candidates
        profile = solve(c, space)
        solved.clear()  # what was solved ahead was solved from this state: kept only until the next candidate
        if profile is None:  # whether a profile fits depends on the times only: the first candidate tells
            bar.close()
            raise NoProfileFitsError(budget_ms, float(times.min(axis=1).sum()), buckets)
        score = score_of(profile, c, space, ahead)
        candidates += 1
        improved = score < best_score
        if improved:
            best_c, best_profile, best_score, best_space = c, profile, score, space
        history.append(best_score)
        bar.update(1)
        bar.set_postfix(best=f"{best_score:.4g}", k=k, evals=len(scores))
        return improved

    # every candidate's random draws are made in the order a one-at-a-time search makes them; a step drawn ahead of
    # its turn is one the search is sure to take (the random starts; at a neighbourhood size, as many as the patience
    # and the candidate bound leave), so the draws, and with them the search, do not depend on `width`
    if starts is not None:  # another search's sensitivities, each solved in every level space for this budget
        given = [(c, space) for c in starts for space in range(len(spaces))]
        for i, (c, space) in enumerate(given):
            consider(c.copy(), space, lambda i=i: iter(given[i + 1:]))
    inits = [rng.random(n_units) for _ in range(0 if only_starts else num_random_inits)]

    def init_space(i: int) -> int:
        # without subsets there is one space and this is SPDY's search as published
        return i % len(spaces) if 2 * i < num_random_inits or best_c is None else best_space

    for i, c in enumerate(inits):
        consider(c, init_space(i), lambda i=i: ((inits[j], init_space(j)) for j in range(i + 1, len(inits))))
    if best_c is None:
        bar.close()
        raise NonFiniteScoreError(candidates)

    def mutated(base: np.ndarray, draw: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        c = base.copy()
        c[draw[0]] = draw[1]
        return c

    while k >= 1:
        failures = 0
        # this size's end under the bound: an equal share of what is left to the k sizes left
        share = np.inf if max_candidates is None else candidates + (max_candidates - candidates) // k
        start = candidates
        while failures < patience and candidates < share:
            sure = int(min(patience - failures, share - candidates))  # the candidates this size certainly tries
            draws = [(rng.choice(n_units, size=k, replace=False), rng.random(k)) for _ in range(sure)]
            for j, draw in enumerate(draws):
                def ahead(rest=draws[j + 1:]) -> Iterator:
                    return ((mutated(best_c, d), best_space) for d in rest)

                failures = 0 if consider(mutated(best_c, draw), best_space, ahead) else failures + 1
                # an improvement restarts the patience count, so the end moves: keep the bar's total honest
                bar.total = int(min(cap, candidates + (patience - failures) + (k - 1) * patience))
                bar.refresh()
        cut_short = cut_short or failures < patience
        schedule.append((k, candidates - start))
        k -= 1
    bar.close()
    name, _, subset_mask = spaces[best_space]
    if subset_mask is not None:
        allowed = subset_mask if allowed is None else subset_mask & allowed
    logger.info("SPDY search: %d candidates, %d distinct profiles scored, best score %.6g%s%s.", candidates,
                len(scores), best_score, f" among the {name} levels" if name else "",
                " (stopped by search.max_candidates)" if cut_short else "")
    # the best profiles of the best one's level space (a re-aim keeps to that space's levels)
    ranked = sorted((key for key in scores if origin[key][1] == best_space), key=scores.get)[:max(1, keep_top)]
    top = [(np.array(key, dtype=np.int64), origin[key][0], scores[key]) for key in ranked]
    return SearchResult(profile=best_profile, sensitivities=best_c, score=best_score, candidates=candidates,
                        evaluations=len(scores), history=history, cut_short=cut_short, schedule=schedule,
                        subset=name, allowed=allowed, top=top,
                        started_from=_started_from(starts, only_starts), unused_scores=len(spare))


def _started_from(starts, only_starts: bool) -> str:
    if starts is None:
        return "random"
    earlier = f"{len(starts)} earlier search{'es' if len(starts) > 1 else ''}"
    return earlier if only_starts else f"random and {earlier}"


def bounded_levels(times: np.ndarray, budget_ms: float, ratio: float, buckets: int = 10_000
                   ) -> tuple[np.ndarray, float]:
    """The levels a unit may take when no unit may lose more than `ratio` times the share of time the budget takes
    from all of them (the dense times' sum): (U, K) bool, and the largest share of its own time one unit may lose.
    Where the levels are too coarse for that bound to reach the budget, the share is widened until it does."""
    times = np.asarray(times, dtype=np.float64)
    dense = times[:, :1]
    need = max(0.0, 1.0 - budget_ms / float(dense.sum()))
    with np.errstate(divide="ignore", invalid="ignore"):
        saving = np.where(dense > 0, 1.0 - times / dense, 0.0)  # (U, K) share of its own time a level removes
    cap = min(1.0, ratio * need)
    while True:
        allowed = saving <= cap + 1e-9
        allowed[:, 0] = True
        if cap >= 1.0 or solve_dp(np.zeros_like(times), np.where(allowed, times, np.inf), budget_ms,
                                  buckets) is not None:
            return allowed, cap
        cap = min(1.0, cap + 0.05)


def _level_spaces(times: np.ndarray, budget_ms: float, buckets: int, subsets: Mapping[str, np.ndarray] | None
                  ) -> list[tuple[str | None, np.ndarray, np.ndarray | None]]:
    """(name, times with the other levels unrunnable, mask) of every level and of each subset that can reach
    the budget; every level first."""
    spaces = [(None, times, None)]
    for name, mask in (subsets or {}).items():
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != times.shape:
            raise ValueError(f"Level subset {name!r} has shape {mask.shape}; the times have {times.shape}.")
        restricted = np.where(mask, times, np.inf)
        if solve_dp(np.zeros_like(times), restricted, budget_ms, buckets) is None:
            logger.info("The %s levels alone cannot reach the budget; not searched on their own.", name)
            continue
        spaces.append((name, restricted, mask))
    return spaces
