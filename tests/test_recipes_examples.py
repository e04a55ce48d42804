"""Every shipped recipe loads; CLI flags override a recipe; the examples run (smoke, offline); the one-liner."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time

import pytest
import yaml
from conftest import handwritten_table, make_bert, small_config

from spdy_hf import SPDYConfig, prune_pretrained
from spdy_hf.cli import _build_config, main
from spdy_hf.errors import ConfigError
from spdy_hf.latency.check import BUSY_MACHINE  # how the library says why it refused a latency table
from spdy_hf.units import find_units

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "*.yaml")))


def test_there_are_recipes_for_the_common_jobs():
    names = {os.path.basename(p) for p in RECIPES}
    assert {"cpu_encoder_1.5x.yaml", "gpu_decoder_2to4.yaml", "gradual_trainer.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_every_recipe_loads_and_round_trips(path, tmp_path):
    config = SPDYConfig.load(path)
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    assert config.target_speedup == raw["target_speedup"] and config.backend == raw.get("backend", "cpu")
    config.save(tmp_path / "again.yaml")
    assert SPDYConfig.load(tmp_path / "again.yaml") == config


def test_flags_override_a_recipe_and_unknown_keys_are_named(tmp_path):
    import argparse

    from spdy_hf.cli import prune_command_parser

    parser = argparse.ArgumentParser()
    prune_command_parser(parser.add_subparsers())
    args = parser.parse_args(["prune", "--recipe", os.path.join(ROOT, "recipes", "gpu_decoder_2to4.yaml"),
                              "--batch-size", "4", "--target-speedup", "1.1", "--method", "magnitude"])
    config = _build_config(args)
    assert (config.regime.batch_size, config.regime.sequence_length) == (4, 512)
    assert config.target_speedup == 1.1 and config.method == "magnitude" and config.levels == "2:4"
    bad = tmp_path / "bad.yaml"
    bad.write_text("target_speedup: 1.5\nsearch:\n  patiense: 3\n")
    with pytest.raises(ConfigError, match="search.patiense"):
        SPDYConfig.load(bad)
    assert main(["prune", "--recipe", str(bad), "-o", str(tmp_path / "o")]) == 2


def test_one_liner_prunes_from_a_directory(tmp_path, tokenizer):
    model_dir = tmp_path / "tiny"
    make_bert().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    model = make_bert()
    config = small_config(tmp_path, method="magnitude")
    handwritten_table(model, find_units(model, config.skip_modules), config).save(tmp_path / "table.json")
    result = prune_pretrained(str(model_dir), {**config.to_dict(), "latency_table": str(tmp_path / "table.json")},
                              progress=False)
    assert result.report["predicted_speedup"] >= config.target_speedup
    assert result.tokenizer is not None and result.report["measured_speedup"] > 0




def _run_example(args, cwd, cache, timeout=600, tries=3, pause_s=30.0):
    """The example's stdout once it exits 0. A shared CI machine can stay busy for minutes: a latency table measured
    then fails its checks every time and the job refuses it (the designed outcome, also tested under a real load in
    tests/test_busy_machine.py). That refusal is run again after a pause, as a user would; if the machine stays busy
    through every try, each refusal must have left no new table in the cache, and the test is skipped, naming it. Any
    other failure fails the test."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", SPDY_HF_CACHE=str(cache))
    for attempt in range(1, tries + 1):
        before = _cached_tables(cache)
        proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              env=env)
        if proc.returncode == 0 or BUSY_MACHINE not in proc.stderr:
            break
        assert _cached_tables(cache) == before, "a latency table that failed its checks was cached"
        if attempt < tries:
            time.sleep(pause_s)
    else:
        pytest.skip(f"the machine stayed too busy to time {os.path.basename(args[0])} in {tries} tries; each "
                    f"table was refused as designed: {proc.stderr.strip().splitlines()[-1][:300]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _cached_tables(cache) -> list[str]:
    return sorted(glob.glob(os.path.join(str(cache), "latency", "*.json")))


def test_a_busy_refusal_is_run_again_then_skipped_and_any_other_failure_fails(tmp_path):
    """The helper above: the library's busy-machine refusal is tried again and, if it lasts, skipped; another failure,
    or a refusal that cached a table, fails."""
    script = tmp_path / "job.py"
    script.write_text("import sys\nopen(sys.argv[1], 'a').write('x')\n"
                      f"sys.exit('SPDYError: failed its check 3 times. {BUSY_MACHINE} (another heavy process)')\n")
    runs = tmp_path / "runs"
    with pytest.raises(pytest.skip.Exception, match="too busy to time job.py in 2 tries"):
        _run_example([str(script), str(runs)], cwd=ROOT, cache=tmp_path / "cache", tries=2, pause_s=0.0)
    assert runs.read_text() == "xx"
    script.write_text("import sys\nsys.exit('ValueError: something else broke')\n")
    with pytest.raises(AssertionError, match="something else broke"):
        _run_example([str(script)], cwd=ROOT, cache=tmp_path / "cache", tries=2, pause_s=0.0)
    cache = tmp_path / "cache2"
    script.write_text("import os, sys\nos.makedirs(sys.argv[1], exist_ok=True)\n"
                      "open(os.path.join(sys.argv[1], 't.json'), 'w').write('{}')\n"
                      f"sys.exit('{BUSY_MACHINE}')\n")
    with pytest.raises(AssertionError, match="was cached"):
        _run_example([str(script), str(cache / "latency")], cwd=ROOT, cache=cache, tries=2, pause_s=0.0)


def test_examples_run_offline(tmp_path):
    """Smoke runs of every example on the bundled MiniLM (magnitude database, tiny search, a few steps)."""
    cache = tmp_path / "cache"  # a fresh cache: the examples measure their own latency table
    # 1.2x: far below the ~1.75x a busy CI machine can still reach, so a noisy table cannot make it unreachable
    out = _run_example([os.path.join(ROOT, "examples", "prune_minilm.py"), "--quick", "--target-speedup", "1.2",
                        "--output",
                        str(tmp_path / "one")], cwd=ROOT, cache=cache)
    assert "predicted" in out and os.path.isfile(tmp_path / "one" / "model.safetensors")
    out = _run_example([os.path.join(ROOT, "examples", "push_to_hub.py"), str(tmp_path / "one"), "me/x",
                        "--dry-run"], cwd=ROOT, cache=cache)
    assert "model.safetensors" in out and "README.md" in out
    out = _run_example([os.path.join(ROOT, "examples", "gradual_trainer.py"), "--quick", "--target-speedup", "1.2",
                        "--output",
                        str(tmp_path / "gradual")], cwd=ROOT, cache=cache)
    assert "sparsity of the profile's units after training" in out
    assert os.path.isfile(tmp_path / "gradual" / "model.safetensors")
