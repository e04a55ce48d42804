"""The verify stage: the chosen profile measured end to end, and corrected when the measurement misses the target.

A measured miss is measured a second time before anything changes (one noisy moment of a busy machine should not
cost quality). A confirmed miss means the latency table rated the profile too fast: the DP is re-solved, with the
search's costs, for an aim raised by the shortfall (no new search), up to `search.verify_corrections` times.

A confirmed overshoot costs quality the user did not ask to pay: on a noisy machine the search margin is raised to
the table's timing noise (13 % on one VM), and a table that under-predicts the deployed model adds to it, so a
"1.25x" SmolLM2 job delivered 1.53x at four times the dense perplexity where the structured 1.28x profile had twice
it. So a measured speedup above the target by more than `search.verify_overshoot` re-solves the DP once for an aim
lowered by the overshoot (the table's error on this profile taken out, the configured margin kept). A lower
profile that misses (measured twice) is re-aimed up by its shortfall, below the aim that met the target, while
corrections are left (each re-aim counts as one of `search.verify_corrections`); if the last one still misses,
the profile that met the target comes back.

A measurement taken while the machine is busy is worth nothing, in either direction: with one core kept busy the
dense MiniLM took 610 ms instead of 17, and re-aiming on such figures pruned to 2.9x for a 1.5x target. So a
measurement whose dense time exceeds `timing.busy_factor` (1.5; this VM drifts by ~20 %) times the dense time the
latency table holds is taken again after a pause (up to `timing.attempts` times); one that stays busy re-aims
nothing and counts as not met.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from ..config import SPDYConfig
from ..families import Databases, Family, Measurement, Plan
from ..latency.backend import verify_unavailable
from ..search import Budget, Budgets, SearchOutcome, compute_budget, solve_dp
from .quality import is_causal_lm

logger = logging.getLogger(__name__)

BUSY_PAUSE_S = 10.0  # seconds to wait before measuring a busy machine again, times the attempt


@dataclass(frozen=True)
class Verification:
    """What the verify stage hands on: the final profile (stitched) and its measurement (None where it was skipped)."""

    profile: np.ndarray
    measurement: Measurement | None
    skipped: str | None = None  # why nothing was measured
    corrections: list[dict] = field(default_factory=list)
    busy: dict | None = None  # the dense times (now, profiled) when every measurement found the machine busy


def verify(config: SPDYConfig, family: Family, plan: Plan, databases: Databases, budgets: Budgets,
           outcome: SearchOutcome) -> Verification:
    """Measures the stitched profile; re-aims and re-stitches it (`outcome.live`) while a confirmed miss leaves
    corrections."""
    skipped = verify_unavailable(config.backend, family.model)
    if skipped is not None:
        return Verification(profile=outcome.result.profile, measurement=None, skipped=skipped)
    result = outcome.result
    # a re-aim keeps to the levels the profile was searched among, with the search's costs
    times = plan.times if result.allowed is None else np.where(result.allowed, plan.times, np.inf)
    aims = Reaim(config, times, result.sensitivities[:, None] * np.asarray(outcome.prior), budgets.target,
                 plan.reference_ms)
    aim, profile = budgets.search.target_speedup, result.profile
    met = None  # (profile, measurement, aim) that met the target, kept while lower profiles are tried

    def measure(profile):
        return measure_when_quiet(config, family, plan, databases, profile)

    while True:
        measurement, busy = measure(profile)
        lowered_miss = met is not None and measurement.speedup < config.target_speedup
        if busy is None and (lowered_miss or needs_confirmation(config, measurement.speedup, aims.corrections)):
            measurement, busy = measure(profile)
        if busy is not None:
            break
        # a miss aims higher; below a profile that met the target, no higher than that profile's aim
        step = aims.up(profile, aim, measurement.speedup, below=None if met is None else met[2])
        if step is None and met is None:
            step = aims.down(profile, aim, measurement.speedup)
            if step is not None:
                met = (profile, measurement, aim)
        if step is None:
            break
        aim, profile = step
        outcome.live(profile)
    out = Verification(profile=profile, measurement=measurement, corrections=aims.corrections, busy=busy)
    return out if met is None else keep_lower(config, outcome, out, met)


def keep_lower(config: SPDYConfig, outcome: SearchOutcome, out: Verification,
               met: tuple[np.ndarray, Measurement, float]) -> Verification:
    """After a re-aim down: keeps the last lower profile if it met the target on a quiet machine, else stitches back
    the profile that met it (with its measurement); the down correction records which."""
    kept = out.busy is None and out.measurement.speedup >= config.target_speedup
    down = next(c for c in out.corrections if c.get("direction") == "down")
    down["kept"] = kept
    if kept:
        return out
    logger.info("The lowered profile measured %.3fx%s, short of the target %.3gx: keeping the profile that measured "
                "%.3fx.", out.measurement.speedup, " on a busy machine" if out.busy else "", config.target_speedup,
                met[1].speedup)
    down["lowered_measured_speedup"] = out.measurement.speedup
    outcome.live(met[0])
    return dataclasses.replace(out, profile=met[0], measurement=met[1], busy=None)


def measure_when_quiet(config: SPDYConfig, family: Family, plan: Plan, databases: Databases, profile: np.ndarray
                       ) -> tuple[Measurement, dict | None]:
    """`family.measure(...)` of `profile`, taken again after a pause while the dense model runs more than
    `timing.busy_factor` times slower than when profiled; returns the last measurement and, if it is still busy,
    its dense times."""
    factor = config.timing.busy_factor
    for attempt in range(1, config.timing.attempts + 1):
        m = family.measure(plan, databases, profile)
        if not factor or m.dense_ms <= factor * plan.base_ms:
            return m, None
        if attempt < config.timing.attempts:
            logger.warning("The dense model measured %.3f ms now and %.3f ms when profiled: the machine is busy. "
                           "Waiting %.0f s before measuring again (attempt %d of %d).", m.dense_ms, plan.base_ms,
                           BUSY_PAUSE_S * attempt, attempt, config.timing.attempts)
            time.sleep(BUSY_PAUSE_S * attempt)
    logger.warning("The machine stayed busy while verifying (the dense model measured %.3f ms, %.3f ms when "
                   "profiled): the measured speedup cannot be trusted, the profile is kept as searched, and the "
                   "target counts as not met.", m.dense_ms, plan.base_ms)
    return m, {"dense_ms_now": m.dense_ms, "dense_ms_profiled": plan.base_ms}


def both_regimes(config: SPDYConfig, family: Family, plan: Plan, databases: Databases, verification: Verification
                 ) -> dict | None:
    """For a causal LM, the measured speedup of the final profile in prefill and in decode (the regime that was not
    searched is measured here: batch_size x sequence_length for prefill, a cache of context_length for decode);
    None for other models or when nothing could be measured."""
    m = verification.measurement
    if m is None or verification.busy is not None or not is_causal_lm(family.model):
        return None
    searched = config.regime
    other = dataclasses.replace(searched, mode="prefill" if searched.mode == "decode" else "decode")
    o = family.measure(plan, databases, verification.profile, other)
    logger.info("Measured speedup in the %s regime (not searched): %.3fx.", other.mode, o.speedup)
    return {searched.mode: {"regime": searched.to_dict(), "measured_speedup": m.speedup, "searched": True},
            other.mode: {"regime": other.to_dict(), "measured_speedup": o.speedup, "searched": False,
                         "dense_time_ms": o.dense_ms, "pruned_time_ms": o.pruned_ms}}


def needs_confirmation(config: SPDYConfig, measured: float, corrections: list[dict]) -> bool:
    """Whether a measured miss should be measured again before the profile is re-aimed: a re-aim costs quality,
    and one noisy moment of a busy machine should not cause it. The second measurement is the one that counts."""
    if measured >= config.target_speedup or len(corrections) >= config.search.verify_corrections:
        return False
    logger.info("Measured %.3fx < target %.3gx: measuring again to confirm before re-aiming.", measured,
                config.target_speedup)
    return True


@dataclass
class Reaim:
    """Verify's corrections: the DP re-solved with the search's `costs` on `times` (the levels the profile was
    searched among) for a new aim, no new search; each correction is recorded in `corrections`, and
    `search.verify_corrections` bounds how many there are. `budget` is the target's; `reference_ms` as in
    `compute_budget`."""

    config: SPDYConfig
    times: np.ndarray
    costs: np.ndarray
    budget: Budget
    reference_ms: float | None = None
    corrections: list[dict] = field(default_factory=list)

    def up(self, profile: np.ndarray, aim: float, measured: float, below: float | None = None
           ) -> tuple[float, np.ndarray] | None:
        """A miss: if the measured speedup misses the target and corrections are left, the table rated the profile
        too fast, so aim higher by the shortfall, as far as the model can go (`below`: under that aim, whose
        profile met the target). Returns (new aim, new profile), or None."""
        config = self.config
        if measured >= config.target_speedup or len(self.corrections) >= config.search.verify_corrections:
            return None
        reachable = compute_budget(self.times, self.budget.base_ms, aim,
                                   reference_ms=self.reference_ms).max_reachable_speedup
        new_aim = min(aim * (config.target_speedup / measured) * 1.01, reachable)  # `times` may keep to a subset
        if new_aim <= aim or (below is not None and new_aim >= below):
            return None
        new_profile = self.resolve(profile, aim, new_aim, measured, "up")
        if new_profile is None:
            return None
        logger.info("Measured %.3fx < target %.3gx (predicted %.3fx): re-aiming the profile at %.3fx.",
                    measured, config.target_speedup, self.corrections[-1]["predicted_speedup"], new_aim)
        return new_aim, new_profile

    def down(self, profile: np.ndarray, aim: float, measured: float) -> tuple[float, np.ndarray] | None:
        """An overshoot: if the measured speedup exceeds the target by more than `search.verify_overshoot` and
        corrections are left, aim lower so that the profile would measure target x (1 + search.speedup_margin / 2),
        the middle of the window a delivered speedup should land in, taking the table's error on this profile as it
        was measured. Once per job; returns (new aim, new profile),
        or None."""
        config = self.config
        overshoot = config.search.verify_overshoot
        if overshoot is None or measured <= config.target_speedup * (1 + overshoot) \
                or len(self.corrections) >= config.search.verify_corrections \
                or any(c.get("direction") == "down" for c in self.corrections):
            return None
        new_aim = aim * config.target_speedup * (1 + config.search.speedup_margin / 2) / measured
        if new_aim >= aim:
            return None
        new_profile = self.resolve(profile, aim, new_aim, measured, "down")
        if new_profile is None:
            return None
        logger.info("Measured %.3fx, more than %.0f%% above the target %.3gx (predicted %.3fx): re-aiming the profile "
                    "lower, at %.3fx.", measured, 100 * overshoot, config.target_speedup,
                    self.corrections[-1]["predicted_speedup"], new_aim)
        return new_aim, new_profile

    def resolve(self, profile: np.ndarray, aim: float, new_aim: float, measured: float, direction: str
                ) -> np.ndarray | None:
        """The DP re-solved for `new_aim`; records the correction and returns the new profile, or None (and records
        nothing) where the DP finds none or the same profile."""
        target = compute_budget(self.times, self.budget.base_ms, new_aim, reference_ms=self.reference_ms)
        new_profile = solve_dp(self.costs, self.times, target.budget_ms, self.config.search.dp_buckets)
        if new_profile is None or list(new_profile) == list(profile):
            return None
        predicted = self.budget.predicted_speedup(self.times[np.arange(len(profile)), profile])
        self.corrections.append({"measured_speedup": measured, "predicted_speedup": predicted, "aim": aim,
                                 "new_aim": new_aim, "direction": direction})
        return new_profile


def verify_summary(config: SPDYConfig, plan: Plan, budgets: Budgets, verification: Verification) -> dict:
    """Logs the verify outcome (a warning when the target is missed by more than 5 %) and returns the report's
    speedup entries."""
    profile, budget = verification.profile, budgets.target
    predicted = budget.predicted_speedup(plan.times[np.arange(len(profile)), profile])
    m = verification.measurement
    dense_ms, pruned_ms = (None, None) if m is None else (m.dense_ms, m.pruned_ms)
    measured = None if verification.skipped else m.speedup
    if measured is None:
        logger.warning("Predicted speedup %.3fx, not verified: %s", predicted, verification.skipped)
    else:
        logger.info("Predicted speedup %.3fx, measured %.3fx (dense %.3f ms, pruned %.3f ms).",
                    predicted, measured, dense_ms, pruned_ms)
        if not target_met(config, measured) and verification.busy is None:
            logger.warning(
                "Measured speedup %.3fx falls short of the target %.3gx by more than %.0f%% (search.target_tolerance): "
                "the latency table may be stale or the machine busy. Re-measure the table on an idle machine (delete "
                "its cache file).", measured, config.target_speedup, 100 * config.search.target_tolerance)
    return {
        "target_speedup": config.target_speedup,
        "predicted_speedup": predicted,
        "measured_speedup": measured,
        "target_met": None if measured is None else verification.busy is None and target_met(config, measured),
        "verify_busy": verification.busy,
        "verify_corrections": verification.corrections,
        "dense_time_ms": dense_ms,
        "pruned_time_ms": pruned_ms,
        "verify_skipped": verification.skipped,
    }


def target_met(config: SPDYConfig, measured: float) -> bool:
    """Whether a measured speedup meets the target, allowing `search.target_tolerance` of timing noise."""
    return measured >= config.target_speedup * (1 - config.search.target_tolerance)
