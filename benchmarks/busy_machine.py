"""The default job on a busy machine: `spdy-hf prune` while another process keeps one core busy.

    python benchmarks/busy_machine.py --hog first-table  # the load while the first latency table is measured
    python benchmarks/busy_machine.py --hog all          # the load for the whole job, verify included
    python benchmarks/busy_machine.py --hog verify --cache DIR  # the load from the verify stage on

Runs `spdy-hf prune <model> --target-speedup 1.5` (the default job: the bundled all-MiniLM-L6-v2, structured
family, OBS) with a fresh cache, so its latency tables are measured under the load. The load is one process
spinning in a Python loop (one of the machine's cores kept busy). With `--hog first-table` it stops once the
first latency table measured under it has been checked (the job logs the check, or caches the table), like a
`pip install` that ends during profiling; with `--hog all` when the job ends; with `--hog verify` it starts when
the job reaches its verify stage (with `--cache`, a cache an earlier run filled, profiling and the database are
reused and the job gets there in a minute or two).

Prints what a user would see and what the guarantee rests on: the exit code (0: target met; 3: the measured
speedup fell short, output written; 2: an error, e.g. a table that failed its checks every time, nothing cached),
the last lines of the log, the report's target/predicted/measured speedups, `target_met`, `timing_noise`, the
random-profile check of the structured table, and each cached table's constant (the model's time outside the
searched groups; never negative in a table that reached the cache). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

HOG = "while True: pass"


def structured_constant(table: dict) -> float | None:
    """The dense model's time minus the searched groups' full times, by the table (None: no structured part)."""
    part = table.get("structured") or {}
    if not part:
        return None
    per_signature = {sig: entry["times_ms"][0] for sig, entry in part["signatures"].items()}
    return part["dense_ms"] - sum(per_signature[sig] for sig in part["groups"].values())


def log_has(log_path: str, *texts: str) -> bool:
    with open(log_path) as f:
        log = f.read()
    return any(text in log for text in texts)


def first_table_checked(log_path: str, cache: str) -> bool:
    """Whether the job has checked (or cached) a latency table it measured."""
    return bool(glob.glob(os.path.join(cache, "latency", "*.json"))) or log_has(
        log_path, "Latency table check:", "cannot be right")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hog", choices=["first-table", "all", "verify"], default="first-table")
    parser.add_argument("--cache", default=None, help="Cache directory to use (default: a fresh one).")
    parser.add_argument("--model", default=None, help="Model to prune (default: the bundled MiniLM).")
    parser.add_argument("--target-speedup", type=float, default=1.5)
    parser.add_argument("--output", default=None, help="Output directory (default: a temporary one).")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="spdy-busy-")
    cache = args.cache or os.path.join(work, "cache")
    out = args.output or os.path.join(work, "out")
    log_path = os.path.join(work, "prune.log")
    command = [sys.executable, "-m", "spdy_hf", "prune", *([args.model] if args.model else []), "--target-speedup",
               str(args.target_speedup), "-o", out, "--no-progress"]
    env = dict(os.environ, SPDY_HF_CACHE=cache, TOKENIZERS_PARALLELISM="false")
    started = time.monotonic()
    with open(log_path, "w") as log:
        job = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        hog = subprocess.Popen([sys.executable, "-c", HOG]) if args.hog != "verify" else None
        hog_started, hog_seconds = started, None
        try:
            while job.poll() is None:
                if args.hog == "first-table" and hog_seconds is None and first_table_checked(log_path, cache):
                    hog.kill()
                    hog_seconds = time.monotonic() - started
                if hog is None and log_has(log_path, "Stage verify"):
                    hog, hog_started = subprocess.Popen([sys.executable, "-c", HOG]), time.monotonic()
                time.sleep(0.2)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
    hog_seconds = hog_seconds if hog_seconds is not None else time.monotonic() - hog_started
    total = time.monotonic() - started
    with open(log_path) as f:
        log_lines = f.read().splitlines()

    report = {}
    if os.path.isfile(os.path.join(out, "spdy_report.json")):
        with open(os.path.join(out, "spdy_report.json")) as f:
            report = json.load(f)
    cached = []
    for path in sorted(glob.glob(os.path.join(cache, "latency", "*.json"))):
        with open(path) as f:
            table = json.load(f)
        cached.append({"file": os.path.basename(path), "constant_ms": structured_constant(table),
                       "timing_noise": table.get("timing_noise"),
                       "profile_check": (table.get("structured") or {}).get("profile_check")})
    summary = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join(command), "hog": args.hog, "hog_seconds": round(hog_seconds, 1),
        "total_seconds": round(total, 1), "exit_code": job.returncode,
        "target_speedup": report.get("target_speedup"), "predicted_speedup": report.get("predicted_speedup"),
        "measured_speedup": report.get("measured_speedup"), "target_met": report.get("target_met"),
        "timing_noise": report.get("timing_noise"), "cached_tables": cached,
        "log": [line[:400] for line in log_lines if "WARNING" in line or "error" in line or "check:" in line
                or "Predicted speedup" in line],
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
