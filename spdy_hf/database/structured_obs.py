"""Structured OBS: which attention heads or FFN neurons to remove, and how to compensate.

For a group's consumer (the output projection of an attention, the down projection of an FFN), y = W x with
calibration Hessian H = 2 X X^T / n over its inputs, removing the input columns S of one group and updating the
remaining columns optimally costs (Optimal Brain Surgeon for a block of weights; ZipLM and OBC apply it to heads
and neurons)

    E(S) = tr( W[:, S] ((H^-1)[S, S])^-1 W[:, S]^T ),    dW = -W[:, S] ((H^-1)[S, S])^-1 (H^-1)[S, :],

and H^-1 of the remaining inputs follows by the same block elimination.

The consumer's bias can absorb what the removed groups gave on average. For any new weight W', the bias that fits
best is b' = b + (W - W') mu, with mu the mean input; what is left to fit is (W - W') (X - mu 1^T), so with the bias
free the same elimination runs on the inputs' covariance, H - 2 mu mu^T, instead of H (`mean`). A head whose output
hardly varies (one that attends to the first token whatever the text) then costs almost nothing to remove: its
constant part moves into the bias, where OBS on H could only spread it over the kept heads. FLAP (An et al., 2024)
keeps the removed channels' mean as a bias; here the mean is fitted jointly with the compensation.

Groups are removed greedily, cheapest first, so the levels are nested: the groups removed at one level stay removed at every sparser one. The
producers (query/key/value, up/gate) only lose the removed groups' rows; they need no compensation.

A pure function of (weight, Hessian, group size, levels): no hooks, no model.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..errors import SPDYError
from .obs import damped_inverse_cholesky


def _damped_inverse(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    upper = damped_inverse_cholesky(hessian, damp).to(torch.float64)  # H^-1 = U^T U
    return upper.T @ upper


def structured_obs_levels(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, keep_counts: list[int],
                          damp: float = 0.01, compensation: float = 1.0, mean: torch.Tensor | None = None
                          ) -> list[tuple[list[int], torch.Tensor]]:
    """For each number of groups to keep (any order), the kept group indices and the compensated (out, in) consumer
    weight (removed columns zero).

    `compensation` scales the update dW that the kept columns receive (1: OBS's, fitted to the calibration inputs;
    0: none, the kept weights as they were); the groups removed, and their order, do not depend on it.

    Args:
        weight: the consumer's (out, in) weight; in = num_groups * group_size.
        hessian: (in, in) Hessian of the consumer's inputs on the calibration set.
        group_size: input columns per group (head_dim, or head_dim * query heads per key/value head; 1 for neurons).
        mean: the consumer's mean input (in,): the levels are fitted with the bias free (`bias_shifts` gives each
            level's new bias); None: without.
    """
    out_features, in_features = weight.shape
    if group_size < 1 or in_features % group_size:
        raise SPDYError(f"The consumer's {in_features} inputs do not split into groups of {group_size}.")
    num_groups = in_features // group_size
    if any(not 0 <= k <= num_groups for k in keep_counts):
        raise SPDYError(f"Keep counts must be in [0, {num_groups}].")
    w_full = weight.detach().to(torch.float64)
    hinv = _damped_inverse(hessian if mean is None else centered_hessian(hessian, mean), damp)
    results: dict[int, tuple[list[int], torch.Tensor]] = {}
    wanted = set(keep_counts)
    if num_groups in wanted:
        results[num_groups] = (list(range(num_groups)), w_full.to(torch.float32).clone())
    last = min((k for k in wanted if k > 0), default=num_groups)  # keeping none needs no elimination
    stops = {k for k in wanted if last <= k < num_groups}
    eliminate = _eliminate_columns if group_size == 1 else _eliminate_groups
    for held, w in eliminate(w_full.clone(), hinv, group_size, stops, last):
        full = torch.zeros_like(w_full, dtype=torch.float32)
        cols = cols_of(held, group_size)
        kept_w = w if compensation == 1.0 else w_full[:, cols] + compensation * (w - w_full[:, cols])
        full[:, cols] = kept_w.to(torch.float32)
        results[len(held)] = (list(held), full)
    if 0 in wanted and 0 not in results:
        results[0] = ([], torch.zeros_like(weight, dtype=torch.float32))
    return [results[k] for k in keep_counts]


# Both eliminations keep only the columns of the groups still held (`w` is (out, held * s), `hinv` (held * s,
# held * s)): eliminating a group leaves zeros in its rows and columns of H^-1, so dropping them changes nothing for
# the others, and the work shrinks with the layer (an FFN pruned down to its last levels costs a third of full-size
# updates). Eliminated groups are dropped in batches, once they are a sixteenth of those held, and at every level
# asked for, where each yields the groups held (in order) and their compensated columns.


def _eliminate_groups(w: torch.Tensor, hinv: torch.Tensor, group_size: int, stops: set[int], last: int
                      ) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Groups of several columns (heads, key/value groups): every group's error from its block of H^-1, and the
    elimination of the cheapest as a block update of `w` and `hinv`, in place."""
    out_features = w.shape[0]
    held = list(range(hinv.shape[0] // group_size))
    gone = torch.zeros(len(held), dtype=torch.bool)  # per held group: eliminated, not dropped yet
    alive = len(held)
    while alive > last:
        g = len(held)
        blocks = hinv.reshape(g, group_size, g, group_size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        block_inv = torch.linalg.inv(blocks)  # (G, s, s): every held group's error at once
        ws = w.reshape(out_features, g, group_size).permute(1, 0, 2)  # (G, out, s)
        errors = ((ws @ block_inv) * ws).sum(dim=(1, 2))
        errors[gone] = float("inf")
        best = int(torch.argmin(errors))
        s = slice(best * group_size, (best + 1) * group_size)
        inv = block_inv[best]
        w -= w[:, s] @ inv @ hinv[s, :]
        hinv -= hinv[:, s] @ inv @ hinv[s, :]
        w[:, s] = 0.0
        hinv[s, :] = 0.0
        hinv[:, s] = 0.0
        hinv[s, s] = torch.eye(group_size, dtype=hinv.dtype)  # keeps the block invertible; never chosen again
        gone[best] = True
        alive -= 1
        if int(gone.sum()) >= max(1, g // 16) or alive in stops or alive == last:
            keep = cols_of([i for i in range(g) if not gone[i]], group_size)
            w, hinv = w[:, keep], hinv[keep][:, keep]
            held = [h for h, x in zip(held, gone.tolist()) if not x]
            gone = torch.zeros(len(held), dtype=torch.bool)
        if alive in stops:
            yield held, w


def _eliminate_columns(w: torch.Tensor, hinv: torch.Tensor, group_size: int, stops: set[int], last: int
                       ) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Single columns (FFN neurons), with the updates of a batch deferred.

    Eliminating column b is the rank-one pair of updates `W -= a c^T`, `H^-1 -= u c^T` with u = (H^-1)[b, :],
    a = W[:, b] and c = u / u[b]. Applied one at a time, every step rewrites both matrices whole (for a 5,632-neuron
    FFN, 350 MB a step), so the step is bound by memory. Here a batch's updates are kept as their vectors and applied
    at the batch's end in two matrix products; within the batch a step needs only the current row of H^-1 and column
    of W (the matrices at the batch's start less the batch's updates so far), H^-1's diagonal, updated a step at a
    time, and the columns' squared norms, updated from the products of the removed column with every column (one
    pass over W that only reads it). The choices and weights are those of the one-at-a-time elimination, up to
    rounding.
    """
    out_features = w.shape[0]
    held = list(range(hinv.shape[0]))
    alive = len(held)
    while alive > last:
        g = len(held)
        # up to the next level asked for (`last` is one)
        batch = min(max(1, g // 16), 512, alive - max(k for k in stops if k < alive))
        columns = w.new_empty(out_features, batch)  # a: the removed columns of W
        rows = w.new_empty(batch, g)  # u: the rows of H^-1 removed
        scaled = w.new_empty(batch, g)  # c = u / u[b]
        norms = torch.linalg.vector_norm(w, dim=0).square()
        diagonal = hinv.diagonal().clone()
        gone = torch.zeros(g, dtype=torch.bool, device=w.device)
        for k in range(batch):
            errors = norms / diagonal
            errors[gone] = float("inf")
            best = int(torch.argmin(errors))
            coefficients = scaled[:k, best]
            u = hinv[best] - coefficients @ rows[:k]
            a = w[:, best] - columns[:, :k] @ coefficients
            c = u / u[best]
            # a . (current column j) for every j: a^T W less the batch's updates so far
            products = a @ w - (a @ columns[:, :k]) @ scaled[:k]
            norms += c * (c * a.dot(a) - 2.0 * products)
            diagonal -= u * c
            columns[:, k], rows[k], scaled[k] = a, u, c
            gone[best] = True
        keep = (~gone).nonzero().squeeze(1)
        # the batch's updates applied to what is kept, in place (no product the matrices' size beside them)
        w = w.index_select(1, keep).addmm_(columns, scaled[:, keep], alpha=-1.0)
        hinv = hinv.index_select(0, keep)
        hinv = hinv.index_select(1, keep).addmm_(rows[:, keep].T, scaled[:, keep], alpha=-1.0)
        held = [h for h, x in zip(held, gone.tolist()) if not x]
        alive = len(held)
        if alive in stops:
            yield held, w


def centered_hessian(hessian: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """2 (X - mu 1^T)(X - mu 1^T)^T / n from H = 2 X X^T / n and the mean input mu: what is left of the inputs to
    fit once the bias is free."""
    mu = mean.to(device=hessian.device, dtype=torch.float64)
    return (hessian.to(torch.float64) - 2.0 * torch.outer(mu, mu)).to(hessian.dtype)


def bias_shifts(dense: torch.Tensor, levels: list[torch.Tensor], mean: torch.Tensor) -> list[torch.Tensor]:
    """(W - W_k) mu for every level's weight W_k: what the bias gains so that the level's output keeps the dense
    output's mean on the calibration inputs."""
    mu = mean.to(torch.float64)
    w = dense.detach().to(torch.float64)
    return [((w - level.to(torch.float64)) @ mu).to(torch.float32) for level in levels]


def cols_of(groups: list[int], group_size: int) -> torch.Tensor:
    """The input columns of `groups`, in order."""
    if not groups:
        return torch.zeros(0, dtype=torch.int64)
    return (torch.tensor(groups)[:, None] * group_size + torch.arange(group_size)[None, :]).flatten()


def group_magnitude_levels(weight: torch.Tensor, group_size: int, keep_counts: list[int]
                           ) -> list[tuple[list[int], torch.Tensor]]:
    """The data-free baseline: keep the groups whose consumer columns have the largest norm; no compensation."""
    out_features, in_features = weight.shape
    num_groups = in_features // group_size
    norms = weight.detach().float().reshape(out_features, num_groups, group_size).pow(2).sum(dim=(0, 2))
    order = torch.argsort(norms, descending=True, stable=True).tolist()
    results = []
    for k in keep_counts:
        kept = sorted(order[:k])
        w = torch.zeros_like(weight, dtype=torch.float32)
        idx = torch.cat([torch.arange(g * group_size, (g + 1) * group_size) for g in kept]) if kept else None
        if idx is not None:
            w[:, idx] = weight.detach().float()[:, idx]
        results.append((kept, w))
    return results
