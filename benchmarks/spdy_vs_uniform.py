"""SPDY vs uniform sparsity, each with the OBS and the magnitude database, at equal measured speedup (MiniLM, CPU).

1. SPDYPruner runs once per method (--methods, default obs and magnitude) for --target-speedup, with the same
   calibration windows and latency table, and measures its own speedup (its verify step).
2. On a fresh dense copy of the model, each method's database is loaded (OBS: from the directory the pruner
   stored it in; magnitude: from the dense weights). The uniform baseline puts every unit at one level: the
   smallest level whose measured time is at most SPDY+OBS's (the first method's), each candidate timed
   interleaved with the dense model and the SPDY profiles in the same session (as the unstructured family's verify times them).
   Uniform + OBS and uniform + magnitude share that level (the same number of zeros per unit, so the same time).
3. Every model is scored against the dense model: the search's calibration score (DistanceScorer on the pruner's
   eval windows) and the mean cosine of held-out sentence embeddings (mean pooling + L2, as the model card), on
   held-out standard-library docstrings from files disjoint from the calibration files.

    python benchmarks/spdy_vs_uniform.py --quick --output /tmp/bench_quick.json   # smoke run, minutes
    python benchmarks/spdy_vs_uniform.py                                           # the real one, idle machine
"""

import argparse
import logging
import sys
from datetime import datetime, timezone

import numpy as np
import torch
from heldout import HELDOUT_MAX_LENGTH, heldout_texts, sentence_embeddings

from spdy_hf import RegimeConfig, SearchConfig, SPDYConfig, SPDYPruner, find_units
from spdy_hf.calibration.text import load_texts, token_windows
from spdy_hf.database import MagnitudeDatabase, load_obs_database
from spdy_hf.deploy.kernels import KernelSwap
from spdy_hf.errors import SPDYError
from spdy_hf.latency.environment import environment_info
from spdy_hf.latency.timing import interleaved_median_ms
from spdy_hf.modeling.levels import get_levels
from spdy_hf.modeling.loading import load_model_and_tokenizer
from spdy_hf.search import compute_budget
from spdy_hf.search.scoring import DistanceScorer
from spdy_hf.utils.io import atomic_write_json

log = logging.getLogger("spdy_vs_uniform")

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--target-speedup", type=float, default=1.5, help="Speedup SPDY must reach over dense.")
parser.add_argument("--batch-size", type=int, default=1, help="Regime: sequences per forward pass.")
parser.add_argument("--sequence-length", type=int, default=128, help="Regime: tokens per sequence.")
parser.add_argument("--methods", nargs="+", default=["obs", "magnitude"], choices=["obs", "magnitude"],
                    help="Database methods; the first one's SPDY time is the one uniform must match.")
parser.add_argument("--score", default="auto", choices=["auto", "cosine", "nmse"], help="The search's score.")
parser.add_argument("--error-prior", default="spdy", choices=["spdy", "measured"], help="DP error prior (obs only).")
parser.add_argument("--output", default="benchmarks/out/spdy_vs_uniform.json", help="JSON results path.")
parser.add_argument("--quick", action="store_true", help="Tiny search (5 random inits, patience 3): a smoke run.")
parser.add_argument("--seed", type=int, default=0, help="Seed of the SPDY search (calibration windows stay seed 0).")
args = parser.parse_args()
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

search = SearchConfig(num_random_inits=5, patience=3, seed=args.seed, score=args.score) if args.quick \
    else SearchConfig(seed=args.seed, score=args.score)
regime = RegimeConfig(batch_size=args.batch_size, sequence_length=args.sequence_length)


def config_for(method):
    search_m = SearchConfig(**{**search.__dict__, "error_prior": args.error_prior if method == "obs" else "spdy"})
    return SPDYConfig(target_speedup=args.target_speedup, search=search_m, regime=regime, method=method)


config = config_for(args.methods[0])
levels = get_levels(config.levels)

# ----------------------------------------------------------------------------- 1. SPDY, once per method
_, tokenizer = load_model_and_tokenizer()
cal = config.calibration
windows = token_windows(tokenizer, load_texts(cal.source), cal.num_samples, cal.sequence_length, cal.seed)
reports, entries, table = {}, {}, None
for method in args.methods:
    model, _ = load_model_and_tokenizer()
    try:  # the pruner gets the very windows we score on below
        result = SPDYPruner(model, config_for(method), tokenizer).prune(calibration=windows, latency_table=table)
    except SPDYError as e:
        sys.exit(f"spdy_vs_uniform: {e}")
    reports[method], entries[method], table = result.report, result.profile, result.latency_table
    del model, result  # pruned in place: everything below works on a fresh dense copy

# ----------------------------------------------------------------------------- 2. the same databases, dense copy
model, _ = load_model_and_tokenizer()
by_name = {u.name: u for u in find_units(model, config.skip_modules)}
units = [by_name[p["name"]] for p in entries[args.methods[0]]]  # the pruner's unit order
databases = {}
for method in args.methods:
    if method == "magnitude":
        databases[method] = MagnitudeDatabase(units, levels)  # from the dense weights
    else:  # the directory the pruner built it in: loaded, nothing recomputed
        databases[method] = load_obs_database(reports[method]["database"]["dir"], units, levels)
layouts = table.layouts_for(units)
times = table.times_for(table.keys_for(units))  # (U, K) ms
budget = compute_budget(times, table.base_time_ms, config.target_speedup, reference_ms=table.reference_time_ms)
spdy_profiles = {m: [int(p["level"]) for p in entries[m]] for m in args.methods}
first = args.methods[0]


def uniform(k):
    return [k] * len(units)


def predicted_speedup(profile):
    return budget.predicted_speedup(times[np.arange(len(units)), profile])


def overall_sparsity(profile):
    zeros = sum(round(levels[k] * u.numel) for u, k in zip(units, profile))
    return zeros / sum(u.numel for u in units)


# ----------------------------------------------------------------------------- 3. timing, interleaved
gen = torch.Generator().manual_seed(0)  # the regime's input, as spdy_hf.latency.backend.regime_inputs draws it
ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.sequence_length), generator=gen)
regime_inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
warmup, repeats = config.timing.warmup, max(10, config.timing.verify_repeats)


def kernels(profile, method=first):
    """The profile's deployed form, built from the weights the database stitches in now (time depends on the
    number of zeros per unit only, which every method's level has the same of)."""
    databases[method].stitch(profile)
    return KernelSwap(model, units, [levels[k] for k in profile], layouts)


@torch.inference_mode()
def measure(swaps, repeats=repeats):
    """Median ms of the dense model, then of each swap, interleaved. Dense BLAS does not skip zeros, so the
    original modules holding any pruned weights take the dense model's time (as in `spdy_hf.families.unstructured.time_kernels`)."""
    def run(swap):
        def fn():
            swap.use_deployed() if swap is not None else swaps[0].use_original()
            model(**regime_inputs)
        return fn
    try:
        return interleaved_median_ms([run(None)] + [run(s) for s in swaps], warmup, repeats)
    finally:
        swaps[0].use_original()


# The smallest uniform level whose measured time is at most SPDY+first method's, measured side by side. Start at
# the level the latency table predicts, then walk down while it still holds, or up until it does.
spdy_swaps = {m: kernels(spdy_profiles[m], m) for m in args.methods}  # dense units alias live weights: timing only
candidates = [k for k in range(1, len(levels)) if np.isfinite(times[:, k]).all()]
spdy_predicted = predicted_speedup(spdy_profiles[first])
k = next((k for k in candidates if predicted_speedup(uniform(k)) >= spdy_predicted), candidates[-1])
tried = {}


def try_level(k):
    if k not in tried:
        dense_ms, spdy_ms, uniform_ms = measure([spdy_swaps[first], kernels(uniform(k))])
        tried[k] = {"level": k, "sparsity": levels[k], "predicted_speedup": predicted_speedup(uniform(k)),
                    "measured_speedup": dense_ms / uniform_ms, "spdy_measured_speedup": dense_ms / spdy_ms,
                    "meets": uniform_ms <= spdy_ms}
        log.info("Uniform level %d (sparsity %.4f): %.3fx measured vs SPDY+%s %.3fx side by side.", k, levels[k],
                 tried[k]["measured_speedup"], first, tried[k]["spdy_measured_speedup"])
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

# A fresh side-by-side measurement of everything (the walk's numbers are biased towards passing).
uniform_swap = kernels(uniform(uniform_level))
timed = measure([spdy_swaps[m] for m in args.methods] + [uniform_swap], repeats=2 * repeats)
dense_ms, uniform_ms = timed[0], timed[-1]
spdy_ms = dict(zip(args.methods, timed[1:-1]))
log.info("Side by side: dense %.3f ms; %s; uniform %.3f ms (%.3fx).", dense_ms,
         "; ".join(f"SPDY+{m} {t:.3f} ms ({dense_ms / t:.3f}x)" for m, t in spdy_ms.items()),
         uniform_ms, dense_ms / uniform_ms)

# ----------------------------------------------------------------------------- 4. quality vs dense
for db in databases.values():
    db.stitch(uniform(0))
eval_windows = {key: v[: config.search.eval_samples] for key, v in windows.items()}
bs = config.search.eval_batch_size
eval_batches = [{key: v[i:i + bs] for key, v in eval_windows.items()}
                for i in range(0, eval_windows["input_ids"].shape[0], bs)]
scorer = DistanceScorer(model, eval_batches, config.search.score)  # the search's own score
other_kind = "nmse" if scorer.kind == "cosine" else "cosine"
other_scorer = DistanceScorer(model, eval_batches, other_kind)
heldout = heldout_texts()  # disjoint from calibration by construction


def embeddings(texts):
    return sentence_embeddings(model, tokenizer, texts)


dense_embeddings = embeddings(heldout)
rows = {}
runs = [(f"spdy+{m}", m, spdy_profiles[m], spdy_ms[m]) for m in args.methods]
runs += [(f"uniform+{m}", m, uniform(uniform_level), uniform_ms) for m in args.methods]
runs += [("dense", first, uniform(0), dense_ms)]  # dense last: checks the database restores it
for name, method, profile, ms in runs:
    for other in databases.values():
        other.stitch(uniform(0))
    databases[method].stitch(profile)
    cosine = (embeddings(heldout) * dense_embeddings).sum(-1)
    rows[name] = {"method": method, "measured_speedup": dense_ms / ms, "time_ms": ms,
                  "predicted_speedup": predicted_speedup(profile), "overall_sparsity": overall_sparsity(profile),
                  "calibration_score": scorer(), f"calibration_{other_kind}": other_scorer(),
                  "heldout_cosine_mean": float(cosine.mean()),
                  "heldout_cosine_min": float(cosine.min())}
rows["dense"]["predicted_speedup"] = 1.0  # the original modules, not the all-dense deployed form
for m in args.methods:
    rows[f"spdy+{m}"]["pruner_measured_speedup"] = reports[m]["measured_speedup"]
    rows[f"spdy+{m}"]["pruner_calibration_score"] = reports[m]["score_dense_vs_pruned"]
    rows[f"uniform+{m}"].update(level=uniform_level, sparsity=levels[uniform_level], reaches_spdy_speedup=bool(met))
    if not np.isclose(rows[f"spdy+{m}"]["calibration_score"], reports[m]["score_dense_vs_pruned"], rtol=1e-4):
        log.warning("SPDY+%s's score re-computed here (%.6g) differs from the pruner's (%.6g).", m,
                    rows[f"spdy+{m}"]["calibration_score"], reports[m]["score_dense_vs_pruned"])

# ----------------------------------------------------------------------------- 5. report
lines = [f"Target {config.target_speedup:g}x, batch {args.batch_size} x {args.sequence_length} tokens, "
         f"score: {scorer.kind} on {config.search.eval_samples} calibration windows, cosine: {len(heldout)} held-out texts",
         "", f"| profile + database | measured speedup | predicted speedup | overall sparsity | calibration {scorer.kind} "
         f"(searched) | calibration {other_kind} | held-out cosine (mean) | held-out cosine (min) |",
         "|---|---|---|---|---|---|---|---|"]
for name, r in rows.items():
    label = name.replace("uniform", f"uniform {levels[uniform_level]:.4f}") if name.startswith("uniform") else name
    lines.append(f"| {label} | {r['measured_speedup']:.3f}x | {r['predicted_speedup']:.3f}x | "
                 f"{r['overall_sparsity']:.4f} | {r['calibration_score']:.5g} | {r[f'calibration_{other_kind}']:.5g} | "
                 f"{r['heldout_cosine_mean']:.5f} | "
                 f"{r['heldout_cosine_min']:.5f} |")
print("\n".join(lines))
print("(measured speedups in the pruner's own verify steps: "
      + ", ".join(f"SPDY+{m} {reports[m]['measured_speedup']:.3f}x" for m in args.methods) + ")")

atomic_write_json(args.output, {
    "benchmark": "spdy_vs_uniform", "date": datetime.now(timezone.utc).isoformat(), "command": sys.argv,
    "args": vars(args), "machine": environment_info(), "config": config.to_dict(), "rows": rows,
    "timing": {"dense_ms": dense_ms, "spdy_ms": spdy_ms, "uniform_ms": uniform_ms, "repeats": 2 * repeats,
               "warmup": warmup},
    "uniform_level_walk": sorted(tried.values(), key=lambda t: t["level"]),
    "score_kind": scorer.kind, "heldout": {"texts": len(heldout), "max_length": HELDOUT_MAX_LENGTH},
    "latency_table": {"base_time_ms": table.base_time_ms, "deployed_dense_time_ms": table.deployed_dense_time_ms},
    "pruner_reports": reports, "spdy_profiles": entries,
})
log.info("Results written to %s.", args.output)
