"""Few-sample recovery on MiniLM: none vs gAP vs layer-wise on the same pruned models.

1. For each case (family, target speedup), SPDYPruner runs once with `recovery.method: none` (the default job
   otherwise, its latency table and database cached in --cache-dir); its model is the unrecovered one, its
   measured speedup the case's speed (recovery keeps every profile zero, so the deployed form's time is that one).
2. Each recovery method then runs on its own copy of that pruned model (`spdy_hf.recovery.fit.Recovery`, the same
   class the pipeline's recovery stage runs) against the dense weights, on the pruner's calibration windows.
3. Every model is scored against the dense model, on text the job never saw: the mean cosine of sentence
   embeddings (mean pooling + L2, all-MiniLM-L6-v2's pooling) on (a) held-out standard-library docstrings (files
   disjoint from the calibration files) and (b) another domain: the prose of the Python language reference that
   ships with every Python (`pydoc_data.topics`), paragraphs of at least 200 characters. Plus the search's
   calibration score (1 - cosine on the scoring windows).

The case `2:4` is the paper's 2:4 setting: every layer at the 2:4 pattern, OBS weights from the same calibration
windows (`levels: "2:4"`), no search and no latency table (the CPU has no 2:4 kernel: its speed is a GPU's, see
docs/benchmarks/gpu.md), scored on the CPU like the others (`--cases 2:4`, or `--cases structured@1.5,2:4`).

    python benchmarks/recovery.py --quick          # smoke run: one case, 2 epochs
    python benchmarks/recovery.py                  # the real one, on an otherwise idle machine
"""

import argparse
import copy
import logging
import sys
import time
from datetime import datetime, timezone
from types import SimpleNamespace

import torch
from heldout import heldout_texts, mean_cosine, prose_texts, sentence_embeddings

from spdy_hf import SPDYConfig, SPDYPruner
from spdy_hf.families.unstructured import build_database
from spdy_hf.modeling.levels import get_levels, get_patterns
from spdy_hf.modeling.loading import load_model_and_tokenizer
from spdy_hf.modeling.snapshot import DenseSnapshot
from spdy_hf.modeling.units import find_units
from spdy_hf.recovery.fit import Recovery
from spdy_hf.utils.io import atomic_write_json

CASES = [("structured", 1.5), ("structured", 2.0), ("unstructured", 1.5)]

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--quick", action="store_true", help="One case (structured 1.5x), 2 epochs: a smoke run.")
parser.add_argument("--epochs", type=int, default=None, help="recovery.epochs (default: the config's).")
parser.add_argument("--methods", default="none,gap,layerwise",
                    help="Comma-separated recovery methods, each optionally METHOD@LEARNING_RATE[@OUTPUT_WEIGHT"
                         "[@EPOCHS[@PRECISION]]] (gap@1e-4, gap@1e-5@1, gap@@@16, gap@@@@float32); an empty field is "
                         "the config's default.")
parser.add_argument("--cases", default=None, help="Comma-separated FAMILY@TARGET (default: all three), or 2:4 (every "
                    "layer 2:4 with OBS, no search; no target).")
parser.add_argument("--num-samples", type=int, default=None,
                    help="calibration.num_samples of the job (its database, search and recovery windows; default: "
                         "the config's, 128).")
parser.add_argument("--cache-dir", default="benchmarks/out/cache", help="Latency tables and databases.")
parser.add_argument("--output", default="benchmarks/out/recovery.json", help="JSON results path.")
args = parser.parse_args()
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")


dense, tokenizer = load_model_and_tokenizer()
dense.eval()
texts = {"heldout_docstrings": heldout_texts(), "reference_prose": prose_texts()}
reference = {k: sentence_embeddings(dense, tokenizer, t) for k, t in texts.items()}
snapshot = DenseSnapshot(dense)
cases = CASES[:1] if args.quick else CASES
if args.cases:
    cases = [(c, None) if c == "2:4" else (c.split("@")[0], float(c.split("@")[1])) for c in args.cases.split(",")]
epochs = 2 if args.quick and args.epochs is None else args.epochs
methods = [(*m.split("@"), None, None, None, None)[:5] for m in args.methods.split(",")]
methods = [(m, float(lr) if lr else None, float(w) if w else None, int(e) if e else epochs, p or None)
           for m, lr, w, e, p in methods]
rows = []


def uniform_two_four(config: SPDYConfig, model, windows) -> None:
    """Every searchable layer of `model` at the 2:4 pattern, its weights from the OBS database (in place)."""
    units = find_units(model, config.skip_modules, example_inputs={k: v[:1] for k, v in windows.items()})
    database, _ = build_database(config, model, units, get_levels("2:4"), windows, anchor=1, progress=False,
                                 patterns=get_patterns("2:4"))
    database.stitch([1] * len(units))


for family, target in cases:
    two_four = family == "2:4"
    config = SPDYConfig.from_dict({"cache_dir": args.cache_dir, **(
        {"family": "unstructured", "levels": "2:4"} if two_four else {"family": family, "target_speedup": target}),
                                   **({"calibration": {"num_samples": args.num_samples}} if args.num_samples else {})})
    model = copy.deepcopy(dense)
    pruner = SPDYPruner(model, config, tokenizer)
    windows = pruner.calibration_windows()
    start = time.perf_counter()
    if two_four:
        uniform_two_four(config, model, windows)
        result = SimpleNamespace(model=model, report={"measured_speedup": None})
    else:
        result = pruner.prune(progress=False)
    job_seconds = time.perf_counter() - start
    scorer_windows = {k: v[: config.search.eval_samples] for k, v in windows.items()}
    for method, lr, weight, n_epochs, precision in methods:
        recovered = copy.deepcopy(result.model).eval()
        entry = {"method": "none"}
        if method != "none":
            settings = {"method": method, **({} if n_epochs is None else {"epochs": n_epochs}),
                        **({} if lr is None else {"learning_rate": lr}),
                        **({} if weight is None else {"output_weight": weight}),
                        **({} if precision is None else {"precision": precision})}
            rc = SPDYConfig.from_dict({**config.to_dict(), "recovery": settings})
            entry = Recovery(rc, recovered, snapshot, windows, "cosine", progress=False).run()
        with torch.inference_mode():
            out = recovered(**scorer_windows).last_hidden_state
            ref = dense(**scorer_windows).last_hidden_state
        mask = scorer_windows["attention_mask"].bool()
        calib = float(1 - torch.nn.functional.cosine_similarity(out[mask], ref[mask], dim=-1).mean())
        row = {"family": family, "target": target, "measured_speedup": result.report["measured_speedup"],
               "calibration_windows": config.calibration.num_samples,
               "method": method, "output_weight": entry.get("output_weight"), "seconds": entry.get("seconds", 0.0), "best_epoch": entry.get("best_epoch"),
               "epochs": entry.get("epochs"), "epochs_run": entry.get("epochs_run"), "learning_rate": entry.get("learning_rate"),
               "precision": entry.get("precision"),
               "heldback_before": entry.get("heldback_before"), "heldback_after": entry.get("heldback_after"),
               "heldback_score": entry.get("heldback_score"), "reverted": entry.get("reverted"),
               "calibration_distance": calib, "job_seconds": round(job_seconds, 1),
               **{k: mean_cosine(sentence_embeddings(recovered, tokenizer, t), reference[k]) for k, t in texts.items()}}
        rows.append(row)
        speed = "no CPU kernel" if two_four else f"measured {row['measured_speedup']:.3f}x"
        case = family if two_four else f"{family} {target:.1f}x"
        print(f"{case:16s} ({speed}) {method:9s} lr {lr} w {weight} epochs {n_epochs} {entry.get('precision', '')} "
              f"docstrings {row['heldout_docstrings']:.4f}  prose {row['reference_prose']:.4f}  "
              f"calibration 1-cos {calib:.5f}  {row['seconds']:.0f} s{'  (reverted)' if row['reverted'] else ''}", flush=True)
snapshot.close()

atomic_write_json(args.output, {
    "benchmark": "recovery", "date": datetime.now(timezone.utc).isoformat(), "command": sys.argv,
    "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows})
print(f"wrote {args.output}")
