"""How far a pruned model is from the dense one on the calibration set: the score the search minimises.

Without labels, SPDY scores a candidate by its distance to the dense model: the KL divergence of next-token
distributions for models with an LM head, the normalised MSE of the final hidden states otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def has_lm_head(model: nn.Module) -> bool:
    get = getattr(model, "get_output_embeddings", None)
    return callable(get) and get() is not None


class DistanceScorer:
    """Scores the model as it is now against dense outputs recorded once at construction.

    Args:
        model: the dense model (its outputs become the reference).
        batches: keyword inputs, one dict per forward pass.
    """

    def __init__(self, model: nn.Module, batches: list[dict]):
        self.model = model
        self.batches = batches
        self.kind = "kl" if has_lm_head(model) else "nmse"
        self.reference = [self._output(b) for b in batches]
        if self.kind == "kl":
            self.reference = [F.log_softmax(r, dim=-1) for r in self.reference]  # (B, T, V)
            self._norm = None
        else:
            self._norm = sum(float((r * r).sum()) for r in self.reference)  # sum of ||h_dense||^2

    @torch.inference_mode()
    def _output(self, batch: dict) -> torch.Tensor:
        if self.kind == "kl":
            return self.model(**batch).logits.float()  # (B, T, V)
        out = self.model(**batch, output_hidden_states=True)
        hidden = getattr(out, "last_hidden_state", None)
        return (hidden if hidden is not None else out.hidden_states[-1]).float()  # (B, T, H)

    @torch.inference_mode()
    def __call__(self) -> float:
        if self.kind == "kl":
            total, count = 0.0, 0
            for batch, ref_logp in zip(self.batches, self.reference):
                logp = F.log_softmax(self._output(batch), dim=-1)
                # KL(dense || pruned), summed over the vocabulary, averaged over positions
                total += float((ref_logp.exp() * (ref_logp - logp)).sum())
                count += ref_logp.shape[0] * ref_logp.shape[1]
            return total / count
        err = sum(float(((self._output(b) - r) ** 2).sum()) for b, r in zip(self.batches, self.reference))
        return err / max(self._norm, 1e-30)
