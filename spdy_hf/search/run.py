"""The search stage: SPDY's search run on the live model. Each candidate profile is stitched into the model
(`LiveProfile`) and scored against the dense model (`DistanceScorer`) on the first `search.eval_samples`
calibration windows, in bfloat16 where that is faster; the stage ends with the best profile stitched at the model's
own precision."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from ..config import SPDYConfig
from ..latency.backend import model_device
from ..modeling.units import find_blocks
from ..utils.processes import current_processes
from .lowered import bfloat16_is_faster
from .scoring import DistanceScorer, has_lm_head
from .spdy import SearchResult, bounded_levels, spdy_search
from .stitch import LiveProfile

logger = logging.getLogger(__name__)

LOGITS_BYTES = 64 * 2**20  # the most a scoring pass's float32 logits may take


@dataclass(frozen=True)
class SearchOutcome:
    """What the search stage hands on: the search's result (the best profile, its sensitivities), the DP's prior
    (verify re-solves the DP with both), the scorer (every later score of the job uses it: one reference, one
    dtype), the live profile (the best one, stitched) and the best profile's score."""

    result: SearchResult
    prior: np.ndarray
    scorer: DistanceScorer
    live: LiveProfile
    score: float
    processes: int = 1  # the processes that scored the candidates (`accelerate launch`)

    def report(self, config: SPDYConfig) -> dict:
        """The search's entries of the report; the scorer's counts include every score taken since the search."""
        result, scorer = self.result, self.scorer
        return {"score_kind": scorer.kind,
                "search": {"candidates": result.candidates, "evaluations": result.evaluations,
                           "max_candidates": config.search.max_candidates if "random" in result.started_from
                           else config.search.warm_candidates, "cut_short": result.cut_short,
                           "started_from": result.started_from,
                           "schedule": [[k, n] for k, n in result.schedule], "levels": result.subset or "all",
                           "selection": result.selection,
                           "improvements": [[i, score] for i, score in result.improvements()],
                           "score_dtype": dtype_name(scorer.dtype), "blocks_run": scorer.blocks_run,
                           "blocks_full": scorer.blocks_full,
                           **({"processes": self.processes, "unused_scores": result.unused_scores}
                              if self.processes > 1 else {})}}


def run_search(config: SPDYConfig, family, plan, databases, budgets, windows: dict[str, torch.Tensor],
               progress: bool = True, starts: list[np.ndarray] | None = None) -> SearchOutcome:
    """The search stage for `family`'s `plan` and `databases`, aiming at `budgets.search`; the best profile is
    stitched into the live model when it returns. `starts`: other targets' best sensitivities, tried first (with
    `search.warm_candidates`, the only starting points of a search that many candidates long)."""
    prior = family.prior(plan, databases)
    live = LiveProfile(family, plan, databases)
    low = score_dtype(config)
    with live.lowered(low) as running:  # candidates scored in bfloat16 where that is faster
        if low is not None and running != low:
            logger.warning("search.score_dtype asks for %s, but only a float32 model on the CPU is lowered for "
                           "the search: candidates are scored in the model's own %s.", dtype_name(low),
                           dtype_name(running))
        result, scorer = search_profile(config, family.model, windows, plan.times, budgets.search.budget_ms, prior,
                                        live, progress, plan.names, family.level_subsets(plan),
                                        cut_bound(config, plan.times, budgets.search.budget_ms), starts)
        live(result.profile)
        score = scorer()
    processes = current_processes()
    if processes.spread:  # the block passes every process ran, in the main process's report
        counts = processes.gather((scorer.blocks_run, scorer.blocks_full))
        scorer.blocks_run, scorer.blocks_full = (sum(c[0] for c in counts), sum(c[1] for c in counts))
    return SearchOutcome(result=result, prior=prior, scorer=scorer, live=live, score=score,
                         processes=processes.size)


def scoring_batch_size(model: nn.Module, requested: int, length: int) -> int:
    """`search.eval_batch_size`, lowered for a language model so that one pass's float32 logits stay within
    `LOGITS_BYTES` (SmolLM2's 49 k vocabulary: 25 MB per 128-token window, so 2 windows a pass, not 8)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not has_lm_head(model) or not isinstance(vocab, int) or vocab <= 0:
        return requested
    return max(1, min(requested, LOGITS_BYTES // (4 * vocab * max(length, 1))))


def search_profile(config: SPDYConfig, model: nn.Module, windows: dict[str, torch.Tensor], times: np.ndarray,
                   budget_ms: float, prior: np.ndarray | None, stitch, progress: bool = True,
                   names: list[str] | None = None, subsets: dict[str, np.ndarray] | None = None,
                   allowed: np.ndarray | None = None, starts: list[np.ndarray] | None = None
                   ) -> tuple[SearchResult, DistanceScorer]:
    """SPDY's search with the config's settings: each candidate profile is stitched into the live model (`stitch`)
    and scored against the dense model on the first `search.eval_samples` calibration windows, the blocks before
    the first one it changes not run again (`names`: the search units, to tell their blocks; `subsets`: the
    family's kinds of level, each also searched on its own, `spdy_search`; `allowed`: the only levels a candidate may
    take, `cut_bound`; `starts`: sensitivities to start from, `spdy_search`). Returns the
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

    short = starts is not None and s.warm_candidates is not None  # a short search from the starts alone
    processes = current_processes()  # under `accelerate launch`, each process scores its share of the candidates
    result = spdy_search(evaluate, times, budget_ms, num_random_inits=s.num_random_inits, patience=s.patience,
                         neighbourhood_fraction=s.neighbourhood_fraction,
                         max_candidates=s.warm_candidates if short else s.max_candidates,
                         buckets=s.dp_buckets, seed=s.seed, prior=prior, subsets=subsets, allowed=allowed,
                         keep_top=s.select_top, starts=starts, only_starts=short, progress=progress,
                         evaluate_many=lambda profiles: processes.map(evaluate, profiles), width=processes.size)
    if len(result.top) > 1:
        result = select_on_unseen(result, model, windows, stitch, s.eval_samples, s.select_samples, size, s.score)
    return result, scorer


def select_on_unseen(result: SearchResult, model: nn.Module, windows: dict[str, torch.Tensor], stitch,
                     skip: int, samples: int, batch_size: int, kind: str) -> SearchResult:
    """The second stage of a staged search: the search's best distinct profiles (`result.top`) scored again on
    calibration windows it never scored (after its first `skip`), the best of them there returned as the result.
    Few windows screen many candidates; many windows, unseen by the screening, choose among the few."""
    unseen = {k: v[skip: skip + samples].to(model_device(model)) for k, v in windows.items()}
    n = unseen["input_ids"].shape[0]
    if n == 0:
        logger.warning("search.select_top=%d: the calibration set has no windows past the search's %d; keeping the "
                       "search's best profile. Raise calibration.num_samples.", len(result.top), skip)
        return result
    stitch(np.zeros_like(result.profile))  # level 0 everywhere: the dense model, whose outputs the judge records
    judge = DistanceScorer(model, [{k: v[i:i + batch_size] for k, v in unseen.items()}
                                   for i in range(0, n, batch_size)], kind)

    def judged(profile: np.ndarray) -> float:
        stitch(profile)
        return judge()

    scores = current_processes().map(judged, [profile for profile, _, _ in result.top])
    scored = [(score, profile, c, search_score) for score, (profile, c, search_score) in zip(scores, result.top)]
    best = min(range(len(scored)), key=lambda i: scored[i][0])
    score, profile, c, search_score = scored[best]
    logger.info("Staged selection: %d profiles scored on %d unseen windows; the search's #%d chosen (score %.5g "
                "there, %.5g on the search's windows; the search's best scored %.5g there).", len(scored), n,
                best + 1, score, search_score, scored[0][0])
    return replace(result, profile=profile, sensitivities=c, score=search_score,
                   selection=[[float(s), float(t)] for s, _, _, t in scored])


def cut_bound(config: SPDYConfig, times: np.ndarray, budget_ms: float) -> np.ndarray | None:
    """The levels `search.max_cut_ratio` leaves each unit (`bounded_levels`); None: unbounded."""
    ratio = config.search.max_cut_ratio
    if ratio is None:
        return None
    allowed, cap = bounded_levels(times, budget_ms, ratio, config.search.dp_buckets)
    logger.info("search.max_cut_ratio=%g: no unit loses more than %.0f%% of its time.", ratio, 100 * cap)
    return allowed


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
