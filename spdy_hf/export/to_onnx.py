"""A model, shrunk to its kept heads and neurons, written as an ONNX graph that ONNX Runtime runs.

ONNX graphs carry each layer's own shapes, so a pruned model needs nothing of the runtime: the graph is traced from
the shrunk PyTorch model by `torch.onnx.export` (the `torch.export`-based exporter), with the batch and the sequence
length left free.

- An encoder (no LM head) takes `input_ids`, `attention_mask` (and `token_type_ids` where its forward has them) and
  gives `last_hidden_state`: the names of the Hub's ONNX encoders, which sentence-transformers' ONNX backend runs
  (its pooling on top).
- A causal LM takes `input_ids` and `attention_mask` and gives `logits` for every position, without a key/value
  cache: prompt processing and scoring, not token-by-token generation.

Weights are written inside the .onnx file up to `INLINE_BYTES`, in a `.onnx.data` file beside it above that (ONNX's
2 GB limit on one file).
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import tempfile

import torch
from torch import nn

from ..errors import SPDYError
from ..search.scoring import has_lm_head

logger = logging.getLogger(__name__)

INLINE_BYTES = 1_500_000_000
OPSET = 18


class ONNXExportError(SPDYError):
    """The model cannot be traced to ONNX; the message says why."""


def onnx_inputs(model: nn.Module, batch: int = 1, length: int = 8) -> dict[str, torch.Tensor]:
    """Example inputs of the graph (their values do not matter, their names and dtypes do)."""
    vocab = int(getattr(model.config, "vocab_size", 100))
    generator = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(0, vocab, (batch, length), generator=generator),
              "attention_mask": torch.ones(batch, length, dtype=torch.long)}
    if not has_lm_head(model) and "token_type_ids" in inspect.signature(model.forward).parameters:
        inputs["token_type_ids"] = torch.zeros(batch, length, dtype=torch.long)
    return inputs


class _Graph(nn.Module):
    """The traced forward: named tensor inputs in, one named output out, no cache and no optional outputs."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model = model
        self.names = names
        self.lm = has_lm_head(model)
        params = inspect.signature(model.forward).parameters
        self.extra = {"use_cache": False} if "use_cache" in params else {}

    def forward(self, *tensors):
        out = self.model(**dict(zip(self.names, tensors)), **self.extra, return_dict=True)
        return out.logits if self.lm else out.last_hidden_state


def write_onnx(model: nn.Module, path: str, opset: int = OPSET) -> str:
    """Writes `model` (shrunk or dense, float32, on the CPU) to the ONNX file `path`, through a temporary folder
    beside it. Returns `path`."""
    try:
        import onnx  # noqa: F401  (the exporter needs it; a clear message beats its ImportError)
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ONNXExportError("Writing ONNX needs onnx and onnxscript: pip install 'spdy-hf[onnx]'.") from e
    inputs = onnx_inputs(model)
    names = list(inputs)
    output = "logits" if has_lm_head(model) else "last_hidden_state"
    graph = _Graph(model, names).eval()
    batch, length = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes = (tuple({0: batch, 1: length} for _ in names),)  # the one varargs parameter of `_Graph.forward`
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-{os.getpid()}-", dir=directory)
    try:
        staged = os.path.join(staging, os.path.basename(path))
        with torch.no_grad():
            try:
                torch.onnx.export(graph, tuple(inputs.values()), staged, input_names=names, output_names=[output],
                                  dynamic_shapes=shapes, dynamo=True, opset_version=opset,
                                  external_data=size > INLINE_BYTES, verbose=False)
            except Exception as e:  # the exporter's many error types: say which model and what to try
                raise ONNXExportError(f"torch.onnx.export could not trace {type(model).__name__}: "
                                      f"{type(e).__name__}: {str(e)[:500]}") from e
        for name in sorted(os.listdir(staging), key=lambda n: n == os.path.basename(path)):  # the graph last
            os.replace(os.path.join(staging, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("Wrote %s (inputs %s, output %s).", path, names, output)
    return path
