"""GGUF export of a shrunk Llama: the file read back with the gguf package (per-block widths, tensor names and
shapes, the tokenizer's keys), and run by a reference of llama.cpp's `deci` graph written here in numpy (normal
rotary pairs, per-block head counts, attention-free blocks), which must give the shrunk model's logits. llama.cpp
itself runs the export in tests/test_engines.py (slow) and benchmarks/export_engines.py."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from spdy_hf.errors import SPDYError
from spdy_hf.export.gguf_vocab import TokenizerExportError, pre_tokenizer_name
from spdy_hf.export.to_gguf import EMPTY_FFN_WIDTH, block_widths, interleave_rotary, write_gguf
from spdy_hf.modeling.groups import find_structured_groups, group_name, shrink

gguf = pytest.importorskip("gguf")


def byte_bpe_tokenizer(digits: bool = False):
    """A byte-level BPE fast tokenizer: 256 byte tokens, two merges and an end-of-text token (id 258)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = [*bytes_to_unicode().values(), "Ġt", "he"]
    backend = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [("Ġ", "t"), ("h", "e")]))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                             if digits else byte_level)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"})
    return tokenizer


def make_llama(tie: bool = False, bias: bool = False, rope_scaling: dict | None = None, vocab: int = 259):
    """A 4-block Llama (4 query heads in 2 key/value groups, 64 FFN neurons) over the byte-level vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    rope = {"rope_theta": 10000.0, "rope_type": "default", **(rope_scaling or {})}
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128, rms_norm_eps=1e-5,
                         bos_token_id=258, eos_token_id=258, tie_word_embeddings=tie, attention_bias=bias,
                         rope_parameters=rope)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1 and sharp attention, so that a misplaced norm or rotation shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "q_proj" in name or "k_proj" in name:
                p.mul_(20.0)
    return model


def shrink_unevenly(model, kept: dict[str, list[int]]):
    """Shrinks each named group ("model.layers.I:attention" / ":ffn") to its kept heads/neurons."""
    for group in find_structured_groups(model):
        if group_name(group) in kept:
            shrink(model, group, kept[group_name(group)])
    return model


UNEVEN = {"model.layers.0:attention": [], "model.layers.1:attention": [1], "model.layers.1:ffn": list(range(0, 64, 3)),
          "model.layers.2:ffn": [], "model.layers.3:attention": [], "model.layers.3:ffn": list(range(40))}


def rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def deci_reference(path: str, ids: list[int]) -> np.ndarray:
    """Logits of every position, computed from the GGUF file as llama.cpp's deci graph computes them (float64)."""
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    kv = {k.removeprefix(arch + "."): f.contents() for k, f in reader.fields.items()}
    t = {x.name: np.asarray(x.data, dtype=np.float64) for x in reader.tensors}
    eps, base, d = kv["attention.layer_norm_rms_epsilon"], kv["rope.freq_base"], kv["rope.dimension_count"]
    freqs = base ** (-np.arange(0, d, 2) / d) / t.get("rope_freqs.weight", np.ones(d // 2))
    n = len(ids)
    angle = np.arange(n)[:, None] * freqs[None, :]  # (n, d/2)
    cos, sin = np.cos(angle), np.sin(angle)

    def rope(x):  # (n, heads, d), pairs (2i, 2i+1)
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * cos[:, None] - b * sin[:, None]
        out[..., 1::2] = a * sin[:, None] + b * cos[:, None]
        return out

    x = t["token_embd.weight"][ids]
    for i in range(kv["block_count"]):
        heads, kv_heads = kv["attention.head_count"][i], kv["attention.head_count_kv"][i]
        p = f"blk.{i}."
        if heads:
            h = rms(x, t[p + "attn_norm.weight"], eps)
            q = rope((h @ t[p + "attn_q.weight"].T).reshape(n, heads, d))
            k = rope((h @ t[p + "attn_k.weight"].T).reshape(n, kv_heads, d))
            v = (h @ t[p + "attn_v.weight"].T).reshape(n, kv_heads, d)
            k, v = np.repeat(k, heads // kv_heads, 1), np.repeat(v, heads // kv_heads, 1)
            s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d) + np.triu(np.full((n, n), -np.inf), 1)
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            x = x + np.einsum("hqk,khd->qhd", s, v).reshape(n, heads * d) @ t[p + "attn_output.weight"].T
        h = rms(x, t[p + "ffn_norm.weight"], eps)
        gate, up = h @ t[p + "ffn_gate.weight"].T, h @ t[p + "ffn_up.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ t[p + "ffn_down.weight"].T
    out = t.get("output.weight", t["token_embd.weight"])
    return rms(x, t["output_norm.weight"], eps) @ out.T


def logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


IDS = [258, 71, 101, 256, 257, 3, 200, 17, 44, 90, 12, 5]


def test_uneven_blocks_run_in_the_deci_reference_as_in_the_shrunk_model(tmp_path):
    model = shrink_unevenly(make_llama(), UNEVEN)
    assert [(w["heads"], w["kv_heads"], w["ffn"]) for w in block_widths(model)] == \
        [(0, 0, 64), (2, 1, 22), (4, 2, 0), (0, 0, 40)]
    path = write_gguf(model, byte_bpe_tokenizer(), str(tmp_path / "m.gguf"), dtype="float32")
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "deci"
    # the first block keeps one zero key/value group (llama.cpp reads the head size off it); a block without FFN
    # neurons gets a zero FFN; the other widths are the model's
    assert reader.fields["deci.attention.head_count"].contents() == [2, 2, 4, 0]
    assert reader.fields["deci.attention.head_count_kv"].contents() == [1, 1, 2, 0]
    assert reader.fields["deci.feed_forward_length"].contents() == [64, 22, EMPTY_FFN_WIDTH, 40]
    shapes = {x.name: tuple(int(s) for s in x.shape) for x in reader.tensors}  # GGUF order: (in, out)
    assert shapes["blk.1.attn_q.weight"] == (32, 16) and shapes["blk.1.attn_k.weight"] == (32, 8)
    assert shapes["blk.1.ffn_down.weight"] == (22, 32) and shapes["blk.3.ffn_gate.weight"] == (32, 40)
    assert "blk.3.attn_q.weight" not in shapes and "blk.3.attn_norm.weight" not in shapes
    assert not np.any(next(x for x in reader.tensors if x.name == "blk.0.attn_output.weight").data)
    assert not np.any(next(x for x in reader.tensors if x.name == "blk.2.ffn_down.weight").data)
    assert "output.weight" in shapes
    np.testing.assert_allclose(deci_reference(path, IDS), logits(model, IDS), atol=2e-4, rtol=1e-4)


def test_rotary_interleaving_is_what_makes_the_file_right(tmp_path, monkeypatch):
    """Written without the reordering of query/key rows, the same reference gives other logits: the test above
    checks the rotary layout, not only the shapes."""
    import spdy_hf.export.to_gguf as to_gguf

    model = shrink_unevenly(make_llama(), UNEVEN)
    monkeypatch.setattr(to_gguf, "interleave_rotary", lambda weight, heads: weight)
    path = write_gguf(model, byte_bpe_tokenizer(), str(tmp_path / "plain.gguf"), dtype="float32")
    assert np.abs(deci_reference(path, IDS) - logits(model, IDS)).max() > 1e-2


def test_interleave_pairs_each_heads_halves():
    w = torch.arange(2 * 8).reshape(16, 1).float()  # two heads of 8 rows
    out = interleave_rotary(w, 2).flatten().tolist()
    assert out == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_dense_tied_model_with_biases_and_llama3_rope_in_half_precision(tmp_path):
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 16}
    model = make_llama(tie=True, bias=True, rope_scaling=llama3)
    path = write_gguf(model, byte_bpe_tokenizer(), str(tmp_path / "dense.gguf"))
    reader = gguf.GGUFReader(path)
    names = {x.name: x for x in reader.tensors}
    assert "output.weight" not in names  # tied: llama.cpp reuses the token embedding
    assert names["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert names["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias", "rope_freqs.weight"} <= set(names)
    assert not np.allclose(names["rope_freqs.weight"].data, 1.0)
    assert reader.fields["deci.attention.head_count"].contents() == [4] * 4
    np.testing.assert_allclose(deci_reference(path, IDS), logits(model, IDS), atol=0.05, rtol=0.02)


def test_tokenizer_keys(tmp_path):
    tokenizer = byte_bpe_tokenizer(digits=True)
    path = write_gguf(make_llama(), tokenizer, str(tmp_path / "t.gguf"))
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 259 and tokens[256:] == ["Ġt", "he", "<|endoftext|>"]
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[0] == gguf.TokenType.NORMAL and types[258] == gguf.TokenType.CONTROL
    assert fields["tokenizer.ggml.merges"].contents() == ["Ġ t", "h e"]
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 258
    # copied from another GGUF file as they are
    again = write_gguf(make_llama(), None, str(tmp_path / "copy.gguf"), tokenizer_from=path)
    copied = gguf.GGUFReader(again).fields
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.pre", "tokenizer.ggml.eos_token_id"):
        assert copied[key].contents() == fields[key].contents()


def test_pre_tokenizer_names():
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}}) is None


def test_what_cannot_be_written_says_so(tmp_path, tiny_bert):
    with pytest.raises(SPDYError, match="Llama-family"):
        write_gguf(tiny_bert, None, str(tmp_path / "x.gguf"))
    from tokenizers import Tokenizer, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(byte_bpe_tokenizer().backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # one llama.cpp has no name for
    with pytest.raises(TokenizerExportError, match="pre-tokenizer"):
        write_gguf(make_llama(), PreTrainedTokenizerFast(tokenizer_object=backend), str(tmp_path / "y.gguf"))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary file left behind


def test_a_pruned_result_and_its_saved_output_export_alike(tmp_path, tokenizer):
    """`PruningResult.export` and `spdy-hf export DIR` write the profile's widths, and the file computes what the
    zero-filled pruned model computes."""
    from conftest import VOCAB, small_config
    from test_structured_pruner import structured_table

    from spdy_hf import SPDYPruner
    from spdy_hf.cli import main

    model = make_llama(vocab=VOCAB)  # the calibration windows are the MiniLM tokenizer's ids
    config = small_config(tmp_path, target_speedup=1.6, family="structured")
    result = SPDYPruner(model, config, tokenizer).prune(latency_table=structured_table(model, config),
                                                       progress=False)
    kept = {e["name"]: e["keep"] for e in result.groups}
    assert any(k < e["num_groups"] for k, e in zip(kept.values(), result.groups))
    direct = result.export(tmp_path / "direct.gguf", tokenizer=byte_bpe_tokenizer(), dtype="float32")
    assert not any(m.__class__.__name__ == "RemovedAttention" for m in result.model.modules())  # copy shrunk
    out_dir = result.save_pretrained(tmp_path / "out")
    assert main(["export", str(out_dir), "-o", str(tmp_path / "cli.gguf"), "--dtype", "float32",
                 "--tokenizer-from", direct]) == 0
    fields = [gguf.GGUFReader(p).fields for p in (direct, str(tmp_path / "cli.gguf"))]
    heads = [e["keep"] * 2 for e in result.groups if e["kind"] == "attention"]  # 2 query heads per group
    assert fields[0]["deci.attention.head_count"].contents()[1:] == heads[1:]
    for key in ("deci.attention.head_count", "deci.attention.head_count_kv", "deci.feed_forward_length"):
        assert fields[0][key].contents() == fields[1][key].contents()
    expected = logits(result.model, IDS)
    np.testing.assert_allclose(deci_reference(str(tmp_path / "cli.gguf"), IDS), expected, atol=2e-4, rtol=1e-4)
    assert main(["export", str(out_dir), "-o", str(tmp_path / "cli.gguf")]) == 2  # exists: kept


def test_bfloat16_weights_are_the_models_rounded(tmp_path):
    model = make_llama()
    path = write_gguf(model, byte_bpe_tokenizer(), str(tmp_path / "bf16.gguf"), dtype="bfloat16")
    tensor = next(x for x in gguf.GGUFReader(path).tensors if x.name == "blk.1.ffn_up.weight")
    assert tensor.tensor_type == gguf.GGMLQuantizationType.BF16
    got = torch.from_numpy(np.asarray(tensor.data).view(np.int16).copy()).view(torch.bfloat16)
    expected = model.model.layers[1].mlp.up_proj.weight.detach().to(torch.bfloat16)
    assert torch.equal(got.reshape(expected.shape), expected)
