"""The interface every level family implements, and what it hands the pipeline.

A family decides what a search unit is (a layer, or a block's attention or FFN), which levels it has, what those
levels cost (latency), which weights they leave (the pruning database), how a profile is put into the live model
for scoring (`stitch`) and into its fast form for timing (`measure`), and how the result is described. The
pipeline (`spdy_hf.pipeline.run`) runs the stages in order and never looks inside.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import BACKEND_DTYPES, RegimeConfig, SPDYConfig
from ..latency.backend import interleaved_timer, regime_inputs, table_environment
from ..latency.regime import end_to_end_call
from ..latency.table import TIMING_NOISE_KINDS, LatencyTable
from ..modeling.levels import get_levels, get_patterns
from ..modeling.loading import model_fingerprint
from ..modeling.units import Unit
from ..search import Budgets


@dataclass(frozen=True)
class Plan:
    """What the profile stage hands on."""

    units: list[Unit]  # every prunable layer of the model (the result describes each)
    names: list[str]  # the search units: layers, or "<block>:attention" / "<block>:ffn" groups
    times: np.ndarray  # (U, K) ms of each search unit at each of its levels, dense first; inf: no such level
    base_ms: float  # the dense model end to end: speedups are relative to it
    reference_ms: float | None  # the all-dense model in the form `times` were measured in (None: base_ms)
    table: LatencyTable  # the latency table behind `times`, saved with the result
    # how noisy the timing behind `times` was, a fraction, and what that figure measures (a key of
    # `spdy_hf.latency.table.TIMING_NOISE_KINDS`: the cpu table's prediction error, or the structured table's spread
    # of dense times); None where the table has none (cuda per-layer tables, hand-written ones)
    timing_noise: float | None = None
    timing_noise_kind: str | None = None
    latency_times: str = "measured"  # what `times` are: "measured", or "fitted" (structured levels)
    layout: Any = None  # the family's own map of its search units and their levels (e.g. `StructuredLayout`)

    def report(self) -> dict[str, Any]:
        """The profile stage's entries of the report."""
        return {"timing_noise": self.timing_noise, "timing_noise_kind": self.timing_noise_kind,
                "latency_times": self.latency_times}

    def describe_noise(self) -> str:
        """The timing noise as a reader needs it: the figure and what it measures."""
        if self.timing_noise is None:
            return "no timing noise figure"
        what = TIMING_NOISE_KINDS.get(self.timing_noise_kind, "of a kind the table does not name")
        return f"{100 * self.timing_noise:.1f}% ({what})"


@dataclass(frozen=True)
class LevelGrid:
    """The backend's sparse levels of a job (`config.levels`): each level's sparsity and pattern, dense first."""

    levels: list[float]
    patterns: list[str]

    @classmethod
    def of(cls, config: SPDYConfig) -> LevelGrid:
        return cls(get_levels(config.levels), get_patterns(config.levels))


@dataclass(frozen=True)
class Measurement:
    """One end-to-end measurement of the pruned model in its deployed form against the dense model."""

    dense_ms: float
    pruned_ms: float
    deployed_dense_ms: float | None = None  # the dense model in the deployed form, where the family measures it

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.pruned_ms


@dataclass
class Entries:
    """How a family describes a chosen profile."""

    profile: list[dict[str, Any]]  # per layer (`spdy_profile.json`'s "units")
    groups: list[dict[str, Any]] | None = None  # per attention/FFN group, for families that have them
    report: dict[str, Any] = field(default_factory=dict)  # the family's own report entries


@dataclass(frozen=True)
class Databases:
    """What the database stage hands on: the pruned weights of every level, and the report's summary of them."""

    info: dict[str, Any]  # the report's "database" entry
    structured: Any = None  # a `StructuredDatabase` (structured and mixed families)
    layers: Any = None  # a per-layer `PruningDatabase` (unstructured and mixed families)
    offsets: np.ndarray | None = None  # mixed: the index in `layers` of each group's first layer

    def report(self) -> dict[str, Any]:
        return {"database": self.info}


class Family:
    """A level family: subclass it, implement the methods below, and register it (`register_family`).

    A family holds nothing of a job's stages: what the profile stage finds is in the `Plan` (its `layout`), what the
    database stage builds is in the `Databases`, and which levels the live model holds is the search stage's
    (`spdy_hf.search.LiveProfile`). So one family object serves a job from start to end, and each stage's artifact
    says all the next one reads.
    """

    name = ""
    # whether the database stage reads the target's budgets (a sequential database anchored at the target's level):
    # a run with several targets then builds one database per target, else one for all
    database_per_target = False
    # the regime dtypes the family's kernels take, per backend (a subset of `config.BACKEND_DTYPES`)
    backend_dtypes: dict[str, tuple[str, ...]] = BACKEND_DTYPES

    def __init__(self, config: SPDYConfig, model: nn.Module, progress: bool = True):
        self.config = config
        self.model = model
        self.progress = progress
        # one forward pass's inputs in the regime (for decode, a cache filled by the model while it is dense)
        self.inputs = regime_inputs(model, config.regime)

    def plan(self, units: list[Unit], latency_table: LatencyTable | str | None = None) -> Plan:
        """The profile stage: search units, their levels' times (from `latency_table`, the cache, or measured)."""
        raise NotImplementedError

    def build_database(self, plan: Plan, windows: dict[str, torch.Tensor], budgets: Budgets) -> Databases:
        """The database stage: the pruned weights of every level (built, resumed or loaded), with the report's
        summary of them."""
        raise NotImplementedError

    def prior(self, plan: Plan, databases: Databases) -> np.ndarray:
        """The DP's error prior, (U, K) or (1, K): a level's cost is the unit's sensitivity times this."""
        raise NotImplementedError

    def level_subsets(self, plan: Plan) -> dict[str, np.ndarray]:
        """Named (U, K) masks of levels the search also explores on their own (`spdy_search`'s `subsets`): a
        family that mixes kinds of level gives each kind. None (an empty mapping) by default."""
        return {}

    def stitch_unit(self, plan: Plan, databases: Databases, index: int, level: int) -> None:
        """Writes search unit `index` at `level` from the database into the live model, in place, in a form that
        keeps every shape (for scoring and saving). `LiveProfile` calls it for the units whose level changes."""
        raise NotImplementedError

    def finalize(self, plan: Plan, databases: Databases, profile: np.ndarray) -> None:
        """Makes the live model, with `profile` stitched, exactly the pruned model the job returns (the structured
        families zero the producers of removed groups, which stitching leaves for speed). Idempotent."""

    def measure(self, plan: Plan, databases: Databases, profile: np.ndarray, regime: RegimeConfig | None = None
                ) -> Measurement:
        """Times the stitched profile in its deployed form against the dense model, end to end, interleaved, in
        `regime` (default the config's; `spdy_hf.latency.regime.end_to_end_call`): ms per forward pass or token."""
        raise NotImplementedError

    def entries(self, plan: Plan, databases: Databases, profile: np.ndarray, measurement: Measurement | None
                ) -> Entries:
        """The profile as the result, the saved files and the report describe it."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers every family uses
    def end_to_end_calls(self, forms: list[Callable[[], None]], regime: RegimeConfig | None = None
                         ) -> tuple[list[Callable[[], object]], int, int]:
        """For each form (a function that puts the model in it; the last one is left in place), what verify times
        in the regime, built in that form; and the units of work per call and the timed calls to make."""
        regime = regime or self.config.regime
        calls, per = [], 1
        for enter in forms:
            enter()
            call, per = end_to_end_call(self.model, regime, self.config.timing.generate_tokens)
            calls.append(call)
        repeats = max(10, self.config.timing.verify_repeats)
        if per > 1:  # a decode call generates `per` tokens: fewer calls time as many tokens
            repeats = max(5, -(-self.config.timing.verify_repeats // 5))
        return calls, per, repeats

    @property
    def timer(self):
        return interleaved_timer(self.config.backend)

    @property
    def environment(self) -> dict:
        """The part of the machine a latency table depends on (its cache key)."""
        return table_environment(self.config.backend)

    @property
    def fingerprint(self) -> str:
        """The model's class and config (what latency depends on)."""
        return model_fingerprint(self.model)

    def given_table(self, latency_table: LatencyTable | str | os.PathLike | None) -> LatencyTable | None:
        """The table passed to this job (an object or a path), else the config's, else None."""
        table = latency_table if latency_table is not None else self.config.latency_table
        if isinstance(table, (str, os.PathLike)):
            table = LatencyTable.load(table)
        return table
