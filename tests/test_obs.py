"""The OBS (SparseGPT-style) solver: a pure function of weight, Hessian and level."""

from __future__ import annotations

import pytest
import torch

from spdy_hf.database.obs import damped_inverse_cholesky, obs_prune_levels, obs_prune_nm
from spdy_hf.modeling.levels import spdy_grid


def correlated_layer(out_features=48, in_features=64, samples=512, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(in_features, in_features, generator=gen) / in_features ** 0.5
    x = mixing @ torch.randn(in_features, samples, generator=gen) + 0.3 * torch.randn(in_features, 1, generator=gen)
    weight = torch.randn(out_features, in_features, generator=gen)
    hessian = 2 * x @ x.T / samples  # (in, in)
    return weight, x, hessian


def output_error(w_hat, weight, x):
    return float(((w_hat - weight) @ x).pow(2).sum() / (weight @ x).pow(2).sum())


def magnitude(weight, sparsity):
    w = weight.clone()
    n = int(round(sparsity * w.numel()))
    w.view(-1)[torch.argsort(w.abs().reshape(-1))[:n]] = 0.0
    return w


def test_obs_beats_magnitude_at_every_level():
    weight, x, hessian = correlated_layer()
    levels = [0.0] + spdy_grid()[::4]
    pruned = obs_prune_levels(weight, hessian, levels, blocksize=16)
    assert torch.equal(pruned[0], weight)
    for sparsity, w_hat in zip(levels[1:], pruned[1:]):
        assert int((w_hat == 0).sum()) == pytest.approx(sparsity * weight.numel(), abs=len(range(0, 64, 16)))
        assert output_error(w_hat, weight, x) < output_error(magnitude(weight, sparsity), weight, x), sparsity


def test_levels_are_nested_and_finite():
    weight, _, hessian = correlated_layer(seed=1)
    pruned = obs_prune_levels(weight, hessian, [0.0, 0.4, 0.6, 0.9, 0.99], blocksize=32)
    for lower, higher in zip(pruned, pruned[1:]):
        assert torch.all((lower == 0) <= (higher == 0))  # every zero of a level stays zero at the next
        assert torch.isfinite(higher).all()


def test_two_four_pattern():
    weight, x, hessian = correlated_layer(seed=2)
    w_hat = obs_prune_nm(weight, hessian, 2, 4, blocksize=32)
    groups = (w_hat != 0).reshape(weight.shape[0], -1, 4).sum(dim=2)
    assert int(groups.max()) <= 2
    assert int((w_hat == 0).sum()) == weight.numel() // 2
    # OBS chooses and reconstructs better than keeping the 2 largest magnitudes of every 4
    top2 = weight.abs().reshape(weight.shape[0], -1, 4).topk(2, dim=2).indices
    mag = torch.zeros_like(weight).reshape(weight.shape[0], -1, 4)
    mag.scatter_(2, top2, weight.reshape(weight.shape[0], -1, 4).gather(2, top2))
    assert output_error(w_hat, weight, x) < output_error(mag.reshape_as(weight), weight, x)


def test_singular_hessian_gets_more_dampening_not_nan(caplog):
    weight, _, _ = correlated_layer(seed=3)
    x = torch.randn(64, 8)  # rank 8: singular, and one dead input
    x[5] = 0.0
    hessian = 2 * x @ x.T / 8
    hessian[0, 0] = -5.0  # not positive semi-definite at all
    pruned = obs_prune_levels(weight, hessian, [0.5, 0.9], damp=1e-12, blocksize=16)
    assert all(torch.isfinite(w).all() for w in pruned)
    assert "not positive definite" in caplog.text
    assert torch.isfinite(damped_inverse_cholesky(hessian, 0.01)).all()


def test_bad_inputs():
    weight, _, hessian = correlated_layer()
    with pytest.raises(ValueError, match="increasing"):
        obs_prune_levels(weight, hessian, [0.5, 0.4])
    with pytest.raises(ValueError, match="divisible"):
        obs_prune_nm(weight[:, :62], hessian[:62, :62], 2, 4)
