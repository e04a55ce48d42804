"""ONNX export of shrunk models: the graph passes onnx's checker, keeps each layer's own width, and ONNX Runtime
gives the shrunk PyTorch model's outputs at shapes other than the traced one; the export entry point's formats and
its refusal to overwrite (a saved output directory through `spdy-hf export`: tests/test_export_gguf.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import example_inputs
from test_export_gguf import shrink_unevenly as shrink_groups

from spdy_hf.errors import SPDYError
from spdy_hf.export import export_model
from spdy_hf.export.to_onnx import write_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def run(path: str, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: inputs[i.name].numpy() for i in session.get_inputs()})[0]


@pytest.mark.timeout(600)
def test_shrunk_encoder_runs_in_onnx_runtime_as_in_pytorch(tmp_path, tiny_bert):
    model = shrink_groups(tiny_bert, {"encoder.layer.0:attention": [], "encoder.layer.0:ffn": list(range(0, 60, 3)),
                                      "encoder.layer.1:attention": [1]})
    path = write_onnx(model, str(tmp_path / "bert.onnx"))
    graph = onnx.load(path)
    onnx.checker.check_model(graph)
    assert [i.name for i in graph.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in graph.graph.output] == ["last_hidden_state"]
    shapes = [sorted(t.dims) for t in graph.graph.initializer if len(t.dims) == 2]
    assert [20, 32] in shapes and [16, 32] in shapes  # 20 kept neurons; 1 head of 16 dimensions kept
    for batch, seq in ((1, 16), (3, 9)):
        inputs = example_inputs(batch, seq, seed=batch)
        inputs["attention_mask"][-1, seq // 2:] = 0  # padding, as a batch of sentences has
        inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
        with torch.no_grad():
            expected = model(**inputs).last_hidden_state.numpy()
        np.testing.assert_allclose(run(path, inputs), expected, atol=1e-5, rtol=1e-4)
    assert sorted(os.listdir(tmp_path)) == ["bert.onnx"]  # weights inline, no staging folder left


@pytest.mark.timeout(600)
def test_shrunk_causal_lm_logits_in_onnx_runtime(tmp_path, tiny_llama):
    model = shrink_groups(tiny_llama, {"model.layers.0:attention": [1], "model.layers.1:ffn": list(range(20))})
    path = export_model(model, str(tmp_path / "llama.onnx"))
    for batch, seq in ((1, 12), (2, 5)):
        inputs = example_inputs(batch, seq, seed=seq)
        with torch.no_grad():
            expected = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.numpy()
        np.testing.assert_allclose(run(path, inputs), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(SPDYError, match="exists"):
        export_model(model, path)


def test_export_refuses_unknown_formats(tmp_path, tiny_bert):
    with pytest.raises(SPDYError, match="format"):
        export_model(tiny_bert, str(tmp_path / "model.bin"))
    with pytest.raises(SPDYError, match="format"):
        export_model(tiny_bert, str(tmp_path / "model.onnx"), format="tflite")
