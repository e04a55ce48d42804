"""Structured groups (attention heads, FFN neurons): found for each family, zero-filled or shrunk, same outputs; their
latency figures named for what they are (fitted times, the kind of timing noise)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import MODEL_FACTORIES, example_inputs, small_config
from test_structured_pruner import structured_table

from spdy_hf import SPDYPruner
from spdy_hf.errors import SPDYError
from spdy_hf.latency.structured import keep_counts, measure_structured_latency, smooth_times, times_are_fitted
from spdy_hf.latency.table import TIMING_NOISE_KINDS, LatencyTable
from spdy_hf.modeling.groups import find_structured_groups, shrink, zero_fill

MODELS = ["bert", "gpt2", "opt", "llama"]


def outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def kept_for(group, seed):
    gen = torch.Generator().manual_seed(seed)
    n = max(1, group.num_groups // 2)
    return sorted(torch.randperm(group.num_groups, generator=gen)[:n].tolist())


@pytest.mark.parametrize("name", MODELS)
def test_groups_are_found_for_every_block(name):
    model = MODEL_FACTORIES[name]()
    groups = find_structured_groups(model)
    kinds = [(g.block, g.kind) for g in groups]
    assert len(groups) == 2 * 2 and len(set(kinds)) == 4  # 2 blocks x (attention, ffn)
    attention = [g for g in groups if g.kind == "attention"][0]
    cfg = model.config
    expected = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    assert attention.num_groups == expected


@pytest.mark.parametrize("name", MODELS)
def test_shrunk_model_equals_the_zero_filled_one(name, tmp_path):
    inputs = example_inputs(2, 12)
    zeroed, shrunk = MODEL_FACTORIES[name](), MODEL_FACTORIES[name]()
    dense_out = outputs(zeroed, inputs)
    groups = find_structured_groups(zeroed)
    for i, group in enumerate(groups):
        kept = kept_for(group, i)
        zero_fill(zeroed, group, kept)
        shrink(shrunk, group, kept)
    expected, got = outputs(zeroed, inputs), outputs(shrunk, inputs)
    assert got.shape == expected.shape == dense_out.shape  # output shapes are kept
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(expected, dense_out)  # something was removed
    n_dense = sum(p.numel() for p in MODEL_FACTORIES[name]().parameters())
    assert sum(p.numel() for p in shrunk.parameters()) < n_dense
    # the zero-filled model is a plain checkpoint: it saves and loads back with the same outputs
    zeroed.save_pretrained(tmp_path / "zeroed")
    again = type(zeroed).from_pretrained(tmp_path / "zeroed").eval()
    torch.testing.assert_close(outputs(again, inputs), expected, rtol=1e-5, atol=1e-6)


def test_zero_filled_whole_ffn_and_attention_still_run_and_save(tmp_path):
    model = MODEL_FACTORIES["llama"]()
    inputs = example_inputs(2, 12)
    for group in find_structured_groups(model):
        if group.block.endswith(".0"):
            zero_fill(model, group, [])  # block 0: no attention, no FFN
    out = outputs(model, inputs)
    assert torch.isfinite(out).all()
    model.save_pretrained(tmp_path / "m")
    torch.testing.assert_close(outputs(type(model).from_pretrained(tmp_path / "m").eval(), inputs), out)


@pytest.mark.parametrize("name", MODELS)
def test_whole_attention_and_ffn_removed_by_shrinking_run_save_and_match(name, tmp_path):
    inputs = example_inputs(2, 12)
    zeroed, shrunk = MODEL_FACTORIES[name](), MODEL_FACTORIES[name]()
    dense_out = outputs(zeroed, inputs)
    for model in (zeroed, shrunk):
        for group in find_structured_groups(model):
            if group.block.endswith(".0"):  # block 0: no attention, no FFN
                (zero_fill if model is zeroed else shrink)(model, group, [])
    expected, got = outputs(zeroed, inputs), outputs(shrunk, inputs)
    assert got.shape == dense_out.shape and torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(expected, dense_out)
    block0 = [m for n, m in shrunk.named_modules() if ".0." in n and isinstance(m, torch.nn.Linear)]
    assert all(0 in m.weight.shape for m in block0)  # no weights of block 0 survive the shrink
    # the zero-filled form is the checkpoint: a plain from_pretrained loads it with the same outputs
    zeroed.save_pretrained(tmp_path / "m")
    torch.testing.assert_close(outputs(type(zeroed).from_pretrained(tmp_path / "m").eval(), inputs), expected)


def test_out_of_range_group_indices_are_refused():
    model = MODEL_FACTORIES["bert"]()
    group = find_structured_groups(model)[0]
    with pytest.raises(SPDYError, match="Group indices"):
        shrink(model, group, [group.num_groups])


# ---------------------------------------------------------------------------------------------- figures named
def test_structured_times_are_marked_fitted_and_keep_the_measured_ones():
    """What the search reads for a structured level is a one-slope fit to a share of what all same-shape groups
    saved together: the part says so, and keeps the measured times beside the fitted ones."""
    model = MODEL_FACTORIES["llama"]()
    ffn = [g for g in find_structured_groups(model) if g.kind == "ffn"]
    counts = [keep_counts(g, 1, 4) for g in ffn]
    part = measure_structured_latency(model, ffn, counts, lambda m: (lambda: None),
                                      lambda fns, warmup, repeats: [10.0] + [9.0 + 0.1 * i for i in range(len(fns) - 1)],
                                      progress=False)
    assert part["fitted"] is True and times_are_fitted(part)
    for entry in part["signatures"].values():
        assert entry["times_ms"] == smooth_times(entry["keep"], entry["measured_ms"])
        assert entry["groups"] == len(ffn)  # one figure shared by every group of the signature
    older = {k: v for k, v in part.items() if k != "fitted"}  # cached before the mark: measured_ms tells
    assert times_are_fitted(older)
    handwritten = {**older, "signatures": {s: {k: v for k, v in e.items() if k != "measured_ms"}
                                           for s, e in older["signatures"].items()}}
    assert not times_are_fitted(handwritten)


def noisy_structured_table(model, config, noise):
    table = structured_table(model, config)
    for entry in table.structured["signatures"].values():
        entry["measured_ms"] = list(entry["times_ms"])
    table.structured.update(fitted=True, timing_noise=noise)
    table.timing_noise, table.timing_noise_kind = noise, "dense_spread"
    return table


def test_report_names_the_timing_noise_and_the_fitted_times(tmp_path, tokenizer, caplog):
    model = MODEL_FACTORIES["llama"]()
    config = small_config(tmp_path, target_speedup=1.5, family="structured", method="magnitude")
    with caplog.at_level(logging.WARNING, logger="spdy_hf.pipeline.run"):
        report = SPDYPruner(model, config, tokenizer).prune(latency_table=noisy_structured_table(model, config, 0.12),
                                                           progress=False).report
    assert report["timing_noise"] == 0.12 and report["timing_noise_kind"] == "dense_spread"
    assert report["latency_times"] == "fitted"
    assert "12.0% (the spread of the dense model's repeated times)" in caplog.text


def test_tables_name_their_timing_noise_and_older_tables_still_load(tmp_path):
    """A cpu per-layer table's noise is its prediction error, a structured table's the spread of its dense times;
    tables written before the kind was named load with it read from their own figures."""
    common = {"backend": "cpu", "regime": {"batch_size": 1, "sequence_length": 32, "dtype": "float32"},
              "levels": [0.0, 0.5], "shapes": {"32x32:cc": [1.0, 0.6]}, "base_time_ms": 2.0, "version": 1}
    per_layer = {**common, "additivity": {"median_relative_error": 0.03}, "timing_noise": 0.03}
    structured = {**common, "levels": [0.0], "shapes": {}, "timing_noise": 0.02,
                  "structured": {"signatures": {"s": {"keep": [2, 0], "times_ms": [1.0, 0.0]}}, "groups": {"g": "s"},
                                 "dense_ms": 2.0, "timing_noise": 0.02}}
    for data, kind in ((per_layer, "prediction_error"), (structured, "dense_spread")):
        (tmp_path / "old.json").write_text(json.dumps(data))
        table = LatencyTable.load(tmp_path / "old.json")
        assert table.timing_noise_kind == kind and kind in TIMING_NOISE_KINDS
        table.save(tmp_path / "new.json")
        assert json.loads((tmp_path / "new.json").read_text())["timing_noise_kind"] == kind
    assert LatencyTable(**{**common, "timing_noise": 0.05}).timing_noise_kind is None  # not named: left unnamed
    with pytest.raises(SPDYError, match="timing_noise_kind"):
        LatencyTable(**{**per_layer, "timing_noise_kind": "loudness"})
