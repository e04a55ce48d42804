"""What recovery adds to a job's peak memory: the same job run twice, cold, without recovery and with the default.

    python benchmarks/recovery_job_memory.py --model smollm2            # SmolLM2-135M at 1.5x, float32
    python benchmarks/recovery_job_memory.py --model minilm --target-speedup 1.5

Each run is `spdy-hf prune MODEL --target-speedup T -o OUT` in a process of its own with an empty cache (the latency
table, the database and the search start cold), first with `--recovery none`, then with the default recovery
(`auto`); arguments the script does not know go to both. The peak is the process's (`ru_maxrss`, per stage in
the report). Printed: each run's stages, seconds and peak, and the difference of the peaks, in GB and against the
model's float32 size. Run it alone on the machine: the profile's timings decide the profile both runs prune to.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from datetime import datetime, timezone

from several_targets import run_job
from transfer import model_path

HERE = os.path.dirname(os.path.abspath(__file__))


def float32_bytes(path: str) -> int:
    from spdy_hf.modeling.loading import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(path)
    return sum(p.numel() for p in model.parameters()) * 4


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2, minilm, or a model directory or .gguf file")
    parser.add_argument("--target-speedup", default="1.5")
    parser.add_argument("--output", default=os.path.join(HERE, "out", "recovery_job_memory.jsonl"))
    args, extra = parser.parse_known_args()
    path = model_path(args.model)
    model_bytes = float32_bytes(path)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="spdy-recovery-memory-") as work:
        for label, recovery in (("without recovery", ["--recovery", "none"]), ("default recovery", [])):
            out = os.path.join(work, label.replace(" ", "-"))
            wall = run_job(path, args.target_speedup, out, [*recovery, *extra])
            with open(os.path.join(out, "spdy_report.json"), encoding="utf-8") as f:
                report = json.load(f)
            peaks = report.get("stage_peak_rss_mb", {})
            runs[label] = {"measured_speedup": report.get("measured_speedup"),
                           "recovery": (report.get("recovery") or {}).get("method", "none"),
                           "stage_seconds": report.get("stage_seconds", {}), "stage_peak_rss_mb": peaks,
                           "peak_gb": max(v for v in peaks.values() if v) * 2**20 / 1e9, "job_seconds": round(wall, 1)}
            print(label, json.dumps(runs[label]), flush=True)
    added = runs["default recovery"]["peak_gb"] - runs["without recovery"]["peak_gb"]
    result = {"model": args.model, "target": args.target_speedup, "extra": extra, "runs": runs,
              "model_float32_gb": round(model_bytes / 1e9, 3), "added_gb": round(added, 3),
              "added_over_model_float32": round(added / (model_bytes / 1e9), 2),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    print(f"recovery adds {added:.2f} GB to the job's peak: {result['added_over_model_float32']:.2f}x the model's "
          f"float32 size ({model_bytes / 1e9:.2f} GB)")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "a", encoding="utf-8") as f:
        f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
