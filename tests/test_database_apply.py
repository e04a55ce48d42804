"""The magnitude pruning database (nested masks, in-place stitching) and the deployed FastLinear modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import example_inputs

from spdy_hf.config import DEFAULT_SKIP_MODULES, SPDYConfig
from spdy_hf.database import MagnitudeDatabase
from spdy_hf.deploy.kernels import (
    FastLinear,
    KernelSwap,
    SharedInput,
    UnitLayout,
    deployed_kernels,
    deployed_modules,
)
from spdy_hf.families.unstructured import build_database
from spdy_hf.modeling.levels import get_levels
from spdy_hf.modeling.units import find_units

LEVELS = [0.0, 0.25, 0.5, 0.75, 0.9, 0.99]



def test_masks_are_nested_and_zero_counts_exact(tiny_bert):
    units = find_units(tiny_bert, DEFAULT_SKIP_MODULES)
    db = MagnitudeDatabase(units, LEVELS)
    assert db.num_levels == len(LEVELS)
    for u, unit in enumerate(units):
        dense = unit.weight.clone()
        assert (dense != 0).all()
        previous_zero = torch.zeros_like(dense, dtype=torch.bool)
        for k, s in enumerate(LEVELS):
            w = db.weight(u, k)
            assert w.shape == unit.shape
            zero = w == 0
            assert int(zero.sum()) == round(s * unit.numel) == db.num_zeros(u, k)
            assert (previous_zero & ~zero).sum() == 0  # every earlier zero stays zero
            torch.testing.assert_close(w[~zero], dense[~zero], rtol=0, atol=0)  # survivors untouched
            if zero.any() and (~zero).any():
                assert dense[zero].abs().max() <= dense[~zero].abs().min()  # magnitude: smallest go first
            previous_zero = zero
        torch.testing.assert_close(db.weight(u, 0), dense, rtol=0, atol=0)


def test_build_database_magnitude_needs_no_data():
    config = SPDYConfig(method="magnitude")
    database, info = build_database(config, None, [], [0.0, 0.5], {}, anchor=1)
    assert isinstance(database, MagnitudeDatabase) and info == {"method": "magnitude"}


def _zeros(unit):
    return int((unit.module.weight == 0).sum())


@pytest.mark.parametrize(
    "model_name", ["bert", "gpt2"])
def test_stitch_in_place_and_back(model_name, request):
    model = request.getfixturevalue(f"tiny_{model_name}")
    units = find_units(model, DEFAULT_SKIP_MODULES)
    dense = [u.module.weight.detach().clone() for u in units]
    storage = [u.module.weight.data_ptr() for u in units]
    params = [u.module.weight for u in units]
    modules = dict(model.named_modules())
    db = MagnitudeDatabase(units, LEVELS)
    profile = [(i % (len(LEVELS) - 1)) + 1 for i in range(len(units))]
    db.stitch(profile)
    for u, (unit, k) in enumerate(zip(units, profile)):
        assert unit.module.weight is params[u] and unit.module.weight.data_ptr() == storage[u]  # same storage
        assert modules[unit.name] is unit.module  # the model is not copied
        assert _zeros(unit) == round(LEVELS[k] * unit.numel)
        torch.testing.assert_close(unit.weight, db.weight(u, k), rtol=0, atol=0)
    # moving between sparse levels, both directions
    profile2 = [len(LEVELS) - 1 - k for k in profile]
    db.stitch(profile2)
    for u, (unit, k) in enumerate(zip(units, profile2)):
        torch.testing.assert_close(unit.weight, db.weight(u, k), rtol=0, atol=0)
    db.stitch([0] * len(units))
    for unit, w in zip(units, dense):
        torch.testing.assert_close(unit.module.weight, w, rtol=0, atol=0)  # exact dense weights again
    with pytest.raises(ValueError, match="one level per unit"):
        db.stitch([0])


def test_gpt2_conv1d_stitch_zeroes_the_right_entries(tiny_gpt2):
    units = find_units(tiny_gpt2, DEFAULT_SKIP_MODULES)
    unit = units[0]  # c_attn, stored (in=32, out=96)
    db = MagnitudeDatabase(units, LEVELS)
    expected = db.weight(0, 3)  # (out, in)
    x = torch.randn(2, 5, 32)
    db.stitch([3] + [0] * (len(units) - 1))
    torch.testing.assert_close(unit.module.weight, expected.t(), rtol=0, atol=0)
    # the module computes with exactly the pruned (out, in) matrix
    torch.testing.assert_close(unit.module(x), F.linear(x, expected, unit.module.bias))


def test_stitch_changes_model_output_and_restores_it(tiny_bert):
    inputs = example_inputs()
    with torch.no_grad():
        before = tiny_bert(**inputs).last_hidden_state
    units = find_units(tiny_bert, DEFAULT_SKIP_MODULES)
    db = MagnitudeDatabase(units, get_levels("spdy"))
    db.stitch([41] * len(units))
    with torch.no_grad():
        pruned = tiny_bert(**inputs).last_hidden_state
    assert not torch.allclose(pruned, before, atol=1e-3)
    db.stitch([0] * len(units))
    with torch.no_grad():
        torch.testing.assert_close(tiny_bert(**inputs).last_hidden_state, before, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- FastLinear
def _weight(out_features=24, in_features=16, sparsity=0.7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen)
    w[torch.rand(out_features, in_features, generator=gen) < sparsity] = 0.0
    return w


def _inputs(in_features, transposed, lead=(2, 5)):
    n = 1
    for d in lead:
        n *= d
    if transposed:  # (features, tokens) contiguous, seen as (*lead, features)
        return torch.randn(in_features, n).t().reshape(*lead, in_features)
    return torch.randn(*lead, in_features)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("code", ["cc", "ct", "tc", "sc"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("transposed_input", [False, True])
def test_fast_linear_matches_f_linear(sparse, code, with_bias, transposed_input):
    w = _weight()
    b = torch.randn(24) if with_bias else None
    module = FastLinear(w, b, sparse=sparse, layout=UnitLayout(code))
    assert module.sparse == sparse
    assert module.weight_kernel.layout == (torch.sparse_csr if sparse else torch.strided)
    assert module.nnz == int((w != 0).sum())
    x = _inputs(16, transposed_input)
    y = module(x)
    assert y.shape == (2, 5, 24)
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    if code[1] == "c":
        assert y.is_contiguous()
    elif sparse or code[1] == "t":
        assert y.reshape(-1, 24).t().is_contiguous()  # a producer hands on a transposed output
    # other leading shapes: none, and three dims
    x1 = torch.randn(16)
    assert module(x1).shape == (24,)
    torch.testing.assert_close(module(x1), F.linear(x1, w, b), rtol=1e-5, atol=1e-5)
    x3 = torch.randn(2, 3, 4, 16)
    assert module(x3).shape == (2, 3, 4, 24)
    torch.testing.assert_close(module(x3), F.linear(x3, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sparse", [False, True])
def test_followers_share_the_leaders_transposed_input(sparse):
    shared = SharedInput()
    weights = [_weight(seed=i) for i in range(3)]
    biases = [torch.randn(24) for _ in range(3)]
    leader = FastLinear(weights[0], biases[0], sparse, UnitLayout("sc"), shared)
    followers = [FastLinear(w, b, sparse, UnitLayout("tc", leader=0), shared) for w, b in zip(weights[1:], biases[1:])]
    x = torch.randn(2, 5, 16)
    y0 = leader(x)
    assert shared.source is x and shared.transposed.shape == (16, 10) and shared.transposed.is_contiguous()
    ys = [f(x) for f in followers]
    for y, w, b in zip([y0, *ys], weights, biases):
        torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    # a follower handed another tensor must not use the leader's stale copy
    x_other = torch.randn(2, 5, 16)
    torch.testing.assert_close(followers[0](x_other), F.linear(x_other, weights[1], biases[1]), rtol=1e-5, atol=1e-5)


def test_deployed_modules_wire_followers_to_their_leader(tiny_bert):
    units = find_units(tiny_bert, DEFAULT_SKIP_MODULES)
    layouts = [UnitLayout("cc")] * len(units)
    layouts[0] = UnitLayout("sc")
    layouts[1] = UnitLayout("tc", leader=0)
    layouts[2] = UnitLayout("tc", leader=0)
    modules = deployed_modules(units, [0.5] + [0.0] * (len(units) - 1), layouts)
    assert modules[0].shared is modules[1].shared is modules[2].shared
    assert modules[3].shared is not modules[0].shared
    assert modules[0].sparse and not modules[1].sparse


def test_kernel_swap_round_trips_modules(tiny_bert):
    units = find_units(tiny_bert, DEFAULT_SKIP_MODULES)
    originals = [u.module for u in units]
    sparsities = [0.5 if i % 2 else 0.0 for i in range(len(units))]
    swap = KernelSwap(tiny_bert, units, sparsities)
    inputs = example_inputs()
    with torch.no_grad():
        dense_out = tiny_bert(**inputs).last_hidden_state
    swap.use_deployed()
    deployed = [tiny_bert.get_submodule(u.name) for u in units]
    assert all(isinstance(m, FastLinear) for m in deployed)
    assert [m.sparse for m in deployed] == [s > 0 for s in sparsities]
    with torch.no_grad():
        # built from the (dense) weights, so the deployed model computes the same
        torch.testing.assert_close(tiny_bert(**inputs).last_hidden_state, dense_out, rtol=1e-4, atol=1e-5)
    swap.use_original()
    assert all(tiny_bert.get_submodule(u.name) is m for u, m in zip(units, originals))
    swap.use_deployed()
    assert all(tiny_bert.get_submodule(u.name) is m for u, m in zip(units, deployed))  # the same objects again
    swap.use_original()
    with deployed_kernels(tiny_bert, units, sparsities):
        assert all(isinstance(tiny_bert.get_submodule(u.name), FastLinear) for u in units)
    assert all(tiny_bert.get_submodule(u.name) is m for u, m in zip(units, originals))


def test_deployed_kernels_restore_originals_on_error(tiny_bert):
    units = find_units(tiny_bert, DEFAULT_SKIP_MODULES)
    originals = [u.module for u in units]
    with pytest.raises(RuntimeError, match="boom"):
        with deployed_kernels(tiny_bert, units, [0.0] * len(units)):
            raise RuntimeError("boom")
    assert all(tiny_bert.get_submodule(u.name) is m for u, m in zip(units, originals))


@pytest.mark.parametrize("model_name", ["bert", "gpt2", "llama"])
def test_sparse_deployed_model_matches_pruned_dense_model(model_name, request):
    from spdy_hf.latency.cpu import plan_layouts

    model = request.getfixturevalue(f"tiny_{model_name}")
    units = find_units(model, DEFAULT_SKIP_MODULES)
    inputs = example_inputs(batch=2, seq=12)
    layouts = plan_layouts(model, units, inputs)
    profile = [(i % (len(LEVELS) - 1)) + 1 for i in range(len(units))]
    with torch.no_grad():  # magnitude-prune by hand (the database has its own tests)
        for unit, k in zip(units, profile):
            w = unit.weight  # (out, in) view, also for GPT-2's Conv1D
            n = round(LEVELS[k] * w.numel())
            threshold = w.abs().flatten().kthvalue(n).values
            w[w.abs() <= threshold] = 0.0
    with torch.no_grad():
        expected = model(**inputs)[0]
        with deployed_kernels(model, units, [LEVELS[k] for k in profile], layouts):
            got = model(**inputs)[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_live_profile_writes_only_units_whose_level_changed():
    """The search stage's record of the live model: a unit is written when its level changes, every unit after the
    weights were read back from disk (`rewrite`, and on leaving `lowered`), and a profile of the wrong length is
    refused."""
    from types import SimpleNamespace

    from spdy_hf.search import LiveProfile

    writes = []
    family = SimpleNamespace(stitch_unit=lambda plan, databases, i, level: writes.append((i, level)),
                             model=torch.nn.Linear(2, 2))
    live = LiveProfile(family, SimpleNamespace(names=["a", "b", "c", "d"]), None)
    live([0, 0, 0, 0])
    assert writes == []  # the model is dense already
    live([2, 2, 0, 2])
    assert writes == [(0, 2), (1, 2), (3, 2)]
    writes.clear()
    live([2, 2, 0, 2])
    assert writes == []
    live([2, 4, 0, 2])
    assert writes == [(1, 4)]
    writes.clear()
    live.rewrite([2, 4, 0, 2])
    assert writes == [(0, 2), (1, 4), (2, 0), (3, 2)]
    writes.clear()
    with live.lowered(None):
        live([1, 4, 0, 2])
    assert writes == [(0, 1), (0, 1), (1, 4), (2, 0), (3, 2)]  # inside, then the whole profile again after
    with pytest.raises(ValueError, match="one level per search unit"):
        live([0, 0])


def test_distance_scorer(tiny_bert, tiny_llama):
    from spdy_hf.search.scoring import DistanceScorer

    for model, kind in ((tiny_bert, "auto"), (tiny_bert, "nmse"), (tiny_llama, "auto"), (tiny_llama, "cosine")):
        units = find_units(model, DEFAULT_SKIP_MODULES)
        batches = [example_inputs(batch=2, seq=8, seed=s) for s in range(2)]
        scorer = DistanceScorer(model, batches, kind)
        assert scorer.kind == {"auto": "cosine" if model is tiny_bert else "kl"}.get(kind, kind)
        assert scorer() == pytest.approx(0.0, abs=1e-6)  # the dense model is at distance 0 from itself
        db = MagnitudeDatabase(units, LEVELS)
        db.stitch([2] * len(units))
        mild = scorer()
        db.stitch([5] * len(units))
        harsh = scorer()
        assert 0 < mild < harsh
        db.stitch([0] * len(units))
        assert scorer() == pytest.approx(0.0, abs=1e-6)


def test_cosine_score_is_scale_invariant_and_skips_padding(tiny_bert):
    from spdy_hf.search.scoring import DistanceScorer

    batch = example_inputs(batch=2, seq=8)
    batch["attention_mask"][1, 5:] = 0
    scorer = DistanceScorer(tiny_bert, [batch], "cosine")
    nmse = DistanceScorer(tiny_bert, [batch], "nmse")
    out = tiny_bert(**batch).last_hidden_state.detach()
    with torch.no_grad():  # shrink every output: cosine does not move, NMSE does
        tiny_bert.encoder.layer[-1].output.LayerNorm.weight.mul_(0.1)
        tiny_bert.encoder.layer[-1].output.LayerNorm.bias.mul_(0.1)
    assert scorer() == pytest.approx(0.0, abs=1e-6)
    assert nmse() == pytest.approx(0.81, rel=1e-3)
    assert out.shape == (2, 8, 32)
    with pytest.raises(ValueError, match="LM head"):
        DistanceScorer(tiny_bert, [batch], "kl")

    # padding: whatever the model outputs at padded positions does not count, and the mean runs over real tokens
    def replace(positions):
        def hook(module, args, output):
            output = output.clone()
            for b, t in positions:
                output[b, t] = -output[b, t]  # cosine -1 with the dense output there: 1 - cos = 2
            return output
        return tiny_bert.encoder.layer[-1].output.register_forward_hook(hook)

    handle = replace([(1, 5), (1, 6), (1, 7)])  # padded positions only
    assert scorer() == pytest.approx(0.0, abs=1e-6)
    handle.remove()
    handle = replace([(1, 2)])  # one real token of the 8 + 5 real ones
    assert scorer() == pytest.approx(2.0 / 13, rel=1e-5)
    handle.remove()


def test_embedding_score_compares_mean_pooled_sentence_embeddings(tiny_bert):
    """'embedding': 1 - cosine of each window's mean over its real tokens, averaged over windows; padding counts
    nowhere, one token's error counts through the mean it moves, and recovery's output term is the same distance."""
    from spdy_hf.recovery.teacher import output_distance
    from spdy_hf.search.scoring import DistanceScorer, mean_pooled

    batch = example_inputs(batch=2, seq=8)
    batch["attention_mask"][1, 5:] = 0
    dense = tiny_bert(**batch).last_hidden_state.detach()
    scorer = DistanceScorer(tiny_bert, [batch], "embedding")
    assert scorer.kind == "embedding" and scorer() == pytest.approx(0.0, abs=1e-6)

    def flip(positions):
        def hook(module, args, output):
            output = output.clone()
            for b, t in positions:
                output[b, t] = -output[b, t]
            return output
        return tiny_bert.encoder.layer[-1].output.register_forward_hook(hook)

    handle = flip([(1, 5), (1, 6), (1, 7)])  # padded positions only
    assert scorer() == pytest.approx(0.0, abs=1e-6)
    handle.remove()
    handle = flip([(0, 3)])  # one real token of window 0
    moved = dense.clone()
    moved[0, 3] = -moved[0, 3]
    mask = batch["attention_mask"].float()
    expected = 1 - F.cosine_similarity(mean_pooled(moved, mask), mean_pooled(dense, mask), dim=-1)
    assert expected[1] == pytest.approx(0.0, abs=1e-6)
    assert scorer() == pytest.approx(float(expected.mean()), rel=1e-4)  # window 1 untouched: half of window 0's

    class Out:  # what a BERT forward returns, as output_distance reads it
        def __init__(self, hidden):
            self.last_hidden_state = hidden

    tokens = batch["attention_mask"].bool().reshape(-1)
    assert float(output_distance(Out(moved), Out(dense), "embedding", tokens)) == \
        pytest.approx(float(expected.mean()), rel=1e-4)
    handle.remove()
    with torch.no_grad():  # a uniform rescale of every output is no distance
        tiny_bert.encoder.layer[-1].output.LayerNorm.weight.mul_(0.1)
        tiny_bert.encoder.layer[-1].output.LayerNorm.bias.mul_(0.1)
    assert scorer() == pytest.approx(0.0, abs=1e-6)
