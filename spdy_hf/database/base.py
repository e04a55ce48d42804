"""The interface the search and the pruner use: a weight for every (unit, level), stitched in place."""

from __future__ import annotations

import torch

from ..modeling.units import Unit


class PruningDatabase:
    """Pruned weights for every unit at every level (level 0 is dense). Levels are nested.

    Subclasses implement `weight`. `write` puts one unit's level into the live model in place, so the search never
    copies the model; `stitch` writes a whole profile. The database keeps no record of what the model holds: the
    search stage's `LiveProfile` does, and writes only the units whose level changed.
    """

    def __init__(self, units: list[Unit], levels: list[float]):
        self.units = units
        self.levels = list(levels)

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
        for i, level in enumerate(profile):
            self.write(i, int(level))

    def write(self, unit_index: int, level_index: int) -> None:
        """Writes one unit's weight at a level into the model, in place (whatever it held before)."""
        with torch.no_grad():
            self._write(unit_index, level_index)

    def _write(self, unit_index: int, level_index: int) -> None:
        self.units[unit_index].weight.copy_(self.weight(unit_index, level_index))
