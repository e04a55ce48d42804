"""The cuda backend: dense vs 2:4 semi-structured products on an NVIDIA GPU, timed with CUDA events.

2:4 weights run through `torch.sparse.to_sparse_semi_structured` (cuSPARSELt by default, CUTLASS when
`SparseSemiStructuredTensor._FORCE_CUTLASS` is set) as `F.linear(x, W_sparse)`. The kernels take only some
dtypes and shapes: both weight dimensions must be at least, and a multiple of, a per-dtype minimum (torch 2.13:
cuSPARSELt fp16/bf16 16 x 16, int8 32 x 32; CUTLASS fp16/bf16 32 x 64, int8 16 x 128, fp32 32 x 32). A unit
outside them gets only the dense level, with the reason recorded in the table.

Each distinct (out, in) shape is timed once, alone, on a random activation of the regime's tokens x in (batch x
sequence_length for prefill; batch x 1 for decode, each sequence's one new token, as every layer gets it in the
model's decode step that the base time is measured on): the dense product and the 2:4 product, interleaved,
medians of CUDA-event times after a warm-up. A newly measured table must also predict random 2:4 profiles of the
model, timed end to end (`check_profiles`). 2:4 speeds up only compute-bound products (PyTorch's BERT-base
tutorial, fp16 on an A100: 0.71x at batch 4, 1.22x at batch 16-64; docs/ALGORITHM.md), so a level slower than
dense simply stays in the table: the search then keeps that unit dense.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..deploy import two_four
from ..deploy.two_four import (
    TORCH_DTYPES,
    TwoFourSwap,
    two_four_ineligibility,
)
from ..errors import SPDYError
from ..modeling.patterns import two_four_magnitude_mask
from ..modeling.units import Unit
from .check import random_profiles
from .regime import model_device
from .table import LatencyTable

logger = logging.getLogger(__name__)

def cuda_interleaved_median_ms(fns: list[Callable[[], object]], warmup: int, repeats: int) -> list[float]:
    """CUDA-event times of the functions in turn (a, b, a, b, ...), median of `repeats` each, after a warm-up."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    torch.cuda.synchronize()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, samples):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
    return [statistics.median(s) for s in samples]


def cuda_environment() -> dict:
    """What a cuda latency table depends on: the GPU, driver, CUDA runtime, torch and cuSPARSELt."""
    env = {"torch": torch.__version__, "cuda_runtime": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   gpu_memory_gb=round(props.total_memory / 1024 ** 3, 1))
        try:
            env["driver"] = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None
        except Exception:  # informational only
            env["driver"] = None
    try:
        env["cusparselt"] = torch.backends.cusparselt.version()
    except Exception:  # a build without cuSPARSELt
        env["cusparselt"] = None
    return env


def time_shape_cuda(shape: tuple[int, int], tokens: int, dtype: str, patterns: list[str], warmup: int,
                    repeats: int, kernel: str = "cusparselt", seed: int = 0,
                    device: torch.device | str = "cuda") -> tuple[list[float | None], str | None]:
    """Times of one (out, in) product on a (tokens, in) input at every level pattern ("dense" or "2:4"); None where
    it cannot run."""
    out_features, in_features = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    torch_dtype = TORCH_DTYPES[dtype]
    x = torch.randn(tokens, in_features, device=device, dtype=torch_dtype, generator=gen)  # (tokens, in)
    w = torch.randn(out_features, in_features, device=device, dtype=torch_dtype, generator=gen)  # (out, in)
    reason = two_four_ineligibility(shape, dtype, kernel)
    fns = {"dense": lambda: F.linear(x, w)}
    if "2:4" in patterns and reason is None:
        sparse = w.masked_fill(two_four_magnitude_mask(w), 0)
        try:
            w24 = two_four.to_two_four(sparse)
            F.linear(x, w24)  # a kernel failure shows here, not inside the timing loop
            fns["2:4"] = lambda: F.linear(x, w24)
        except (RuntimeError, SPDYError) as e:
            reason = f"the 2:4 kernel failed: {e}"
    names = list(fns)
    times = dict(zip(names, cuda_interleaved_median_ms([fns[n] for n in names], warmup, repeats)))
    out: list[float | None] = []
    for pattern in patterns:
        if pattern == "dense":
            out.append(times["dense"])
        elif pattern == "2:4":
            out.append(times.get("2:4"))
        else:
            raise SPDYError(f"The cuda backend runs dense and 2:4 levels only, not {pattern!r} (use levels: '2:4').")
    return out, reason


def measure_cuda_latency_table(model: nn.Module, units: list[Unit], levels: list[float], patterns: list[str],
                               config, inputs: dict, model_fingerprint: str | None = None,
                               progress: bool = True) -> LatencyTable:
    """The cuda backend's table: every distinct unit shape timed alone, the model end to end, both in the regime.

    Args:
        inputs: keyword inputs of one unit of work in the regime (`spdy_hf.latency.regime.regime_inputs`): the base time is
            one forward pass of them, a decode step against the cache in decode; the units alone get as many rows
            as each of their products has there (`RegimeConfig.tokens`).

    The model is timed where it is; it must already be on the GPU in the regime's dtype (`SPDYPruner` moves it),
    and the units are timed on its device.
    """
    if not torch.cuda.is_available():
        raise SPDYError("backend 'cuda' needs an NVIDIA GPU to measure a latency table. Measure it on the GPU "
                        "machine (spdy-hf prune ... there, or SPDYPruner with backend='cuda'), then pass the table "
                        "with --latency-table to search and prune anywhere.")
    regime, device = config.regime, model_device(model)
    shapes = sorted({u.shape for u in units})
    timing = config.timing
    table_shapes, ineligible = {}, {}
    for shape in tqdm(shapes, desc="Timing shapes (cuda)", disable=not progress):
        times, reason = time_shape_cuda(shape, regime.tokens, regime.dtype, patterns, timing.warmup, timing.repeats,
                                        device=device)
        key = "{}x{}:cc".format(*shape)
        table_shapes[key] = times
        if reason is not None:
            ineligible[key] = reason
            logger.info("Unit shape %dx%d keeps only the dense level: %s.", *shape, reason)
    with torch.inference_mode():
        (base,) = cuda_interleaved_median_ms([lambda: model(**inputs)], timing.warmup, timing.model_repeats)
    prunable = sum(table_shapes["{}x{}:cc".format(*u.shape)][0] for u in units)
    logger.info("Dense model %.3f ms per %s on %s; the %d units alone %.3f ms.", base,
                "decode step" if regime.mode == "decode" else "forward pass", torch.cuda.get_device_name(),
                len(units), prunable)
    return LatencyTable(
        backend="cuda",
        regime=regime.to_dict(),
        levels=list(levels),
        patterns=list(patterns),
        shapes=table_shapes,
        base_time_ms=float(base),
        ineligible=ineligible,
        model=model_fingerprint,
        environment=cuda_environment(),
    )


@torch.inference_mode()
def check_profiles(model: nn.Module, units: list[Unit], table: LatencyTable, inputs: dict, n: int,
                   warmup: int = 3, repeats: int = 20, seed: int = 0) -> list[tuple[float, float]]:
    """The speedups over the dense model of `n` random profiles (each unit dense or 2:4, magnitude-masked copies of
    its weight as `TwoFourLinear`s) as `table` predicts them and as measured end to end on `inputs`, interleaved,
    with CUDA events: (predicted, measured) each."""
    times = table.times_for(table.keys_for(units))  # (U, K); inf where 2:4 cannot run
    constant = table.reference_time_ms - float(times[:, 0].sum())
    out = []
    for profile in random_profiles(times, n, seed):
        swap = TwoFourSwap(model, units, [table.patterns[k] for k in profile], masked=True)

        def run(deployed: bool, swap=swap):
            def fn():
                swap.use_deployed() if deployed else swap.use_original()
                model(**inputs)
            return fn

        try:
            d, p = cuda_interleaved_median_ms([run(False), run(True)], warmup, repeats)
        finally:
            swap.use_original()
        predicted_ms = constant + float(times[np.arange(len(units)), profile].sum())
        out.append((table.reference_time_ms / max(predicted_ms, 1e-9), d / p))
    return out


def ratios(table: LatencyTable) -> dict[str, float | None]:
    """Per shape, the 2:4 time over the dense time (None where 2:4 cannot run): below 1 pays."""
    k = table.patterns.index("2:4") if "2:4" in (table.patterns or []) else None
    out = {}
    for key, times in table.shapes.items():
        out[key] = None if k is None or times[k] is None else float(times[k]) / float(times[0])
    return out


__all__ = ["check_profiles", "cuda_environment", "cuda_interleaved_median_ms", "measure_cuda_latency_table", "ratios",
           "time_shape_cuda"]
