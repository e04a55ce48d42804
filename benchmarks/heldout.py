"""The held-out quality measure shared by the benchmarks: sentence embeddings of held-out text vs the dense model.

Texts: docstrings from the held-out split of the built-in corpus (standard-library files disjoint from the
calibration files), 128 tokens at most. Embeddings: attention-mask-weighted mean of the last hidden state,
L2-normalised (all-MiniLM-L6-v2's model card pooling).
"""

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
