"""OBS pruning in the SparseGPT style: second-order weight selection and reconstruction from a layer Hessian.

Pure functions of (weight, Hessian, level): no hooks, no devices, no model. For a layer y = W x with calibration
inputs X (in, n), the Hessian of the squared output error is H = 2 X X^T / n. Pruning column j of W one at a
time, the optimal update of the columns not yet processed is the OBS update through the inverse Hessian; the
Cholesky factor of H^-1 gives all of them in one pass (Frantar & Alistarh, SparseGPT, 2023; OBC, 2022).

Nested levels: each level starts from the previous level's reconstructed weights and keeps its mask, pruning
more entries only among those still alive, so every level's mask contains the previous one.
"""

from __future__ import annotations

import logging

import torch

from ..errors import NonFiniteCalibrationError

logger = logging.getLogger(__name__)


def damped_inverse_cholesky(hessian: torch.Tensor, damp: float = 0.01, max_tries: int = 8) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean|diag H| * I)^-1, in float64 math, returned as float32.

    Columns that never saw a non-zero input (diag 0) get a unit diagonal. A Hessian that is still not positive
    definite is retried with ten times the dampening, with a warning; after `max_tries`, its diagonal alone is
    used (which makes OBS selection magnitude-like per column), never a crash or NaN weights.

    Raises:
        NonFiniteCalibrationError: the Hessian holds NaN or infinity (its calibration inputs did).
    """
    if not bool(torch.isfinite(hessian).all()):
        raise NonFiniteCalibrationError()
    h = hessian.to(torch.float64).clone()  # (in, in)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    scale = float(torch.diag(h).abs().mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(max_tries):
        upper = _inverse_upper(h + damp * scale * eye)
        if upper is not None:
            return upper
        logger.warning("Hessian not positive definite with dampening %.3g; retrying with %.3g.", damp, damp * 10)
        damp *= 10
    logger.warning("Hessian not positive definite even with dampening %.3g; using its diagonal only.", damp / 10)
    return _inverse_upper(torch.diag(torch.diag(h).abs() + damp * scale))


def _inverse_upper(h: torch.Tensor) -> torch.Tensor | None:
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        return None
    upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
    if int(info) != 0 or not torch.isfinite(upper).all():
        return None
    return upper.to(torch.float32)


def obs_prune(
    weight: torch.Tensor,
    hinv_upper: torch.Tensor,
    sparsity: float = 0.0,
    keep_mask: torch.Tensor | None = None,
    prune_n: int = 0,
    prune_m: int = 0,
    blocksize: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SparseGPT pass: prunes `weight` (out, in) to `sparsity` (or N:M) and reconstructs the rest.

    Args:
        weight: (out, in) weights to start from.
        hinv_upper: (in, in) upper Cholesky factor of the damped inverse Hessian (`damped_inverse_cholesky`).
        sparsity: fraction of entries to prune, round(sparsity * numel) of them; per block of `blocksize`
            columns, its share of them with the lowest OBS saliencies w^2 / [H^-1]_jj^2 goes.
        keep_mask: (out, in) bool, True where an entry is already pruned and must stay pruned (nested levels).
        prune_n, prune_m: N:M sparsity instead (e.g. 2, 4: in every group of 4 inputs, the 2 least salient go).

    Returns:
        The pruned weights (out, in) and the pruned mask (out, in), True where a weight is zero by pruning.
    """
    w = weight.detach().to(torch.float32).clone()  # (out, in)
    n_out, n_in = w.shape
    pruned = torch.zeros_like(w, dtype=torch.bool) if keep_mask is None else keep_mask.clone()
    for i1 in range(0, n_in, blocksize):
        i2 = min(i1 + blocksize, n_in)
        w1 = w[:, i1:i2].clone()  # (out, B)
        hinv1 = hinv_upper[i1:i2, i1:i2]  # (B, B)
        err1 = torch.zeros_like(w1)
        diag = torch.diag(hinv1)  # (B,)
        mask1 = pruned[:, i1:i2].clone()
        if not prune_n:
            saliency = w1 ** 2 / diag.reshape(1, -1) ** 2
            saliency[mask1] = -1.0  # already pruned: counted first, stays pruned
            # this block's share of the layer's count, so the blocks sum to round(sparsity * numel) exactly
            count = int(round(sparsity * n_out * i2)) - int(round(sparsity * n_out * i1))
            if count > int(mask1.sum()):
                idx = torch.argsort(saliency.reshape(-1), stable=True)[:count]
                mask1.view(-1)[idx] = True
        for j in range(i2 - i1):
            col = w1[:, j]
            if prune_n and j % prune_m == 0:
                group = w1[:, j:j + prune_m] ** 2 / diag[j:j + prune_m].reshape(1, -1) ** 2  # (out, M)
                lowest = torch.topk(group, prune_n, dim=1, largest=False).indices
                mask1[:, j:j + prune_m].scatter_(1, lowest, True)
            q = col.clone()
            q[mask1[:, j]] = 0.0
            err = (col - q) / diag[j]  # (out,)
            w1[:, j:] -= err.unsqueeze(1) * hinv1[j, j:].unsqueeze(0)
            w1[:, j] = q
            err1[:, j] = err
        w[:, i1:i2] = w1
        pruned[:, i1:i2] = mask1
        w[:, i2:] -= err1 @ hinv_upper[i1:i2, i2:]  # lazy update of the later columns
    w[pruned] = 0.0
    return w, pruned


def obs_prune_levels(
    weight: torch.Tensor, hessian: torch.Tensor, sparsities: list[float], damp: float = 0.01, blocksize: int = 128,
    return_masks: bool = False,
) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Weights at every level (sparsities in increasing order; 0 is the dense weight), nested, from one Hessian.

    With `return_masks`, also the pruned mask of every level (True where pruned; all False for sparsity 0).
    """
    if any(b < a for a, b in zip(sparsities, sparsities[1:])):
        raise ValueError("Sparsities must be in increasing order.")
    hinv = damped_inverse_cholesky(hessian, damp)
    out, masks = [], []
    current = weight.detach().to(device=hessian.device, dtype=torch.float32)
    pruned = torch.zeros(current.shape, dtype=torch.bool, device=current.device)
    for sparsity in sparsities:
        if sparsity > 0:
            current, pruned = obs_prune(current, hinv, sparsity, keep_mask=pruned, blocksize=blocksize)
        out.append(current.clone())
        masks.append(pruned.clone())
    return (out, masks) if return_masks else out


def obs_prune_nm(weight: torch.Tensor, hessian: torch.Tensor, n: int = 2, m: int = 4, damp: float = 0.01,
                 blocksize: int = 128) -> torch.Tensor:
    """N:M (e.g. 2:4) pruning along the input dimension, the N of every M chosen by OBS saliency."""
    if weight.shape[1] % m or blocksize % m:
        raise ValueError(f"N:M pruning needs the input dimension ({weight.shape[1]}) and blocksize divisible by {m}.")
    hinv = damped_inverse_cholesky(hessian, damp)
    return obs_prune(weight, hinv, prune_n=n, prune_m=m, blocksize=blocksize)[0]
