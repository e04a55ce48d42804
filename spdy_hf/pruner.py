"""`SPDYPruner`: model + calibration data + config -> a pruned model that meets a measured speedup.

Stages, in order: units -> latency table (profile) -> budget check -> pruning database -> SPDY search ->
stitch the chosen weights -> verify the speedup end to end. The pruner owns the model, hooks and timing;
the DP and the search are pure functions it calls.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from .apply import KernelSwap
from .config import SPDYConfig
from .data import load_texts, token_windows
from .database import MagnitudeDatabase, PruningDatabase, build_obs_database
from .environment import environment_info
from .errors import SPDYError, UnreachableTargetError
from .latency import LatencyTable
from .latency.table import cache_key, default_cache_dir
from .levels import get_levels, get_patterns
from .loading import model_fingerprint
from .result import PruningResult
from .scoring import DistanceScorer
from .search import Budget, compute_budget, solve_dp, spdy_search
from .search.spdy import error_prior
from .timing import interleaved_median_ms
from .units import find_units

logger = logging.getLogger(__name__)


class SPDYPruner:
    """Prunes a Hugging Face model to a target end-to-end speedup on the configured backend and regime.

    Args:
        model: the dense model (pruned in place).
        config: the job; `SPDYConfig()` by default.
        tokenizer: turns calibration text into tokens; needed unless token ids are passed to `prune`.

    Example:
        ```python
        >>> from spdy_hf import SPDYConfig, SPDYPruner
        >>> result = SPDYPruner(model, SPDYConfig(target_speedup=1.5), tokenizer=tokenizer).prune()
        >>> result.report["measured_speedup"]
        ```
    """

    def __init__(self, model: nn.Module, config: SPDYConfig | None = None, tokenizer=None):
        self.model = model
        self.config = config if config is not None else SPDYConfig()
        self.tokenizer = tokenizer
        self.stage_seconds: dict[str, float] = {}

    # ------------------------------------------------------------------ public
    def prune(
        self,
        calibration=None,
        latency_table: LatencyTable | str | None = None,
        progress: bool = True,
    ) -> PruningResult:
        """Runs every stage and returns the pruned model (dense weights with zeros) with its profile and report.

        Args:
            calibration: texts, a `datasets.Dataset`, or token windows (`{"input_ids": (N, L) tensor, ...}`); by
                default the config's calibration source (the built-in offline corpus unless set).
            latency_table: a table (or its path) to use instead of measuring; overrides `config.latency_table`.
            progress: show progress bars.

        Raises:
            UnreachableTargetError: the target cannot be met; raised after profiling, before any other stage.
        """
        config = self.config
        model = self.model.eval()
        self._check_model(model)
        self._to_target_device(model)
        data = self._calibration_windows(calibration)
        if config.family != "unstructured":
            from .structured_pruner import prune_structured

            return prune_structured(self, model, data, latency_table, progress)

        with self._stage("profile"):
            example = {k: v[:1].to(self._device(model)) for k, v in data.items()}
            units = find_units(model, config.skip_modules, example_inputs=example)
            levels, patterns = get_levels(config.levels), get_patterns(config.levels)
            table = self._latency_table(model, units, levels, latency_table, progress)
            times = table.times_for(table.keys_for(units))  # (U, K) ms
            budget = compute_budget(times, table.base_time_ms, config.target_speedup,
                                    reference_ms=table.reference_time_ms)
        logger.info("%d units; dense model %.3f ms, searched units %.3f ms; max reachable speedup %.3fx.",
                    len(units), budget.base_ms, budget.prunable_ms, budget.max_reachable_speedup)
        # the second test: times rounded up to DP buckets may not fit where the true times just do
        if not budget.reachable or not _fits(times, budget, config.search.dp_buckets):
            raise UnreachableTargetError(config.target_speedup, budget.max_reachable_speedup)
        search_budget = self._search_budget(times, budget, reference_ms=table.reference_time_ms)

        with self._stage("database"):
            anchor = anchor_level(times, search_budget.budget_ms)
            database, database_info = build_database(config, model, units, levels, data, anchor, progress,
                                                     patterns=patterns)
        prior = None
        if config.search.error_prior == "measured":
            prior = database.errors

        with self._stage("search"):
            result, scorer = search_profile(config, model, data, times, search_budget.budget_ms, prior,
                                            database.stitch, progress)
            profile = result.profile
            database.stitch(profile)
            score = scorer()

        verify_skipped = None
        corrections: list[dict] = []
        aim = search_budget.target_speedup
        with self._stage("verify"):
            def measure():
                if config.backend == "cuda":
                    return self._verify_cuda(model, units, [patterns[k] for k in profile])
                return (*self._verify(model, units, [levels[k] for k in profile], table.layouts_for(units)), None)

            while True:
                dense_ms, deployed_dense_ms, pruned_ms, verify_skipped = measure()
                if verify_skipped:
                    break
                if needs_confirmation(config, dense_ms / pruned_ms, corrections):
                    dense_ms, deployed_dense_ms, pruned_ms, _ = measure()
                measured = dense_ms / pruned_ms
                costs = result.sensitivities[:, None] * (error_prior(times.shape[1])[None, :] if prior is None
                                                         else np.asarray(prior))
                step = reaim(config, times, costs, budget, profile, aim, measured, corrections,
                             reference_ms=table.reference_time_ms)
                if step is None:
                    break
                aim, profile = step
                database.stitch(profile)
            if corrections:
                score = scorer()
        unit_times = times[np.arange(len(units)), profile]
        predicted = budget.predicted_speedup(unit_times)
        speedups = verify_summary(config, budget, search_budget, predicted, dense_ms, pruned_ms, verify_skipped,
                                  corrections)
        measured = speedups["measured_speedup"]

        profile_entries = []
        zeros = total = 0
        for u, (unit, k, t) in enumerate(zip(units, profile, unit_times)):
            n_zero = int(round(levels[k] * unit.numel))
            zeros += n_zero
            total += unit.numel
            profile_entries.append({
                "name": unit.name, "shape": list(unit.shape), "level": int(k), "sparsity": levels[k],
                "pattern": patterns[k],
                "layout": table.layout_of(unit.name),
                "input_leader": table.input_leaders.get(unit.name),
                "dense_time_ms": float(times[u, 0]), "time_ms": float(t),
            })
        report = {
            **speedups,
            # the unpruned model with every unit in the deployed (FastLinear) form: shows how much of the
            # speedup the kernel form gives alone, and how much the sparsity adds on top
            "deployed_dense_time_ms": deployed_dense_ms,
            "measured_speedup_vs_deployed_dense": None if measured is None else deployed_dense_ms / pruned_ms,
            "ineligible_units": [{"name": u.name, "shape": list(u.shape), "reason": table.ineligible[key]}
                                 for u, key in zip(units, table.keys_for(units)) if key in table.ineligible],
            "overall_sparsity": zeros / total,
            "error_prior": config.search.error_prior,
            "num_units": len(units),
            **job_summary(config, score, scorer, database_info, budget, search_budget, result, self.stage_seconds),
        }
        return PruningResult(model=model, tokenizer=self.tokenizer, config=config, units=units,
                             profile=profile_entries, report=report, latency_table=table)

    # ------------------------------------------------------------------ stages
    @contextmanager
    def _stage(self, name: str):
        start = time.perf_counter()
        logger.info("Stage %s ...", name)
        try:
            yield
        finally:
            self.stage_seconds[name] = round(time.perf_counter() - start, 3)

    def _search_budget(self, times: np.ndarray, budget: Budget, reference_ms: float | None = None) -> Budget:
        """The budget the search aims at: the target raised by `search.speedup_margin`, as far as it is reachable.
        `reference_ms` as in `compute_budget`."""
        margin = self.config.search.speedup_margin
        aim = min(budget.target_speedup * (1 + margin), budget.max_reachable_speedup)
        if aim <= budget.target_speedup:
            return budget
        raised = compute_budget(times, budget.base_ms, aim, reference_ms=reference_ms)
        if not _fits(times, raised, self.config.search.dp_buckets):
            return budget
        logger.info("Searching for %.3fx (target %.3gx with a margin of %.0f%% for timing error).",
                    aim, budget.target_speedup, 100 * (aim / budget.target_speedup - 1))
        return raised

    def _max_positions(self) -> int | None:
        """The longest input the model takes, from its config (or a bounded tokenizer limit); None if unbounded."""
        cfg = getattr(self.model, "config", None)
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        if limit is None and self.tokenizer is not None:
            tok_limit = getattr(self.tokenizer, "model_max_length", None)
            if isinstance(tok_limit, int) and tok_limit < 1_000_000:  # transformers' "unset" is ~1e30
                limit = tok_limit
        return limit

    def _calibration_length(self) -> int:
        length = self.config.calibration.sequence_length
        if length is not None:
            return length
        limit = self._max_positions()
        if limit is None:
            raise SPDYError("calibration.sequence_length is not set and the model states no maximum length "
                            "(max_position_embeddings); set calibration.sequence_length (--calibration-length).")
        logger.info("Calibration windows of %d tokens, the model's maximum.", limit)
        return limit

    def _check_model(self, model: nn.Module) -> None:
        limit = self._max_positions()
        for name, length in (("regime.sequence_length", self.config.regime.sequence_length),
                             ("calibration.sequence_length", self.config.calibration.sequence_length)):
            if limit is not None and length is not None and length > limit:
                raise SPDYError(f"{name}={length} exceeds the model's maximum of {limit} positions; lower it.")

    def _calibration_windows(self, calibration) -> dict[str, torch.Tensor]:
        cal = self.config.calibration
        if isinstance(calibration, dict) and not hasattr(calibration, "column_names"):
            if "input_ids" not in calibration:
                raise SPDYError("Calibration windows must be a dict with an 'input_ids' tensor of shape (N, L).")
            windows = dict(calibration)
            windows.setdefault("attention_mask", torch.ones_like(windows["input_ids"]))
        else:
            if self.tokenizer is None:
                raise SPDYError("Calibration text needs a tokenizer: pass SPDYPruner(model, config, tokenizer=...).")
            source = cal.source if calibration is None else calibration
            texts = load_texts(source, dataset_config=cal.dataset_config, split=cal.split,
                               text_column=cal.text_column)
            windows = token_windows(self.tokenizer, texts, cal.num_samples, self._calibration_length(), cal.seed)
        n = windows["input_ids"].shape[0]
        if n < self.config.search.eval_samples:
            logger.info("Scoring candidates on all %d calibration windows (search.eval_samples=%d).",
                        n, self.config.search.eval_samples)
        return windows

    def _regime_inputs(self, model: nn.Module) -> dict[str, torch.Tensor]:
        regime = self.config.regime
        vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 1000
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (regime.batch_size, regime.sequence_length), generator=gen)
        device = self._device(model)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}

    def _latency_table(self, model, units, levels, table, progress: bool) -> LatencyTable:
        config = self.config
        regime = config.regime.to_dict()
        table = table if table is not None else config.latency_table
        if isinstance(table, (str, os.PathLike)):
            table = LatencyTable.load(table)
        patterns = get_patterns(config.levels)
        if table is not None:
            table.check_matches(config.backend, regime, levels, patterns, self._table_environment())
            return table
        fingerprint = model_fingerprint(model)
        key = cache_key(config.backend, regime, levels, fingerprint, self._table_environment())
        path = os.path.join(config.cache_dir or default_cache_dir(), "latency", f"{key}.json")
        if os.path.isfile(path):
            logger.info("Reusing the latency table cached at %s.", path)
            try:
                return LatencyTable.load(path)
            except SPDYError as e:
                logger.warning("Ignoring the unreadable cached latency table %s (%s); measuring again.", path, e)
        if config.backend == "cuda":
            from .latency.cuda import measure_cuda_latency_table

            table = measure_cuda_latency_table(model, units, levels, patterns, config, self._regime_inputs(model),
                                               fingerprint, progress=progress)
        else:
            from .latency.cpu import measure_latency_table

            table = measure_latency_table(model, units, levels, config, self._regime_inputs(model), fingerprint,
                                          progress=progress)
        table.save(path)
        logger.info("Latency table cached at %s.", path)
        return table

    def profile(self, latency_table: LatencyTable | str | None = None, progress: bool = True) -> LatencyTable:
        """Only the profiling stage: the latency table of this model in the config's regime, on its backend
        (measured, or read from the cache); with the structured or mixed family, it holds the structured levels'
        times too. Measure it on the target machine, then pass it (saved with
        `LatencyTable.save`) as `latency_table` to prune anywhere."""
        model = self.model.eval()
        self._check_model(model)
        self._to_target_device(model)
        example = {k: v.to(self._device(model)) for k, v in self._regime_inputs(model).items()}
        units = find_units(model, self.config.skip_modules, example_inputs=example)
        if self.config.family != "unstructured":
            from .structured_pruner import profile_structured

            return profile_structured(self, model, units, latency_table, progress)
        return self._latency_table(model, units, get_levels(self.config.levels), latency_table, progress)

    def _interleaved_timer(self):
        """The backend's interleaved timer, `(functions, warmup, repeats) -> median ms each`: CUDA events on cuda,
        wall clock on cpu."""
        if self.config.backend == "cuda":
            from .latency.cuda import cuda_interleaved_median_ms

            return cuda_interleaved_median_ms
        return interleaved_median_ms

    def _table_environment(self) -> dict:
        if self.config.backend == "cuda":
            from .latency.cuda import cuda_environment

            env = cuda_environment()
            return {k: env.get(k) for k in ("gpu", "capability", "cuda_runtime", "torch", "cusparselt", "driver")
                    if k in env}
        from .environment import table_environment

        return table_environment()

    def _to_target_device(self, model: nn.Module) -> None:
        """The cuda backend runs the model on the GPU in the regime's dtype; without a GPU it stays where it is
        (searching and pruning work anywhere with a table measured on the GPU; verifying does not)."""
        if self.config.backend == "cuda" and torch.cuda.is_available():
            model.to(device="cuda", dtype=getattr(torch, self.config.regime.dtype))

    @staticmethod
    def _device(model: nn.Module) -> torch.device:
        for p in model.parameters():
            return p.device
        return torch.device("cpu")

    @torch.inference_mode()
    def _verify_cuda(self, model, units, patterns) -> tuple[float | None, float | None, float | None, str | None]:
        """Dense vs pruned (2:4 units as semi-structured tensors), interleaved, CUDA events."""
        if not torch.cuda.is_available() or self._device(model).type != "cuda":
            return None, None, None, (
                "the cuda backend needs a CUDA GPU to measure the speedup; run the pruned model there "
                "(the profile comes from the latency table measured on the GPU)")
        from .latency.cuda import TwoFourSwap, cuda_interleaved_median_ms

        inputs = self._regime_inputs(model)
        swap = TwoFourSwap(model, units, patterns)
        timing = self.config.timing

        def run(deployed: bool):
            def fn():
                swap.use_deployed() if deployed else swap.use_original()
                model(**inputs)
            return fn

        try:
            dense_ms, pruned_ms = cuda_interleaved_median_ms([run(False), run(True)], timing.warmup,
                                                             max(10, timing.verify_repeats))
        finally:
            swap.use_original()
        return dense_ms, dense_ms, pruned_ms, None

    @torch.inference_mode()
    def _verify(self, model, units, sparsities, layouts) -> tuple[float, float, float]:
        """The dense model, its deployed dense form and the pruned model, interleaved, median of repeats each.

        All three run on the same module tree: the dense run swaps the original modules back in. Dense BLAS does
        not skip zeros, so the original modules holding pruned weights take the dense model's time, and no
        copy of the model is needed.
        """
        inputs = self._regime_inputs(model)
        pruned = KernelSwap(model, units, sparsities, layouts)
        deployed_dense = KernelSwap(model, units, [0.0] * len(units), layouts)
        timing = self.config.timing

        def run(swap):
            def fn():
                swap.use_deployed() if swap is not None else pruned.use_original()
                model(**inputs)
            return fn

        try:
            dense_ms, deployed_ms, pruned_ms = interleaved_median_ms(
                [run(None), run(deployed_dense), run(pruned)], timing.warmup, max(10, timing.verify_repeats))
        finally:
            pruned.use_original()
        return dense_ms, deployed_ms, pruned_ms


def search_profile(config: SPDYConfig, model: nn.Module, data: dict[str, torch.Tensor], times: np.ndarray,
                   budget_ms: float, prior: np.ndarray | None, stitch, progress: bool = True):
    """SPDY's search with the config's settings: each candidate profile is stitched into the live model (`stitch`)
    and scored against the dense model on the first `search.eval_samples` calibration windows. Returns the
    `SearchResult` and the scorer (the best profile is not stitched yet)."""
    eval_windows = {k: v[: config.search.eval_samples] for k, v in data.items()}
    device = SPDYPruner._device(model)
    batches = _batches({k: v.to(device) for k, v in eval_windows.items()}, config.search.eval_batch_size)
    scorer = DistanceScorer(model, batches, config.search.score)

    def evaluate(profile: np.ndarray) -> float:
        stitch(profile)
        return scorer()

    s = config.search
    result = spdy_search(evaluate, times, budget_ms, num_random_inits=s.num_random_inits, patience=s.patience,
                         neighbourhood_fraction=s.neighbourhood_fraction, buckets=s.dp_buckets, seed=s.seed,
                         prior=prior, progress=progress)
    return result, scorer


def job_summary(config: SPDYConfig, score: float, scorer: DistanceScorer, database_info: dict, budget: Budget,
                search_budget: Budget, result, stage_seconds: dict) -> dict:
    """The report entries every family shares: score, regime, database, budget, search, stages, environment."""
    return {
        "score_dense_vs_pruned": score,
        "score_kind": scorer.kind,
        "backend": config.backend,
        "regime": config.regime.to_dict(),
        "method": config.method,
        "database": database_info,
        "budget": {"base_ms": budget.base_ms, "prunable_ms": budget.prunable_ms,
                   "constant_ms": budget.constant_ms, "budget_ms": search_budget.budget_ms},
        "search": {"candidates": result.candidates, "evaluations": result.evaluations},
        "stage_seconds": dict(stage_seconds),
        "environment": environment_info(),
    }


def needs_confirmation(config: SPDYConfig, measured: float, corrections: list[dict]) -> bool:
    """Whether a measured miss should be measured again before the profile is re-aimed: a re-aim costs quality,
    and one noisy moment of a busy machine should not cause it. The second measurement is the one that counts."""
    if measured >= config.target_speedup or len(corrections) >= config.search.verify_corrections:
        return False
    logger.info("Measured %.3fx < target %.3gx: measuring again to confirm before re-aiming.", measured,
                config.target_speedup)
    return True


def reaim(config: SPDYConfig, times: np.ndarray, costs: np.ndarray, budget: Budget, profile: np.ndarray,
          aim: float, measured: float, corrections: list[dict], reference_ms: float | None = None
          ) -> tuple[float, np.ndarray] | None:
    """One verify correction: if the measured speedup misses the target and corrections are left, the table rated
    the profile too fast, so aim higher by the shortfall and let the DP re-solve with the search's costs (no new
    search), as far as the model can go. Returns (new aim, new profile) and records the correction, or None."""
    if measured >= config.target_speedup or len(corrections) >= config.search.verify_corrections:
        return None
    new_aim = min(aim * (config.target_speedup / measured) * 1.01, budget.max_reachable_speedup)
    if new_aim <= aim:
        return None
    raised = compute_budget(times, budget.base_ms, new_aim, reference_ms=reference_ms)
    new_profile = solve_dp(costs, times, raised.budget_ms, config.search.dp_buckets)
    if new_profile is None or list(new_profile) == list(profile):
        return None
    predicted = budget.predicted_speedup(times[np.arange(len(profile)), profile])
    corrections.append({"measured_speedup": measured, "predicted_speedup": predicted, "aim": aim,
                        "new_aim": new_aim})
    logger.info("Measured %.3fx < target %.3gx (predicted %.3fx): re-aiming the profile at %.3fx.",
                measured, config.target_speedup, predicted, new_aim)
    return new_aim, new_profile


def verify_summary(config: SPDYConfig, budget: Budget, search_budget: Budget, predicted: float,
                   dense_ms: float | None, pruned_ms: float | None, verify_skipped: str | None,
                   corrections: list[dict]) -> dict:
    """Logs the verify outcome (a warning when the target is missed by more than 5 %) and returns the report's
    speedup entries, shared by every family."""
    measured = None if verify_skipped else dense_ms / pruned_ms
    if measured is None:
        logger.warning("Predicted speedup %.3fx, not verified: %s", predicted, verify_skipped)
    else:
        logger.info("Predicted speedup %.3fx, measured %.3fx (dense %.3f ms, pruned %.3f ms).",
                    predicted, measured, dense_ms, pruned_ms)
        if measured < 0.95 * config.target_speedup:
            logger.warning(
                "Measured speedup %.3fx falls short of the target %.3gx by more than 5%%: the latency table may be "
                "stale or the machine busy. Re-measure the table on an idle machine (delete its cache file).",
                measured, config.target_speedup)
    return {
        "target_speedup": config.target_speedup,
        "predicted_speedup": predicted,
        "measured_speedup": measured,
        "max_reachable_speedup": budget.max_reachable_speedup,
        "search_target_speedup": search_budget.target_speedup,
        "verify_corrections": corrections,
        "dense_time_ms": dense_ms,
        "pruned_time_ms": pruned_ms,
        "verify_skipped": verify_skipped,
    }


def anchor_level(times: np.ndarray, budget_ms: float) -> int:
    """The uniform level that meets the budget: the smallest level k >= 1 whose every-unit-at-k profile fits,
    else the level with the least total time. Data-aware databases calibrate later blocks on the outputs of
    earlier ones pruned to this level: the level the search's profiles are, on average, near."""
    totals = np.asarray(times, dtype=np.float64).sum(axis=0)  # (K,)
    for k in range(1, len(totals)):
        if totals[k] <= budget_ms:
            return k
    return int(np.argmin(np.where(np.isfinite(totals), totals, np.inf)[1:])) + 1 if len(totals) > 1 else 0


def build_database(config: SPDYConfig, model: nn.Module, units, levels, windows: dict[str, torch.Tensor],
                   anchor: int, progress: bool = True, patterns: list[str] | None = None
                   ) -> tuple[PruningDatabase, dict]:
    """The pruning database of `config.method`, with a summary for the report."""
    if config.method == "magnitude":
        return MagnitudeDatabase(units, levels, patterns), {"method": "magnitude"}
    if config.method != "obs":
        raise ValueError(f"Unknown pruning method {config.method!r}.")
    db = config.database
    fingerprint = model_fingerprint(model)
    n = min(config.calibration.num_samples, windows["input_ids"].shape[0])
    windows = {k: v[:n] for k, v in windows.items()}
    directory = db.dir
    if directory is None:
        import hashlib
        import json

        from .database.obs_database import windows_digest
        from .database.store import STORE_VERSION

        key = json.dumps({"version": STORE_VERSION, "model": fingerprint, "levels": list(levels),
                          "patterns": patterns, "units": [u.name for u in units],
                          "calibration": windows_digest(windows), "propagation": db.propagation,
                          "anchor": anchor if db.propagation == "pruned" else None,
                          "dampening": db.dampening, "block_size": db.block_size}, sort_keys=True)
        directory = os.path.join(config.cache_dir or default_cache_dir(), "database",
                                 "obs-" + hashlib.sha1(key.encode()).hexdigest()[:16])
    logger.info("OBS pruning database in %s (%d calibration windows; later blocks see outputs %s).", directory, n,
                f"pruned to level {anchor} (sparsity {levels[anchor]:.4f})" if db.propagation == "pruned"
                else "of the dense blocks")
    database = build_obs_database(
        model, units, levels, windows, directory=directory, patterns=patterns, build_info={"model": fingerprint},
        anchor_level=anchor, propagation=db.propagation, dampening=db.dampening, block_size=db.block_size,
        batch_size=db.batch_size, device=db.device, progress=progress)
    info = {"method": "obs", "dir": os.path.abspath(directory), "calibration_windows": n,
            "propagation": db.propagation, "anchor_level": anchor if db.propagation == "pruned" else None,
            "anchor_sparsity": levels[anchor] if db.propagation == "pruned" else None,
            "dampening": db.dampening}
    return database, info


def _fits(times: np.ndarray, budget: Budget, buckets: int) -> bool:
    """Whether some profile fits the budget once times are rounded up to DP buckets."""
    return budget.budget_ms > 0 and solve_dp(np.zeros_like(times), times, budget.budget_ms, buckets) is not None


def _batches(windows: dict[str, torch.Tensor], batch_size: int) -> list[dict[str, torch.Tensor]]:
    n = windows["input_ids"].shape[0]
    return [{k: v[i:i + batch_size] for k, v in windows.items()} for i in range(0, n, batch_size)]
