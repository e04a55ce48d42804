"""SPDY's pipeline, once for every level family:

    profile -> budget -> database -> search -> verify -> recovery -> result

profile: the family's search units and the times of their levels (latency table). budget: what the target leaves
for the searched units; an unreachable target stops here, before any costly stage. database: the pruned weights
of every level. search: SPDY's DP and local search over sensitivities, each candidate stitched into the live model
and scored against the dense model. verify: the chosen profile timed end to end, re-aimed on a confirmed miss or a
large overshoot. recovery (when `recovery.method` resolves to one): the remaining weights of the profile verify
settled on fitted to the dense model's outputs on the calibration windows, the profile's zeros held, so the
measured speedup stays what verify measured; recovery runs once, on the final profile. result: the pruned model
(dense weights with zeros), its profile and the report, merged from the entries each stage's artifact gives.

The family (`spdy_hf.families`) does everything that depends on what a unit is; each stage hands the next a frozen
artifact (`Plan`, `Budgets`, `Databases`, `SearchOutcome`, `RecoveryRecord`, `Verification`); this module only
orders the stages.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence

import numpy as np

from ..config import SPDYConfig
from ..errors import UnreachableTargetError
from ..families import Databases, Plan, family_for
from ..modeling.snapshot import DenseSnapshot
from ..modeling.units import find_units
from ..output.result import PruningResult
from ..recovery import recovery_stage
from ..recovery.fit import planned_method
from ..search import Budgets, SearchOutcome, compute_budget, fits, run_search, with_margin
from ..utils.processes import Processes, current_processes
from .job import Job
from .quality import HeldOutQuality
from .report import merge_report
from .verify import both_regimes, verify, verify_summary

logger = logging.getLogger(__name__)


def run_pipeline(job: Job) -> PruningResult | None:
    """Every stage in order, for `job.config.family` and its one target; the model is pruned in place. None in the
    helping processes of a spread job (`spdy_hf.utils.processes`): the main process returns the result.

    Raises:
        UnreachableTargetError: the target cannot be met; raised after profiling, before any other stage.
    """
    targets = run_targets(job, [job.config.target_speedup])
    try:
        return next(targets, None)
    finally:
        targets.close()  # the dense snapshot's files go now


def run_targets(job: Job, targets: Sequence[float]) -> Iterator[PruningResult]:
    """The pipeline for each target in turn, sharing what does not depend on the target: one profile (latency
    table), one dense held-out reference and, unless the family anchors it at the target (`database_per_target`),
    one database. Each target after the first tries the earlier searches' best sensitivities first, then runs its
    full search (or, with `search.warm_candidates`, a short one from them). Between targets the dense weights come
    back from a snapshot on disk.

    Each result holds the live model, which the next target prunes again: save, export or copy a result before
    asking for the next one (its model is then marked as gone, `PruningResult.superseded`).

    Spread over the processes of `accelerate launch` (`spdy_hf.utils.processes`), every process builds the database
    and searches, sharing the work; the main process alone profiles, verifies, recovers and yields the results (the
    others yield none).

    Raises:
        UnreachableTargetError: a target cannot be met; raised after profiling, before any other stage.
    """
    config, model, stages = job.config, job.model, job.stages
    configs = [dataclasses.replace(config, target_speedup=float(t)) for t in targets]
    several = len(configs) > 1
    family = family_for(config)(config, model, job.progress)
    processes = current_processes(cuda=config.backend == "cuda")
    # the dense weights, for recovery's teacher (the main process recovers) and, with several targets, to start each
    # one from (on disk)
    recovers = processes.is_main and planned_method(config, model) != "none"
    snapshot = DenseSnapshot(model) if several or recovers else None
    try:
        with stages("profile"), processes.timing():
            plan = profile_stage(family, find_units(model, config.skip_modules, example_inputs=job.example_inputs()),
                                 job.latency_table, processes)
        budgets = [check_budget(c, plan) for c in configs]  # every target, before any costly stage
        quality = None
        if job.heldout is not None and processes.is_main:  # the dense model's, before anything is stitched into it
            with stages("heldout"):
                quality = HeldOutQuality(model, job.heldout, config.evaluation.source)
        shared = None
        if not family.database_per_target:
            with stages("database"):
                shared = family.build_database(plan, job.windows, budgets[0])
        starts: list[np.ndarray] = []  # the earlier targets' best sensitivities
        previous = None
        for index, (target_config, target_budgets) in enumerate(zip(configs, budgets)):
            target = dataclasses.replace(job, config=target_config, stages=stages.branch()) if several else job
            if index > 0:  # the last target's result is done with: start again from the dense model
                processes.barrier()  # in a spread job the others wait here while the main process times and recovers
                if previous is not None:
                    previous.superseded = True
                with target.stages("restore"):
                    snapshot.restore(model)
            previous, outcome = prune_to_target(target, family, plan, target_budgets, shared, snapshot, quality,
                                                starts or None)
            starts.append(outcome.result.sensitivities)
            if previous is None:  # a helping process of a spread job: the main process finishes the target
                continue
            if several:
                previous.report["run"] = {"targets": [c.target_speedup for c in configs], "index": index,
                                          "shared_stages": ["profile"] + (["heldout"] if quality else []) +
                                          (["database"] if shared is not None else [])}
            yield previous
    finally:
        if snapshot is not None:
            snapshot.close()


def prune_to_target(job: Job, family, plan: Plan, budgets: Budgets, databases: Databases | None,
                    snapshot: DenseSnapshot | None, quality: HeldOutQuality | None,
                    starts: list[np.ndarray] | None) -> tuple[PruningResult | None, SearchOutcome]:
    """The stages of one target on the dense live model: database (unless given), search, verify, recovery and the
    result; `starts`: sensitivities to start the search from (`run_search`). In a spread job only the main process
    goes on after the search; the others return no result."""
    config, model, stages = job.config, job.model, job.stages
    if databases is None:
        with stages("database"):
            databases = family.build_database(plan, job.windows, budgets)
    with stages("search"):
        outcome = run_search(config, family, plan, databases, budgets, job.windows, job.progress, starts)
    processes = current_processes()
    if not processes.is_main:  # the shared stages are done; the main process verifies, recovers and returns
        return None, outcome

    with stages("verify"), processes.timing():
        verification = verify(config, family, plan, databases, budgets, outcome)
        speedups = both_regimes(config, family, plan, databases, verification)
    recovered = None
    if snapshot is not None and planned_method(config, model) != "none":
        # the profile verify settled on; its zeros are held, so its speed stays measured
        with stages("recovery"):
            profile = verification.profile
            recovered = recovery_stage(config, model, job.windows, snapshot, outcome.scorer,
                                       lambda: family.finalize(plan, databases, profile), quality, job.progress)
    # the score in the reference's dtype (lowered again if the search ran lowered), of the model as returned:
    # recovery's last word where it ran
    if recovered is not None:
        score = recovered.score
    else:
        score = outcome.scorer() if verification.corrections else outcome.score
    heldout = {}
    if quality is not None:
        if recovered is not None:  # recovery compared the recovered model already
            heldout = {"heldout": recovered.heldout}
        else:
            with stages("heldout"):
                heldout = {"heldout": quality.compare(model)}
    entries = family.entries(plan, databases, verification.profile, verification.measurement)
    report = merge_report(
        verify_summary(config, plan, budgets, verification), plan.report(), {"speedups": speedups}, heldout,
        recovered.report() if recovered is not None else {}, entries.report, budgets.report(),
        {"score_dense_vs_pruned": score}, outcome.report(config), databases.report(), job.report())
    result = PruningResult(model=model, tokenizer=job.tokenizer, config=config, units=plan.units,
                           profile=entries.profile, report=report, latency_table=plan.table, groups=entries.groups)
    return result, outcome


def profile_stage(family, units, latency_table, processes: Processes) -> Plan:
    """The family's plan: its search units and their levels' times. In a spread job the main process measures the
    latency table (or reads it) alone, the others waiting, and every process plans from that table."""
    if not processes.spread:
        return family.plan(units, latency_table)
    table = processes.on_main(lambda: family.plan(units, latency_table).table)
    return family.plan(units, table)


def check_budget(config: SPDYConfig, plan: Plan) -> Budgets:
    """The target's budget, and the one the search aims at (raised by `search.speedup_margin` where it can be).

    Raises:
        UnreachableTargetError: no profile meets the target, even with every unit at its fastest level.
    """
    times, buckets = plan.times, config.search.dp_buckets
    budget = compute_budget(times, plan.base_ms, config.target_speedup, reference_ms=plan.reference_ms,
                            names=plan.names)
    logger.info("%d search units (%s family); dense model %.3f ms, searched units %.3f ms; max reachable speedup "
                "%.3fx.", len(plan.names), config.family, budget.base_ms, budget.prunable_ms,
                budget.max_reachable_speedup)
    # the second test: times rounded up to DP buckets may not fit where the true times just do
    if not budget.reachable or not fits(times, budget, buckets):
        raise UnreachableTargetError(config.target_speedup, budget.max_reachable_speedup, config.family)
    margin = config.search.speedup_margin
    if plan.timing_noise is not None and plan.timing_noise > margin:
        logger.warning("The latency table's timing noise, %s, exceeds the search margin (%.1f%%): raising the "
                       "margin to cover it. An idle machine gives a tighter table.", plan.describe_noise(), 100 * margin)
        margin = min(plan.timing_noise, 0.5)
    search = with_margin(times, budget, margin, buckets, reference_ms=plan.reference_ms)
    return Budgets(target=budget, search=search)

