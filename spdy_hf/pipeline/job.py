"""A pruning job as one object: what every stage reads (the config, the model, the token windows, progress) and
the clock that times the stages."""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import SPDYConfig
from ..latency.backend import model_device
from ..latency.environment import environment_info
from ..utils.io import release_free_memory

logger = logging.getLogger(__name__)


def peak_rss_mb() -> float | None:
    """The process's peak resident memory so far in MiB (None where the platform does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)  # bytes on macOS, KiB on Linux


class StageTimer:
    """Wall seconds of each stage, for the report; `with stages("name"): ...`. A stage entered twice (held-out
    quality: dense, then pruned) adds up. `peak_mb` holds the process's peak memory when each stage ended, so the
    stage that raised the peak is the first whose value reaches the last."""

    def __init__(self, seconds: dict[str, float] | None = None):
        self.seconds = seconds if seconds is not None else {}
        self.peak_mb: dict[str, float | None] = {"start": peak_rss_mb()}
        self.parent: StageTimer | None = None
        self.own: dict[str, float] = {}  # the stages timed on this timer itself, not on its branches

    def branch(self) -> StageTimer:
        """A timer for one target of a run with several: it starts with the stages this timer timed itself (those
        the targets share) and adds its own, which this timer sums over every target too."""
        child = StageTimer(dict(self.own))
        child.peak_mb = dict(self.peak_mb)
        child.parent = self
        return child

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        logger.info("Stage %s ...", name)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[name] = round(self.seconds.get(name, 0.0) + elapsed, 3)
            self.own[name] = round(self.own.get(name, 0.0) + elapsed, 3)
            if self.parent is not None:
                self.parent.seconds[name] = round(self.parent.seconds.get(name, 0.0) + elapsed, 3)
            release_free_memory()  # what the stage freed goes back to the OS before the next one allocates
            for timer in (self, self.parent) if self.parent is not None else (self,):
                timer.peak_mb.pop(name, None)  # kept in the order the stages ended
                timer.peak_mb[name] = peak_rss_mb()


@dataclass
class Job:
    """One pruning job.

    Attributes:
        config: the job's settings.
        model: the dense model, pruned in place as the stages run.
        windows: calibration token windows, `{"input_ids": (N, L), "attention_mask": (N, L)}`.
        heldout: token windows of held-out text, or None: the dense and the pruned model's quality on them
            (perplexity for causal LMs, embedding cosine otherwise) goes into the report.
        tokenizer: saved with the result.
        latency_table: a `LatencyTable` or its path, instead of the cache or a measurement.
        progress: show progress bars.
        stages: the stages' wall seconds and peak memory (`StageTimer`).
    """

    config: SPDYConfig
    model: nn.Module
    windows: dict[str, torch.Tensor]
    heldout: dict[str, torch.Tensor] | None = None
    tokenizer: Any = None
    latency_table: Any = None
    progress: bool = True
    stages: StageTimer = field(default_factory=StageTimer)

    def example_inputs(self) -> dict[str, torch.Tensor]:
        """One calibration window on the model's device: what finding the units runs the model on."""
        return {k: v[:1].to(model_device(self.model)) for k, v in self.windows.items()}

    def report(self) -> dict[str, Any]:
        """The job's own entries of the report: what it ran in, and what its stages took."""
        config = self.config
        return {"backend": config.backend, "regime": config.regime.to_dict(), "method": config.method,
                "stage_seconds": dict(self.stages.seconds), "stage_peak_rss_mb": dict(self.stages.peak_mb),
                "environment": environment_info()}
