"""How far a pruned model is from the dense one on the calibration set: the score the search minimises.

Without labels, SPDY scores a candidate by its distance to the dense model on the final outputs:

- "kl": KL(dense || pruned) of next-token distributions, averaged over positions (models with an LM head);
- "cosine": 1 - cosine similarity of each token's final hidden state with the dense one, averaged over the
  tokens the attention mask keeps (the MSE of L2-normalised hidden states, halved): scale-invariant, so a
  pruned encoder cannot score well by shrinking its outputs (the default for encoders);
- "nmse": sum ||h_pruned - h_dense||^2 / sum ||h_dense||^2 over the final hidden states.

On MiniLM at 1.5x on a CPU, searching on "nmse" found profiles with a lower NMSE but a worse held-out sentence
embedding cosine than uniform sparsity (docs/BENCHMARKS.md): above an NMSE of about 1 the objective rewards
small outputs rather than right directions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def has_lm_head(model: nn.Module) -> bool:
    get = getattr(model, "get_output_embeddings", None)
    return callable(get) and get() is not None


SCORES = ("auto", "kl", "cosine", "nmse")


class DistanceScorer:
    """Scores the model as it is now against dense outputs recorded once at construction.

    Args:
        model: the dense model (its outputs become the reference).
        batches: keyword inputs, one dict per forward pass.
        kind: "auto" (KL with an LM head, cosine otherwise), "kl", "cosine" or "nmse" (see the module docstring).
    """

    def __init__(self, model: nn.Module, batches: list[dict], kind: str = "auto"):
        if kind not in SCORES:
            raise ValueError(f"Unknown score {kind!r}; use one of {SCORES}.")
        self.model = model
        self.batches = batches
        lm = has_lm_head(model)
        if kind == "kl" and not lm:
            raise ValueError("The 'kl' score needs a model with an LM head; use 'cosine' or 'nmse'.")
        self.kind = ("kl" if lm else "cosine") if kind == "auto" else kind
        self._lm_output = lm  # an LM's hidden states come from output_hidden_states
        self.reference = [self._output(b) for b in batches]
        self._norm = None
        if self.kind == "kl":
            self.reference = [F.log_softmax(r, dim=-1) for r in self.reference]  # (B, T, V)
        elif self.kind == "cosine":
            self.reference = [F.normalize(r, dim=-1) for r in self.reference]  # (B, T, H), unit vectors
            self._weights = [self._token_weights(b, r) for b, r in zip(batches, self.reference)]
            self._count = sum(float(w.sum()) for w in self._weights)
        else:
            self._norm = sum(float((r * r).sum()) for r in self.reference)  # sum of ||h_dense||^2

    @staticmethod
    def _token_weights(batch: dict, reference: torch.Tensor) -> torch.Tensor:
        mask = batch.get("attention_mask")
        if mask is None:
            return torch.ones(reference.shape[:2])
        return mask.to(torch.float32).reshape(reference.shape[:2])

    @torch.inference_mode()
    def _output(self, batch: dict) -> torch.Tensor:
        if self.kind == "kl":
            return self.model(**batch).logits.float()  # (B, T, V)
        out = self.model(**batch, output_hidden_states=True)
        if self._lm_output:
            return out.hidden_states[-1].float()
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
        if self.kind == "cosine":
            total = 0.0
            for batch, ref, weight in zip(self.batches, self.reference, self._weights):
                cos = (F.normalize(self._output(batch), dim=-1) * ref).sum(-1)  # (B, T)
                total += float(((1.0 - cos) * weight).sum())
            return total / max(self._count, 1e-30)
        err = sum(float(((self._output(b) - r) ** 2).sum()) for b, r in zip(self.batches, self.reference))
        return err / max(self._norm, 1e-30)
