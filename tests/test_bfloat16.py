"""A job in a CPU's bfloat16 regime. The structured family profiles, prunes, recovers and saves the model held in
bfloat16 from loading to saving, never a float32 copy of it; recovery trains float32 copies of the weights it fits
and rounds them back once; the checkpoint loads in bfloat16, shrunk. The other families' CPU levels are CSR
products, which run in float32 only: they are refused before any model is loaded."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
import transformers
from conftest import example_inputs, small_config, work_clock
from safetensors import safe_open
from test_architectures import block_work, make

from spdy_hf import SPDYConfig, SPDYPruner
from spdy_hf.cli import main
from spdy_hf.errors import ConfigError
from spdy_hf.families import family_for
from spdy_hf.modeling.loading import load_model_and_tokenizer
from spdy_hf.output.load import load_pretrained
from spdy_hf.recovery.fit import float32_training


def parameter_dtypes(model) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters() if p.is_floating_point()}


def rotary_dtypes(model) -> set[torch.dtype]:
    return {b.dtype for n, b in model.named_buffers() if "inv_freq" in n}


@pytest.mark.parametrize("family", ["unstructured", "mixed"])
def test_a_family_with_csr_levels_refuses_bfloat16_on_a_cpu(family):
    structured = SPDYConfig(regime={"dtype": "bfloat16"})
    assert family_for(structured).name == "structured"
    config = SPDYConfig(regime={"dtype": "bfloat16"}, family=family)
    with pytest.raises(ConfigError, match=rf"family='{family}'.*'float32'.*family='structured'"):
        family_for(config)


def test_the_cli_refuses_it_before_loading_the_model(tmp_path, monkeypatch, capsys):
    import spdy_hf.modeling.loading as loading

    monkeypatch.setattr(loading, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("the model was loaded"))
    code = main(["prune", "--family", "unstructured", "--dtype", "bfloat16", "-o", str(tmp_path / "out")])
    assert code == 2 and "family='unstructured' cannot profile regime.dtype='bfloat16'" in capsys.readouterr().err


def test_a_model_loads_in_the_dtype_asked_with_its_buffers_as_transformers_makes_them(tmp_path):
    """A rotary embedding's frequencies stay float32: rounded to bfloat16 they would move every position's angle."""
    make("llama3").save_pretrained(tmp_path / "m")
    default, _ = load_model_and_tokenizer_or_skip(tmp_path / "m")
    assert parameter_dtypes(default) == {torch.float32}
    low, _ = load_model_and_tokenizer_or_skip(tmp_path / "m", dtype=torch.bfloat16)
    assert parameter_dtypes(low) == {torch.bfloat16} and rotary_dtypes(low) == {torch.float32}
    assert parameter_dtypes(load_model_and_tokenizer_or_skip(tmp_path / "m", dtype="auto")[0]) == {torch.float32}


def load_model_and_tokenizer_or_skip(path, **kwargs):
    """The loader on a directory without a tokenizer: the tokenizer's absence is not what is tested here."""
    original = transformers.AutoTokenizer.from_pretrained
    try:
        transformers.AutoTokenizer.from_pretrained = lambda *a, **k: None
        return load_model_and_tokenizer(str(path), **kwargs)
    finally:
        transformers.AutoTokenizer.from_pretrained = original


def test_float32_training_gives_the_same_parameters_float32_data_and_rounds_once_on_leaving():
    model = make("llama3").to(torch.bfloat16)
    block = model.model.layers[0]
    params = {id(p): p for p in block.parameters()}
    start = {n: p.detach().clone() for n, p in block.named_parameters()}
    with float32_training([*block.parameters(), *block.parameters()]):  # a parameter given twice is converted once
        assert {id(p) for p in block.parameters()} == set(params)
        assert parameter_dtypes(block) == {torch.float32}
        assert parameter_dtypes(model.model.layers[1]) == {torch.bfloat16}  # only what is trained
        optimizer = torch.optim.Adam(block.parameters(), lr=1e-4)
        for _ in range(50):  # steps of 1e-4: each one below bfloat16's resolution near 1
            optimizer.zero_grad()
            sum(p.sum() for p in block.parameters()).backward()
            optimizer.step()
    assert parameter_dtypes(block) == {torch.bfloat16}
    moved = block.input_layernorm.weight  # ones: 50 steps of 1e-4 round to 0.9961, one step alone to 1.0
    assert torch.all(moved < start["input_layernorm.weight"])


def test_a_bfloat16_job_holds_the_model_in_bfloat16_and_recovers_float32_copies(tmp_path, tokenizer, monkeypatch):
    """Every stage of a structured job on a Llama 3 in bfloat16: the pruned model is bfloat16 (its rotary
    frequencies float32), Adam gets float32 weights, the checkpoint is bfloat16 and loads shrunk in bfloat16 with
    the pruned model's logits."""
    import spdy_hf.families.base as family_base

    monkeypatch.setattr(family_base, "interleaved_timer", lambda backend: work_clock(block_work))
    trained = []
    adam = torch.optim.Adam

    class RecordingAdam(adam):
        def __init__(self, params, *args, **kwargs):
            params = list(params)
            trained.extend(p.dtype for p in params)
            super().__init__(params, *args, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    config = small_config(tmp_path, target_speedup=1.3, family="structured", regime={"dtype": "bfloat16"},
                          recovery={"method": "gap", "epochs": 2, "num_samples": 8})
    result = SPDYPruner(make("llama3"), config, tokenizer).prune(progress=False)
    report = result.report
    assert report["target_met"] and any(e["keep"] < e["num_groups"] for e in result.groups)
    assert report["recovery"]["precision"] == "bfloat16"
    assert trained and set(trained) == {torch.float32}
    assert parameter_dtypes(result.model) == {torch.bfloat16} and rotary_dtypes(result.model) == {torch.float32}

    out = pathlib.Path(result.save_pretrained(tmp_path / "out"))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["spdy"]["config"]["regime"]["dtype"] == "bfloat16"
    fast, _, _ = load_pretrained(str(out))
    assert parameter_dtypes(fast) == {torch.bfloat16}
    assert sum(p.numel() for p in fast.parameters()) < sum(p.numel() for p in result.model.parameters())
    inputs = example_inputs(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(fast(**inputs).logits, result.model(**inputs).logits, rtol=2e-2, atol=2e-2)
