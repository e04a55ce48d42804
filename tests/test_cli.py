"""The `spdy-hf` command line, run in-process (and two subprocess checks: cheap import, `python -m`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import handwritten_table, make_bert, small_config

from spdy_hf import SPDYConfig
from spdy_hf.cli import main
from spdy_hf.modeling.units import find_units

SMALL_RECIPE = {
    "calibration": {"num_samples": 8, "sequence_length": 32},
    "search": {"num_random_inits": 5, "patience": 3, "eval_samples": 4, "dp_buckets": 1000, "score_dtype": "float32",
               "verify_overshoot": None},  # a hand-written table need not match the tiny model
    "timing": {"warmup": 1, "repeats": 2, "model_repeats": 2, "verify_repeats": 10, "check_profiles": 0,
               "busy_factor": 0, "generate_tokens": 4},
    "regime": {"batch_size": 1, "sequence_length": 32, "context_length": 32},
    "evaluation": {"num_samples": 2, "sequence_length": 32},
    "family": "unstructured",  # the hand-written tables here are per-layer ones
}


def must_not_load(*args, **kwargs):
    raise AssertionError("the model was loaded")


@pytest.fixture
def no_loading(monkeypatch):
    import spdy_hf.modeling.loading

    monkeypatch.setattr(spdy_hf.modeling.loading, "load_model_and_tokenizer", must_not_load)


@pytest.fixture
def tiny_model_dir(tmp_path, tokenizer):
    """A tiny BERT saved with save_pretrained, the MiniLM tokenizer beside it, a hand-written table and a recipe."""
    model = make_bert()
    model_dir = tmp_path / "tiny-bert"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    config = small_config(tmp_path)
    table_path = tmp_path / "table.json"
    handwritten_table(model, find_units(model, config.skip_modules), config).save(table_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**SMALL_RECIPE, "cache_dir": str(tmp_path / "cache")}))
    return model_dir, table_path, recipe


@pytest.mark.parametrize("command", ["prune", "profile"])
def test_a_recipe_naming_an_unknown_family_stops_before_the_model_is_loaded(command, tmp_path, capsys, no_loading):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("family: rows\n")
    code = main([command, "--recipe", str(recipe), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "family='rows' is not a known level family; known: structured, unstructured, mixed" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["0.5", "1.0", "1"])
def test_target_not_above_one_is_rejected(target, tmp_path, capsys, no_loading):
    code = main(["prune", "--target-speedup", target, "-o", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "target_speedup" in err and "greater than 1" in err
    assert not (tmp_path / "out").exists()


def test_missing_model_path(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["prune", "./does/not/exist", "--target-speedup", "2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "does/not/exist" in err and "does not exist" in err
    assert os.listdir(tmp_path) == []  # no default output directory was made


def test_non_empty_output_dir_rejected_before_loading(tmp_path, capsys, no_loading):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code = main(["prune", "./does/not/exist", "--target-speedup", "2", "-o", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    assert os.listdir(out) == ["precious.txt"] and (out / "precious.txt").read_text() == "keep me"


def test_unknown_recipe_key(tmp_path, capsys, no_loading):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("target_speedup: 2\nsearch:\n  num_random_init: 5\n")
    code = main(["prune", "--recipe", str(recipe), "-o", str(tmp_path / "out")])
    assert code == 2
    assert "search.num_random_init" in capsys.readouterr().err


def test_missing_recipe_file(tmp_path, capsys, no_loading):
    code = main(["prune", "--recipe", str(tmp_path / "nope.yaml"), "-o", str(tmp_path / "out")])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_prune_tiny_bert_end_to_end(tiny_model_dir, tmp_path, capsys):
    model_dir, table_path, recipe = tiny_model_dir
    out = tmp_path / "pruned"
    # hand-written times: what the tiny model really measures need not meet them (exit code 3 is tested below)
    code = main(["prune", str(model_dir), "--recipe", str(recipe), "--latency-table", str(table_path),
                 "--target-speedup", "2", "-o", str(out), "--no-progress", "--allow-shortfall"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert str(out) in captured.out and "predicted speedup" in captured.out
    files = set(os.listdir(out))
    assert {"model.safetensors", "config.json", "spdy_profile.json", "spdy_report.json"} <= files
    report = json.loads((out / "spdy_report.json").read_text())
    assert report["target_speedup"] == 2.0 and report["predicted_speedup"] >= 2.0
    assert report["regime"]["sequence_length"] == 32
    assert json.loads((out / "config.json").read_text())["spdy"]["config"]["search"]["num_random_inits"] == 5
    assert not (tmp_path / "cache" / "latency").exists()  # the given table was used, nothing measured
    assert report["database"]["method"] == "obs"  # the default method keeps its database in the cache
    assert os.path.isfile(os.path.join(report["database"]["dir"], "manifest.json"))

    # the output now exists: a second run is refused before any work, then allowed with --overwrite
    again = ["prune", str(model_dir), "--recipe", str(recipe), "--latency-table", str(table_path),
             "--target-speedup", "2", "-o", str(out), "--no-progress", "--allow-shortfall"]
    assert main(again) == 2
    assert "not empty" in capsys.readouterr().err
    assert main([*again, "--overwrite", "--seed", "1"]) == 0
    assert json.loads((out / "spdy_report.json").read_text())["target_speedup"] == 2.0


def test_unreachable_target_writes_nothing(tiny_model_dir, tmp_path, capsys):
    model_dir, table_path, recipe = tiny_model_dir
    out = tmp_path / "pruned"
    before = set(os.listdir(tmp_path))
    code = main(["prune", str(model_dir), "--recipe", str(recipe), "--latency-table", str(table_path),
                 "--target-speedup", "50", "-o", str(out), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "at most" in err and "unreachable" in err
    assert not out.exists()
    assert set(os.listdir(tmp_path)) == before  # no temp or partial directories beside it


def test_help_and_missing_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["prune", "--help"])
    assert info.value.code == 0
    assert "--target-speedup" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def _run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args] if not code else [sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=120)


def test_import_is_cheap():
    code = (
        "import sys, spdy_hf\n"
        "assert spdy_hf.__version__\n"
        "bad = [m for m in ('transformers.trainer', 'transformers.models.bert') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "assert 'spdy_hf.pruner' not in sys.modules\n"
        "spdy_hf.SPDYConfig\n"  # a lazy name resolves without importing model code either
        "assert 'transformers.trainer' not in sys.modules\n"
        "import torch\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('ok')\n"
    )
    proc = _run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_pruner_import_does_not_import_trainer():
    code = (
        "import sys\n"
        "from spdy_hf import SPDYPruner, PruningResult, LatencyTable, FastLinear, find_units\n"
        "assert 'transformers.trainer' not in sys.modules, 'Trainer imported'\n"
        "import torch\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    proc = _run_python(code)
    assert proc.returncode == 0, proc.stderr


def test_python_m_help():
    proc = _run_python("", "-m", "spdy_hf", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "prune" in proc.stdout


def test_profile_command_writes_a_table_prune_can_use(tiny_model_dir, tmp_path, capsys, one_thread):
    model_dir, _, recipe = tiny_model_dir
    table = tmp_path / "measured.json"
    code = main(["profile", str(model_dir), "--recipe", str(recipe), "-o", str(table), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    data = json.loads(table.read_text())
    assert data["backend"] == "cpu" and data["regime"]["sequence_length"] == 32 and data["base_time_ms"] > 0
    assert str(table) in capsys.readouterr().out
    # never overwritten silently
    assert main(["profile", str(model_dir), "--recipe", str(recipe), "-o", str(table), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # the structured levels, measured in the model: removing heads and neurons pays on any CPU, so 1.05x is
    # reachable (the tiny model's CSR levels alone may not be)
    structured = tmp_path / "structured.json"
    code = main(["profile", str(model_dir), "--recipe", str(recipe), "--family", "structured", "-o", str(structured),
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert json.loads(structured.read_text())["structured"]["signatures"]
    out = tmp_path / "pruned"
    code = main(["prune", str(model_dir), "--recipe", str(recipe), "--family", "structured", "--latency-table",
                 str(structured), "--method", "magnitude", "--target-speedup", "1.05", "-o", str(out), "--no-progress",
                 "--allow-shortfall"])  # the search's target, not a timing, is what this test asserts
    printed = capsys.readouterr()
    assert code == 0, printed.err
    report = json.loads((out / "spdy_report.json").read_text())
    assert report["predicted_speedup"] >= 1.05 and report["max_reachable_speedup"] > 1.05
    # verify timed both models, and every figure of it says the same: the printed lines, the ratio of the times, and
    # target_met by search.target_tolerance (a tiny model's real times may miss 1.05x: --allow-shortfall keeps exit 0)
    measured = report["measured_speedup"]
    assert measured == pytest.approx(report["dense_time_ms"] / report["pruned_time_ms"]) and measured > 0
    assert f"measured speedup   {measured:.3f}x (dense {report['dense_time_ms']:.2f} ms" in printed.out
    assert f"predicted speedup  {report['predicted_speedup']:.3f}x" in printed.out
    tolerance = SPDYConfig().search.target_tolerance
    assert report["target_met"] is (report["verify_busy"] is None and measured >= 1.05 * (1 - tolerance))


def test_cuda_backend_flags_without_a_gpu(tiny_model_dir, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    model_dir, _, recipe = tiny_model_dir
    code = main(["profile", str(model_dir), "--recipe", str(recipe), "--backend", "cuda", "--dtype", "bfloat16",
                 "-o", str(tmp_path / "t.json"), "--no-progress"])
    assert code == 2
    assert "needs an NVIDIA GPU" in capsys.readouterr().err and not (tmp_path / "t.json").exists()
    code = main(["prune", str(model_dir), "--recipe", str(recipe), "--backend", "cuda", "-o", str(tmp_path / "o"),
                 "--no-progress"])
    assert code == 2 and "regime.dtype='float32' is not supported by backend 'cuda'" in capsys.readouterr().err


def test_prune_structured_family_from_the_command_line(tiny_model_dir, tmp_path, capsys):
    from test_structured_pruner import structured_table

    from spdy_hf import SPDYConfig

    model_dir, _, recipe = tiny_model_dir
    config = SPDYConfig.load(recipe)
    table = tmp_path / "structured_table.json"
    structured_table(make_bert(), config).save(table)
    out = tmp_path / "out"
    code = main(["prune", str(model_dir), "--recipe", str(recipe), "--family", "structured", "--latency-table",
                 str(table), "--target-speedup", "1.6", "-o", str(out), "--no-progress", "--allow-shortfall",
                 "--max-candidates", "7"])
    assert code == 0, capsys.readouterr().err
    with open(out / "spdy_profile.json") as f:
        groups = json.load(f)["groups"]
    assert len(groups) == 4 and any(g["keep"] < g["num_groups"] for g in groups)
    with open(out / "spdy_report.json") as f:
        report = json.load(f)
    assert report["family"] == "structured"
    search = report["search"]  # 5 random starts, then 2 mutations: fewer than patience (3) failures, so cut short
    assert search["max_candidates"] == 7 and search["candidates"] == 7 and search["cut_short"]
    assert search["schedule"] == [[1, 2]]
    assert search["improvements"][0][0] == 1 and search["improvements"][-1][0] <= 7

    # 'none' lifts the bound: the recipe's full schedule (at least 5 + 3 candidates, not cut short)
    out = tmp_path / "unbounded"
    assert main(["prune", str(model_dir), "--recipe", str(recipe), "--family", "structured", "--latency-table",
                 str(table), "--target-speedup", "1.6", "-o", str(out), "--no-progress", "--allow-shortfall",
                 "--max-candidates", "none"]) == 0
    with open(out / "spdy_report.json") as f:
        search = json.load(f)["search"]
    assert search["max_candidates"] is None and not search["cut_short"] and search["candidates"] >= 8
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", str(model_dir), "--max-candidates", "many", "-o", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "neither a number of candidates nor 'none'" in capsys.readouterr().err


def test_a_missed_target_is_written_and_exits_3(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """The measured speedup misses the target by more than the tolerance: the output is still written, marked
    target_met: false in the report and on the model card, and the command exits 3 (0 with --allow-shortfall)."""
    import spdy_hf.families.unstructured as unstructured
    from spdy_hf.families import Measurement

    monkeypatch.setattr(unstructured, "time_kernels", lambda *a: Measurement(10.0, 10.0 / 1.5, 10.0))  # 1.5x
    model_dir, table_path, recipe = tiny_model_dir
    out = tmp_path / "pruned"
    args = ["prune", str(model_dir), "--recipe", str(recipe), "--latency-table", str(table_path), "--target-speedup",
            "2", "-o", str(out), "--no-progress", "--push-to-hub", "me/never"]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "target missed: measured 1.500x for a 2x target" in err and "--allow-shortfall" in err
    report = json.loads((out / "spdy_report.json").read_text())
    assert report["target_met"] is False and report["measured_speedup"] == pytest.approx(1.5)
    assert "| target met | **no**: measured 1.500× for a 2× target |" in (out / "README.md").read_text()
    assert json.loads((out / "config.json").read_text())["spdy"]["report"]["target_met"] is False

    monkeypatch.setattr(unstructured, "time_kernels", lambda *a: Measurement(10.0, 10.0 / 1.97, 10.0))  # within 2 %
    assert main([*args[:-2], "--overwrite"]) == 0
    assert json.loads((out / "spdy_report.json").read_text())["target_met"] is True
    monkeypatch.setattr(unstructured, "time_kernels", lambda *a: Measurement(10.0, 10.0 / 1.5, 10.0))
    assert main([*args[:-2], "--overwrite", "--allow-shortfall"]) == 0


def test_a_verify_on_a_busy_machine_is_not_confirmed_and_exits_3(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Every verify measurement finds the dense model far slower than the table says (a busy machine): the command
    waits and measures again, re-aims nothing on such figures, and exits 3 naming the busy machine."""
    import yaml

    import spdy_hf.families.unstructured as unstructured
    import spdy_hf.pipeline.verify as verify
    from spdy_hf import LatencyTable
    from spdy_hf.families import Measurement

    model_dir, table_path, recipe = tiny_model_dir
    base = LatencyTable.load(table_path).base_time_ms
    calls = []
    monkeypatch.setattr(unstructured, "time_kernels",
                        lambda *a: calls.append(1) or Measurement(40 * base, 40 * base / 1.2, 40 * base))
    monkeypatch.setattr(verify, "BUSY_PAUSE_S", 0.0)
    data = yaml.safe_load(recipe.read_text())
    data["timing"]["busy_factor"] = 1.5
    recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / "pruned"
    assert main(["prune", str(model_dir), "--recipe", str(recipe), "--latency-table", str(table_path),
                 "--target-speedup", "1.5", "-o", str(out), "--no-progress"]) == 3
    assert len(calls) == 3  # timing.attempts measurements, no re-aim
    err = capsys.readouterr().err
    assert f"measured while the machine was busy (the dense model took {40 * base:.1f} ms, {base:.1f} ms when " \
           "profiled), so it is not confirmed" in err
    report = json.loads((out / "spdy_report.json").read_text())
    assert report["target_met"] is False and report["verify_corrections"] == []
    assert report["verify_busy"] == {"dense_ms_now": pytest.approx(40 * base), "dense_ms_profiled": base}

    # busy at first only: the second measurement is quiet and counts
    answers = [Measurement(40 * base, 40 * base / 1.2, 40 * base), Measurement(base, base / 1.6, base)]
    monkeypatch.setattr(unstructured, "time_kernels", lambda *a: answers.pop(0))
    assert main(["prune", str(model_dir), "--recipe", str(recipe), "--latency-table", str(table_path),
                 "--target-speedup", "1.5", "-o", str(out), "--no-progress", "--overwrite"]) == 0
    report = json.loads((out / "spdy_report.json").read_text())
    assert report["target_met"] is True and report["verify_busy"] is None and not answers
