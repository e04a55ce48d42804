"""The structured OBS of an FFN's neurons: the batched elimination spdy_hf runs against eliminating one neuron at a
time, side by side on the same layer, with the levels each gives.

    python benchmarks/structured_obs_speed.py                    # SmolLM2-135M, SmolLM2-360M and TinyLlama-1.1B FFNs
    python benchmarks/structured_obs_speed.py --shapes 2048x5632

Each shape is a down projection (hidden x FFN neurons) with random weights and a Hessian of correlated random inputs,
solved for the default levels (`structured.ffn_grid: 8`: keeping 0, 1/8, ..., all of the neurons) with the bias
fitted (`mean`), as the database solves it. The one-at-a-time elimination rewrites the weight and H^-1 whole for every
neuron removed (rank-one updates, dropping removed columns once they are a sixteenth of those held); the batched one
keeps a batch's updates as vectors and applies them in two matrix products (`spdy_hf.database.structured_obs`).
Prints, per shape, both times, their ratio, whether every level keeps the same neurons, and the largest weight
difference. Run it alone on the machine: the times are the result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone

import torch

from spdy_hf.database.structured_obs import _damped_inverse, centered_hessian, structured_obs_levels

HERE = os.path.dirname(os.path.abspath(__file__))


def one_at_a_time(weight: torch.Tensor, hessian: torch.Tensor, keep_counts: list[int], mean: torch.Tensor,
                  damp: float = 0.01) -> list[tuple[list[int], torch.Tensor]]:
    """Greedy single-column OBS with the bias free, one rank-one update of the weight and of H^-1 per column."""
    w_full = weight.to(torch.float64)
    hinv = _damped_inverse(centered_hessian(hessian, mean), damp)
    n = w_full.shape[1]
    w, held, gone = w_full.clone(), list(range(n)), torch.zeros(n, dtype=torch.bool)
    alive, wanted, results = n, set(keep_counts), {n: (list(range(n)), w_full.float())}
    last = min((k for k in wanted if k > 0), default=n)
    while alive > last:
        errors = (w * w).sum(dim=0) / hinv.diagonal()
        errors[gone] = float("inf")
        best = int(torch.argmin(errors))
        scale = -1.0 / float(hinv[best, best])
        w.addr_(w[:, best].clone(), hinv[best].clone(), alpha=scale)
        hinv.addr_(hinv[:, best].clone(), hinv[best].clone(), alpha=scale)
        w[:, best], hinv[best, :], hinv[:, best], hinv[best, best] = 0.0, 0.0, 0.0, 1.0
        gone[best] = True
        alive -= 1
        if int(gone.sum()) >= max(1, len(held) // 16) or alive in wanted:
            keep = (~gone).nonzero().squeeze(1)
            w, hinv = w[:, keep], hinv[keep][:, keep]
            held = [h for h, x in zip(held, gone.tolist()) if not x]
            gone = torch.zeros(len(held), dtype=torch.bool)
        if alive in wanted:
            full = torch.zeros_like(w_full, dtype=torch.float32)
            full[:, held] = w.float()
            results[alive] = (list(held), full)
    results.setdefault(0, ([], torch.zeros_like(w_full, dtype=torch.float32)))
    return [results[k] for k in keep_counts]


def layer(out_features: int, neurons: int, samples: int = 8192, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    scales = torch.rand(neurons, 1, generator=gen)
    mixing = torch.randn(neurons, 256, generator=gen) / 16
    x = (mixing @ torch.randn(256, samples, generator=gen) + torch.randn(neurons, samples, generator=gen)) * scales
    return torch.randn(out_features, neurons, generator=gen), x @ x.T * (2 / samples), x.mean(dim=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="576x1536,960x2560,2048x5632", help="hidden x neurons, comma-separated")
    parser.add_argument("--grid", type=int, default=8, help="levels: keeping 0, 1/grid, ..., all of the neurons")
    parser.add_argument("--output", default=os.path.join(HERE, "out", "structured_obs_speed.jsonl"))
    args = parser.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    for shape in args.shapes.split(","):
        out_features, neurons = (int(x) for x in shape.split("x"))
        weight, hessian, mean = layer(out_features, neurons)
        counts = [round(neurons * i / args.grid) for i in range(args.grid + 1)]
        start = time.perf_counter()
        batched = structured_obs_levels(weight, hessian, 1, counts, mean=mean)
        batched_s = time.perf_counter() - start
        start = time.perf_counter()
        single = one_at_a_time(weight, hessian, counts, mean)
        single_s = time.perf_counter() - start
        row = {"shape": shape, "levels": len(counts), "batched_s": round(batched_s, 2),
               "one_at_a_time_s": round(single_s, 2), "speedup": round(single_s / batched_s, 2),
               "same_neurons": all(a[0] == b[0] for a, b in zip(batched, single)),
               "max_weight_difference": max(float((a[1] - b[1]).abs().max()) for a, b in zip(batched, single)),
               "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__}
        print(json.dumps(row), flush=True)
        with open(args.output, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
