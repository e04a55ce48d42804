"""What bfloat16 alone buys on this CPU, before any pruning: the dense model in float32 and in bfloat16, timed side by
side in the default regime (prefill, batch 1 x 128, the last position's logits for a causal LM), and the bfloat16
model's quality against the float32 one on the held-out sets of benchmarks/transfer.py (the docstring split and
every other-domain set).

    python benchmarks/bfloat16.py --model smollm2
    python benchmarks/bfloat16.py --model minilm

A bfloat16 pruning job (`--dtype bfloat16`) measures its speedup against the dense bfloat16 model; this is the
factor between the two baselines. The pruned job itself is a row of benchmarks/transfer.py
(`--set regime.dtype=bfloat16`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
from datetime import datetime, timezone

import torch
from domains import DOMAINS, MissingDomain
from transfer import Judge, evaluation_sets, model_path

from spdy_hf.config import RegimeConfig
from spdy_hf.latency.regime import end_to_end_call
from spdy_hf.latency.timing import interleaved_median_ms, spin_up
from spdy_hf.modeling.loading import cast_weights, load_model_and_tokenizer
from spdy_hf.recovery.fit import cpu_has_bf16_matmul

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="minilm, smollm2 or a local model path")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--domains", default=",".join(DOMAINS))
    parser.add_argument("--output", default=os.path.join(HERE, "out", "bfloat16.jsonl"))
    args = parser.parse_args()
    torch.manual_seed(0)

    try:
        sets = evaluation_sets([d for d in args.domains.split(",") if d])
    except MissingDomain as e:
        print(e, file=sys.stderr)
        return 2
    dense, tokenizer = load_model_and_tokenizer(model_path(args.model))
    low = cast_weights(copy.deepcopy(dense), torch.bfloat16)
    regime = RegimeConfig()
    calls = [end_to_end_call(m, regime, 1)[0] for m in (dense, low)]
    with torch.inference_mode():
        spin_up(calls[0], 2.0)
        fp32_ms, bf16_ms = interleaved_median_ms(calls, warmup=3, repeats=args.repeats)
    judge = Judge(dense, tokenizer, sets)
    scored = judge.compare(low)
    row = {
        "model": args.model, "regime": regime.to_dict(), "float32_ms": round(fp32_ms, 2),
        "bfloat16_ms": round(bf16_ms, 2), "speedup": round(fp32_ms / bf16_ms, 3),
        "bf16_matmul": cpu_has_bf16_matmul(), "metric": scored["metric"], "quality": scored["quality"],
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
    }
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    q = " ".join(f"{k}={v:.4f}" for k, v in scored["quality"].items())
    print(f"{args.model}: float32 {fp32_ms:.2f} ms, bfloat16 {bf16_ms:.2f} ms ({row['speedup']:.3f}x); "
          f"bfloat16 against float32 ({row['metric']}): {q}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
