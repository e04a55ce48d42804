"""The structured family: each block's attention and FFN is a search unit (`spdy_hf.modeling.groups.StructuredGroup`),
its levels keep counts of heads / neurons from all down to none.

Times are measured in the whole model (`spdy_hf.latency.structured`); weights come from the structured database
(OBS: nested, compensated; or magnitude). The DP's prior follows `search.error_prior`: the database's measured
relative output error of each level, or SPDY's reference curve in structured terms (the fraction removed,
squared). The search scores profiles in zero-filled form (shapes unchanged); verify measures the deployed form: a
copy of the model with the removed heads and neurons cut out (`spdy_hf.deploy.shrink`).

A level index of group i means `level_maps[i][index] = (kind, a, j)`: kind "structured" keeps `counts[i][a]`
heads/neurons. The mixed family (`spdy_hf.families.mixed`) extends the maps with sparse levels and combinations.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import hashlib
import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..config import DEFAULT_LEVELS, SPDYConfig
from ..database.obs_database import windows_digest
from ..database.store import STORE_VERSION
from ..database.structured_database import StructuredDatabase, build_structured_database
from ..deploy.shrink import STRUCTURED_SPARSE, deploy_groups
from ..errors import SPDYError
from ..latency.check import cached_or_measured, constant_problem, judge_profiles
from ..latency.structured import check_profiles, keep_counts, measure_structured_latency, times_are_fitted
from ..latency.table import LatencyTable, cache_key, default_cache_dir
from ..latency.timing import spin_up
from ..modeling.groups import StructuredGroup, find_structured_groups, group_name
from ..modeling.loading import model_fingerprint, weights_fingerprint
from ..modeling.swap import TreeSwap
from ..modeling.units import Unit
from .base import Databases, Entries, Family, LevelGrid, Measurement, Plan
from .registry import register_family

logger = logging.getLogger(__name__)


def searchable_groups(groups: list[StructuredGroup], units, skip_modules: list[str]) -> list[StructuredGroup]:
    """The groups whose every layer is a search unit. A group with a layer left out (by `skip_modules`) stays dense,
    which a warning says, naming the groups and the patterns that left their layers out."""
    unit_names = {u.name for u in units}
    kept, dropped = [], {}
    for g in groups:
        missing = [n for n in [*g.producers, g.consumer] if n not in unit_names]
        if missing:
            dropped[group_name(g)] = missing
        else:
            kept.append(g)
    if dropped:
        layers = [n for names in dropped.values() for n in names]
        patterns = sorted({p for p in skip_modules if any(fnmatch.fnmatchcase(n, p) for n in layers)})
        why = f"matching skip_modules {patterns}" if patterns else "not among the search units"
        logger.warning("%d attention/FFN group(s) stay dense, as some of their layers are not searched (%s, %s): %s.%s",
                       len(dropped), ", ".join(layers[:4]) + (" ..." if len(layers) > 4 else ""), why,
                       ", ".join(list(dropped)[:8]) + (f" and {len(dropped) - 8} more" if len(dropped) > 8 else ""),
                       " To prune them, take those patterns out of skip_modules." if patterns else "")
    return kept


@dataclass(frozen=True)
class StructuredLayout:
    """The structured families' map of their search units (`Plan.layout`): the attention/FFN groups, the counts of
    heads/neurons each level keeps, and what each level index of a group is: `level_maps[i][index] = (kind, a, j)`,
    kind "structured" keeping `counts[i][a]`, "unstructured" the sparse level j of `grid`, or both at once."""

    groups: list[StructuredGroup]
    counts: list[list[int]]  # per group, the heads/neurons each keep-count index keeps, all first
    group_units: list[list[Unit]]  # per group, its producers then its consumer
    level_maps: list[list[tuple[str, int, int]]]
    unit_table: LatencyTable | None = None  # the per-layer table of the sparse levels (family mixed)
    grid: LevelGrid | None = None  # the sparse levels (family mixed)


@register_family
class StructuredFamily(Family):
    name = "structured"
    uses_levels = False  # whether the sparse `levels` are among the search's levels (the mixed family's are)

    # ------------------------------------------------------------------ profile
    def plan(self, units, latency_table=None) -> Plan:
        table = self.given_table(latency_table)
        self.check_levels_setting()
        groups = searchable_groups(find_structured_groups(self.model), units, self.config.skip_modules)
        if not groups:
            raise SPDYError("No attention or FFN group has all its layers among the searchable units (check "
                            "skip_modules), so there is nothing to prune structurally; use family: unstructured.")
        s = self.config.structured
        counts = [keep_counts(g, s.head_step, s.ffn_grid) for g in groups]
        by_name = {u.name: u for u in units}
        unit_table, grid = self.sparse_levels(units, table)
        # the levels' map is filled in below, from the times (each group's sparse levels need the layout's tables)
        layout = StructuredLayout(groups=groups, counts=counts, level_maps=[], unit_table=unit_table, grid=grid,
                                  group_units=[[by_name[n] for n in [*g.producers, g.consumer]] for g in groups])
        source = structured_latency(self, groups, counts, table)  # the table the structured times come from
        structured = source.structured
        level_maps, rows = [], []
        for i, g in enumerate(groups):
            group_times = structured["signatures"][structured["groups"][group_name(g)]]["times_ms"]
            level_map, row = self.group_levels(layout, i, group_times)
            level_maps.append(level_map)
            rows.append(row)
        layout = dataclasses.replace(layout, level_maps=level_maps)
        times = np.full((len(groups), max(len(r) for r in rows)), np.inf)
        for i, row in enumerate(rows):
            times[i, :len(row)] = row
        # saved with the result under the labels it was measured with (backend, regime, environment)
        saved = copy.copy(unit_table if unit_table is not None else source)
        saved.structured = structured
        # the larger noise of the tables behind the times, named for what it is (they measure different things)
        noises = [(t.timing_noise, t.timing_noise_kind) for t in (source, unit_table)
                  if t is not None and t.timing_noise is not None]
        noise, noise_kind = max(noises, key=lambda n: n[0], default=(None, None))
        return Plan(units=units, names=[group_name(g) for g in groups], times=times, base_ms=structured["dense_ms"],
                    reference_ms=None, table=saved, timing_noise=noise, timing_noise_kind=noise_kind,
                    latency_times="fitted" if times_are_fitted(structured) else "measured", layout=layout)

    def check_levels_setting(self) -> None:
        """Sparse `levels` other than the backend's default, in a family that uses none, are named in a warning: they
        have no effect there."""
        levels = self.config.levels
        if not self.uses_levels and levels != DEFAULT_LEVELS[self.config.backend]:
            logger.warning("levels=%r is ignored: family 'structured' removes attention heads and FFN neurons and "
                           "uses no sparse levels. Use family: mixed to let the search choose those levels per block "
                           "too, or drop the levels setting.", levels)

    def sparse_levels(self, units, table: LatencyTable | None) -> tuple[LatencyTable | None, LevelGrid | None]:
        """The per-layer latency table and the sparse levels this family uses besides the structured ones (none
        here), after checking a given `table` against the job: another backend is an error; another regime or
        environment a warning."""
        if table is not None:
            table.check_matches(self.config.backend, self.config.regime.to_dict(), environment=self.environment)
            table.check_units([u.name for u in units], self.fingerprint)
        return None, None

    def group_levels(self, layout: StructuredLayout, i: int, group_times: list[float]
                     ) -> tuple[list[tuple[str, int, int]], list[float]]:
        """Group i's levels, as (kind, keep-count index, sparse level index), and their times."""
        return [("structured", a, 0) for a in range(len(group_times))], list(group_times)

    # ------------------------------------------------------------------ database
    def build_database(self, plan, windows, budgets) -> Databases:
        weights = None if self.config.method == "magnitude" else weights_fingerprint(self.model)
        return self.group_database(plan, windows, weights)

    def group_database(self, plan: Plan, windows: dict[str, torch.Tensor], weights: str | None) -> Databases:
        """The structured database of the plan's groups (`weights`: the dense model's fingerprint, which a stored
        database is keyed by; None with magnitude pruning)."""
        layout = plan.layout
        sdb, info = build_group_database(self.config, self.model, layout.groups, layout.counts, windows,
                                         store_hessian=self.keeps_hessians(), progress=self.progress, weights=weights)
        return Databases(info=info, structured=sdb)

    def keeps_hessians(self) -> bool:
        """Whether the structured store keeps each consumer's Hessian (for the mixed family's combinations)."""
        return False

    def prior(self, plan, databases) -> np.ndarray:
        """Per level, the structured part's error plus the sparse part's (`search.error_prior`: measured relative
        output errors, or the fraction removed, squared)."""
        prior = np.zeros_like(plan.times)
        for i, level_map in enumerate(plan.layout.level_maps):
            struct_err, sparse_err = self.structured_errors(plan, databases, i), self.sparse_errors(plan, databases, i)
            for level, (kind, a, j) in enumerate(level_map):
                prior[i, level] = (struct_err[a] if kind != "unstructured" else 0.0) + \
                    (sparse_err[j] if kind != "structured" else 0.0)
        prior[~np.isfinite(plan.times)] = prior.max() + 1.0  # padding levels: never chosen (their time is inf)
        return prior

    def structured_errors(self, plan: Plan, databases: Databases, i: int) -> np.ndarray:
        """Group i's prior at each keep count: the database's measured relative output errors, or with
        `error_prior: spdy` (and with magnitude pruning) the fraction of the group removed, squared."""
        if self.config.resolved_error_prior() == "measured":
            return databases.structured.errors[i]
        group = plan.layout.groups[i]
        return np.array([(1.0 - k / group.num_groups) ** 2 for k in plan.layout.counts[i]], dtype=np.float64)

    def sparse_errors(self, plan: Plan, databases: Databases, i: int) -> np.ndarray | None:
        """Group i's relative output error at each sparse level (mixed family only)."""
        return None

    # ------------------------------------------------------------------ stitch, measure, describe
    def stitch_unit(self, plan, databases, index, level) -> None:
        with torch.no_grad():
            self.stitch_level(plan, databases, index, *plan.layout.level_maps[index][level])

    def stitch_level(self, plan: Plan, databases: Databases, i: int, kind: str, a: int, j: int) -> None:
        """Writes group i's level (kind, a, j) into the live model in zero-filled form."""
        databases.structured.stitch(i, a)

    def measure(self, plan, databases, profile, regime=None) -> Measurement:
        ut = plan.layout.unit_table
        entries = self.group_entries(plan, databases, profile)
        # the deployed form is swapped into the live model and out again: no copy of the model
        swap = TreeSwap.record(self.model, lambda m: deploy_groups(
            m, entries, self.config.backend, ut.unit_layouts if ut is not None else None,
            ut.input_leaders if ut is not None else None))
        try:
            (dense, pruned), per, repeats = self.end_to_end_calls([swap.revert, swap.apply], regime)
            swap.revert()
            with torch.inference_mode():
                dense_ms, pruned_ms = self.timer([dense, swap.wrap(pruned)], self.config.timing.warmup, repeats)
        finally:
            swap.revert()
        return Measurement(dense_ms / per, pruned_ms / per)

    def group_entries(self, plan: Plan, databases: Databases, profile) -> list[dict]:
        """Per group: its name, layers, level, times and what the level keeps (`spdy_profile.json`'s "groups")."""
        out = []
        for i, (g, level) in enumerate(zip(plan.layout.groups, profile)):
            level = int(level)
            entry = {"name": group_name(g), "kind": g.kind, "block": g.block, "num_groups": g.num_groups,
                     "producers": list(g.producers), "consumer": g.consumer, "level": level,
                     "dense_time_ms": float(plan.times[i, 0]), "time_ms": float(plan.times[i, level])}
            entry.update(self.describe_level(plan, databases, i, *plan.layout.level_maps[i][level]))
            out.append(entry)
        return out

    def describe_level(self, plan: Plan, databases: Databases, i: int, kind: str, a: int, j: int) -> dict:
        """Group i's level (kind, a, j) as entries: family, keep, kept, sparsity, pattern."""
        g, keep, sdb = plan.layout.groups[i], plan.layout.counts[i][a], databases.structured
        return dict(family="structured", keep=keep, kept=sdb.kept(i, a), sparsity=1 - keep / g.num_groups,
                    pattern="structured", removal_order=removal_order(sdb, i, a, g.num_groups))

    def finalize(self, plan, databases, profile) -> None:
        for i, level in enumerate(profile):  # removed heads and neurons zero in every layer, producers too
            kind, a, _ = plan.layout.level_maps[i][int(level)]
            if kind != "unstructured" and a > 0:
                databases.structured.zero_producers(i, a)

    def entries(self, plan, databases, profile, measurement) -> Entries:
        self.finalize(plan, databases, profile)
        groups = self.group_entries(plan, databases, profile)
        family_of = {n: e for e in groups for n in [*e["producers"], e["consumer"]]}
        table = plan.table if plan.layout.unit_table is not None else None
        units, zeros, total = [], 0, 0
        for unit in plan.units:
            n_zero = int((unit.weight == 0).sum())
            zeros += n_zero
            total += unit.numel
            e = family_of.get(unit.name)
            dense = e is None or (e["family"] == "structured" and e["keep"] == e["num_groups"])
            units.append({
                "name": unit.name, "shape": list(unit.shape), "sparsity": n_zero / unit.numel,
                "family": "dense" if dense else e["family"],
                "group": None if e is None else e["name"],
                # the unit's kernel: structured units run dense (shrunk), sparse ones on the backend's kernel
                "pattern": "dense" if e is None or e["family"] == "structured" else e["pattern"],
                "layout": table.layout_of(unit.name) if table is not None else "cc",
                "input_leader": table.input_leaders.get(unit.name) if table is not None else None,
            })
        report = {
            "family": self.config.family,
            "families": {f: sum(1 for e in groups if e["family"] == f)
                         for f in ("structured", "unstructured", STRUCTURED_SPARSE)},
            "kept_heads": {e["block"]: e["keep"] for e in groups if e["kind"] == "attention"},
            "kept_ffn_neurons": {e["block"]: e["keep"] for e in groups if e["kind"] == "ffn"},
            "overall_sparsity": zeros / max(total, 1),
            "error_prior": self.config.resolved_error_prior(),
            "num_units": len(groups),
        }
        return Entries(profile=units, groups=groups, report=report)


def removal_order(sdb: StructuredDatabase, i: int, a: int, num_groups: int) -> list[int]:
    """Group i's heads/neurons that keep-count index `a` removes, in the order the database removed them (its levels
    are nested: those gone at a less pruned level first; by index within one level). Gradual pruning with `Trainer`
    removes them in this order."""
    order, kept = [], set(range(num_groups))
    for b in range(1, a + 1):
        now = set(sdb.kept(i, b))
        order += sorted(kept - now)
        kept = now
    return order


def structured_latency(family: StructuredFamily, groups: list[StructuredGroup], counts: list[list[int]],
                       table: LatencyTable | None) -> LatencyTable:
    """The latency table holding the structured levels' times (its `structured` part) of `groups` at keep `counts`:
    the given `table`, which must cover them; else the cached one; else measured in the whole model and cached."""
    config = family.config

    def covers(structured: dict) -> bool:
        if not structured:
            return False
        for g, c in zip(groups, counts):
            sig = structured.get("groups", {}).get(group_name(g))
            if sig is None or structured["signatures"].get(sig, {}).get("keep") != list(c):
                return False
        return True

    if table is not None:
        if not covers(table.structured):
            raise SPDYError(
                "The latency table has no structured times for this model's attention/FFN groups at the keep counts "
                "of `structured` (it was measured for another model, another family or other structured levels). "
                "Measure one for this model: drop --latency-table, or run `spdy-hf profile --family "
                f"{config.family}`.")
        return table
    regime = config.regime.to_dict()
    key = cache_key(config.backend, regime, [0.0], family.fingerprint, family.environment,
                    extra={"structured": [[group_name(g), list(c)] for g, c in zip(groups, counts)],
                           "times": "smoothed"})
    path = os.path.join(config.cache_dir or default_cache_dir(), "latency", f"structured-{key}.json")
    inputs, model = family.inputs, family.model

    def run(m):
        return lambda: m(**inputs)

    def measure() -> LatencyTable:
        with torch.inference_mode():
            spin_up(run(model), seconds=2.0)
        structured = measure_structured_latency(model, groups, counts, run, family.timer,
                                                warmup=config.timing.warmup, repeats=2 * config.timing.model_repeats,
                                                progress=family.progress)
        return LatencyTable(backend=config.backend, regime=regime, levels=[0.0], shapes={},
                            base_time_ms=structured["dense_ms"], model=family.fingerprint,
                            environment=family.environment, structured=structured,
                            timing_noise=structured.get("timing_noise"), timing_noise_kind="dense_spread")

    def check(t: LatencyTable) -> str | None:
        return full_time_problem(t.structured, groups) if covers(t.structured) else "it holds other groups"

    def confirm(t: LatencyTable) -> str | None:  # random profiles, end to end; recorded in the table
        timing = config.timing
        pairs = check_profiles(model, groups, counts, t.structured, run, family.timer, timing.check_profiles,
                               timing.warmup, timing.model_repeats)
        return judge_profiles(pairs, timing.check_tolerance, t.structured)

    return cached_or_measured(path, measure, check, config.timing.attempts, "structured latency table", confirm)


def full_time_problem(structured: dict, groups: list[StructuredGroup]) -> str | None:
    """Why structured times cannot be right (the groups, whole, taking longer than the dense model), or None."""
    full = sum(structured["signatures"][structured["groups"][group_name(g)]]["times_ms"][0] for g in groups)
    return constant_problem(structured["dense_ms"], full, "attention and FFN groups")


def build_group_database(config: SPDYConfig, model: nn.Module, groups: list[StructuredGroup],
                         counts: list[list[int]], windows: dict[str, torch.Tensor], store_hessian: bool = False,
                         progress: bool = True, weights: str | None = None) -> tuple[StructuredDatabase, dict]:
    """The structured database of `config.method` (in `database.dir`/structured, or keyed in the cache by the model's
    config and weights, see `build_database`), with a summary for the report."""
    fingerprint = model_fingerprint(model)
    if config.method == "obs" and weights is None:
        weights = weights_fingerprint(model)
    n = min(config.calibration.num_samples, windows["input_ids"].shape[0])
    windows = {k: v[:n] for k, v in windows.items()}
    directory = None
    if config.method == "obs" and config.database.dir is not None:  # the user's directory: one store each
        directory = os.path.join(config.database.dir, "structured")
    elif config.method == "obs":
        key = json.dumps({"version": STORE_VERSION, "model": fingerprint, "weights": weights,
                          "calibration": windows_digest(windows),
                          "groups": [[group_name(g), c] for g, c in zip(groups, counts)],
                          "dampening": config.database.dampening, "hessians": store_hessian,
                          **({"compensation": config.database.compensation}
                             if config.database.compensation != 1.0 else {}),
                          **({"fit_bias": True} if config.database.fit_bias else {})}, sort_keys=True)
        directory = os.path.join(config.cache_dir or default_cache_dir(), "database",
                                 "structured-" + hashlib.sha1(key.encode()).hexdigest()[:16])
    sdb = build_structured_database(
        model, groups, counts, windows, directory=directory, method=config.method,
        build_info={"model": fingerprint, "weights": weights}, dampening=config.database.dampening,
        compensation=config.database.compensation, fit_bias=config.database.fit_bias,
        batch_size=config.database.batch_size, device=config.database.device,
        store_hessian=store_hessian, progress=progress)
    info = {"method": config.method, "family": config.family,
            "structured_dir": None if config.method == "magnitude" else os.path.abspath(directory),
            "propagation": config.database.propagation_for("structured")}
    return sdb, info
