"""The unstructured family: every linear layer is a search unit, its levels the backend's sparse levels
(`config.levels`: CSR sparsities on cpu, 2:4 on cuda), its times the latency table's, its weights the pruning
database's (OBS, or magnitude)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ..config import BACKEND_DTYPES, SPDYConfig
from ..database import MagnitudeDatabase, PruningDatabase, build_obs_database
from ..database.obs_database import windows_digest
from ..database.store import STORE_VERSION
from ..deploy.kernels import KernelSwap, UnitLayout
from ..latency.check import cached_or_measured, constant_problem, judge_profiles
from ..latency.table import LatencyTable, cache_key, default_cache_dir
from ..latency.timing import interleaved_median_ms
from ..modeling.loading import model_fingerprint, weights_fingerprint
from ..modeling.units import Unit
from ..search import anchor_level, error_prior
from .base import Databases, Entries, Family, LevelGrid, Measurement, Plan
from .registry import register_family

logger = logging.getLogger(__name__)


@register_family
class UnstructuredFamily(Family):
    name = "unstructured"
    database_per_target = True  # anchored at the level the target's budget leaves each layer
    backend_dtypes = {**BACKEND_DTYPES, "cpu": ("float32",)}  # its CPU levels are CSR products: float32 only

    def plan(self, units, latency_table=None) -> Plan:
        grid = LevelGrid.of(self.config)
        table = unit_latency_table(self, units, self.given_table(latency_table), grid)
        return Plan(units=units, names=[u.name for u in units], times=table.times_for(table.keys_for(units)),
                    base_ms=table.base_time_ms, reference_ms=table.reference_time_ms, table=table,
                    timing_noise=table.timing_noise, timing_noise_kind=table.timing_noise_kind,
                    layout=grid)

    def build_database(self, plan, windows, budgets) -> Databases:
        anchor = anchor_level(plan.times, budgets.search.budget_ms)
        grid = plan.layout
        database, info = build_database(self.config, self.model, plan.units, grid.levels, windows, anchor,
                                        self.progress, patterns=grid.patterns)
        return Databases(info=info, layers=database)

    def prior(self, plan, databases) -> np.ndarray:
        if self.config.resolved_error_prior() == "measured":
            return databases.layers.errors
        return error_prior(len(plan.layout.levels))[None, :]

    def stitch_unit(self, plan, databases, index, level) -> None:
        databases.layers.write(index, level)

    def measure(self, plan, databases, profile, regime=None) -> Measurement:
        # sparse kernels keep every shape, so one call (a decode cache filled by the dense form) serves all forms
        (call,), per, repeats = self.end_to_end_calls([lambda: None], regime)
        grid = plan.layout
        if self.config.backend == "cuda":
            return time_two_four(self.model, plan.units, [grid.patterns[k] for k in profile], call, per, repeats,
                                 self.config.timing.warmup)
        return time_kernels(self.model, plan.units, [grid.levels[k] for k in profile],
                            plan.table.layouts_for(plan.units), call, per, repeats, self.config.timing.warmup)

    def entries(self, plan, databases, profile, measurement) -> Entries:
        table, units, times, grid = plan.table, plan.units, plan.times, plan.layout
        entries, zeros, total = [], 0, 0
        for u, (unit, k) in enumerate(zip(units, profile)):
            zeros += int(round(grid.levels[k] * unit.numel))
            total += unit.numel
            entries.append({
                "name": unit.name, "shape": list(unit.shape), "level": int(k), "sparsity": grid.levels[k],
                "pattern": grid.patterns[k], "layout": table.layout_of(unit.name),
                "input_leader": table.input_leaders.get(unit.name),
                "dense_time_ms": float(times[u, 0]), "time_ms": float(times[u, k]),
            })
        deployed_dense_ms = None if measurement is None else measurement.deployed_dense_ms
        report = {
            # the unpruned model with every unit in the deployed (FastLinear) form, measured: shows how much of the
            # speedup the kernel form gives alone, and how much the sparsity adds on top. None where the deployed
            # dense form is the dense model itself (cuda: a dense unit keeps its own module) or nothing was measured.
            "deployed_dense_time_ms": deployed_dense_ms,
            "measured_speedup_vs_deployed_dense": None if deployed_dense_ms is None
            else deployed_dense_ms / measurement.pruned_ms,
            "ineligible_units": [{"name": u.name, "shape": list(u.shape), "reason": table.ineligible[key]}
                                 for u, key in zip(units, table.keys_for(units)) if key in table.ineligible],
            "overall_sparsity": zeros / total,
            "error_prior": self.config.resolved_error_prior(),
            "num_units": len(units),
        }
        return Entries(profile=entries, report=report)


def unit_latency_table(family: Family, units: list[Unit], table: LatencyTable | None, grid: LevelGrid
                       ) -> LatencyTable:
    """The per-layer latency table of `grid`'s levels: `table` when given (checked against the job), else the cached
    one, else measured on the backend and cached."""
    config = family.config
    regime = config.regime.to_dict()
    levels, patterns = grid.levels, grid.patterns
    if table is not None:
        table.check_matches(config.backend, regime, levels, patterns, family.environment)
        table.check_units([u.name for u in units], family.fingerprint)
        return table
    key = cache_key(config.backend, regime, levels, family.fingerprint, family.environment)
    path = os.path.join(config.cache_dir or default_cache_dir(), "latency", f"{key}.json")

    def check(t: LatencyTable) -> str | None:
        return constant_problem(t.reference_time_ms, float(t.times_for(t.keys_for(units))[:, 0].sum()),
                                "searched layers")

    def measure() -> LatencyTable:
        if config.backend == "cuda":
            from ..latency.cuda import measure_cuda_latency_table

            return measure_cuda_latency_table(family.model, units, levels, patterns, config, family.inputs,
                                              family.fingerprint, progress=family.progress)
        from ..latency.cpu import measure_latency_table

        return measure_latency_table(family.model, units, levels, config, family.inputs, family.fingerprint,
                                     progress=family.progress)

    def confirm(t: LatencyTable) -> str | None:  # random profiles, end to end, on the backend; recorded in the table
        if not config.timing.check_profiles:
            return None
        if config.backend == "cuda":
            from ..latency.cuda import check_profiles
        else:
            from ..latency.cpu import check_profiles

        timing = config.timing
        pairs = check_profiles(family.model, units, t, family.inputs, timing.check_profiles, timing.warmup,
                               timing.model_repeats)
        return judge_profiles(pairs, timing.check_tolerance, t.additivity)

    return cached_or_measured(path, measure, check, config.timing.attempts, "latency table", confirm)


def build_database(config: SPDYConfig, model: nn.Module, units: list[Unit], levels: list[float],
                   windows: dict[str, torch.Tensor], anchor: int, progress: bool = True,
                   patterns: list[str] | None = None, weights: str | None = None) -> tuple[PruningDatabase, dict]:
    """The pruning database of `config.method`, with a summary for the report. It is keyed by, and records, the
    model's config and its weights (`weights`: `weights_fingerprint(model)`, computed here when not given), so a
    database is never reused for another checkpoint of the same architecture."""
    if config.method == "magnitude":
        return MagnitudeDatabase(units, levels, patterns), {"method": "magnitude"}
    if config.method != "obs":
        raise ValueError(f"Unknown pruning method {config.method!r}.")
    db = config.database
    propagation = db.propagation_for("per-layer")
    fingerprint = model_fingerprint(model)
    weights = weights if weights is not None else weights_fingerprint(model)
    n = min(config.calibration.num_samples, windows["input_ids"].shape[0])
    windows = {k: v[:n] for k, v in windows.items()}
    directory = db.dir
    if directory is None:
        key = json.dumps({"version": STORE_VERSION, "model": fingerprint, "weights": weights, "levels": list(levels),
                          "patterns": patterns, "units": [u.name for u in units],
                          "calibration": windows_digest(windows), "propagation": propagation,
                          "anchor": anchor if propagation == "pruned" else None,
                          "dampening": db.dampening, "block_size": db.block_size}, sort_keys=True)
        directory = os.path.join(config.cache_dir or default_cache_dir(), "database",
                                 "obs-" + hashlib.sha1(key.encode()).hexdigest()[:16])
    logger.info("OBS pruning database in %s (%d calibration windows; later blocks see outputs %s).", directory, n,
                f"pruned to level {anchor} (sparsity {levels[anchor]:.4f})" if propagation == "pruned"
                else "of the dense blocks")
    database = build_obs_database(
        model, units, levels, windows, directory=directory, patterns=patterns,
        build_info={"model": fingerprint, "weights": weights}, anchor_level=anchor, propagation=propagation,
        dampening=db.dampening, block_size=db.block_size, batch_size=db.batch_size, device=db.device,
        progress=progress)
    info = {"method": "obs", "dir": os.path.abspath(directory), "calibration_windows": n,
            "propagation": propagation, "anchor_level": anchor if propagation == "pruned" else None,
            "anchor_sparsity": levels[anchor] if propagation == "pruned" else None,
            "dampening": db.dampening}
    return database, info


@torch.inference_mode()
def time_kernels(model: nn.Module, units: list[Unit], sparsities: list[float], layouts: list[UnitLayout],
                 call: Callable[[], object], per: int, repeats: int, warmup: int) -> Measurement:
    """The dense model, its deployed dense form and the pruned model, interleaved, median of `repeats` calls each
    (`call`: the regime's end-to-end work, `per` units of it: forward passes or generated tokens).

    All three run on the same module tree: the dense run swaps the original modules back in. Dense BLAS does
    not skip zeros, so the original modules holding pruned weights take the dense model's time, and no
    copy of the model is needed.
    """
    pruned = KernelSwap(model, units, sparsities, layouts)
    deployed_dense = KernelSwap(model, units, [0.0] * len(units), layouts)

    def run(swap):
        def fn():
            swap.use_deployed() if swap is not None else pruned.use_original()
            call()
        return fn

    try:
        dense_ms, deployed_ms, pruned_ms = interleaved_median_ms(
            [run(None), run(deployed_dense), run(pruned)], warmup, repeats)
    finally:
        pruned.use_original()
    return Measurement(dense_ms / per, pruned_ms / per, deployed_ms / per)


@torch.inference_mode()
def time_two_four(model: nn.Module, units: list[Unit], patterns: list[str], call: Callable[[], object], per: int,
                  repeats: int, warmup: int) -> Measurement:
    """Dense vs pruned (2:4 units as semi-structured tensors), interleaved, CUDA events. There is no deployed dense
    form to time apart: a dense unit keeps its own module, so it would be the dense model again (left out, None)."""
    from ..deploy.two_four import TwoFourSwap
    from ..latency.cuda import cuda_interleaved_median_ms

    swap = TwoFourSwap(model, units, patterns)

    def run(deployed: bool):
        def fn():
            swap.use_deployed() if deployed else swap.use_original()
            call()
        return fn

    try:
        dense_ms, pruned_ms = cuda_interleaved_median_ms([run(False), run(True)], warmup, repeats)
    finally:
        swap.use_original()
    return Measurement(dense_ms / per, pruned_ms / per)
