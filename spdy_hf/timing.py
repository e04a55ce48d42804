"""Wall-clock timing on the CPU: warm up, repeat, take the median."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_ms(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median wall time of `fn()` in milliseconds over `repeats` calls after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
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
