"""`LatencyTable`: latency is data, not code.

A table holds, for every distinct unit shape and layout code ("outxin:cc", "outxin:tc", ... see
`spdy_hf.latency.cpu`), the time of one forward call at every level in the regime; the dense model's
end-to-end time (the base); the same model with every unit in its deployed dense form; and each unit's
layout code. It is plain versioned JSON that the search reads
and a test can write by hand. Times need not fall as sparsity rises; a level a kernel cannot run is `null`.

Each figure says what it is. `timing_noise` is a different measure per kind of table, named by
`timing_noise_kind` (`TIMING_NOISE_KINDS`); the structured part's `times_ms` are fitted (its `"fitted": true`),
the times they were fitted to kept beside them as `measured_ms` (`spdy_hf.latency.structured`). Tables written
before these names load as they were, named from their own figures.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..errors import SPDYError

logger = logging.getLogger(__name__)

TABLE_VERSION = 1
LAYOUT_CODES = ("cc", "ct", "tc", "tt", "sc", "st")  # `spdy_hf.deploy.kernels.UnitLayout` codes: input then output
PATTERNS = ("dense", "unstructured", "2:4")
# the type each field of a table read from a file must have (the dataclass does not check them)
FIELD_TYPES = {"backend": str, "regime": dict, "levels": list, "shapes": dict, "unit_layouts": dict,
               "input_leaders": dict, "additivity": dict, "model": (str, type(None)), "environment": dict,
               "patterns": (list, type(None)), "ineligible": dict, "structured": dict,
               "timing_noise_kind": (str, type(None))}
# what a table's `timing_noise` measures, by its `timing_noise_kind`
TIMING_NOISE_KINDS = {
    # cpu per-layer tables: how far the table's own prediction of the forward passes it profiled (mixed levels)
    # was from their measured times, median relative error (`additivity`)
    "prediction_error": "the median relative error of the table's prediction of the forward passes it profiled",
    # structured tables: how much the dense model's time, taken once per chunk of levels, spread (relative median
    # absolute deviation)
    "dense_spread": "the spread of the dense model's repeated times",
}


@dataclass
class LatencyTable:
    backend: str
    regime: dict[str, Any]  # batch_size, sequence_length, dtype
    levels: list[float]  # sparsities, dense (0.0) first
    shapes: dict[str, list[float | None]]  # "outxin:layout" -> ms per level; None where the level cannot run
    # the original dense model, end to end, one unit of work in the regime (a forward pass, or a decode step). cpu
    # tables: the deployed dense time below times the measured ratio of the two models' times (robust to drift)
    base_time_ms: float
    # every unit in its deployed form at level 0; None: = base. cpu tables: the table's own estimate (its constant
    # plus the units' dense times), on the time scale of the unit times it is compared with
    deployed_dense_time_ms: float | None = None
    unit_layouts: dict[str, str] = field(default_factory=dict)  # unit name -> layout code, e.g. "ct"; missing: "cc"
    input_leaders: dict[str, str] = field(default_factory=dict)  # unit name -> the unit that transposes its input
    # forward passes of the profiled configurations, measured and as the table predicts them (a check of additivity)
    additivity: dict[str, Any] = field(default_factory=dict)
    model: str | None = None  # fingerprint of the model the base time was measured on
    environment: dict[str, Any] = field(default_factory=dict)
    # the pattern of each level: "dense", "unstructured" or "2:4"; None (older tables): dense then unstructured
    patterns: list[str] | None = None
    ineligible: dict[str, str] = field(default_factory=dict)  # shape key -> why a sparse kernel cannot run it
    # structured levels (`spdy_hf.latency.structured.measure_structured_latency`): per group signature its keep
    # counts and times in the whole (plain) model, each group's signature, and the dense model's time there
    structured: dict[str, Any] = field(default_factory=dict)
    # how noisy the timing was while the table was measured, a fraction; the search's margin is raised to cover it.
    # What it measures depends on the table: `timing_noise_kind`, a key of `TIMING_NOISE_KINDS` (None: not named,
    # a hand-written table). The cuda backend's per-layer tables have none.
    timing_noise: float | None = None
    timing_noise_kind: str | None = None
    version: int = TABLE_VERSION

    def __post_init__(self):
        if self.version != TABLE_VERSION:
            raise SPDYError(
                f"Latency table version {self.version} is not supported (this spdy_hf reads version "
                f"{TABLE_VERSION}); measure it again."
            )
        self._check_types()
        if not self.levels or self.levels[0] != 0.0:
            raise SPDYError("A latency table's levels must start with 0.0 (dense).")
        for key, times in self.shapes.items():
            if not isinstance(times, list) or len(times) != len(self.levels):
                raise SPDYError(f"Latency table shape {key}: {len(times) if isinstance(times, list) else times!r} "
                                f"times for {len(self.levels)} levels.")
            if times[0] is None:
                raise SPDYError(f"Latency table shape {key}: the dense level must have a time.")
            for k, t in enumerate(times):
                _check_time(f"shape {key} at level {k}", t, none_ok=k > 0)
        _check_time("base_time_ms", self.base_time_ms, positive=True)
        if self.deployed_dense_time_ms is not None:
            _check_time("deployed_dense_time_ms", self.deployed_dense_time_ms, positive=True)
        if self.structured:
            self._check_structured()
        if self.timing_noise is not None:
            _check_time("timing_noise", self.timing_noise)
            if self.timing_noise_kind is None:
                self.timing_noise_kind = self._noise_kind_from_figures()
        if self.timing_noise_kind is not None and self.timing_noise_kind not in TIMING_NOISE_KINDS:
            raise SPDYError(f"Latency table field 'timing_noise_kind' must be one of "
                            f"{', '.join(TIMING_NOISE_KINDS)}, not {self.timing_noise_kind!r}; the table is corrupt "
                            "or was edited. Measure it again.")
        if self.patterns is None:
            self.patterns = ["dense"] + ["unstructured"] * (len(self.levels) - 1)
        if len(self.patterns) != len(self.levels):
            raise SPDYError(f"A latency table needs one pattern per level: {len(self.patterns)} for "
                            f"{len(self.levels)} levels.")

    def _check_types(self) -> None:
        def bad(name: str, why: str):
            raise SPDYError(f"Latency table field {name!r} {why}; the table is corrupt or was edited. Measure it again.")

        for name, kind in FIELD_TYPES.items():
            if not isinstance(getattr(self, name), kind):
                bad(name, f"has the wrong type ({type(getattr(self, name)).__name__})")
        for name in ("unit_layouts", "input_leaders", "ineligible"):
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in getattr(self, name).items()):
                bad(name, "must map names to strings")
        if any(code not in LAYOUT_CODES for code in self.unit_layouts.values()):
            bad("unit_layouts", f"holds a code that is not one of {', '.join(LAYOUT_CODES)}")
        if any(isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 <= x < 1 for x in self.levels):
            bad("levels", "must list sparsities in [0, 1)")
        if self.patterns is not None and any(p not in PATTERNS for p in self.patterns):
            bad("patterns", f"must list patterns among {', '.join(PATTERNS)}")

    def _check_structured(self) -> None:
        part = self.structured
        if not isinstance(part.get("signatures"), dict) or not isinstance(part.get("groups"), dict):
            raise SPDYError("A latency table's structured part needs 'signatures' and 'groups' mappings.")
        _check_time("structured dense_ms", part.get("dense_ms"), positive=True)
        for sig, entry in part["signatures"].items():
            keep, times = entry.get("keep"), entry.get("times_ms")
            if not isinstance(keep, list) or not isinstance(times, list) or len(keep) != len(times):
                raise SPDYError(f"Latency table structured signature {sig}: one time per keep count is needed.")
            for k, t in zip(keep, times):
                _check_time(f"structured signature {sig} keeping {k}", t)
        unknown = sorted({s for s in part["groups"].values() if s not in part["signatures"]})
        if unknown:
            raise SPDYError(f"Latency table structured groups name unknown signatures: {unknown[:3]}.")

    def _noise_kind_from_figures(self) -> str | None:
        """The kind of a table's timing noise from the figure it was copied from (tables written before the kind
        was named): the additivity check's error, or the structured part's spread of the dense times."""
        if self.additivity.get("median_relative_error") == self.timing_noise:
            return "prediction_error"
        if self.structured.get("timing_noise") == self.timing_noise:
            return "dense_spread"
        return None

    # ------------------------------------------------------------------ queries
    @property
    def reference_time_ms(self) -> float:
        """The all-dense model in its deployed form: what the searched units' dense times are part of."""
        return self.deployed_dense_time_ms if self.deployed_dense_time_ms is not None else self.base_time_ms

    def layout_of(self, unit_name: str) -> str:
        return self.unit_layouts.get(unit_name, "cc")

    def keys_for(self, units) -> list[str]:
        """The table key of each unit: its shape and its layout code."""
        return [f"{u.shape_key}:{self.layout_of(u.name)}" for u in units]

    def layouts_for(self, units) -> list:
        """The `UnitLayout` of each unit in the deployed model."""
        from ..deploy.kernels import UnitLayout

        index = {u.name: i for i, u in enumerate(units)}
        return [UnitLayout(self.layout_of(u.name), index.get(self.input_leaders.get(u.name))) for u in units]

    def times_for(self, shape_keys: list[str]) -> np.ndarray:
        """(U, K) times in ms for units of the given shapes; inf where a level cannot run."""
        missing = sorted({k for k in shape_keys if k not in self.shapes})
        if missing:
            raise SPDYError(
                f"The latency table has no times for unit shape(s) {', '.join(missing)}; it was measured for "
                "another model. Measure a table for this model (drop --latency-table)."
            )
        rows = [[np.inf if t is None else float(t) for t in self.shapes[k]] for k in shape_keys]
        return np.asarray(rows, dtype=np.float64)

    def check_units(self, names: list[str], model: str | None = None) -> None:
        """Raises if the table's per-unit entries (layouts, input leaders) name units that are not among `names` (a
        table of another model); warns if it was measured on a model of another class or config (`model`)."""
        named = set(self.unit_layouts) | set(self.input_leaders) | set(self.input_leaders.values())
        unknown = sorted(named - set(names))
        if unknown:
            raise SPDYError(
                f"The latency table's unit_layouts/input_leaders name {len(unknown)} unit(s) this model does not "
                f"have ({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}): it was measured for another "
                "model. Measure a table for this model (drop --latency-table).")
        if model is not None and self.model is not None and model != self.model:
            logger.warning("The latency table was measured on another model (fingerprint %s, this one is %s): its "
                           "times hold only if the two run alike.", self.model, model)

    def check_matches(self, backend: str, regime: dict[str, Any], levels: list[float] | None = None,
                      patterns: list[str] | None = None, environment: dict[str, Any] | None = None) -> None:
        """Raises if the table cannot serve this search (other levels, patterns or backend); warns when it was
        measured in another regime or environment (another GPU, driver, torch or cuSPARSELt version). `levels`
        None: the per-layer levels are not used (a structured-only search)."""
        if self.backend != backend:
            raise SPDYError(f"The latency table was measured for backend {self.backend!r}, not {backend!r}.")
        if levels is not None and (
                len(levels) != len(self.levels) or not np.allclose(levels, self.levels, atol=1e-9)
                or (patterns is not None and list(patterns) != list(self.patterns))):
            raise SPDYError(
                "The latency table was measured for other sparsity levels than the config asks for; "
                "measure it again with these levels."
            )
        if self.regime != regime:
            logger.warning("The latency table was measured in regime %s but the config asks for %s.",
                           self.regime, regime)
        if environment:
            differ = {k: (self.environment.get(k), v) for k, v in environment.items()
                      if k in self.environment and self.environment.get(k) != v}
            if differ:
                logger.warning(
                    "The latency table was measured in another environment (%s); its times may not hold here.",
                    ", ".join(f"{k}: table {a!r}, here {b!r}" for k, (a, b) in sorted(differ.items())))

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyTable:
        if not isinstance(data, dict):
            raise SPDYError(f"Not a valid latency table: a JSON object is needed, got {type(data).__name__}.")
        try:
            return cls(**data)
        except TypeError as e:
            raise SPDYError(f"Not a valid latency table: {e}") from e

    def save(self, path: str | os.PathLike) -> None:
        from ..utils.io import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyTable:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise SPDYError(f"Latency table {path!r} does not exist.")
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise SPDYError(f"Latency table {path!r} is not valid JSON: {e}") from e
        return cls.from_dict(data)


def _check_time(what: str, value: Any, none_ok: bool = False, positive: bool = False) -> None:
    """A time must be a finite number >= 0 (> 0 with `positive`); None only where a level cannot run."""
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0):
        raise SPDYError(f"Latency table {what}: {value!r} is not a valid time in ms (a finite, "
                        f"{'positive' if positive else 'non-negative'} number"
                        f"{'; null where the level cannot run' if none_ok else ''}). "
                        "The table is corrupt or was edited; measure it again.")


def cache_key(backend: str, regime: dict, levels: list[float], model: str, environment: dict,
              extra: dict | None = None) -> str:
    """A stable name for a cached table: it is reused only when all of these match."""
    payload = json.dumps(
        {"version": TABLE_VERSION, "backend": backend, "regime": regime, "levels": [round(x, 9) for x in levels],
         "model": model, "environment": environment, **({"extra": extra} if extra else {})},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def default_cache_dir() -> str:
    root = os.environ.get("SPDY_HF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "spdy_hf"
    )
    return root
