"""A structured-only SPDY search on MiniLM (issue 6 prototype): per block, how many heads and FFN neurons to keep.

Search units are the 12 groups (6 blocks x attention, FFN). Levels are keep counts: every head count for
attention, eighths of the neurons for FFNs. The times are the groups' shrunken products timed alone
(`spdy_hf.latency.structured`), and the constant term is the measured dense model minus their dense sum. The
database holds structured OBS levels with compensation from one sequential calibration pass (dense propagation).
SPDY's DP and local search (the library's `spdy_search`, default settings) pick the profile with the least
cosine distance to the dense model on the 32 scoring windows. The profile is then applied by physically
shrinking a copy of the model, and its speedup is measured interleaved with the dense model. Quality is the
held-out embedding cosine of section 2 of docs/BENCHMARKS.md.

    python benchmarks/structured_spdy.py --target-speedup 1.5
"""

import argparse
import copy
import sys
from datetime import datetime, timezone

import numpy as np
import torch
from heldout import heldout_texts, sentence_embeddings

from spdy_hf.data import load_texts, token_windows
from spdy_hf.database.sequential import SequentialCalibrator
from spdy_hf.database.structured_obs import structured_obs_levels
from spdy_hf.latency.structured import structured_table
from spdy_hf.loading import load_model_and_tokenizer
from spdy_hf.scoring import DistanceScorer
from spdy_hf.search import compute_budget, spdy_search
from spdy_hf.structured import find_structured_groups, shrink, zero_fill
from spdy_hf.timing import interleaved_median_ms, median_ms
from spdy_hf.units import Unit

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--target-speedup", type=float, nargs="+", default=[1.5, 2.0])
parser.add_argument("--quick", action="store_true", help="Tiny search (smoke run).")
args = parser.parse_args()

model, tokenizer = load_model_and_tokenizer()
dense = copy.deepcopy(model)
windows = token_windows(tokenizer, load_texts("builtin"), 128, 128, seed=0)
groups = find_structured_groups(model)
modules = dict(model.named_modules())
shapes = {n: tuple(m.weight.shape) for n, m in modules.items() if getattr(m, "weight", None) is not None
          and m.weight.dim() == 2}
gen = torch.Generator().manual_seed(0)
ids = torch.randint(0, model.config.vocab_size, (1, 128), generator=gen)
regime = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

# 1. latency: groups' shrunken products at every keep count; the constant from the dense model
table = structured_table(groups, shapes, tokens=128)
keeps = [table[f"{g.block}:{g.kind}"]["keep"] for g in groups]
n_levels = max(len(k) for k in keeps)
times = np.full((len(groups), n_levels), np.inf)
for u, g in enumerate(groups):
    t = table[f"{g.block}:{g.kind}"]["times_ms"]
    times[u, :len(t)] = t
with torch.inference_mode():
    base = median_ms(lambda: model(**regime), 5, 50)

# 2. database: structured OBS levels of every group (dense propagation, one pass)
consumers = [Unit(name=g.consumer, module=modules[g.consumer], block=g.block) for g in groups]
by_consumer = {g.consumer: (u, g) for u, g in enumerate(groups)}
levels = {}


def process(block, units, stats):
    for unit in units:
        u, g = by_consumer[unit.name]
        s = stats[unit.name]
        for k, level in zip(keeps[u], structured_obs_levels(s.weight, s.hessian, g.group_size, keeps[u])):
            levels[(u, k)] = level


batches = [{k: v[i:i + 8] for k, v in windows.items()} for i in range(0, 128, 8)]
SequentialCalibrator(model, consumers, batches, progress=False).run(lambda block: True, process)

originals = {name: modules[name].weight.detach().clone() for g in groups for name in [*g.producers, g.consumer]}
bias_originals = {name: modules[name].bias.detach().clone() for g in groups for name in g.producers
                  if getattr(modules[name], "bias", None) is not None}


@torch.no_grad()
def stitch(profile, target=model):
    mods = dict(target.named_modules())
    for u, (g, level) in enumerate(zip(groups, profile)):
        for name in [*g.producers, g.consumer]:
            mods[name].weight.copy_(originals[name])
        for name, b in bias_originals.items():
            if name in g.producers:
                mods[name].bias.copy_(b)
        kept, weight = levels[(u, keeps[u][level])]
        zero_fill(target, g, kept)
        mods[g.consumer].weight.copy_(weight)  # BERT's Linear: (out, in) as the solver returns it


eval_windows = {k: v[:32] for k, v in windows.items()}
scorer = DistanceScorer(model, [{k: v[i:i + 8] for k, v in eval_windows.items()} for i in range(0, 32, 8)], "cosine")
heldout = heldout_texts()


def embeddings(m):
    return sentence_embeddings(m, tokenizer, heldout)


reference = embeddings(dense)
print(f"{datetime.now(timezone.utc).isoformat()} {' '.join(sys.argv)}")
print(f"dense model {base:.2f} ms; groups' dense products {times[:, 0].sum():.2f} ms")
print("| target | predicted | measured speedup | calibration 1-cos | held-out cosine | kept heads per block | "
      "kept FFN neurons per block |")
print("|---|---|---|---|---|---|---|")
for target in args.target_speedup:
    budget = compute_budget(times, base, target)
    if not budget.reachable:
        print(f"| {target} | unreachable (max {budget.max_reachable_speedup:.2f}x) | | | | | |")
        continue
    aim = min(target * 1.05, budget.max_reachable_speedup)
    search_budget = compute_budget(times, base, aim)

    def evaluate(profile):  # noqa: B023 (called within this iteration only)
        stitch(profile)
        return scorer()

    settings = {"num_random_inits": 5, "patience": 3} if args.quick else {}
    result = spdy_search(evaluate, times, search_budget.budget_ms, progress=False, **settings)
    profile = result.profile
    stitch(profile)
    score = scorer()
    cosine = float((embeddings(model) * reference).sum(-1).mean())
    shrunk = copy.deepcopy(model)
    for u, g in enumerate(groups):
        kept = levels[(u, keeps[u][profile[u]])][0]
        if kept:
            shrink(shrunk, g, kept)
    with torch.inference_mode():
        dense_ms, shrunk_ms = interleaved_median_ms([lambda: dense(**regime), lambda m=shrunk: m(**regime)], 5, 100)
    predicted = budget.predicted_speedup(times[np.arange(len(groups)), profile])
    heads = [keeps[u][profile[u]] for u, g in enumerate(groups) if g.kind == "attention"]
    neurons = [keeps[u][profile[u]] for u, g in enumerate(groups) if g.kind == "ffn"]
    print(f"| {target} | {predicted:.3f}x | {dense_ms / shrunk_ms:.3f}x | {score:.4f} | {cosine:.4f} | {heads} | "
          f"{neurons} |", flush=True)
    stitch([0] * len(groups))
