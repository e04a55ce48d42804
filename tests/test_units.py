"""Finding prunable units, and planning their memory layouts."""

from __future__ import annotations

import pytest
import torch
from conftest import example_inputs
from torch import nn
from transformers.pytorch_utils import Conv1D

from spdy_hf.config import DEFAULT_SKIP_MODULES
from spdy_hf.errors import SPDYError
from spdy_hf.modeling.units import find_blocks, find_units

BERT_PER_LAYER = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                  "intermediate.dense", "output.dense"]
GPT2_PER_LAYER = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
LLAMA_PER_LAYER = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
OPT_PER_LAYER = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"]


def expected(prefix, per_layer, n_layers=2):
    return [f"{prefix}.{i}.{name}" for i in range(n_layers) for name in per_layer]


def test_bert_units(tiny_bert):
    units = find_units(tiny_bert, DEFAULT_SKIP_MODULES, example_inputs=example_inputs())
    assert [u.name for u in units] == expected("encoder.layer", BERT_PER_LAYER)
    assert [u.block for u in units] == ["encoder.layer.0"] * 6 + ["encoder.layer.1"] * 6
    assert [u.shape for u in units[:6]] == [(32, 32)] * 4 + [(64, 32), (32, 64)]
    modules = dict(tiny_bert.named_modules())
    assert all(modules[u.name] is u.module for u in units)
    assert not any("pooler" in u.name or "embed" in u.name for u in units)
    assert units[4].numel == 64 * 32 and units[4].shape_key == "64x32"
    # registration order equals forward order for BERT
    assert [u.name for u in find_units(tiny_bert, DEFAULT_SKIP_MODULES)] == [u.name for u in units]


def test_gpt2_units_are_conv1d_seen_as_out_by_in(tiny_gpt2):
    units = find_units(tiny_gpt2, DEFAULT_SKIP_MODULES, example_inputs=example_inputs())
    assert [u.name for u in units] == expected("transformer.h", GPT2_PER_LAYER)
    assert all(isinstance(u.module, Conv1D) and u.is_conv1d for u in units)
    c_attn = units[0]
    assert c_attn.module.weight.shape == (32, 96)  # Conv1D stores (in, out)
    assert c_attn.shape == (96, 32) and c_attn.weight.shape == (96, 32)
    assert torch.equal(c_attn.weight, c_attn.module.weight.t())
    # a view: writes through it reach the module
    c_attn.weight[5, 7] = 123.0
    assert c_attn.module.weight[7, 5].item() == 123.0
    # and the (out, in) view computes the same as the module: y = x W^T + b
    x = torch.randn(3, 32)
    w = units[2].weight
    torch.testing.assert_close(units[2].module(x), x @ w.t() + units[2].module.bias)
    assert [u.shape for u in units[:4]] == [(96, 32), (32, 32), (128, 32), (32, 128)]


def test_llama_units(tiny_llama):
    units = find_units(tiny_llama, DEFAULT_SKIP_MODULES, example_inputs=example_inputs())
    assert [u.name for u in units] == expected("model.layers", LLAMA_PER_LAYER)
    assert [u.shape for u in units[:7]] == [(32, 32), (16, 32), (16, 32), (32, 32), (64, 32), (64, 32), (32, 64)]


def test_opt_units_in_forward_order(tiny_opt):
    units = find_units(tiny_opt, DEFAULT_SKIP_MODULES, example_inputs=example_inputs())
    assert [u.name for u in units] == expected("model.decoder.layers", OPT_PER_LAYER)
    # OPT registers k, v, q but calls q first: only the forward pass knows
    registered = [u.name for u in find_units(tiny_opt, DEFAULT_SKIP_MODULES)]
    assert registered[:3] == [f"model.decoder.layers.0.self_attn.{p}_proj" for p in "kvq"]
    assert sorted(registered) == sorted(u.name for u in units)


def test_find_blocks(tiny_bert, tiny_llama):
    assert [name for name, _ in find_blocks(tiny_bert)] == ["encoder.layer.0", "encoder.layer.1"]
    assert [name for name, _ in find_blocks(tiny_llama)] == ["model.layers.0", "model.layers.1"]


def test_skip_patterns(tiny_bert, tiny_llama):
    units = find_units(tiny_bert, ["*attention*"])
    assert [u.name for u in units] == expected("encoder.layer", ["intermediate.dense", "output.dense"])
    units = find_units(tiny_bert, ["encoder.layer.0.*", "*.query"])
    assert [u.name for u in units] == expected("encoder.layer", BERT_PER_LAYER[1:], 2)[5:]
    units = find_units(tiny_llama, ["*mlp*"])
    assert [u.name for u in units] == expected("model.layers", LLAMA_PER_LAYER[:4])
    with pytest.raises(SPDYError, match="skip_modules"):
        find_units(tiny_bert, ["*"])


def test_model_without_blocks_raises_helpful_error():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(SPDYError) as info:
        find_units(model)
    message = str(info.value)
    assert "Sequential" in message and "no prunable units" in message
    assert "ModuleList" in message  # says what it looks for


class _ListOfLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_unit_names_resolve_when_blocks_are_linears():
    model = _ListOfLinears()
    units = find_units(model)
    assert [u.name for u in units] == ["layers.0", "layers.1"]
    assert all(model.get_submodule(u.name) is u.module for u in units)


def test_plan_layouts_bert(tiny_bert):
    from spdy_hf.latency.cpu import plan_layouts

    units = find_units(tiny_bert, DEFAULT_SKIP_MODULES)
    layouts = plan_layouts(tiny_bert, units, example_inputs(seq=16))
    by_name = {u.name: (lay, i) for i, (u, lay) in enumerate(zip(units, layouts))}
    for layer in range(2):
        p = f"encoder.layer.{layer}."
        query, qi = by_name[p + "attention.self.query"]
        assert query.code[0] == "s" and query.leader is None  # leads the q/k/v group: transposes once
        for follower in ("key", "value"):
            lay, _ = by_name[p + f"attention.self.{follower}"]
            assert lay.code[0] == "t" and lay.leader == qi
        up, _ = by_name[p + "intermediate.dense"]
        assert up.code[1] == "t"  # producer: hands a transposed output on through GELU
        down, _ = by_name[p + "output.dense"]
        assert down.code[0] == "t" and down.leader is None
        # outputs that feed attention and LayerNorm stay row-major
        for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense", "output.dense"):
            assert by_name[p + name][0].code[1] == "c"


def test_plan_layouts_does_not_change_the_model(tiny_bert):
    from spdy_hf.latency.cpu import plan_layouts

    inputs = example_inputs(seq=16)
    with torch.no_grad():
        before = tiny_bert(**inputs).last_hidden_state
    units = find_units(tiny_bert, DEFAULT_SKIP_MODULES)
    plan_layouts(tiny_bert, units, inputs)
    modules = dict(tiny_bert.named_modules())
    assert all(modules[u.name] is u.module for u in units)  # originals are back in place
    with torch.no_grad():
        torch.testing.assert_close(tiny_bert(**inputs).last_hidden_state, before)
