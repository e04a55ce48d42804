"""Held-out perplexity of SmolLM2-135M's uniform structured profiles (every block keeps the same share of its FFN
neurons, and the nearest share of its key/value heads), from the structured database of a job's cache, with the
predicted speedup of each from that cache's latency table. No timing: it only reads what a job measured and built.

    python benchmarks/uniform_shares.py --cache-dir CACHE   # CACHE: the SPDY_HF_CACHE of a default SmolLM2 job
"""

import argparse

import numpy as np
from heldout import smollm2_structured_job

from spdy_hf.pipeline.quality import heldout_windows, perplexity
from spdy_hf.search import LiveProfile

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--cache-dir", required=True, help="The cache of a default job (its table and database).")
args = parser.parse_args()

model, tokenizer, config, family, plan, databases, budget = smollm2_structured_job(args.cache_dir)
layout, live = plan.layout, LiveProfile(family, plan, databases)
heldout = heldout_windows(tokenizer, "builtin", config.evaluation.num_samples, config.evaluation.sequence_length)
print("| FFN share kept | predicted speedup | held-out perplexity |\n|---|---|---|")
for eighths in range(7, 2, -1):
    share = eighths / 8
    profile = np.array([int(np.argmin([abs(k / g.num_groups - share) for k in layout.counts[i]]))
                        for i, g in enumerate(layout.groups)])
    live(profile)
    predicted = budget.predicted_speedup(plan.times[np.arange(len(profile)), profile])
    print(f"| {eighths}/8 | {predicted:.3f}x | {perplexity(model, heldout):.2f} |")
