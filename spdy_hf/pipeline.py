"""SPDY's pipeline, once for every level family:

    profile -> budget -> database -> search -> recovery -> verify (-> recovery again) -> result

profile: the family's search units and the times of their levels (latency table). budget: what the target leaves
for the searched units; an unreachable target stops here, before any costly stage. database: the pruned weights
of every level. search: SPDY's DP and local search over sensitivities, each candidate stitched into the live model
and scored against the dense model. recovery (when `recovery.method` is not "none"): the remaining weights fitted
to the dense model's outputs on the calibration windows, the profile's zeros held. verify: the chosen profile timed
end to end, re-aimed on a confirmed miss or a large overshoot; a re-aimed profile is recovered afresh from the
dense weights. result: the pruned model (dense weights with zeros), its profile and the report.

The family (`spdy_hf.families`) does everything that depends on what a unit is; this module only orders the stages.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from .backend import model_device
from .config import SPDYConfig
from .environment import environment_info
from .errors import UnreachableTargetError
from .evaluation import HeldOutQuality
from .families import Plan, get_family
from .io import release_free_memory
from .recovery import recovery_stage
from .result import PruningResult
from .scoring import DistanceScorer, has_lm_head
from .search import Budget, SearchResult, compute_budget, fits, spdy_search, with_margin
from .shadow import bfloat16_is_faster, lowered
from .snapshot import DenseSnapshot
from .units import find_blocks, find_units
from .verify import both_regimes, verify, verify_summary

logger = logging.getLogger(__name__)


def peak_rss_mb() -> float | None:
    """The process's peak resident memory so far in MiB (None where the platform does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)  # bytes on macOS, KiB on Linux


class StageTimer:
    """Wall seconds of each stage, for the report; `with stages("name"): ...`. A stage entered twice (held-out
    quality: dense, then pruned) adds up. `peak_mb` holds the process's peak memory when each stage ended, so the
    stage that raised the peak is the first whose value reaches the last."""

    def __init__(self, seconds: dict[str, float] | None = None):
        self.seconds = seconds if seconds is not None else {}
        self.peak_mb: dict[str, float | None] = {"start": peak_rss_mb()}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        logger.info("Stage %s ...", name)
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)
            release_free_memory()  # what the stage freed goes back to the OS before the next one allocates
            self.peak_mb.pop(name, None)  # kept in the order the stages ended
            self.peak_mb[name] = peak_rss_mb()


def run_pipeline(config: SPDYConfig, model: nn.Module, windows: dict[str, torch.Tensor], tokenizer=None,
                 latency_table=None, progress: bool = True, stage_seconds: dict[str, float] | None = None,
                 heldout: dict[str, torch.Tensor] | None = None) -> PruningResult:
    """Every stage in order, for `config.family`; the model is pruned in place.

    Args:
        windows: calibration token windows, `{"input_ids": (N, L), "attention_mask": (N, L)}`.
        latency_table: a `LatencyTable` or its path, instead of the cache or a measurement.
        stage_seconds: a dict the stages' wall seconds are written into as they end (the report has them too).
        heldout: token windows of held-out text: the dense and the pruned model's quality on them (perplexity for
            causal LMs, embedding cosine otherwise) goes into the report.

    Raises:
        UnreachableTargetError: the target cannot be met; raised after profiling, before any other stage.
    """
    family = get_family(config.family)(config, model, progress)
    stages = StageTimer(stage_seconds)
    # the dense weights, for recovery's teacher (on disk, not in memory)
    snapshot = DenseSnapshot(model) if config.recovery.method != "none" else None
    with stages("profile"):
        example = {k: v[:1].to(model_device(model)) for k, v in windows.items()}
        plan = family.plan(find_units(model, config.skip_modules, example_inputs=example), latency_table)
    budget, search_budget = check_budget(config, plan)
    quality = None
    if heldout is not None:  # the dense model's, before anything is stitched into it
        with stages("heldout"):
            quality = HeldOutQuality(model, heldout, config.evaluation.source)
    with stages("database"):
        database_info = family.build_database(plan, windows, budget, search_budget)
    prior = family.prior()
    with stages("search"):
        low = score_dtype(config)
        with lowered(model, low) as running:  # candidates scored in bfloat16 where that is faster
            if low is not None and running != low:
                logger.warning("search.score_dtype asks for %s, but only a float32 model on the CPU is lowered for "
                               "the search: candidates are scored in the model's own %s.", dtype_name(low),
                               dtype_name(running))
            result, scorer = search_profile(config, model, windows, plan.times, search_budget.budget_ms, prior,
                                            family.stitch, progress, plan.names, family.level_subsets())
            family.stitch(result.profile)
            score = scorer()
        family.forget_stitched()  # the float32 weights are back, dense: stitch the profile again
        family.stitch(result.profile)
    recovered = None
    if snapshot is not None:
        with stages("recovery"):
            recovered = recovery_stage(config, family, model, snapshot, result.profile, windows, scorer, quality,
                                       progress)
    with stages("verify"):
        verification = verify(config, family, plan, budget, search_budget, result, prior)
        speedups = both_regimes(config, family, verification)
    if snapshot is not None and verification.corrections:  # another profile: recovered afresh from the dense weights
        with stages("recovery"):
            snapshot.restore(model)
            family.forget_stitched()
            family.stitch(verification.profile)
            recovered = recovery_stage(config, family, model, snapshot, verification.profile, windows, scorer,
                                       quality, progress)
    if snapshot is not None:
        snapshot.close()
    if verification.corrections or recovered is not None:
        score = scorer()  # in the reference's dtype: lowered again if the search ran lowered
    report_quality = {}
    if quality is not None:
        with stages("heldout"):
            report_quality = {"heldout": quality.compare(model)}
    entries = family.entries(verification.profile, verification.measurement)
    report = {**verify_summary(config, plan, budget, search_budget, verification), "timing_noise": plan.timing_noise,
              "timing_noise_kind": plan.timing_noise_kind, "latency_times": plan.latency_times,
              "speedups": speedups, **report_quality, **({"recovery": recovered} if recovered else {}),
              **entries.report,
              **job_summary(config, score, scorer.kind, database_info, budget, search_budget, result, stages)}
    report["search"].update(score_dtype=dtype_name(scorer.dtype), blocks_run=scorer.blocks_run,
                            blocks_full=scorer.blocks_full)
    return PruningResult(model=model, tokenizer=tokenizer, config=config, units=plan.units, profile=entries.profile,
                         report=report, latency_table=plan.table, groups=entries.groups)


def check_budget(config: SPDYConfig, plan: Plan) -> tuple[Budget, Budget]:
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
    search_budget = with_margin(times, budget, margin, buckets, reference_ms=plan.reference_ms)
    return budget, search_budget


LOGITS_BYTES = 64 * 2**20  # the most a scoring pass's float32 logits may take


def scoring_batch_size(model: nn.Module, requested: int, length: int) -> int:
    """`search.eval_batch_size`, lowered for a language model so that one pass's float32 logits stay within
    `LOGITS_BYTES` (SmolLM2's 49 k vocabulary: 25 MB per 128-token window, so 2 windows a pass, not 8)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not has_lm_head(model) or not isinstance(vocab, int) or vocab <= 0:
        return requested
    return max(1, min(requested, LOGITS_BYTES // (4 * vocab * max(length, 1))))


def search_profile(config: SPDYConfig, model: nn.Module, windows: dict[str, torch.Tensor], times: np.ndarray,
                   budget_ms: float, prior: np.ndarray | None, stitch, progress: bool = True,
                   names: list[str] | None = None, subsets: dict[str, np.ndarray] | None = None
                   ) -> tuple[SearchResult, DistanceScorer]:
    """SPDY's search with the config's settings: each candidate profile is stitched into the live model (`stitch`)
    and scored against the dense model on the first `search.eval_samples` calibration windows, the blocks before
    the first one it changes not run again (`names`: the search units, to tell their blocks; `subsets`: the
    family's kinds of level, each also searched on its own, `spdy_search`). Returns the
    `SearchResult` and the scorer (the best profile is not stitched yet)."""
    s = config.search
    device = model_device(model)
    eval_windows = {k: v[: s.eval_samples].to(device) for k, v in windows.items()}
    n, length = eval_windows["input_ids"].shape
    size = scoring_batch_size(model, s.eval_batch_size, length)
    batches = [{k: v[i:i + size] for k, v in eval_windows.items()} for i in range(0, n, size)]
    scorer = DistanceScorer(model, batches, s.score)
    block_of = None if names is None else unit_blocks(names, [name for name, _ in find_blocks(model)])

    def evaluate(profile: np.ndarray) -> float:
        stitch(profile)
        if block_of is None:
            return scorer()
        keys: list[list[int]] = [[] for _ in scorer.blocks]
        for u, level in enumerate(profile):  # a unit outside the blocks counts as changing the first one
            keys[max(block_of[u], 0)].append(int(level) if block_of[u] >= 0 else -1 - int(level))
        return scorer(keys)

    result = spdy_search(evaluate, times, budget_ms, num_random_inits=s.num_random_inits, patience=s.patience,
                         neighbourhood_fraction=s.neighbourhood_fraction, max_candidates=s.max_candidates,
                         buckets=s.dp_buckets, seed=s.seed,
                         prior=prior, subsets=subsets, progress=progress)
    return result, scorer


def score_dtype(config: SPDYConfig) -> torch.dtype | None:
    """The dtype `search.score_dtype` asks candidates to be scored in; None: the model's own. What runs is what
    `lowered` can do with the model (the report names that)."""
    choice = config.search.score_dtype
    if choice == "auto":
        cpu_fp32 = config.backend == "cpu" and config.regime.dtype == "float32"
        choice = "bfloat16" if cpu_fp32 and bfloat16_is_faster() else "float32"
    return getattr(torch, choice) if choice != "float32" or config.regime.dtype == "float32" else None


def dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def unit_blocks(names: list[str], blocks: list[str]) -> list[int]:
    """The index of the block each search unit (a layer, or "<block>:attention") lies in; -1 outside every block."""
    out = []
    for name in names:
        inside = [i for i, b in enumerate(blocks) if name.startswith(b + ".") or name.startswith(b + ":")]
        out.append(max(inside, key=lambda i: len(blocks[i])) if inside else -1)
    return out


def job_summary(config: SPDYConfig, score: float, score_kind: str, database_info: dict, budget: Budget,
                search_budget: Budget, result: SearchResult, stages: StageTimer) -> dict:
    """The report entries every family shares: score, regime, database, budget, search, stages, environment."""
    return {
        "score_dense_vs_pruned": score,
        "score_kind": score_kind,
        "backend": config.backend,
        "regime": config.regime.to_dict(),
        "method": config.method,
        "database": database_info,
        "budget": {"base_ms": budget.base_ms, "prunable_ms": budget.prunable_ms,
                   "constant_ms": budget.constant_ms, "budget_ms": search_budget.budget_ms},
        "search": {"candidates": result.candidates, "evaluations": result.evaluations,
                   "max_candidates": config.search.max_candidates, "cut_short": result.cut_short,
                   "schedule": [[k, n] for k, n in result.schedule], "levels": result.subset or "all",
                   "improvements": [[i, score] for i, score in result.improvements()]},
        "stage_seconds": dict(stages.seconds),
        "stage_peak_rss_mb": dict(stages.peak_mb),
        "environment": environment_info(),
    }
