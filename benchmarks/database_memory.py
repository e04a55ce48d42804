"""Resident memory of building the per-layer OBS pruning database (the unstructured family's) on a small random BERT.

Prints the process's anonymous resident memory before and after `build_obs_database` (42 SPDY levels, 4 blocks of
384 hidden units, 24 linear layers, 32 windows of 64 tokens) and its peak. Run it against another checkout of
spdy_hf with `PYTHONPATH=CHECKOUT python benchmarks/database_memory.py` to compare two versions.

    python benchmarks/database_memory.py
"""

import resource
import subprocess
import tempfile

import torch
from transformers import BertConfig, BertModel

import spdy_hf
from spdy_hf.database import build_obs_database
from spdy_hf.modeling.levels import get_levels
from spdy_hf.modeling.units import find_units


def anonymous_mb() -> float:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("RssAnon"):
                return int(line.split()[1]) / 1024
    return float("nan")


torch.manual_seed(0)
model = BertModel(BertConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6,
                             vocab_size=1000)).eval()
units = find_units(model, ["*embed*", "*pooler*"])
levels = get_levels("spdy")
windows = {"input_ids": torch.randint(0, 1000, (32, 64)), "attention_mask": torch.ones(32, 64, dtype=torch.long)}
print(f"spdy_hf from {spdy_hf.__file__}: {len(units)} units, {len(levels)} levels; before: {anonymous_mb():.0f} MB")
with tempfile.TemporaryDirectory() as directory:
    database = build_obs_database(model, units, levels, windows, directory=directory + "/db", progress=False)
    print(f"after the build: {anonymous_mb():.0f} MB held; peak "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; on disk "
          f"{subprocess.run(['du', '-sm', directory], capture_output=True, text=True).stdout.split()[0]} MB")
