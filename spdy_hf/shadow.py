"""A low-precision copy of the live model that scores candidates, kept in step with it.

On CPUs with bfloat16 matrix units (Intel AMX, for instance) a bfloat16 forward pass runs several times faster than
a float32 one (SmolLM2-135M, 8 x 128 tokens, on the 2-vCPU VM of docs/BENCHMARKS.md: 0.30 s against 1.08 s). The
search only compares candidates with each other, so it may score them in bfloat16 (`search.score_dtype`) while the
model itself, the database, verify and the saved checkpoint stay float32. The copy holds its own weights in the
low dtype (half the model's size for bfloat16); `sync()` copies in whatever the live model's weights changed since
(PyTorch counts in-place writes to a tensor: its `_version`), which is what stitching a candidate does.
"""

from __future__ import annotations

import copy
import functools
import time

import torch
from torch import nn


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
    """Whether this CPU multiplies bfloat16 matrices at least `min_ratio` times faster than float32 (measured)."""
    a32, b32 = torch.randn(256, 1024), torch.randn(1024, 1024)
    a16, b16 = a32.to(torch.bfloat16), b32.to(torch.bfloat16)

    def best(a, b) -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(4):
                a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    best(a16, b16)
    return best(a32, b32) >= min_ratio * best(a16, b16)
