"""Several targets in one run against one job per target: wall time, measured speedups and quality on every set.

Each job is the command a user runs, `spdy-hf prune`, in its own process with a fresh cache (nothing measured or
built before: the latency table, the database and the search all start cold), timed from the outside:

    spdy-hf prune MODEL --target-speedup 1.5 -o single-1.5x                       # one job per target
    spdy-hf prune MODEL --target-speedup 1.25,1.5,2.0 -o several                  # one run for all three

The run for all three is timed against the single job for the reference target (1.5 by default), and against
the single jobs for every target when `--all-singles` asks for them. Every output is then judged on the built-in
held-out split and on each held-out set of another domain (benchmarks/domains.py; embedding cosine for an encoder,
perplexity ratio for a causal LM), so the run's models can be compared with the single jobs' models.

    python benchmarks/several_targets.py --model minilm --all-singles
    python benchmarks/several_targets.py --model smollm2 --targets 1.25,1.5 --no-singles

Arguments the script does not know go to every `spdy-hf prune` (`--latency-table FILE`: one table for every job,
so that the models differ only by what the run changes; `--recipe FILE`: settings such as
`search.warm_candidates`).

Run it on an otherwise idle machine: the wall times are the result.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

import torch
from domains import DOMAINS, MissingDomain
from transfer import Judge, evaluation_sets, model_path

from spdy_hf.modeling.loading import load_model_and_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))


def run_job(model: str, targets: str, output: str, extra: list[str]) -> float:
    """`spdy-hf prune` in its own process with a fresh cache; returns its wall seconds."""
    env = {**os.environ, "SPDY_HF_CACHE": tempfile.mkdtemp(prefix="spdy-cold-cache-")}
    command = [sys.executable, "-m", "spdy_hf", "prune", model, "--target-speedup", targets, "-o", output,
               "--no-progress", "--allow-shortfall", *extra]
    print("$", " ".join(command[2:]), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def judged(judge: Judge, directory: str) -> dict:
    report = json.load(open(os.path.join(directory, "spdy_report.json"), encoding="utf-8"))
    model, _ = load_model_and_tokenizer(directory)
    scored = judge.compare(model)
    return {"target": report["target_speedup"], "measured_speedup": report["measured_speedup"],
            "search": {k: report["search"].get(k) for k in ("candidates", "started_from")},
            "stage_seconds": report["stage_seconds"],
            "peak_gib": round(max(v for v in report["stage_peak_rss_mb"].values() if v) / 1024, 2), **scored}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="minilm, smollm2 or a local model path")
    parser.add_argument("--targets", default="1.25,1.5,2.0")
    parser.add_argument("--reference", type=float, default=1.5, help="The single job the run is timed against.")
    parser.add_argument("--all-singles", action="store_true", help="A single job for every target, not only the "
                        "reference (their times and models too).")
    parser.add_argument("--no-singles", action="store_true", help="Only the run, its models judged (no single job "
                        "to time it against).")
    parser.add_argument("--work-dir", default=None, help="Where the outputs go (default: a temporary directory).")
    parser.add_argument("--output", default=os.path.join(HERE, "out", "several-targets.jsonl"))
    parser.add_argument("--domains", default=",".join(DOMAINS))
    args, extra = parser.parse_known_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    try:
        sets = evaluation_sets([d for d in args.domains.split(",") if d])
    except MissingDomain as e:
        print(e, file=sys.stderr)
        return 2
    targets = [float(t) for t in args.targets.split(",")]
    work = args.work_dir or tempfile.mkdtemp(prefix="spdy-several-")
    path = str(model_path(args.model))
    name = os.path.basename(os.path.normpath(path))

    singles, outputs = {}, {}
    for target in [] if args.no_singles else targets if args.all_singles else [args.reference]:
        out = os.path.join(work, f"single-{target:g}x")
        singles[target] = run_job(path, f"{target:g}", out, extra)
        outputs[("single", target)] = out
    several_s = run_job(path, args.targets, os.path.join(work, "several"), extra)
    for target in targets:
        outputs[("several", target)] = os.path.join(work, "several", f"spdy-{name}-{target:g}x")

    model, tokenizer = load_model_and_tokenizer(path)
    judge = Judge(model, tokenizer, sets)
    rows = {key: judged(judge, directory) for key, directory in outputs.items()}
    summary = {
        "model": args.model, "targets": targets, "prune_arguments": extra, "several_s": round(several_s, 1),
        "single_s": {f"{t:g}": round(s, 1) for t, s in singles.items()},
        "ratio_to_reference": round(several_s / singles[args.reference], 3) if args.reference in singles else None,
        "ratio_to_singles_sum": round(several_s / sum(singles.values()), 3) if len(singles) == len(targets) else None,
        "rows": [{"job": job, **row} for (job, _), row in rows.items()],
        "machine": os.uname().nodename, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv), "torch": torch.__version__,
    }
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "a", encoding="utf-8") as f:
        f.write(json.dumps(summary) + "\n")
    print(f"one run for {args.targets}: {several_s:.1f} s; single jobs: "
          + (", ".join(f"{t:g}x {s:.1f} s" for t, s in singles.items()) or "none")
          + ("" if summary["ratio_to_reference"] is None else
             f"; run / single {args.reference:g}x = {summary['ratio_to_reference']:.3f}"))
    for (job, target), row in rows.items():
        quality = " ".join(f"{k}={v:.4f}" for k, v in row["quality"].items())
        print(f"  {job:7s} {target:g}x: measured {row['measured_speedup']:.3f}x, search {row['search']}, {quality}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
