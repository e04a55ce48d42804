"""End to end: SPDYPruner on tiny models with a hand-written latency table (nothing is timed for the search)."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
from conftest import MODEL_FACTORIES, example_inputs, handwritten_table, small_config
from safetensors.torch import load_file

import spdy_hf.families.unstructured as unstructured
from spdy_hf import LatencyTable, PruningResult, SPDYPruner, UnreachableTargetError
from spdy_hf.deploy.kernels import FastLinear
from spdy_hf.errors import SPDYError
from spdy_hf.families import Measurement
from spdy_hf.modeling.units import find_units
from spdy_hf.search import compute_budget
from spdy_hf.search.scoring import DistanceScorer

MODELS = ["bert", "llama", "opt", "gpt2"]
AUTO_CLASS = {"bert": "AutoModel", "gpt2": "AutoModelForCausalLM", "llama": "AutoModelForCausalLM",
              "opt": "AutoModelForCausalLM"}
REPORT_KEYS = {"target_speedup", "predicted_speedup", "measured_speedup", "max_reachable_speedup", "dense_time_ms",
               "pruned_time_ms", "overall_sparsity", "score_dense_vs_pruned", "backend", "regime", "stage_seconds",
               "environment"}


def prune(model, config, tokenizer, layouts=False, **kwargs):
    """Prunes with a hand-written table; with `layouts`, the table carries the layouts `plan_layouts` finds."""
    units = find_units(model, config.skip_modules)
    plan = None
    if layouts:
        from spdy_hf.latency.cpu import plan_layouts

        plan = plan_layouts(model, units, example_inputs(seq=config.regime.sequence_length))
    table = handwritten_table(model, units, config, plan)
    result = SPDYPruner(model, config, tokenizer).prune(latency_table=table, progress=False, **kwargs)
    return result, table


@pytest.fixture(params=MODELS)
def pruned(request, tmp_path, tokenizer):
    """(name, dense copy of the state dict, result, table, config) for one tiny model pruned to 2x."""
    name = request.param
    model = MODEL_FACTORIES[name]()
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    config = small_config(tmp_path, target_speedup=2.0)
    result, table = prune(model, config, tokenizer, layouts=(name == "bert"))
    return name, dense_state, result, table, config


def test_report_and_profile(pruned, tmp_path, tokenizer):
    name, dense_state, result, table, config = pruned
    assert isinstance(result, PruningResult)
    report = result.report
    assert REPORT_KEYS <= set(report)
    assert set(report["stage_seconds"]) >= {"profile", "database", "search", "verify"}
    peaks = report["stage_peak_rss_mb"]  # monotone: the process's peak so far, when each stage ended
    assert set(peaks) >= {"start", "profile", "database", "search", "verify"}
    assert list(peaks.values()) == sorted(peaks.values()) and peaks["start"] > 0
    assert {"torch", "processor"} <= set(report["environment"])
    assert report["environment"]["torch"] == torch.__version__
    assert report["target_speedup"] == 2.0
    assert report["predicted_speedup"] >= 2.0
    assert report["predicted_speedup"] <= report["max_reachable_speedup"]
    assert report["max_reachable_speedup"] == pytest.approx(1.25 / (0.25 + 0.05))  # from the hand-written table
    assert report["backend"] == "cpu"
    assert report["regime"] == {"batch_size": 1, "sequence_length": 32, "dtype": "float32", "logits": "last"}
    assert report["dense_time_ms"] > 0 and report["pruned_time_ms"] > 0
    assert report["measured_speedup"] == pytest.approx(report["dense_time_ms"] / report["pruned_time_ms"])
    # a tiny model's real times need not follow the hand-written table; what verify did with them must add up: a
    # re-aim only after a miss, aiming higher, and target_met by search.target_tolerance
    for c in report["verify_corrections"]:
        assert c["direction"] == "up" and c["measured_speedup"] < 2.0 and c["new_aim"] > c["aim"]
    assert report["target_met"] is (report["measured_speedup"] >= 2.0 * (1 - config.search.target_tolerance))
    # the score is the returned model's distance to the dense one on the search's windows, recomputed here
    assert report["score_kind"] == ("cosine" if name == "bert" else "kl")
    windows = SPDYPruner(MODEL_FACTORIES[name](), config, tokenizer).calibration_windows(None)
    reference = MODEL_FACTORIES[name]()
    reference.load_state_dict(dense_state)
    batches = [{k: v[: config.search.eval_samples] for k, v in windows.items()}]
    scorer = DistanceScorer(reference, batches, "auto")
    assert scorer() == pytest.approx(0, abs=1e-6)  # the dense model against itself
    reference.load_state_dict(result.model.state_dict())
    assert report["score_dense_vs_pruned"] > 1e-9
    assert report["score_dense_vs_pruned"] == pytest.approx(scorer(), rel=1e-3, abs=1e-9)
    assert 0 < report["overall_sparsity"] < 1
    assert report["search"]["evaluations"] <= report["search"]["candidates"]
    assert report["search"]["candidates"] >= 5 + 3
    json.dumps(report)  # plain JSON

    # the budget holds in the table's own times: sum of unit times + constant <= base / target
    units = result.units
    assert [p["name"] for p in result.profile] == [u.name for u in units]
    constant = table.reference_time_ms - sum(p["dense_time_ms"] for p in result.profile)
    assert report["budget"]["constant_ms"] == pytest.approx(constant)
    assert sum(p["time_ms"] for p in result.profile) + constant <= table.base_time_ms / 2.0
    predicted = table.base_time_ms / (constant + sum(p["time_ms"] for p in result.profile))
    assert report["predicted_speedup"] == pytest.approx(predicted)

    levels = table.levels
    times = table.times_for(table.keys_for(units))
    zeros = total = 0
    for i, (p, unit) in enumerate(zip(result.profile, units)):
        assert p["shape"] == list(unit.shape)
        assert p["sparsity"] == levels[p["level"]]
        assert p["dense_time_ms"] == pytest.approx(times[i, 0])
        assert p["time_ms"] == pytest.approx(times[i, p["level"]])
        # the live weights carry exactly the profile's sparsity
        n_zero = int((unit.module.weight == 0).sum())
        assert n_zero == round(p["sparsity"] * unit.numel), p["name"]
        zeros += n_zero
        total += unit.numel
    assert report["overall_sparsity"] == pytest.approx(zeros / total)
    assert not (tmp_path / "cache" / "latency").exists()  # a given table means no measurement and no cache


def test_only_units_change(pruned):
    _, dense_state, result, _, _ = pruned
    unit_params = {f"{u.name}.weight" for u in result.units}
    state = result.model.state_dict()
    changed = {k for k in dense_state if not torch.equal(dense_state[k], state[k])}
    assert changed and changed <= unit_params  # embeddings, norms, biases and heads are untouched


def test_save_pretrained_and_reload(pruned, tmp_path):
    import transformers

    name, _, result, _, _ = pruned
    out = tmp_path / "out"
    path = result.save_pretrained(out)
    assert path == str(out)
    files = set(os.listdir(out))
    assert {"model.safetensors", "config.json", "spdy_profile.json", "spdy_report.json"} <= files
    assert "tokenizer.json" in files or "vocab.txt" in files
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".out")]  # no temp dirs left beside it

    config_json = json.loads((out / "config.json").read_text())
    spdy = config_json["spdy"]
    assert spdy["config"]["target_speedup"] == 2.0
    assert spdy["profile"] == {p["name"]: p["sparsity"] for p in result.profile}
    assert spdy["report"]["predicted_speedup"] == pytest.approx(result.report["predicted_speedup"])
    assert not hasattr(result.model.config, "spdy")  # the live config is left as it was

    profile = json.loads((out / "spdy_profile.json").read_text())
    assert len(profile["units"]) == len(result.units)
    for entry, unit in zip(profile["units"], result.units):
        assert {"name", "shape", "sparsity", "dense_time_ms", "time_ms"} <= set(entry)
        assert entry["name"] == unit.name and entry["shape"] == list(unit.shape)
    report = json.loads((out / "spdy_report.json").read_text())
    assert report["predicted_speedup"] == pytest.approx(result.report["predicted_speedup"])

    stored = load_file(str(out / "model.safetensors"))
    reloaded = getattr(transformers, AUTO_CLASS[name]).from_pretrained(str(out)).eval()
    live = result.model.state_dict()
    reloaded_state = reloaded.state_dict()
    for unit in result.units:
        key = f"{unit.name}.weight"
        assert torch.equal(reloaded_state[key], live[key])
        assert key in stored and torch.equal(stored[key], live[key])
    inputs = example_inputs()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs)[0], result.model(**inputs)[0])


def test_save_into_non_empty_dir_needs_overwrite(pruned, tmp_path):
    *_, result, _, _ = pruned
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SPDYError, match="not empty"):
        result.save_pretrained(out)
    assert os.listdir(out) == ["keep.txt"]
    result.save_pretrained(out, overwrite=True)
    assert "keep.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)
    # neither the old output nor a temp dir is left behind (the cache holds the pruning database)
    assert sorted(os.listdir(tmp_path)) == ["cache", "out"]
    empty = tmp_path / "empty"
    empty.mkdir()
    result.save_pretrained(empty)  # an empty directory is fine
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(SPDYError, match="is a file"):
        result.save_pretrained(afile)


def test_to_sparse_kernels_matches_pruned_dense_model(pruned):
    *_, result, _, _ = pruned
    inputs = example_inputs(batch=2, seq=32)
    model = result.model
    with torch.no_grad():
        expected = model(**inputs)[0]
    swapped = result.to_sparse_kernels()
    assert swapped is model
    modules = [model.get_submodule(u.name) for u in result.units]
    assert all(isinstance(m, FastLinear) for m in modules)
    assert [m.sparse for m in modules] == [p["sparsity"] > 0 for p in result.profile]
    assert [m.layout.code for m in modules] == [p["layout"] for p in result.profile]
    with torch.no_grad():
        got = model(**inputs)[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_bert_profile_uses_planned_layouts(tiny_bert, tmp_path, tokenizer):
    config = small_config(tmp_path)
    result, table = prune(tiny_bert, config, tokenizer, layouts=True)
    by_name = {p["name"]: p for p in result.profile}
    assert by_name["encoder.layer.0.attention.self.query"]["layout"] == "sc"
    assert by_name["encoder.layer.0.attention.self.key"]["input_leader"] == "encoder.layer.0.attention.self.query"
    assert by_name["encoder.layer.0.intermediate.dense"]["layout"] == "ct"
    assert by_name["encoder.layer.0.output.dense"]["layout"] == "tc"
    assert table.keys_for(result.units)[4] == "64x32:ct"


def test_dense_is_kept_where_sparse_is_slower(tiny_bert, tmp_path, tokenizer):
    # 0.1, 0.2 and 0.3 sparse are slower than dense in the hand-written table: never worth choosing
    config = small_config(tmp_path, target_speedup=1.6, levels=[0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.95])
    result, table = prune(tiny_bert, config, tokenizer)
    assert result.report["predicted_speedup"] >= 1.6
    for p in result.profile:
        assert p["time_ms"] <= p["dense_time_ms"], p
        assert p["sparsity"] not in (0.1, 0.2, 0.3)


def test_deterministic_for_a_seed(tmp_path, tokenizer):
    # verify re-aims on measured times, which a tiny model's few passes make noisy: the search's own profile is
    # what a seed fixes, so no corrections here
    config = small_config(tmp_path, search={"verify_corrections": 0})
    profiles = []
    for _ in range(2):
        model = MODEL_FACTORIES["llama"]()
        result, _ = prune(model, config, tokenizer)
        assert result.report["verify_corrections"] == []
        profiles.append([p["level"] for p in result.profile])
    assert profiles[0] == profiles[1]


def test_unreachable_target_raises_before_any_other_stage(tiny_bert, tmp_path, tokenizer, monkeypatch):
    import spdy_hf.search.run as search_run

    def must_not_run(*args, **kwargs):
        raise AssertionError("a stage after the budget check ran")

    monkeypatch.setattr(unstructured, "build_database", must_not_run)
    monkeypatch.setattr(search_run, "spdy_search", must_not_run)
    monkeypatch.setattr(unstructured, "time_kernels", must_not_run)
    before = {k: v.clone() for k, v in tiny_bert.state_dict().items()}
    config = small_config(tmp_path, target_speedup=50.0)
    units = find_units(tiny_bert, config.skip_modules)
    table = handwritten_table(tiny_bert, units, config)
    pruner = SPDYPruner(tiny_bert, config, tokenizer)
    with pytest.raises(UnreachableTargetError) as info:
        pruner.prune(latency_table=table, progress=False)
    times = table.times_for(table.keys_for(units))
    expected = compute_budget(times, table.base_time_ms, 50.0, reference_ms=table.reference_time_ms)
    assert info.value.max_reachable_speedup == pytest.approx(expected.max_reachable_speedup)
    assert info.value.target_speedup == 50.0
    assert "at most" in str(info.value) and f"{expected.max_reachable_speedup:.3f}" in str(info.value)
    assert set(pruner.stage_seconds) == {"profile"}
    after = tiny_bert.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_target_that_fits_only_before_rounding_is_unreachable(tiny_bert, tmp_path, tokenizer):
    # just under the maximum reachable speedup: the real-time budget fits, the rounded-up buckets do not
    config = small_config(tmp_path, target_speedup=1.25 / 0.3 * (1 - 1e-9),
                          search={"num_random_inits": 2, "patience": 1, "eval_samples": 2, "dp_buckets": 10})
    with pytest.raises(UnreachableTargetError):
        prune(tiny_bert, config, tokenizer)


def test_latency_table_as_path_and_from_config(tiny_bert, tmp_path, tokenizer):
    config = small_config(tmp_path, search={"verify_corrections": 0})  # the searched profiles, not re-aimed on noise
    units = find_units(tiny_bert, config.skip_modules)
    table = handwritten_table(tiny_bert, units, config)
    path = tmp_path / "table.json"
    table.save(path)
    assert LatencyTable.load(path) == table
    result = SPDYPruner(tiny_bert, config, tokenizer).prune(latency_table=str(path), progress=False)
    assert result.report["predicted_speedup"] >= 2.0
    config2 = small_config(tmp_path, latency_table=str(path), search={"verify_corrections": 0})
    result2 = SPDYPruner(MODEL_FACTORIES["bert"](), config2, tokenizer).prune(progress=False)
    assert [p["level"] for p in result2.profile] == [p["level"] for p in result.profile]


def test_latency_table_mismatches(tiny_bert, tiny_llama, tmp_path, tokenizer, caplog):
    config = small_config(tmp_path)
    units = find_units(tiny_bert, config.skip_modules)
    table = handwritten_table(tiny_bert, units, config)
    other_levels = handwritten_table(tiny_bert, units, small_config(tmp_path, levels=[0.5, 0.9]))
    with pytest.raises(SPDYError, match="levels"):
        SPDYPruner(tiny_bert, config, tokenizer).prune(latency_table=other_levels, progress=False)
    # a table of another model lacks this model's shapes
    llama_table = handwritten_table(tiny_llama, find_units(tiny_llama, config.skip_modules), config)
    table_of_other = LatencyTable.from_dict({**table.to_dict(), "shapes": {
        k: v for k, v in llama_table.shapes.items() if k not in table.shapes}})
    with pytest.raises(SPDYError, match="another model"):
        SPDYPruner(tiny_bert, config, tokenizer).prune(latency_table=table_of_other, progress=False)
    wrong_backend = LatencyTable.from_dict({**table.to_dict(), "backend": "cuda"})
    with pytest.raises(SPDYError, match="backend"):
        SPDYPruner(tiny_bert, config, tokenizer).prune(latency_table=wrong_backend, progress=False)
    other_regime = LatencyTable.from_dict({**table.to_dict(), "regime": {**table.regime, "batch_size": 8}})
    with caplog.at_level(logging.WARNING, logger="spdy_hf"):
        SPDYPruner(tiny_bert, config, tokenizer).prune(latency_table=other_regime, progress=False)
    assert "regime" in caplog.text


def test_latency_table_validation(tmp_path):
    good = dict(backend="cpu", regime={}, levels=[0.0, 0.5], shapes={"4x4:cc": [1.0, 0.5]}, base_time_ms=2.0)
    LatencyTable(**good)
    with pytest.raises(SPDYError, match="version"):
        LatencyTable(**good, version=99)
    with pytest.raises(SPDYError, match="0.0"):
        LatencyTable(**{**good, "levels": [0.5, 0.9]})
    with pytest.raises(SPDYError, match="4x4:cc"):
        LatencyTable(**{**good, "shapes": {"4x4:cc": [1.0]}})
    with pytest.raises(SPDYError, match="dense"):
        LatencyTable(**{**good, "shapes": {"4x4:cc": [None, 1.0]}})
    with pytest.raises(SPDYError, match="positive"):
        LatencyTable(**{**good, "base_time_ms": 0.0})
    with pytest.raises(SPDYError, match="not a valid|Not a valid"):
        LatencyTable.from_dict({**good, "extra": 1})
    t = LatencyTable(**{**good, "shapes": {"4x4:cc": [1.0, None]}})
    assert np.isinf(t.times_for(["4x4:cc"])[0, 1])
    with pytest.raises(SPDYError, match="does not exist"):
        LatencyTable.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SPDYError, match="not valid JSON"):
        LatencyTable.load(tmp_path / "bad.json")


def test_calibration_as_token_windows_without_tokenizer(tiny_llama, tmp_path):
    config = small_config(tmp_path)
    units = find_units(tiny_llama, config.skip_modules)
    table = handwritten_table(tiny_llama, units, config)
    windows = {"input_ids": torch.randint(1000, 30000, (4, 32), generator=torch.Generator().manual_seed(0))}
    result = SPDYPruner(tiny_llama, config).prune(calibration=windows, latency_table=table, progress=False)
    assert result.report["predicted_speedup"] >= 2.0
    with pytest.raises(SPDYError, match="input_ids"):
        SPDYPruner(tiny_llama, config).prune(calibration={"ids": windows["input_ids"]}, latency_table=table)
    with pytest.raises(SPDYError, match="tokenizer"):
        SPDYPruner(tiny_llama, config).prune(calibration=["some text"], latency_table=table)


def test_sequence_longer_than_the_model_allows(tiny_bert, tmp_path, tokenizer):
    config = small_config(tmp_path, regime={"batch_size": 1, "sequence_length": 256})
    with pytest.raises(SPDYError, match="regime.sequence_length"):
        SPDYPruner(tiny_bert, config, tokenizer).prune(progress=False)


def wide_bert():
    """Two BERT blocks with layers large enough (256 x 1024) that a 99 %-sparse CSR product beats the dense one on
    any CPU at 32 tokens, so a small speedup is always reachable with measured times."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024,
                                vocab_size=30522, max_position_embeddings=128)).eval()


def test_measured_table_is_cached_and_reused(tmp_path, tokenizer, monkeypatch, caplog):
    """The measuring path (cheap: 2 levels, 1 warm-up, 2 repeats), on a model where the target is reachable."""
    import spdy_hf.latency.cpu as cpu

    config = small_config(tmp_path, target_speedup=1.05, levels=[0.5, 0.99], method="magnitude")

    def run():
        result = SPDYPruner(wide_bert(), config, tokenizer).prune(progress=False)
        assert result.report["predicted_speedup"] >= 1.05  # reachable, and met by the DP on the measured table
        return result.latency_table

    first = run()
    cached = list((tmp_path / "cache" / "latency").glob("*.json"))
    assert len(cached) == 1
    table = LatencyTable.load(cached[0])
    units = find_units(wide_bert(), config.skip_modules)
    assert set(table.keys_for(units)) == set(table.shapes)
    assert table.levels == [0.0, 0.5, 0.99] and table.base_time_ms > 0
    assert set(table.unit_layouts) == {u.name for u in units}
    assert table.unit_layouts["encoder.layer.0.intermediate.dense"] == "ct"
    assert first == table

    def must_not_measure(*args, **kwargs):
        raise AssertionError("measured again despite a cached table")

    monkeypatch.setattr(cpu, "measure_latency_table", must_not_measure)
    assert run() == table
    # a corrupted cache file is measured again, with a warning, and replaced
    cached[0].write_text("{")
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="spdy_hf.latency.check"):
        run()
    assert "unreadable" in caplog.text
    assert LatencyTable.load(cached[0]).levels == [0.0, 0.5, 0.99]


@pytest.mark.slow
@pytest.mark.timeout(900)  # the OBS database of 36 units at 42 levels
def test_real_minilm_with_handwritten_table(minilm_path, tmp_path, tokenizer):
    """The bundled all-MiniLM-L6-v2 end to end, with a hand-written table (no profiling): opt in with --run-slow."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_path).eval()
    config = small_config(tmp_path, target_speedup=1.5)
    units = find_units(model, config.skip_modules)
    assert len(units) == 36  # 6 layers x (query, key, value, attention.output.dense, intermediate, output)
    result, _ = prune(model, config, tokenizer, layouts=True)
    assert result.report["predicted_speedup"] >= 1.5
    for p, unit in zip(result.profile, result.units):
        assert int((unit.module.weight == 0).sum()) == round(p["sparsity"] * unit.numel)
    inputs = tokenizer(["Pruning makes models faster."], return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
        result.to_sparse_kernels()
        torch.testing.assert_close(model(**inputs).last_hidden_state, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("margin", [0.0, 0.1])
def test_speedup_margin_raises_the_aim(tiny_llama, tmp_path, tokenizer, margin):
    search = {"num_random_inits": 5, "patience": 3, "eval_samples": 4, "dp_buckets": 1000, "speedup_margin": margin}
    config = small_config(tmp_path, target_speedup=2.0, search=search)
    result, _ = prune(tiny_llama, config, tokenizer)
    report = result.report
    assert report["search_target_speedup"] == pytest.approx(2.0 * (1 + margin))
    assert report["predicted_speedup"] >= 2.0 * (1 + margin)


def test_speedup_margin_is_capped_at_the_reachable_maximum(tiny_bert, tmp_path, tokenizer):
    # the hand-written table reaches at most 1.25 / 0.3 = 4.17x: a 5 % margin over 4.1x does not fit, 4.1x does
    config = small_config(tmp_path, target_speedup=4.1)
    result, _ = prune(tiny_bert, config, tokenizer)
    report = result.report
    assert 4.1 <= report["search_target_speedup"] <= report["max_reachable_speedup"]
    assert report["predicted_speedup"] >= 4.1


def test_measured_error_prior_and_database_report(tiny_llama, tmp_path, tokenizer):
    config = small_config(tmp_path, search={"num_random_inits": 5, "patience": 3, "eval_samples": 4,
                                            "dp_buckets": 1000, "error_prior": "measured"})
    result, table = prune(tiny_llama, config, tokenizer)
    report = result.report
    assert report["error_prior"] == "measured" and report["method"] == "obs"
    info = report["database"]
    assert info["propagation"] == "pruned" and info["calibration_windows"] == 8
    units = find_units(tiny_llama, config.skip_modules)
    times = table.times_for(table.keys_for(units))
    assert 1 <= info["anchor_level"] < times.shape[1]
    assert os.path.isfile(os.path.join(info["dir"], "manifest.json"))
    assert info["dir"].startswith(str(tmp_path / "cache" / "database"))


def test_database_is_reused_across_runs(tmp_path, tokenizer, monkeypatch):
    import spdy_hf.database.obs_database as obs_database

    config = small_config(tmp_path, database={"dir": str(tmp_path / "db")})
    prune(MODEL_FACTORIES["opt"](), config, tokenizer)
    monkeypatch.setattr(obs_database, "obs_prune_levels", lambda *a, **k: pytest.fail("solved again"))
    result, _ = prune(MODEL_FACTORIES["opt"](), config, tokenizer)
    assert result.report["database"]["dir"] == str(tmp_path / "db")


def test_magnitude_method_builds_nothing_on_disk(tiny_bert, tmp_path, tokenizer):
    result, _ = prune(tiny_bert, small_config(tmp_path, method="magnitude"), tokenizer)
    assert result.report["database"] == {"method": "magnitude"}
    assert not (tmp_path / "cache" / "database").exists()


def test_shortfall_in_verify_re_aims_the_profile(tiny_llama, tmp_path, tokenizer, monkeypatch):
    """When the measured speedup misses the target, the DP is re-solved with a higher aim and verified again."""
    config = small_config(tmp_path, target_speedup=1.5, method="magnitude",
                          search={"num_random_inits": 5, "patience": 3, "eval_samples": 4, "dp_buckets": 1000,
                                  "speedup_margin": 0.0})
    units = find_units(tiny_llama, config.skip_modules)
    table = handwritten_table(tiny_llama, units, config)
    times = table.times_for(table.keys_for(units))
    budget = compute_budget(times, table.base_time_ms, 1.5, reference_ms=table.reference_time_ms)
    seen = []

    def fake_verify(model, units_, sparsities, layouts, call, per, *timing):
        if per > 1:  # the decode regime's measurement (generate, per token), which the report adds for an LM
            return Measurement(10.0, 8.0, 10.0)
        # the "machine" is 8 % slower than the table for every profile: dense 10 ms, pruned = 10 / (0.92 * predicted)
        levels = [0.0] + sorted({s for s in table.levels if s > 0})
        profile = [levels.index(s) for s in sparsities]
        predicted = budget.predicted_speedup(times[np.arange(len(units_)), profile])
        seen.append(predicted)
        return Measurement(10.0, 10.0 / (0.92 * predicted), 10.0)

    monkeypatch.setattr(unstructured, "time_kernels", fake_verify)
    result = SPDYPruner(tiny_llama, config, tokenizer).prune(latency_table=table, progress=False)
    report = result.report
    assert len(seen) >= 3 and seen[1] == seen[0]  # a miss is measured twice before re-aiming
    assert seen[2] > seen[0]  # re-aimed at a faster profile
    assert report["verify_corrections"] and report["verify_corrections"][0]["measured_speedup"] < 1.5
    assert report["measured_speedup"] >= 1.5 or len(report["verify_corrections"]) == 2
    assert report["predicted_speedup"] == pytest.approx(seen[-1])
    # the weights in the model are those of the final profile
    for p, unit in zip(result.profile, units):
        assert int((unit.weight == 0).sum()) == round(p["sparsity"] * unit.numel)

    config0 = small_config(tmp_path, target_speedup=1.5, method="magnitude",
                           search={"num_random_inits": 5, "patience": 3, "eval_samples": 4, "dp_buckets": 1000,
                                   "speedup_margin": 0.0, "verify_corrections": 0})
    seen.clear()
    report = SPDYPruner(MODEL_FACTORIES["llama"](), config0, tokenizer).prune(latency_table=table,
                                                                               progress=False).report
    assert len(seen) == 1 and report["verify_corrections"] == [] and report["measured_speedup"] < 1.5


def test_a_miss_that_was_noise_is_not_re_aimed(tiny_llama, tmp_path, tokenizer, monkeypatch):
    """One noisy measurement below the target is confirmed by a second one before the profile is re-aimed."""
    config = small_config(tmp_path, target_speedup=1.5, method="magnitude")
    units = find_units(tiny_llama, config.skip_modules)
    table = handwritten_table(tiny_llama, units, config)
    calls = []

    def noisy_verify(model, units_, sparsities, layouts, call, per, *timing):
        if per > 1:  # the decode regime's measurement, which the report adds for an LM
            return Measurement(10.0, 8.0, 10.0)
        calls.append(list(sparsities))
        return Measurement(10.0, 10.0 / 1.3, 10.0) if len(calls) == 1 else Measurement(10.0, 10.0 / 1.6, 10.0)

    monkeypatch.setattr(unstructured, "time_kernels", noisy_verify)
    report = SPDYPruner(tiny_llama, config, tokenizer).prune(latency_table=table, progress=False).report
    assert len(calls) == 2 and calls[0] == calls[1]  # the same profile, measured again
    assert report["verify_corrections"] == [] and report["measured_speedup"] == pytest.approx(1.6)
