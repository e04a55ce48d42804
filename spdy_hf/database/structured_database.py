"""The structured database: for every attention/FFN group, which heads or neurons each keep count leaves, and the
compensated output projection.

One sequential calibration pass (`SequentialCalibrator`, dense propagation) collects the Hessian of every
group's consumer (the attention output projection, the FFN down projection); `structured_obs_levels` then removes
groups greedily by their OBS cost and updates the remaining consumer columns, so the levels are nested. Each
group is stored as it finishes, in the same on-disk store as the unstructured database (`DatabaseStore`: a
`build.json` first, one safetensors file per group written atomically, a manifest last), so an interrupted
build resumes with the missing groups only. With `method="magnitude"` the groups with the largest consumer
column norms are kept, without calibration or compensation.

The database stitches a profile in zero-filled form (`spdy_hf.modeling.groups.zero_fill`): shapes stay, removed
producer rows and consumer columns are zero, the kept consumer columns hold the compensated weights.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch
from torch import nn

from ..calibration.sequential import UnitStatistics, calibrate_windows
from ..modeling.groups import StructuredGroup, group_name, rows_view
from ..modeling.units import Unit
from ..utils.io import release_free_memory
from ..utils.processes import current_processes
from .obs_database import relative_output_errors, windows_digest
from .store import (
    STORE_VERSION,
    DatabaseStore,
    StoredTensors,
    agreed_pending,
    load_stored_elsewhere,
    solve_cost,
)
from .structured_obs import bias_shifts, centered_hessian, group_magnitude_levels, structured_obs_levels

logger = logging.getLogger(__name__)

LAZY = ("weight.", "bias.", "hessian")  # a stored group's tensors read from its file when stitched, not held


class StructuredDatabase:
    """Every group at every keep count: the kept group indices and the (out, in) consumer weight; `errors[i]`
    holds group i's relative output error at each of its keep counts. Stored groups hold their weights on disk
    (`StoredTensors`), so the database costs no memory beyond the level being stitched.

    `stitch(group_index, level)` writes a level into the live model: the consumer's compensated weight, whose
    removed columns are zero, which is all a removed head or neuron needs to contribute nothing; the producers'
    rows are zeroed by `zero_producers` once the profile is final (the saved, zero-filled form). With
    `keep_producers` (the mixed family, which also writes producers) stitching zero-fills both and keeps the
    producers' dense weights to restore from.
    """

    def __init__(self, model: nn.Module, groups: list[StructuredGroup], counts: list[list[int]],
                 entries: list, errors: list[np.ndarray] | None = None, keep_producers: bool = False):
        self.groups, self.counts, self.entries, self.errors = groups, counts, entries, errors
        self.keep_producers = keep_producers
        self._combos: dict[tuple, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self._modules = modules
        self._dense = {}  # the producers' dense weights, where stitching writes them (keep_producers)
        if keep_producers:
            for g in groups:
                for name in g.producers:
                    m = modules[name]
                    self._dense[name] = (m.weight.detach().clone(),
                                         None if getattr(m, "bias", None) is None else m.bias.detach().clone())

    def combo_weight(self, group_index: int, level: int, sparsity: float, pattern: str) -> torch.Tensor:
        """The consumer at a structured level with its kept columns also pruned to `sparsity` (or 2:4): OBS on
        the kept columns' Hessian where the database holds it, magnitude otherwise. Cached."""
        key = (group_index, level, float(sparsity), pattern)
        if key not in self._combos:
            from .obs import obs_prune_levels, obs_prune_nm

            group = self.groups[group_index]
            cols = group.consumer_columns(self.kept(group_index, level))
            w = self.consumer_weight(group_index, level)[:, cols].float()
            hessian = self.entries[group_index].get("hessian")
            if pattern == "2:4" and w.shape[1] % 4:
                sub = w  # a shape 2:4 cannot take; the latency table gives it no time either
            elif hessian is not None:
                h = hessian[cols][:, cols].float()
                sub = obs_prune_nm(w, h, 2, 4) if pattern == "2:4" else obs_prune_levels(w, h, [sparsity])[-1]
            elif pattern == "2:4":
                from ..modeling.patterns import two_four_magnitude_mask

                sub = w.masked_fill(two_four_magnitude_mask(w), 0.0)
            else:
                n = int(round(sparsity * w.numel()))
                order = torch.argsort(w.abs().flatten(), stable=True)[:n]
                sub = w.flatten().clone()
                sub[order] = 0.0
                sub = sub.view_as(w)
            full = torch.zeros_like(self.consumer_weight(group_index, level), dtype=torch.float32)
            full[:, cols] = sub.cpu()
            self._combos[key] = full
        return self._combos[key]

    def kept(self, group_index: int, level: int) -> list[int]:
        return self.entries[group_index][f"kept.{level}"].tolist()

    def consumer_weight(self, group_index: int, level: int) -> torch.Tensor:
        return self.entries[group_index][f"weight.{level}"]

    def consumer_bias(self, group_index: int, level: int) -> torch.Tensor | None:
        """The consumer's bias at `level` where the database fitted it (`database.fit_bias`), else None."""
        entry = self.entries[group_index]
        return entry[f"bias.{level}"] if f"bias.{level}" in entry else None

    def _write_consumer(self, group_index: int, level: int) -> None:
        module = self._modules[self.groups[group_index].consumer]
        w, _ = rows_view(module)
        w.copy_(self.consumer_weight(group_index, level).to(w.dtype))
        bias = self.consumer_bias(group_index, level)
        if bias is not None:
            module.bias.copy_(bias.to(module.bias.dtype))

    @torch.no_grad()
    def restore(self, group_index: int) -> None:
        """Puts the group's dense weights back."""
        group = self.groups[group_index]
        for name in group.producers if self.keep_producers else []:
            weight, bias = self._dense[name]
            module = self._modules[name]
            module.weight.copy_(weight)
            if bias is not None:
                module.bias.copy_(bias)
        self._write_consumer(group_index, 0)  # the first level keeps every group: dense

    @torch.no_grad()
    def stitch(self, group_index: int, level: int) -> None:
        """The group at `level`: the compensated consumer weight (removed columns zero) and, where the database
        fitted it, the consumer's bias; producers zero-filled too with `keep_producers`."""
        if self.keep_producers:
            self.restore(group_index)
            if level == 0:
                return
            self.zero_producers(group_index, level)
        self._write_consumer(group_index, level)

    @torch.no_grad()
    def zero_producers(self, group_index: int, level: int) -> None:
        """Zeroes the producers' rows (and biases) of the groups that `level` removes, and the consumer's columns."""
        from ..modeling.groups import zero_fill

        zero_fill(_ModulesView(self._modules), self.groups[group_index], self.kept(group_index, level))


class _ModulesView:
    """What `zero_fill` needs of a model (`named_modules`), from a stored name -> module map."""

    def __init__(self, modules: dict[str, nn.Module]):
        self._modules = modules

    def named_modules(self):
        return iter(self._modules.items())


def _solve_group(group: StructuredGroup, counts: list[int], weight: torch.Tensor, hessian: torch.Tensor | None,
                 method: str, dampening: float, store_hessian: bool = False, compensation: float = 1.0,
                 mean: torch.Tensor | None = None, bias: torch.Tensor | None = None
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every level of one group. With `mean` and `bias` (the consumer's mean input and dense bias), the levels are
    fitted with the bias free and each stores its bias (`bias.{j}`)."""
    fit_bias = method != "magnitude" and mean is not None and bias is not None
    if method == "magnitude":
        levels = group_magnitude_levels(weight, group.group_size, counts)
    else:
        levels = structured_obs_levels(weight, hessian, group.group_size, counts, damp=dampening,
                                       compensation=compensation, mean=mean if fit_bias else None)
    tensors = {}
    for j, (kept, w) in enumerate(levels):
        tensors[f"kept.{j}"] = torch.tensor(sorted(kept), dtype=torch.int64)
        tensors[f"weight.{j}"] = w.to(torch.float32).contiguous()
    if fit_bias:
        dense_bias = bias.detach().to("cpu", torch.float32)
        for j, shift in enumerate(bias_shifts(weight, [w for _, w in levels], mean)):
            tensors[f"bias.{j}"] = (dense_bias + shift).contiguous()
    if store_hessian and hessian is not None:
        tensors["hessian"] = hessian.detach().float().cpu().contiguous()
    # without data, the DP's prior falls back to the fraction of the group removed, squared (SPDY's curve shape)
    errors = relative_output_errors([w for _, w in levels], hessian,
                                    centered_hessian(hessian, mean) if fit_bias else None) if hessian is not None \
        else torch.tensor([(1.0 - k / group.num_groups) ** 2 for k in counts], dtype=torch.float64)
    return tensors, errors


def build_structured_database(
    model: nn.Module,
    groups: list[StructuredGroup],
    counts: list[list[int]],
    windows: dict[str, torch.Tensor] | None,
    *,
    directory: str | os.PathLike | None,
    method: str = "obs",
    build_info: dict | None = None,
    dampening: float = 0.01,
    compensation: float = 1.0,
    fit_bias: bool = False,
    batch_size: int = 8,
    device: str | None = None,
    store_hessian: bool = False,
    progress: bool = True,
) -> StructuredDatabase:
    """Builds (or resumes, or loads) the structured database of `groups` at their keep `counts`.

    Args:
        counts: per group, its keep counts, the full count first.
        windows: calibration token windows (unused with `method="magnitude"`).
        directory: where the database lives (None: in memory only, for magnitude).
        fit_bias: fit each consumer's bias to what the removed groups gave on average (consumers that have a
            bias; `structured_obs_levels`).
        store_hessian: also keep each consumer's Hessian, so that the mixed family can prune the kept columns
            further (`StructuredDatabase.combo_weight`); the database then also keeps the producers' dense weights,
            which the mixed family's sparse levels overwrite (`keep_producers`).
    """
    modules = dict(model.named_modules())
    consumers = [Unit(name=g.consumer, module=modules[g.consumer], block=g.block) for g in groups]
    entries: dict[str, dict[str, torch.Tensor]] = {}
    errors: dict[str, torch.Tensor] = {}
    if method == "magnitude":
        for g, unit, c in zip(groups, consumers, counts):
            entries[g.consumer], errors[g.consumer] = _solve_group(g, c, unit.weight.detach().float(), None,
                                                                   method, dampening)
        return StructuredDatabase(model, groups, counts, [entries[g.consumer] for g in groups],
                                  [errors[g.consumer].numpy() for g in groups], keep_producers=store_hessian)
    build = {
        "store_version": STORE_VERSION, "method": "structured-obs",
        "groups": [[group_name(g), g.consumer, g.num_groups, g.group_size, list(c)] for g, c in zip(groups, counts)],
        "calibration": windows_digest(windows), "propagation": "dense", "dampening": float(dampening),
        **({"compensation": float(compensation)} if compensation != 1.0 else {}),
        **({"fit_bias": True} if fit_bias else {}),
        **({"hessians": True} if store_hessian else {}),
        **(build_info or {}),
    }
    store = DatabaseStore(directory, build)
    store.open()
    if store.is_complete():
        logger.info("Loading the finished structured database from %s.", store.directory)
    # one unit at a time: only its small tensors are held, its weights are read again when stitched
    for name, (tensors, err) in store.iter_stored({g.consumer for g in groups}):
        entries[name], errors[name] = StoredTensors(store.unit_path(name), tensors, LAZY), err
        del tensors
    release_free_memory()
    processes = current_processes()
    processes.barrier()  # every process has read what was stored before any process stores more
    if len(entries) < len(groups):
        start = time.perf_counter()
        by_consumer = {g.consumer: (g, c) for g, c in zip(groups, counts)}
        solved = 0
        # under `accelerate launch` each process solves its share of the groups (dense propagation: no group needs
        # another's weights), calibrating only the blocks that hold them, and reads the others' from the store
        pending = agreed_pending(processes, consumers, entries, errors)
        owners = processes.owners([solve_cost(u.shape) for u in pending])
        mine = [u for u, owner in zip(pending, owners) if owner == processes.rank]
        elsewhere = [u.name for u, owner in zip(pending, owners) if owner != processes.rank]

        def needs_statistics(block_name: str) -> bool:
            return any(u.name not in entries for u in mine if u.block == block_name)

        def process_block(block_name: str, block_units: list[Unit], stats: dict[str, UnitStatistics]):
            nonlocal solved
            for unit in block_units:
                if unit.name in entries:
                    continue
                group, c = by_consumer[unit.name]
                s = stats[unit.name]
                bias = getattr(unit.module, "bias", None) if fit_bias else None
                entries[unit.name], errors[unit.name] = _solve_group(
                    group, c, s.weight, s.hessian, method, dampening, store_hessian, compensation,
                    mean=s.mean if fit_bias else None, bias=bias if isinstance(bias, torch.Tensor) else None)
                store.save_unit(unit.name, entries[unit.name], errors[unit.name])
                entries[unit.name] = StoredTensors(store.unit_path(unit.name), entries[unit.name], LAZY)
                solved += 1
                release_free_memory()
            return None  # dense propagation: the next block sees the dense block's outputs

        if mine:
            calibrate_windows(model, mine, windows, batch_size, needs_statistics, process_block, device=device,
                              progress=progress)
        processes.barrier()
        load_stored_elsewhere(store, elsewhere, entries, errors, LAZY)
        logger.info("Structured database: %d groups solved%s, %d loaded, in %.1f s.", solved,
                    f" here, {len(elsewhere)} by the job's other processes" if processes.spread else "",
                    len(groups) - solved - len(elsewhere), time.perf_counter() - start)
    if not store.is_complete() and processes.is_main:
        store.write_manifest([{"name": g.consumer, "group": group_name(g), "keep": list(c),
                               "errors": errors[g.consumer].tolist()} for g, c in zip(groups, counts)])
    return StructuredDatabase(model, groups, counts, [entries[g.consumer] for g in groups],
                              [errors[g.consumer].numpy() for g in groups], keep_producers=store_hessian)
