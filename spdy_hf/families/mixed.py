"""The mixed family: the structured family's groups and levels, plus, per group, the backend's sparse levels
(`config.levels`) on all the group's linear layers at once, and combinations ("structured+sparse").

- A sparse level's time is the group's dense time plus the per-layer latency table's sparse-minus-dense times of
  its layers; its weights are the unstructured family's database's.
- A combination keeps a partial count of heads/neurons and puts the rest at one of the group's sparse levels that
  pay (at most `structured.mixed_combos`). Its time: the structured level's plus the sparse-minus-dense time
  scaled by the share kept. Its weights: the unstructured database's kept producer rows, and an OBS pass over the
  kept consumer columns (`StructuredDatabase.combo_weight`). Its prior: the sum of both parts' errors.

Everything else (the structured levels, the structured database, stitching and describing them, verify on a
deployed copy) is the structured family's; the per-layer table and database are the unstructured family's.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import numpy as np
from torch import nn

from ..config import BACKEND_DTYPES, SPDYConfig
from ..deploy.shrink import STRUCTURED_SPARSE
from ..modeling.groups import StructuredGroup
from ..modeling.loading import weights_fingerprint
from ..modeling.units import Unit
from ..search import anchor_level
from .base import Databases, LevelGrid
from .registry import register_family
from .structured import StructuredFamily, removal_order
from .unstructured import build_database, unit_latency_table


@register_family
class MixedFamily(StructuredFamily):
    name = "mixed"
    database_per_target = True  # anchored at the level the target's budget leaves each layer
    backend_dtypes = {**BACKEND_DTYPES, "cpu": ("float32",)}  # its CPU levels are CSR products: float32 only
    uses_levels = True

    def sparse_levels(self, units, table):
        grid = LevelGrid.of(self.config)
        return unit_latency_table(self, units, table, grid), grid

    def group_levels(self, layout, i, group_times):
        level_map, row = super().group_levels(layout, i, group_times)
        unit_table, levels, patterns = layout.unit_table, layout.grid.levels, layout.grid.patterns
        ut = unit_table.times_for(unit_table.keys_for(layout.group_units[i]))  # (layers, K)
        delta = (ut[:, 1:] - ut[:, :1]).sum(axis=0)  # sparse minus dense, summed over the group's layers
        for j in range(1, len(levels)):
            level_map.append(("unstructured", 0, j))
            row.append(group_times[0] + delta[j - 1])
        # the sparse levels that pay for this group, least sparse first, also combine with partial keeps; a
        # shrunk layer's sparse-minus-dense time is taken as its full one scaled by the share it keeps
        paying = [j for j in range(1, len(levels)) if np.isfinite(delta[j - 1]) and delta[j - 1] < 0]
        paying = paying[:self.config.structured.mixed_combos]
        group, counts = layout.groups[i], layout.counts[i]
        for a in range(1, len(group_times) - 1):
            share = counts[a] / group.num_groups
            for j in paying:
                if patterns[j] == "2:4" and not two_four_fits(self.model, group, counts[a], self.config):
                    continue
                level_map.append((STRUCTURED_SPARSE, a, j))
                row.append(group_times[a] + share * delta[j - 1])
        return level_map, row

    def level_subsets(self, plan) -> dict[str, np.ndarray]:
        """The structured levels alone and the sparse ones alone (with dense), each also searched on its own: the
        mixed search then does at least as well as its own starts in either family (a group's prior ranks its
        kinds of level against each other, and no sensitivity changes that ranking)."""
        structured = np.zeros(plan.times.shape, dtype=bool)
        sparse = np.zeros(plan.times.shape, dtype=bool)
        for i, level_map in enumerate(plan.layout.level_maps):
            for level, (kind, a, _) in enumerate(level_map):
                structured[i, level] = kind == "structured"
                sparse[i, level] = kind == "unstructured" or (kind == "structured" and a == 0)
        return {"structured": structured, "sparse": sparse}

    def keeps_hessians(self) -> bool:
        return self.config.structured.mixed_combos > 0

    def build_database(self, plan, windows, budgets) -> Databases:
        weights = None if self.config.method == "magnitude" else weights_fingerprint(self.model)
        databases = self.group_database(plan, windows, weights)
        layout = plan.layout
        flat = [u for us in layout.group_units for u in us]
        flat_times = np.concatenate([layout.unit_table.times_for(layout.unit_table.keys_for(us))
                                     for us in layout.group_units])
        share = budgets.search.budget_ms / max(budgets.target.prunable_ms, 1e-9)  # the groups' share of their time
        anchor = anchor_level(flat_times, share * float(flat_times[:, 0].sum()))
        config = self.config
        if config.database.dir is not None:  # the user's directory: one store each
            config = copy.deepcopy(config)
            config.database.dir = os.path.join(self.config.database.dir, "unstructured")
        layers, info = build_database(config, self.model, flat, layout.grid.levels, windows, anchor, self.progress,
                                      patterns=layout.grid.patterns, weights=weights)
        return dataclasses.replace(databases, layers=layers, info={**databases.info, "unstructured": info},
                                   offsets=np.cumsum([0] + [len(us) for us in layout.group_units]))

    def sparse_errors(self, plan, databases, i):
        """Group i's prior at each sparse level: its layers' measured errors weighted by size, or the sparsity
        squared (`error_prior: spdy`, and magnitude pruning)."""
        layers = plan.layout.group_units[i]
        sizes = np.array([u.numel for u in layers], dtype=np.float64)
        if self.config.resolved_error_prior() != "measured":
            return np.asarray(plan.layout.grid.levels) ** 2
        errs = databases.layers.errors[databases.offsets[i]:databases.offsets[i + 1]]  # (layers, K)
        return (sizes[:, None] * errs).sum(0) / sizes.sum()

    def stitch_level(self, plan, databases, i, kind, a, j):
        if kind == "structured":
            return super().stitch_level(plan, databases, i, kind, a, j)
        layout, sdb, udb = plan.layout, databases.structured, databases.layers
        layers, first = layout.group_units[i], int(databases.offsets[i])
        if kind == "unstructured":
            sdb.restore(i)
            for offset, unit in enumerate(layers):
                unit.weight.copy_(udb.weight(first + offset, j).to(unit.weight.dtype))
            return None
        # removed heads/neurons zero, the kept producer rows and consumer columns at sparse level j
        sdb.stitch(i, a)
        kept = sdb.kept(i, a)
        for offset, unit in enumerate(layers[:-1]):
            rows = layout.groups[i].producer_indices(unit.name, kept)
            unit.weight[rows] = udb.weight(first + offset, j)[rows].to(unit.weight.dtype)
        consumer = layers[-1]
        consumer.weight.copy_(sdb.combo_weight(i, a, layout.grid.levels[j], layout.grid.patterns[j])
                              .to(consumer.weight.dtype))
        return None

    def describe_level(self, plan, databases, i, kind, a, j):
        if kind == "structured":
            return super().describe_level(plan, databases, i, kind, a, j)
        g, grid = plan.layout.groups[i], plan.layout.grid
        if kind == "unstructured":
            return dict(family="unstructured", keep=g.num_groups, kept=list(range(g.num_groups)),
                        sparsity=grid.levels[j], pattern=grid.patterns[j])
        sdb = databases.structured
        return dict(family=STRUCTURED_SPARSE, keep=plan.layout.counts[i][a], kept=sdb.kept(i, a),
                    sparsity=grid.levels[j], pattern=grid.patterns[j],
                    removal_order=removal_order(sdb, i, a, g.num_groups))


def two_four_fits(model: nn.Module, group: StructuredGroup, keep: int, config: SPDYConfig) -> bool:
    """Whether every layer of `group` shrunk to `keep` heads/neurons can still run as 2:4 on the GPU."""
    from ..deploy.two_four import two_four_ineligibility

    modules = dict(model.named_modules())
    shape = {n: Unit(name=n, module=modules[n], block=group.block).shape for n in [*group.producers, group.consumer]}
    shapes = [(len(group.producer_indices(n, list(range(keep)))), shape[n][1]) for n in group.producers]
    shapes.append((shape[group.consumer][0], keep * group.group_size))
    return all(two_four_ineligibility(shape, config.regime.dtype) is None for shape in shapes)
