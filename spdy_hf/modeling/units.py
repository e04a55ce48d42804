"""Prunable units: the Linear / Conv1D layers inside a model's repeated blocks.

A transformer keeps its blocks in an `nn.ModuleList` (`encoder.layer`, `transformer.h`, `model.layers`,
`model.decoder.layers`, ...). Rather than a table of architectures, we look for module lists whose items
share one class and hold linear layers: that finds the blocks of BERT, GPT-2, OPT, Llama, Mistral, Qwen2
and most others without naming them. Embeddings, heads and poolers live outside the blocks.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SPDYError

logger = logging.getLogger(__name__)


def conv1d_classes() -> tuple[type, ...]:
    """transformers' Conv1D (GPT-2's linear layer, weight stored (in, out)), as a tuple for isinstance."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return ()
    return (Conv1D,)


def is_prunable_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, *conv1d_classes()))


@dataclass
class Unit:
    """One prunable layer. `weight` is always seen as (out_features, in_features)."""

    name: str  # full module name in the model, e.g. "encoder.layer.0.attention.self.query"
    module: nn.Module
    block: str  # name of the repeated block holding it, e.g. "encoder.layer.0"

    @property
    def is_conv1d(self) -> bool:
        return not isinstance(self.module, nn.Linear)

    @property
    def weight(self) -> torch.Tensor:
        """The weight as (out, in); a view, so in-place writes reach the module. GPT-2's Conv1D stores (in, out)."""
        w = self.module.weight.data
        return w.t() if self.is_conv1d else w

    @property
    def shape(self) -> tuple[int, int]:
        out_features, in_features = self.weight.shape
        return int(out_features), int(in_features)

    @property
    def shape_key(self) -> str:
        return "{}x{}".format(*self.shape)

    @property
    def numel(self) -> int:
        return self.module.weight.numel()


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's repeated blocks, as (name, module), in model order."""
    blocks: list[tuple[str, nn.Module]] = []
    taken: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(t + ".") for t in taken):
            continue  # a list nested inside a block (experts, say) is part of that block
        if len({type(m) for m in module}) != 1:
            continue
        if not all(any(is_prunable_layer(m) for m in item.modules()) for item in module):
            continue
        taken.append(name)
        blocks.extend((f"{name}.{i}", item) for i, item in enumerate(module))
    return blocks


def _skipped(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def find_units(
    model: nn.Module,
    skip_modules: list[str] | tuple[str, ...] = (),
    example_inputs: dict | None = None,
) -> list[Unit]:
    """Every prunable layer inside the model's repeated blocks, in forward order.

    Args:
        model: a Hugging Face (or any) PyTorch model.
        skip_modules: glob patterns of module names never pruned.
        example_inputs: keyword inputs of one forward pass. When given, units are ordered by when the forward
            pass first calls them; otherwise by registration order (the same for the usual HF models).
    """
    units: list[Unit] = []
    for block_name, block in find_blocks(model):
        for sub_name, module in block.named_modules():
            if not is_prunable_layer(module):
                continue
            name = f"{block_name}.{sub_name}" if sub_name else block_name
            if _skipped(name, skip_modules):
                logger.debug("Skipping %s (matches skip_modules).", name)
                continue
            units.append(Unit(name=name, module=module, block=block_name))
    if not units:
        raise SPDYError(
            f"{type(model).__name__} has no prunable units: no nn.Linear or Conv1D layer inside a repeated block "
            "(an nn.ModuleList of identical layers) outside skip_modules. spdy_hf prunes transformer blocks; "
            "check the model, or narrow skip_modules."
        )
    if example_inputs is not None:
        units = _forward_order(model, units, example_inputs)
    return units


def _forward_order(model: nn.Module, units: list[Unit], example_inputs: dict) -> list[Unit]:
    order: dict[int, int] = {}
    hooks = []
    for unit in units:
        def hook(module, args):
            order.setdefault(id(module), len(order))
        hooks.append(unit.module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(**example_inputs)
    finally:
        for h in hooks:
            h.remove()
    unseen = len(order)
    return sorted(units, key=lambda u: order.get(id(u.module), unseen))
