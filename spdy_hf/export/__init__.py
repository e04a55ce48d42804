"""Exporting a model to the engines people serve with: llama.cpp (GGUF) and ONNX Runtime (ONNX).

The saved checkpoint of a pruned model holds zeros in dense shapes, so plain `from_pretrained` runs it at dense
speed. An export cuts the removed heads and neurons out (`spdy_hf.modeling.groups.shrink`) and writes what is left,
so the engine runs a physically smaller model with its own kernels:

- `gguf` (`spdy_hf.export.to_gguf`): Llama-family decoders, per-block widths under llama.cpp's `deci` architecture;
- `onnx` (`spdy_hf.export.to_onnx`): encoders (sentence embeddings) and causal LMs' prefill logits.

Where a profile made layers sparse (unstructured or 2:4 levels) those layers are written dense, with their zeros:
neither engine has a kernel that runs them faster. A dense model exports as it is, so the dense baseline goes
through the same writer: `time_export` times an export against it in the engine (`spdy_hf.export.timing`) and
records the speedup in a saved output's report and model card.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile

import torch
from torch import nn

from ..deploy.shrink import STRUCTURED_SPARSE, deploy_groups, read_profile_file
from ..errors import SPDYError
from ..modeling.loading import gguf_location, load_model_and_tokenizer

__all__ = ["FORMATS", "export_model", "export_result", "load_for_export", "shrunk_for_export", "time_export"]

logger = logging.getLogger(__name__)

FORMATS = ("gguf", "onnx")
SUFFIXES = {"gguf": ".gguf", "onnx": ".onnx"}


def shrunk_for_export(model: nn.Module, groups: list[dict] | None) -> nn.Module:
    """`model` (zero-filled, as saved) with the structured part of its profile cut out, in place; sparse levels stay
    in dense weights (with a warning: the engines have no kernel for them)."""
    if not groups:
        if groups is None:
            logger.warning("The profile has no structured groups (an unstructured job): every layer is exported "
                           "dense with its zeros; llama.cpp and ONNX Runtime run it at dense speed.")
        return model
    sparse = [g["name"] for g in groups if g["family"] in ("unstructured", STRUCTURED_SPARSE) and g.get("sparsity")]
    if sparse:
        logger.warning("%d groups have sparse levels (%s...): their layers are exported dense with their zeros; the "
                       "engines have no sparse kernel for them.", len(sparse), sparse[0])
    kind = {"structured": "structured", STRUCTURED_SPARSE: "structured"}
    return deploy_groups(model, [{**g, "family": kind.get(g["family"], "dense")} for g in groups], "cpu")


def load_for_export(name_or_path: str, trust_remote_code: bool = False):
    """(model, tokenizer, description) of anything `spdy-hf prune` takes or writes: a saved SPDY output (its removed
    heads and neurons cut out), a dense directory, a Hub id or a `.gguf` file."""
    model, tokenizer = load_model_and_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    profile_path = os.path.join(name_or_path, "spdy_profile.json") if os.path.isdir(name_or_path) else None
    if profile_path and os.path.isfile(profile_path) and getattr(model.config, "spdy", None):
        _, groups = read_profile_file(profile_path)
        report = (model.config.spdy or {}).get("report", {})
        shrunk_for_export(model, groups)
        measured = report.get("measured_speedup")
        description = (f"Pruned with spdy_hf for {report.get('target_speedup')}x"
                       + (f" (measured {measured:.3f}x in PyTorch)" if isinstance(measured, float) else ""))
        return model.eval(), tokenizer, description
    return model.eval(), tokenizer, None


def export_model(model: nn.Module | str | os.PathLike, output: str | os.PathLike, format: str | None = None,
                 tokenizer=None, *, dtype: str = "float16", tokenizer_from: str | None = None,
                 tokenizer_pre: str | None = None, overwrite: bool = False, trust_remote_code: bool = False) -> str:
    """Exports a model to `output` as GGUF or ONNX (`format`; None: from the output's suffix).

    Args:
        model: a path or Hub id (`load_for_export`), or a model in memory, shrunk or dense (see `PruningResult.export`
            for a pruned one).
        output: the file to write; an existing one is kept unless `overwrite`.
        tokenizer: the model's tokenizer, for a model in memory (GGUF files carry one).
        dtype: GGUF weights: float16, bfloat16 or float32 (ONNX: the model's own dtype).
        tokenizer_from: a GGUF file whose tokenizer keys are copied (default for a `.gguf` model: that file).
        tokenizer_pre: llama.cpp's pre-tokenizer name, where it cannot be read off the tokenizer.
    Returns the path written.
    """
    format = format or next((f for f, s in SUFFIXES.items() if str(output).lower().endswith(s)), None)
    if format not in FORMATS:
        raise SPDYError(f"Export format must be one of {FORMATS} (or an output ending in .gguf or .onnx); got "
                        f"{format!r}.")
    output = os.fspath(output)
    if os.path.exists(output) and not overwrite:
        raise SPDYError(f"{output} exists; choose another path, or pass --overwrite (overwrite=True) to replace it.")
    description = None
    if isinstance(model, (str, os.PathLike)):
        model = os.fspath(model)
        if format == "gguf" and tokenizer_from is None and gguf_location(model) is not None:
            tokenizer_from = model
        model, tokenizer, description = load_for_export(model, trust_remote_code=trust_remote_code)
    if format == "onnx" and any(p.dtype != torch.float32 or p.device.type != "cpu" for p in model.parameters()):
        model = copy.deepcopy(model).to(device="cpu", dtype=torch.float32)  # the caller's model stays as it is
    if format == "gguf":
        from .to_gguf import write_gguf

        return write_gguf(model, tokenizer, output, dtype=dtype, tokenizer_from=tokenizer_from,
                          tokenizer_pre=tokenizer_pre, description=description)
    from .to_onnx import write_onnx

    return write_onnx(model, output)


def export_result(result, output: str, format: str | None = None, **kwargs) -> str:
    """`export_model` for a `PruningResult`: a copy of its model is shrunk, the result's model stays as it is."""
    if result.is_shrunk():
        raise SPDYError("The result's modules were already cut down (to_sparse_kernels); export before that, or "
                        "export the saved output directory.")
    model = copy.deepcopy(result.model).eval()
    shrunk_for_export(model, result.groups)
    tokenizer = kwargs.pop("tokenizer", result.tokenizer)
    return export_model(model, output, format, tokenizer=tokenizer, **kwargs)


DEFAULT_REGIME = {"batch_size": 1, "sequence_length": 128, "context_length": 512}


def saved_report(path: str) -> dict | None:
    """The report of a directory written by `spdy-hf prune`, None for anything else."""
    report = os.path.join(path, "spdy_report.json") if os.path.isdir(path) else None
    if report is None or not os.path.isfile(report):
        return None
    with open(report, encoding="utf-8") as f:
        return json.load(f)


def time_export(model: str | os.PathLike, exported: str | os.PathLike, *, dense: str | None = None,
                dtype: str = "float16", tokenizer_from: str | None = None, tokenizer_pre: str | None = None,
                threads: int | None = None, repeats: int = 10, record: bool = True,
                trust_remote_code: bool = False) -> dict:
    """Times `exported` (the export of `model`) against the dense model exported the same way, in the engine of its
    format (ONNX Runtime, llama.cpp), in the regime `model`'s job was pruned for (batch 1 x 128 tokens and a
    512-token context when `model` is not a saved output).

    Args:
        dense: the dense model; by default the base a saved output records (its Hub id, directory or .gguf file).
        dtype, tokenizer_from, tokenizer_pre: as the export of `model` used them (`export_model`).
        threads: the engine's threads (default: every core).
        record: with a saved output as `model`, add the measurement to its spdy_report.json (`engines`: the latest
            per engine and file type) and write its model card again, so the card lists the speedup.
    Returns the measurement (`spdy_hf.export.timing.time_exports`, with the dtype and the machine).
    """
    from ..integrations.hub import write_card
    from ..latency.environment import environment_info
    from ..utils.io import atomic_write_json
    from .timing import time_exports

    model, exported = os.fspath(model), os.fspath(exported)
    fmt = os.path.splitext(exported)[1].lower().lstrip(".")
    if fmt not in FORMATS:
        raise SPDYError(f"Only a .gguf or .onnx export can be timed; got {exported}.")
    report = saved_report(model)
    dense = dense or _recorded_base(model)
    if not dense:
        raise SPDYError(f"The dense model to time {exported} against is unknown: {model} records no base model. Pass "
                        "it (--dense MODEL).")
    regime = {**DEFAULT_REGIME, **{k: v for k, v in ((report or {}).get("regime") or {}).items() if v is not None}}
    with tempfile.TemporaryDirectory(prefix="spdy-dense-export-") as tmp:
        logger.info("Exporting the dense model %s the same way, for the baseline.", dense)
        dense_file = export_model(dense, os.path.join(tmp, "dense" + SUFFIXES[fmt]), fmt, dtype=dtype,
                                  tokenizer_from=tokenizer_from, tokenizer_pre=tokenizer_pre,
                                  trust_remote_code=trust_remote_code)
        entry = time_exports(exported, dense_file, regime, threads=threads, repeats=repeats)
    entry.update({"dtype": dtype if fmt == "gguf" else "float32", "machine": environment_info().get("processor")})
    if report is not None and record:
        key = (entry["engine"], entry["dtype"])
        kept = [e for e in report.get("engines") or [] if (e.get("engine"), e.get("dtype")) != key]
        report["engines"] = [*kept, entry]
        atomic_write_json(os.path.join(model, "spdy_report.json"), report)
        write_card(model)
        logger.info("The measurement is in %s's report and model card.", model)
    return entry


def _recorded_base(directory: str) -> str | None:
    """The base model a saved output's config.json records, None where there is none."""
    config = os.path.join(directory, "config.json") if os.path.isdir(directory) else None
    if config is None or not os.path.isfile(config):
        return None
    with open(config, encoding="utf-8") as f:
        return (json.load(f).get("spdy") or {}).get("base_model")
