"""Putting a profile into a model: stitch pruned weights in place, and swap in fast sparse modules.

The checkpoint a user saves is always the dense model with zeros (loads anywhere). For speed on the CPU
backend, each unit is replaced by a `FastLinear`: a `torch.sparse` CSR product where the unit is sparse.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.units import Unit


@dataclass(frozen=True)
class UnitLayout:
    """How a unit meets memory layouts in the deployed model (found by `spdy_hf.latency.cpu.plan_layouts`).

    code: two characters, input then output. Input "c": row-major; "t": its transpose is contiguous (handed on
        by a producer, or shared by a leader); "s": row-major, and this unit leads a group of units reading the
        same tensor: it transposes it once for all of them. Output "t": a producer; "c": row-major.
    leader: for a unit that reads its leader's transposed input, the leader's unit index.
    """

    code: str = "cc"
    leader: int | None = None


class SharedInput:
    """The transposed input a group leader computed, for the followers reading the same tensor."""

    def __init__(self):
        self.source: torch.Tensor | None = None
        self.transposed: torch.Tensor | None = None

    def get(self, x: torch.Tensor) -> torch.Tensor | None:
        return self.transposed if x is self.source else None


class FastLinear(nn.Module):
    """A unit in its deployed form: dense, or a `torch.sparse` CSR product (MKL on CPU, float32).

    The sparse product is computed as `(W x^T)^T` with `torch.addmm(b, W_csr, x^T)`, which yields (out, tokens)
    and runs several times faster when x^T is contiguous. Layouts are fixed per unit by its `UnitLayout`,
    whatever the unit's level, so the time of the rest of the model does not depend on the levels chosen and
    the latency table stays additive:

    - a producer (a unit whose output reaches another unit through element-wise ops, like an FFN's up
      projection) returns the (tokens, out) view of the product without copying, dense or sparse: its consumer
      receives an input whose transpose is contiguous;
    - a group leader (first of the units reading one tensor, like attention's query of query/key/value)
      transposes that tensor once and shares the copy with the others;
    - every other output is made row-major, which attention kernels and LayerNorm need to stay fast; a dense
      unit with a row-major output is just `F.linear`.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, sparse: bool,
                 layout: UnitLayout = UnitLayout(), shared: SharedInput | None = None):
        """`weight` is (out, in), dense or already CSR; a sparse unit keeps a CSR copy, a dense one the tensor."""
        super().__init__()
        self.out_features, self.in_features = weight.shape  # weight: (out, in)
        self.sparse = sparse
        self.layout = layout
        self.shared = shared if shared is not None else SharedInput()
        weight = weight.detach()
        if sparse and weight.layout == torch.sparse_csr:
            self.weight_kernel = weight
        elif sparse:
            with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state": known, and no action
                warnings.simplefilter("ignore", UserWarning)
                self.weight_kernel = weight.to_sparse_csr()
        else:
            self.weight_kernel = weight.contiguous()
        self.bias = None if bias is None else bias.detach()

    @property
    def nnz(self) -> int:
        w = self.weight_kernel
        return int(w.values().numel()) if self.sparse else int(torch.count_nonzero(w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xt = None
        if self.layout.code[0] == "s":
            xt = x.reshape(-1, self.in_features).t().contiguous()  # (in, tokens)
            self.shared.source, self.shared.transposed = x, xt
        elif self.layout.leader is not None:
            xt = self.shared.get(x)
        transposed_output = self.layout.code[1] == "t"
        if not self.sparse and not transposed_output:
            return F.linear(x, self.weight_kernel, self.bias)
        x2 = xt if xt is not None else x.reshape(-1, self.in_features).t()  # (in, tokens)
        if self.bias is None:
            y = torch.mm(self.weight_kernel, x2)  # (out, tokens)
        else:
            y = torch.addmm(self.bias.unsqueeze(1), self.weight_kernel, x2)
        y = y.t() if transposed_output else y.t().contiguous()  # (tokens, out)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        density = self.nnz / (self.out_features * self.in_features)
        kind = "csr" if self.sparse else "dense"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {kind}, density={density:.4f}, "
                f"layout={self.layout.code}")


def _parent_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def deployed_modules(units: list[Unit], sparsities: list[float], layouts: list[UnitLayout] | None = None,
                     weights: list[torch.Tensor | None] | None = None) -> list[FastLinear]:
    """A `FastLinear` per unit (CSR where sparsity > 0); followers share their leader's transposed input.

    Built from each unit's current weight, or from `weights[i]` where given (timing uses random masks).
    """
    layouts = layouts or [UnitLayout()] * len(units)
    weights = weights or [None] * len(units)
    shared = [SharedInput() for _ in units]
    return [
        FastLinear(unit.weight if w is None else w, unit.module.bias, sparsity > 0, layout,
                   shared[layout.leader if layout.leader is not None else i])
        for i, (unit, sparsity, layout, w) in enumerate(zip(units, sparsities, layouts, weights))
    ]


class ModuleSwap:
    """Toggles units between their original modules and deployed ones (None: the unit is left as it is).

    Swapping is a `setattr` per unit, so original and deployed runs can be interleaved cheaply when timing.
    """

    def __init__(self, model: nn.Module, units: list[Unit], deployed: list[nn.Module | None]):
        self.slots = []  # (parent, attribute, original module, deployed module)
        for unit, module in zip(units, deployed):
            if module is not None:
                parent, attr = _parent_and_attr(model, unit.name)
                self.slots.append((parent, attr, unit.module, module))

    def use_deployed(self) -> None:
        for parent, attr, _, deployed in self.slots:
            setattr(parent, attr, deployed)

    def use_original(self) -> None:
        for parent, attr, original, _ in self.slots:
            setattr(parent, attr, original)


class KernelSwap(ModuleSwap):
    """Toggles every unit between its original module and a `FastLinear` built once from its current weight.

    Dense `FastLinear`s share the unit's live weight (no copy of the model); CSR ones hold a snapshot.
    """

    def __init__(self, model: nn.Module, units: list[Unit], sparsities: list[float],
                 layouts: list[UnitLayout] | None = None, weights: list[torch.Tensor | None] | None = None):
        super().__init__(model, units, deployed_modules(units, sparsities, layouts, weights))


@contextlib.contextmanager
def deployed_kernels(model: nn.Module, units: list[Unit], sparsities: list[float],
                     layouts: list[UnitLayout] | None = None) -> Iterator[nn.Module]:
    """Within the block, the units run as `FastLinear`s (CSR where sparsity > 0) built from their weights."""
    swap = KernelSwap(model, units, sparsities, layouts)
    swap.use_deployed()
    try:
        yield model
    finally:
        swap.use_original()


def apply_sparse_kernels(model: nn.Module, units: list[Unit], sparsities: list[float],
                         layouts: list[UnitLayout] | None = None) -> nn.Module:
    """Permanently swaps the units for `FastLinear`s (CSR where sparsity > 0), for inference; not saveable."""
    KernelSwap(model, units, sparsities, layouts).use_deployed()
    return model
