"""Recovery settings compared on one pruned model, judged on text of other domains (the sets of transfer.py).

A row of benchmarks/transfer.py runs a whole job, and a job's verify step can re-aim its profile on this VM's timing
noise, so two rows that differ in a recovery setting may recover two different profiles. Here the profile is fixed:

1. The default job without recovery (`recovery.method: none`) at --target, its latency table and database read from
   --cache-dir; its weights (zeros in place) are saved in --pruned (model.safetensors, report.json) the first time
   and read back by every later run, so each row recovers the same model.
2. Recovery (`spdy_hf.recovery.fit.Recovery`, what the job's recovery stage runs) with the default job's settings
   changed by --set (dotted config keys, YAML values), on the job's calibration windows.
3. Quality against the dense model on the built-in held-out split and every other-domain set (transfer.py's
   `Judge`: perplexity ratios and greedy continuations for a causal LM, embedding cosine for an encoder), after
   recovery, and with --before also before it.

One row a process, so that its recovery time and peak memory are its own:

    python benchmarks/recovery_transfer.py --model smollm2 --label default --before
    python benchmarks/recovery_transfer.py --model smollm2 --label w512e1 \
        --set recovery.num_samples=512 --set recovery.epochs=1

Rows are appended to benchmarks/out/recovery-transfer-MODEL.jsonl. Run it alone on the machine (its times).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time
from datetime import datetime, timezone

import torch
from domains import DOMAINS, MissingDomain
from safetensors.torch import load_model, save_model
from transfer import Judge, evaluation_sets, model_path, overrides

from spdy_hf import SPDYConfig, SPDYPruner
from spdy_hf.modeling.loading import load_model_and_tokenizer
from spdy_hf.modeling.snapshot import DenseSnapshot
from spdy_hf.recovery.fit import Recovery
from spdy_hf.search.scoring import score_kind
from spdy_hf.utils.io import atomic_write_json, read_json

logger = logging.getLogger("recovery_transfer")
HERE = os.path.dirname(os.path.abspath(__file__))


def pruned_state(model_name: str, target: float, cache_dir: str, folder: str) -> dict:
    """The unrecovered job's report; its weights in `folder`/model.safetensors (made by pruning the first time)."""
    weights, report_path = os.path.join(folder, "model.safetensors"), os.path.join(folder, "report.json")
    if os.path.exists(weights) and os.path.exists(report_path):
        return read_json(report_path)
    model, tokenizer = load_model_and_tokenizer(model_path(model_name))
    config = SPDYConfig.from_dict({"target_speedup": target, "cache_dir": cache_dir,
                                   "recovery": {"method": "none"}, "evaluation": {"source": "none"}})
    result = SPDYPruner(model, config, tokenizer=tokenizer).prune(progress=False)
    os.makedirs(folder, exist_ok=True)
    save_model(result.model, weights + ".tmp")
    os.replace(weights + ".tmp", weights)
    atomic_write_json(report_path, result.report)
    return result.report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="minilm, smollm2 or a local model path")
    parser.add_argument("--label", default="default", help="The row's name.")
    parser.add_argument("--target", type=float, default=1.5)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="A config setting of the recovery (dotted key, YAML value); repeatable.")
    parser.add_argument("--before", action="store_true", help="Also judge the model before recovery.")
    parser.add_argument("--cache-dir", default=os.path.join(HERE, "out", "transfer-cache"))
    parser.add_argument("--pruned", default=None,
                        help="Folder of the unrecovered model (default: benchmarks/out/pruned-MODEL-TARGETx).")
    parser.add_argument("--output", default=None,
                        help="JSON lines file (default: benchmarks/out/recovery-transfer-MODEL.jsonl).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.manual_seed(0)
    try:
        sets = evaluation_sets(list(DOMAINS))
    except MissingDomain as e:
        print(e, file=sys.stderr)
        return 2
    folder = args.pruned or os.path.join(HERE, "out", f"pruned-{args.model}-{args.target:g}x")
    job = pruned_state(args.model, args.target, args.cache_dir, folder)

    settings = overrides(args.set)
    config = SPDYConfig.from_dict({**settings, "target_speedup": args.target, "cache_dir": args.cache_dir})
    model, tokenizer = load_model_and_tokenizer(model_path(args.model))
    judge = Judge(model, tokenizer, sets)
    windows = SPDYPruner(model, config, tokenizer=tokenizer).calibration_windows(None)
    snapshot = DenseSnapshot(model)
    try:
        load_model(model, os.path.join(folder, "model.safetensors"))
        before = judge.compare(model)["quality"] if args.before else None
        kind = score_kind(model, config.search.score)  # the job's score, as its recovery stage gets it
        start = time.perf_counter()
        entry = Recovery(config, model, snapshot, windows, kind, progress=False).run()
        seconds = time.perf_counter() - start
    finally:
        snapshot.close()
    scored = judge.compare(model)
    row = {"model": args.model, "label": args.label, "settings": settings, "target": args.target,
           "measured_speedup": job.get("measured_speedup"), "before": before, **scored,
           "recovery_s": round(seconds, 1),
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
           "recovery": {k: v for k, v in entry.items() if k != "blocks"},
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": "python " + " ".join(sys.argv)}
    out = args.output or os.path.join(HERE, "out", f"recovery-transfer-{args.model}.jsonl")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=str) + "\n")
    worst = max if scored["metric"] == "perplexity_ratio" else min
    others = {k: v for k, v in scored["quality"].items() if k != "docstrings"}
    print(f"{args.label}: recovery {seconds:.0f}s, worst other {worst(others.values()):.4f}, "
          + " ".join(f"{k}={v:.4f}" for k, v in scored["quality"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
