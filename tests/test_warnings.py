"""Nothing a user asked for is dropped without a word: the search margin, a group with a skipped layer, and sparse
levels in a family that has none each end in a warning naming the setting."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import make_bert, small_config
from test_structured_pruner import structured_table

from spdy_hf import SPDYPruner
from spdy_hf.families import get_family
from spdy_hf.search import compute_budget, with_margin


@pytest.fixture
def warnings_of(caplog):
    def read(logger: str) -> str:
        return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
                         and r.name.startswith(logger))
    caplog.set_level(logging.INFO)
    return read


# ---------------------------------------------------------------------------------------------- search margin
TWO_UNITS = np.array([[2.0, 1.0], [2.0, 1.0]])  # dense model 5 ms: constant 1 ms, at most 5 / 3 = 1.667x


def test_a_margin_cut_short_by_the_fastest_profile_is_named(warnings_of):
    budget = compute_budget(TWO_UNITS, 5.0, 1.6)
    aimed = with_margin(TWO_UNITS, budget, 0.05, 100)
    assert aimed.target_speedup == pytest.approx(5 / 3)
    text = warnings_of("spdy_hf.search")
    assert "search.speedup_margin 5%" in text and "1.667x, not 1.680x" in text


def test_a_margin_dropped_at_the_fastest_profile_is_named(warnings_of):
    budget = compute_budget(TWO_UNITS, 5.0, 5 / 3)
    assert with_margin(TWO_UNITS, budget, 0.05, 100) is budget
    text = warnings_of("spdy_hf.search")
    assert "aims at the target itself" in text and "search.speedup_margin 5%" in text and "1.750x" in text


def test_a_margin_dropped_by_bucket_rounding_is_named(warnings_of):
    times = np.array([[3.0, 1.3]] * 3)  # at 1.87x each 1.3 ms rounds up to 3 of 10 buckets; at 1.96x, to 4
    budget = compute_budget(times, 10.0, 1.87)
    assert with_margin(times, budget, 0.05, 10) is budget
    text = warnings_of("spdy_hf.search")
    assert "aims at the target itself" in text and "search.dp_buckets" in text and "search.speedup_margin" in text


def test_a_margin_kept_whole_is_no_warning(warnings_of):
    budget = compute_budget(TWO_UNITS, 5.0, 1.5)
    assert with_margin(TWO_UNITS, budget, 0.05, 100).target_speedup == pytest.approx(1.575)
    assert with_margin(TWO_UNITS, budget, 0.0, 100) is budget  # no margin asked: none dropped
    assert warnings_of("spdy_hf.search") == ""


# ---------------------------------------------------------------------------------------------- structured family
def prune_structured(tmp_path, tokenizer, **overrides):
    model = make_bert()
    config = small_config(tmp_path, target_speedup=1.3, method="magnitude", **overrides)
    return SPDYPruner(model, config, tokenizer).prune(latency_table=structured_table(model, config), progress=False)


def test_a_group_with_a_skipped_layer_is_named_with_the_pattern(tmp_path, tokenizer, warnings_of):
    """BERT's attention output projection of block 0 matches skip_modules: that group stays dense, and says so."""
    skip = ["*embed*", "*pooler*", "encoder.layer.0.attention.output.dense"]
    result = prune_structured(tmp_path, tokenizer, family="structured", skip_modules=skip)
    assert "encoder.layer.0:attention" not in [g["name"] for g in result.groups]
    text = warnings_of("spdy_hf.families")
    assert "1 attention/FFN group(s) stay dense" in text and "encoder.layer.0:attention" in text
    assert "encoder.layer.0.attention.output.dense" in text and "skip_modules" in text
    assert "encoder.layer.0:ffn" not in text  # only the group that lost a layer


def test_sparse_levels_the_structured_family_does_not_use_are_named(tmp_path, tokenizer, warnings_of):
    prune_structured(tmp_path, tokenizer, family="structured", levels=[0.5, 0.8])
    text = warnings_of("spdy_hf.families")
    assert "levels=[0.5, 0.8] is ignored" in text and "family: mixed" in text


@pytest.mark.parametrize("family, levels", [
    ("structured", "auto"),  # the default: nothing asked, nothing dropped
    ("structured", "spdy"),  # the cpu backend's default, named
    ("mixed", [0.5, 0.8]),  # the mixed family uses them
])
def test_levels_in_use_or_left_at_the_default_are_no_warning(family, levels, tmp_path, warnings_of):
    config = small_config(tmp_path, family=family, levels=levels)
    get_family(family)(config, make_bert()).check_levels_setting()
    assert warnings_of("spdy_hf.families") == ""
