"""Latency of structured levels: each group's time at every keep count, measured in the whole model.

A structured level of a group (`spdy_hf.modeling.groups.StructuredGroup`) keeps k of its heads or neurons. Timed
alone, a group's matrix products miss most of what removing heads saves (the attention scores, softmax and
context products of those heads, the reshapes, the cache misses of a real forward pass): the prototype that did
so predicted 1.5x for a profile that measured 1.9x. So levels are measured where they run: for every distinct
group signature (kind and shapes) and keep count k, a copy of the model with *every* group of that signature
shrunk to k heads/neurons is timed against the dense model, interleaved (CUDA events on the cuda backend). If n
groups share the signature, one of them at k saves s(k) = (1 - t_k / t_dense) / n of the dense model's time (the
median over all runs; a ratio, so a machine whose speed drifts between runs does not skew it), and its time is

    T(k) = s(0) - s(k),        T(0) = 0 (the whole attention or FFN is gone),

so that the model's time under any profile is predicted as t_dense - sum over groups of (T(full) - T(k)).
T is made non-decreasing in k (a keep count never costs less than a smaller one) against timing noise, then
fitted across the partial levels of a signature (`smooth_times`: one slope per signature). Keep counts with
k = full are the dense model itself. Each distinct shape is timed once per level, in the regime's work (a decode
step against the cache in decode).

So the times the search reads are not measurements of one group: they are a fit (`times_ms`, the part marked
`"fitted": true`) to a share of what all groups of a signature saved together (`measured_ms`, per group, kept
beside them). The part's `timing_noise` is the spread of the dense model's times, taken once per chunk of levels.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..modeling.groups import StructuredGroup, group_name, shrink
from ..modeling.swap import TreeSwap
from .check import random_profiles

logger = logging.getLogger(__name__)


def keep_counts(group: StructuredGroup, head_step: int = 1, ffn_grid: int = 8) -> list[int]:
    """Levels of a group, most kept first, down to 0 (removed): every `head_step`-th head count for attention
    (the full count always included), `ffn_grid` equal steps of the neurons for an FFN."""
    if group.kind == "attention":
        counts = set(range(group.num_groups, -1, -head_step)) | {0}
    else:
        counts = {round(group.num_groups * f / ffn_grid) for f in range(ffn_grid, -1, -1)}
    return sorted(counts, reverse=True)


def _weight_shape(module: nn.Module) -> list[int]:
    return list(module.weight.shape)


def group_signature(model: nn.Module, group: StructuredGroup) -> str:
    """What a group's time depends on: its kind, group count and size, and the shapes of its modules."""
    modules = dict(model.named_modules())
    shapes = ";".join("x".join(map(str, _weight_shape(modules[n]))) for n in [*group.producers, group.consumer])
    return f"{group.kind}:{group.num_groups}x{group.group_size}:{shapes}"


def measure_structured_latency(
    model: nn.Module,
    groups: list[StructuredGroup],
    counts: list[list[int]],
    run: Callable[[nn.Module], Callable[[], object]],
    timer: Callable[[list[Callable[[], object]], int, int], list[float]],
    warmup: int = 3,
    repeats: int = 40,
    progress: bool = True,
) -> dict:
    """Every group's time at each of its keep counts, in milliseconds, measured in the whole model.

    Args:
        counts: per group, its keep counts, the full count first (`keep_counts`).
        run: given a model, a function that runs one forward pass of it in the regime.
        timer: interleaved timer, `(functions, warmup, repeats) -> median ms of each`.

    Returns:
        `{"signatures": {signature: {"keep": [...], "times_ms": [...], "measured_ms": [...], "groups": n}},
        "groups": {group name: signature}, "dense_ms": t, "timing_noise": spread, "fitted": True}`, ready to be
        stored in a `LatencyTable`'s `structured` field: `times_ms` fitted (`smooth_times`), `measured_ms` one
        group's share of the measured saving of all `n`, made non-decreasing.
    """
    by_signature: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        if counts[i][0] != group.num_groups:
            raise ValueError(f"The keep counts of {group_name(group)} must start with the full count.")
        by_signature.setdefault(group_signature(model, group), []).append(i)
    jobs = [(sig, k) for sig, members in by_signature.items() for k in counts[members[0]][1:]]
    logger.info("Timing %d structured levels of %d distinct group shapes in the whole model.", len(jobs),
                len(by_signature))
    saved: dict[str, dict[int, float]] = {sig: {} for sig in by_signature}
    dense_samples = []
    bar = tqdm(total=len(jobs), desc="Structured latency", disable=not progress)
    for chunk in _chunks(model, groups, by_signature, jobs):
        # the dense model and several levels in turn, each level's shrunk form swapped into the live model
        swaps = []
        for sig, k in chunk:
            swaps.append(TreeSwap.record(model, lambda m, sig=sig, k=k: _shrink_all(m, groups, by_signature[sig], k)))
            swaps[-1].revert()
        fns = [run(model)]
        for swap in swaps:  # each form's own run (a decode cache is filled in that form)
            swap.apply()
            fns.append(swap.wrap(run(model)))
            swap.revert()
        with torch.inference_mode():
            times = timer(fns, warmup, repeats)
        dense_samples.append(times[0])
        for (sig, k), t in zip(chunk, times[1:]):
            # what one group at k saves, as a share of the dense time of the same interleaved run: a machine whose
            # speed drifts between runs (a busy one) changes both times of a run alike, not their ratio
            saved[sig][k] = (1.0 - t / times[0]) / len(by_signature[sig])
        bar.update(len(chunk))
        del swaps, fns
    bar.close()
    dense = float(statistics.median(dense_samples)) if dense_samples else float("nan")
    # the dense model was timed once per chunk of levels: how much those times spread is the noise here
    noise = float(statistics.median(abs(d - dense) for d in dense_samples) / dense) if dense_samples else 0.0
    saved = {sig: {k: share * dense for k, share in by_count.items()} for sig, by_count in saved.items()}
    signatures = {}
    for sig, members in by_signature.items():
        keep = counts[members[0]]
        s0 = max(saved[sig][0], 0.0) if 0 in saved[sig] else max(saved[sig].values(), default=0.0)
        times = {keep[0]: s0}
        for k in keep[1:]:
            times[k] = max(s0 - saved[sig][k], 0.0)
        running = 0.0  # non-decreasing in k, from the smallest count up
        for k in sorted(times):
            running = max(running, times[k])
            times[k] = running
        times[keep[0]] = max(times[keep[0]], running)
        measured = [float(times[k]) for k in keep]
        signatures[sig] = {"keep": list(keep), "times_ms": smooth_times(list(keep), measured),
                           "measured_ms": measured, "groups": len(members)}
    return {"signatures": signatures, "groups": {group_name(groups[i]): sig for sig, members in by_signature.items()
                                                 for i in members}, "dense_ms": dense, "timing_noise": noise,
            "fitted": True}


def times_are_fitted(structured: dict) -> bool:
    """Whether a structured part's `times_ms` are fitted (`smooth_times`) rather than the measured ones: parts
    measured since the fit say so (`"fitted"`), older ones by keeping the measured times beside them."""
    signatures = structured.get("signatures") or {}
    return bool(structured.get("fitted", bool(signatures) and all("measured_ms" in e for e in signatures.values())))


def smooth_times(keep: list[int], times: list[float]) -> list[float]:
    """A group's level times with the timing noise of each level pooled: what level k (0 < k < full) saves against
    the full group is fitted as b * (full - k), one slope per signature by least squares over all its partial
    levels, as the matrix products and per-head work of a shrunk group scale with the heads/neurons it keeps. The
    full time and the removed level (0: no module left, its fixed costs saved too) stay as measured.

    Each level's saving was measured once, with a noise of a few percent of the dense model's time; a DP choosing
    among levels picks those whose saving came out too large, so the raw times predict the profiles a search picks
    too fast (SmolLM2 on an EPYC: predicted 1.579x, measured 1.455x) while random profiles look right.
    """
    full, t_full = keep[0], times[0]
    inner = [(full - k, t_full - t) for k, t in zip(keep, times) if 0 < k < full]
    if not inner:
        return list(times)
    slope = sum(d * s for d, s in inner) / sum(d * d for d, _ in inner)
    return [float(t_full if k == full else (0.0 if k == 0 else min(max(t_full - slope * (full - k), 0.0), t_full)))
            for k in keep]


def _shrink_all(model: nn.Module, groups: list[StructuredGroup], members: list[int], k: int) -> None:
    for i in members:
        shrink(model, groups[i], list(range(k)), share=True)


def _chunks(model: nn.Module, groups: list[StructuredGroup], by_signature: dict[str, list[int]],
            jobs: list[tuple[str, int]]) -> list[list[tuple[str, int]]]:
    """Levels timed together against one dense run: as many as fit in half the model's size of new weights (a
    shrunk form's consumers are copies; its producers views of the dense weights), at most 3, so that the dense
    model is timed often enough to tell the timing noise."""
    modules = dict(model.named_modules())
    budget = 0.5 * sum(p.numel() for p in model.parameters())
    chunks, size = [[]], 0.0
    for sig, k in jobs:
        members = by_signature[sig]
        g = groups[members[0]]
        cost = len(members) * modules[g.consumer].weight.numel() * k / max(g.num_groups, 1)
        if chunks[-1] and (size + cost > budget or len(chunks[-1]) >= 3):
            chunks.append([])
            size = 0.0
        chunks[-1].append((sig, k))
        size += cost
    return [c for c in chunks if c]


def check_profiles(model: nn.Module, groups: list[StructuredGroup], counts: list[list[int]], structured: dict,
                   run: Callable[[nn.Module], Callable[[], object]],
                   timer: Callable[[list[Callable[[], object]], int, int], list[float]],
                   n: int, warmup: int = 3, repeats: int = 20, seed: int = 0) -> list[tuple[float, float]]:
    """The speedups of `n` random profiles as the structured times predict them and as measured end to end (each
    profile's shrunk copy of the model against the dense model, interleaved): (predicted, measured) each."""
    times = np.full((len(groups), max(map(len, counts))), np.inf)
    for i, g in enumerate(groups):
        row = structured["signatures"][structured["groups"][group_name(g)]]["times_ms"]
        times[i, :len(row)] = row
    dense_ms, dense_run, out = structured["dense_ms"], run(model), []
    for profile in random_profiles(times, n, seed):
        def change(m, profile=profile):
            for i, a in enumerate(profile):
                if a:
                    shrink(m, groups[i], list(range(counts[i][a])), share=True)

        swap = TreeSwap.record(model, change)
        shrunk_run = swap.wrap(run(model))
        swap.revert()
        predicted_ms = dense_ms - float(sum(times[i, 0] - times[i, a] for i, a in enumerate(profile)))
        with torch.inference_mode():
            d, p = timer([dense_run, shrunk_run], warmup, repeats)
        out.append((dense_ms / max(predicted_ms, 1e-9), d / p))
        del swap, shrunk_run
    return out
