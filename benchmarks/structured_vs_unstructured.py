"""Structured-only vs unstructured-only vs mixed SPDY, each with the OBS database, on MiniLM.

For each target speedup and each `family`, SPDYPruner prunes a fresh copy of all-MiniLM-L6-v2 with the default
config otherwise (cpu backend, batch 1 x 128 tokens, the built-in calibration corpus, method obs) and measures
its own speedup in its verify step (the deployed form against the dense model, interleaved). Quality is the
held-out embedding cosine to the dense model (benchmarks/heldout.py: standard-library docstrings from files
disjoint from the calibration files, mean pooling + L2 as the model card says). Each run's report is written
to --output as JSON.

    python benchmarks/structured_vs_unstructured.py                    # both targets, all three families
    python benchmarks/structured_vs_unstructured.py --targets 1.5 --families structured --quick   # smoke run
"""

import argparse
import logging
import sys
from datetime import datetime, timezone

import torch
from heldout import heldout_texts, mean_cosine, sentence_embeddings

from spdy_hf import SPDYConfig, SPDYPruner
from spdy_hf.errors import UnreachableTargetError
from spdy_hf.latency.environment import environment_info
from spdy_hf.modeling.loading import load_model_and_tokenizer
from spdy_hf.utils.io import atomic_write_json

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--targets", type=float, nargs="+", default=[1.5, 2.0])
parser.add_argument("--families", nargs="+", default=["structured", "unstructured", "mixed"])
parser.add_argument("--quick", action="store_true", help="Tiny search and calibration (smoke run).")
parser.add_argument("--seed", type=int, default=0, help="Seed of the SPDY search (search.seed).")
parser.add_argument("--output", default="structured_vs_unstructured.json")
args = parser.parse_args()
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
torch.manual_seed(0)

texts = heldout_texts()
dense, tokenizer = load_model_and_tokenizer()
reference = sentence_embeddings(dense, tokenizer, texts)
del dense
print(f"{datetime.now(timezone.utc).isoformat()} {' '.join(sys.argv)}", flush=True)
print("| target | family | predicted | measured speedup | calibration 1-cos | held-out cosine | kept heads per block "
      "| kept FFN neurons per block | groups sparse / structured+sparse | search s |", flush=True)
print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
rows = []
for target in args.targets:
    for family in args.families:
        overrides = {"target_speedup": target, "family": family, "search": {"seed": args.seed}}
        if args.quick:
            overrides.update(search={"num_random_inits": 5, "patience": 3, "seed": args.seed},
                             calibration={"num_samples": 32})
        config = SPDYConfig.from_dict(overrides)
        model, tokenizer = load_model_and_tokenizer()
        try:
            result = SPDYPruner(model, config, tokenizer=tokenizer).prune(progress=False)
        except UnreachableTargetError as e:
            print(f"| {target} | {family} | unreachable (best {e.max_reachable_speedup:.2f}x) | | | | | | | |",
                  flush=True)
            rows.append({"target": target, "family": family, "unreachable": e.max_reachable_speedup})
            continue
        report = result.report
        cosine = mean_cosine(sentence_embeddings(model, tokenizer, texts), reference)
        heads = list(report.get("kept_heads", {}).values())
        neurons = list(report.get("kept_ffn_neurons", {}).values())
        families = report.get("families", {})
        sparse = f"{families.get('unstructured', '-')} / {families.get('structured+sparse', '-')}"
        print(f"| {target} | {family} | {report['predicted_speedup']:.3f}x | {report['measured_speedup']:.3f}x | "
              f"{report['score_dense_vs_pruned']:.4f} | {cosine:.4f} | {heads or '-'} | {neurons or '-'} | "
              f"{sparse} | {report['stage_seconds'].get('search', 0):.0f} |", flush=True)
        rows.append({"target": target, "family": family, "heldout_cosine": cosine, "report": report})
        atomic_write_json(args.output, {"command": " ".join(sys.argv), "environment": environment_info(),
                                        "rows": rows})
