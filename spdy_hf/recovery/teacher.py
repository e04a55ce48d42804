"""What recovery fits a pruned model to: the dense teacher (`DenseSnapshot`, on disk); the layers a profile pruned;
and gAP's objective on their outputs (`spdy_hf.recovery.fit`).

The objective of one batch is

    sum over pruned layers l of ||y_l(pruned) - y_l(dense)||^2 / ||y_l(dense)||^2

with y_l a layer's output in its own model, over the output features that can still be nonzero (a removed head's
or neuron's rows in a producing layer are zero for good: `live_outputs`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..calibration.sequential import first_output
from ..errors import SPDYError
from ..modeling.groups import rows_view
from ..modeling.snapshot import DenseSnapshot
from ..modeling.units import find_blocks
from ..search.scoring import mean_pooled


class LayerOutputs:
    """Forward hooks that keep the outputs of the named layers of one model."""

    def __init__(self, modules: dict[str, nn.Module], detach: bool):
        self.values: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(name, detach)) for name, m in modules.items()]

    def _hook(self, name: str, detach: bool):
        def hook(module, args, output):
            out = first_output(output)
            self.values[name] = out.detach() if detach else out
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def layer_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
               live: dict[str, torch.Tensor] | None = None, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """gAP's objective: each layer's squared error over the dense output's squared norm, summed over layers; with
    `live` (a layer's output features that can still be nonzero, `live_outputs`), on those features only; with
    `tokens` (the batch's real tokens, flattened: `token_mask`), on those tokens only.

    The real tokens are taken by their positions (`index_select`, whose backward pass adds rows back) before the
    outputs are cast to float32, and the squared error is one fused `mse_loss`: a boolean selection of float32
    copies took three times as long, forward and backward."""
    total = None
    rows = None if tokens is None else tokens.nonzero().squeeze(1)
    for name, t in teacher.items():
        s = student[name]
        keep = None if live is None else live.get(name)
        if keep is not None:
            t, s = t[..., keep.to(t.device)], s[..., keep.to(s.device)]
        if rows is not None and t.shape[:-1].numel() == tokens.numel():
            t = t.reshape(tokens.numel(), t.shape[-1]).index_select(0, rows.to(t.device))
            s = s.reshape(tokens.numel(), s.shape[-1]).index_select(0, rows.to(s.device))
        t = t.float()
        term = F.mse_loss(s.float(), t, reduction="sum") / t.pow(2).sum().clamp_min(1e-12)
        total = term if total is None else total + term
    if total is None:
        raise SPDYError("Recovery found none of the pruned layers' outputs in the forward pass.")
    return total


def output_distance(student, teacher, kind: str, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """The job's score on the final output: KL(dense || pruned) per token for LMs, 1 - cosine of the mean-pooled
    sentence embeddings per window for "embedding", else 1 - cosine per token; with `tokens` (the batch's real
    tokens, flattened), averaged over those only."""
    if kind == "kl":
        s, t = student.logits.float(), teacher.logits.float()
        s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
        if tokens is not None:
            s, t = s[tokens.to(s.device)], t[tokens.to(t.device)]
        return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    s, t = _last_hidden(student).float(), _last_hidden(teacher).float()
    if kind == "embedding":  # each window's mean-pooled sentence embedding
        weight = torch.ones(s.shape[:2], device=s.device) if tokens is None else \
            tokens.to(s.device).reshape(s.shape[:2]).float()
        s, t = mean_pooled(s, weight), mean_pooled(t, weight)
        return (1 - F.cosine_similarity(s, t, dim=-1))[weight.sum(-1) > 0].mean()
    distance = (1 - F.cosine_similarity(s, t, dim=-1)).reshape(-1)
    return distance.mean() if tokens is None else distance[tokens.to(distance.device)].mean()


class HeadInputs:
    """Catches what a causal LM gives its language-model head (the last hidden states), and stops the pass there:
    recovery then takes the KL over the vocabulary slice by slice (`sliced_kl`) instead of holding every position's
    logits, their softmax and their gradients at once (for a 49 k vocabulary, 200 MB a tensor for 8 x 128 tokens)."""

    def __init__(self, head: nn.Module):
        self.value: torch.Tensor | None = None
        self.handle = head.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.value = args[0]
        raise HeadReached

    def take(self) -> torch.Tensor:
        if self.value is None:
            raise SPDYError("The model's forward pass never reached its language-model head.")
        value, self.value = self.value, None
        return value

    def remove(self) -> None:
        self.handle.remove()


class HeadReached(Exception):
    """Ends a forward pass at the language-model head (`HeadInputs`)."""


def sliced_kl(head: nn.Module, student: torch.Tensor, teacher: torch.Tensor, tokens: torch.Tensor | None = None,
              rows: int = 256, weight: torch.Tensor | None = None) -> torch.Tensor:
    """KL(dense || pruned) per token, as `output_distance` takes it on logits, from the hidden states both models
    give their shared head (pruning and recovery leave the head as it is). The tokens are taken `rows` at a time and
    each slice's logits are computed again in the backward pass rather than kept, so the memory of the output
    term is one slice's logits whatever the batch. `weight`: the head's weight as the products should take it (cast
    once to the passes' dtype, say, where autocast would cast it for every product), the head's own by default."""
    s = student.reshape(-1, student.shape[-1])
    t = teacher.reshape(-1, teacher.shape[-1])
    if tokens is not None:
        s, t = s[tokens.to(s.device)], t[tokens.to(t.device)]
    weight = head.weight if weight is None else weight

    def logits(h: torch.Tensor) -> torch.Tensor:  # the head's product, not a call of it (it may be hooked)
        return F.linear(h, weight, head.bias).float()

    def piece(hs: torch.Tensor, ht: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = F.log_softmax(logits(ht), -1)
        return F.kl_div(F.log_softmax(logits(hs), -1), target, log_target=True, reduction="sum")

    total = None
    for i in range(0, s.shape[0], rows):
        part = checkpoint(piece, s[i:i + rows], t[i:i + rows].detach(), use_reentrant=False)
        total = part if total is None else total + part
    return total / max(1, s.shape[0])


def _last_hidden(out) -> torch.Tensor:
    hidden = getattr(out, "last_hidden_state", None)
    return hidden if hidden is not None else out.hidden_states[-1]

def pruned_layers(model: nn.Module, snapshot: DenseSnapshot) -> dict[str, nn.Module]:
    """The layers of the model's blocks (modules with a 2-D weight) holding more zero weights than the dense
    snapshot: those the profile pruned, in model order."""
    out = {}
    for block_name, block in find_blocks(model):
        for name, module in block.named_modules():
            weight = getattr(module, "weight", None)
            full = f"{block_name}.{name}" if name else block_name
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or f"{full}.weight" not in snapshot:
                continue
            if int((weight.detach() == 0).sum()) > int((snapshot.tensor(f"{full}.weight") == 0).sum()):
                out[full] = module
    return out


@torch.no_grad()
def live_outputs(module: nn.Module) -> torch.Tensor | None:
    """The output features of a pruned layer that training can still move: all but those whose weight row is all
    zero with no bias or a zero one (a removed head's or neuron's rows in a producing layer). Those are zero for
    good, held so by `HeldZeros`; leaving them in the objective would only add the dense values as a constant error
    that swamps what can be fitted. None when every feature is live."""
    weight, _ = rows_view(module)
    dead = (weight == 0).all(dim=1)
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        dead &= bias.detach() == 0
    if not bool(dead.any()):
        return None
    return ~dead


def modules_named(model: nn.Module, layers: dict[str, nn.Module]):
    modules = dict(model.named_modules())
    return [(name, modules[name]) for name in layers]
