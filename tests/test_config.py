"""SPDYConfig: defaults, the level grid, round trips, unknown keys and bad values."""

from __future__ import annotations

import json
import logging

import pytest
import yaml

from spdy_hf.config import CalibrationConfig, RegimeConfig, SearchConfig, SPDYConfig, TimingConfig
from spdy_hf.errors import ConfigError, SPDYError
from spdy_hf.modeling.levels import get_levels, spdy_grid


def test_defaults():
    c = SPDYConfig()
    assert c.target_speedup == 1.5
    assert c.backend == "cpu"
    assert c.levels == "spdy"
    assert c.method == "obs"
    assert isinstance(c.regime, RegimeConfig) and c.regime.batch_size == 1 and c.regime.dtype == "float32"
    assert c.regime.tokens == c.regime.batch_size * c.regime.sequence_length
    assert isinstance(c.calibration, CalibrationConfig) and c.calibration.source == "builtin"
    assert isinstance(c.search, SearchConfig)
    assert c.search.num_random_inits == 100 and c.search.patience == 100
    assert c.search.neighbourhood_fraction == 0.1 and c.search.dp_buckets == 10_000
    assert c.search.max_candidates == 600
    assert SPDYConfig.from_dict({"search": {"max_candidates": None}}).search.max_candidates is None  # no bound
    # a recipe that raises the random starts past the default bound is told what to change
    with pytest.raises(ConfigError, match="set it to null"):
        SPDYConfig.from_dict({"search": {"num_random_inits": 700}})
    assert c.search.error_prior == "auto" and c.database.propagation == "auto"
    # 'auto' decided per family: measured errors for structured OBS, SPDY's prior for per-layer levels
    assert c.resolved_error_prior() == "measured"
    assert SPDYConfig(family="unstructured").resolved_error_prior() == "spdy"
    assert SPDYConfig(method="magnitude").resolved_error_prior() == "spdy"
    assert SPDYConfig(search={"error_prior": "spdy"}).resolved_error_prior() == "spdy"
    assert c.database.propagation_for("structured") == "dense"
    assert c.database.propagation_for("per-layer") == "pruned"
    assert isinstance(c.timing, TimingConfig)
    assert "*embed*" in c.skip_modules and "*lm_head*" in c.skip_modules
    assert c.latency_table is None and c.cache_dir is None


def test_spdy_grid_values():
    grid = spdy_grid()
    assert len(grid) == 41
    assert [round(x, 3) for x in grid[:3]] == [0.400, 0.458, 0.511]
    assert grid[1] == pytest.approx(0.4584, abs=1e-4)
    assert grid[2] == pytest.approx(0.5111, abs=1e-4)
    assert grid[0] == pytest.approx(0.40) and grid[-1] == pytest.approx(0.99)
    densities = [1 - s for s in grid]
    ratios = [b / a for a, b in zip(densities, densities[1:])]
    assert ratios == pytest.approx([(0.01 / 0.6) ** (1 / 40)] * 40)  # geometric densities

    levels = get_levels("spdy")
    assert len(levels) == 42 and levels[0] == 0.0 and levels[1:] == grid
    assert get_levels([0.9, 0.5]) == [0.0, 0.5, 0.9]


def _custom() -> SPDYConfig:
    return SPDYConfig(target_speedup=2.5, levels=[0.9, 0.5, 0.7], regime={"batch_size": 4, "sequence_length": 64},
                      search={"num_random_inits": 7, "seed": 3}, calibration={"num_samples": 16},
                      skip_modules=["*pooler*"], cache_dir="/tmp/x")


def test_round_trip_dict():
    c = _custom()
    assert c.levels == [0.5, 0.7, 0.9]  # sorted
    d = c.to_dict()
    assert d["regime"] == {"batch_size": 4, "sequence_length": 64, "dtype": "float32", "mode": "prefill",
                           "context_length": 512, "logits": "last"}
    assert c.regime.to_dict() == {"batch_size": 4, "sequence_length": 64, "dtype": "float32",
                                  "logits": "last"}  # a table key
    assert SPDYConfig.from_dict(d) == c
    assert SPDYConfig.from_dict(json.loads(c.to_json_string())) == c
    assert SPDYConfig.from_dict(yaml.safe_load(c.to_yaml_string())) == c


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_round_trip_file(tmp_path, suffix):
    c = _custom()
    path = tmp_path / f"recipe{suffix}"
    c.save(path)
    text = path.read_text()
    if suffix == ".json":
        assert json.loads(text)["target_speedup"] == 2.5
    else:
        assert yaml.safe_load(text)["target_speedup"] == 2.5
        assert not text.lstrip().startswith("{")
    assert SPDYConfig.load(path) == c
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # atomic write leaves no temp file


def test_partial_recipe_keeps_other_defaults(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("target_speedup: 3\nsearch:\n  patience: 7\n")
    c = SPDYConfig.load(path)
    assert c.target_speedup == 3.0 and isinstance(c.target_speedup, float)
    assert c.search.patience == 7 and c.search.num_random_inits == 100


def test_load_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        SPDYConfig.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        SPDYConfig.load(bad)


def test_unknown_key_rejected_with_its_name():
    with pytest.raises(ConfigError, match="bogus_key"):
        SPDYConfig.from_dict({"target_speedup": 2.0, "bogus_key": 1})
    with pytest.raises(ConfigError, match=r"search\.bogus"):
        SPDYConfig.from_dict({"search": {"bogus": 1}})
    with pytest.raises(ConfigError, match=r"regime\.batchsize"):
        SPDYConfig(regime={"batchsize": 2})


def test_unknown_key_in_recipe_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("target_speedup: 2\ntiming:\n  warmupp: 3\n")
    with pytest.raises(ConfigError, match=r"timing\.warmupp"):
        SPDYConfig.load(path)


def test_non_strict_drops_unknown_keys_with_warning(caplog):
    data = SPDYConfig(target_speedup=2.0).to_dict()
    data["from_the_future"] = True
    data["search"]["new_knob"] = 5
    with caplog.at_level(logging.WARNING, logger="spdy_hf.config"):
        c = SPDYConfig.from_dict(data, strict=False)
    assert c == SPDYConfig(target_speedup=2.0)
    text = caplog.text
    assert "from_the_future" in text and "search.new_knob" in text


def test_config_error_is_an_spdy_error_and_a_value_error():
    assert issubclass(ConfigError, SPDYError) and issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    "kwargs, field_name, allowed",
    [
        ({"backend": "tpu"}, "backend", "'cpu'"),
        ({"regime": {"dtype": "float16"}}, "regime.dtype", "'float32'"),
        ({"target_speedup": 1.0}, "target_speedup", "greater than 1"),
        ({"target_speedup": 0.5}, "target_speedup", "greater than 1"),
        ({"target_speedup": "fast"}, "target_speedup", "number"),
        ({"target_speedup": True}, "target_speedup", "number"),
        ({"levels": [0, 0.5]}, "levels", "(0, 1)"),
        ({"levels": [1.2]}, "levels", "(0, 1)"),
        ({"levels": [0.5, 0.5]}, "levels", "distinct"),
        ({"levels": []}, "levels", "'spdy'"),
        ({"levels": "foo"}, "levels", "'spdy'"),
        ({"calibration": {"num_samples": -1}}, "calibration.num_samples", ">= 1"),
        ({"calibration": {"num_samples": 2.5}}, "calibration.num_samples", "integer"),
        ({"calibration": {"sequence_length": 4}}, "calibration.sequence_length", ">= 8"),
        ({"regime": {"batch_size": 0}}, "regime.batch_size", ">= 1"),
        ({"search": {"neighbourhood_fraction": 0}}, "search.neighbourhood_fraction", "(0, 1]"),
        ({"search": {"dp_buckets": 5}}, "search.dp_buckets", ">= 10"),
        ({"search": {"max_candidates": 99}}, "search.max_candidates", "num_random_inits (100)"),
        ({"search": {"max_candidates": True}}, "search.max_candidates", "integer"),
        ({"search": {"max_candidates": 300.5}}, "search.max_candidates", "integer"),
        ({"search": {"error_prior": "uniform"}}, "search.error_prior", "'measured'"),
        ({"search": {"error_prior": "measured"}, "method": "magnitude"}, "error_prior", "method='obs'"),
        ({"database": {"dampening": 0}}, "database.dampening", "(0, 1)"),
        ({"database": {"propagation": "both"}}, "database.propagation", "'dense'"),
        ({"database": {"propagation": "pruned"}}, "database.propagation='pruned'", "family 'structured'"),
        ({"database": {"propagation": "pruned"}, "family": "mixed"}, "database.propagation", "'auto'"),
        ({"database": {"batch_size": 0}}, "database.batch_size", ">= 1"),
        ({"database": {"dir": ""}}, "database.dir", "non-empty"),
        ({"database": {"solver": "x"}}, "database.solver", "database.dampening"),
        ({"method": "sparsegpt"}, "method", "'magnitude'"),
        ({"timing": {"repeats": 0}}, "timing.repeats", ">= 1"),
        ({"skip_modules": "*embed*"}, "skip_modules", "glob"),
        ({"search": 5}, "search", "SearchConfig"),
    ],
)
def test_bad_values_name_field_and_allowed_values(kwargs, field_name, allowed):
    with pytest.raises(ConfigError) as info:
        SPDYConfig.from_dict(kwargs)
    message = str(info.value)
    assert field_name in message
    assert allowed in message


def test_float16_on_cpu_rejected_via_constructor_too():
    with pytest.raises(ConfigError, match="float16"):
        SPDYConfig(regime=RegimeConfig(dtype="float16"))


def test_non_numeric_level_is_a_config_error():
    with pytest.raises(ConfigError, match="levels"):
        SPDYConfig.from_dict({"levels": [0.5, "lots"]})


@pytest.mark.parametrize("recipe, message", [
    ("cache_dir: 5", r"cache_dir=5 must be a string or null"),
    ("latency_table: [table.json]", r"latency_table=\['table.json'\] must be a string or null"),
    ("calibration: {split: 4}", r"calibration.split=4 must be a string\."),
    ("calibration: {source: ''}", r"calibration.source must be a non-empty string"),
    ("database: {dir: 3}", r"database.dir=3 must be a string or null"),
    ("regime: {dtype: 3}", r"regime.dtype=3 must be a string"),
    ("regime: fast", r"regime must be a RegimeConfig or a dict, got str"),
    ("timing: {check_tolerance: 2}", r"timing.check_tolerance=2 must be a number in \(0, 1\)"),
    ("timing: {check_profiles: -1}", r"timing.check_profiles=-1 must be an integer >= 0"),
    ("search: {speedup_margin: '0.1'}", r"search.speedup_margin='0.1' must be a number in \[0, 1\)"),
    ("database: {dampening: .nan}", r"database.dampening=nan must be a number in \(0, 1\)"),
    ("recovery: {learning_rate: 1e-4}", r"YAML reads 1e-4 as text, not as a number: write it with a decimal point "
                                        r"\(1.0e-04\) or as a decimal \(0.0001\)"),
    ("target_speedup: !!python/object/apply:os.system [echo]", "not valid YAML"),
])
def test_a_recipe_with_a_wrong_type_gets_one_clear_error_naming_the_field(recipe, message, tmp_path):
    """Every field is type-checked (nothing is coerced or run: YAML is read with safe_load)."""
    path = tmp_path / "r.yaml"
    path.write_text(recipe + "\n")
    with pytest.raises(ConfigError, match=message):
        SPDYConfig.load(path)


def test_path_objects_become_strings():
    import pathlib

    c = SPDYConfig(cache_dir=pathlib.Path("/tmp/cache"), latency_table=pathlib.Path("t.json"))
    assert c.cache_dir == "/tmp/cache" and c.latency_table == "t.json"
    assert SPDYConfig.from_dict(c.to_dict()) == c
