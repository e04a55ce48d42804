"""SPDY profile vs uniform sparsity at the same measured speedup, on the bundled all-MiniLM-L6-v2 (CPU).

1. SPDYPruner finds a per-unit profile for --target-speedup and measures its speedup (its own verify step).
2. A fresh dense copy of the model gets the same magnitude database; the uniform baseline puts every unit at
   one level of it: the smallest level whose measured speedup reaches SPDY's, each candidate timed interleaved
   with the dense model and SPDY's model in the same session (as `SPDYPruner._verify` times).
3. Both are scored against the dense model: the search's calibration score (DistanceScorer on the pruner's
   eval windows) and the mean cosine of held-out sentence embeddings (mean pooling + L2, as the model card).

    python benchmarks/spdy_vs_uniform.py --quick --output /tmp/bench_quick.json   # smoke run, minutes
    python benchmarks/spdy_vs_uniform.py                                           # the real one, idle machine
"""

import argparse
import logging
import sys
from datetime import datetime, timezone

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from spdy_hf import RegimeConfig, SearchConfig, SPDYConfig, SPDYPruner, find_units
from spdy_hf.apply import KernelSwap
from spdy_hf.data import builtin_corpus, load_texts, token_windows
from spdy_hf.database import build_database
from spdy_hf.environment import environment_info
from spdy_hf.errors import SPDYError
from spdy_hf.io import atomic_write_json
from spdy_hf.levels import get_levels
from spdy_hf.loading import load_model_and_tokenizer
from spdy_hf.scoring import DistanceScorer
from spdy_hf.search import compute_budget
from spdy_hf.timing import interleaved_median_ms

HELDOUT_TEXTS, HELDOUT_MAX_LENGTH, HELDOUT_BATCH = 256, 128, 32
log = logging.getLogger("spdy_vs_uniform")

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--target-speedup", type=float, default=1.5, help="Speedup SPDY must reach over dense.")
parser.add_argument("--batch-size", type=int, default=1, help="Regime: sequences per forward pass.")
parser.add_argument("--sequence-length", type=int, default=128, help="Regime: tokens per sequence.")
parser.add_argument("--output", default="benchmarks/out/spdy_vs_uniform.json", help="JSON results path.")
parser.add_argument("--quick", action="store_true", help="Tiny search (5 random inits, patience 3): a smoke run.")
parser.add_argument("--seed", type=int, default=0, help="Seed of the SPDY search (calibration windows stay seed 0).")
args = parser.parse_args()
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

search = SearchConfig(num_random_inits=5, patience=3, seed=args.seed) if args.quick else SearchConfig(seed=args.seed)
config = SPDYConfig(target_speedup=args.target_speedup, search=search,
                    regime=RegimeConfig(batch_size=args.batch_size, sequence_length=args.sequence_length))
levels = get_levels(config.levels)

# ----------------------------------------------------------------------------- 1. SPDY
model, tokenizer = load_model_and_tokenizer()
cal = config.calibration
windows = token_windows(tokenizer, load_texts(cal.source), cal.num_samples, cal.sequence_length, cal.seed)
try:  # the pruner gets the very windows we score on below
    result = SPDYPruner(model, config, tokenizer).prune(calibration=windows)
except SPDYError as e:
    sys.exit(f"spdy_vs_uniform: {e}")
report, table, spdy_entries = result.report, result.latency_table, result.profile
del model, result  # pruned in place: everything below works on a fresh dense copy

# ----------------------------------------------------------------------------- 2. the same database, dense copy
model, _ = load_model_and_tokenizer()
by_name = {u.name: u for u in find_units(model, config.skip_modules)}
units = [by_name[p["name"]] for p in spdy_entries]  # the pruner's unit order
database = build_database(config.method, units, levels)  # from the dense weights
layouts = table.layouts_for(units)
times = table.times_for(table.keys_for(units))  # (U, K) ms
budget = compute_budget(times, table.base_time_ms, config.target_speedup, reference_ms=table.reference_time_ms)
spdy_profile = [int(p["level"]) for p in spdy_entries]


def uniform(k):
    return [k] * len(units)


def predicted_speedup(profile):
    return budget.predicted_speedup(times[np.arange(len(units)), profile])


def overall_sparsity(profile):
    zeros = sum(round(levels[k] * u.numel) for u, k in zip(units, profile))
    return zeros / sum(u.numel for u in units)


# ----------------------------------------------------------------------------- 3. timing, interleaved
gen = torch.Generator().manual_seed(0)  # the regime's input, as SPDYPruner._regime_inputs draws it
ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.sequence_length), generator=gen)
regime_inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
warmup, repeats = config.timing.warmup, max(10, config.timing.verify_repeats)


def kernels(profile):
    """The profile's deployed form, built from the weights the database stitches in now."""
    database.stitch(profile)
    return KernelSwap(model, units, [levels[k] for k in profile], layouts)


@torch.inference_mode()
def measure(swaps, repeats=repeats):
    """Median ms of the dense model, then of each swap, interleaved. Dense BLAS does not skip zeros, so the
    original modules holding any pruned weights take the dense model's time (as in `SPDYPruner._verify`)."""
    def run(swap):
        def fn():
            swap.use_deployed() if swap is not None else swaps[0].use_original()
            model(**regime_inputs)
        return fn
    try:
        return interleaved_median_ms([run(None)] + [run(s) for s in swaps], warmup, repeats)
    finally:
        swaps[0].use_original()


# The smallest uniform level whose measured speedup >= SPDY's, measured side by side. Start at the level the
# latency table predicts, then walk down while it still holds, or up until it does.
spdy_swap = kernels(spdy_profile)  # its dense units alias the live weights: fine for timing, not for outputs
candidates = [k for k in range(1, len(levels)) if np.isfinite(times[:, k]).all()]
spdy_predicted = predicted_speedup(spdy_profile)
k = next((k for k in candidates if predicted_speedup(uniform(k)) >= spdy_predicted), candidates[-1])
tried = {}


def try_level(k):
    if k not in tried:
        dense_ms, spdy_ms, uniform_ms = measure([spdy_swap, kernels(uniform(k))])
        tried[k] = {"level": k, "sparsity": levels[k], "predicted_speedup": predicted_speedup(uniform(k)),
                    "measured_speedup": dense_ms / uniform_ms, "spdy_measured_speedup": dense_ms / spdy_ms,
                    "meets": uniform_ms <= spdy_ms}
        log.info("Uniform level %d (sparsity %.4f): %.3fx measured vs SPDY %.3fx side by side.", k, levels[k],
                 tried[k]["measured_speedup"], tried[k]["spdy_measured_speedup"])
    return tried[k]["meets"]


i = candidates.index(k)
if try_level(candidates[i]):
    while i > 0 and try_level(candidates[i - 1]):
        i -= 1
else:
    while i + 1 < len(candidates) and not try_level(candidates[i + 1]):
        i += 1
met = [t["level"] for t in tried.values() if t["meets"]]
if met:
    uniform_level = min(met)
else:
    uniform_level = max(tried.values(), key=lambda t: t["measured_speedup"])["level"]
    log.warning("No uniform level reaches SPDY's measured speedup; reporting the fastest one tried.")

# A fresh side-by-side measurement of the chosen pair (the walk's numbers are biased towards passing).
dense_ms, spdy_ms, uniform_ms = measure([spdy_swap, kernels(uniform(uniform_level))], repeats=2 * repeats)
log.info("Side by side: dense %.3f ms, SPDY %.3f ms (%.3fx), uniform %.3f ms (%.3fx).",
         dense_ms, spdy_ms, dense_ms / spdy_ms, uniform_ms, dense_ms / uniform_ms)

# ----------------------------------------------------------------------------- 4. quality vs dense
database.stitch(uniform(0))
eval_windows = {key: v[: config.search.eval_samples] for key, v in windows.items()}
bs = config.search.eval_batch_size
scorer = DistanceScorer(model, [{key: v[i:i + bs] for key, v in eval_windows.items()}
                                for i in range(0, eval_windows["input_ids"].shape[0], bs)])
heldout = list(builtin_corpus("heldout"))[:HELDOUT_TEXTS]  # disjoint from calibration by construction


@torch.inference_mode()
def embeddings(texts):
    """all-MiniLM-L6-v2 sentence embeddings: attention-mask-weighted mean of last_hidden_state, L2-normalised."""
    out = []
    for i in tqdm(range(0, len(texts), HELDOUT_BATCH), desc="held-out embeddings", leave=False):
        batch = tokenizer(texts[i:i + HELDOUT_BATCH], padding=True, truncation=True,
                          max_length=HELDOUT_MAX_LENGTH, return_tensors="pt")
        hidden = model(**batch).last_hidden_state  # (B, T, H)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1))
    return torch.cat(out)


dense_embeddings = embeddings(heldout)
rows = {}
for method, profile, ms in (("spdy", spdy_profile, spdy_ms), ("uniform", uniform(uniform_level), uniform_ms),
                            ("dense", uniform(0), dense_ms)):  # dense last: checks the database restores it
    database.stitch(profile)
    cosine = (embeddings(heldout) * dense_embeddings).sum(-1)
    rows[method] = {"measured_speedup": dense_ms / ms, "time_ms": ms, "predicted_speedup": predicted_speedup(profile),
                    "overall_sparsity": overall_sparsity(profile), "calibration_score": scorer(),
                    "heldout_cosine_mean": float(cosine.mean()), "heldout_cosine_min": float(cosine.min())}
rows["dense"]["predicted_speedup"] = 1.0  # the original modules, not the all-dense deployed form
rows["spdy"]["pruner_measured_speedup"] = report["measured_speedup"]
rows["spdy"]["pruner_calibration_score"] = report["score_dense_vs_pruned"]
rows["uniform"].update(level=uniform_level, sparsity=levels[uniform_level], reaches_spdy_speedup=bool(met))
if not np.isclose(rows["spdy"]["calibration_score"], report["score_dense_vs_pruned"], rtol=1e-4):
    log.warning("SPDY's score re-computed here (%.6g) differs from the pruner's (%.6g).",
                rows["spdy"]["calibration_score"], report["score_dense_vs_pruned"])

# ----------------------------------------------------------------------------- 5. report
lines = [f"Target {config.target_speedup:g}x, batch {args.batch_size} x {args.sequence_length} tokens, "
         f"score: {scorer.kind} on {config.search.eval_samples} calibration windows, cosine: {len(heldout)} held-out texts",
         "", "| method | measured speedup | predicted speedup | overall sparsity | calibration score | held-out cosine |",
         "|---|---|---|---|---|---|"]
for method, r in rows.items():
    name = f"uniform {levels[uniform_level]:.4f}" if method == "uniform" else method
    lines.append(f"| {name} | {r['measured_speedup']:.3f}x | {r['predicted_speedup']:.3f}x | "
                 f"{r['overall_sparsity']:.4f} | {r['calibration_score']:.5g} | {r['heldout_cosine_mean']:.5f} |")
print("\n".join(lines))
print(f"(SPDY's measured speedup in the pruner's own verify step: {report['measured_speedup']:.3f}x; "
      f"uniform/SPDY time ratio side by side: {uniform_ms / spdy_ms:.3f})")

atomic_write_json(args.output, {
    "benchmark": "spdy_vs_uniform", "date": datetime.now(timezone.utc).isoformat(), "command": sys.argv,
    "args": vars(args), "machine": environment_info(), "config": config.to_dict(), "methods": rows,
    "timing": {"dense_ms": dense_ms, "spdy_ms": spdy_ms, "uniform_ms": uniform_ms, "repeats": 2 * repeats,
               "warmup": warmup, "uniform_over_spdy_time": uniform_ms / spdy_ms},
    "uniform_level_walk": sorted(tried.values(), key=lambda t: t["level"]),
    "score_kind": scorer.kind, "heldout": {"texts": len(heldout), "max_length": HELDOUT_MAX_LENGTH},
    "latency_table": {"base_time_ms": table.base_time_ms, "deployed_dense_time_ms": table.deployed_dense_time_ms},
    "spdy_pruner_report": report, "spdy_profile": spdy_entries,
})
log.info("Results written to %s.", args.output)
