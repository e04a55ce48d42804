"""How far a pruned model is from the dense one on the calibration set: the score the search minimises.

Without labels, SPDY scores a candidate by its distance to the dense model on the final outputs:

- "kl": KL(dense || pruned) of next-token distributions, averaged over positions (models with an LM head);
- "cosine": 1 - cosine similarity of each token's final hidden state with the dense one, averaged over the
  tokens the attention mask keeps (the MSE of L2-normalised hidden states, halved): scale-invariant, so a
  pruned encoder cannot score well by shrinking its outputs (the default for encoders);
- "embedding": 1 - cosine similarity of each window's sentence embedding with the dense one, the embedding being the
  mean of the final hidden states over the tokens the attention mask keeps (the pooling of sentence-transformers'
  mean-pooling models, all-MiniLM-L6-v2 among them), averaged over the windows: what a user of the embeddings
  compares, where "cosine" asks every token to keep its direction;
- "nmse": sum ||h_pruned - h_dense||^2 / sum ||h_dense||^2 over the final hidden states.

On MiniLM at 1.5x on a CPU, searching on "nmse" found profiles with a lower NMSE but a worse held-out sentence
embedding cosine than uniform sparsity (docs/benchmarks/spdy-vs-uniform.md): above an NMSE of about 1 the objective
rewards small outputs rather than right directions.

Reusing an unchanged prefix: the search's candidates differ from the best profile so far in a few units, so a
candidate is scored with `scorer(block_keys)`, where `block_keys[b]` names what block b holds (its units' levels).
The outputs of every block on every batch are kept for the best-scoring candidate; a new one skips the blocks before
the first one whose key differs (they return the kept outputs) and runs the rest. The score is the same as a full
forward pass, to the last bit: a block's output depends only on its inputs and its weights.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SPDYError
from ..modeling.units import find_blocks
from ..utils.io import release_free_memory
from .lowered import LowPrecisionShadow, lowered, model_dtype


def mean_pooled(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(B, T, H) hidden states averaged over each window's real tokens (`weight`, (B, T), 1 for a real token):
    (B, H), a sentence embedding before normalisation; a window without a real token gives zeros."""
    weight = weight.to(device=hidden.device, dtype=hidden.dtype)
    return (hidden * weight.unsqueeze(-1)).sum(1) / weight.sum(1, keepdim=True).clamp_min(1.0)


def has_lm_head(model: nn.Module) -> bool:
    get = getattr(model, "get_output_embeddings", None)
    return callable(get) and get() is not None


def score_kind(model: nn.Module, kind: str = "auto") -> str:
    """`search.score` settled for `model`: 'auto' is KL with an LM head, else cosine; any other kind as it is."""
    if kind != "auto":
        return kind
    return "kl" if has_lm_head(model) else "cosine"


SCORES = ("auto", "kl", "cosine", "embedding", "nmse")
KL_CHUNK = 64  # positions whose logits are in float32 at once (64 x 49 k vocabulary: 12.5 MB per temporary)


class DistanceScorer:
    """Scores the model as it is now against dense outputs recorded once at construction, in the dtype those ran in
    (`dtype`): a float32 model scored against a reference made while it was lowered to bfloat16 (the search's, in
    `spdy_hf.search.lowered.lowered`) is lowered again for the score.

    Args:
        model: the dense model (its outputs become the reference).
        batches: keyword inputs, one dict per forward pass.
        kind: "auto" (KL with an LM head, cosine otherwise), "kl", "cosine" or "nmse" (see the module docstring).
        dtype: score a low-precision copy of the model in this dtype (`spdy_hf.search.lowered`), kept in step with the
            model's in-place changes; None: the model itself.
    """

    def __init__(self, model: nn.Module, batches: list[dict], kind: str = "auto", dtype: torch.dtype | None = None):
        if kind not in SCORES:
            raise ValueError(f"Unknown score {kind!r}; use one of {SCORES}.")
        self.shadow = None
        if dtype is not None and dtype != next(model.parameters()).dtype:
            self.shadow = LowPrecisionShadow(model, dtype)
            model = self.shadow.model
        self.model = model
        self.dtype = model_dtype(model)  # the precision of the reference, and of every score
        self.batches = batches
        lm = has_lm_head(model)
        if kind == "kl" and not lm:
            raise ValueError("The 'kl' score needs a model with an LM head; use 'cosine' or 'nmse'.")
        self.kind = score_kind(model, kind)
        self._lm_output = lm  # an LM's hidden states come from output_hidden_states
        # no key/value cache while scoring: nothing generates
        self._extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
        self.blocks = [m for _, m in find_blocks(model)]
        self._kept: tuple[list, list, float] | None = None  # (block keys, outputs[block][batch], score)
        self.blocks_run = 0  # block forward passes run (the work that reusing a prefix saves) ...
        self.blocks_full = 0  # ... and the passes full forward passes would have run
        self._norm = None
        # every score averages over real tokens: a padded window's padding (attention_mask 0) is left out
        if self.kind == "kl":
            self.reference = [self._kl_reference(b) for b in batches]
            self._weights = [self._token_weights(b, b["input_ids"]) for b in batches]
            self._count = sum(float(w.sum()) for w in self._weights)
            return
        self.reference = [self._output(b) for b in batches]
        self._weights = [self._token_weights(b, r) for b, r in zip(batches, self.reference)]
        if self.kind == "embedding":
            self.reference = [F.normalize(mean_pooled(r, w), dim=-1) for r, w in zip(self.reference, self._weights)]
            self._count = sum(float((w.sum(-1) > 0).sum()) for w in self._weights)  # windows with a real token
        elif self.kind == "cosine":
            self.reference = [F.normalize(r, dim=-1) for r in self.reference]  # (B, T, H), unit vectors
            self._count = sum(float(w.sum()) for w in self._weights)
        else:
            self._norm = sum(float((r * r).sum(-1).mul(w.to(r.device)).sum())
                             for r, w in zip(self.reference, self._weights))  # sum of ||h_dense||^2

    @staticmethod
    def _token_weights(batch: dict, reference: torch.Tensor) -> torch.Tensor:
        mask = batch.get("attention_mask")
        if mask is None:
            return torch.ones(reference.shape[:2])
        return mask.to(torch.float32).reshape(reference.shape[:2])

    @torch.inference_mode()
    def _kl_reference(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """KL(p || q) per position = sum p log p - sum p z + logsumexp(z) for the candidate's logits z, and with p the
        dense softmax of the dense logits z0, sum p log p = sum p z0 - logsumexp(z0). The reference keeps, per
        position, p (float16: half the memory) and `_log_likelihood(p, z0)`, computed by the very operations that
        score a candidate: the dense model scores exactly 0 on any machine, and a candidate's score is off only by
        the float16 error of p times how far its logits moved."""
        logits = self._output(batch)
        logits = logits.reshape(-1, logits.shape[-1])
        # one allocation for the stored probabilities, filled chunk by chunk: interleaved with the chunks' float32
        # temporaries, many small ones would pin the freed temporaries in the heap
        probs = torch.empty(logits.shape, dtype=torch.float16, device=logits.device)
        offset = torch.empty(len(logits), dtype=torch.float32, device=logits.device)
        for i, chunk in zip(range(0, len(logits), KL_CHUNK), logits.split(KL_CHUNK)):
            rows = slice(i, i + len(chunk))
            z = chunk.float()
            probs[rows].copy_(torch.softmax(z, dim=-1))
            offset[rows] = self._log_likelihood(probs[rows], z)
        del logits
        release_free_memory()
        return probs, offset

    @staticmethod
    def _log_likelihood(probs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """sum_v p_v log softmax(z)_v per position, for stored float16 p and float32 logits z."""
        return (probs.float() * z).sum(-1) - torch.logsumexp(z, dim=-1)

    @torch.inference_mode()
    def _output(self, batch: dict) -> torch.Tensor:
        if self.kind == "kl":
            return self.model(**batch, **self._extra).logits  # (B, T, V), the model's dtype
        out = self.model(**batch, **self._extra, output_hidden_states=True)
        if self._lm_output:
            return out.hidden_states[-1].float()
        hidden = getattr(out, "last_hidden_state", None)
        return (hidden if hidden is not None else out.hidden_states[-1]).float()  # (B, T, H)

    @property
    def weight(self) -> float:
        """What the score averages over: the real tokens (KL, cosine), the windows with a real token (embedding),
        or the dense outputs' squared norm (nmse). Scores of disjoint windows combine as their mean weighted by it."""
        return float(self._norm if self.kind == "nmse" else self._count)

    def __call__(self, block_keys: list | None = None) -> float:
        """The score of the model as it is now, in the reference's dtype. With `block_keys` (what each block holds),
        blocks before the first one that differs from the best candidate so far are not run again.

        Raises:
            SPDYError: the model runs in another dtype than the reference did and cannot be lowered to it.
        """
        if self.shadow is not None:
            self.shadow.sync()
        if model_dtype(self.model) == self.dtype:
            return self._scored(block_keys)
        with lowered(self.model, self.dtype) as running:
            if running != self.dtype:
                raise SPDYError(f"The dense reference was computed in {self.dtype} and the model now runs in "
                                f"{running}: a score would compare unlike precisions. Score in one dtype "
                                "(search.score_dtype: float32) or keep the model's dtype between scores.")
            return self._scored(block_keys)

    def _scored(self, block_keys: list | None) -> float:
        self.blocks_full += len(self.blocks) * len(self.batches)
        if block_keys is None or len(block_keys) != len(self.blocks) or not self.blocks:
            self.blocks_run += len(self.blocks) * len(self.batches)
            return self._score(self._output)
        kept_keys, kept_outputs, best = self._kept or ([], [], float("inf"))
        first = next((b for b, key in enumerate(block_keys) if b >= len(kept_keys) or kept_keys[b] != key),
                     len(block_keys))
        outputs = [kept_outputs[b] if b < first else [None] * len(self.batches) for b in range(len(self.blocks))]
        state = {"batch": 0}
        handles, own = [], [vars(block).get("forward") for block in self.blocks[:first]]
        for b, block in enumerate(self.blocks):
            if b < first:
                block.forward = lambda *a, b=b, **k: outputs[b][state["batch"]]
            else:
                handles.append(block.register_forward_hook(
                    lambda m, a, out, b=b: outputs[b].__setitem__(state["batch"], out)))

        def output(batch):
            state["batch"] = next(i for i, x in enumerate(self.batches) if x is batch)
            return self._output(batch)

        try:
            score = self._score(output)
        finally:
            for block, forward in zip(self.blocks[:first], own):
                if forward is None:
                    del block.forward
                else:
                    block.forward = forward
            for h in handles:
                h.remove()
        self.blocks_run += (len(self.blocks) - first) * len(self.batches)
        if score < best:
            self._kept = (list(block_keys), outputs, score)
        return score

    def _score(self, output) -> float:
        # every score is >= 0; rounding (of a bfloat16 copy, say) can take a near-zero one just below
        return max(self._raw_score(output), 0.0)

    @torch.inference_mode()
    def _raw_score(self, output) -> float:
        if self.kind == "kl":
            total = 0.0
            for batch, (probs, offset), weight in zip(self.batches, self.reference, self._weights):
                logits = output(batch)
                logits = logits.reshape(-1, logits.shape[-1])
                weight = weight.reshape(-1).to(logits.device)
                # KL(dense || pruned), summed over the vocabulary, averaged over real positions; in chunks of
                # positions, so that float32 temporaries stay small
                for i, z in zip(range(0, len(logits), KL_CHUNK), logits.split(KL_CHUNK)):
                    rows = slice(i, i + len(z))
                    kl = offset[rows] - self._log_likelihood(probs[rows], z.float())
                    total += float((kl * weight[rows]).sum())
            return total / max(self._count, 1e-30)
        if self.kind == "cosine":
            total = 0.0
            for batch, ref, weight in zip(self.batches, self.reference, self._weights):
                cos = (F.normalize(output(batch), dim=-1) * ref).sum(-1)  # (B, T)
                total += float(((1.0 - cos) * weight).sum())
            return total / max(self._count, 1e-30)
        if self.kind == "embedding":
            total = 0.0
            for batch, ref, weight in zip(self.batches, self.reference, self._weights):
                cos = (F.normalize(mean_pooled(output(batch), weight), dim=-1) * ref).sum(-1)  # (B,)
                total += float(((1.0 - cos) * (weight.sum(-1) > 0)).sum())
            return total / max(self._count, 1e-30)
        err = sum(float(((output(b) - r) ** 2).sum(-1).mul(w.to(r.device)).sum())
                  for b, r, w in zip(self.batches, self.reference, self._weights))
        return err / max(self._norm, 1e-30)
