"""What structured removal costs in accuracy on MiniLM: heads and neurons chosen by structured OBS (with
compensation) vs by column norm (without), uniform shares per block.

One sequential calibration pass (128 windows x 128 tokens of the built-in corpus, dense propagation) gives each
block's output-projection and down-projection Hessians; `structured_obs_levels` chooses the groups to keep at
every share and compensates the consumer. Each combination of kept heads / kept FFN neurons is then applied
(zero-filled, which equals the shrunk model) and scored by the mean cosine of held-out sentence embeddings
(standard-library files disjoint from the calibration files) to the dense model. Speed of the same shares:
benchmarks/structured_speed.py.

    python benchmarks/structured_quality.py
"""

import copy
import sys
from datetime import datetime, timezone

import torch
from heldout import heldout_texts, sentence_embeddings

from spdy_hf.calibration.sequential import SequentialCalibrator
from spdy_hf.calibration.text import load_texts, token_windows
from spdy_hf.database.structured_obs import group_magnitude_levels, structured_obs_levels
from spdy_hf.modeling.groups import find_structured_groups, zero_fill
from spdy_hf.modeling.loading import load_model_and_tokenizer
from spdy_hf.modeling.units import Unit

SHARES = [0.75, 0.5, 0.25]
COMBOS = [(0.75, 0.75), (0.5, 0.5), (0.75, 0.25), (0.5, 0.25), (0.25, 0.25)]

dense, tokenizer = load_model_and_tokenizer()
windows = token_windows(tokenizer, load_texts("builtin"), 128, 128, seed=0)
groups = find_structured_groups(dense)
modules = dict(dense.named_modules())
consumers = [Unit(name=g.consumer, module=modules[g.consumer], block=g.block) for g in groups]
by_consumer = {g.consumer: g for g in groups}
levels = {}  # (consumer, method, share) -> (kept, weight)


def process(block, units, stats):
    for unit in units:
        group, s = by_consumer[unit.name], stats[unit.name]
        counts = [max(1, round(share * group.num_groups)) for share in SHARES]
        solved = {"obs": structured_obs_levels(s.weight, s.hessian, group.group_size, counts),
                  "norm": group_magnitude_levels(s.weight, group.group_size, counts)}
        for method, results in solved.items():
            for share, level in zip(SHARES, results):
                levels[(unit.name, method, share)] = level
    return None  # dense propagation: every share is calibrated on dense inputs


batches = [{k: v[i:i + 8] for k, v in windows.items()} for i in range(0, 128, 8)]
SequentialCalibrator(dense, consumers, batches, progress=False).run(lambda block: True, process)

heldout = heldout_texts()


def embeddings(m):
    return sentence_embeddings(m, tokenizer, heldout)


reference = embeddings(dense)
print(f"{datetime.now(timezone.utc).isoformat()} {' '.join(sys.argv)}")
print("| kept heads | kept FFN neurons | held-out cosine, structured OBS | held-out cosine, column norm |")
print("|---|---|---|---|")
for attention_share, ffn_share in COMBOS:
    row = []
    for method in ("obs", "norm"):
        model = copy.deepcopy(dense)
        for group in find_structured_groups(model):
            share = attention_share if group.kind == "attention" else ffn_share
            kept, weight = levels[(group.consumer, method, share)]
            zero_fill(model, group, kept)
            with torch.no_grad():
                model.get_submodule(group.consumer).weight.copy_(weight)
        row.append(float((embeddings(model) * reference).sum(-1).mean()))
    print(f"| {attention_share:.0%} | {ffn_share:.0%} | {row[0]:.4f} | {row[1]:.4f} |", flush=True)
