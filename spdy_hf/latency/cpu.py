"""The cpu backend: every unit runs as a `FastLinear`, dense at level 0 and a `torch.sparse` CSR product above.

A unit's time depends on memory layouts: a CSR product is several times faster on an input whose transpose
is contiguous than on a row-major one, and attention kernels and LayerNorm slow down on transposed inputs.
So each unit gets a fixed `UnitLayout` (see `spdy_hf.deploy.kernels`), which does not depend on the levels chosen; we
find the layouts once by observation and time each distinct (shape, layout code) at every level in isolation.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import SPDYConfig
from ..deploy.kernels import FastLinear, KernelSwap, UnitLayout
from ..errors import SPDYError
from ..modeling.units import Unit
from .check import random_profiles
from .environment import table_environment
from .regime import step_shape
from .table import LatencyTable
from .timing import interleaved_median_ms, median_ms, spin_up

logger = logging.getLogger(__name__)


def random_sparse_weight(out_features: int, in_features: int, sparsity: float, generator: torch.Generator):
    """A random (out, in) weight with exactly round(sparsity * numel) zeros at random places."""
    weight = torch.randn(out_features, in_features, generator=generator)
    numel = weight.numel()
    n_zero = int(round(sparsity * numel))
    if n_zero:
        idx = torch.randperm(numel, generator=generator)[:n_zero]
        weight.view(-1)[idx] = 0.0
    return weight


def regime_activation(batch: int, seq: int, features: int, layout: str, generator: torch.Generator):
    """A (batch, seq, features) input in the given memory layout."""
    if layout == "c":
        return torch.randn(batch, seq, features, generator=generator)
    return torch.randn(features, batch * seq, generator=generator).t().reshape(batch, seq, features)


@torch.inference_mode()
def time_shape(out_features: int, in_features: int, code: str, levels: list[float], config: SPDYConfig,
               seed: int = 0) -> list[float]:
    """Times one (out, in) unit with bias alone, at every level, in the regime (one token per sequence in decode),
    with layout code (input, output).

    Alone, a layer's weight stays hot in cache, so these times run low next to a full forward pass; the latency
    table uses `time_units_in_place` instead. Kept for benchmarks of the kernels themselves.
    """
    gen = torch.Generator().manual_seed(seed)
    x = regime_activation(*step_shape(config.regime), in_features, "t" if code[0] == "t" else "c", gen)
    bias = torch.randn(out_features, generator=gen)
    times = []
    for sparsity in levels:
        module = FastLinear(random_sparse_weight(out_features, in_features, sparsity, gen), bias,
                            sparse=sparsity > 0, layout=UnitLayout(code))
        times.append(median_ms(lambda m=module: m(x), config.timing.warmup, config.timing.repeats))
    return times


@torch.inference_mode()
def time_units_in_place(
    model: torch.nn.Module,
    units: list[Unit],
    layouts: list[UnitLayout],
    levels: list[float],
    inputs: dict,
    rounds: int = 3,
    passes: int = 3,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[list[list[float]]], np.ndarray, np.ndarray]:
    """Every unit timed in place, in forward passes of the deployed model with mixed levels.

    In place, a unit meets the cache as it will in a pruned model (its weight cold or warm depending on its
    neighbours' levels, its input just written), which a layer timed alone does not. Each round draws, for every
    unit, a random order of the levels, so over K configurations every unit visits every level once, next to
    neighbours at random levels, like the profiles the search produces. Sparse weights are random masks.

    Returns:
        samples: samples[u][k], the unit's times (ms) at each level, `rounds * passes` of them.
        configs: (C, U) level index of every unit in each configuration.
        totals: (C,) median forward-pass time (ms) of each configuration, measured without timing hooks.
    """
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    n_units, n_levels = len(units), len(levels)
    configs = np.concatenate([np.stack([rng.permutation(n_levels) for _ in units], axis=1) for _ in range(rounds)])
    # one random weight per (shape, level), cloned for every unit that uses it (clones: no cache sharing)
    kernels: dict[tuple, torch.Tensor] = {}
    for shape in sorted({u.shape for u in units}):
        for k, sparsity in enumerate(levels):
            if sparsity > 0:
                kernels[shape, k] = FastLinear(random_sparse_weight(*shape, sparsity, gen), None, True).weight_kernel

    samples = [[[] for _ in levels] for _ in units]
    totals = np.zeros(len(configs))
    starts = [0.0] * n_units
    for c, config in enumerate(tqdm(configs, desc="Profiling latency", unit="config", disable=not progress)):
        weights = [kernels[u.shape, k].clone() if levels[k] > 0 else None for u, k in zip(units, config)]
        swap = KernelSwap(model, units, [levels[k] for k in config], layouts, weights=weights)
        observed = [[] for _ in units]
        hooks = []
        for i, (_, _, _, module) in enumerate(swap.slots):
            def pre(mod, args, i=i):
                starts[i] = time.perf_counter()

            def post(mod, args, out, i=i, observed=observed):
                observed[i].append(time.perf_counter() - starts[i])

            hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        swap.use_deployed()
        try:
            model(**inputs)  # warm-up after the swap
            for o in observed:
                o.clear()
            for _ in range(passes):
                model(**inputs)
            for h in hooks:
                h.remove()
            # totals without the hooks, whose own cost would otherwise land in the constant term; what the hooks add
            # inside each unit's window is the same at every level, so it cancels in constant + sum of units
            totals[c] = median_ms(lambda: model(**inputs), 0, passes)
        finally:
            swap.use_original()
            for h in hooks:
                h.remove()
        for i, k in enumerate(config):
            samples[i][k].extend(1e3 * t for t in observed[i])
    return samples, configs, totals


@torch.inference_mode()
def _observe_inputs(model: torch.nn.Module, units: list[Unit], inputs: dict,
                    layouts: list[UnitLayout] | None) -> list[torch.Tensor]:
    """The input tensor each unit receives in one forward pass: original modules if `layouts` is None, else
    the deployed dense form with these layouts."""
    swap = KernelSwap(model, units, [0.0] * len(units), layouts) if layouts is not None else None
    modules = [slot[3] for slot in swap.slots] if swap else [u.module for u in units]
    seen: dict[int, torch.Tensor] = {}
    hooks = []
    for i, module in enumerate(modules):
        def hook(mod, args, i=i):
            seen.setdefault(i, args[0])  # keeping the tensor alive also keeps its identity unique
        hooks.append(module.register_forward_pre_hook(hook))
    if swap:
        swap.use_deployed()
    try:
        model(**inputs)
    finally:
        if swap:
            swap.use_original()
        for h in hooks:
            h.remove()
    missing = [units[i].name for i in range(len(units)) if i not in seen]
    if missing:
        raise SPDYError(f"Units never called in a forward pass: {', '.join(missing[:5])}; add them to skip_modules.")
    return [seen[i] for i in range(len(units))]


def _is_transposed(x: torch.Tensor) -> bool:
    x2 = x.reshape(-1, x.shape[-1])
    return x2.t().is_contiguous() and not x2.is_contiguous()


def plan_layouts(model: torch.nn.Module, units: list[Unit], inputs: dict) -> list[UnitLayout]:
    """The `UnitLayout` of every unit, found by observing forward passes (U + 3 of them).

    1. Units that read the very same tensor (query/key/value, gate/up) form a group.
    2. With every unit producing a transposed output, the units that then receive a transposed input are the
       consumers. Unit by unit, the output goes back to row-major unless that takes a consumer's transposed
       input away: what remains transposed are the producers (BERT's intermediate.dense, GPT-2's c_fc, ...).
    3. In each group reading a row-major tensor, the first unit leads: it transposes the input for all.
    """
    original_inputs = _observe_inputs(model, units, inputs, None)
    groups: dict[int, list[int]] = {}
    for i, x in enumerate(original_inputs):
        leader = next((j for j in range(i) if original_inputs[j] is x), i)
        groups.setdefault(leader, []).append(i)
    del original_inputs

    def observe(t_out: list[bool]) -> list[bool]:
        codes = [UnitLayout("c" + ("t" if t else "c")) for t in t_out]
        return [_is_transposed(x) for x in _observe_inputs(model, units, inputs, codes)]

    t_out = [True] * len(units)
    consumers = observe(t_out)
    for i in range(len(units)):
        t_out[i] = False
        if any(c and not now for c, now in zip(consumers, observe(t_out))):
            t_out[i] = True
    transposed_in = observe(t_out)

    layouts: list[UnitLayout] = []
    for i in range(len(units)):
        out = "t" if t_out[i] else "c"
        group = next(g for g in groups.values() if i in g)
        if transposed_in[i]:
            layouts.append(UnitLayout("t" + out))
        elif len(group) > 1 and group[0] == i:
            layouts.append(UnitLayout("s" + out))
        elif len(group) > 1:
            layouts.append(UnitLayout("t" + out, leader=group[0]))
        else:
            layouts.append(UnitLayout("c" + out))
    return layouts


@torch.inference_mode()
def _run(model: torch.nn.Module, inputs: dict, swap: KernelSwap, deployed: bool) -> None:
    swap.use_deployed() if deployed else swap.use_original()
    try:
        model(**inputs)
    finally:
        swap.use_original()


def measure_latency_table(
    model: torch.nn.Module,
    units: list[Unit],
    levels: list[float],
    config: SPDYConfig,
    inputs: dict,
    model_fingerprint: str | None = None,
    progress: bool = True,
) -> LatencyTable:
    """Measures every distinct (unit shape, input layout) at every level, and the model end to end.

    Args:
        inputs: keyword inputs of one unit of work in the regime (`spdy_hf.latency.regime.regime_inputs`: a forward pass
            over batch_size x sequence_length tokens, or one decode step against the cache): the units are timed in
            place in these passes, so in the regime's shapes.
    """
    layouts = plan_layouts(model, units, inputs)
    keys = [f"{u.shape_key}:{layout.code}" for u, layout in zip(units, layouts)]
    logger.info("Timing %d units (%d distinct shapes/layouts) in place at %d levels on the cpu backend.",
                len(units), len(set(keys)), len(levels))
    warmup, repeats = config.timing.warmup, config.timing.model_repeats
    with torch.inference_mode():
        spin_up(lambda: model(**inputs), seconds=2.0)
    samples, configs, totals = time_units_in_place(model, units, layouts, levels, inputs,
                                                   rounds=config.timing.profile_rounds, progress=progress)
    # units of one shape and layout share one row: the median of all their samples at each level
    table_shapes = {
        key: [float(np.median([t for i in range(len(units)) if keys[i] == key for t in samples[i][k]]))
              for k in range(len(levels))]
        for key in sorted(set(keys))
    }
    # The constant term (everything but the units) is the same in every configuration: estimate it in each and
    # take the median, so a configuration measured in a noisy moment does not shift every prediction.
    table_ms = np.array([table_shapes[key] for key in keys])  # (U, K)
    config_ms = table_ms[np.arange(len(units))[None, :], configs].sum(axis=1)  # (C,) sum of unit times
    constant = float(np.median(totals - config_ms))
    deployed_dense = constant + float(table_ms[:, 0].sum())
    predicted_ms = constant + config_ms
    # The dense model against the all-dense deployed form, interleaved: their ratio is robust to the drifts of a
    # busy machine, and puts the base on the table's time scale.
    swap = KernelSwap(model, units, [0.0] * len(units), layouts)
    base_raw, deployed_raw = interleaved_median_ms([lambda: _run(model, inputs, swap, False),
                                                    lambda: _run(model, inputs, swap, True)], warmup, 2 * repeats)
    base = deployed_dense * base_raw / deployed_raw
    error = float(np.median(np.abs(predicted_ms - totals) / totals))
    logger.info("Dense model: %.3f ms per forward pass in the regime (%.3f ms with every unit as a dense "
                "FastLinear). Additivity: the table predicts the %d profiled configurations' forward passes within "
                "%.1f%% (median).", base, deployed_dense, len(totals), 100 * error)
    return LatencyTable(
        backend="cpu",
        regime=config.regime.to_dict(),
        levels=list(levels),
        shapes=table_shapes,
        base_time_ms=base,
        deployed_dense_time_ms=deployed_dense,
        unit_layouts={u.name: layout.code for u, layout in zip(units, layouts)},
        input_leaders={u.name: units[layout.leader].name for u, layout in zip(units, layouts)
                       if layout.leader is not None},
        additivity={"measured_ms": totals.tolist(), "predicted_ms": predicted_ms.tolist(),
                    "median_relative_error": error},
        model=model_fingerprint,
        environment=table_environment(),
        timing_noise=error,  # how far the table's own prediction of the profiled passes was from their times
        timing_noise_kind="prediction_error",
    )


@torch.inference_mode()
def check_profiles(model: torch.nn.Module, units: list[Unit], table: LatencyTable, inputs: dict, n: int,
                   warmup: int = 3, repeats: int = 20, seed: int = 0) -> list[tuple[float, float]]:
    """The speedups over the all-dense deployed form of `n` random profiles (random sparse weights at each unit's
    level) as `table` predicts them and as measured end to end, interleaved: (predicted, measured) each."""
    layouts = table.layouts_for(units)
    times = table.times_for(table.keys_for(units))  # (U, K)
    constant = table.reference_time_ms - float(times[:, 0].sum())
    gen = torch.Generator().manual_seed(seed)
    dense = KernelSwap(model, units, [0.0] * len(units), layouts)
    out = []
    for profile in random_profiles(times, n, seed):
        sparsities = [table.levels[k] for k in profile]
        weights = [random_sparse_weight(*u.shape, s, gen) if s > 0 else None for u, s in zip(units, sparsities)]
        swap = KernelSwap(model, units, sparsities, layouts, weights=weights)
        d, p = interleaved_median_ms([lambda: _run(model, inputs, dense, True), lambda s=swap: _run(model, inputs, s, True)],
                                     warmup, repeats)
        predicted_ms = constant + float(times[np.arange(len(units)), profile].sum())
        out.append((table.reference_time_ms / max(predicted_ms, 1e-9), d / p))
    return out
