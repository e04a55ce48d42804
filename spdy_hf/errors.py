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
