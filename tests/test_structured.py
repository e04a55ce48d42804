"""Structured groups (attention heads, FFN neurons): found for each family, zero-filled or shrunk, same outputs."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_FACTORIES, example_inputs

from spdy_hf.errors import SPDYError
from spdy_hf.structured import find_structured_groups, shrink, zero_fill

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
