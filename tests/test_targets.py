"""Several targets in one run: `SPDYPruner.prune_targets`, `spdy-hf prune --target-speedup 1.5,2`, the search started
from other targets' sensitivities, and the Hub collection of the outputs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import MODEL_FACTORIES, small_config
from test_cli import no_loading  # noqa: F401 - a fixture
from test_structured_pruner import structured_table

from spdy_hf import SPDYPruner
from spdy_hf.cli import main
from spdy_hf.errors import ConfigError, SPDYError
from spdy_hf.families import StructuredFamily, UnstructuredFamily
from spdy_hf.integrations.hub import push_targets
from spdy_hf.pipeline import StageTimer
from spdy_hf.pruner import check_targets
from spdy_hf.search.spdy import spdy_search

# ---------------------------------------------------------------------------------------------- the search


def additive_problem(n_units: int = 6, n_levels: int = 5, seed: int = 0):
    """Times falling with the level and a score that adds each unit's own cost of its level."""
    rng = np.random.default_rng(seed)
    times = np.sort(rng.uniform(0.2, 1.0, (n_units, n_levels)), axis=1)[:, ::-1].copy()
    times[:, 0] = 1.0
    cost = np.cumsum(rng.uniform(0.0, 1.0, (n_units, n_levels)), axis=1)
    cost[:, 0] = 0.0
    scored = []

    def evaluate(profile):
        scored.append(tuple(int(k) for k in profile))
        return float(cost[np.arange(n_units), profile].sum())

    return times, evaluate, scored


def test_a_short_search_from_given_sensitivities_starts_there_and_redraws_one_unit_at_a_time():
    times, evaluate, scored = additive_problem()
    budget = 0.7 * times[:, 0].sum()
    full = spdy_search(evaluate, times, budget, num_random_inits=20, patience=20, neighbourhood_fraction=0.5,
                       max_candidates=None, buckets=1000, progress=False)
    scored.clear()
    warm = spdy_search(evaluate, times, 0.6 * times[:, 0].sum(), num_random_inits=20, patience=20,
                       neighbourhood_fraction=0.5, max_candidates=15, buckets=1000, starts=[full.sensitivities],
                       only_starts=True, progress=False)
    assert warm.candidates <= 15 and warm.started_from == "1 earlier search"
    assert [k for k, _ in warm.schedule] == [1]  # no random starts, no wide neighbourhoods
    assert full.started_from == "random" and full.schedule[0][0] == 3
    # the first candidate is the start's sensitivities solved for this budget
    from spdy_hf.search.dp import solve_dp
    from spdy_hf.search.spdy import error_prior

    first = solve_dp(full.sensitivities[:, None] * error_prior(times.shape[1])[None, :], times,
                     0.6 * times[:, 0].sum(), 1000)
    assert scored[0] == tuple(int(k) for k in first)
    assert warm.score <= evaluate(first)


def test_a_full_search_tries_the_given_sensitivities_before_its_random_starts():
    times, evaluate, scored = additive_problem()
    budget = 0.6 * times[:, 0].sum()
    start = np.linspace(0.1, 1.0, times.shape[0])
    result = spdy_search(evaluate, times, budget, num_random_inits=20, patience=20, neighbourhood_fraction=0.5,
                         max_candidates=60, buckets=1000, starts=[start], progress=False)
    from spdy_hf.search.dp import solve_dp
    from spdy_hf.search.spdy import error_prior

    first = solve_dp(start[:, None] * error_prior(times.shape[1])[None, :], times, budget, 1000)
    assert scored[0] == tuple(int(k) for k in first)
    assert result.started_from == "random and 1 earlier search" and result.candidates <= 60
    assert result.schedule[0][0] == 3  # the full schedule: its neighbourhoods shrink from the configured size


def test_search_starts_must_fit_the_units():
    times, evaluate, _ = additive_problem()
    for starts in ([], [np.ones(5)]):
        with pytest.raises(ValueError, match="sensitivity vectors"):
            spdy_search(evaluate, times, 0.7 * times[:, 0].sum(), starts=starts, progress=False)


# ---------------------------------------------------------------------------------------------- targets
def test_targets_are_checked():
    assert check_targets([1.25, 2]) == [1.25, 2.0] and check_targets(1.5) == [1.5]
    with pytest.raises(ConfigError, match="repeat"):
        check_targets([1.5, 1.5])
    with pytest.raises(ConfigError, match="greater than 1"):
        check_targets([1.5, 0.9])
    with pytest.raises(ConfigError, match="No target"):
        check_targets([])


def test_a_stage_timer_branch_starts_from_the_shared_stages_and_adds_to_the_run():
    run = StageTimer()
    with run("profile"):
        pass
    first, second = run.branch(), run.branch()
    with first("search"):
        pass
    with second("search"):
        pass
    assert set(first.seconds) == set(second.seconds) == {"profile", "search"}
    assert run.seconds["search"] == pytest.approx(first.seconds["search"] + second.seconds["search"], abs=2e-3)
    third = run.branch()  # a later target starts from the shared stages only, not the earlier targets' own
    assert set(third.seconds) == {"profile"} and third.seconds["profile"] == run.seconds["profile"]
    assert "search" in run.peak_mb


def count_calls(monkeypatch, cls, name):
    calls = []
    original = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        calls.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, wrapper)
    return calls


def test_one_run_prunes_each_target_from_the_dense_model_sharing_profile_and_database(tmp_path, tokenizer,
                                                                                       monkeypatch):
    model = MODEL_FACTORIES["bert"]()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = small_config(tmp_path, family="structured", search={"verify_corrections": 0, "warm_candidates": 7})
    assert small_config(tmp_path).search.warm_candidates is None  # by default each target gets the full search
    table = structured_table(model, config)
    databases = count_calls(monkeypatch, StructuredFamily, "build_database")
    plans = count_calls(monkeypatch, StructuredFamily, "plan")
    single = SPDYPruner(MODEL_FACTORIES["bert"](), small_config(tmp_path, target_speedup=2.5, family="structured",
                                                                  search={"verify_corrections": 0}), tokenizer)
    alone = single.prune(latency_table=table, progress=False)
    alone_state = {n: p.detach().clone() for n, p in alone.model.named_parameters()}
    databases.clear()
    plans.clear()

    results = SPDYPruner(model, config, tokenizer).prune_targets([2.5, 1.3], latency_table=table, progress=False)
    first = next(results)
    assert first.report["target_speedup"] == 2.5 and first.report["run"]["index"] == 0
    assert first.report["search"]["started_from"] == "random"
    # the first target is the job for it alone: the same search, the same weights
    assert first.profile == alone.profile
    for name, p in first.model.named_parameters():
        assert torch.equal(p, alone_state[name]), name
    saved = first.save_pretrained(tmp_path / "first")

    second = next(results)
    assert second.report["target_speedup"] == 1.3 and second.report["predicted_speedup"] >= 1.3
    assert second.report["run"] == {"targets": [2.5, 1.3], "index": 1,
                                    "shared_stages": ["profile", "heldout", "database"]}
    search = second.report["search"]
    assert search["started_from"] == "1 earlier search" and search["candidates"] <= 7
    assert "restore" in second.report["stage_seconds"] and "database" in second.report["stage_seconds"]
    assert len(databases) == 1 and len(plans) == 1  # one profile and one database for both targets
    # the second target began from the dense weights: every head or neuron it kept has its producers' rows as
    # they were (structured pruning compensates in the consumer only), whatever the first target removed
    params = dict(model.named_parameters())
    for g in second.groups:
        for name in g["producers"]:
            weight, before = params[name + ".weight"], dense[name + ".weight"]
            unchanged = (weight == before).all(dim=1).sum().item()
            assert unchanged == g["keep"] * weight.shape[0] // g["num_groups"], name
    assert sum(g["keep"] for g in second.groups) > sum(g["keep"] for g in first.groups)
    # the first result's model has moved on: saving it now would write the second target's weights
    with pytest.raises(SPDYError, match="pruned again for the next target"):
        first.save_pretrained(tmp_path / "late")
    assert not (tmp_path / "late").exists()
    with pytest.raises(StopIteration):
        next(results)
    written = json.loads(open(os.path.join(saved, "spdy_report.json")).read())
    assert written["target_speedup"] == 2.5 and written["run"]["targets"] == [2.5, 1.3]
    card = open(os.path.join(saved, "README.md"), encoding="utf-8").read()
    assert "Pruned in one run together with the 1.3× target (one latency table and one database for all" in card


def test_a_family_anchored_at_the_target_builds_a_database_per_target(tmp_path, tokenizer, monkeypatch):
    from conftest import handwritten_table

    from spdy_hf.modeling.units import find_units

    model = MODEL_FACTORIES["bert"]()
    config = small_config(tmp_path, search={"verify_corrections": 0, "warm_candidates": 5})
    table = handwritten_table(model, find_units(model, config.skip_modules), config)
    databases = count_calls(monkeypatch, UnstructuredFamily, "build_database")
    results = list(r.report for r in SPDYPruner(model, config, tokenizer).prune_targets(
        [1.5, 2.0], latency_table=table, progress=False))
    assert [r["target_speedup"] for r in results] == [1.5, 2.0]
    assert len(databases) == 2 and "database" not in results[0]["run"]["shared_stages"]


def test_an_unreachable_target_stops_the_run_before_any_result(tmp_path, tokenizer, monkeypatch):
    from spdy_hf.errors import UnreachableTargetError

    model = MODEL_FACTORIES["bert"]()
    config = small_config(tmp_path, family="structured")
    databases = count_calls(monkeypatch, StructuredFamily, "build_database")
    with pytest.raises(UnreachableTargetError):
        next(SPDYPruner(model, config, tokenizer).prune_targets([1.5, 50.0],
                                                                latency_table=structured_table(model, config),
                                                                progress=False))
    assert databases == []


# ---------------------------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize("flag", ["1.5,x", ","])
def test_a_bad_target_list_is_refused(flag, tmp_path, capsys, no_loading):  # noqa: F811 - the fixture
    with pytest.raises(SystemExit) as info:
        main(["prune", "--target-speedup", flag, "-o", str(tmp_path / "out")])
    assert info.value.code == 2 and "--target-speedup" in capsys.readouterr().err


def test_repeated_targets_are_refused_before_loading(tmp_path, capsys, no_loading):  # noqa: F811 - the fixture
    assert main(["prune", "--target-speedup", "2,2", "-o", str(tmp_path / "out")]) == 2
    assert "repeat" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_cli_writes_one_output_per_target(tmp_path, tokenizer, capsys, monkeypatch):
    import yaml

    from spdy_hf.output.load import load_pretrained

    model = MODEL_FACTORIES["bert"]()
    model_dir = tmp_path / "tiny-bert"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    config = small_config(tmp_path, family="structured", search={"verify_corrections": 0})
    structured_table(model, config).save(tmp_path / "table.json")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(config.to_dict()))
    out = tmp_path / "family"
    (out / "spdy-tiny-bert-2x").mkdir(parents=True)
    (out / "spdy-tiny-bert-2x" / "keep.txt").write_text("mine")
    args = ["prune", str(model_dir), "--recipe", str(recipe), "--latency-table", str(tmp_path / "table.json"),
            "--target-speedup", "1.5,2", "-o", str(out), "--no-progress", "--allow-shortfall"]
    assert main(args) == 2  # one of the outputs exists: refused before any work
    assert "not empty" in capsys.readouterr().err
    assert os.listdir(out) == ["spdy-tiny-bert-2x"]
    assert main([*args, "--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert "2 targets in one run" in printed
    assert sorted(os.listdir(out)) == ["spdy-tiny-bert-1.5x", "spdy-tiny-bert-2x"]
    for target in (1.5, 2.0):
        directory = out / f"spdy-tiny-bert-{target:g}x"
        report = json.loads((directory / "spdy_report.json").read_text())
        assert report["target_speedup"] == target and report["predicted_speedup"] >= target
        assert report["search"]["started_from"] == ("random" if target == 1.5 else "random and 1 earlier search")
        assert str(directory) in printed
        loaded, _, _ = load_pretrained(str(directory))
        assert loaded is not None


# ---------------------------------------------------------------------------------------------- the Hub
class FakeApi:
    def __init__(self, fail_collection: bool = False):
        self.calls, self.fail_collection = [], fail_collection

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, folder_path, repo_id, **kwargs):
        self.calls.append(("upload_folder", repo_id, os.path.basename(folder_path)))

    def create_collection(self, title, **kwargs):
        if self.fail_collection:
            raise RuntimeError("401 for token hf_abcdefghijklmnop")
        self.calls.append(("create_collection", title, kwargs["namespace"], kwargs["exists_ok"]))
        return type("Collection", (), {"slug": "me/tiny-abc123", "url": "https://huggingface.co/collections/x"})()

    def add_collection_item(self, slug, item_id, item_type, **kwargs):
        self.calls.append(("add_collection_item", slug, item_id, item_type, kwargs["note"]))


def saved_output(tmp_path, name, target, measured):
    directory = tmp_path / name
    directory.mkdir()
    report = {"target_speedup": target, "measured_speedup": measured}
    for f, content in (("config.json", {}), ("spdy_profile.json", {}), ("spdy_report.json", report)):
        (directory / f).write_text(json.dumps(content))
    (directory / "README.md").write_text("card")
    return str(directory), report


def test_push_targets_names_a_repo_per_target_and_gathers_them_in_a_collection(tmp_path):
    outputs = [saved_output(tmp_path, "a", 1.5, 1.52), saved_output(tmp_path, "b", 2.0, 2.04)]
    api = FakeApi()
    pushed = push_targets(outputs, "me/tiny", api=api)
    assert pushed == [("me/tiny-1.5x", "https://huggingface.co/me/tiny-1.5x"),
                      ("me/tiny-2x", "https://huggingface.co/me/tiny-2x"),
                      (None, "https://huggingface.co/collections/x")]
    assert ("upload_folder", "me/tiny-2x", "b") in api.calls
    assert ("create_collection", "tiny SPDY 1.5x, 2x", "me", True) in api.calls
    items = [c for c in api.calls if c[0] == "add_collection_item"]
    assert items == [("add_collection_item", "me/tiny-abc123", "me/tiny-1.5x", "model", "1.5x target, 1.52x measured"),
                     ("add_collection_item", "me/tiny-abc123", "me/tiny-2x", "model", "2x target, 2.04x measured")]


def test_a_failed_collection_says_the_models_are_up_and_never_shows_the_token(tmp_path):
    outputs = [saved_output(tmp_path, "a", 1.5, 1.52)]
    with pytest.raises(SPDYError) as info:
        push_targets(outputs, "me/tiny", token="hf_abcdefghijklmnop", api=FakeApi(fail_collection=True))
    assert "models were pushed" in str(info.value) and "hf_abcdefghijklmnop" not in str(info.value)
