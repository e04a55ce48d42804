"""The 2:4 kernel of NVIDIA GPUs: a 2:4 weight as a semi-structured tensor (`torch.sparse.to_sparse_semi_structured`,
cuSPARSELt by default, CUTLASS when `SparseSemiStructuredTensor._FORCE_CUTLASS` is set), run as
`F.linear(x, W_sparse)`; which shapes and dtypes it takes; and the swap that puts it into a model and takes it out.
The cuda backend's latency table (`spdy_hf.latency.cuda`) times it; verify, `to_sparse_kernels` and
`load_pretrained` run it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SPDYError
from ..modeling.patterns import is_two_four, two_four_magnitude_mask
from ..modeling.units import Unit
from .kernels import ModuleSwap

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# (rows, cols) each weight dimension must reach and be a multiple of, per kernel and dtype (torch 2.13's
# SparseSemiStructuredTensor{CUSPARSELT,CUTLASS}._DTYPE_SHAPE_CONSTRAINTS, sparse_min_rows/cols)
SEMI_STRUCTURED_MIN_SHAPE = {
    "cusparselt": {"float16": (16, 16), "bfloat16": (16, 16), "int8": (32, 32)},
    "cutlass": {"float16": (32, 64), "bfloat16": (32, 64), "int8": (16, 128), "float32": (32, 32)},
}


def two_four_ineligibility(shape: tuple[int, int], dtype: str, kernel: str = "cusparselt") -> str | None:
    """Why a weight of `shape` (out, in) and `dtype` cannot run as 2:4 with `kernel`; None if it can."""
    limits = SEMI_STRUCTURED_MIN_SHAPE.get(kernel)
    if limits is None:
        raise SPDYError(f"Unknown semi-structured kernel {kernel!r}; use 'cusparselt' or 'cutlass'.")
    if dtype not in limits:
        return f"{kernel} 2:4 takes {', '.join(limits)}, not {dtype}"
    rows, cols = limits[dtype]
    out_features, in_features = shape
    if out_features < rows or out_features % rows or in_features < cols or in_features % cols:
        return (f"{kernel} 2:4 in {dtype} needs both dimensions to be at least and a multiple of {rows} x {cols}; "
                f"the weight is {out_features} x {in_features}")
    return None


def to_two_four(weight: torch.Tensor) -> torch.Tensor:
    """The semi-structured form of a 2:4 weight; refuses a weight that breaks the pattern (the CUTLASS path would
    silently drop the extra non-zeros)."""
    from torch.sparse import to_sparse_semi_structured

    if not is_two_four(weight):
        raise SPDYError("A weight is not 2:4 sparse (some group of 4 inputs holds more than 2 non-zeros); prune it "
                        "with a 2:4 level before converting.")
    return to_sparse_semi_structured(weight.contiguous())


class TwoFourLinear(nn.Module):
    """A Linear whose weight runs as a 2:4 semi-structured tensor (CUDA, fp16/bf16)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(to_two_four(weight), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, sparsity=2:4"


class TwoFourSwap(ModuleSwap):
    """Swaps the units whose pattern is "2:4" for `TwoFourLinear`s built from their (2:4) weights, and back.

    With `masked`, each is built from a 2:4 magnitude-masked copy of the unit's weight instead (timing a profile on
    the dense model: the kernel's speed does not depend on which weights it keeps); each masked dense copy is freed
    once converted, so only the compressed 2:4 forms are held.
    """

    def __init__(self, model: nn.Module, units: list[Unit], patterns: list[str], masked: bool = False):
        def deployed(unit: Unit) -> TwoFourLinear:
            weight = unit.weight.detach()
            if masked:
                weight = weight.masked_fill(two_four_magnitude_mask(weight), 0)
            return TwoFourLinear(weight.contiguous(), getattr(unit.module, "bias", None))

        super().__init__(model, units, [deployed(u) if p == "2:4" else None for u, p in zip(units, patterns)])
