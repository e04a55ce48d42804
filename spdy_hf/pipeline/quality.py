"""Quality on held-out text, as users judge it: perplexity for causal LMs, embedding cosine for encoders.

The text is the built-in corpus's held-out split by default (standard-library files that the calibration split
never contains, `spdy_hf.calibration.text`), or any file or `datasets` source. The dense model is measured before pruning
(`HeldOutQuality`), the pruned one after, on the same token windows.

`evaluate` (the Hugging Face library) is not used: its metrics are fetched from the Hub when loaded, which fails
offline, and its perplexity metric loads the model again by Hub id; both numbers here come from the models in memory.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..calibration.text import BUILTIN_SOURCES, builtin_texts, load_texts, token_windows
from ..latency.backend import model_device
from ..search.scoring import has_lm_head
from ..utils.io import release_free_memory

logger = logging.getLogger(__name__)


def is_causal_lm(model: nn.Module) -> bool:
    """A model whose quality is its perplexity: it has an LM head and generates."""
    can = getattr(model, "can_generate", None)
    return has_lm_head(model) and callable(can) and bool(can())


def heldout_windows(tokenizer, source: str = "builtin", num_samples: int = 16, sequence_length: int = 256,
                    dataset_config: str | None = None, split: str = "test", text_column: str = "text",
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """Token windows of held-out text: the built-in corpus's held-out split ("builtin"), or a local file or Hub
    dataset (`spdy_hf.calibration.text.load_texts`)."""
    if source in BUILTIN_SOURCES:
        texts = builtin_texts(source, "heldout")
    else:
        texts = load_texts(source, dataset_config=dataset_config, split=split, text_column=text_column)
    return token_windows(tokenizer, texts, num_samples, sequence_length, seed=seed)


def _batches(windows: dict[str, torch.Tensor], batch_size: int, device: torch.device):
    n = windows["input_ids"].shape[0]
    for i in range(0, n, batch_size):
        yield {k: v[i:i + batch_size].to(device) for k, v in windows.items()}


@torch.inference_mode()
def perplexity(model: nn.Module, windows: dict[str, torch.Tensor], batch_size: int = 1, chunk: int = 64) -> float:
    """exp of the mean negative log-likelihood of every next token the attention mask keeps. One window per pass
    and the loss in chunks of `chunk` positions: a 49 k vocabulary's float32 logits are 50 MB per 256 tokens, and
    the log-softmax of all of them at once would hold several such copies."""
    total, count = 0.0, 0
    for batch in _batches(windows, batch_size, model_device(model)):
        logits = model(**batch, use_cache=False).logits  # (B, T, V)
        target, keep = batch["input_ids"][:, 1:], batch["attention_mask"][:, 1:].bool()
        for i in range(0, logits.shape[1] - 1, chunk):
            z = logits[:, i:i + chunk][:, : target.shape[1] - i].float()
            nll = F.cross_entropy(z.reshape(-1, z.shape[-1]), target[:, i:i + chunk].reshape(-1), reduction="none")
            total += float(nll[keep[:, i:i + chunk].reshape(-1)].sum())
            count += int(keep[:, i:i + chunk].sum())
        del logits
    release_free_memory()
    return math.exp(total / max(count, 1))


@torch.inference_mode()
def embeddings(model: nn.Module, windows: dict[str, torch.Tensor], batch_size: int = 8) -> torch.Tensor:
    """Mean-pooled final hidden states (what sentence-transformers makes of a BERT), one row per window."""
    rows = []
    for batch in _batches(windows, batch_size, model_device(model)):
        out = model(**batch, output_hidden_states=True)
        hidden = getattr(out, "last_hidden_state", None)
        hidden = (hidden if hidden is not None else out.hidden_states[-1]).float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        rows.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))
    return torch.cat(rows)


class HeldOutQuality:
    """The dense model's held-out quality, measured at construction; `compare(model)` measures the model as it is
    now on the same windows and returns the report's entry."""

    def __init__(self, model: nn.Module, windows: dict[str, torch.Tensor], source: str = "builtin"):
        self.windows, self.source = windows, source
        self.causal = is_causal_lm(model)
        if self.causal:
            self.dense = perplexity(model, windows)
        else:
            self.dense = embeddings(model, windows)

    def compare(self, model: nn.Module) -> dict:
        n, length = self.windows["input_ids"].shape
        entry = {"source": self.source, "windows": int(n), "sequence_length": int(length)}
        if self.causal:
            pruned = perplexity(model, self.windows)
            logger.info("Held-out perplexity: dense %.3f, pruned %.3f.", self.dense, pruned)
            return {**entry, "metric": "perplexity", "dense": self.dense, "pruned": pruned}
        cosine = float(F.cosine_similarity(embeddings(model, self.windows), self.dense, dim=-1).mean())
        logger.info("Held-out embedding cosine (pruned vs dense, mean-pooled): %.4f.", cosine)
        return {**entry, "metric": "embedding_cosine", "pruned": cosine}


def evaluate_saved(directory: str, base: str | None = None, source: str = "builtin", num_samples: int = 16,
                   sequence_length: int = 256, dataset_config: str | None = None, split: str = "test",
                   text_column: str = "text", trust_remote_code: bool = False) -> dict:
    """`spdy-hf eval`: a saved model and its base on the same held-out windows (the base's tokenizer). `base`
    defaults to the one the saved config.json records."""
    import os

    from ..errors import SPDYError
    from ..modeling.loading import load_model_and_tokenizer
    from ..utils.io import read_json

    if base is None:
        path = os.path.join(directory, "config.json")
        saved = read_json(path) if os.path.isfile(path) else {}
        spdy = saved.get("spdy") if isinstance(saved, dict) else None
        base = spdy.get("base_model") if isinstance(spdy, dict) else None
        if not isinstance(base, str) or not base:
            raise SPDYError(f"{directory} records no base model; pass it: spdy-hf eval {directory} BASE.")
    base_model, tokenizer = load_model_and_tokenizer(base, trust_remote_code=trust_remote_code)
    limit = getattr(base_model.config, "max_position_embeddings", None)
    windows = heldout_windows(tokenizer, source, num_samples, min(sequence_length, limit or sequence_length),
                              dataset_config=dataset_config, split=split, text_column=text_column)
    quality = HeldOutQuality(base_model, windows, source)
    del base_model
    pruned, _ = load_model_and_tokenizer(directory, trust_remote_code=trust_remote_code)
    out = quality.compare(pruned)
    if out["metric"] == "perplexity":
        out["base"] = out.pop("dense")
    return {**out, "model": os.path.abspath(directory), "base_model": base}
