"""Recovery trains the shrunk model: `ShrunkModel` cuts the removed heads and neurons out, gives the zero-filled
model's outputs, and writes what training did to the kept weights back into the full-size modules."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_FACTORIES, example_inputs

from spdy_hf.modeling.groups import find_structured_groups, zero_fill
from spdy_hf.modeling.units import find_blocks
from spdy_hf.recovery.shrunk import ShrunkModel, kept_groups

MODELS = ["bert", "gpt2", "opt", "llama"]


def outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def block_weights(model) -> int:
    return sum(p.numel() for _, block in find_blocks(model) for p in block.parameters())


def zero_filled(name):
    """A tiny model with half the groups of every kind removed, and every head of the first block's attention."""
    model = MODEL_FACTORIES[name]()
    kept = {}
    for i, group in enumerate(find_structured_groups(model)):
        if group.kind == "attention" and i == 0:
            kept[group.consumer] = []
        else:
            gen = torch.Generator().manual_seed(i)
            kept[group.consumer] = sorted(torch.randperm(group.num_groups, generator=gen)[:group.num_groups // 2]
                                          .tolist())
        zero_fill(model, group, kept[group.consumer])
    return model, kept


@pytest.mark.parametrize("name", MODELS)
def test_shrunk_for_training_and_written_back(name):
    inputs = example_inputs(2, 12)
    model, kept = zero_filled(name)
    expected = outputs(model, inputs)
    shapes = {n: p.shape for n, p in model.state_dict().items()}
    counts = head_counts(model)
    assert counts and (name == "llama" or any(counts.values()))  # Llama's attention reads its config
    before = block_weights(model)
    with ShrunkModel(model) as cut:
        assert len(cut) == len(kept)
        assert block_weights(model) < 0.75 * before  # the full-size weights are released
        torch.testing.assert_close(outputs(model, inputs), expected, rtol=1e-4, atol=1e-5)
        with torch.no_grad():  # what training would do: move every weight the shrunk model holds
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        moved = outputs(model, inputs)
    assert {n: p.shape for n, p in model.state_dict().items()} == shapes
    torch.testing.assert_close(outputs(model, inputs), moved, rtol=1e-4, atol=1e-5)  # the trained weights came back
    modules = dict(model.named_modules())
    for group in find_structured_groups(model):  # ... and the removed groups as zeros
        assert kept_groups(group, modules) == kept[group.consumer]
    assert head_counts(model) == counts


def head_counts(model) -> dict:
    """Every integer attribute of the attention modules that a shrink adjusts."""
    attrs = ("num_heads", "num_attention_heads", "all_head_size", "split_size", "num_key_value_heads")
    return {n: {a: getattr(m, a) for a in attrs if isinstance(getattr(m, a, None), int)}
            for n, m in model.named_modules() if n.endswith(("attention.self", "attn", "self_attn"))}


def test_a_dense_model_is_left_as_it_is():
    model = MODEL_FACTORIES["gpt2"]()
    state = {n: t.clone() for n, t in model.state_dict().items()}
    with ShrunkModel(model) as cut:
        assert len(cut) == 0 and not cut.teacher_index
    assert all(torch.equal(state[n], t) for n, t in model.state_dict().items())


def test_the_teacher_index_picks_the_kept_outputs():
    model, kept = zero_filled("llama")
    dense_q = model.model.layers[1].self_attn.q_proj.weight.detach().clone()
    with ShrunkModel(model) as cut:
        index = cut.teacher_index["model.layers.1.self_attn.q_proj"]
        torch.testing.assert_close(model.model.layers[1].self_attn.q_proj.weight, dense_q[index])
        assert "model.layers.0.self_attn.q_proj" in cut.teacher_index  # removed whole: nothing kept
        assert len(cut.teacher_index["model.layers.0.self_attn.q_proj"]) == 0


def test_a_failure_half_way_puts_the_model_back(monkeypatch):
    import spdy_hf.recovery.shrunk as shrunk_module

    model, _ = zero_filled("gpt2")
    state = {n: t.clone() for n, t in model.state_dict().items()}
    real, calls = shrunk_module.shrink, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(shrunk_module, "shrink", failing)
    with pytest.raises(RuntimeError, match="out of memory"), ShrunkModel(model):
        pass
    after = model.state_dict()
    assert set(after) == set(state) and all(torch.equal(after[n], t) for n, t in state.items())
