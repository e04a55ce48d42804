"""Failures a user can cause end in one `SPDYError` saying what to do, and `spdy-hf` exits with code 2 on each."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from conftest import handwritten_table, make_bert, small_config

from spdy_hf.cli import main
from spdy_hf.errors import ConfigError, NonFiniteScoreError, NoProfileFitsError, SPDYError
from spdy_hf.modeling.units import find_units
from spdy_hf.search import spdy_search

TIMES = np.array([[2.0, 1.0, 0.5], [4.0, 2.0, 1.0]])  # (U, K): two units, dense first


def test_a_budget_no_profile_fits_is_an_spdy_error_naming_the_fastest_total():
    with pytest.raises(NoProfileFitsError) as info:
        spdy_search(lambda p: 0.0, TIMES, 1.0, num_random_inits=2, patience=1, buckets=100, progress=False)
    assert isinstance(info.value, SPDYError)
    assert "1.5 ms" in str(info.value) and "lower target" in str(info.value)


def test_a_search_bound_below_the_random_starts_names_both_settings():
    with pytest.raises(ConfigError, match="search.max_candidates.*search.num_random_inits"):
        spdy_search(lambda p: 0.0, TIMES, 5.0, num_random_inits=10, max_candidates=9, progress=False)


@pytest.mark.parametrize("score", [math.nan, math.inf])
def test_scores_that_are_never_finite_are_an_spdy_error_saying_what_to_check(score):
    with pytest.raises(NonFiniteScoreError) as info:
        spdy_search(lambda p: score, TIMES, 5.0, num_random_inits=4, patience=1, buckets=100, progress=False)
    assert isinstance(info.value, SPDYError)
    assert "4 candidate profiles" in str(info.value) and "search.score_dtype" in str(info.value)


def prune_with_nan(tmp_path, tokenizer, capsys, poison, **config_overrides) -> tuple[int, str, bool]:
    """`spdy-hf prune` of a tiny BERT saved after `poison(model)` wrote NaN into it, with a hand-written table: the
    exit code, what it wrote to stderr, and whether an output directory exists."""
    model = make_bert()
    with torch.no_grad():
        poison(model)
    model_dir = tmp_path / "nan-bert"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    config = small_config(tmp_path, **config_overrides)
    table = tmp_path / "table.json"
    handwritten_table(model, find_units(model, config.skip_modules), config).save(table)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(config.to_dict()))
    out = tmp_path / "out"
    code = main(["prune", str(model_dir), "--recipe", str(recipe), "--latency-table", str(table), "-o", str(out),
                 "--no-progress"])
    return code, capsys.readouterr().err, out.exists()


def test_a_checkpoint_whose_outputs_are_nan_exits_2_with_the_reason(tmp_path, tokenizer, capsys):
    """A damaged checkpoint as a user meets it: NaN in one LayerNorm makes every output NaN, so every candidate
    scores NaN; `spdy-hf prune` says so in one line, with exit code 2, and writes nothing."""
    def poison(model):
        model.encoder.layer[1].output.LayerNorm.weight[0] = math.nan

    code, err, wrote = prune_with_nan(tmp_path, tokenizer, capsys, poison, method="magnitude")
    assert code == 2, err
    assert "Traceback" not in err and "spdy-hf: error:" in err
    assert "NaN or infinity" in err and "calibration" in err
    assert not wrote


def test_calibration_inputs_that_are_not_finite_stop_obs_with_the_reason(tmp_path, tokenizer, capsys):
    """NaN early in the model (the embeddings' LayerNorm) reaches every layer's calibration inputs: the data-aware
    database stops with one clear error and exit 2, where the OBS solver used to crash on a missing factor."""
    def poison(model):
        model.embeddings.LayerNorm.weight[0] = math.nan

    code, err, wrote = prune_with_nan(tmp_path, tokenizer, capsys, poison, method="obs", family="unstructured")
    assert code == 2, err
    assert "Traceback" not in err and "calibration inputs are not finite" in err
    assert not wrote
