"""Every shipped recipe loads; CLI flags override a recipe; the examples run (smoke, offline); the one-liner."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
import yaml
from conftest import handwritten_table, make_bert, small_config

from spdy_hf import SPDYConfig, prune_pretrained
from spdy_hf.cli import _build_config, main
from spdy_hf.errors import ConfigError
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


def _run_example(args, cwd, cache, timeout=600):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", SPDY_HF_CACHE=str(cache))
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


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
