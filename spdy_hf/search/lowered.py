"""Scoring candidates in low precision: the live model lowered for the search (`lowered`), or a low-precision copy
kept in step with it (`LowPrecisionShadow`).

On CPUs with bfloat16 matrix units (Intel AMX, for instance) a bfloat16 forward pass runs several times faster than
a float32 one (SmolLM2-135M, 8 x 128 tokens, on the 2-vCPU VM of docs/BENCHMARKS.md: 0.30 s against 1.08 s). The
search only compares candidates with each other, so it may score them in bfloat16 (`search.score_dtype`) while the
model itself, the database, verify and the saved checkpoint stay float32. The pipeline lowers the live model for
the search and puts its float32 weights back from disk afterwards, so the search holds half the model's size
instead of one and a half. The copy (for benchmarks and tests) holds its own weights in the low dtype; `sync()`
copies in whatever the live model's weights changed since (PyTorch counts in-place writes to a tensor: its
`_version`), which is what stitching a candidate does.

A score compares like with like: the scorer (`spdy_hf.search.scoring.DistanceScorer`) keeps the dtype its dense reference
ran in and scores every model in that dtype, lowering a float32 model again for a score asked after the search
(after recovery, say), never comparing float32 outputs with a bfloat16 reference.
"""

from __future__ import annotations

import copy
import functools
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..modeling.snapshot import DenseSnapshot, floating_tensors


class LowPrecisionShadow:
    def __init__(self, model: nn.Module, dtype: torch.dtype):
        memo = {}
        for p in model.parameters():
            memo[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
        self.model = copy.deepcopy(model, memo).to(dtype)  # the floating buffers too
        self.pairs = list(zip(model.parameters(), self.model.parameters()))
        self.versions = [p._version for p, _ in self.pairs]

    @torch.no_grad()
    def sync(self) -> None:
        for i, (live, low) in enumerate(self.pairs):
            if live._version != self.versions[i]:
                low.copy_(live)
                self.versions[i] = live._version


@functools.lru_cache(maxsize=1)
def bfloat16_is_faster(min_ratio: float = 1.5) -> bool:
    """Whether this CPU multiplies bfloat16 matrices at least `min_ratio` times faster than float32 (measured).

    On an x86 CPU whose best kernels are AVX2 (no AVX-512, hence no bfloat16 instructions) the answer is no without
    timing: there bfloat16 is emulated, several times slower than float32 (SmolLM2-135M, 1 x 128 tokens, on a
    2-vCPU AMD EPYC: 3.5 s against 0.81 s), and timing the emulation would cost seconds."""
    capability = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() in ("x86_64", "amd64") and not capability.upper().startswith("AVX512"):
        return False
    a32, b32 = torch.randn(128, 512), torch.randn(512, 512)
    a16, b16 = a32.to(torch.bfloat16), b32.to(torch.bfloat16)

    def best(a, b, rounds: int) -> float:
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(4):
                a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    best(a32, b32, 1), best(a16, b16, 1)  # warm-up
    fp32 = best(a32, b32, 5)
    if best(a16, b16, 1) * min_ratio > 4 * fp32:  # one round far slower than float32: emulated, stop here
        return False
    return fp32 >= min_ratio * best(a16, b16, 5)


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype the model computes in: its first floating parameter's (None: it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


@contextmanager
def lowered(model: nn.Module, dtype: torch.dtype | None) -> Iterator[torch.dtype | None]:
    """Within the block the model runs in `dtype` (the search scores candidates in bfloat16 this way, with no copy
    of the model held beside it); afterwards every floating parameter and buffer is exactly what it was, read back
    from a snapshot on disk (`spdy_hf.modeling.snapshot`). Stitched weights written inside the block are not kept: stitch
    again after it.

    Only a float32 model whose floating tensors are all on the CPU is lowered; any other is left as it is, and so is
    every model for `dtype` None or float32. The block is given the dtype the model runs in within it: the one to
    report.
    """
    tensors = [t for _, t in floating_tensors(model)]
    if dtype in (None, torch.float32) or not tensors or \
            any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        yield model_dtype(model)
        return
    snapshot = DenseSnapshot(model)
    try:
        model.to(dtype)
        try:
            yield dtype
        finally:
            model.to(torch.float32)
            snapshot.restore(model)  # looked up by name again: a dtype change replaces buffers
    finally:
        snapshot.close()
