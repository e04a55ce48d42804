"""Sparsity patterns beyond unstructured: 2:4 (2 of every 4 consecutive inputs of a row are zero)."""

from __future__ import annotations

import torch

from ..errors import SPDYError


def is_two_four(weight: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive inputs of every output row holds at most 2 non-zeros."""
    out_features, in_features = weight.shape
    if in_features % 4:
        return False
    return bool(((weight.reshape(out_features, in_features // 4, 4) != 0).sum(-1) <= 2).all())


def two_four_magnitude_mask(weight: torch.Tensor) -> torch.Tensor:
    """(out, in) bool, True where pruned: the 2 smallest |w| of every group of 4 consecutive inputs."""
    out_features, in_features = weight.shape
    if in_features % 4:
        raise SPDYError(f"2:4 needs the input dimension to be a multiple of 4, got {in_features}.")
    groups = weight.detach().abs().reshape(out_features, in_features // 4, 4)
    lowest = torch.topk(groups, 2, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, lowest, True)
    return mask.reshape(out_features, in_features)
