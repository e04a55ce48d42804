"""The interface the search and the pruner use: a weight for every (unit, level), stitched in place."""

from __future__ import annotations

import torch

from ..modeling.units import Unit


class PruningDatabase:
    """Pruned weights for every unit at every level (level 0 is dense). Levels are nested.

    Subclasses implement `weight`. `stitch` writes a level into the live model in place, so the search never
    copies the model; it skips units whose level has not changed since the last stitch.
    """

    def __init__(self, units: list[Unit], levels: list[float]):
        self.units = units
        self.levels = list(levels)
        self._current = [0] * len(units)  # the level each unit's live weight holds now

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    def weight(self, unit_index: int, level_index: int) -> torch.Tensor:
        """The (out, in) weight of a unit at a level."""
        raise NotImplementedError

    def stitch(self, profile: list[int]) -> None:
        """Writes the weights of `profile` (a level index per unit) into the model, in place."""
        if len(profile) != len(self.units):
            raise ValueError(f"A profile needs one level per unit: got {len(profile)} for {len(self.units)} units.")
        with torch.no_grad():
            for i, level in enumerate(profile):
                if self._current[i] != level:
                    self._write(i, int(level))
                    self._current[i] = int(level)

    def forget_stitched(self) -> None:
        """The units' weights were replaced by other means: the next `stitch` writes every unit."""
        self._current = [-1] * len(self.units)

    def write(self, unit_index: int, level_index: int) -> None:
        """Writes one unit's weight at a level into the model, in place (whatever it held before)."""
        with torch.no_grad():
            self._write(unit_index, level_index)

    def _write(self, unit_index: int, level_index: int) -> None:
        self.units[unit_index].weight.copy_(self.weight(unit_index, level_index))
