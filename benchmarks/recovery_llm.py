"""Few-sample recovery on a real decoder LLM (SmolLM2-135M-Instruct): held-out perplexity against recovery tokens.

1. The job: `SPDYPruner` with the library's defaults (structured, prefill batch 1 x 128, recovery off) and the given
   target, its latency table and database cached in --cache-dir; its model is the unrecovered one, its measured
   speedup the speed of every row (recovery holds every profile zero, so the deployed form's time is that one).
2. Recovery (`spdy_hf.recovery.fit.Recovery`, what the pipeline's recovery stage runs) on a fresh copy of that model for
   each setting: N calibration windows of 128 tokens of the built-in corpus's calibration split (N = 128: the job's
   own windows; another N: a draw of N windows from the same split with the same seed), the method, and optionally
   the learning rate, output weight and epochs.
3. Held-out perplexity, dense and pruned, on two sets the job never saw: the built-in corpus's held-out split
   (docstrings of other standard-library files: the calibration domain) and another domain, the prose of the Python
   language reference (`pydoc_data.topics`); plus a greedy continuation of fixed prompts, to read.

    python benchmarks/recovery_llm.py --windows 128 --methods none,gap --pruned benchmarks/out/smollm2-1.5x
    python benchmarks/recovery_llm.py --windows 256,512 --methods gap,gap@1e-4 --pruned benchmarks/out/smollm2-1.5x

With --pruned DIR, the job's output is saved there the first time and read back (its report's measured speedup
with it) on later runs, so that a sweep of recovery settings does not repeat the search.
"""

import argparse
import copy
import logging
import os
import resource
import sys
import time
from datetime import datetime, timezone

import torch
from heldout import prose_texts, smollm2_path

from spdy_hf import SPDYConfig, SPDYPruner
from spdy_hf.calibration.text import load_texts, token_windows
from spdy_hf.latency.environment import environment_info
from spdy_hf.modeling.loading import load_model_and_tokenizer
from spdy_hf.modeling.snapshot import DenseSnapshot
from spdy_hf.pipeline.quality import heldout_windows, perplexity
from spdy_hf.recovery.fit import Recovery
from spdy_hf.utils.io import atomic_write_json, read_json

PROMPTS = ["The capital of France is", "To sort a list in Python, you can"]

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--target", type=float, default=1.5)
parser.add_argument("--windows", default="128", help="Comma-separated numbers of recovery windows (128 tokens).")
parser.add_argument("--methods", default="none,gap",
                    help="Comma-separated METHOD[@LEARNING_RATE[@OUTPUT_WEIGHT[@EPOCHS[@PRECISION]]]]; an empty "
                         "field is the config's default ('none' is run once).")
parser.add_argument("--cache-dir", default="benchmarks/out/cache-llm", help="Latency tables and databases.")
parser.add_argument("--pruned", default=None, help="Save the unrecovered job's output here, or read it if there.")
parser.add_argument("--output", default="benchmarks/out/recovery_llm.json", help="JSON results path.")
args = parser.parse_args()
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")


@torch.inference_mode()
def continuations(model, tokenizer, new_tokens: int = 16) -> list[str]:
    out = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")
        gen = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        out.append(tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def quality(model, tokenizer, sets) -> dict:
    model.eval()
    return {**{k: perplexity(model, w) for k, w in sets.items()}, "continuations": continuations(model, tokenizer)}


def parse_method(spec: str):
    name, lr, weight, epochs, precision = (*spec.split("@"), None, None, None, None)[:5]
    settings = {"method": name, **({"learning_rate": float(lr)} if lr else {}),
                **({"output_weight": float(weight)} if weight else {}), **({"epochs": int(epochs)} if epochs else {}),
                **({"precision": precision} if precision else {})}
    return spec, settings


path = smollm2_path()
dense, tokenizer = load_model_and_tokenizer(path)
config = SPDYConfig(target_speedup=args.target, cache_dir=args.cache_dir)
sets = {"heldout_docstrings": heldout_windows(tokenizer, "builtin", config.evaluation.num_samples,
                                              config.evaluation.sequence_length),
        "reference_prose": token_windows(tokenizer, prose_texts(n=4096), config.evaluation.num_samples,
                                         config.evaluation.sequence_length)}
rows = [{"method": "dense", **quality(dense, tokenizer, sets)}]
print(f"dense: {rows[0]}", flush=True)
snapshot = DenseSnapshot(dense)
del dense

start = time.perf_counter()
if args.pruned and os.path.isfile(os.path.join(args.pruned, "spdy_report.json")):
    pruned, _ = load_model_and_tokenizer(args.pruned)
    report = read_json(os.path.join(args.pruned, "spdy_report.json"))
else:
    pruned, _ = load_model_and_tokenizer(path)
    result = SPDYPruner(pruned, config, tokenizer).prune(progress=False)
    pruned, report = result.model, result.report
    if args.pruned:
        result.save_pretrained(args.pruned)
job_seconds = time.perf_counter() - start
measured = report["measured_speedup"]
cal = config.calibration
calibration_texts = load_texts(cal.source)
for n in [int(x) for x in args.windows.split(",")]:
    windows = token_windows(tokenizer, calibration_texts, n, cal.sequence_length or 128, cal.seed)
    for spec, settings in map(parse_method, args.methods.split(",")):
        if settings["method"] == "none" and any(r["method"] == "none" for r in rows):
            continue
        model = copy.deepcopy(pruned)
        entry = {"method": "none"}
        if settings["method"] != "none":
            rc = SPDYConfig.from_dict({**config.to_dict(), "recovery": settings})
            entry = Recovery(rc, model, snapshot, windows, "kl", progress=False).run()
        row = {"method": spec, "windows": n if settings["method"] != "none" else 0,
               "tokens": n * windows["input_ids"].shape[1] if settings["method"] != "none" else 0,
               "measured_speedup": measured, **quality(model, tokenizer, sets),
               **{k: entry.get(k) for k in ("seconds", "learning_rate", "output_weight", "epochs", "epochs_run", "precision",
                                            "best_epoch", "heldback_score", "reverted")}}
        rows.append(row)
        print(f"{spec:16s} windows {row['windows']:4d}  docstrings ppl {row['heldout_docstrings']:.2f}  prose ppl "
              f"{row['reference_prose']:.2f}  {row['seconds'] or 0:.0f} s  {row['continuations']}", flush=True)
        del model
snapshot.close()
atomic_write_json(args.output, {
    "benchmark": "recovery_llm", "date": datetime.now(timezone.utc).isoformat(), "command": sys.argv,
    "target": args.target, "job_seconds": round(job_seconds, 1), "report": {
        k: report.get(k) for k in ("measured_speedup", "predicted_speedup", "stage_seconds", "heldout")},
    "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    "environment": environment_info(), "rows": rows})
print(f"wrote {args.output}")
