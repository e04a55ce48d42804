"""Today's decoder architectures, each a tiny model built from config: Llama 3 (grouped-query attention, tied
embeddings, rope scaling), Qwen2 (q/k/v biases), Mistral (a sliding window shorter than the context), Phi-3 (fused
`qkv_proj` and `gate_up_proj`) and Gemma 2 (a head width of its own, sliding and global layers, soft-capping).

A removed key/value group takes its query heads with it; the shrunk model equals the zero-filled one, in a forward
pass and in generation; and every stage of a structured job runs on each, from a measured latency table to a saved
checkpoint that loads shrunk."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from conftest import VOCAB, example_inputs, small_config, work_clock

from spdy_hf import SPDYPruner
from spdy_hf.config import RegimeConfig
from spdy_hf.latency.regime import end_to_end_call
from spdy_hf.modeling.groups import find_structured_groups, shrink, zero_fill
from spdy_hf.modeling.swap import TreeSwap
from spdy_hf.output.load import load_pretrained
from spdy_hf.recovery.shrunk import ShrunkModel

HEADS, KV_HEADS, HIDDEN, FFN = 4, 2, 64, 96
COMMON = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2, num_attention_heads=HEADS,
              num_key_value_heads=KV_HEADS, vocab_size=VOCAB, max_position_embeddings=128, bos_token_id=101,
              eos_token_id=102, pad_token_id=0)


def make(name: str):
    torch.manual_seed(0)
    if name == "llama3":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, tie_word_embeddings=True,
                                                                       rope_scaling=rope))
    elif name == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON))
        for layer in model.model.layers:  # nonzero biases, so a removed group's bias rows matter
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    elif name == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**COMMON, sliding_window=8))
    elif name == "phi3":
        model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**COMMON))
    elif name == "gemma2":
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**COMMON, head_dim=24, sliding_window=8))
    else:
        raise ValueError(name)
    return model.eval()


ARCHITECTURES = ["llama3", "qwen2", "mistral", "phi3", "gemma2"]


def head_dim(model) -> int:
    return getattr(model.config, "head_dim", None) or HIDDEN // HEADS


def query_rows_of_group(model, group: int) -> dict[str, list[int]]:
    """By hand, from the config: the producer rows that key/value group `group` owns, per producer name (relative to
    the attention module). Query head h reads key/value head h // (heads / kv_heads), so a group owns a contiguous
    run of query heads; a fused q, k, v projection holds all queries, then all keys, then all values."""
    d, per = head_dim(model), HEADS // KV_HEADS
    query = list(range(group * per * d, (group + 1) * per * d))
    own = list(range(group * d, (group + 1) * d))
    if hasattr(model.model.layers[0].self_attn, "qkv_proj"):
        return {"qkv_proj": query + [HEADS * d + r for r in own] + [(HEADS + KV_HEADS) * d + r for r in own]}
    return {"q_proj": query, "k_proj": own, "v_proj": own}


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_a_removed_key_value_group_takes_its_query_heads_and_shrinking_equals_zero_filling(name):
    model = make(name)
    groups = find_structured_groups(model)
    attention = [g for g in groups if g.kind == "attention"]
    ffn = [g for g in groups if g.kind == "ffn"]
    assert len(attention) == len(ffn) == 2
    for g in attention:  # one group per key/value head, each with its query heads' columns of o_proj
        assert g.num_groups == KV_HEADS and g.group_size == HEADS // KV_HEADS * head_dim(model)
    assert all(g.num_groups == FFN for g in ffn)

    # block 0 loses key/value group 0 with its query heads, block 1 its whole attention; the FFNs lose neurons
    profile = [(attention[0], [1]), (attention[1], []), (ffn[0], list(range(0, FFN, 2))), (ffn[1], [3, 50, 95])]
    filled = copy.deepcopy(model)
    for g, kept in profile:
        zero_fill(filled, g, kept)
    attn = filled.model.layers[0].self_attn
    for proj, rows in query_rows_of_group(model, 0).items():
        weight = getattr(attn, proj).weight
        assert bool((weight[rows] == 0).all()), proj  # the group's rows, counted by hand, are zero ...
        others = [r for r in range(weight.shape[0]) if r not in set(rows)]
        assert bool((weight[others] != 0).any(dim=1).all()), proj  # ... and no other row is
        bias = getattr(getattr(attn, proj), "bias", None)
        if bias is not None:
            assert bool((bias[rows] == 0).all()) and bool((bias[others] != 0).all())
    d = head_dim(model)
    assert bool((attn.o_proj.weight[:, :HEADS // KV_HEADS * d] == 0).all())
    assert bool((attn.o_proj.weight[:, HEADS // KV_HEADS * d:] != 0).any(dim=0).all())
    if hasattr(filled.model.layers[0].mlp, "gate_up_proj"):  # gate rows then up rows, each neuron by neuron
        fused = filled.model.layers[0].mlp.gate_up_proj.weight
        for neuron in (1, 3):
            assert bool((fused[neuron] == 0).all()) and bool((fused[FFN + neuron] == 0).all())
        assert bool((fused[0] != 0).any()) and bool((fused[FFN] != 0).any())

    shrunk = copy.deepcopy(filled)
    for g, kept in profile:
        shrink(shrunk, g, kept)
    assert sum(p.numel() for p in shrunk.parameters()) < sum(p.numel() for p in filled.parameters())
    inputs = example_inputs(2, 16)
    dense = logits(model, inputs)
    torch.testing.assert_close(logits(shrunk, inputs), logits(filled, inputs), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(logits(filled, inputs), dense)
    assert model.config.num_attention_heads == HEADS  # a shrunk module's own config never reaches the model's
    prompt = example_inputs(1, 6)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():  # generation: the cache of the shrunk attention holds one key/value head, not two
        torch.testing.assert_close(shrunk.generate(**prompt, **kwargs), filled.generate(**prompt, **kwargs))

    before = {k: v.clone() for k, v in filled.state_dict().items()}
    configs = [layer.self_attn.config for layer in filled.model.layers]
    with ShrunkModel(filled) as cut:  # recovery's form: the same outputs, everything put back after
        assert len(cut) == 4
        torch.testing.assert_close(logits(filled, inputs), logits(shrunk, inputs), rtol=1e-4, atol=1e-5)
    assert [layer.self_attn.config for layer in filled.model.layers] == configs
    after = filled.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    swap = TreeSwap.record(model, lambda m: [shrink(m, g, kept, share=True) for g, kept in profile])
    torch.testing.assert_close(logits(model, inputs), logits(shrunk, inputs), rtol=1e-4, atol=1e-5)
    swap.revert()  # timing's form: the dense model again, its attention's config its own
    torch.testing.assert_close(logits(model, inputs), dense)
    assert all(layer.self_attn.config is model.config for layer in model.model.layers)


def test_phi3_groups_match_the_same_model_written_as_llama():
    """Phi-3 is a Llama with q, k, v and gate, up fused: the same weights split into a Llama give the same logits,
    and removing the same groups from both gives the same logits again (the fused layout is read right)."""
    phi = make("phi3")
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, rms_norm_eps=phi.config.rms_norm_eps,
                                                                   rope_theta=phi.config.rope_parameters["rope_theta"]
                                                                   if getattr(phi.config, "rope_parameters", None)
                                                                   else phi.config.rope_theta)).eval()
    d = head_dim(phi)
    state = {k: v for k, v in phi.state_dict().items() if "qkv_proj" not in k and "gate_up_proj" not in k}
    for i, layer in enumerate(phi.model.layers):
        q, k, v = layer.self_attn.qkv_proj.weight.split([HEADS * d, KV_HEADS * d, KV_HEADS * d])
        gate, up = layer.mlp.gate_up_proj.weight.split([FFN, FFN])
        state.update({f"model.layers.{i}.self_attn.q_proj.weight": q, f"model.layers.{i}.self_attn.k_proj.weight": k,
                      f"model.layers.{i}.self_attn.v_proj.weight": v, f"model.layers.{i}.mlp.gate_proj.weight": gate,
                      f"model.layers.{i}.mlp.up_proj.weight": up})
    llama.load_state_dict(state)
    inputs = example_inputs(2, 12)
    torch.testing.assert_close(logits(llama, inputs), logits(phi, inputs), rtol=1e-4, atol=1e-5)
    kept = {"attention": [0], "ffn": [1, 2, 40, 77]}
    for model in (phi, llama):
        for g in find_structured_groups(model):
            shrink(model, g, kept[g.kind])
    assert phi.model.layers[0].self_attn.qkv_proj.weight.shape[0] == (HEADS // KV_HEADS + 2) * d
    torch.testing.assert_close(logits(llama, inputs), logits(phi, inputs), rtol=1e-4, atol=1e-5)


def test_generation_timing_puts_a_sliding_window_cache_back_after_each_call():
    """Verify times `generate` after a context held in a cache; with a window shorter than the context, the cache's
    layers count the tokens they have seen, and each call must start from the same filled cache."""
    model = make("mistral")
    steps = []
    model.lm_head.register_forward_hook(lambda m, a, out: steps.append(a[0].shape[1]))
    call, per = end_to_end_call(model, RegimeConfig(mode="decode", context_length=20), 3)
    steps.clear()
    with torch.inference_mode():
        for _ in range(3):
            call()
    assert per == 3 and steps == [1] * 9


def block_work(module, args) -> int:
    """The multiply-adds of the blocks' linear layers over the rows they are given (the head over the vocabulary
    left out), and as much again as one block's for each pass of the model: the clock the job is timed on, so the
    tables, the search and verify agree exactly whatever else runs on the machine."""
    if isinstance(module, torch.nn.Linear) and module.out_features != VOCAB:
        return args[0].shape[:-1].numel() * module.weight.numel()
    if type(module).__name__.endswith("ForCausalLM"):
        return 4 * HIDDEN * HIDDEN + 3 * HIDDEN * FFN
    return 0


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_stage_of_a_structured_job(name, tmp_path, tokenizer, monkeypatch):
    """Profile taken on the model, database, search, verify in both regimes, recovery (gAP), saving: the checkpoint
    loads with plain transformers (zero-filled) and with spdy_hf (shrunk), with the same logits."""
    import spdy_hf.families.base as family_base

    monkeypatch.setattr(family_base, "interleaved_timer", lambda backend: work_clock(block_work))
    model = make(name)
    config = small_config(tmp_path, target_speedup=1.3, family="structured",
                          recovery={"method": "gap", "epochs": 1, "num_samples": 8})
    result = SPDYPruner(model, config, tokenizer).prune(progress=False)
    report = result.report
    assert report["target_met"] and report["measured_speedup"] >= 1.3 * (1 - config.search.target_tolerance)
    assert report["measured_speedup"] == pytest.approx(report["predicted_speedup"], rel=1e-3)
    assert set(report["speedups"]) == {"prefill", "decode"}
    assert report["recovery"]["method"] == "gap" and report["recovery"]["train_windows"] >= 1
    assert any(e["keep"] < e["num_groups"] for e in result.groups)
    out = result.save_pretrained(tmp_path / "out")
    inputs = example_inputs(2, 12)
    pruned = logits(result.model, inputs)
    plain = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(plain, inputs), pruned, rtol=1e-4, atol=1e-5)
    fast, _, _ = load_pretrained(str(out))
    assert sum(p.numel() for p in fast.parameters()) < sum(p.numel() for p in plain.parameters())
    torch.testing.assert_close(logits(fast, inputs), pruned, rtol=1e-4, atol=1e-4)
