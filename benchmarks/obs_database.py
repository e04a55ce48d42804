"""Building the OBS pruning database for the bundled all-MiniLM-L6-v2: time, peak memory, and what it buys.

1. Builds the OBS database from scratch (fresh temporary directory, nothing cached) for each --propagation, with
   the default calibration set (128 windows x 128 tokens of the built-in corpus) and all 42 SPDY levels, and
   records the wall time and the process's peak resident memory.
2. Scores uniform profiles (every unit at one level) of each database and of the magnitude database against the
   dense model: the search's score on its 32 scoring windows (1 - cosine of the final hidden states for this
   encoder) and the mean cosine of held-out sentence embeddings (files disjoint from the calibration files).

The anchor level (what later blocks are calibrated on with propagation "pruned") is the uniform level that meets
--target-speedup in the latency table, as SPDYPruner picks it.

    python benchmarks/obs_database.py --output benchmarks/out/obs_database.json
"""

import argparse
import logging
import os
import resource
import sys
import tempfile
import time
from datetime import datetime, timezone

from heldout import heldout_texts, sentence_embeddings

from spdy_hf import SPDYConfig, find_units
from spdy_hf.calibration.text import load_texts, token_windows
from spdy_hf.database import MagnitudeDatabase, build_obs_database
from spdy_hf.families.unstructured import UnstructuredFamily
from spdy_hf.latency.environment import environment_info
from spdy_hf.modeling.levels import get_levels
from spdy_hf.modeling.loading import load_model_and_tokenizer
from spdy_hf.search import anchor_level, compute_budget, with_margin
from spdy_hf.search.scoring import DistanceScorer
from spdy_hf.utils.io import atomic_write_json

log = logging.getLogger("obs_database")

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--propagation", nargs="+", default=["pruned", "dense"], choices=["pruned", "dense"])
parser.add_argument("--target-speedup", type=float, default=1.5, help="Sets the anchor level (see above).")
parser.add_argument("--levels", type=int, nargs="+", default=[10, 20, 25, 28, 30],
                    help="Uniform level indices to score (0 dense ... 41).")
parser.add_argument("--output", default="benchmarks/out/obs_database.json", help="JSON results path.")
args = parser.parse_args()
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # Linux reports KiB


config = SPDYConfig(target_speedup=args.target_speedup)
levels = get_levels(config.levels)
model, tokenizer = load_model_and_tokenizer()
cal = config.calibration
windows = token_windows(tokenizer, load_texts(cal.source), cal.num_samples, cal.sequence_length, cal.seed)
units = find_units(model, config.skip_modules, example_inputs={k: v[:1] for k, v in windows.items()})

# the unstructured family's latency table (cached after the first run) sets the anchor, as a prune would
plan = UnstructuredFamily(config, model).plan(units)
budget = compute_budget(plan.times, plan.base_ms, config.target_speedup, reference_ms=plan.reference_ms)
search_budget = with_margin(plan.times, budget, config.search.speedup_margin, config.search.dp_buckets,
                            reference_ms=plan.reference_ms)  # the search's aim, with its margin
anchor = anchor_level(plan.times, search_budget.budget_ms)
log.info("Anchor level %d (sparsity %.4f) for %.2fx.", anchor, levels[anchor], args.target_speedup)

rss_before = peak_rss_gb()
databases, builds = {}, {}
workdir = tempfile.TemporaryDirectory()  # kept to the end: a database reads its levels from its files
for propagation in args.propagation:
    start = time.perf_counter()
    databases[propagation] = build_obs_database(
        model, units, levels, windows, directory=os.path.join(workdir.name, propagation), anchor_level=anchor,
        propagation=propagation, dampening=config.database.dampening, block_size=config.database.block_size,
        batch_size=config.database.batch_size)
    builds[propagation] = {"seconds": time.perf_counter() - start, "peak_rss_gb": peak_rss_gb()}
    log.info("OBS database (%s propagation): %.1f s, peak RSS so far %.2f GB.", propagation,
             builds[propagation]["seconds"], builds[propagation]["peak_rss_gb"])
databases["magnitude"] = MagnitudeDatabase(units, levels)

eval_windows = {k: v[: config.search.eval_samples] for k, v in windows.items()}
bs = config.search.eval_batch_size
scorer = DistanceScorer(model, [{k: v[i:i + bs] for k, v in eval_windows.items()}
                                for i in range(0, eval_windows["input_ids"].shape[0], bs)])
heldout = heldout_texts()


def embeddings(texts):
    return sentence_embeddings(model, tokenizer, texts)


dense_embeddings = embeddings(heldout)
scores = []
for level in args.levels:
    for name, db in databases.items():
        for other in databases.values():
            other.stitch([0] * len(units))
        db.stitch([level] * len(units))
        cosine = float((embeddings(heldout) * dense_embeddings).sum(-1).mean())
        scores.append({"database": name, "level": level, "sparsity": levels[level], "calibration_score": scorer(),
                       "score_kind": scorer.kind, "heldout_cosine": cosine})
        log.info("level %d (%.4f) %-9s score (%s) %.4f held-out cosine %.4f", level, levels[level], name,
                 scorer.kind, scores[-1]["calibration_score"], cosine)

lines = [f"OBS database build (128 x 128 calibration tokens, {len(levels)} levels, {len(units)} units, anchor level "
         f"{anchor}):", ""]
lines += [f"- propagation {p}: {b['seconds']:.1f} s, peak RSS {b['peak_rss_gb']:.2f} GB (before builds "
          f"{rss_before:.2f} GB)" for p, b in builds.items()]
lines += ["", "| uniform level | sparsity | " + " | ".join(f"{n} score ({scorer.kind}) | {n} held-out cosine"
                                                    for n in databases) + " |",
          "|---|---|" + "---|---|" * len(databases)]
for level in args.levels:
    row = {s["database"]: s for s in scores if s["level"] == level}
    lines.append(f"| {level} | {levels[level]:.4f} | " + " | ".join(
        f"{row[n]['calibration_score']:.4f} | {row[n]['heldout_cosine']:.4f}" for n in databases) + " |")
print("\n".join(lines))
atomic_write_json(args.output, {
    "benchmark": "obs_database", "date": datetime.now(timezone.utc).isoformat(), "command": sys.argv,
    "machine": environment_info(), "anchor_level": anchor, "builds": builds, "peak_rss_before_builds_gb": rss_before,
    "scores": scores, "calibration": {"windows": cal.num_samples, "tokens": cal.sequence_length},
})
