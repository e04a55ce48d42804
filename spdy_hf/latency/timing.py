"""Wall-clock timing on the CPU: warm up, repeat, take the median."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_ms(fn: Callable[[], object] | list[Callable[[], object]], warmup: int, repeats: int) -> float:
    """Median wall time in milliseconds of `repeats` calls after `warmup` untimed calls.

    `fn` may be a list of equivalent functions, called in turn (to time a layer on weights not hot in cache).
    """
    fns = fn if isinstance(fn, list) else [fn]
    for i in range(warmup):
        fns[i % len(fns)]()
    samples = []
    for i in range(repeats):
        call = fns[i % len(fns)]
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def interleaved_median_ms(fns: list[Callable[[], object]], warmup: int, repeats: int) -> list[float]:
    """Times the functions in turn (a, b, c, a, b, c, ...) so drifts in machine load hit all alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, samples):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [statistics.median(s) * 1e3 for s in samples]


def spin_up(fn: Callable[[], object], seconds: float) -> None:
    """Calls `fn` for a while before timing: an idle CPU (or a VM's vCPU) runs its first passes slower."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        fn()
