"""The zeros of a pruning profile, held through training: one mechanism for recovery and the Trainer callback.

A profile's latency holds only while its zeros stay zero: CSR levels keep their number of stored entries, 2:4
keeps its pattern, and removed heads and FFN neurons stay removed (their rows in the producing layers, their columns
in the consuming one), so the shrunk deployment still computes what the masked model computes. `HeldZeros` records
which entries of which parameters are zero when it is made (after the profile is stitched and, for structured
groups, the producers zeroed) and puts them back to zero (`apply`) after every optimizer step; `hold_gradients`
zeroes their gradients before the step as well, so that an optimizer's running moments never move them.

A parameter's zeros are held as a mask (a byte per entry) where they are many, a profile's, and as their flat
positions (four bytes each) where they are few: a checkpoint's own exact zeros in the kept weights (a dequantized
GGUF model has some in every layer), whose masks would cost a byte per kept weight for a handful of entries.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class HeldZeros:
    """Entries of named parameters held at exactly zero.

    Args:
        model: the model whose parameters are named.
        names: the parameters to watch (e.g. the weights and biases of the pruned layers); those with no zero
            entry are not held.
    """

    def __init__(self, model: nn.Module, names: Iterable[str]):
        params = dict(model.named_parameters())
        # name -> where held at zero: a bool mask of the parameter's shape, or the flat positions (int32)
        self.masks: dict[str, torch.Tensor] = {}
        self.params: dict[str, nn.Parameter] = {}
        for name in names:
            p = params[name]
            mask = p.detach() == 0
            count = int(mask.sum())
            if not count:
                continue
            if 4 * count < mask.numel() < 2**31:
                mask = torch.nonzero(mask.flatten()).flatten().to(torch.int32)
            self.masks[name], self.params[name] = mask, p

    @classmethod
    def of_modules(cls, model: nn.Module, module_names: Iterable[str]) -> HeldZeros:
        """The zeros of the weights and biases of the named modules (a profile's units)."""
        return cls(model, list(module_parameters(model, module_names)))

    def __len__(self) -> int:
        return len(self.masks)

    def counts(self) -> dict[str, int]:
        """Held entries per parameter."""
        return {name: int(mask.sum()) if mask.dtype == torch.bool else mask.numel()
                for name, mask in self.masks.items()}

    def rebind(self, model: nn.Module) -> None:
        """Holds the same entries of another model's parameters of the same names (after a copy, say)."""
        params = dict(model.named_parameters())
        self.params = {name: params[name] for name in self.masks}

    @torch.no_grad()
    def apply(self) -> None:
        """Sets every held entry to zero again (in the parameter's own dtype and device)."""
        for name, p in self.params.items():
            _zero(p, self.masks[name])

    @torch.no_grad()
    def hold_gradients(self) -> None:
        """Zeroes the held entries' gradients (call between backward and the optimizer step)."""
        for name, p in self.params.items():
            if p.grad is not None:
                _zero(p.grad, self.masks[name])

    @torch.no_grad()
    def violations(self) -> dict[str, int]:
        """Held entries that are not zero now, per parameter (empty when every zero held)."""
        out = {}
        for name, p in self.params.items():
            held = self.masks[name].to(p.device)
            values = p.detach()[held] if held.dtype == torch.bool else p.detach().reshape(-1)[held.long()]
            n = int((values != 0).sum())
            if n:
                out[name] = n
        return out


def module_parameters(model: nn.Module, module_names: Iterable[str]) -> dict[str, nn.Parameter]:
    """The parameters (weights and biases) the named modules own directly, by full name."""
    wanted = set(module_names)
    return {n: p for n, p in model.named_parameters() if n.rsplit(".", 1)[0] in wanted}


def _zero(t: torch.Tensor, held: torch.Tensor) -> None:
    """Zeroes the entries of `t` that `held` names: a mask of its shape, or flat positions."""
    if held.dtype == torch.bool:
        t.masked_fill_(held.to(t.device), 0)
    elif t.is_contiguous():
        t.view(-1).index_fill_(0, held.to(t.device, torch.long), 0)
    else:  # laid out otherwise than row by row (a transposed gradient, say): the positions are logical
        t.copy_(t.reshape(-1).index_fill(0, held.to(t.device, torch.long), 0).view(t.shape))
