"""Structured groups: attention heads and FFN neurons, found per block, removed by zero-filling or shrinking.

A `StructuredGroup` is one block's attention (groups: heads, or key/value groups under grouped-query attention)
or FFN (groups: neurons). Its *producers* (query/key/value; up and gate) carry the groups in their output
features, its *consumer* (the output projection; down) in its input features. Removing a group zeroes, or cuts
out, the producer rows and the consumer columns of that group:

- `zero_fill` keeps every shape: the model stays a plain checkpoint that any `from_pretrained` loads, and a
  removed group contributes exactly nothing (its consumer columns are zero);
- `shrink` builds smaller dense modules, so the speedup is real with any dense kernel; its outputs equal the
  zero-filled model's.

Found for BERT, GPT-2 (fused `c_attn`), OPT, Llama-family models (Llama 2 and 3, Qwen2, Mistral, Gemma 2;
grouped-query attention: a group is one key/value head with its query heads) and Phi-3 (fused `qkv_proj` and
`gate_up_proj`). Keeping no group removes the whole attention or FFN of a block: shrinking then puts a
`RemovedAttention` in place of the attention (it returns the output projection's bias, or a zero-width tensor where
the projection sits outside it, as in BERT) and zero-width `nn.Linear`s in the FFN.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import SPDYError
from .units import conv1d_classes, find_blocks

logger = logging.getLogger(__name__)

# per family: (attention parent, producers, consumer) and (ffn producers, consumer), relative to the block
_ATTENTION = [
    ("attention.self", ["attention.self.query", "attention.self.key", "attention.self.value"],
     "attention.output.dense"),  # BERT
    ("self_attn", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "self_attn.o_proj"),  # Llama
    ("self_attn", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "self_attn.out_proj"),  # OPT
    ("attn", ["attn.c_attn"], "attn.c_proj"),  # GPT-2 (fused q, k, v)
    ("self_attn", ["self_attn.qkv_proj"], "self_attn.o_proj"),  # Phi-3 (fused q, k, v; grouped-query)
]
_FFN = [
    (["intermediate.dense"], "output.dense"),  # BERT
    (["mlp.gate_proj", "mlp.up_proj"], "mlp.down_proj"),  # Llama
    (["fc1"], "fc2"),  # OPT
    (["mlp.c_fc"], "mlp.c_proj"),  # GPT-2
    (["mlp.gate_up_proj"], "mlp.down_proj"),  # Phi-3 (fused gate and up)
]


# an attention module's attributes that a shrink sets: head counts, widths of all heads, key/value head count
HEAD_COUNTS = ("num_heads", "num_attention_heads")
HEAD_WIDTHS = ("all_head_size", "split_size")
HEAD_ATTRIBUTES = (*HEAD_COUNTS, *HEAD_WIDTHS, "num_key_value_heads")


@dataclass
class StructuredGroup:
    kind: str  # "attention" or "ffn"
    block: str
    producers: list[str]  # full module names
    consumer: str
    num_groups: int
    group_size: int  # consumer input features per group
    producer_rows: dict[str, int] = field(default_factory=dict)  # producer output features per group
    # a fused producer's parts, one after another in its output features and each laid out group by group: the
    # rows per group of each part (GPT-2's c_attn: q, k, v of one head each; Phi-3's qkv_proj under grouped-query
    # attention: the query heads of one key/value group, then its key, then its value; gate_up_proj: 1, 1)
    fused_rows: dict[str, tuple[int, ...]] = field(default_factory=dict)
    parent: str | None = None  # the attention module whose head counts follow a shrink

    def consumer_columns(self, kept: list[int]) -> torch.Tensor:
        return _expand(kept, self.group_size)

    def producer_parts(self, name: str) -> list[tuple[int, int]]:
        """(first output feature, rows per group) of each part of producer `name`: one part unless it is fused."""
        parts, start = [], 0
        for rows in self.fused_rows.get(name, (self.producer_rows[name],)):
            parts.append((start, rows))
            start += self.num_groups * rows
        return parts

    def producer_indices(self, name: str, kept: list[int]) -> torch.Tensor:
        return torch.cat([start + _expand(kept, rows) for start, rows in self.producer_parts(name)])


def _expand(kept: list[int], size: int) -> torch.Tensor:
    kept = sorted(int(g) for g in kept)
    if not kept:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(g * size, (g + 1) * size) for g in kept])


def _out_features(module: nn.Module) -> int:
    return module.weight.shape[1] if isinstance(module, conv1d_classes()) else module.weight.shape[0]


def _in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if isinstance(module, conv1d_classes()) else module.weight.shape[1]


def _attention_group(block: str, producers: list[str], consumer: str, parent: str, modules: dict[str, nn.Module],
                     heads: int, kv_heads: int) -> StructuredGroup:
    """A block's attention group: one per head, or per key/value head with its query heads under grouped-query
    attention. A single producer holds q, k and v fused, q first (GPT-2: as many key/value heads as query heads)."""
    head_dim = _in_features(modules[consumer]) // heads  # the output projection reads every query head
    per_group = heads // kv_heads  # query heads per key/value head
    if len(producers) == 1:
        groups = (_out_features(modules[producers[0]]) - heads * head_dim) // (2 * head_dim)  # key/value heads
        rows = (heads // groups * head_dim, head_dim, head_dim)
        return StructuredGroup(kind="attention", block=block, producers=producers, consumer=consumer,
                               num_groups=groups, group_size=rows[0], producer_rows={producers[0]: rows[0]},
                               fused_rows={producers[0]: rows}, parent=parent)
    rows = {producers[0]: per_group * head_dim, **{n: head_dim for n in producers[1:]}}
    return StructuredGroup(kind="attention", block=block, producers=producers, consumer=consumer,
                           num_groups=kv_heads, group_size=per_group * head_dim, producer_rows=rows, parent=parent)


def find_structured_groups(model: nn.Module) -> list[StructuredGroup]:
    """The attention and FFN group of every block that has them, in model order."""
    cfg = getattr(model, "config", None)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    modules = dict(model.named_modules())
    groups: list[StructuredGroup] = []
    for block_name, _ in find_blocks(model):
        for parent, producers, consumer in _ATTENTION:
            names = [f"{block_name}.{p}" for p in producers]
            if all(n in modules for n in names) and f"{block_name}.{consumer}" in modules and heads:
                groups.append(_attention_group(block_name, names, f"{block_name}.{consumer}",
                                               f"{block_name}.{parent}", modules, heads, kv_heads))
                break
        for producers, consumer in _FFN:
            names = [f"{block_name}.{p}" for p in producers]
            if all(n in modules for n in names) and f"{block_name}.{consumer}" in modules:
                neurons = _in_features(modules[f"{block_name}.{consumer}"])
                fused = {names[0]: (1,) * (_out_features(modules[names[0]]) // neurons)} if len(names) == 1 else {}
                groups.append(StructuredGroup(kind="ffn", block=block_name, producers=names,
                                              consumer=f"{block_name}.{consumer}", num_groups=neurons, group_size=1,
                                              producer_rows={n: 1 for n in names}, fused_rows=fused))
                break
    if not groups:
        raise SPDYError(f"Found no attention or FFN groups in {type(model).__name__}; structured levels support "
                        "BERT, GPT-2, OPT, Llama-family (Llama, Qwen2, Mistral, Gemma 2) and Phi-3 models.")
    return groups


def group_name(group: StructuredGroup) -> str:
    """How reports, tables and saved models name a group: "<block>:attention" or "<block>:ffn"."""
    return f"{group.block}:{group.kind}"


def rows_view(module: nn.Module) -> tuple[torch.Tensor, bool]:
    """The weight as (out, in) and whether it is a Conv1D (stored (in, out))."""
    conv = isinstance(module, conv1d_classes())
    return (module.weight.T if conv else module.weight), conv


@torch.no_grad()
def zero_fill(model: nn.Module, group: StructuredGroup, kept: list[int], modules: dict | None = None) -> None:
    """Zeroes the removed groups' producer rows (and biases) and consumer columns; shapes stay. `modules`: the
    model's named modules, if the caller has them."""
    modules = dict(model.named_modules()) if modules is None else modules
    keep = set(kept)
    removed = [g for g in range(group.num_groups) if g not in keep]
    for name in group.producers:
        w, _ = rows_view(modules[name])
        idx = group.producer_indices(name, removed)
        w[idx] = 0
        bias = getattr(modules[name], "bias", None)
        if bias is not None:
            bias[idx] = 0
    w, _ = rows_view(modules[group.consumer])
    w[:, group.consumer_columns(removed)] = 0


def _new_module(template: nn.Module, weight_out_in: torch.Tensor, bias: torch.Tensor | None,
                share: bool = False) -> nn.Module:
    """A Linear (or Conv1D, like `template`) holding the weight; `share`: without copying what needs no copy."""
    out_features, in_features = weight_out_in.shape
    take = (lambda t: t) if share else (lambda t: t.clone())
    # GPT-2's Conv1D reshapes with -1, which a zero-width input cannot take: zero-width modules are nn.Linear
    if isinstance(template, conv1d_classes()) and out_features and in_features:
        module = conv1d_classes()[0](out_features, in_features)
        module.weight = nn.Parameter(take(weight_out_in.T.contiguous()))
        module.bias = nn.Parameter(take(bias)) if bias is not None else None
    else:
        with warnings.catch_warnings():  # "Initializing zero-element tensors is a no-op": the weight is replaced
            warnings.simplefilter("ignore", UserWarning)
            module = nn.Linear(in_features, out_features, bias=bias is not None)
        module.weight = nn.Parameter(take(weight_out_in.contiguous()))
        if bias is not None:
            module.bias = nn.Parameter(take(bias))
    return module.to(device=weight_out_in.device, dtype=weight_out_in.dtype)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Puts `module` at `name` in `model` (a dotted path), in place of what was there."""
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


class RemovedAttention(nn.Module):
    """Stands in for an attention module whose every head was removed. Where the output projection is inside the
    module (GPT-2, OPT, Llama), the output is that projection's bias (zeros without one); where it is outside
    (BERT), a zero-width context, which the shrunken projection maps to its bias. Returns (output, None) like the
    attention modules of transformers."""

    def __init__(self, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.out_features = out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        shape = (*hidden_states.shape[:-1], self.out_features)
        out = hidden_states.new_zeros(shape)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out, None

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, removed"


def _remove_attention(model: nn.Module, group: StructuredGroup) -> None:
    modules = dict(model.named_modules())
    consumer = modules[group.consumer]
    inside = group.consumer.startswith(group.parent + ".")
    if inside:
        set_module(model, group.parent, RemovedAttention(_out_features(consumer), getattr(consumer, "bias", None)))
        return
    set_module(model, group.parent, RemovedAttention(0, None))
    w, _ = rows_view(consumer)
    set_module(model, group.consumer, _new_module(consumer, w[:, :0], getattr(consumer, "bias", None)))


def _rows(t: torch.Tensor, idx: torch.Tensor, share: bool) -> torch.Tensor:
    """t[idx] (rows), as a view where the rows are a contiguous range and `share` allows it."""
    if share and len(idx) and bool((idx == torch.arange(int(idx[0]), int(idx[0]) + len(idx))).all()):
        return t.narrow(0, int(idx[0]), len(idx))
    return t[idx.to(t.device)]


@torch.no_grad()
def shrink(model: nn.Module, group: StructuredGroup, kept: list[int], share: bool = False) -> None:
    """Replaces the group's producers and consumer by smaller dense modules holding only the kept groups, and
    updates the attention module's head counts. Keeping none removes the block's whole attention or FFN.

    `share`: the producers' kept rows stay views of the original weights where they are a contiguous range (for
    timing shrunk forms on the live model, `spdy_hf.modeling.swap`; not for saving)."""
    kept = sorted(set(int(g) for g in kept))
    if kept and (kept[-1] >= group.num_groups or kept[0] < 0):
        raise SPDYError(f"Group indices must be in [0, {group.num_groups}).")
    if not kept and group.kind == "attention":
        if group.parent is None:
            raise SPDYError(f"Cannot remove the attention of {group.block}: its attention module is unknown.")
        _remove_attention(model, group)
        return
    modules = dict(model.named_modules())
    for name in group.producers:
        module = modules[name]
        w, _ = rows_view(module)
        idx = group.producer_indices(name, kept)
        bias = getattr(module, "bias", None)
        set_module(model, name, _new_module(module, _rows(w, idx, share), None if bias is None else _rows(bias, idx, share),
                                      share))
    consumer = modules[group.consumer]
    w, _ = rows_view(consumer)
    cols = group.consumer_columns(kept).to(w.device)
    set_module(model, group.consumer, _new_module(consumer, w[:, cols], getattr(consumer, "bias", None), share))
    if group.kind == "attention" and group.parent is not None:
        attn = model.get_submodule(group.parent)
        heads = len(kept) * (group.group_size // _head_dim(attn, group))
        for attr in HEAD_COUNTS:
            if isinstance(getattr(attn, attr, None), int):
                setattr(attn, attr, heads)
        for attr in HEAD_WIDTHS:
            if isinstance(getattr(attn, attr, None), int):
                setattr(attn, attr, heads * _head_dim(attn, group))
        if isinstance(getattr(attn, "num_key_value_heads", None), int):
            attn.num_key_value_heads = len(kept)
        if _reads_config_heads(attn):  # a module of its own width needs a config of its own
            attn.config = copy.copy(attn.config)
            attn.config.num_attention_heads = heads
            if getattr(attn.config, "num_key_value_heads", None) is not None:
                attn.config.num_key_value_heads = len(kept)


@functools.cache
def _reads_config_source(cls: type) -> bool:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "config.num_attention_heads" in source or "config.num_key_value_heads" in source


def _reads_config_heads(attn: nn.Module) -> bool:
    """Whether the attention module's forward pass reads its head counts from the model's config rather than from
    attributes of its own (Phi-3 splits its fused q, k, v at `config.num_attention_heads`)."""
    return getattr(attn, "config", None) is not None and _reads_config_source(type(attn))


def _head_dim(attn: nn.Module, group: StructuredGroup) -> int:
    for attr in ("head_dim", "attention_head_size"):
        value = getattr(attn, attr, None)
        if isinstance(value, int):
            return value
    return group.group_size
