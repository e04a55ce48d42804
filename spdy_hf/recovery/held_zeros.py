"""The zeros of a pruning profile, held through training: one mechanism for recovery and the Trainer callback.

A profile's latency holds only while its zeros stay zero: CSR levels keep their number of stored entries, 2:4
keeps its pattern, and removed heads and FFN neurons stay removed (their rows in the producing layers, their columns
in the consuming one), so the shrunk deployment still computes what the masked model computes. `HeldZeros` records
which entries of which parameters are zero when it is made (after the profile is stitched and, for structured
groups, the producers zeroed) and puts them back to zero (`apply`) after every optimizer step; `hold_gradients`
zeroes their gradients before the step as well, so that an optimizer's running moments never move them.
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
        self.masks: dict[str, torch.Tensor] = {}  # name -> bool, True where held at zero
        self.params: dict[str, nn.Parameter] = {}
        for name in names:
            p = params[name]
            mask = p.detach() == 0
            if bool(mask.any()):
                self.masks[name], self.params[name] = mask, p

    @classmethod
    def of_modules(cls, model: nn.Module, module_names: Iterable[str]) -> HeldZeros:
        """The zeros of the weights and biases of the named modules (a profile's units)."""
        wanted = set(module_names)
        return cls(model, [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[0] in wanted])

    def __len__(self) -> int:
        return len(self.masks)

    def counts(self) -> dict[str, int]:
        """Held entries per parameter."""
        return {name: int(mask.sum()) for name, mask in self.masks.items()}

    def rebind(self, model: nn.Module) -> None:
        """Holds the same entries of another model's parameters of the same names (after a copy, say)."""
        params = dict(model.named_parameters())
        self.params = {name: params[name] for name in self.masks}

    @torch.no_grad()
    def apply(self) -> None:
        """Sets every held entry to zero again (in the parameter's own dtype and device)."""
        for name, p in self.params.items():
            p.masked_fill_(self.masks[name].to(p.device), 0)

    @torch.no_grad()
    def hold_gradients(self) -> None:
        """Zeroes the held entries' gradients (call between backward and the optimizer step)."""
        for name, p in self.params.items():
            if p.grad is not None:
                p.grad.masked_fill_(self.masks[name].to(p.grad.device), 0)

    @torch.no_grad()
    def violations(self) -> dict[str, int]:
        """Held entries that are not zero now, per parameter (empty when every zero held)."""
        out = {}
        for name, p in self.params.items():
            n = int((p.detach()[self.masks[name].to(p.device)] != 0).sum())
            if n:
                out[name] = n
        return out
