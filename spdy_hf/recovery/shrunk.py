"""Recovery on the shrunk model: the removed heads and neurons cut out while the kept weights are trained.

A structured profile leaves whole heads and FFN neurons at zero (`spdy_hf.modeling.groups.zero_fill`). Training the
zero-filled model spends its forward and backward passes, its gradients and Adam's two moments on those zeros too:
on SmolLM2-135M at 1.5x, 46 M of the blocks' 106 M weights. `ShrunkModel` cuts them out for the length of a
`with` block (`spdy_hf.modeling.groups.shrink`, the same form a saved model is deployed in, so the outputs are the
zero-filled model's) and writes the trained weights back into the full-size modules when it ends: the kept rows of
each producing layer, the kept columns and the bias of each consumer. The removed groups come back as zeros, so
the profile, its latency and the checkpoint's shapes are what they were. While the model is shrunk, the full-size
weights it replaced are released (their shapes kept), so the model itself is smaller too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..modeling.groups import (
    HEAD_ATTRIBUTES,
    RemovedAttention,
    StructuredGroup,
    find_structured_groups,
    rows_view,
    set_module,
    shrink,
)


@dataclass
class _Cut:
    """One shrunk group: what it kept and the full-size modules (weights released) to write back into."""

    group: StructuredGroup
    kept: list[int]
    originals: dict[str, nn.Module]  # producers and consumer, by full name
    parent: nn.Module | None  # the attention module, if any
    parent_attrs: dict[str, object] = field(default_factory=dict)  # its head counts (and config) before the cut
    shapes: dict[str, torch.Size] = field(default_factory=dict)  # released weights' shapes


def kept_groups(group: StructuredGroup, modules: dict[str, nn.Module]) -> list[int]:
    """The groups with any nonzero weight or bias among their producer rows and consumer columns. The others are
    removed: zero in every weight they own, so cutting them out changes no output and no gradient."""
    consumer, _ = rows_view(modules[group.consumer])
    alive = consumer.reshape(consumer.shape[0], group.num_groups, group.group_size).ne(0).any(2).any(0)
    for name in group.producers:
        module = modules[name]
        w, _ = rows_view(module)
        bias = getattr(module, "bias", None)
        for start, rows in group.producer_parts(name):  # a fused producer's parts: each laid out group by group
            part = slice(start, start + group.num_groups * rows)
            alive |= w[part].reshape(group.num_groups, -1).ne(0).any(1)
            if isinstance(bias, torch.Tensor):
                alive |= bias[part].reshape(group.num_groups, -1).ne(0).any(1)
    return [int(g) for g in torch.nonzero(alive).flatten()]


class ShrunkModel:
    """`with ShrunkModel(model) as cut:` the model without its removed heads and neurons; on leaving, the
    zero-filled full-size model again, holding what the kept weights became. `cut.teacher_index[name]` is, for each
    shrunk producing layer, the full-size output features its shrunk output holds (for comparing it with a dense
    model's output); `len(cut)` is how many groups were shrunk."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.cuts: list[_Cut] = []
        self.teacher_index: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.cuts)

    @torch.no_grad()
    def __enter__(self) -> ShrunkModel:
        modules = dict(self.model.named_modules())
        try:
            for group in find_structured_groups(self.model):
                kept = kept_groups(group, modules)
                if len(kept) == group.num_groups:
                    continue
                names = [*group.producers, group.consumer]
                parent = modules.get(group.parent) if group.parent else None
                attrs = {a: getattr(parent, a) for a in HEAD_ATTRIBUTES if isinstance(getattr(parent, a, None), int)}
                if getattr(parent, "config", None) is not None:  # a shrink may give it a config of its own
                    attrs["config"] = parent.config
                cut = _Cut(group, kept, {n: modules[n] for n in names}, parent, attrs)
                self.cuts.append(cut)  # first: a shrink that fails half way is put back too
                shrink(self.model, group, kept)
                for name in group.producers:
                    self.teacher_index[name] = group.producer_indices(name, kept)
                for name, module in cut.originals.items():  # the shrunk copies hold what training needs
                    cut.shapes[name] = module.weight.shape
                    module.weight.data = module.weight.data.new_empty(0)
                modules = dict(self.model.named_modules())
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    @torch.no_grad()
    def _restore(self) -> None:
        while self.cuts:
            cut = self.cuts.pop()
            group = cut.group
            current = dict(self.model.named_modules())
            trained = {n: current.get(n) for n in cut.originals}
            removed_attention = current.get(group.parent) if group.parent else None
            if not isinstance(removed_attention, RemovedAttention):
                removed_attention = None
            for name, original in cut.originals.items():
                if name in cut.shapes:
                    original.weight.data = original.weight.data.new_zeros(cut.shapes[name])
                module = trained[name]
                if module is original:  # inside a removed attention module: it never left
                    module = None
                if name == group.consumer:
                    self._write_consumer(original, module, removed_attention, group, cut.kept)
                else:
                    self._write_producer(original, module, group, name, cut.kept)
            if removed_attention is not None:
                set_module(self.model, group.parent, cut.parent)
            now = dict(self.model.named_modules())
            for name, original in cut.originals.items():
                if name in now and now[name] is not original:
                    set_module(self.model, name, original)
            for attr, value in cut.parent_attrs.items():
                setattr(cut.parent, attr, value)
        self.teacher_index = {}

    @staticmethod
    def _write_producer(original: nn.Module, trained: nn.Module | None, group: StructuredGroup, name: str,
                        kept: list[int]) -> None:
        if trained is None or not kept:
            return
        w, _ = rows_view(original)
        idx = group.producer_indices(name, kept).to(w.device)
        w[idx] = rows_view(trained)[0].to(w.dtype)
        if isinstance(getattr(original, "bias", None), torch.Tensor):
            original.bias[idx] = trained.bias.to(original.bias.dtype)

    @staticmethod
    def _write_consumer(original: nn.Module, trained: nn.Module | None, removed_attention: nn.Module | None,
                        group: StructuredGroup, kept: list[int]) -> None:
        bias = getattr(original, "bias", None)
        if trained is not None:
            if kept:
                w, _ = rows_view(original)
                w[:, group.consumer_columns(kept).to(w.device)] = rows_view(trained)[0].to(w.dtype)
            trained_bias = getattr(trained, "bias", None)
        else:  # the whole attention went, its output projection with it: the stand-in holds the bias
            trained_bias = getattr(removed_attention, "bias", None)
        if isinstance(bias, torch.Tensor) and isinstance(trained_bias, torch.Tensor):
            bias.copy_(trained_bias.to(bias.dtype))
