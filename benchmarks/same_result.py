"""Whether two saved SPDY outputs hold the same result: the same profile and bit-identical weights.

    python benchmarks/same_result.py DIR_A DIR_B

Compares `spdy_profile.json` (every unit's and group's level, sparsity, kept heads/neurons; times are measured, so
they are compared only as the latency table gave them) and every tensor of `model.safetensors`, and prints the
measured speedups of both for reference (those are timings and differ from run to run). Exits 1 on a difference.
Used to show that a refactor changed nothing: prune twice with the same cache and seed, before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file

PROFILE_KEYS = ("name", "level", "sparsity", "pattern", "family", "group", "keep", "kept", "layout", "input_leader",
                "dense_time_ms", "time_ms")


def load(directory: str) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    with open(os.path.join(directory, "spdy_profile.json"), encoding="utf-8") as f:
        profile = json.load(f)
    with open(os.path.join(directory, "spdy_report.json"), encoding="utf-8") as f:
        report = json.load(f)
    return profile, report, load_file(os.path.join(directory, "model.safetensors"))


def profile_differences(a: dict, b: dict) -> list[str]:
    out = []
    for part in ("units", "groups"):
        rows_a, rows_b = a.get(part) or [], b.get(part) or []
        if len(rows_a) != len(rows_b):
            out.append(f"{part}: {len(rows_a)} vs {len(rows_b)} entries")
            continue
        for x, y in zip(rows_a, rows_b):
            for key in PROFILE_KEYS:
                if x.get(key) != y.get(key):
                    out.append(f"{part} {x.get('name')}: {key} {x.get(key)!r} vs {y.get(key)!r}")
    return out


def weight_differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    out = [f"tensor {k} only in one" for k in sorted(set(a) ^ set(b))]
    out += [f"tensor {k} differs (max |diff| {float((a[k].float() - b[k].float()).abs().max()):.3g})"
            for k in sorted(set(a) & set(b)) if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first")
    parser.add_argument("second")
    args = parser.parse_args()
    (pa, ra, wa), (pb, rb, wb) = load(args.first), load(args.second)
    differences = profile_differences(pa, pb) + weight_differences(wa, wb)
    for key in ("predicted_speedup", "measured_speedup", "score_dense_vs_pruned"):
        print(f"{key:22s} {ra.get(key)!r:>24} {rb.get(key)!r:>24}")
    corrections = (len(ra.get("verify_corrections") or []), len(rb.get("verify_corrections") or []))
    print(f"{'verify corrections':22s} {corrections[0]:>24} {corrections[1]:>24}")
    print(f"profile entries: {len(pa.get('units', []))} units, {len(pa.get('groups') or [])} groups; "
          f"{len(wa)} tensors")
    if differences:
        print("DIFFERENT:", *differences[:20], sep="\n  ")
        return 1
    print("SAME: identical profiles and bit-identical weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
