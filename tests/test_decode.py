"""The decode regime: one new token against a key/value cache of context_length tokens."""

import numpy as np
import pytest
import torch
from conftest import MODEL_FACTORIES, VOCAB, small_config, work_clock
from test_timing_arithmetic import work_timer

from spdy_hf import SPDYConfig, SPDYPruner
from spdy_hf.config import RegimeConfig
from spdy_hf.errors import ConfigError, SPDYError
from spdy_hf.latency.regime import end_to_end_call, regime_inputs
from spdy_hf.latency.structured import check_profiles, keep_counts, measure_structured_latency
from spdy_hf.modeling.groups import find_structured_groups, shrink
from spdy_hf.modeling.swap import TreeSwap

DECODERS = ["gpt2", "llama", "opt"]


def test_decode_regime_in_the_config_and_the_table_key():
    decode = RegimeConfig(mode="decode", batch_size=2, context_length=64)
    assert decode.to_dict() == {"mode": "decode", "batch_size": 2, "context_length": 64, "dtype": "float32"}
    assert decode.tokens == 2  # each layer sees one row per sequence
    # a prefill regime records whose logits it computes: tables timed with every position's are not reused
    assert RegimeConfig().to_dict() == {"batch_size": 1, "sequence_length": 128, "dtype": "float32",
                                        "logits": "last"}
    with pytest.raises(ConfigError, match="regime.mode"):
        RegimeConfig(mode="generate")
    with pytest.raises(ConfigError, match="context_length"):
        SPDYConfig.from_dict({"regime": {"mode": "decode", "context_length": 0}})


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_prefill_computes_the_logits_generate_computes(name):
    """A causal LM's prefill pass computes the last position's logits (time to the first token), unless the regime
    asks for every position's; an encoder has no logits to leave out."""
    model = MODEL_FACTORIES[name]().eval()
    last = regime_inputs(model, RegimeConfig(sequence_length=12))
    every = regime_inputs(model, RegimeConfig(sequence_length=12, logits="all"))
    assert "logits_to_keep" not in every
    if name == "bert":
        assert "logits_to_keep" not in last
        return
    assert last["logits_to_keep"] == 1
    with torch.no_grad():
        full, one = model(**every).logits, model(**last).logits
    assert full.shape[1] == 12 and one.shape[1] == 1
    torch.testing.assert_close(one[:, 0], full[:, -1], rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="regime.logits"):
        RegimeConfig(logits="first")


def test_cli_flags_set_the_decode_regime():
    import argparse

    from spdy_hf.cli import _build_config, prune_command_parser

    sub = argparse.ArgumentParser().add_subparsers()
    parser = prune_command_parser(sub)
    args = parser.parse_args(["--regime", "decode", "--context-length", "96", "--target-speedup", "1.3"])
    config = _build_config(args)
    assert config.regime.mode == "decode" and config.regime.context_length == 96
    config = _build_config(parser.parse_args(["--logits", "all", "--target-speedup", "1.3"]))
    assert config.regime.logits == "all" and config.regime.mode == "prefill"


@pytest.mark.parametrize("name", DECODERS)
def test_a_decode_step_is_the_next_token_of_the_whole_sequence(name):
    """The held cache answers like a real one: the step's logits are those of the last position of a full forward
    pass over context + token; repeating the step changes nothing (the cache does not grow)."""
    model = MODEL_FACTORIES[name]()
    regime = RegimeConfig(mode="decode", batch_size=2, context_length=12)
    inputs = regime_inputs(model, regime)
    cache = next(v for k, v in inputs.items() if k in ("cache", "past_key_values"))
    with torch.inference_mode():
        step = model(**inputs).logits
        again = model(**inputs).logits
        full_ids = torch.cat([regime_inputs(model, RegimeConfig(batch_size=2, sequence_length=12))["input_ids"],
                              inputs["input_ids"]], dim=1)
        full = model(input_ids=full_ids, attention_mask=torch.ones_like(full_ids)).logits[:, -1:]
    assert step.shape == (2, 1, model.config.vocab_size)
    torch.testing.assert_close(step, again)
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)
    assert cache.get_seq_length() == 12


@pytest.mark.parametrize("name", DECODERS)
def test_shrunk_forms_run_against_the_same_cache_and_swap_back(name):
    model = MODEL_FACTORIES[name]()
    inputs = regime_inputs(model, RegimeConfig(mode="decode", context_length=8))
    with torch.inference_mode():
        before = model(**inputs).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    groups = find_structured_groups(model)

    def change(m):
        for g in groups:  # fewer key/value heads, one attention removed, narrower FFNs
            shrink(m, g, [] if g is groups[0] else list(range(max(1, g.num_groups // 2))), share=True)

    swap = TreeSwap.record(model, change)
    with torch.inference_mode():
        shrunk = model(**inputs).logits
    assert shrunk.shape == before.shape and not torch.allclose(shrunk, before)
    swap.revert()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in state.items()}
    with torch.inference_mode():
        torch.testing.assert_close(model(**inputs).logits, before)
    swap.apply()
    with torch.inference_mode():
        torch.testing.assert_close(model(**inputs).logits, shrunk)
    swap.revert()


def test_verify_call_generates_exactly_the_tokens_asked_for():
    model = MODEL_FACTORIES["llama"]()
    regime = RegimeConfig(mode="decode", context_length=10)
    steps = []
    model.lm_head.register_forward_hook(lambda m, a, out: steps.append(a[0].shape[1]))
    call, per = end_to_end_call(model, regime, 5)
    steps.clear()
    with torch.inference_mode():
        call()
        call()
    assert per == 5 and steps == [1] * 10  # 5 one-token steps per call, no early end of sequence


def test_decode_is_refused_for_an_encoder():
    with pytest.raises(SPDYError, match="decode"):
        regime_inputs(MODEL_FACTORIES["bert"](), RegimeConfig(mode="decode"))


def test_decode_structured_table_predicts_random_profiles():
    """With work as the clock, the decode-regime structured times add up: random profiles are predicted exactly."""
    model = MODEL_FACTORIES["llama"]()
    groups = find_structured_groups(model)
    counts = [keep_counts(g, 1, 4) for g in groups]
    inputs = regime_inputs(model, RegimeConfig(mode="decode", context_length=16))

    def run(m):
        return lambda: m(**inputs)

    part = measure_structured_latency(model, groups, counts, run, work_timer, warmup=0, repeats=1, progress=False)
    pairs = check_profiles(model, groups, counts, part, run, work_timer, n=6, warmup=0, repeats=1)
    for predicted, measured in pairs:
        assert predicted == pytest.approx(measured, rel=1e-9)
    assert any(p > 1.0 for p, _ in pairs)


CALL_WORK = 6000  # the work every forward pass of the model does whatever it is given (a third of a decode step's)


def token_work(module, args) -> int:
    """The multiply-adds of the decoder blocks' linear layers over the rows they are given, plus `CALL_WORK` per
    forward pass of the model (the lm_head, whose work no profile changes, is left out). A decode step does one row
    per sequence, a prefill pass one per token, and `generate` one forward pass of one row per new token: a table
    profiled in a regime predicts exactly what verify measures in it, and the two regimes' speedups differ (the
    fixed work weighs more against one row than against 32)."""
    if isinstance(module, torch.nn.Linear) and module.out_features != VOCAB:
        return args[0].shape[:-1].numel() * module.weight.numel()
    return CALL_WORK if type(module).__name__ == "LlamaForCausalLM" else 0


token_work_timer = work_clock(token_work)


def test_decode_job_end_to_end(tmp_path, tokenizer, monkeypatch):
    """A structured job in the decode regime, profiled and verified on a clock of work (`token_work_timer`): the
    profile meets the target in decode as verify measures it (generate), as the decode table predicted, and its
    prefill speedup is what the same pruned model gives over 32 tokens; the report has the held-out perplexity; the
    saved model loads in plain transformers and generates."""
    from transformers import AutoModelForCausalLM

    import spdy_hf.families.base as family_base

    monkeypatch.setattr(family_base, "interleaved_timer", lambda backend: token_work_timer)
    model = MODEL_FACTORIES["llama"]()
    config = small_config(tmp_path, target_speedup=1.5, family="structured", method="magnitude",
                          regime={"mode": "decode"},
                          search={"score_dtype": "bfloat16"})  # scored on a bfloat16 copy, as on an AMX CPU
    result = SPDYPruner(model, config, tokenizer).prune(progress=False)
    report = result.report
    assert report["regime"]["mode"] == "decode"
    speedups = report["speedups"]
    assert speedups["decode"]["searched"] and not speedups["prefill"]["searched"]
    assert report["search"]["score_dtype"] == "bfloat16"
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # the model itself stays float32
    decode = speedups["decode"]["measured_speedup"]
    assert decode == report["measured_speedup"] == pytest.approx(report["dense_time_ms"] / report["pruned_time_ms"])
    # the target, in the regime searched: met as measured, and as the decode table predicted (work adds up exactly)
    assert decode >= config.target_speedup * (1 - config.search.target_tolerance) and report["target_met"] is True
    assert decode == pytest.approx(report["predicted_speedup"], rel=1e-3)
    # a decode step is one row per sequence: the blocks' weights once, and the fixed work
    blocks = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features != VOCAB)
    assert report["dense_time_ms"] == pytest.approx((blocks + CALL_WORK) / 1000)
    # prefill, measured over 32 tokens: the same pruned blocks (work `kept` per row), 32 rows, the fixed work once
    kept = (blocks + CALL_WORK) / decode - CALL_WORK
    assert speedups["prefill"]["regime"]["sequence_length"] == 32
    assert speedups["prefill"]["dense_time_ms"] == pytest.approx((32 * blocks + CALL_WORK) / 1000)
    assert speedups["prefill"]["measured_speedup"] == pytest.approx((32 * blocks + CALL_WORK) / (32 * kept + CALL_WORK))
    assert speedups["prefill"]["measured_speedup"] > decode * 1.05  # the regimes differ, and each was measured
    heldout = report["heldout"]
    assert heldout["metric"] == "perplexity" and heldout["source"] == "builtin"
    assert np.isfinite(heldout["dense"]) and np.isfinite(heldout["pruned"]) and heldout["pruned"] != heldout["dense"]
    result.save_pretrained(tmp_path / "out")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    out = plain.generate(input_ids=torch.tensor([[101, 2000, 2001]]), max_new_tokens=3, min_new_tokens=3,
                         do_sample=False)
    assert out.shape == (1, 6)
