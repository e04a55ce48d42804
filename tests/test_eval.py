"""Held-out quality: perplexity and embedding cosine (the report's "heldout"), and `spdy-hf eval`."""

import json
import math

import pytest
import torch
from conftest import MODEL_FACTORIES

from spdy_hf.calibration.text import builtin_corpus
from spdy_hf.cli import main
from spdy_hf.pipeline.quality import HeldOutQuality, embeddings, heldout_windows, perplexity


def _save(model, tokenizer, path, base=None):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if base is not None:  # what spdy_hf writes into a pruned model's config.json
        config = json.loads((path / "config.json").read_text())
        config["spdy"] = {"base_model": str(base), "config": {}}
        (path / "config.json").write_text(json.dumps(config))


def test_perplexity_is_exp_of_the_mean_next_token_loss(tokenizer):
    model = MODEL_FACTORIES["llama"]()
    windows = heldout_windows(tokenizer, "builtin", num_samples=3, sequence_length=16)
    with torch.no_grad():
        loss = model(**windows, labels=windows["input_ids"]).loss  # transformers' own shifted mean
    assert perplexity(model, windows, batch_size=2) == pytest.approx(math.exp(float(loss)), rel=1e-4)


def test_heldout_windows_come_from_text_calibration_never_sees(tokenizer):
    heldout, calibration = set(builtin_corpus("heldout")), set(builtin_corpus("calibration"))
    assert heldout and not heldout & calibration
    windows = heldout_windows(tokenizer, "builtin", num_samples=2, sequence_length=24)
    assert windows["input_ids"].shape == (2, 24)


def test_quality_of_an_encoder_is_the_embedding_cosine(tokenizer):
    model = MODEL_FACTORIES["bert"]()
    windows = heldout_windows(tokenizer, "builtin", num_samples=2, sequence_length=16)
    quality = HeldOutQuality(model, windows)
    assert quality.compare(model)["pruned"] == pytest.approx(1.0, abs=1e-6)
    dense = embeddings(model, windows)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.encoder.parameters():
            if p.dim() == 2:
                p.add_(torch.randn_like(p))
    entry = quality.compare(model)
    want = float(torch.nn.functional.cosine_similarity(embeddings(model, windows), dense, dim=-1).mean())
    assert entry["metric"] == "embedding_cosine" and entry["pruned"] == pytest.approx(want, abs=1e-6)
    assert entry["pruned"] < 0.99


def test_eval_command_against_the_recorded_base(tmp_path, tokenizer, capsys):
    base = MODEL_FACTORIES["llama"]()
    _save(base, tokenizer, tmp_path / "base")
    pruned = MODEL_FACTORIES["llama"]()
    with torch.no_grad():
        pruned.model.layers[0].mlp.down_proj.weight[:, :32] = 0.0  # half the first FFN's neurons gone
    _save(pruned, tokenizer, tmp_path / "pruned", base=tmp_path / "base")
    out = tmp_path / "eval.json"
    args = ["eval", str(tmp_path / "pruned"), "--num-samples", "2", "--sequence-length", "16", "-o", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    windows = heldout_windows(tokenizer, "builtin", num_samples=2, sequence_length=16)
    assert result["metric"] == "perplexity" and result["base_model"] == str(tmp_path / "base")
    assert result["base"] == pytest.approx(perplexity(base, windows), rel=1e-5)
    assert result["pruned"] == pytest.approx(perplexity(pruned, windows), rel=1e-5)
    assert result["pruned"] != result["base"]
    assert "Held-out perplexity" in capsys.readouterr().out


def test_eval_command_needs_a_base(tmp_path, tokenizer, capsys):
    _save(MODEL_FACTORIES["llama"](), tokenizer, tmp_path / "plain")
    assert main(["eval", str(tmp_path / "plain")]) == 2
    assert "records no base model" in capsys.readouterr().err
