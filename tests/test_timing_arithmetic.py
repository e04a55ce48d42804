"""The arithmetic behind every timing, with fake timers whose answers are known: verify times the pruned model it
deploys (not the dense one twice), the cpu table's constant and base, and the structured latencies' noise clamp."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import MODEL_FACTORIES, handwritten_table, small_config, work_clock
from test_structured_pruner import structured_table
from torch import nn

import spdy_hf.families.base as family_base
import spdy_hf.families.unstructured as unstructured
import spdy_hf.latency.cpu as cpu
from spdy_hf import SPDYPruner
from spdy_hf.deploy.kernels import FastLinear
from spdy_hf.latency.check import prediction_problem
from spdy_hf.latency.structured import check_profiles, keep_counts, measure_structured_latency, smooth_times
from spdy_hf.modeling.groups import find_structured_groups
from spdy_hf.modeling.units import find_units
from spdy_hf.search import compute_budget


def linear_work(module, args) -> int:
    """The multiply-adds per token of a linear layer (a sparse one's non-zeros): what a pruned model saves shows up
    only if the pruned model is what runs."""
    if isinstance(module, FastLinear):
        return module.nnz if module.sparse else module.in_features * module.out_features
    return module.weight.numel() if isinstance(module, nn.Linear) else 0


work_timer = work_clock(linear_work)


SEARCH = {"num_random_inits": 3, "patience": 2, "eval_samples": 4, "dp_buckets": 1000, "verify_corrections": 0}


def test_verify_times_the_pruned_unstructured_model(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(unstructured, "interleaved_median_ms", work_timer)
    model = MODEL_FACTORIES["bert"]()
    config = small_config(tmp_path, target_speedup=1.5, method="magnitude", search=SEARCH)
    units = find_units(model, config.skip_modules)
    dense_work = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    result = SPDYPruner(model, config, tokenizer).prune(latency_table=handwritten_table(model, units, config),
                                                       progress=False)
    # every pruned unit runs as CSR holding its nonzeros; the dense model runs every weight
    removed = sum(int((u.weight == 0).sum()) for u, p in zip(units, result.profile) if p["sparsity"] > 0)
    assert removed > 0
    report = result.report
    assert report["dense_time_ms"] == pytest.approx(dense_work / 1000)
    assert report["pruned_time_ms"] == pytest.approx((dense_work - removed) / 1000)
    assert report["measured_speedup"] == pytest.approx(dense_work / (dense_work - removed))
    assert report["deployed_dense_time_ms"] == pytest.approx(dense_work / 1000)


@pytest.mark.parametrize("family", ["structured", "mixed"])
def test_verify_times_the_deployed_structured_model(family, tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(family_base, "interleaved_timer", lambda backend: work_timer)
    model = MODEL_FACTORIES["llama"]()
    config = small_config(tmp_path, target_speedup=1.6, family=family, method="magnitude", levels=[0.5],
                          search=SEARCH)
    dense_work = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    table = structured_table(model, config)
    if family == "mixed":  # the per-layer part too, for the sparse levels
        units = find_units(model, config.skip_modules)
        table.shapes, table.levels = handwritten_table(model, units, config).shapes, [0.0, 0.5]
        table.patterns = ["dense", "unstructured"]
    result = SPDYPruner(model, config, tokenizer).prune(latency_table=table, progress=False)
    modules = dict(model.named_modules())
    # what the deployed model no longer multiplies: the removed heads'/neurons' rows and columns (bias-free Llama)
    removed = 0
    for g in result.groups:
        size = sum(modules[n].weight.numel() for n in [*g["producers"], g["consumer"]])
        removed += size * (g["num_groups"] - g["keep"]) // g["num_groups"]
        if g["family"] != "structured":  # sparse on the kept part: CSR holds the nonzeros only
            kept = size * g["keep"] // g["num_groups"]
            removed += kept - sum(int((modules[n].weight != 0).sum()) for n in [*g["producers"], g["consumer"]])
    assert removed > 0
    report = result.report
    assert report["dense_time_ms"] == pytest.approx(dense_work / 1000)
    assert report["measured_speedup"] == pytest.approx(dense_work / (dense_work - removed))


def test_cpu_table_constant_and_base_arithmetic(tmp_path, monkeypatch):
    """Unit times, the constant (everything but the units) and the base follow from the measurements exactly: the
    constant is the median over configurations (one noisy configuration does not move it), the base is the
    deployed dense time scaled by the measured dense/deployed ratio."""
    model = MODEL_FACTORIES["bert"]()
    config = small_config(tmp_path, levels=[0.5, 0.9])
    levels = [0.0, 0.5, 0.9]
    units = find_units(model, config.skip_modules)
    inputs = {"input_ids": torch.ones(1, 32, dtype=torch.long), "attention_mask": torch.ones(1, 32)}
    constant = 3.0

    def unit_ms(unit, k):  # depends on shape and level only, so units sharing a row agree
        return unit.numel * 1e-4 * (1.0 - 0.5 * levels[k])

    def fake_time_units(model, units, layouts, levels_, inputs, rounds=3, passes=3, seed=0, progress=True):
        rng = np.random.default_rng(0)
        configs = np.stack([np.stack([rng.permutation(3) for _ in units], axis=1) for _ in range(rounds)]
                           ).reshape(-1, len(units))
        samples = [[[unit_ms(u, k)] * passes for k in range(3)] for u in units]
        totals = np.array([constant + sum(unit_ms(u, k) for u, k in zip(units, c)) for c in configs])
        totals[0] += 5.0  # one configuration measured in a noisy moment
        return samples, configs, totals

    monkeypatch.setattr(cpu, "time_units_in_place", fake_time_units)
    monkeypatch.setattr(cpu, "interleaved_median_ms", lambda fns, warmup, repeats: [12.0, 10.0])
    monkeypatch.setattr(cpu, "spin_up", lambda fn, seconds: None)
    table = cpu.measure_latency_table(model, units, levels, config, inputs, "fp", progress=False)
    for u in units:
        key = f"{u.shape_key}:{table.layout_of(u.name)}"
        np.testing.assert_allclose(table.shapes[key], [unit_ms(u, k) for k in range(3)])
    dense_units = sum(unit_ms(u, 0) for u in units)
    assert table.deployed_dense_time_ms == pytest.approx(constant + dense_units)
    assert table.base_time_ms == pytest.approx((constant + dense_units) * 12.0 / 10.0)
    assert table.additivity["median_relative_error"] == pytest.approx(0.0, abs=1e-12)
    times = table.times_for(table.keys_for(units))
    budget = compute_budget(times, table.base_time_ms, 1.5, reference_ms=table.reference_time_ms)
    assert budget.constant_ms == pytest.approx(constant)
    assert budget.max_reachable_speedup == pytest.approx(
        table.base_time_ms / (constant + sum(unit_ms(u, 2) for u in units)))


def test_structured_latency_noise_clamp():
    """Measured savings that break monotonicity (keeping fewer neurons saving less) or go negative (a shrunk model
    timed slower than dense) are clamped: T(0) = 0, T >= 0, non-decreasing in the keep count."""
    model = MODEL_FACTORIES["llama"]()
    ffn = [g for g in find_structured_groups(model) if g.kind == "ffn"]  # two blocks, one signature
    counts = [keep_counts(g, 1, 4) for g in ffn]
    assert counts[0] == [64, 48, 32, 16, 0]
    shrunk_ms = {64: 10.0, 48: 10.4, 32: 8.0, 16: 8.4, 0: 6.0}  # dense 10 ms; both FFNs cut to the keep count

    def run(m):
        def kept():  # the FFN width of the form the live model is in when the run is timed
            down = dict(m.named_modules())[ffn[0].consumer]
            return down.weight.shape[1] if down.weight.numel() else 0
        return kept

    def timer(fns, warmup, repeats):
        return [shrunk_ms[fn()] for fn in fns]

    part = measure_structured_latency(model, ffn, counts, run, timer, progress=False)
    (entry,) = part["signatures"].values()
    # saved per group: (10 - t) / 2 -> 48: -0.2, 32: 1.0, 16: 0.8, 0: 2.0; T(k) = max(2.0 - saved, 0) -> 2.2, 1.0,
    # 1.2, 0; made non-decreasing from k = 0 up -> 0, 1.2, 1.2, 2.2; full: max(2.0, 2.2)
    np.testing.assert_allclose(entry["measured_ms"], [2.2, 2.2, 1.2, 1.2, 0.0])
    # then smoothed: the partial levels save 0, 1.0, 1.0 at 16, 32, 48 neurons removed; slope 80 / 3584 per neuron
    slope = (16 * 0.0 + 32 * 1.0 + 48 * 1.0) / (16 ** 2 + 32 ** 2 + 48 ** 2)
    np.testing.assert_allclose(entry["times_ms"], [2.2, 2.2 - 16 * slope, 2.2 - 32 * slope, 2.2 - 48 * slope, 0.0])
    assert part["dense_ms"] == 10.0


@pytest.mark.parametrize("keep, times, expected", [
    # linear in the keep count (with a fixed part): unchanged
    ([8, 6, 4, 2, 0], [5.0, 4.0, 3.0, 2.0, 0.0], [5.0, 4.0, 3.0, 2.0, 0.0]),
    # one level's saving measured too large by noise (4 -> 2.4 instead of 3): pooled with the others
    # (savings 1.0, 2.6, 3.0 at 2, 4, 6 removed: slope 30.4 / 56)
    ([8, 6, 4, 2, 0], [5.0, 4.0, 2.4, 2.0, 0.0], [5.0, 5.0 - 2 * 30.4 / 56, 5.0 - 4 * 30.4 / 56,
                                                  5.0 - 6 * 30.4 / 56, 0.0]),
    # savings that extrapolate below zero are clipped; a negative slope (noise) leaves the full time
    ([4, 2, 1, 0], [1.0, 0.1, 0.1, 0.0], [1.0, 1.0 - 2 * 4.5 / 13, 0.0, 0.0]),
    ([4, 2, 0], [1.0, 1.2, 0.0], [1.0, 1.0, 0.0]),
    # nothing between the full group and none: as measured
    ([1, 0], [3.0, 0.0], [3.0, 0.0]),
])
def test_smoothed_structured_times(keep, times, expected):
    """Partial levels' savings against the full group are fitted by one slope per signature (least squares through
    the full level); the full and removed levels stay as measured, and the result is non-decreasing in k."""
    out = smooth_times(keep, times)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-9)
    assert all(a >= b for a, b in zip(out, out[1:]))


def test_random_profile_check_of_structured_times(tmp_path):
    """With work as the clock, structured times measured in the whole model predict any mix of keep counts exactly,
    and the check of random profiles finds nothing; a table that is off (its groups most of the model's time, while
    the tiny Llama's time is mostly its LM head) is caught."""
    model = MODEL_FACTORIES["llama"]()
    groups = find_structured_groups(model)
    counts = [keep_counts(g, 1, 4) for g in groups]

    def run(m):
        return lambda: m(input_ids=torch.ones(1, 8, dtype=torch.long))

    part = measure_structured_latency(model, groups, counts, run, work_timer, warmup=0, repeats=1, progress=False)
    pairs = check_profiles(model, groups, counts, part, run, work_timer, n=6, warmup=0, repeats=1)
    assert len(pairs) == 6 and any(p > 1.0 for p, _ in pairs)  # mixed profiles, not all dense
    for predicted, measured in pairs:
        assert predicted == pytest.approx(measured, rel=1e-9)
    assert prediction_problem(pairs, 0.01) is None

    off = copy.deepcopy(part)
    off["dense_ms"] = 1.1 * sum(e["times_ms"][0] * e["groups"] for e in part["signatures"].values())
    problem = prediction_problem(check_profiles(model, groups, counts, off, run, work_timer, n=6, warmup=0,
                                                repeats=1), 0.1)
    assert problem is not None and "predicts a random profile" in problem and "check_tolerance is 10%" in problem


def test_random_profile_check_of_a_cpu_table(tmp_path, monkeypatch):
    """A per-layer table whose times are the units' work predicts random profiles (random sparse weights at each
    unit's level, as CSR) exactly, up to rounding the number of zeros; a table that halves the sparse times is
    caught."""
    monkeypatch.setattr(cpu, "interleaved_median_ms", work_timer)
    model = MODEL_FACTORIES["bert"]()
    config = small_config(tmp_path, levels=[0.5, 0.9])
    units = find_units(model, config.skip_modules)
    table = handwritten_table(model, units, config)
    table.shapes = {f"{u.shape_key}:cc": [u.numel * (1 - s) / 1000 for s in table.levels] for u in units}
    linear_work = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    table.base_time_ms = table.deployed_dense_time_ms = linear_work / 1000  # the units plus pooler/classifier
    inputs = {"input_ids": torch.ones(1, 16, dtype=torch.long), "attention_mask": torch.ones(1, 16)}
    pairs = cpu.check_profiles(model, units, table, inputs, n=5, warmup=0, repeats=1)
    assert any(p > 1.0 for p, _ in pairs)
    for predicted, measured in pairs:
        assert predicted == pytest.approx(measured, rel=1e-3)
    table.shapes = {k: [v[0]] + [t / 2 for t in v[1:]] for k, v in table.shapes.items()}
    assert prediction_problem(cpu.check_profiles(model, units, table, inputs, n=5, warmup=0, repeats=1), 0.1)
