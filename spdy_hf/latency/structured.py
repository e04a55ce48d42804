"""Latency of structured levels on the cpu backend: the shrunken dense computation of a group (issue 6, a step).

A structured level of a group (`spdy_hf.structured.StructuredGroup`) keeps k of its heads or neurons. Its time is
that of the real shrunken products in the regime: every producer (tokens x in -> tokens x k * rows) and the
consumer (tokens x k * group_size -> tokens x out), dense, timed together as one call after a warm-up (median
of repeats). Keeping nothing costs nothing. Groups of one shape share one measurement.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..structured import StructuredGroup
from ..timing import median_ms


def default_keep_counts(group: StructuredGroup) -> list[int]:
    """Levels of a group, most kept first: every head count for attention, eighths of the neurons for an FFN."""
    if group.kind == "attention":
        return list(range(group.num_groups, -1, -1))
    return sorted({round(group.num_groups * f / 8) for f in range(8, -1, -1)}, reverse=True)


def group_signature(group: StructuredGroup, shapes: dict[str, tuple[int, int]]) -> tuple:
    """What a group's time depends on: producer and consumer shapes, rows per group, number of groups."""
    return (group.kind, group.num_groups, group.group_size, group.fused_parts,
            tuple((shapes[p][1], group.producer_rows[p]) for p in group.producers), shapes[group.consumer][0])


def time_group_levels(group: StructuredGroup, shapes: dict[str, tuple[int, int]], keep_counts: list[int],
                      tokens: int, warmup: int = 3, repeats: int = 25, seed: int = 0) -> list[float]:
    """Milliseconds of the group's shrunken products at each keep count. `shapes` maps module names to
    (out, in)."""
    gen = torch.Generator().manual_seed(seed)
    times = []
    for k in keep_counts:
        if k == 0:
            times.append(0.0)
            continue
        xs, ws = [], []
        for name in group.producers:
            in_features = shapes[name][1]
            rows = group.producer_rows[name] * k * group.fused_parts
            xs.append(torch.randn(tokens, in_features, generator=gen))
            ws.append(torch.randn(rows, in_features, generator=gen))
        hidden = torch.randn(tokens, group.group_size * k, generator=gen)
        consumer = torch.randn(shapes[group.consumer][0], group.group_size * k, generator=gen)

        def call(xs=xs, ws=ws, hidden=hidden, consumer=consumer):
            for x, w in zip(xs, ws):
                F.linear(x, w)
            F.linear(hidden, consumer)

        times.append(median_ms(call, warmup, repeats))
    return times


def structured_table(groups: list[StructuredGroup], shapes: dict[str, tuple[int, int]], tokens: int,
                     warmup: int = 3, repeats: int = 25) -> dict[str, dict]:
    """Per group: its keep counts and times, distinct signatures timed once."""
    cache: dict[tuple, tuple[list[int], list[float]]] = {}
    out = {}
    for group in groups:
        signature = group_signature(group, shapes)
        if signature not in cache:
            counts = default_keep_counts(group)
            cache[signature] = (counts, time_group_levels(group, shapes, counts, tokens, warmup, repeats))
        counts, times = cache[signature]
        out[f"{group.block}:{group.kind}"] = {"keep": counts, "times_ms": times}
    return out
