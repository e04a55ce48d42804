"""Does scoring candidates on fewer calibration windows rank them as more windows do? (SmolLM2-135M, CPU)

The search keeps whichever candidate scores lowest, so what matters is the order of scores, not their values.
Candidate profiles are drawn the way the search draws them, at the default job's aim (1.5x target + 5 % margin,
structured family, the default latency table and OBS database, read from the cache or built): random
sensitivities through the DP, and mutations of the best of those (a few sensitivities redrawn, as in the local
search). Each is scored (KL to the dense model) on the first W calibration windows for each W in --windows, and
the order of each W is compared with that of the most windows: Spearman's rank correlation over all candidates,
the same over the mutations alone (close candidates, the hard case), and where the best candidate by W ranks by
the reference. With --dtype bfloat16 the W-window scores come from a bfloat16 copy of the model (as the search
scores on CPUs with bfloat16 matrix units) and the reference stays float32.

    python benchmarks/score_ranking.py --candidates 40 --windows 32 16 8 4
"""

import argparse
import json
import logging
import os
import sys
import time
from datetime import datetime, timezone

import numpy as np
import torch

from spdy_hf import SPDYConfig
from spdy_hf.calibration.text import load_texts, token_windows
from spdy_hf.families import get_family
from spdy_hf.latency.environment import environment_info
from spdy_hf.modeling.loading import load_model_and_tokenizer
from spdy_hf.modeling.units import find_units
from spdy_hf.pipeline.run import check_budget
from spdy_hf.search import LiveProfile, solve_dp
from spdy_hf.search.scoring import DistanceScorer
from spdy_hf.utils.io import atomic_write_text

log = logging.getLogger("score_ranking")


def ranks(x) -> np.ndarray:
    return np.argsort(np.argsort(np.asarray(x)))


def spearman(a, b) -> float:
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--candidates", type=int, default=40, help="Profiles scored (half random, half mutations).")
parser.add_argument("--windows", type=int, nargs="+", default=[32, 16, 8, 4], help="Window counts; most first.")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype the W-window scores are computed in (the reference stays float32).")
parser.add_argument("--output", default="benchmarks/out/score_ranking.json")
args = parser.parse_args()
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

from heldout import smollm2_path  # noqa: E402

model, tokenizer = load_model_and_tokenizer(smollm2_path())
config = SPDYConfig()
cal = config.calibration
windows = token_windows(tokenizer, load_texts(cal.source), cal.num_samples, cal.sequence_length, cal.seed)
family = get_family(config.family)(config, model, progress=False)
plan = family.plan(find_units(model, config.skip_modules, example_inputs={k: v[:1] for k, v in windows.items()}))
budgets = check_budget(config, plan)
databases = family.build_database(plan, windows, budgets)
prior = family.prior(plan, databases)
live = LiveProfile(family, plan, databases)
rng = np.random.default_rng(0)
n_random = args.candidates // 2
sens = [rng.random(len(plan.names)) for _ in range(n_random)]
profiles = [solve_dp(c[:, None] * prior, plan.times, budgets.search.budget_ms, config.search.dp_buckets) for c in sens]


def batches(w: int) -> list[dict]:
    return [{k: v[i:i + min(w, 8)] for k, v in windows.items()} for i in range(0, w, 8)]


low = None if args.dtype == "float32" else getattr(torch, args.dtype)
scorers = {w: DistanceScorer(model, batches(w), dtype=None if i == 0 else low) for i, w in enumerate(args.windows)}
scores = {w: [] for w in args.windows}
start = time.perf_counter()


def score_all(profile):
    live(profile)
    for w, scorer in scorers.items():
        scores[w].append(scorer())


for p in profiles:
    score_all(p)
best = sens[int(np.argmin(scores[args.windows[0]]))]
k = max(1, round(0.1 * len(plan.names)))
while len(profiles) < args.candidates:  # mutations of the best random candidate, as the local search makes them
    c = best.copy()
    redraw = rng.choice(len(c), size=k, replace=False)
    c[redraw] = rng.random(k)
    p = solve_dp(c[:, None] * prior, plan.times, budgets.search.budget_ms, config.search.dp_buckets)
    if any(list(p) == list(q) for q in profiles):
        continue
    profiles.append(p)
    score_all(p)
ref = scores[args.windows[0]]
rows = []
for w in args.windows[1:]:
    s = scores[w]
    rows.append({"windows": w, "spearman_all": spearman(s, ref),
                 "spearman_mutations": spearman(s[n_random:], ref[n_random:]),
                 "best_by_w_ranks_by_reference": int(ranks(ref)[int(np.argmin(s))]) + 1,
                 "best_mutation_by_w_ranks_among_mutations": int(ranks(ref[n_random:])[int(np.argmin(s[n_random:]))]) + 1})
out = {"reference_windows": args.windows[0], "dtype": args.dtype, "candidates": len(profiles), "random": n_random, "rows": rows,
       "scores": {str(w): v for w, v in scores.items()}, "seconds": time.perf_counter() - start,
       "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
       "environment": environment_info()}
os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
atomic_write_text(args.output, json.dumps(out, indent=2) + "\n")
print(f"| windows | Spearman (all {len(profiles)}) | Spearman (mutations) | best by W, rank by {args.windows[0]} | "
      "best mutation by W, rank among mutations |")
print("|---|---|---|---|---|")
for r in rows:
    print(f"| {r['windows']} | {r['spearman_all']:.3f} | {r['spearman_mutations']:.3f} | "
          f"{r['best_by_w_ranks_by_reference']} | {r['best_mutation_by_w_ranks_among_mutations']} |")
