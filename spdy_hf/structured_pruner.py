"""The structured and mixed families of `SPDYPruner` (issue 6): search units are attention and FFN groups.

Each block's attention and FFN is one search unit (`spdy_hf.structured.StructuredGroup`). Its levels:

- `family="structured"`: keep counts of heads / neurons, from all down to none; times measured in the whole
  model (`spdy_hf.latency.structured`); weights from the structured OBS database (nested, compensated);
- `family="mixed"`: those, plus the backend's sparse levels (`config.levels`) on all the group's linear layers at
  once: CSR sparsity on cpu, 2:4 on cuda; their time is the group's dense time plus the latency table's
  sparse-minus-dense times of its layers, their weights the unstructured OBS database's. And combinations
  ("structured+sparse"): a partial keep count with the remaining weights at one of the group's sparse levels
  that pay (at most `structured.mixed_combos`); time: the structured level's plus the sparse-minus-dense time
  scaled by the share kept; weights: the unstructured database's kept producer rows, and an OBS pass over the
  kept consumer columns (`StructuredDatabase.combo_weight`).

SPDY's DP and local search choose one level per group, under the same budget arithmetic as the unstructured
family. The levels of two families have no common index, so the DP's prior is the database's measured relative
output error of each level (the fraction of the group removed, squared, with `method="magnitude"`; the sum of
both parts for a combination). The search
scores profiles in zero-filled form (shapes unchanged); the verify step measures the deployed form: a copy of
the model with the removed heads and neurons cut out (`spdy_hf.structured.shrink`) and sparse kernels on the
groups that got a sparse level.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os

import numpy as np
import torch
from torch import nn

from .errors import SPDYError, UnreachableTargetError
from .latency.structured import keep_counts, measure_structured_latency
from .latency.table import LatencyTable, cache_key, default_cache_dir
from .levels import get_levels, get_patterns
from .loading import model_fingerprint
from .search import compute_budget
from .structured import find_structured_groups, group_name, shrink
from .units import Unit, find_units

logger = logging.getLogger(__name__)


STRUCTURED_SPARSE = "structured+sparse"  # the mixed family's combination: heads/neurons removed, the rest sparse


def deploy_groups(model: nn.Module, group_entries: list[dict], backend: str = "cpu",
                  unit_layouts: dict[str, str] | None = None, input_leaders: dict[str, str] | None = None
                  ) -> nn.Module:
    """Puts a structured/mixed profile's fast form into `model` (zero-filled weights), in place: groups with a
    structured level are shrunk to their kept heads/neurons; groups with a sparse level run their layers on the
    backend's sparse kernels; groups with both are shrunk, then their remaining layers run sparse. Not saveable
    afterwards (save the zero-filled model)."""
    groups = {group_name(g): g for g in find_structured_groups(model)}
    sparse_units, sparsities, patterns = [], [], []
    modules = dict(model.named_modules())
    for entry in group_entries:
        group = groups.get(entry["name"])
        if group is None:
            raise SPDYError(f"The model has no group {entry['name']}; was it saved from another architecture?")
        if entry["family"] in ("structured", STRUCTURED_SPARSE) and len(entry["kept"]) < group.num_groups:
            shrink(model, group, entry["kept"])
            modules = dict(model.named_modules())
        if entry["family"] in ("unstructured", STRUCTURED_SPARSE) and entry["kept"] and (
                entry["sparsity"] > 0 or entry["pattern"] == "2:4"):
            for name in [*group.producers, group.consumer]:
                sparse_units.append(Unit(name=name, module=modules[name], block=group.block))
                sparsities.append(entry["sparsity"])
                patterns.append(entry["pattern"])
    if not sparse_units:
        return model
    if backend == "cuda":
        from .latency.cuda import TwoFourSwap

        TwoFourSwap(model, sparse_units, patterns).use_deployed()
        return model
    from .apply import UnitLayout, apply_sparse_kernels

    index = {u.name: i for i, u in enumerate(sparse_units)}
    layouts = [UnitLayout((unit_layouts or {}).get(u.name, "cc"), index.get((input_leaders or {}).get(u.name)))
               for u in sparse_units]
    apply_sparse_kernels(model, sparse_units, sparsities, layouts)
    return model


def layout_maps(profile: list[dict]) -> tuple[dict[str, str], dict[str, str]]:
    """Each unit's layout code and input leader, from saved profile entries (what `deploy_groups` takes)."""
    return ({p["name"]: p.get("layout", "cc") for p in profile},
            {p["name"]: p["input_leader"] for p in profile if p.get("input_leader")})


def _structured_latency(pruner, model, groups, counts, table: LatencyTable | None, progress: bool) -> dict:
    """The structured part of the latency table: reused from `table` or the cache when it covers these groups and
    keep counts, else measured in the whole model."""
    config = pruner.config

    def covers(structured: dict) -> bool:
        if not structured:
            return False
        for g, c in zip(groups, counts):
            sig = structured.get("groups", {}).get(group_name(g))
            if sig is None or structured["signatures"].get(sig, {}).get("keep") != list(c):
                return False
        return True

    if table is not None and covers(table.structured):
        return table.structured
    regime = config.regime.to_dict()
    key = cache_key(config.backend, regime, [0.0], model_fingerprint(model), pruner._table_environment(),
                    extra={"structured": [[group_name(g), list(c)] for g, c in zip(groups, counts)]})
    path = os.path.join(config.cache_dir or default_cache_dir(), "latency", f"structured-{key}.json")
    if os.path.isfile(path):
        try:
            cached = LatencyTable.load(path)
            if covers(cached.structured):
                logger.info("Reusing the structured latency table cached at %s.", path)
                return cached.structured
        except SPDYError as e:
            logger.warning("Ignoring the unreadable cached latency table %s (%s); measuring again.", path, e)
    inputs = pruner._regime_inputs(model)

    def run(m):
        return lambda: m(**inputs)

    from .latency.cpu import _spin_up

    _spin_up(model, inputs, seconds=2.0)  # an idle CPU (or a VM's vCPU) runs its first passes slower
    structured = measure_structured_latency(model, groups, counts, run, pruner._interleaved_timer(),
                                            warmup=config.timing.warmup,
                                            repeats=2 * config.timing.model_repeats, progress=progress)
    LatencyTable(backend=config.backend, regime=regime, levels=[0.0], shapes={}, base_time_ms=structured["dense_ms"],
                 model=model_fingerprint(model), environment=pruner._table_environment(),
                 structured=structured).save(path)
    logger.info("Structured latency table cached at %s.", path)
    return structured


def _plan(pruner, model: nn.Module, units: list[Unit], latency_table, progress: bool) -> dict:
    """Groups, their levels and times (G, K) for the config's family, and the latency table holding them."""
    config = pruner.config
    mixed = config.family == "mixed"
    latency_table = latency_table if latency_table is not None else config.latency_table
    if isinstance(latency_table, (str, os.PathLike)):
        latency_table = LatencyTable.load(latency_table)
    unit_names = {u.name for u in units}
    groups = [g for g in find_structured_groups(model) if all(n in unit_names for n in [*g.producers, g.consumer])]
    if not groups:
        raise SPDYError("No attention or FFN group has all its layers among the searchable units (check "
                        "skip_modules), so there is nothing to prune structurally; use family: unstructured.")
    counts = [keep_counts(g, config.structured.head_step, config.structured.ffn_grid) for g in groups]
    by_name = {u.name: u for u in units}
    group_units = [[by_name[n] for n in [*g.producers, g.consumer]] for g in groups]
    utable = levels = patterns = None
    if mixed:
        levels, patterns = get_levels(config.levels), get_patterns(config.levels)
        utable = pruner._latency_table(model, units, levels, latency_table, progress)
    structured = _structured_latency(pruner, model, groups, counts, latency_table or utable, progress)
    # per group, what each level index means: ("structured", a, 0) keeps counts[a] heads/neurons; ("unstructured",
    # 0, j) puts every layer at sparse level j; (STRUCTURED_SPARSE, a, j) keeps counts[a] and puts the rest at j
    level_maps, rows = [], []
    for i, g in enumerate(groups):
        st = structured["signatures"][structured["groups"][group_name(g)]]["times_ms"]
        level_map, row = [("structured", a, 0) for a in range(len(st))], list(st)
        if mixed:
            ut = utable.times_for(utable.keys_for(group_units[i]))  # (layers, K)
            delta = (ut[:, 1:] - ut[:, :1]).sum(axis=0)  # sparse minus dense, summed over the group's layers
            for j in range(1, len(levels)):
                level_map.append(("unstructured", 0, j))
                row.append(st[0] + delta[j - 1])
            # the sparse levels that pay for this group, least sparse first, also combine with partial keeps; a
            # shrunk layer's sparse-minus-dense time is taken as its full one scaled by the share it keeps
            paying = [j for j in range(1, len(levels)) if np.isfinite(delta[j - 1]) and delta[j - 1] < 0]
            paying = paying[:config.structured.mixed_combos]
            for a in range(1, len(st) - 1):
                share = counts[i][a] / g.num_groups
                for j in paying:
                    if patterns[j] == "2:4" and not _two_four_fits(model, g, counts[i][a], config):
                        continue
                    level_map.append((STRUCTURED_SPARSE, a, j))
                    row.append(st[a] + share * delta[j - 1])
        level_maps.append(level_map)
        rows.append(row)
    times = np.full((len(groups), max(len(r) for r in rows)), np.inf)
    for i, row in enumerate(rows):
        times[i, :len(row)] = row
    base_ms = structured["dense_ms"]
    regime = config.regime.to_dict()
    table = copy.copy(utable) if utable is not None else LatencyTable(
        backend=config.backend, regime=regime, levels=[0.0], shapes={}, base_time_ms=base_ms,
        model=model_fingerprint(model), environment=pruner._table_environment())
    table.structured = structured
    return {"groups": groups, "counts": counts, "group_units": group_units, "level_maps": level_maps,
            "times": times, "table": table, "utable": utable, "levels": levels, "patterns": patterns,
            "base_ms": base_ms}


def _two_four_fits(model: nn.Module, group, keep: int, config) -> bool:
    """Whether every layer of `group` shrunk to `keep` heads/neurons can still run as 2:4 on the GPU."""
    from .latency.cuda import two_four_ineligibility

    modules = dict(model.named_modules())
    shape = {n: Unit(name=n, module=modules[n], block=group.block).shape for n in [*group.producers, group.consumer]}
    shapes = [(len(group.producer_indices(n, list(range(keep)))), shape[n][1]) for n in group.producers]
    shapes.append((shape[group.consumer][0], keep * group.group_size))
    return all(two_four_ineligibility(shape, config.regime.dtype) is None for shape in shapes)


def profile_structured(pruner, model: nn.Module, units: list[Unit], latency_table, progress: bool) -> LatencyTable:
    """`SPDYPruner.profile` for the structured and mixed families: the table with the structured levels' times
    (and, for mixed, the per-layer sparse levels')."""
    return _plan(pruner, model, units, latency_table, progress)["table"]


def prune_structured(pruner, model: nn.Module, data: dict[str, torch.Tensor], latency_table, progress: bool):
    """`SPDYPruner.prune` for `family` "structured" and "mixed"; returns a `PruningResult`."""
    from .pruner import (
        _fits,
        anchor_level,
        build_database,
        job_summary,
        needs_confirmation,
        reaim,
        search_profile,
        verify_summary,
    )
    from .result import PruningResult

    config = pruner.config
    mixed = config.family == "mixed"
    with pruner._stage("profile"):
        example = {k: v[:1].to(pruner._device(model)) for k, v in data.items()}
        units = find_units(model, config.skip_modules, example_inputs=example)
        plan = _plan(pruner, model, units, latency_table, progress)
    groups, counts, group_units, level_maps, times, table = (plan["groups"], plan["counts"], plan["group_units"],
                                                             plan["level_maps"], plan["times"], plan["table"])
    utable, levels, patterns = plan["utable"], plan["levels"], plan["patterns"]
    base_ms = plan["base_ms"]
    budget = compute_budget(times, base_ms, config.target_speedup)
    logger.info("%d groups (%s); dense model %.3f ms, groups %.3f ms; max reachable speedup %.3fx.", len(groups),
                config.family, base_ms, budget.prunable_ms, budget.max_reachable_speedup)
    if not budget.reachable or not _fits(times, budget, config.search.dp_buckets):
        raise UnreachableTargetError(config.target_speedup, budget.max_reachable_speedup)
    search_budget = pruner._search_budget(times, budget)

    with pruner._stage("database"):
        from .database.structured_database import build_structured_database

        fingerprint = model_fingerprint(model)
        n = min(config.calibration.num_samples, data["input_ids"].shape[0])
        windows = {k: v[:n] for k, v in data.items()}
        directory = None
        store_hessian = mixed and config.structured.mixed_combos > 0
        if config.method == "obs" and config.database.dir is not None:  # the user's directory: one store each
            directory = os.path.join(config.database.dir, "structured")
        elif config.method == "obs":
            from .database.obs_database import windows_digest
            from .database.store import STORE_VERSION

            key = json.dumps({"version": STORE_VERSION, "model": fingerprint, "calibration": windows_digest(windows),
                              "groups": [[group_name(g), c] for g, c in zip(groups, counts)],
                              "dampening": config.database.dampening, "hessians": store_hessian}, sort_keys=True)
            directory = os.path.join(config.cache_dir or default_cache_dir(), "database",
                                     "structured-" + hashlib.sha1(key.encode()).hexdigest()[:16])
        sdb = build_structured_database(
            model, groups, counts, windows, directory=directory, method=config.method,
            build_info={"model": fingerprint}, dampening=config.database.dampening,
            batch_size=config.database.batch_size, device=config.database.device,
            store_hessian=store_hessian, progress=progress)
        database_info = {"method": config.method, "family": config.family,
                         "structured_dir": None if config.method == "magnitude" else os.path.abspath(directory)}
        udb = None
        if mixed:
            flat = [u for us in group_units for u in us]
            flat_times = np.concatenate([utable.times_for(utable.keys_for(us)) for us in group_units])
            share = search_budget.budget_ms / max(budget.prunable_ms, 1e-9)  # the groups' share of their time
            anchor = anchor_level(flat_times, share * float(flat_times[:, 0].sum()))
            uconfig = config
            if config.database.dir is not None:
                uconfig = copy.deepcopy(config)
                uconfig.database.dir = os.path.join(config.database.dir, "unstructured")
            udb, info = build_database(uconfig, model, flat, levels, data, anchor, progress, patterns=patterns)
            database_info["unstructured"] = info
            offsets = np.cumsum([0] + [len(us) for us in group_units])

    # the prior: measured relative output errors where the databases have them, else the fraction removed squared
    # (a combination's prior is the sum of its two parts' errors)
    prior = np.zeros_like(times)
    for i in range(len(groups)):
        struct_err = sdb.errors[i]
        sparse_err = None
        if mixed:
            sizes = np.array([u.numel for u in group_units[i]], dtype=np.float64)
            if getattr(udb, "errors", None) is not None:
                errs = udb.errors[offsets[i]:offsets[i + 1]]  # (layers, K)
                sparse_err = (sizes[:, None] * errs).sum(0) / sizes.sum()
            else:
                sparse_err = np.asarray(levels) ** 2
        for level, (kind, a, j) in enumerate(level_maps[i]):
            prior[i, level] = (struct_err[a] if kind != "unstructured" else 0.0) + \
                (sparse_err[j] if kind != "structured" else 0.0)
    prior[~np.isfinite(times)] = prior.max() + 1.0  # padding levels: never chosen (their time is inf anyway)

    current = [0] * len(groups)

    @torch.no_grad()
    def stitch(profile) -> None:
        for i, level in enumerate(profile):
            level = int(level)
            if current[i] == level:
                continue
            kind, a, j = level_maps[i][level]
            if kind == "structured":
                sdb.stitch(i, a)
            elif kind == "unstructured":
                sdb.restore(i)
                for offset, unit in enumerate(group_units[i]):
                    unit.weight.copy_(udb.weight(int(offsets[i]) + offset, j).to(unit.weight.dtype))
            else:  # removed heads/neurons zero, the kept producer rows and consumer columns at sparse level j
                sdb.stitch(i, a)
                group, kept = groups[i], sdb.kept(i, a)
                for offset, unit in enumerate(group_units[i][:-1]):
                    rows = group.producer_indices(unit.name, kept)
                    unit.weight[rows] = udb.weight(int(offsets[i]) + offset, j)[rows].to(unit.weight.dtype)
                consumer = group_units[i][-1]
                consumer.weight.copy_(sdb.combo_weight(i, a, levels[j], patterns[j]).to(consumer.weight.dtype))
            current[i] = level

    with pruner._stage("search"):
        result, scorer = search_profile(config, model, data, times, search_budget.budget_ms, prior, stitch,
                                        progress)
        profile = result.profile
        stitch(profile)
        score = scorer()

    def entries_of(profile) -> list[dict]:
        out = []
        for i, (g, level) in enumerate(zip(groups, profile)):
            level = int(level)
            entry = {"name": group_name(g), "kind": g.kind, "block": g.block, "num_groups": g.num_groups,
                     "producers": list(g.producers), "consumer": g.consumer, "level": level,
                     "dense_time_ms": float(times[i, 0]), "time_ms": float(times[i, level])}
            kind, a, j = level_maps[i][level]
            if kind == "structured":
                entry.update(family="structured", keep=counts[i][a], kept=sdb.kept(i, a),
                             sparsity=1 - counts[i][a] / g.num_groups, pattern="structured")
            elif kind == "unstructured":
                entry.update(family="unstructured", keep=g.num_groups, kept=list(range(g.num_groups)),
                             sparsity=levels[j], pattern=patterns[j])
            else:
                entry.update(family=STRUCTURED_SPARSE, keep=counts[i][a], kept=sdb.kept(i, a), sparsity=levels[j],
                             pattern=patterns[j])
            out.append(entry)
        return out

    def deployed_copy(profile):
        fast = copy.deepcopy(model)
        return deploy_groups(fast, entries_of(profile), config.backend,
                             utable.unit_layouts if utable is not None else None,
                             utable.input_leaders if utable is not None else None)

    inputs = pruner._regime_inputs(model)
    verify_skipped = None
    corrections: list[dict] = []
    aim = search_budget.target_speedup
    dense_ms = pruned_ms = None
    with pruner._stage("verify"):
        while True:
            if config.backend == "cuda" and (not torch.cuda.is_available() or
                                            pruner._device(model).type != "cuda"):
                verify_skipped = ("the cuda backend needs a CUDA GPU to measure the speedup; run the pruned model "
                                  "there (the profile comes from the latency table measured on the GPU)")
                break
            fast = deployed_copy(profile)
            timer = pruner._interleaved_timer()

            def measure(fast=fast, timer=timer):
                with torch.inference_mode():
                    return timer([lambda: model(**inputs), lambda: fast(**inputs)], config.timing.warmup,
                                 max(10, config.timing.verify_repeats))

            dense_ms, pruned_ms = measure()
            if needs_confirmation(config, dense_ms / pruned_ms, corrections):
                dense_ms, pruned_ms = measure()
            del fast
            step = reaim(config, times, result.sensitivities[:, None] * prior, budget, profile, aim,
                         dense_ms / pruned_ms, corrections)
            if step is None:
                break
            aim, profile = step
            stitch(profile)
        if corrections:
            score = scorer()
    predicted = budget.predicted_speedup(times[np.arange(len(groups)), profile])
    speedups = verify_summary(config, budget, search_budget, predicted, dense_ms, pruned_ms, verify_skipped,
                              corrections)

    group_entries = entries_of(profile)
    family_of = {n: e for e in group_entries for n in [*e["producers"], e["consumer"]]}
    profile_entries = []
    zeros = total = 0
    for unit in units:
        w = unit.weight
        n_zero = int((w == 0).sum())
        zeros += n_zero
        total += unit.numel
        entry = family_of.get(unit.name)
        sparsity = n_zero / unit.numel
        profile_entries.append({
            "name": unit.name, "shape": list(unit.shape), "sparsity": sparsity,
            "family": "dense" if entry is None or (entry["family"] == "structured" and entry["keep"] ==
                                                   entry["num_groups"]) else entry["family"],
            "group": None if entry is None else entry["name"],
            # the unit's kernel: structured units run dense (shrunk), sparse ones on the backend's kernel
            "pattern": "dense" if entry is None or entry["family"] == "structured" else entry["pattern"],
            "layout": table.layout_of(unit.name) if utable is not None else "cc",
            "input_leader": table.input_leaders.get(unit.name) if utable is not None else None,
        })
    report = {
        **speedups,
        "family": config.family,
        "families": {f: sum(1 for e in group_entries if e["family"] == f)
                     for f in ("structured", "unstructured", STRUCTURED_SPARSE)},
        "kept_heads": {e["block"]: e["keep"] for e in group_entries if e["kind"] == "attention"},
        "kept_ffn_neurons": {e["block"]: e["keep"] for e in group_entries if e["kind"] == "ffn"},
        "overall_sparsity": zeros / max(total, 1),
        "error_prior": "measured" if config.method == "obs" else "removed-fraction",
        "num_units": len(groups),
        **job_summary(config, score, scorer, database_info, budget, search_budget, result, pruner.stage_seconds),
    }
    return PruningResult(model=model, tokenizer=pruner.tokenizer, config=config, units=units,
                         profile=profile_entries, report=report, latency_table=table, groups=group_entries)

