"""GPU check of the cuda backend (dense vs 2:4): one script, one GPU, under 8 minutes on an H200.

For a BERT-base-shaped encoder and a Llama-shaped ~1 B decoder, both built from config with random weights
(nothing is downloaded), in bf16, at two regimes (1 x 128 and 16 x 512 tokens):

1. profiles every distinct unit shape dense vs 2:4 (`spdy_hf.latency.cuda`) and prints the 2:4/dense time
   ratio per shape (below 1: 2:4 pays);
2. runs SPDY (magnitude 2:4 database, a short search) at the largest reachable target up to 1.3x and verifies
   the speedup end to end with CUDA events;
3. runs the mixed family (per block: heads / FFN neurons removed, or 2:4 on its layers; structured levels timed
   in the whole model with CUDA events) at --mixed-target, verified the same way.

    python benchmarks/gpu_check.py --output benchmarks/out/gpu_check.json

Random weights make the accuracy numbers meaningless; this checks kernels, tables, the search and the
end-to-end speedup, not quality.
"""

import argparse
import json
import logging
import sys
import time
from datetime import datetime, timezone

import torch

MODELS = {
    "bert-base": lambda: __import__("transformers").BertModel(__import__("transformers").BertConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        vocab_size=30522, max_position_embeddings=512)),
    "llama-1b": lambda: __import__("transformers").LlamaForCausalLM(__import__("transformers").LlamaConfig(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048)),
}
REGIMES = [(1, 128), (16, 512)]

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
parser.add_argument("--max-target", type=float, default=1.3, help="SPDY runs at min(this, max reachable - 2%%).")
parser.add_argument("--mixed-target", type=float, default=1.5, help="Target of the mixed-family run.")
parser.add_argument("--output", default="benchmarks/out/gpu_check.json")
args = parser.parse_args()
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
log = logging.getLogger("gpu_check")

if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device here; run it on the GPU machine.")

from spdy_hf import SPDYConfig, SPDYPruner, UnreachableTargetError, find_units  # noqa: E402
from spdy_hf.latency.cuda import cuda_environment, ratios  # noqa: E402
from spdy_hf.latency.environment import environment_info  # noqa: E402
from spdy_hf.search import compute_budget  # noqa: E402
from spdy_hf.utils.io import atomic_write_json  # noqa: E402

started = time.perf_counter()
results = {"benchmark": "gpu_check", "date": datetime.now(timezone.utc).isoformat(), "command": sys.argv,
           "machine": environment_info(), "gpu": cuda_environment(), "runs": []}
lines = []
for name in args.models:
    for batch, seq in REGIMES:
        torch.manual_seed(0)
        model = MODELS[name]().eval()
        vocab = model.config.vocab_size
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (32, 128), generator=gen)
        windows = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        base = dict(backend="cuda", method="magnitude", family="unstructured", regime={"batch_size": batch, "sequence_length": seq,
                                                                "dtype": args.dtype},
                    calibration={"num_samples": 32, "sequence_length": 128},
                    search={"num_random_inits": 20, "patience": 10, "eval_samples": 16, "eval_batch_size": 8},
                    timing={"warmup": 5, "repeats": 20, "model_repeats": 20, "verify_repeats": 30},
                    cache_dir="benchmarks/out/gpu_cache")
        run = {"model": name, "regime": [batch, seq], "params": sum(p.numel() for p in model.parameters())}
        t0 = time.perf_counter()
        # 1. the table, and the largest speedup it allows
        config = SPDYConfig.from_dict({**base, "target_speedup": args.max_target})
        table = SPDYPruner(model, config).profile(progress=False)
        units = find_units(model, config.skip_modules)
        times = table.times_for(table.keys_for(units))
        reachable = compute_budget(times, table.base_time_ms, args.max_target,
                                   reference_ms=table.reference_time_ms).max_reachable_speedup
        run["shape_ratios_2to4_over_dense"] = ratios(table)
        run["ineligible"] = table.ineligible
        run["dense_model_ms"] = table.base_time_ms
        run["max_reachable_speedup"] = reachable
        # 2. SPDY at the largest reachable target up to --max-target, verified end to end
        target = min(args.max_target, 0.98 * reachable)
        run["target_speedup"] = target
        if target > 1.0:
            torch.manual_seed(0)
            model = MODELS[name]().eval()
            config = SPDYConfig.from_dict({**base, "target_speedup": target})
            try:
                result = SPDYPruner(model, config).prune(calibration=windows, latency_table=table, progress=False)
                report = result.report
                run.update({k: report[k] for k in ("predicted_speedup", "measured_speedup", "dense_time_ms",
                                                   "pruned_time_ms", "overall_sparsity")})
                run["units_2to4"] = sum(1 for p in result.profile if p["pattern"] == "2:4")
                run["units"] = len(result.profile)
            except UnreachableTargetError as e:
                run["error"] = str(e)
        # 3. the mixed family: structured levels or 2:4 per block
        torch.manual_seed(0)
        model = MODELS[name]().eval()
        config = SPDYConfig.from_dict({**base, "family": "mixed", "target_speedup": args.mixed_target})
        try:
            result = SPDYPruner(model, config).prune(calibration=windows, latency_table=table, progress=False)
            report = result.report
            run["mixed"] = {k: report[k] for k in ("predicted_speedup", "measured_speedup", "families",
                                                   "kept_heads", "kept_ffn_neurons")}
        except UnreachableTargetError as e:
            run["mixed"] = {"error": str(e)}
        run["seconds"] = time.perf_counter() - t0
        results["runs"].append(run)
        del model
        torch.cuda.empty_cache()
        lines.append(f"| {name} | {batch}x{seq} | {run['dense_model_ms']:.3f} | "
                     + ", ".join(f"{k.split(':')[0]} {v:.2f}" if v is not None else f"{k.split(':')[0]} n/a"
                                 for k, v in run["shape_ratios_2to4_over_dense"].items())
                     + f" | {reachable:.3f}x | {target:.3f}x | "
                     + (f"{run['predicted_speedup']:.3f}x | {run['measured_speedup']:.3f}x |"
                        if "measured_speedup" in run and run["measured_speedup"] else "- | - |")
                     + (f" {run['mixed']['measured_speedup']:.3f}x |" if run["mixed"].get("measured_speedup")
                        else " - |"))
        log.info("%s at %dx%d done in %.1f s: %s", name, batch, seq, run["seconds"], json.dumps(
            {k: run.get(k) for k in ("max_reachable_speedup", "predicted_speedup", "measured_speedup")}))

results["seconds"] = time.perf_counter() - started
print(f"GPU: {results['gpu'].get('gpu')}, torch {torch.__version__}, cuSPARSELt {results['gpu'].get('cusparselt')}, "
      f"{args.dtype}, {results['seconds']:.0f} s in all")
print("| model | regime | dense ms | 2:4/dense time per shape (out x in) | max reachable | target | predicted | "
      f"measured | mixed family at {args.mixed_target}x, measured |")
print("|---|---|---|---|---|---|---|---|---|")
print("\n".join(lines))
atomic_write_json(args.output, results)
log.info("Results written to %s.", args.output)
