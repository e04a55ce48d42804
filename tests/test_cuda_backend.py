"""The cuda backend (dense vs 2:4): eligibility, the 2:4 pattern, 2:4 levels in both databases, searching and
pruning with a table measured elsewhere; with the GPU's pieces faked (`test_regime_shapes.fake_gpu`), a new table's
random-profile check and the figures verify reports. The GPU tests are marked `gpu` and skip without CUDA."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import MODEL_FACTORIES, example_inputs, small_config
from test_regime_shapes import ProductClock, fake_gpu

from spdy_hf import LatencyTable, SPDYPruner
from spdy_hf.config import SPDYConfig
from spdy_hf.database import MagnitudeDatabase, build_obs_database
from spdy_hf.deploy.two_four import two_four_ineligibility
from spdy_hf.errors import ConfigError, SPDYError, UnreachableTargetError
from spdy_hf.families.unstructured import UnstructuredFamily
from spdy_hf.latency.cuda import ratios
from spdy_hf.modeling.levels import get_levels, get_patterns
from spdy_hf.modeling.patterns import is_two_four, two_four_magnitude_mask
from spdy_hf.modeling.units import find_units


def test_eligibility_follows_the_kernel_minimums():
    assert two_four_ineligibility((768, 768), "float16") is None
    assert two_four_ineligibility((16, 16), "bfloat16") is None
    assert "multiple of 16 x 16" in two_four_ineligibility((24, 768), "float16")
    assert "at least" in two_four_ineligibility((8, 768), "bfloat16")
    assert "not float32" in two_four_ineligibility((768, 768), "float32")
    assert two_four_ineligibility((32, 64), "float16", "cutlass") is None
    assert "32 x 64" in two_four_ineligibility((32, 32), "float16", "cutlass")
    with pytest.raises(SPDYError, match="Unknown semi-structured kernel"):
        two_four_ineligibility((16, 16), "float16", "magic")


def test_two_four_mask_keeps_the_two_largest_of_every_four():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=gen)
    mask = two_four_magnitude_mask(w)
    pruned = w.masked_fill(mask, 0)
    assert is_two_four(pruned) and not is_two_four(w)
    groups = w.abs().reshape(8, 4, 4)
    kept = (~mask).reshape(8, 4, 4)
    assert (kept.sum(-1) == 2).all()
    smallest_kept = groups.masked_fill(~kept, float("inf")).min(-1).values
    largest_dropped = groups.masked_fill(kept, -1.0).max(-1).values
    assert (smallest_kept >= largest_dropped).all()
    with pytest.raises(SPDYError, match="multiple of 4"):
        two_four_magnitude_mask(torch.ones(2, 6))


def test_levels_and_patterns():
    assert get_levels("2:4") == [0.0, 0.5] and get_patterns("2:4") == ["dense", "2:4"]
    assert get_patterns("spdy") == ["dense"] + ["unstructured"] * 41
    mixed = [0.5, "2:4", 0.9]  # a later mix: the design allows it
    assert get_levels(mixed) == [0.0, 0.5, 0.5, 0.9]
    assert get_patterns(mixed) == ["dense", "unstructured", "2:4", "unstructured"]


def test_cuda_config_defaults_and_validation():
    c = SPDYConfig(backend="cuda", regime={"dtype": "bfloat16"})
    assert c.levels == "2:4"  # "auto" resolves per backend
    assert SPDYConfig().levels == "spdy"
    with pytest.raises(ConfigError, match="regime.dtype='float32' is not supported by backend 'cuda'"):
        SPDYConfig(backend="cuda")
    with pytest.raises(ConfigError, match="levels"):
        SPDYConfig(backend="cuda", regime={"dtype": "float16"}, levels=["3:4"])


@pytest.mark.parametrize("method", ["magnitude", "obs"])
def test_two_four_level_in_the_databases(method, tmp_path):
    model = MODEL_FACTORIES["llama"]()
    units = find_units(model, ["*embed*", "*lm_head*"])
    levels, patterns = get_levels([0.5, "2:4", 0.75]), get_patterns([0.5, "2:4", 0.75])
    if method == "magnitude":
        db = MagnitudeDatabase(units, levels, patterns)
    else:
        db = build_obs_database(model, units, levels, example_inputs(4, 16), directory=tmp_path / "db",
                                patterns=patterns, anchor_level=3, batch_size=2, progress=False)
    for u, unit in enumerate(units):
        w24 = db.weight(u, 2)
        assert is_two_four(w24) and (w24 == 0).float().mean() == pytest.approx(0.5, abs=1e-6)
        if method == "magnitude":
            torch.testing.assert_close(w24, unit.weight.detach().masked_fill(
                two_four_magnitude_mask(unit.weight.detach()), 0))
        assert (db.weight(u, 3) == 0).float().mean() == pytest.approx(0.75, abs=0.02)
        torch.testing.assert_close(db.weight(u, 0), unit.weight.detach(), rtol=0, atol=0)
    db.stitch([2] * len(units))
    assert all(is_two_four(u.weight.detach()) for u in units)
    db.stitch([0] * len(units))


def cuda_table(model, units, config, slow_shape=None):
    """A hand-written cuda table: 2:4 at 0.6 of dense, except `slow_shape` (2:4 slower) and shapes the kernels
    refuse (no 2:4 time)."""
    shapes, ineligible = {}, {}
    prunable = 0.0
    for unit in units:
        dense = 1e-4 * unit.shape[0] * unit.shape[1]
        prunable += dense
        key = f"{unit.shape_key}:cc"
        reason = two_four_ineligibility(unit.shape, config.regime.dtype)
        sparse = None if reason else dense * (1.3 if unit.shape == slow_shape else 0.6)
        shapes[key] = [dense, sparse]
        if reason:
            ineligible[key] = reason
    return LatencyTable(backend="cuda", regime={"batch_size": 1, "sequence_length": 32, "dtype": config.regime.dtype},
                        levels=[0.0, 0.5], patterns=["dense", "2:4"], shapes=shapes, base_time_ms=1.25 * prunable,
                        ineligible=ineligible, model="handwritten",
                        environment={"gpu": "NVIDIA H200", "cusparselt": 600, "torch": "2.13.0+cu130"})


def cuda_config(tmp_path, target, regime=None, **overrides):
    return small_config(tmp_path, target_speedup=target, backend="cuda",
                        regime={"batch_size": 1, "sequence_length": 32, "dtype": "bfloat16", **(regime or {})},
                        **overrides)


def test_prune_anywhere_with_a_cuda_table(tmp_path, tokenizer, caplog):
    """Profile on the GPU machine, search and prune here: the table travels; verifying needs the GPU."""
    model = MODEL_FACTORIES["llama"]()
    config = cuda_config(tmp_path, 1.2, method="magnitude")
    units = find_units(model, config.skip_modules)
    table = cuda_table(model, units, config, slow_shape=units[-1].shape)
    path = tmp_path / "table.json"
    table.save(path)
    with caplog.at_level(logging.WARNING):
        result = SPDYPruner(model, config, tokenizer).prune(latency_table=str(path), progress=False)
    report = result.report
    assert report["backend"] == "cuda" and report["predicted_speedup"] >= 1.2
    slow = [p for p in result.profile if tuple(p["shape"]) == units[-1].shape]
    assert slow and all(p["pattern"] == "dense" for p in slow)  # 2:4 slower than dense there: kept dense
    for p, unit in zip(result.profile, units):
        if p["pattern"] == "2:4":
            assert is_two_four(unit.weight.detach())
        else:
            assert (unit.weight != 0).all()
    if not torch.cuda.is_available():
        assert report["measured_speedup"] is None and "needs a CUDA GPU" in report["verify_skipped"]
        assert any("not verified" in r.getMessage() for r in caplog.records)
    assert any("another environment" in r.getMessage() for r in caplog.records)  # GPU/torch differ here
    saved = tmp_path / "out"
    result.save_pretrained(saved)
    assert json.loads((saved / "spdy_report.json").read_text())["backend"] == "cuda"


def test_ineligible_units_are_reported(tmp_path, tokenizer):
    model = MODEL_FACTORIES["llama"]()  # hidden 32, kv projections 32 x 16: k/v out of 16 rows is fine,
    config = cuda_config(tmp_path, 1.1, method="magnitude")
    units = find_units(model, config.skip_modules)
    table = cuda_table(model, units, config)
    table.shapes["16x32:cc"] = [table.shapes["16x32:cc"][0], None]
    table.ineligible["16x32:cc"] = "made up for the test"
    result = SPDYPruner(model, config, tokenizer).prune(latency_table=table, progress=False)
    dense_only = {e["name"]: e["reason"] for e in result.report["ineligible_units"]}
    assert dense_only and all(r == "made up for the test" for r in dense_only.values())
    assert all(p["pattern"] == "dense" for p in result.profile if p["name"] in dense_only)


def test_cuda_table_ratios_and_round_trip(tmp_path):
    config = cuda_config(tmp_path, 1.2)
    model = MODEL_FACTORIES["bert"]()
    units = find_units(model, config.skip_modules)
    table = cuda_table(model, units, config)
    table.save(tmp_path / "t.json")
    again = LatencyTable.load(tmp_path / "t.json")
    assert again.patterns == ["dense", "2:4"] and again.ineligible == table.ineligible
    assert all(r == pytest.approx(0.6) for r in ratios(again).values() if r is not None)
    with pytest.raises(SPDYError, match="other sparsity levels"):
        again.check_matches("cuda", again.regime, [0.0, 0.5], ["dense", "unstructured"])


def test_cuda_backend_without_gpu_or_table_is_a_clear_error(tmp_path, tokenizer):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    config = cuda_config(tmp_path, 1.2, method="magnitude")
    with pytest.raises(SPDYError, match="needs an NVIDIA GPU.*--latency-table"):
        SPDYPruner(MODEL_FACTORIES["bert"](), config, tokenizer).prune(progress=False)


# ---------------------------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
def test_two_four_linear_matches_the_masked_dense_product():
    from spdy_hf.deploy.two_four import TwoFourLinear

    w = torch.randn(128, 256, device="cuda", dtype=torch.float16)
    w = w.masked_fill(two_four_magnitude_mask(w), 0)
    x = torch.randn(64, 256, device="cuda", dtype=torch.float16)
    layer = TwoFourLinear(w, None)
    torch.testing.assert_close(layer(x), x @ w.T, rtol=1e-2, atol=1e-2)
    with pytest.raises(SPDYError, match="not 2:4"):
        TwoFourLinear(torch.ones(128, 256, device="cuda", dtype=torch.float16), None)


@pytest.mark.gpu
def test_where_two_four_cannot_pay_the_target_is_unreachable(tmp_path, tokenizer):
    """A tiny model at batch 1 x 32 tokens: every product is far too small for 2:4 to beat dense (a 1-token input
    can be about 10x slower), so 1.5x is out of reach and the error says how far the model gets."""
    model = MODEL_FACTORIES["bert"]()
    with pytest.raises(UnreachableTargetError) as info:
        SPDYPruner(model, cuda_config(tmp_path, 1.5, method="magnitude"),
                   tokenizer).prune(progress=False)
    assert info.value.max_reachable_speedup < 1.5


@pytest.mark.gpu
def test_measure_prune_and_verify_where_two_four_pays(tmp_path, tokenizer):
    """BERT-large-sized layers in a compute-bound regime (fp16, 16 x 256 tokens), where 2:4 products run faster
    than dense (BERT-base fp16 on an A100 measured 1.2x at batch 16-64): profiled, pruned and verified on the GPU."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=1024, num_hidden_layers=2, num_attention_heads=16,
                                 intermediate_size=4096, vocab_size=30522)).eval()
    config = small_config(tmp_path, target_speedup=1.05, backend="cuda", method="magnitude", family="unstructured",
                          regime={"batch_size": 16, "sequence_length": 256, "dtype": "float16"})
    result = SPDYPruner(model, config, tokenizer).prune(progress=False)
    report = result.report
    assert report["predicted_speedup"] >= 1.05
    assert report["measured_speedup"] is not None and report["measured_speedup"] >= 0.95 * 1.05
    assert any(p["pattern"] == "2:4" for p in result.profile)
    assert result.latency_table.environment["gpu"]


def test_measure_cuda_table_assembles_shapes_once_each(monkeypatch, tmp_path):
    """The table logic of the cuda backend without a GPU: kernels and clocks replaced by fakes."""
    import spdy_hf.latency.cuda as cuda

    timed = []

    def fake_time_shape(shape, tokens, dtype, patterns, warmup, repeats, kernel="cusparselt", seed=0, device="cuda"):
        timed.append((shape, tokens, dtype))
        reason = cuda.two_four_ineligibility(shape, dtype, kernel)
        dense = 1e-3 * shape[0] * shape[1]
        return [dense, None if reason else 0.7 * dense], reason

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(cuda, "time_shape_cuda", fake_time_shape)
    monkeypatch.setattr(cuda, "cuda_interleaved_median_ms", lambda fns, warmup, repeats: [(f(), 5.0)[1] for f in fns])
    monkeypatch.setattr(cuda, "cuda_environment", lambda: {"gpu": "Fake GPU", "cusparselt": 1})
    model = MODEL_FACTORIES["llama"]()
    config = cuda_config(tmp_path, 1.2)
    units = find_units(model, config.skip_modules)
    table = cuda.measure_cuda_latency_table(model, units, [0.0, 0.5], ["dense", "2:4"], config,
                                            example_inputs(1, 32), "fingerprint", progress=False)
    shapes = sorted({u.shape for u in units})
    assert sorted(s for s, _, _ in timed) == shapes  # every distinct shape once
    assert all(tokens == 32 and dtype == "bfloat16" for _, tokens, dtype in timed)
    assert table.backend == "cuda" and table.patterns == ["dense", "2:4"] and table.base_time_ms == 5.0
    assert set(table.shapes) == {"{}x{}:cc".format(*s) for s in shapes}
    assert table.environment == {"gpu": "Fake GPU", "cusparselt": 1} and table.model == "fingerprint"
    # tiny llama: hidden 32 (ok for cuSPARSELt's 16 x 16); nothing is ineligible, every 2:4 time is 0.7 x dense
    assert not table.ineligible and all(r == pytest.approx(0.7) for r in ratios(table).values())


# ---------------------------------------------------------------------------------------------- faked GPU
def test_new_cuda_tables_pass_the_random_profile_check(tmp_path, monkeypatch):
    """A newly measured cuda table is checked like a cpu one: random 2:4 profiles of the model, timed end to end
    (here by a clock that counts multiply-adds, so the table predicts them exactly), recorded in the table."""
    model = MODEL_FACTORIES["llama"]()
    clock = fake_gpu(monkeypatch, model)
    clock.scale[model.lm_head.weight.data_ptr()] = 0.01  # the units are most of the model's work, as in an LLM
    config = cuda_config(tmp_path, 1.2, timing={"check_profiles": 3},
                         regime={"mode": "decode", "context_length": 12})
    table = UnstructuredFamily(config, model, progress=False).plan(find_units(model, config.skip_modules)).table
    check = table.additivity["profile_check"]
    assert check["passed"] and len(check["measured_speedup"]) == 3
    assert check["predicted_speedup"] == pytest.approx(check["measured_speedup"], rel=1e-6)
    assert any(m > 1.1 for m in check["measured_speedup"])  # profiles with 2:4 units in them were timed
    assert clock.sparse
    assert LatencyTable.load(next((tmp_path / "cache" / "latency").glob("*.json"))).additivity["profile_check"]


def test_a_cuda_table_the_model_does_not_follow_is_refused(tmp_path, monkeypatch):
    """2:4 products that pay alone but not inside the model: the table's predictions of random profiles miss what
    they measure end to end, so the table is refused and nothing is cached."""

    class SlowInTheModel(ProductClock):
        def cost(self, x, weight):  # a unit alone gets a 2-D input, inside the model a 3-D one
            self.two_four_cost = 0.5 if x.dim() == 2 else 1.5
            return super().cost(x, weight)

    model = MODEL_FACTORIES["llama"]()
    clock = fake_gpu(monkeypatch, model, SlowInTheModel)
    clock.scale[model.lm_head.weight.data_ptr()] = 0.01  # the units are most of the model's work
    config = cuda_config(tmp_path, 1.2, timing={"check_profiles": 3, "attempts": 1})
    with pytest.raises(SPDYError, match="random profile.*check_tolerance"):
        UnstructuredFamily(config, model, progress=False).plan(find_units(model, config.skip_modules))
    assert not list((tmp_path / "cache").rglob("*.json"))


def test_cuda_verify_reports_no_deployed_dense_time_it_did_not_measure(tmp_path, monkeypatch):
    """On cuda a dense unit keeps its own module, so the deployed dense form is the dense model: verify times dense
    and pruned only, and the report leaves the deployed dense figures out rather than copy the dense time."""
    from spdy_hf.families.unstructured import time_two_four

    model = MODEL_FACTORIES["llama"]()
    clock = fake_gpu(monkeypatch, model)
    config = cuda_config(tmp_path, 1.2, method="magnitude")
    units = find_units(model, config.skip_modules)
    family = UnstructuredFamily(config, model, progress=False)
    plan = family.plan(units, cuda_table(model, units, config))
    profile = [1] * len(units)
    inputs = example_inputs(1, 32)
    measurement = time_two_four(model, units, ["2:4"] * len(units), lambda: model(**inputs), 1, 2, 1)
    assert measurement.deployed_dense_ms is None and measurement.speedup > 1.0 and clock.sparse
    report = family.entries(plan, None, profile, measurement).report
    assert report["deployed_dense_time_ms"] is None and report["measured_speedup_vs_deployed_dense"] is None
