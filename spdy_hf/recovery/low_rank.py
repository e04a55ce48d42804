"""Low-rank recovery (`recovery.rank`): updates of rank r trained in place of the kept linear weights, merged in once.

gap trains every kept weight of the pruned blocks: their gradients and Adam's two moments, and for a model held in
bfloat16 float32 copies of them, cost three to four times the kept weights beside the model. With a rank r, each
linear layer of those blocks gets an update `(32 / r) * B @ A` (A: r x in, random; B: out x r, zero, so training
starts from the pruned model), added to the layer's output as `(32 / r) * (x @ A.T) @ B.T` while recovery trains;
only A and B are trained (with the blocks' one-dimensional parameters, norms and biases), so the model's own
weights hold no gradient, no moment and no float32 copy. When training ends, each update is added to its weight
once (in float32, rounded to the weight's dtype), and the model is an ordinary one again, of the same shapes.

The update of a layer is dense: a layer that holds zeros of the profile inside its kept weights (a sparse level of
the unstructured or mixed family) would lose them, so such a layer is trained whole, as gap trains it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.groups import rows_view

# the update is (ALPHA / r) * B @ A: the larger the rank, the smaller each factor's share, so that one learning rate
# serves every rank (2 at rank 16)
ALPHA = 32.0


class LowRankUpdates:
    """Rank-`rank` updates of the weights of `modules` (Linear or Conv1D layers, by name), on their outputs while
    the `with` block lasts, merged into the weights when it ends without an error (dropped otherwise).

    Args:
        modules: the layers to update.
        rank: r; a layer narrower than r gets an update of its own smaller width.
        seed: for A's random start (the same updates for the same seed).
    """

    def __init__(self, modules: dict[str, nn.Module], rank: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.entries: list[tuple[str, nn.Module, nn.Parameter, nn.Parameter]] = []
        for name, module in modules.items():
            weight, _ = rows_view(module)
            out_features, in_features = weight.shape
            r = max(1, min(rank, out_features, in_features))
            a = torch.randn(r, in_features, generator=generator) / math.sqrt(in_features)
            b = torch.zeros(out_features, r)
            self.entries.append((name, module, nn.Parameter(a.to(weight.device)), nn.Parameter(b.to(weight.device))))
        self.scale = ALPHA / max(rank, 1)
        self._handles: list = []

    def __len__(self) -> int:
        return len(self.entries)

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, _, a, b in self.entries for p in (a, b)]

    def __enter__(self) -> LowRankUpdates:
        for _, module, a, b in self.entries:
            self._handles.append(module.register_forward_hook(_adds_update(a, b, self.scale)))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if exc_type is None:
            self.merge()

    @torch.no_grad()
    def merge(self) -> None:
        """Adds each update to its layer's weight (computed in float32, rounded once to the weight's dtype)."""
        for _, module, a, b in self.entries:
            weight, _ = rows_view(module)  # (out, in), a view of a Conv1D's (in, out) weight
            delta = self.scale * (b.detach().float() @ a.detach().float())
            weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))


def _adds_update(a: nn.Parameter, b: nn.Parameter, scale: float):
    def hook(module, args, output):
        x = args[0]
        # in the pass's dtype (the factors stay float32 for the optimizer; the casts carry their gradients back)
        update = F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))
        return output + scale * update.to(output.dtype)
    return hook
