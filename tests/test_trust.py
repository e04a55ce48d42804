"""Nothing silent: caches keyed by what they depend on, tables checked in every family, settings honoured or
refused, invalid times refused with a message that names the unit and level."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from conftest import MODEL_FACTORIES, handwritten_table, small_config
from safetensors.torch import load_file
from test_structured_pruner import structured_table

from spdy_hf import SPDYPruner
from spdy_hf.errors import SPDYError
from spdy_hf.modeling.units import find_units


def perturbed(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """The same architecture and config with other weights (another fine-tune of one base, say)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def prune_saved(model, config, tokenizer, table, out) -> dict[str, torch.Tensor]:
    result = SPDYPruner(model, config, tokenizer).prune(latency_table=table, progress=False)
    result.save_pretrained(out)
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("family", ["structured", "unstructured"])
def test_two_checkpoints_of_one_config_get_their_own_databases(family, tmp_path, tokenizer):
    """Pruned one after the other into one cache, the second model's output is exactly what it is when pruned
    alone: its database was built from its own weights, not loaded from the first model's."""
    def table_for(model, config):
        if family == "structured":
            return structured_table(model, config)
        return handwritten_table(model, find_units(model, config.skip_modules), config)

    search = {"num_random_inits": 5, "patience": 3, "eval_samples": 4, "dp_buckets": 1000,
              "verify_corrections": 0}  # a re-aim depends on a timing: off, so both runs choose alike
    shared = small_config(tmp_path / "shared", target_speedup=1.6, family=family, search=search)
    first, second = MODEL_FACTORIES["bert"](), perturbed(MODEL_FACTORIES["bert"]())
    assert first.config.to_dict() == second.config.to_dict()
    prune_saved(first, shared, tokenizer, table_for(first, shared), tmp_path / "first")
    second_shared = prune_saved(second, shared, tokenizer, table_for(second, shared), tmp_path / "second")
    databases = sorted(p.name for p in (tmp_path / "shared" / "cache" / "database").iterdir())
    assert len(databases) == 2, databases

    alone = small_config(tmp_path / "alone", target_speedup=1.6, family=family, search=search)
    model = perturbed(MODEL_FACTORIES["bert"]())
    second_alone = prune_saved(model, alone, tokenizer, table_for(model, alone), tmp_path / "alone-out")
    assert second_shared.keys() == second_alone.keys()
    for name in second_alone:
        assert torch.equal(second_shared[name], second_alone[name]), name


def test_a_database_directory_refuses_a_model_with_other_weights(tmp_path, tokenizer):
    config = small_config(tmp_path, target_speedup=1.6, database={"dir": str(tmp_path / "db")})
    model = MODEL_FACTORIES["bert"]()
    table = handwritten_table(model, find_units(model, config.skip_modules), config)
    SPDYPruner(model, config, tokenizer).prune(latency_table=table, progress=False)
    other = perturbed(MODEL_FACTORIES["bert"]())
    with pytest.raises(SPDYError, match="other inputs.*weights"):
        SPDYPruner(other, config, tokenizer).prune(latency_table=table, progress=False)


@pytest.mark.parametrize("family", ["structured", "mixed"])
def test_every_family_checks_a_table_from_another_regime_or_backend(family, tmp_path, tokenizer, caplog):
    from test_structured_pruner import structured_part

    model = MODEL_FACTORIES["bert"]()
    config = small_config(tmp_path, target_speedup=1.3, family=family, method="magnitude")
    table = handwritten_table(model, find_units(model, config.skip_modules), config)
    table.structured = structured_part(model, config)
    table.base_time_ms = table.structured["dense_ms"]
    table.regime = {**table.regime, "batch_size": 8}  # measured for another batch size
    with caplog.at_level(logging.WARNING, logger="spdy_hf.latency.table"):
        result = SPDYPruner(model, config, tokenizer).prune(latency_table=table, progress=False)
    assert "measured in regime" in caplog.text and "'batch_size': 8" in caplog.text
    assert result.latency_table.regime["batch_size"] == 8  # saved under the labels it was measured with
    result.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "spdy_latency_table.json").read_text())
    assert saved["regime"]["batch_size"] == 8 and saved["structured"] == table.structured

    table.backend = "cuda"
    with pytest.raises(SPDYError, match="measured for backend 'cuda', not 'cpu'"):
        SPDYPruner(MODEL_FACTORIES["bert"](), config, tokenizer).prune(latency_table=table, progress=False)


def test_a_table_without_this_models_structured_times_is_refused(tmp_path, tokenizer):
    config = small_config(tmp_path, target_speedup=1.3, family="structured", method="magnitude")
    other = MODEL_FACTORIES["llama"]()
    table = structured_table(other, config)  # another model's groups
    with pytest.raises(SPDYError, match="no structured times for this model"):
        SPDYPruner(MODEL_FACTORIES["bert"](), config, tokenizer).prune(latency_table=table, progress=False)
    assert not (tmp_path / "cache" / "latency").exists()  # nothing measured, nothing cached


@pytest.mark.parametrize("family", ["structured", "mixed"])
def test_the_error_prior_setting_is_honoured_by_the_structured_families(family, tmp_path, tokenizer, monkeypatch):
    """'spdy' gives SPDY's reference curve (the fraction of a group removed, squared); 'measured' the database's
    relative output errors: the DP receives what was asked for, and the report says which."""
    from test_structured_pruner import structured_part

    import spdy_hf.search.run as search_run

    seen = {}
    real_search = search_run.spdy_search

    def spy(evaluate, times, budget_ms, **kwargs):
        seen["prior"] = kwargs["prior"]
        return real_search(evaluate, times, budget_ms, **kwargs)

    monkeypatch.setattr(search_run, "spdy_search", spy)
    priors, families = {}, {}
    for choice in ("spdy", "measured"):
        model = MODEL_FACTORIES["bert"]()
        config = small_config(tmp_path, target_speedup=1.3, family=family, levels=[0.5],
                              search={"num_random_inits": 3, "patience": 2, "eval_samples": 4, "dp_buckets": 1000,
                                      "error_prior": choice, "verify_corrections": 0})
        table = handwritten_table(model, find_units(model, config.skip_modules), config)
        table.structured = structured_part(model, config)
        result = SPDYPruner(model, config, tokenizer).prune(latency_table=table, progress=False)
        assert result.report["error_prior"] == choice
        priors[choice], families[choice] = np.asarray(seen["prior"]), result.groups
    # the structured levels' prior under 'spdy': removed fraction squared, for every group
    for i, group in enumerate(families["spdy"]):
        counts = table.structured["signatures"][table.structured["groups"][group["name"]]]["keep"]
        expected = [(1 - k / group["num_groups"]) ** 2 for k in counts]
        np.testing.assert_allclose(priors["spdy"][i, :len(counts)], expected)
    assert not np.allclose(priors["spdy"], priors["measured"])


def test_a_structured_plus_sparse_group_stays_shrunk_when_loaded_without_its_gpu(tmp_path, tokenizer, monkeypatch):
    """A mixed profile made for cuda, loaded where there is no GPU: groups with heads/neurons removed and the rest
    2:4 keep their shrink (only the 2:4 kernel is missing), with the zero-filled model's outputs."""
    from conftest import example_inputs
    from test_structured_pruner import outputs

    from spdy_hf.deploy.shrink import STRUCTURED_SPARSE
    from spdy_hf.output.load import load_pretrained

    model = MODEL_FACTORIES["bert"]()
    config = small_config(tmp_path, target_speedup=2.35, family="mixed", method="magnitude", levels=[0.5])
    result = SPDYPruner(model, config, tokenizer).prune(latency_table=combination_table(model, config),
                                                        progress=False)
    combined = [e for e in result.groups if e["family"] == STRUCTURED_SPARSE]
    assert combined
    inputs = example_inputs(1, 16)
    expected = outputs(result.model, inputs)
    out = result.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    saved["spdy"]["config"].update(backend="cuda", levels="2:4", regime={"batch_size": 1, "sequence_length": 32,
                                                                       "dtype": "float16"})  # as if on a GPU
    (tmp_path / "out" / "config.json").write_text(json.dumps(saved))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loaded, _, _ = load_pretrained(out)
    modules, dense = dict(loaded.named_modules()), dict(MODEL_FACTORIES["bert"]().named_modules())
    for e in combined:  # the consumer reads only the kept heads/neurons: shrunk by keep / num_groups
        full = dense[e["consumer"]].weight.shape[1]
        assert modules[e["consumer"]].weight.shape[1] == full * e["keep"] // e["num_groups"] < full
    torch.testing.assert_close(outputs(loaded, inputs), expected, rtol=1e-4, atol=1e-5)


def combination_table(model, config):
    """Hand-written times where only a combination reaches the target: removing a whole group is very slow, one
    sparse level (50 %) exists, and keeping k of n costs k / n of the group."""
    from conftest import MS_PER_WEIGHT

    from spdy_hf.latency.structured import group_signature, keep_counts
    from spdy_hf.modeling.groups import find_structured_groups, group_name

    table = handwritten_table(model, find_units(model, config.skip_modules), config)
    modules = dict(model.named_modules())
    signatures, names = {}, {}
    for g in find_structured_groups(model):
        dense = sum(MS_PER_WEIGHT * modules[n].weight.numel() for n in [*g.producers, g.consumer])
        counts = keep_counts(g, config.structured.head_step, config.structured.ffn_grid)
        signatures[group_signature(model, g)] = {
            "keep": counts, "times_ms": [dense * k / g.num_groups for k in counts[:-1]] + [1e3], "groups": 2}
        names[group_name(g)] = group_signature(model, g)
    table.structured = {"signatures": signatures, "groups": names, "dense_ms": table.base_time_ms}
    return table


@pytest.mark.parametrize("bad", [float("nan"), -0.5, "fast", float("inf")])
def test_a_table_with_an_invalid_time_is_refused_where_it_is_read(bad, tmp_path, tokenizer):
    model = MODEL_FACTORIES["bert"]()
    config = small_config(tmp_path)
    data = handwritten_table(model, find_units(model, config.skip_modules), config).to_dict()
    key = sorted(data["shapes"])[0]
    data["shapes"][key][2] = bad
    path = tmp_path / "table.json"
    path.write_text(json.dumps(data))  # NaN and Infinity are what json writes for them
    with pytest.raises(SPDYError, match=f"shape {key} at level 2.*not a valid time"):
        SPDYPruner(model, config, tokenizer).prune(latency_table=str(path), progress=False)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(base_time_ms=0.0), "base_time_ms: 0.0"),
    (lambda d: d.update(base_time_ms=float("inf")), "base_time_ms: inf"),
    (lambda d: d.update(deployed_dense_time_ms=-1.0), "deployed_dense_time_ms: -1.0"),
    (lambda d: d["structured"]["signatures"][next(iter(d["structured"]["signatures"]))]["times_ms"].__setitem__(
        1, -2.0), "keeping .*: -2.0"),
    (lambda d: d["structured"].update(dense_ms=float("nan")), "structured dense_ms: nan"),
])
def test_invalid_table_figures_are_refused(edit, message, tmp_path):
    from test_structured_pruner import structured_part

    from spdy_hf.latency.table import LatencyTable

    model = MODEL_FACTORIES["bert"]()
    config = small_config(tmp_path)
    data = handwritten_table(model, find_units(model, config.skip_modules), config).to_dict()
    data["structured"] = structured_part(model, config)
    LatencyTable.from_dict(json.loads(json.dumps(data)))  # valid as written
    edit(data)
    with pytest.raises(SPDYError, match=message):
        LatencyTable.from_dict(data)


def test_the_dp_and_the_budget_refuse_invalid_times_naming_the_unit_and_level():
    from spdy_hf.search import compute_budget, solve_dp

    names = ["layer.0.q", "layer.0.k"]
    times = np.array([[1.0, 0.5, np.inf], [1.0, -0.25, 0.2]])  # inf: a level that cannot run (allowed)
    with pytest.raises(SPDYError, match=r"unit layer.0.k at level 1: -0.25 ms"):
        compute_budget(times, 4.0, 1.5, names=names)
    with pytest.raises(SPDYError, match=r"unit #1 at level 1: -0.25 ms"):
        solve_dp(np.zeros_like(times), times, 2.0, 100)
    with pytest.raises(SPDYError, match=r"unit layer.0.q at level 0: nan"):
        compute_budget(np.array([[np.nan, 0.5], [1.0, 0.5]]), 4.0, 1.5, names=names)
    with pytest.raises(SPDYError, match=r"costs \(2, 2\), times \(2, 3\)"):
        solve_dp(np.zeros((2, 2)), times.clip(0), 2.0, 100)
    # the searched units cannot take longer than the model: no negative or infinite "max reachable speedup"
    with pytest.raises(SPDYError, match=r"searched units alone take 2.000 ms, longer than the whole dense model "
                                        r"\(1.500 ms\)"):
        compute_budget(times.clip(0), 1.5, 1.2, names=names)
    budget = compute_budget(times.clip(0), 4.0, 1.5, names=names)
    assert np.isfinite(budget.max_reachable_speedup) and budget.max_reachable_speedup > 1
