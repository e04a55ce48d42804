"""A job spread over processes against the same job in one: the database's and the search's seconds, and whether the
outputs are the same.

    python benchmarks/processes.py --model smollm2 --processes 2 --dtype bfloat16 --max-candidates 100

Measures the latency table once (`spdy-hf profile`), then runs the same prune three times, each with a fresh
database, no recovery and no re-aim by verify (`search.verify_corrections: 0`: a re-aim follows timings, which differ
from run to run), alone on the machine, one after the other:

- `one process`: `spdy-hf prune` with every core's threads (a job as people run it);
- `N processes`: `accelerate launch --multi_gpu --num_processes N --num_cpu_threads_per_process T`, T = cores / N;
- `one process, T threads`: the same job in one process with T threads: the output the spread job must equal, bit
  for bit (`benchmarks/same_result.py`).

Prints one JSON line per run (stage seconds, wall seconds, peak memory) and the comparison; `--out` appends them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

from same_result import load, profile_differences
from transfer import model_path

from spdy_hf.utils.processes import machine_threads


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2, minilm, or a model directory.")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--target-speedup", default="1.5")
    parser.add_argument("--dtype", default=None, help="regime.dtype (default: the config's).")
    parser.add_argument("--max-candidates", default="100")
    parser.add_argument("--work-dir", default=None, help="Where tables, databases and outputs go (default: a temp dir).")
    parser.add_argument("--out", help="Append the JSON lines here.")
    args = parser.parse_args()

    path = model_path(args.model)  # SmolLM2: its .gguf file, which the CLI reads
    work = args.work_dir or tempfile.mkdtemp(prefix="spdy-processes-")
    os.makedirs(work, exist_ok=True)
    cores = machine_threads()
    per = max(1, cores // args.processes)
    dtype = ["--dtype", args.dtype] if args.dtype else []
    table = os.path.join(work, "table.json")
    if not os.path.exists(table):
        run([sys.executable, "-m", "spdy_hf", "profile", path, "-o", table, "--no-progress", *dtype], {})

    # verify keeps the searched profile: a re-aim follows its timing, which differs from run to run (and with the
    # threads), where the outputs compared must differ only by how the work was shared
    recipe = os.path.join(work, "recipe.yaml")
    with open(recipe, "w", encoding="utf-8") as f:
        f.write("search:\n  verify_corrections: 0\n  verify_overshoot: null\n")
    prune = ["spdy_hf", "prune", path, "--recipe", recipe, "--target-speedup", args.target_speedup, *dtype,
             "--latency-table", table, "--recovery", "none", "--max-candidates", args.max_candidates, "--no-progress",
             "--allow-shortfall"]
    runs = [
        ("one process", [sys.executable, "-m"], {"OMP_NUM_THREADS": str(cores)}),
        (f"{args.processes} processes", [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                                         "--num_processes", str(args.processes), "--num_cpu_threads_per_process",
                                         str(per), "--num_machines", "1", "--mixed_precision", "no",
                                         "--dynamo_backend", "no", "-m"], {}),
        (f"one process, {per} threads", [sys.executable, "-m"], {"OMP_NUM_THREADS": str(per)}),
    ]
    lines = []
    for i, (name, launcher, env) in enumerate(runs):
        out = os.path.join(work, f"out{i}")
        start = time.perf_counter()
        run([*launcher, *prune, "-o", out, "--database-dir", os.path.join(work, f"db{i}")], env)
        wall = time.perf_counter() - start
        _, report, _ = load(out)
        line = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.processor()
                or platform.machine(), "cores": cores, "model": args.model, "dtype": args.dtype, "run": name,
                "stage_seconds": report["stage_seconds"], "wall_s": round(wall, 1),
                "peak_rss_mb": max(v for v in report.get("stage_peak_rss_mb", {}).values() if v is not None),
                "measured_speedup": report["measured_speedup"], "search": {k: report["search"].get(k) for k in
                                                                           ("candidates", "evaluations",
                                                                            "unused_scores", "processes")}}
        print(json.dumps(line), flush=True)
        lines.append(line)
    (pa, _, wa), (pb, _, wb) = load(os.path.join(work, "out1")), load(os.path.join(work, "out2"))
    differ = profile_differences(pa, pb) + [k for k in wa if k not in wb or not wa[k].equal(wb[k])]
    verdict = {"same_as_one_process_same_threads": not differ, "differences": differ[:5]}
    print(json.dumps(verdict))
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            for line in [*lines, verdict]:
                f.write(json.dumps(line) + "\n")
    return 0 if not differ else 1


def run(command: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"failed: {' '.join(command)}")


if __name__ == "__main__":
    sys.exit(main())
