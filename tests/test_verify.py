"""Verify's overshoot correction: a profile measured far above the target is re-aimed lower once, and the lower
profile is kept only if it meets the target when measured."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import handwritten_table, small_config

import spdy_hf.families.unstructured as unstructured
from spdy_hf import SPDYConfig, SPDYPruner
from spdy_hf.errors import ConfigError
from spdy_hf.families import Measurement
from spdy_hf.modeling.units import find_units
from spdy_hf.pipeline.verify import Reaim
from spdy_hf.search import compute_budget

SEARCH = {"num_random_inits": 5, "patience": 3, "eval_samples": 4, "dp_buckets": 1000, "speedup_margin": 0.0,
          "verify_overshoot": 0.05}  # the default (small_config turns it off)


def fake_machine(monkeypatch, model, config, factor):
    """The "machine" runs a profile `factor(predicted, seen)` times faster than the hand-written table says (dense
    10 ms), `seen` being the predicted speedups measured so far, this one last; returns the table, units and seen."""
    units = find_units(model, config.skip_modules)
    table = handwritten_table(model, units, config)
    times = table.times_for(table.keys_for(units))
    budget = compute_budget(times, table.base_time_ms, config.target_speedup, reference_ms=table.reference_time_ms)
    levels = [0.0] + sorted({s for s in table.levels if s > 0})
    seen = []

    def measure(model_, units_, sparsities, layouts, call, per, *timing):
        if per > 1:  # the decode regime's measurement, which the report adds for an LM
            return Measurement(10.0, 8.0, 10.0)
        predicted = budget.predicted_speedup(times[np.arange(len(units_)), [levels.index(s) for s in sparsities]])
        seen.append(predicted)
        return Measurement(10.0, 10.0 / (predicted * factor(predicted, seen)), 10.0)

    monkeypatch.setattr(unstructured, "time_kernels", measure)
    return table, units, seen


def test_an_overshoot_is_re_aimed_lower_and_kept_when_it_meets_the_target(tiny_llama, tmp_path, tokenizer,
                                                                          monkeypatch):
    config = small_config(tmp_path, target_speedup=1.5, method="magnitude", search=SEARCH)
    table, units, seen = fake_machine(monkeypatch, tiny_llama, config, lambda predicted, seen: 1.3)  # table 30 % slow
    result = SPDYPruner(tiny_llama, config, tokenizer).prune(latency_table=table, progress=False)
    report = result.report
    assert len(seen) == 2 and seen[1] < seen[0]  # one lower profile, measured once (it met the target)
    (correction,) = report["verify_corrections"]
    assert correction["direction"] == "down" and correction["kept"] is True
    assert correction["measured_speedup"] == pytest.approx(1.3 * seen[0]) and correction["measured_speedup"] > 1.65
    assert correction["new_aim"] == pytest.approx(correction["aim"] * 1.5 / correction["measured_speedup"])
    assert report["measured_speedup"] == pytest.approx(1.3 * seen[1]) and report["measured_speedup"] >= 1.5
    assert report["predicted_speedup"] == pytest.approx(seen[1]) and report["target_met"]
    for p, unit in zip(result.profile, units):  # the model holds the lower profile's weights
        assert int((unit.weight == 0).sum()) == round(p["sparsity"] * unit.numel)


@pytest.mark.parametrize("corrections", [1, 2])
def test_a_lower_profile_that_misses_is_re_aimed_up_or_gives_way(tiny_llama, tmp_path, tokenizer, monkeypatch,
                                                                 corrections):
    """A lower profile that misses is re-aimed up between it and the profile that met the target while corrections
    are left (2); with none left (1), the profile that met the target comes back."""
    config = small_config(tmp_path, target_speedup=1.5, method="magnitude",
                          search={**SEARCH, "verify_corrections": corrections})
    # the searched profile runs 30 % faster than the table says, slower ones 20 %: aimed by the first profile's
    # error, the lower one misses
    table, units, seen = fake_machine(monkeypatch, tiny_llama, config, lambda p, seen: 1.3 if p >= seen[0] else 1.2)
    result = SPDYPruner(tiny_llama, config, tokenizer).prune(latency_table=table, progress=False)
    report = result.report
    # the searched profile, then the lower one twice (a miss is confirmed before it counts)
    assert seen[1] == seen[2] < seen[0] and 1.2 * seen[1] < 1.5
    down = report["verify_corrections"][0]
    assert down["direction"] == "down" and len(report["verify_corrections"]) == corrections
    if corrections == 1:
        assert len(seen) == 3 and down["kept"] is False
        assert down["lowered_measured_speedup"] == pytest.approx(1.2 * seen[1])
        assert report["measured_speedup"] == pytest.approx(1.3 * seen[0])
        assert report["predicted_speedup"] == pytest.approx(seen[0])
    else:  # re-aimed up by the lower profile's shortfall: it lands between the two, and meets the target
        assert len(seen) == 4 and seen[1] < seen[3] < seen[0] and down["kept"] is True
        assert report["verify_corrections"][1]["direction"] == "up"
        assert report["verify_corrections"][1]["new_aim"] < down["aim"]
        assert report["measured_speedup"] == pytest.approx(1.2 * seen[3]) and 1.2 * seen[3] >= 1.5
    assert report["target_met"]
    for p, unit in zip(result.profile, units):  # the weights in the model are the final profile's
        assert int((unit.weight == 0).sum()) == round(p["sparsity"] * unit.numel)


@pytest.mark.parametrize("search", [{"verify_overshoot": None}, {"verify_corrections": 0}, {"verify_overshoot": 0.5}])
def test_an_overshoot_is_kept_when_asked_or_within_bounds(tiny_llama, tmp_path, tokenizer, monkeypatch, search):
    config = small_config(tmp_path, target_speedup=1.5, method="magnitude", search={**SEARCH, **search})
    table, _, seen = fake_machine(monkeypatch, tiny_llama, config, lambda predicted, seen: 1.3)
    report = SPDYPruner(tiny_llama, config, tokenizer).prune(latency_table=table, progress=False).report
    assert len(seen) == 1 and report["verify_corrections"] == []  # 1.3 x 1.5 = 1.95: within 50 %, not 10 %
    assert report["measured_speedup"] == pytest.approx(1.3 * seen[0])


def test_reaim_down_is_once_per_job_and_keeps_the_configured_margin():
    times = np.tile([4.0, 3.0, 2.0, 1.0], (4, 1))
    costs = np.tile([0.0, 1.0, 2.0, 3.0], (4, 1))
    config = SPDYConfig.from_dict({"target_speedup": 1.2, "search": {"dp_buckets": 1000, "speedup_margin": 0.05}})
    budget = compute_budget(times, base_ms=20.0, target_speedup=1.2)  # 4 ms constant + 16 ms of units
    profile = np.array([2, 2, 2, 2])  # predicted 20 / 12 = 1.667
    aims = Reaim(config, times, costs, budget)
    corrections = aims.corrections
    assert aims.down(profile, 1.6, 1.26) is None  # within 5 %
    new_aim, new_profile = aims.down(profile, 1.6, 2.0)
    assert new_aim == pytest.approx(1.6 * 1.2 * 1.025 / 2.0)  # the middle of [target, target x 1.05]
    assert budget.predicted_speedup(times[np.arange(4), new_profile]) >= new_aim
    assert new_profile.sum() < profile.sum() and corrections[0]["direction"] == "down"
    assert aims.down(new_profile, new_aim, 2.0) is None  # once only
    with pytest.raises(ConfigError, match="verify_overshoot"):
        SPDYConfig.from_dict({"search": {"verify_overshoot": 0}})
