"""Errors a user can cause. Each message says what went wrong and what to do about it."""

from __future__ import annotations


class SPDYError(Exception):
    """Base class of every error spdy_hf raises on purpose."""


class ConfigError(SPDYError, ValueError):
    """A config field has a value spdy_hf cannot use."""


class UnreachableTargetError(SPDYError):
    """The target speedup cannot be met with the measured latencies and the allowed levels."""

    def __init__(self, target_speedup: float, max_reachable_speedup: float, family: str | None = None):
        self.target_speedup = target_speedup
        self.max_reachable_speedup = max_reachable_speedup
        other = ("allow structured levels (family: structured or mixed; removing heads and FFN neurons pays on "
                 "every device), or choose a regime (batch size, sequence length) where sparse kernels pay more"
                 if family in (None, "unstructured") else
                 "or prune in a regime where the searched blocks weigh more (a longer sequence, a larger batch)")
        super().__init__(
            f"Target speedup {target_speedup:.3g}x is unreachable: with every unit at its fastest measured "
            f"level the model is at most {max_reachable_speedup:.3f}x faster than dense in this regime "
            f"on this backend. Ask for a target of at most {max_reachable_speedup:.3f}, {other}."
        )


class NoProfileFitsError(SPDYError, ValueError):
    """No profile of the allowed levels fits the time budget the search was asked to meet."""

    def __init__(self, budget_ms: float, fastest_ms: float, buckets: int):
        super().__init__(
            f"No profile fits the time budget of {budget_ms:.4g} ms: every unit at its fastest level takes "
            f"{fastest_ms:.4g} ms (each time rounded up to one of {buckets} buckets). Check the target first "
            "(`spdy_hf.search.compute_budget` and `fits`), then ask for a lower target speedup.")


class NonFiniteScoreError(SPDYError):
    """Every candidate profile scored NaN or infinity: the model's outputs are not finite on the scoring windows."""

    def __init__(self, candidates: int):
        super().__init__(
            f"Every one of the {candidates} candidate profiles scored NaN or infinity against the dense model: the "
            "model's outputs are not finite on the calibration windows. Check that the dense model gives finite "
            "outputs on the calibration text (a damaged checkpoint gives NaN everywhere); score in float32 "
            "(search.score_dtype: float32) where a half precision overflows; or calibrate on other text.")


class DamagedModelFileError(SPDYError):
    """A model file is not what its name says: truncated, overwritten, or a Git LFS pointer instead of the weights."""

    def __init__(self, path: str, problem: str, remedy: str):
        self.path = path
        super().__init__(f"The model file {path} is damaged: {problem}. {remedy}")


class NonFiniteCalibrationError(SPDYError):
    """A layer's calibration inputs hold NaN or infinity, so no data-aware pruning of it exists."""

    def __init__(self):
        super().__init__(
            "A layer's calibration inputs are not finite (NaN or infinity), so OBS cannot prune it: the dense model's "
            "activations on the calibration text overflow or the checkpoint holds NaN. Check that the dense model "
            "gives finite outputs on the calibration text; load it in float32 if a half precision overflows, or "
            "prune without data (method: magnitude).")
