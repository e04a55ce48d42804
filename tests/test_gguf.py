"""A model given as a .gguf file: loaded through the same path as a directory, dequantized into an
ordinary model, pruned and saved as a plain safetensors checkpoint that transformers loads without gguf."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import handwritten_table, small_config

from spdy_hf import SPDYPruner
from spdy_hf.errors import SPDYError
from spdy_hf.modeling.loading import load_model_and_tokenizer, loaded_from_gguf
from spdy_hf.modeling.units import find_units

gguf = pytest.importorskip("gguf")

PARTS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_tiny_gguf(path) -> None:
    """A 2-block Llama with a byte-level BPE vocabulary (256 byte tokens, two merges, an end-of-text token), in
    float32, written with the gguf package under llama.cpp's tensor names."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = [*bytes_to_unicode().values(), "Ġt", "he", "<|endoftext|>"]
    eos = len(tokens) - 1
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokens), max_position_embeddings=128,
                         bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=False)
    state = {k: v.numpy().astype(np.float32) for k, v in LlamaForCausalLM(config).state_dict().items()}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(128)
    writer.add_embedding_length(32)
    writer.add_block_count(2)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(8)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * eos + [3])
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{name}.weight" for i in range(2)
                  for hf, name in PARTS.items()})
    for hf, name in names.items():
        writer.add_tensor(name, state[hf])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def tiny_gguf(tmp_path):
    path = tmp_path / "tiny" / "tiny-llama.F32.gguf"
    path.parent.mkdir()
    write_tiny_gguf(path)
    return path


def test_a_gguf_file_loads_as_an_ordinary_model(tiny_gguf):
    model, tokenizer = load_model_and_tokenizer(str(tiny_gguf))
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert not loaded_from_gguf(model) and getattr(model, "hf_quantizer", None) is None
    assert tokenizer("the cat").input_ids and model.config.num_hidden_layers == 2
    with pytest.raises(SPDYError, match="GGUF file .* does not exist"):
        load_model_and_tokenizer(str(tiny_gguf.parent / "missing.gguf"))


def test_a_pruned_gguf_model_saves_as_a_plain_checkpoint(tiny_gguf, tmp_path):
    """Pruned from the GGUF (by `SPDYPruner` on a model loaded straight with transformers too) and saved: the
    directory holds safetensors, no gguf quantization config, and plain transformers loads the pruned model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    assert loaded_from_gguf(model)
    config = small_config(tmp_path, target_speedup=1.5, method="magnitude")
    pruner = SPDYPruner(model, config, tokenizer)
    assert not loaded_from_gguf(model)
    result = pruner.prune(latency_table=handwritten_table(model, find_units(model, config.skip_modules), config),
                          progress=False)
    assert result.report["overall_sparsity"] > 0
    out = result.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in saved and saved["spdy"]["report"]["target_speedup"] == 1.5
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([tokenizer("the cat").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, result.model(ids).logits)
