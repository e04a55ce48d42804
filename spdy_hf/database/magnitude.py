"""Magnitude pruning, the data-free baseline: at sparsity s, zero the s * numel smallest |w| of a unit."""

from __future__ import annotations

import torch

from ..modeling.patterns import two_four_magnitude_mask
from ..modeling.units import Unit
from .base import PruningDatabase


class MagnitudeDatabase(PruningDatabase):
    """Keeps each unit's dense weight and the order of its entries by magnitude.

    Level k zeros the first round(s_k * numel) entries of that order, so masks are nested across levels by
    construction, and every level of every unit costs one sort up front and no further memory.
    """

    def __init__(self, units: list[Unit], levels: list[float], patterns: list[str] | None = None):
        super().__init__(units, levels)
        self.patterns = list(patterns) if patterns is not None else ["dense"] + ["unstructured"] * (len(levels) - 1)
        self.dense: list[torch.Tensor] = []
        self.order: list[torch.Tensor] = []
        for unit in units:
            w = unit.weight.detach().clone(memory_format=torch.contiguous_format)  # (out, in), row-major
            self.dense.append(w)
            # int32 halves the memory of the order; stable sort so ties break the same way every run
            order = torch.argsort(w.abs().reshape(-1), stable=True)
            self.order.append(order.to(torch.int32))

    def num_zeros(self, unit_index: int, level_index: int) -> int:
        return int(round(self.levels[level_index] * self.dense[unit_index].numel()))

    def weight(self, unit_index: int, level_index: int) -> torch.Tensor:
        w = self.dense[unit_index].clone()
        if self.patterns[level_index] == "2:4":  # not nested with the unstructured levels: its own mask
            return w.masked_fill_(two_four_magnitude_mask(w), 0.0)
        self._zero(w, unit_index, level_index)
        return w

    def _zero(self, w: torch.Tensor, unit_index: int, level_index: int) -> None:
        n = self.num_zeros(unit_index, level_index)
        if n:
            w.view(-1)[self.order[unit_index][:n].long()] = 0.0

    def _write(self, unit_index: int, level_index: int) -> None:
        target = self.units[unit_index].weight
        if target.is_contiguous() and self.patterns[level_index] != "2:4":
            target.copy_(self.dense[unit_index])
            self._zero(target, unit_index, level_index)
        else:  # GPT-2's Conv1D: the (out, in) view is transposed, so flat indices do not apply to it
            target.copy_(self.weight(unit_index, level_index))
