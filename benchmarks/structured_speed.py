"""How much faster MiniLM gets with whole heads and FFN neurons removed (shrunk dense modules), on this CPU.

Every block keeps the same share of its attention heads and FFN neurons (the first ones: timing does not depend
on which); the shrunk model is timed interleaved with the dense one (median of 50 pairs), at batch 1 x 128
tokens, fp32. Quality is not measured here (benchmarks/structured_quality.py measures it).

    python benchmarks/structured_speed.py
"""

import argparse
import copy
import sys
from datetime import datetime, timezone

import torch

from spdy_hf.latency.environment import environment_info
from spdy_hf.latency.timing import interleaved_median_ms
from spdy_hf.modeling.groups import find_structured_groups, shrink
from spdy_hf.modeling.loading import load_model_and_tokenizer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--keep", type=float, nargs="+", default=[0.75, 0.5, 0.25], help="Shares of groups kept.")
parser.add_argument("--batch-size", type=int, default=1)
parser.add_argument("--sequence-length", type=int, default=128)
parser.add_argument("--repeats", type=int, default=50)
args = parser.parse_args()

dense, _ = load_model_and_tokenizer()
gen = torch.Generator().manual_seed(0)
ids = torch.randint(0, dense.config.vocab_size, (args.batch_size, args.sequence_length), generator=gen)
inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
print(f"{datetime.now(timezone.utc).isoformat()} {' '.join(sys.argv)}")
print(f"{environment_info()['processor']}, torch {torch.__version__}, {torch.get_num_threads()} threads")
print("| kept heads | kept FFN neurons | dense ms | shrunk ms | speedup |")
print("|---|---|---|---|---|")
for attention_keep in args.keep + [1.0]:
    for ffn_keep in args.keep + [1.0]:
        if attention_keep == ffn_keep == 1.0:
            continue
        model = copy.deepcopy(dense)
        for group in find_structured_groups(model):
            share = attention_keep if group.kind == "attention" else ffn_keep
            shrink(model, group, list(range(max(1, round(share * group.num_groups)))))
        with torch.inference_mode():
            dense_ms, shrunk_ms = interleaved_median_ms([lambda: dense(**inputs), lambda m=model: m(**inputs)], 5,
                                                        args.repeats)
        print(f"| {attention_keep:.0%} | {ffn_keep:.0%} | {dense_ms:.2f} | {shrunk_ms:.2f} | {dense_ms / shrunk_ms:.2f}x |",
              flush=True)
