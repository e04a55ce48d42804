"""Structured OBS: greedy group removal with compensation, against the norm baseline."""

from __future__ import annotations

import pytest
import torch

from spdy_hf.database.structured_obs import group_magnitude_levels, structured_obs_levels
from spdy_hf.errors import SPDYError


def layer(out_features=24, groups=8, group_size=4, samples=400, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = groups * group_size
    mixing = torch.randn(n, n, generator=gen) / n ** 0.5
    x = mixing @ torch.randn(n, samples, generator=gen)  # correlated inputs: compensation can help
    w = torch.randn(out_features, n, generator=gen)
    return w, x, 2 * x @ x.T / samples


def error(w_hat, w, x):
    return float(((w_hat - w) @ x).pow(2).sum() / (w @ x).pow(2).sum())


@pytest.mark.parametrize("group_size", [1, 4])
def test_structured_obs_beats_the_norm_baseline_and_is_nested(group_size):
    w, x, h = layer(groups=32 // group_size, group_size=group_size)
    groups = w.shape[1] // group_size
    keep = [groups, 3 * groups // 4, groups // 2, groups // 4, 1, 0]
    obs = structured_obs_levels(w, h, group_size, keep)
    base = group_magnitude_levels(w, group_size, keep)
    previous = set(range(groups))
    for k, (kept, w_obs), (_, w_base) in zip(keep, obs, base):
        assert len(kept) == k and set(kept) <= previous  # nested: removed groups stay removed
        previous = set(kept)
        removed_cols = [c for g in range(groups) if g not in kept for c in range(g * group_size, (g + 1) * group_size)]
        assert (w_obs[:, removed_cols] == 0).all() and torch.isfinite(w_obs).all()
        if 0 < k < groups:
            assert error(w_obs, w, x) < error(w_base, w, x)
    torch.testing.assert_close(obs[0][1], w)  # all kept: the dense weight
    assert (obs[-1][1] == 0).all()


def test_compensation_helps_over_removal_alone():
    w, x, h = layer()
    kept, w_obs = structured_obs_levels(w, h, 4, [4])[0]
    cols = torch.cat([torch.arange(g * 4, g * 4 + 4) for g in kept])
    w_cut = torch.zeros_like(w)
    w_cut[:, cols] = w[:, cols]  # the same groups, no update of the rest
    assert error(w_obs, w, x) < error(w_cut, w, x)


def test_bad_group_sizes():
    w, _, h = layer()
    with pytest.raises(SPDYError, match="groups of 5"):
        structured_obs_levels(w, h, 5, [1])
    with pytest.raises(SPDYError, match="Keep counts"):
        structured_obs_levels(w, h, 4, [9])


def test_partial_compensation_scales_the_update_and_keeps_the_choice():
    w, x, h = layer()
    full = structured_obs_levels(w, h, 4, [5, 2])
    none = structured_obs_levels(w, h, 4, [5, 2], compensation=0.0)
    half = structured_obs_levels(w, h, 4, [5, 2], compensation=0.5)
    for (kept, w_full), (kept0, w_none), (kept5, w_half) in zip(full, none, half):
        assert kept == kept0 == kept5  # the groups removed do not depend on how much the rest is updated
        cols = torch.cat([torch.arange(g * 4, g * 4 + 4) for g in kept])
        torch.testing.assert_close(w_none[:, cols], w[:, cols])  # no update: the kept weights as they were
        torch.testing.assert_close(w_half, (w_full + w_none) / 2)
        assert error(w_full, w, x) < error(w_half, w, x) < error(w_none, w, x)  # on the text they were fitted to


def test_a_free_bias_takes_the_removed_groups_mean_and_the_errors_say_so():
    """Inputs far from zero mean: with the bias free, each level keeps the dense output's mean on the calibration
    inputs and fits what is left better than OBS on X X^T alone; the errors the database records are the output
    errors the levels really make."""
    from spdy_hf.database.obs_database import relative_output_errors
    from spdy_hf.database.structured_obs import bias_shifts, centered_hessian

    w, x, _ = layer(samples=800)
    gen = torch.Generator().manual_seed(1)
    x = x + 3.0 * torch.randn(x.shape[0], 1, generator=gen)  # every input has its own offset
    h, mean = 2 * x @ x.T / x.shape[1], x.mean(dim=1)
    keep = [8, 6, 4, 2, 0]
    plain = structured_obs_levels(w, h, 4, keep)
    fitted = structured_obs_levels(w, h, 4, keep, mean=mean)
    shifts = bias_shifts(w, [wk for _, wk in fitted], mean)
    torch.testing.assert_close(shifts[0], torch.zeros(w.shape[0]))  # nothing removed: the bias stays
    dense_out = w @ x
    recorded = relative_output_errors([wk for _, wk in fitted], h, centered_hessian(h, mean))
    for k, (_, w_plain), (_, w_fit), shift, err in zip(keep, plain, fitted, shifts, recorded):
        out = w_fit @ x + shift[:, None]
        torch.testing.assert_close(out.mean(dim=1), dense_out.mean(dim=1), rtol=1e-4, atol=1e-3)
        measured = float((out - dense_out).pow(2).sum() / dense_out.pow(2).sum())
        assert float(err) == pytest.approx(measured, rel=1e-3, abs=1e-6)
        if 0 < k < 8:
            assert measured < error(w_plain, w, x)
