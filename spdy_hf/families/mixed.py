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
import os

import numpy as np
from torch import nn

from ..config import SPDYConfig
from ..deploy import STRUCTURED_SPARSE
from ..levels import get_levels, get_patterns
from ..search import anchor_level
from ..structured import StructuredGroup
from ..units import Unit
from .structured import StructuredFamily
from .unstructured import build_database, unit_latency_table


class MixedFamily(StructuredFamily):
    name = "mixed"
    uses_levels = True

    def plan_unit_table(self, units, table):
        self.levels, self.patterns = get_levels(self.config.levels), get_patterns(self.config.levels)
        return unit_latency_table(self, units, table)

    def group_levels(self, i, group_times):
        level_map, row = super().group_levels(i, group_times)
        ut = self.unit_table.times_for(self.unit_table.keys_for(self.group_units[i]))  # (layers, K)
        delta = (ut[:, 1:] - ut[:, :1]).sum(axis=0)  # sparse minus dense, summed over the group's layers
        for j in range(1, len(self.levels)):
            level_map.append(("unstructured", 0, j))
            row.append(group_times[0] + delta[j - 1])
        # the sparse levels that pay for this group, least sparse first, also combine with partial keeps; a
        # shrunk layer's sparse-minus-dense time is taken as its full one scaled by the share it keeps
        paying = [j for j in range(1, len(self.levels)) if np.isfinite(delta[j - 1]) and delta[j - 1] < 0]
        paying = paying[:self.config.structured.mixed_combos]
        group, counts = self.groups[i], self.counts[i]
        for a in range(1, len(group_times) - 1):
            share = counts[a] / group.num_groups
            for j in paying:
                if self.patterns[j] == "2:4" and not two_four_fits(self.model, group, counts[a], self.config):
                    continue
                level_map.append((STRUCTURED_SPARSE, a, j))
                row.append(group_times[a] + share * delta[j - 1])
        return level_map, row

    def level_subsets(self) -> dict[str, np.ndarray]:
        """The structured levels alone and the sparse ones alone (with dense), each also searched on its own: the
        mixed search then does at least as well as its own starts in either family (a group's prior ranks its
        kinds of level against each other, and no sensitivity changes that ranking)."""
        structured = np.zeros(self.times.shape, dtype=bool)
        sparse = np.zeros(self.times.shape, dtype=bool)
        for i, level_map in enumerate(self.level_maps):
            for level, (kind, a, _) in enumerate(level_map):
                structured[i, level] = kind == "structured"
                sparse[i, level] = kind == "unstructured" or (kind == "structured" and a == 0)
        return {"structured": structured, "sparse": sparse}

    def keeps_hessians(self) -> bool:
        return self.config.structured.mixed_combos > 0

    def build_database(self, plan, windows, budget, search_budget) -> dict:
        info = super().build_database(plan, windows, budget, search_budget)
        flat = [u for us in self.group_units for u in us]
        flat_times = np.concatenate([self.unit_table.times_for(self.unit_table.keys_for(us))
                                     for us in self.group_units])
        share = search_budget.budget_ms / max(budget.prunable_ms, 1e-9)  # the groups' share of their time
        anchor = anchor_level(flat_times, share * float(flat_times[:, 0].sum()))
        config = self.config
        if config.database.dir is not None:  # the user's directory: one store each
            config = copy.deepcopy(config)
            config.database.dir = os.path.join(self.config.database.dir, "unstructured")
        self.udb, info["unstructured"] = build_database(config, self.model, flat, self.levels, windows, anchor,
                                                        self.progress, patterns=self.patterns, weights=self.weights)
        self.offsets = np.cumsum([0] + [len(us) for us in self.group_units])
        return info

    def sparse_errors(self, i):
        """Group i's prior at each sparse level: its layers' measured errors weighted by size, or the sparsity
        squared (`error_prior: spdy`, and magnitude pruning)."""
        sizes = np.array([u.numel for u in self.group_units[i]], dtype=np.float64)
        if self.config.resolved_error_prior() != "measured":
            return np.asarray(self.levels) ** 2
        errs = self.udb.errors[self.offsets[i]:self.offsets[i + 1]]  # (layers, K)
        return (sizes[:, None] * errs).sum(0) / sizes.sum()

    def stitch_level(self, i, kind, a, j):
        if kind == "structured":
            return super().stitch_level(i, kind, a, j)
        layers, first = self.group_units[i], int(self.offsets[i])
        if kind == "unstructured":
            self.sdb.restore(i)
            for offset, unit in enumerate(layers):
                unit.weight.copy_(self.udb.weight(first + offset, j).to(unit.weight.dtype))
            return None
        # removed heads/neurons zero, the kept producer rows and consumer columns at sparse level j
        self.sdb.stitch(i, a)
        kept = self.sdb.kept(i, a)
        for offset, unit in enumerate(layers[:-1]):
            rows = self.groups[i].producer_indices(unit.name, kept)
            unit.weight[rows] = self.udb.weight(first + offset, j)[rows].to(unit.weight.dtype)
        consumer = layers[-1]
        consumer.weight.copy_(self.sdb.combo_weight(i, a, self.levels[j], self.patterns[j]).to(consumer.weight.dtype))
        return None

    def describe_level(self, i, kind, a, j):
        if kind == "structured":
            return super().describe_level(i, kind, a, j)
        g = self.groups[i]
        if kind == "unstructured":
            return dict(family="unstructured", keep=g.num_groups, kept=list(range(g.num_groups)),
                        sparsity=self.levels[j], pattern=self.patterns[j])
        return dict(family=STRUCTURED_SPARSE, keep=self.counts[i][a], kept=self.sdb.kept(i, a),
                    sparsity=self.levels[j], pattern=self.patterns[j], removal_order=self.removal_order(i, a))


def two_four_fits(model: nn.Module, group: StructuredGroup, keep: int, config: SPDYConfig) -> bool:
    """Whether every layer of `group` shrunk to `keep` heads/neurons can still run as 2:4 on the GPU."""
    from ..latency.cuda import two_four_ineligibility

    modules = dict(model.named_modules())
    shape = {n: Unit(name=n, module=modules[n], block=group.block).shape for n in [*group.producers, group.consumer]}
    shapes = [(len(group.producer_indices(n, list(range(keep)))), shape[n][1]) for n in group.producers]
    shapes.append((shape[group.consumer][0], keep * group.group_size))
    return all(two_four_ineligibility(shape, config.regime.dtype) is None for shape in shapes)
