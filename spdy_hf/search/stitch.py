"""The profile the live model holds while a job runs: one object of the search stage, handed on to recovery and
verify, so that no family keeps track of what was written into the model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .lowered import lowered


class LiveProfile:
    """Writes profiles into the live model through the family (`family.stitch_unit`), only the search units whose
    level changed since the last write. Calling it with a profile stitches that profile; `levels` is what the model
    holds now (all dense when made: the model it is given has not been pruned)."""

    def __init__(self, family, plan, databases):
        self.family = family
        self.plan = plan
        self.databases = databases
        self.levels = [0] * len(plan.names)  # the level each search unit's weights hold; -1: not known

    def __call__(self, profile) -> None:
        if len(profile) != len(self.levels):
            raise ValueError(f"A profile needs one level per search unit: got {len(profile)} for {len(self.levels)}.")
        for index, level in enumerate(profile):
            level = int(level)
            if self.levels[index] != level:
                self.family.stitch_unit(self.plan, self.databases, index, level)
                self.levels[index] = level

    def forget(self) -> None:
        """The model's weights were replaced by other means (read back from disk): the next call writes every unit."""
        self.levels = [-1] * len(self.levels)

    def rewrite(self, profile) -> None:
        """Writes every unit of `profile` again, whatever the model held (after its weights were read back)."""
        self.forget()
        self(profile)

    @contextmanager
    def lowered(self, dtype: torch.dtype | None) -> Iterator[torch.dtype | None]:
        """The model run in `dtype` within the block (`spdy_hf.search.lowered.lowered`: the candidates scored in
        bfloat16); afterwards its float32 weights are read back and the profile it held at the end of the block is
        written again, so the model leaves the block holding that profile at full precision."""
        with lowered(self.family.model, dtype) as running:
            yield running
            held = list(self.levels)
        self.rewrite(held)
