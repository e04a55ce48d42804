"""CPU kernel facts behind spdy_hf's cpu backend, measured side by side on this machine.

1. Per unit shape of all-MiniLM-L6-v2 and per layout code (see `spdy_hf.deploy.kernels.FastLinear`): the time of the
   unit at a few sparsities relative to dense, in the regime (batch x sequence length tokens).
2. End to end: every encoder unit uniformly pruned (magnitude) at a few sparsities, deployed with
   `FastLinear`s, against the dense model; interleaved, median of repeats.

    python benchmarks/cpu_kernels.py [--batch-size 1] [--sequence-length 128] [--output benchmarks/out/cpu_kernels.json]
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys

import torch

from spdy_hf import SPDYConfig
from spdy_hf.database import MagnitudeDatabase
from spdy_hf.deploy.kernels import KernelSwap
from spdy_hf.latency.cpu import plan_layouts, time_shape
from spdy_hf.latency.environment import environment_info
from spdy_hf.latency.timing import interleaved_median_ms
from spdy_hf.modeling.loading import load_model_and_tokenizer
from spdy_hf.modeling.units import find_units
from spdy_hf.utils.io import atomic_write_json

SPARSITIES = [0.5, 0.8, 0.9, 0.95, 0.98, 0.99]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--output", default="benchmarks/out/cpu_kernels.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    config = SPDYConfig(regime={"batch_size": args.batch_size, "sequence_length": args.sequence_length},
                        timing={"repeats": args.repeats})
    model, _ = load_model_and_tokenizer()
    ids = torch.randint(1000, 20000, (args.batch_size, args.sequence_length))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    units = find_units(model, config.skip_modules, example_inputs=inputs)
    layouts = plan_layouts(model, units, inputs)

    # 1. per shape and layout code, every code of the table plus the plain "cc" for comparison
    per_shape = {}
    keys = sorted({(u.shape, lay.code) for u, lay in zip(units, layouts)} | {(u.shape, "cc") for u in units})
    for (out_f, in_f), code in keys:
        times = time_shape(out_f, in_f, code, [0.0] + SPARSITIES, config)
        per_shape[f"{out_f}x{in_f}:{code}"] = {"dense_ms": times[0],
                                              "ratio_to_dense": [t / times[0] for t in times[1:]]}

    # 2. uniform sparsity end to end
    database = MagnitudeDatabase(units, [0.0] + SPARSITIES)
    end_to_end = {}
    with torch.inference_mode():
        for k, sparsity in enumerate(SPARSITIES, start=1):
            database.stitch([k] * len(units))
            swap = KernelSwap(model, units, [sparsity] * len(units), layouts)

            def dense(swap=swap):
                swap.use_original()
                model(**inputs)

            def pruned(swap=swap):
                swap.use_deployed()
                model(**inputs)

            dense_ms, pruned_ms = interleaved_median_ms([dense, pruned], 5, args.repeats)
            swap.use_original()
            end_to_end[str(sparsity)] = {"dense_ms": dense_ms, "pruned_ms": pruned_ms,
                                         "speedup": dense_ms / pruned_ms}
        database.stitch([0] * len(units))

    print(f"\nUnit time / dense time, {args.batch_size} x {args.sequence_length} tokens, fp32:\n")
    print("| unit shape:layout | dense ms | " + " | ".join(f"{s:.0%}" for s in SPARSITIES) + " |")
    print("|---|---|" + "---|" * len(SPARSITIES))
    for key, row in per_shape.items():
        print(f"| {key} | {row['dense_ms']:.3f} | " + " | ".join(f"{r:.2f}" for r in row["ratio_to_dense"]) + " |")
    print("\nEnd to end, every unit at one sparsity (magnitude), FastLinear kernels vs the dense model:\n")
    print("| sparsity | dense ms | pruned ms | speedup |")
    print("|---|---|---|---|")
    for sparsity, row in end_to_end.items():
        print(f"| {float(sparsity):.0%} | {row['dense_ms']:.2f} | {row['pruned_ms']:.2f} | {row['speedup']:.2f}x |")

    atomic_write_json(args.output, {
        "command": " ".join(["python"] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment_info(),
        "regime": {"batch_size": args.batch_size, "sequence_length": args.sequence_length, "dtype": "float32"},
        "layouts": {u.name: lay.code for u, lay in zip(units, layouts)},
        "per_shape": per_shape,
        "end_to_end": end_to_end,
    })


if __name__ == "__main__":
    main()
