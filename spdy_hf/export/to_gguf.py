"""A Llama-family decoder, shrunk to its kept heads and neurons, written as a GGUF file that llama.cpp runs.

A pruned model's blocks differ in width: each keeps its own number of query heads, key/value heads and FFN neurons.
llama.cpp's `llama` graph takes one head count for every block, but its `deci` architecture (written for NVIDIA's
Nemotron-NAS models, which are Llama models with per-block widths) reads `head_count`, `head_count_kv` and
`feed_forward_length` per block and builds each block with its own. The file is written under `deci`, with the
tensors of llama.cpp's Llama layout:

- Llama, Mistral and Qwen2 models of transformers (SmolLM2 is a Llama); q/k/v biases (Qwen2) are written too;
- the query and key rows of every head are reordered for llama.cpp's rotary embedding: transformers rotates each
  head's dimension i together with i + d/2, llama.cpp rotates 2i with 2i + 1; the same reordering of queries and
  keys leaves every attention score as it was;
- rope scaling that only rescales frequencies (linear, Llama 3) becomes llama.cpp's per-frequency factors tensor;
- a block whose every head was removed is written with none (the `deci` graph skips its attention), except the first
  block: llama.cpp reads the head size off the first block's head count, so there one key/value group is kept with
  zero weights, which adds exactly nothing;
- a block whose every FFN neuron was removed gets an FFN of `EMPTY_FFN_WIDTH` neurons with zero weights: the `deci`
  graph drops a block's attention output where its FFN is absent, and a zero FFN adds exactly nothing.

Weights in float16 (the default), bfloat16 or float32; normalisation weights always float32. llama.cpp's quantiser
(`llama-quantize`) takes the file as any other; tensors whose widths its block size does not divide fall back to
another type there.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from torch import nn

from ..errors import SPDYError
from ..modeling.groups import RemovedAttention
from .gguf_vocab import add_bpe_tokenizer, copy_tokenizer

logger = logging.getLogger(__name__)

ARCHITECTURE = "deci"
MODEL_TYPES = ("llama", "mistral", "qwen2")
EMPTY_FFN_WIDTH = 32  # a zero FFN where a block keeps none: one block of llama.cpp's 32-wide quantisation types
DTYPES = ("float16", "bfloat16", "float32")


class GGUFExportError(SPDYError):
    """The model cannot be written as a GGUF file that llama.cpp runs; the message says why."""


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise GGUFExportError("Writing a GGUF file needs the gguf package: pip install 'spdy-hf[gguf]' (or gguf).") \
            from e
    return gguf


def block_widths(model: nn.Module) -> list[dict[str, int]]:
    """Per block of a (shrunk or dense) Llama-family model: its query heads, key/value heads and FFN neurons, read
    off its modules' shapes."""
    config = model.config
    head_dim = _head_dim(config)
    widths = []
    for i, layer in enumerate(_layers(model)):
        attn, mlp = layer.self_attn, layer.mlp
        if isinstance(attn, RemovedAttention):
            if attn.bias is not None and bool(attn.bias.any()):
                raise GGUFExportError(f"Block {i} lost every attention head but keeps its output projection's bias; "
                                      "llama.cpp's graph has no attention-free block with a bias.")
            heads = kv_heads = 0
        else:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                if type(getattr(attn, name, None)) is not nn.Linear:
                    raise GGUFExportError(f"Block {i}'s self_attn.{name} is a {type(getattr(attn, name, None)).__name__},"
                                          " not a plain nn.Linear: export the model before swapping in sparse kernels "
                                          "(load it with kernels=False).")
            heads, kv_heads = attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim
        for name in ("gate_proj", "up_proj", "down_proj"):
            if type(getattr(mlp, name, None)) is not nn.Linear:
                raise GGUFExportError(f"Block {i}'s mlp.{name} is not a plain nn.Linear: export the model before "
                                      "swapping in sparse kernels (load it with kernels=False).")
        widths.append({"heads": heads, "kv_heads": kv_heads, "ffn": mlp.gate_proj.out_features})
    return widths


def _layers(model: nn.Module):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or getattr(model, "lm_head", None) is None:
        raise GGUFExportError(f"{type(model).__name__} is not a causal LM of the Llama family (model.layers and an "
                              "LM head); GGUF export supports " + ", ".join(MODEL_TYPES) + ".")
    return layers


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope(model: nn.Module, head_dim: int) -> tuple[float, np.ndarray | None]:
    """(rope base, per-frequency divisors or None): the model's rotary frequencies as llama.cpp's rope_freqs."""
    config = model.config
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type") or (getattr(config, "rope_scaling", None) or {}).get("rope_type", "default")
    rotary = getattr(model.model, "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    if inv_freq is None or kind == "default":
        return float(theta), None
    if kind == "dynamic" or abs(float(getattr(rotary, "attention_scaling", 1.0)) - 1.0) > 1e-6:
        raise GGUFExportError(f"Rope scaling {kind!r} changes more than the frequencies (an attention scale, or "
                              "frequencies that depend on the length); it is not written to GGUF here.")
    if 2 * inv_freq.numel() != head_dim:
        raise GGUFExportError("The rotary embedding covers part of each head only; llama.cpp's deci graph rotates "
                              "whole heads.")
    plain = 1.0 / (float(theta) ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    factors = (plain / inv_freq.double().cpu()).numpy().astype(np.float32)
    return float(theta), (None if np.allclose(factors, 1.0) else factors)


def interleave_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """A query/key projection's rows (or bias) reordered within each head, from transformers' rotary layout
    (dimension i paired with i + d/2) to llama.cpp's (2i with 2i + 1)."""
    if heads == 0:
        return weight
    rest = weight.shape[1:]
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *rest).transpose(1, 2).reshape(weight.shape)


def check_exportable(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise GGUFExportError(f"GGUF export writes Llama-family decoders ({', '.join(MODEL_TYPES)}); this model is "
                              f"{model_type!r}. Encoders export to ONNX (format 'onnx').")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise GGUFExportError(f"The FFN activation is {act!r}; llama.cpp's Llama graph uses SiLU.")
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) is not False:
        logger.warning("The model attends within a sliding window of %d tokens; llama.cpp's deci graph attends to the "
                       "whole context, so its outputs differ from the model's beyond %d tokens.", window, window)


def write_gguf(model: nn.Module, tokenizer, path: str, dtype: str = "float16", tokenizer_from: str | None = None,
               tokenizer_pre: str | None = None, name: str | None = None, description: str | None = None) -> str:
    """Writes `model` (a Llama-family causal LM, shrunk or dense, on the CPU) to the GGUF file `path`, through a
    temporary file beside it. The tokenizer's keys are copied from the GGUF file `tokenizer_from` where given, else
    built from `tokenizer` (`spdy_hf.export.gguf_vocab`). Returns `path`."""
    gguf = _gguf()
    check_exportable(model)
    if dtype not in DTYPES:
        raise GGUFExportError(f"GGUF weights are written as one of {DTYPES}; got {dtype!r}.")
    config = model.config
    head_dim = _head_dim(config)
    widths = block_widths(model)
    theta, rope_factors = _rope(model, head_dim)
    group = config.num_attention_heads // (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    vocab_size = model.get_input_embeddings().weight.shape[0]

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, ARCHITECTURE)
    try:
        writer.add_name(name or getattr(config, "_name_or_path", None) or "spdy-hf model")
        if description:
            writer.add_description(description)
        writer.add_file_type({"float16": gguf.LlamaFileType.MOSTLY_F16, "bfloat16": gguf.LlamaFileType.MOSTLY_BF16,
                              "float32": gguf.LlamaFileType.ALL_F32}[dtype])
        writer.add_block_count(len(widths))
        writer.add_context_length(int(getattr(config, "max_position_embeddings", 2048)))
        writer.add_embedding_length(config.hidden_size)
        written = _written_widths(widths, group)
        writer.add_feed_forward_length([w["ffn"] for w in written])
        writer.add_head_count([w["heads"] for w in written])
        writer.add_head_count_kv([w["kv_heads"] for w in written])
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(theta)
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(vocab_size)
        if tokenizer_from:
            copy_tokenizer(writer, tokenizer_from)
        elif tokenizer is not None:
            add_bpe_tokenizer(writer, tokenizer, vocab_size, tokenizer_pre)
        else:
            raise GGUFExportError("llama.cpp needs the model's tokenizer in the file: pass the tokenizer, or "
                                  "tokenizer_from=<a GGUF file of the same model>.")
        _add_tensors(writer, gguf, model, widths, written, head_dim, dtype, rope_factors)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    logger.info("Wrote %s (%s, %d blocks; heads per block %s, FFN neurons per block %s).", path, dtype, len(widths),
                [w["heads"] for w in widths], [w["ffn"] for w in widths])
    return path


def _written_widths(widths: list[dict[str, int]], group: int) -> list[dict[str, int]]:
    """The widths the file declares: the model's, with the first block given one zero key/value group where it has
    no head, and every block without FFN neurons given a zero FFN (see the module docstring)."""
    out = []
    for i, w in enumerate(widths):
        w = dict(w)
        if i == 0 and w["heads"] == 0:
            w["heads"], w["kv_heads"] = group, 1
        if w["ffn"] == 0:
            w["ffn"] = EMPTY_FFN_WIDTH
        out.append(w)
    return out


def _array(t: torch.Tensor, dtype: str, gguf):
    """(numpy array, raw type or None) of a weight in the file's dtype."""
    t = t.detach().to("cpu")
    if dtype == "float32" or t.dim() == 1:
        return t.float().numpy(), None
    if dtype == "float16":
        return t.to(torch.float16).numpy(), None
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), gguf.GGMLQuantizationType.BF16


def _add_tensors(writer, gguf, model: nn.Module, widths, written, head_dim: int, dtype: str,
                 rope_factors: np.ndarray | None) -> None:
    def add(name: str, tensor: torch.Tensor) -> None:
        array, raw = _array(tensor, dtype, gguf)
        if raw is None:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, array, raw_dtype=raw)

    hidden = model.config.hidden_size
    add("token_embd.weight", model.get_input_embeddings().weight)
    add("output_norm.weight", model.model.norm.weight)
    if not getattr(model.config, "tie_word_embeddings", False):
        add("output.weight", model.lm_head.weight)
    if rope_factors is not None:
        writer.add_tensor("rope_freqs.weight", rope_factors)
    for i, (layer, have, declared) in enumerate(zip(_layers(model), widths, written)):
        prefix = f"blk.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        if declared["heads"]:
            add(f"{prefix}.attn_norm.weight", layer.input_layernorm.weight)
        if have["heads"]:
            heads, kv_heads = have["heads"], have["kv_heads"]
            add(f"{prefix}.attn_q.weight", interleave_rotary(attn.q_proj.weight, heads))
            add(f"{prefix}.attn_k.weight", interleave_rotary(attn.k_proj.weight, kv_heads))
            add(f"{prefix}.attn_v.weight", attn.v_proj.weight)
            add(f"{prefix}.attn_output.weight", attn.o_proj.weight)
            for part, module, count in (("attn_q", attn.q_proj, heads), ("attn_k", attn.k_proj, kv_heads),
                                        ("attn_v", attn.v_proj, 0)):
                if module.bias is not None:
                    writer.add_tensor(f"{prefix}.{part}.bias",
                                      interleave_rotary(module.bias.detach().float().cpu(), count).numpy())
            if attn.o_proj.bias is not None:
                writer.add_tensor(f"{prefix}.attn_output.bias", attn.o_proj.bias.detach().float().cpu().numpy())
        elif declared["heads"]:  # the first block: one zero key/value group (the module docstring)
            width = declared["heads"] * head_dim
            for part, rows in (("attn_q", width), ("attn_k", head_dim), ("attn_v", head_dim)):
                add(f"{prefix}.{part}.weight", torch.zeros(rows, hidden))
            add(f"{prefix}.attn_output.weight", torch.zeros(hidden, width))
        add(f"{prefix}.ffn_norm.weight", layer.post_attention_layernorm.weight)
        if have["ffn"]:
            for part, module in (("ffn_gate", mlp.gate_proj), ("ffn_up", mlp.up_proj), ("ffn_down", mlp.down_proj)):
                add(f"{prefix}.{part}.weight", module.weight)
                if module.bias is not None:
                    writer.add_tensor(f"{prefix}.{part}.bias", module.bias.detach().float().cpu().numpy())
        else:
            width = declared["ffn"]
            add(f"{prefix}.ffn_gate.weight", torch.zeros(width, hidden))
            add(f"{prefix}.ffn_up.weight", torch.zeros(width, hidden))
            add(f"{prefix}.ffn_down.weight", torch.zeros(hidden, width))
            if mlp.down_proj.bias is not None:  # an FFN without neurons still adds its output bias
                writer.add_tensor(f"{prefix}.ffn_down.bias", mlp.down_proj.bias.detach().float().cpu().numpy())
