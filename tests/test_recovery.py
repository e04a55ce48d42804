"""Few-sample recovery (gAP and the layer-wise variant) on tiny models, every family: profile zeros held exactly,
the loss falls, and a saved recovered model loads and computes what it computed in memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import MODEL_FACTORIES, MS_PER_WEIGHT, VOCAB, example_inputs, handwritten_table, small_config
from test_cuda_backend import cuda_config, cuda_table
from test_structured_pruner import AUTO, outputs, structured_part, structured_table
from torch.overrides import TorchFunctionMode

from spdy_hf import SPDYConfig, SPDYPruner
from spdy_hf.config import DEFAULT_SKIP_MODULES
from spdy_hf.errors import ConfigError
from spdy_hf.modeling.units import find_units
from spdy_hf.output.load import load_pretrained
from spdy_hf.recovery.attention import Float32Attention
from spdy_hf.recovery.fit import Recovery, _parts, recovery_dtype
from spdy_hf.recovery.held_zeros import HeldZeros
from spdy_hf.recovery.teacher import DenseSnapshot, layer_loss, pruned_layers

# a learning rate a tiny random model improves at within a few steps of 2 windows (1e-3 overshoots on some: the
# held-back loss rises after the first epoch and the unrecovered weights are kept)
FAST = {"epochs": 4, "learning_rate": 1e-4, "batch_size": 2, "patience": 4}


def job(name, family, tmp_path, tokenizer, recovery, target=1.6, **overrides):
    """The same seeded job with `recovery` settings; the table is hand-written (nothing timed), and verify keeps
    the searched profile (a tiny model's timings would correct it differently from run to run)."""
    model = MODEL_FACTORIES[name]()
    overrides.setdefault("search", {"verify_corrections": 0})
    if family == "cuda":
        config = cuda_config(tmp_path, 1.2, method="magnitude", recovery=recovery, **overrides)
        table = cuda_table(model, find_units(model, config.skip_modules), config)
    else:
        config = small_config(tmp_path, target_speedup=target, family=family, recovery=recovery, **overrides)
        if family == "structured":
            table = structured_table(model, config)
        else:
            table = handwritten_table(model, find_units(model, config.skip_modules), config)
        if family == "mixed":  # the per-layer table, and structured times on the same scale
            table.structured = structured_part(model, config, ms_per_weight=MS_PER_WEIGHT)
            table.structured["dense_ms"] = table.base_time_ms
    return SPDYPruner(model, config, tokenizer).prune(latency_table=table, progress=False)


def zeros(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() == 0 for n, p in model.named_parameters()}


CASES = [("bert", "structured", "gap"), ("llama", "structured", "layerwise"), ("gpt2", "unstructured", "gap"),
         ("opt", "unstructured", "layerwise"), ("llama", "mixed", "gap"), ("bert", "mixed", "layerwise"),
         ("llama", "cuda", "gap")]


@pytest.mark.parametrize("name,family,method", CASES)
def test_recovery_holds_every_profile_zero(name, family, method, tmp_path, tokenizer):
    """The recovered model has the unrecovered model's profile (the same seeded job), every zero of it still
    zero, counted per parameter; its weights moved and the objective on the held-back windows fell. (A tiny random
    model's final output hardly depends on what was pruned, scores of 1e-6 to 1e-4, so the score before and after
    is reported, not asserted here: benchmarks/recovery.py measures it on MiniLM.)"""
    plain = job(name, family, tmp_path / "plain", tokenizer, {"method": "none"})
    recovered = job(name, family, tmp_path / "rec", tokenizer, {"method": method, **FAST})
    assert [p["sparsity"] for p in recovered.profile] == [p["sparsity"] for p in plain.profile]
    entry = recovered.report["recovery"]
    assert entry["method"] == method and entry["held_zeros"] > 0
    before, after = zeros(plain.model), zeros(recovered.model)
    layers = {u.name for u in find_units(plain.model, DEFAULT_SKIP_MODULES)}  # every linear layer of the blocks
    moved = False
    for n, p in recovered.model.named_parameters():
        if n.rsplit(".", 1)[0] in layers:  # (a LayerNorm bias initialised to 0 is no profile zero)
            missing = before[n] & ~after[n]  # a profile zero that is not zero any more
            assert int(missing.sum()) == 0, n
        moved |= not torch.equal(p.detach(), dict(plain.model.named_parameters())[n].detach())
    for unit in plain.units:  # per unit, exactly as many zeros (a trained weight landing on 0.0 is not a hazard)
        assert int(after[unit.name + ".weight"].sum()) >= int(before[unit.name + ".weight"].sum())
    assert moved != entry["reverted"]  # trained, or put back exactly
    assert entry["heldback_after"] < entry["heldback_before"]
    assert entry["after"]["calibration_score"] == pytest.approx(recovered.report["score_dense_vs_pruned"])
    guard = entry["heldback_score"]  # the final output on the held-back windows: better, or the weights reverted
    assert (guard["after"] > guard["before"]) == entry["reverted"]
    if family == "cuda":  # every unit at the 2:4 level is still 2:4
        from spdy_hf.modeling.patterns import is_two_four

        for p, unit in zip(recovered.profile, recovered.units):
            if p["pattern"] == "2:4":
                assert is_two_four(dict(recovered.model.named_modules())[unit.name].weight.detach())
    if family == "structured":
        for e in recovered.groups:  # removed heads and neurons: zero in the consumer and every producer
            assert e["keep"] == len(e["kept"])


@pytest.mark.parametrize("name,family", [("llama", "structured"), ("gpt2", "unstructured"), ("bert", "mixed")])
def test_a_saved_recovered_model_loads_with_the_same_outputs(name, family, tmp_path, tokenizer):
    import transformers

    result = job(name, family, tmp_path, tokenizer, {"method": "gap", **FAST})
    inputs = example_inputs(2, 16)
    expected = outputs(result.model, inputs)
    out_dir = result.save_pretrained(tmp_path / "out")
    plain = getattr(transformers, AUTO[name]).from_pretrained(out_dir).eval()
    torch.testing.assert_close(outputs(plain, inputs), expected, rtol=1e-4, atol=1e-5)
    fast, _, _ = load_pretrained(str(out_dir))  # shrunk (structured) or with sparse kernels: the same outputs
    torch.testing.assert_close(outputs(fast, inputs), expected, rtol=1e-4, atol=1e-4)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Recovery" in card


def test_the_training_loss_falls_on_a_tiny_model(tmp_path, tokenizer):
    result = job("llama", "unstructured", tmp_path, tokenizer, {"method": "gap", **FAST, "epochs": 6,
                                                                  "patience": 6}, target=2.0)
    entry = result.report["recovery"]
    assert entry["train_loss"][-1] < entry["train_loss"][0]
    assert entry["heldback_after"] < entry["heldback_before"]
    assert entry["best_epoch"] >= 1


def test_early_stopping_keeps_the_unrecovered_weights_when_no_epoch_helps(tmp_path, tokenizer):
    """A learning rate far too high: every epoch makes the held-back loss worse, so the weights the search left
    are kept and the model is exactly the unrecovered one."""
    plain = job("gpt2", "unstructured", tmp_path / "plain", tokenizer, {"method": "none"})
    wild = job("gpt2", "unstructured", tmp_path / "wild", tokenizer,
               {"method": "gap", "learning_rate": 10.0, "epochs": 3, "patience": 1, "batch_size": 2})
    entry = wild.report["recovery"]
    assert entry["best_epoch"] == 0 and entry["epochs_run"] == 1
    for (n, a), b in zip(plain.model.named_parameters(), wild.model.parameters()):
        assert torch.equal(a, b), n


def test_held_zeros_and_snapshot(tiny_llama):
    model = tiny_llama
    snapshot = DenseSnapshot(model)
    q = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.weight[:, :5] = 0
        q.weight[3] = 0
    assert list(pruned_layers(model, snapshot)) == ["model.layers.0.self_attn.q_proj"]
    held = HeldZeros.of_modules(model, ["model.layers.0.self_attn.q_proj"])
    assert held.counts() == {"model.layers.0.self_attn.q_proj.weight": 5 * 32 + 32 - 5}
    with torch.no_grad():
        q.weight.add_(1.0)
    assert held.violations() == {"model.layers.0.self_attn.q_proj.weight": 5 * 32 + 32 - 5}
    held.apply()
    assert held.violations() == {} and int((q.weight == 0).sum()) == 5 * 32 + 32 - 5
    q.weight.grad = torch.ones_like(q.weight)
    held.hold_gradients()
    assert int((q.weight.grad == 0).sum()) == 5 * 32 + 32 - 5
    snapshot.restore(model)
    dense = snapshot.model(model)
    assert pruned_layers(model, snapshot) == {}
    for a, b in zip(model.parameters(), dense.parameters()):
        assert torch.equal(a, b) and not b.requires_grad
    snapshot.close()


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_recovery_schedule_sets_each_step_s_learning_rate(schedule, tmp_path, tokenizer, monkeypatch):
    """'constant' steps at the learning rate throughout; 'linear' starts there and falls by the same amount each step
    toward zero at the last step the epochs allow."""
    rates = []
    step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: rates.append(self.param_groups[0]["lr"]) or
                        step(self, *a, **k))
    settings = {"method": "gap", **FAST, "epochs": 2, "patience": 2, "schedule": schedule}
    result = job("bert", "structured", tmp_path, tokenizer, settings)
    assert result.report["recovery"]["schedule"] == schedule
    lr, steps = FAST["learning_rate"], len(rates)
    assert steps >= 2
    if schedule == "constant":
        assert rates == [lr] * steps
    else:
        assert rates == pytest.approx([lr * (1 - i / steps) for i in range(steps)])


def test_layer_loss_is_the_normalised_squared_error():
    t = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([1.0, 0.0])}
    s = {"a": torch.tensor([3.0, 5.0]), "b": torch.tensor([0.0, 0.0])}
    assert float(layer_loss(s, t)) == pytest.approx(1 / 25 + 1 / 1)
    assert float(layer_loss(t, t)) == 0


def test_layer_loss_on_real_tokens_and_live_features_matches_its_definition():
    """Over the real tokens and the live features only, each layer's squared error over the dense output's squared
    norm, in float32 from bfloat16 outputs; its gradient reaches the real tokens' live features and nothing else."""
    torch.manual_seed(0)
    tokens = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).reshape(-1).bool()
    live = {"a": torch.tensor([0, 2, 3])}
    t = {"a": torch.randn(2, 4, 5).bfloat16(), "b": torch.randn(2, 4, 3).bfloat16()}
    s = {n: torch.randn(v.shape).bfloat16().requires_grad_() for n, v in t.items()}
    loss = layer_loss(s, t, live, tokens)
    expected = 0.0
    for name in t:
        a, b = s[name].detach().float().reshape(8, -1)[tokens], t[name].float().reshape(8, -1)[tokens]
        if name in live:
            a, b = a[:, live[name]], b[:, live[name]]
        expected += float(((a - b) ** 2).sum() / (b ** 2).sum())
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    loss.backward()
    reached = s["a"].grad.reshape(8, -1) != 0
    assert reached[~tokens].sum() == 0 and reached[:, [1, 4]].sum() == 0 and reached[tokens][:, live["a"]].all()


def test_recovery_config_checks():
    from spdy_hf import SPDYConfig

    with pytest.raises(ConfigError, match="recovery.method"):
        SPDYConfig(recovery={"method": "adaprune"})
    with pytest.raises(ConfigError, match="recovery.holdout"):
        SPDYConfig(recovery={"holdout": 1.0})
    with pytest.raises(ConfigError, match="recovery.schedule"):
        SPDYConfig(recovery={"schedule": "cosine"})
    c = SPDYConfig(recovery={"method": "gap"})
    assert c.recovery.lr("gap") == 1e-4 and c.recovery.lr("gap", "cosine") == 1e-4
    assert c.recovery.lr("gap", "kl") == 1e-3  # causal LMs train rank-16 updates (3e-4 for the weights themselves)
    assert c.recovery.lr("layerwise") == c.recovery.lr("layerwise", "kl") == 1e-4
    assert SPDYConfig(recovery={"learning_rate": 2e-5}).recovery.lr("gap", "kl") == 2e-5
    assert SPDYConfig.from_dict(c.to_dict()).recovery.method == "gap"
    assert np.isfinite(c.recovery.holdout)
    assert c.recovery.micro_batch_for("kl") == 1 and c.recovery.micro_batch_for("cosine") is None
    assert SPDYConfig(recovery={"micro_batch_size": 4}).recovery.micro_batch_for("cosine") == 4
    for bad in (0, 1.5, True):
        with pytest.raises(ConfigError, match="recovery.micro_batch_size"):
            SPDYConfig(recovery={"micro_batch_size": bad})


def test_recovery_windows_and_epochs_by_kind_of_model():
    """Unset, a causal LM (scored by KL) trains once on every calibration window, an encoder 16 times on the first
    128; a number set is taken as it is, and one above the windows there are takes them all."""
    config = SPDYConfig(recovery={"method": "gap"})
    assert config.recovery.samples_for("kl") is None and config.recovery.epochs_for("kl") == 1
    assert config.recovery.samples_for("cosine") == 128 and config.recovery.epochs_for("cosine") == 16
    # the output term: all but alone for a causal LM, beside the layer loss for an encoder; a set weight as it is
    assert config.recovery.output_weight_for("kl") == 1000 and config.recovery.output_weight_for("cosine") == 10
    assert SPDYConfig(recovery={"output_weight": 0}).recovery.output_weight_for("kl") == 0
    model = MODEL_FACTORIES["llama"]()
    windows = {"input_ids": torch.randint(0, VOCAB, (200, 8))}
    windows["attention_mask"] = torch.ones_like(windows["input_ids"])
    snapshot = DenseSnapshot(model)
    try:
        def used(settings, kind):
            recovery = Recovery(SPDYConfig(recovery=settings), model, snapshot, windows, kind, progress=False)
            return [sum(len(b["input_ids"]) for b in part) for part in (recovery.train, recovery.heldback)]

        assert used({}, "kl") == [175, 25]  # all 200, the last 1/8 held back
        assert used({}, "cosine") == [112, 16]
        assert used({"num_samples": 64}, "kl") == used({"num_samples": 64}, "cosine") == [56, 8]
        assert used({"num_samples": 1000}, "cosine") == [175, 25]
    finally:
        snapshot.close()
    for bad in (1, 0, 2.5):
        with pytest.raises(ConfigError, match="recovery.num_samples"):
            SPDYConfig(recovery={"num_samples": bad})


def sharp_llama():
    """The tiny Llama with weights drawn 5x wider (initializer_range 0.1): its output depends on what is pruned
    (a KL of ~0.06 at 2x, against ~1e-4 for the default tiny model), so recovery has something to win back."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, initializer_range=0.1,
                         bos_token_id=101, eos_token_id=102, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("method", ["gap", "layerwise"])
def test_bfloat16_recovery_runs_in_bfloat16_holds_the_zeros_and_helps(method, tmp_path, tokenizer):
    """`recovery.precision: bfloat16` (what 'auto' picks on a GPU): the pruned layers compute in bfloat16 during
    recovery, the weights stay float32, every profile zero stays zero, and it helps: the weights are trained, not
    put back, and the job's own score (KL to the dense model, in float32) on the held-back windows falls, as the
    layer objective does (measured: 0.063 -> 0.054 for both methods)."""
    model = sharp_llama()
    snapshot = DenseSnapshot(model)
    config = small_config(tmp_path, target_speedup=2.0, family="unstructured", recovery={"method": "none"},
                          search={"verify_corrections": 0})
    pruner = SPDYPruner(model, config, tokenizer)
    result = pruner.prune(latency_table=handwritten_table(model, find_units(model, config.skip_modules), config),
                          progress=False)
    held = zeros(result.model)
    unrecovered = {n: p.detach().clone() for n, p in result.model.named_parameters()}
    settings = {"method": method, **FAST, "learning_rate": 1e-3, "epochs": 6, "patience": 6, "precision": "bfloat16"}
    rc = SPDYConfig.from_dict({**config.to_dict(), "recovery": settings})
    seen = set()
    layers = pruned_layers(result.model, snapshot)
    hooks = [m.register_forward_hook(lambda m, a, out: seen.add(out.dtype)) for m in layers.values()]
    entry = Recovery(rc, result.model, snapshot, pruner.calibration_windows(None), "kl", progress=False).run()
    for h in hooks:
        h.remove()
    snapshot.close()
    assert entry["precision"] == "bfloat16" and torch.bfloat16 in seen
    assert entry["output_weight"] == (1000.0 if method == "gap" else 0.0)  # a causal LM's default output weight
    assert entry["heldback_after"] < 0.97 * entry["heldback_before"]
    guard = entry["heldback_score"]
    assert guard["kind"] == "kl" and not entry["reverted"] and guard["after"] < 0.95 * guard["before"], guard
    assert any(not torch.equal(p.detach(), unrecovered[n]) for n, p in result.model.named_parameters())
    for n, p in result.model.named_parameters():
        assert p.dtype == torch.float32 and not p[held[n]].any(), n


class AttentionCalls(TorchFunctionMode):
    """Records (gradients recorded, dtype of the queries) of every attention call that reaches the kernel."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.calls.append((torch.is_grad_enabled(), args[0].dtype))
        return func(*args, **(kwargs or {}))


def test_float32_attention_computes_a_bfloat16_pass_s_attention_in_float32_only_where_gradients_follow():
    """Under bfloat16 autocast the attention of a pass that records gradients runs on float32 inputs and gives
    bfloat16, to the bit what a float32 attention rounded once gives, gradients included; a pass without gradients
    keeps bfloat16 attention."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8).bfloat16().requires_grad_() for _ in range(3))
    mask = torch.zeros(2, 1, 5, 5).masked_fill(torch.arange(5) >= 4, torch.finfo(torch.float32).min).bfloat16()
    spy = AttentionCalls()
    with spy, torch.autocast("cpu", dtype=torch.bfloat16), Float32Attention():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert spy.calls == [(True, torch.float32), (False, torch.bfloat16)]
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float())
    assert torch.equal(out, reference.bfloat16())
    reference.bfloat16().float().square().sum().backward()
    for got, t in zip(grads, (q, k, v)):
        assert got.dtype == torch.bfloat16 and torch.equal(got, t.grad)


def test_bfloat16_gap_on_a_cpu_trains_through_float32_attention(tmp_path, tokenizer):
    """Recovery's training passes in bfloat16 on a CPU take the attention in float32; its passes with no backward
    (the dense teacher, the held-back score) keep it in bfloat16."""
    result = job("bert", "structured", tmp_path, tokenizer, {"method": "none"})
    snapshot = DenseSnapshot(MODEL_FACTORIES["bert"]())
    settings = {"method": "gap", **FAST, "epochs": 1, "precision": "bfloat16"}
    config = SPDYConfig.from_dict({**result.config.to_dict(), "recovery": settings})
    windows = SPDYPruner(result.model, config, tokenizer).calibration_windows(None)
    spy = AttentionCalls()
    with spy:
        Recovery(config, result.model, snapshot, windows, "cosine", progress=False).run()
    snapshot.close()
    assert {dtype for grad, dtype in spy.calls if grad} == {torch.float32}
    assert {dtype for grad, dtype in spy.calls if not grad} == {torch.bfloat16}


@pytest.mark.parametrize("bf16", [True, False])
def test_recovery_precision_auto_takes_bfloat16_only_on_a_cpu_with_bfloat16_instructions(bf16, monkeypatch):
    import spdy_hf.recovery.fit as recovery

    monkeypatch.setattr(recovery, "cpu_has_bf16_matmul", lambda: bf16)
    assert recovery_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if bf16 else torch.float32)
    assert recovery_dtype("float32", torch.device("cpu")) == torch.float32


def test_the_cpu_bfloat16_probe_follows_torch_and_survives_a_failing_probe(monkeypatch):
    from spdy_hf.recovery.fit import cpu_has_bf16_matmul

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert cpu_has_bf16_matmul()

    def broken():
        raise RuntimeError("no cpuinfo")

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", broken, raising=False)
    assert not cpu_has_bf16_matmul()
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert not cpu_has_bf16_matmul()


def test_recovery_precision_choices():
    assert recovery_dtype("float32", torch.device("cuda")) == torch.float32
    assert recovery_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ConfigError, match="recovery.precision"):
        SPDYConfig(recovery={"precision": "float16"})


def test_the_cli_flag_sets_the_method():
    import argparse

    from spdy_hf.cli import _build_config, prune_command_parser

    parser = argparse.ArgumentParser()
    prune_command_parser(parser.add_subparsers())
    assert _build_config(parser.parse_args(["prune", "--recovery", "layerwise"])).recovery.method == "layerwise"
    assert _build_config(parser.parse_args(["prune"])).recovery.method == "auto"


def test_recovery_fits_the_profile_verify_settled_on(tmp_path, tokenizer, monkeypatch):
    """Recovery runs once, after verify, on the profile verify settled on: a unit a correction made dense has no
    zero left of the searched profile, and the held zeros are the corrected profile's."""
    import dataclasses

    import spdy_hf.pipeline.run as pipeline

    real, real_recovery = pipeline.verify, pipeline.recovery_stage
    seen, order = {}, []

    def recovering(*args, **kwargs):
        order.append("recovery")
        return real_recovery(*args, **kwargs)

    def corrected(config, family, plan, databases, budgets, outcome):
        order.append("verify")
        out = real(config, family, plan, databases, budgets, outcome)
        profile = np.array(out.profile)
        seen["unit"] = int(np.flatnonzero(profile)[0])
        profile[seen["unit"]] = 0  # the first pruned unit made dense, as a re-aimed DP could
        outcome.live(profile)
        return dataclasses.replace(out, profile=profile, corrections=[{"aim": 0.0, "note": "forced by the test"}])

    monkeypatch.setattr(pipeline, "verify", corrected)
    monkeypatch.setattr(pipeline, "recovery_stage", recovering)
    result = job("llama", "unstructured", tmp_path, tokenizer, {"method": "gap", **FAST})
    assert order == ["verify", "recovery"]  # once, after verify
    unit = result.units[seen["unit"]]
    assert result.profile[seen["unit"]]["sparsity"] == 0
    weight = dict(result.model.named_modules())[unit.name].weight
    assert int((weight == 0).sum()) == 0  # the first profile's zeros are gone: it went back to the dense weights
    entry = result.report["recovery"]
    expected = sum(int((dict(result.model.named_modules())[u.name].weight == 0).sum())
                   for u, p in zip(result.units, result.profile) if p["sparsity"] > 0)
    assert entry["held_zeros"] == expected > 0  # the corrected profile's zeros, not the first one's
    assert entry["heldback_after"] < entry["heldback_before"]


def test_recovery_that_hurts_the_held_back_score_is_undone(tmp_path, tokenizer, monkeypatch):
    """Whatever the layer objective says, the unrecovered weights are kept when the job's score on the held-back
    windows got worse: here a 'recovery' that scales every trained weight by 1.5."""
    from spdy_hf.recovery.fit import Recovery

    def harmful(self, lr):
        with torch.no_grad():
            for _, block in self.blocks:
                for p in block.parameters():
                    p.mul_(1.5)  # zeros stay zero
        return {"heldback_before": 1.0, "heldback_after": 0.5}

    plain = job("gpt2", "unstructured", tmp_path / "plain", tokenizer, {"method": "none"})
    monkeypatch.setattr(Recovery, "_global", harmful)
    hurt = job("gpt2", "unstructured", tmp_path / "hurt", tokenizer, {"method": "gap", **FAST})
    entry = hurt.report["recovery"]
    assert entry["reverted"] and entry["heldback_score"]["after"] > entry["heldback_score"]["before"] > 0
    for (n, a), b in zip(plain.model.named_parameters(), hurt.model.parameters()):
        assert torch.equal(a, b), n
    assert entry["after"]["calibration_score"] == pytest.approx(entry["before"]["calibration_score"])


def test_the_sliced_kl_is_the_kl_on_full_logits_with_the_same_gradient():
    """Recovery's output term of a causal LM, taken slice by slice from the hidden states its head gets, equals
    `output_distance` on every position's logits, padding left out, and so does its gradient."""
    from types import SimpleNamespace

    from spdy_hf.recovery.teacher import output_distance, sliced_kl

    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    student = torch.randn(3, 7, 16, generator=gen, requires_grad=True)
    teacher = torch.randn(3, 7, 16, generator=gen)
    tokens = torch.ones(21, dtype=torch.bool)
    tokens[[5, 6, 20]] = False
    full = output_distance(SimpleNamespace(logits=head(student)), SimpleNamespace(logits=head(teacher)), "kl", tokens)
    (expected,) = torch.autograd.grad(full, student)
    sliced = sliced_kl(head, student, teacher, tokens, rows=4)  # slices that do not divide the 18 real tokens
    (got,) = torch.autograd.grad(sliced, student)
    torch.testing.assert_close(sliced, full)
    torch.testing.assert_close(got, expected)
    assert float(sliced.detach()) > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the head's weight cast once, as autocast casts it each time
        cast_each_time = sliced_kl(head, student, teacher, tokens, rows=4)
        cast_once = sliced_kl(head, student, teacher, tokens, rows=4, weight=head.weight.detach().bfloat16())
    assert torch.equal(cast_once, cast_each_time)
    assert torch.equal(*(torch.autograd.grad(v, student)[0] for v in (cast_once, cast_each_time)))


def test_one_epoch_of_gap_leaves_the_held_back_windows_to_the_guard(tmp_path, tokenizer, monkeypatch):
    """With one epoch the only rival of the trained weights is the start, which the guard compares them with on the
    job's score: no pass of the objective runs on the held-back windows, and the report has no held-back loss."""
    import spdy_hf.recovery.fit as fit

    calls = []
    run = fit._run
    monkeypatch.setattr(fit, "_run", lambda model, batch, extra: calls.append(1) or run(model, batch, extra))
    result = job("llama", "structured", tmp_path, tokenizer, {"method": "gap", **FAST, "epochs": 1})
    entry = result.report["recovery"]
    assert entry["epochs_run"] == entry["best_epoch"] == 1 and len(entry["train_loss"]) == 1
    assert "heldback_before" not in entry and "heldback_loss" not in entry
    assert len(calls) == 2 * entry["train_windows"]  # the teacher and the model, on each trained window once
    guard = entry["heldback_score"]  # the guard scored both, and kept the better
    assert guard["before"] > 0 and entry["reverted"] == (guard["after"] > guard["before"])


@pytest.mark.parametrize("size", [None, 1, 2, 3, 8])
def test_a_batch_runs_as_passes_whose_shares_add_up_to_one_step(size):
    batch = {"input_ids": torch.arange(5 * 4).reshape(5, 4), "attention_mask": torch.ones(5, 4, dtype=torch.long)}
    parts = _parts(batch, size)
    assert len(parts) == (1 if size is None or size >= 5 else -(-5 // size))
    assert sum(share for _, share in parts) == pytest.approx(1.0)
    assert torch.equal(torch.cat([p["input_ids"] for p, _ in parts]), batch["input_ids"])
    assert all(p["attention_mask"].shape == p["input_ids"].shape for p, _ in parts)
    assert all(share == p["input_ids"].shape[0] / 5 for p, share in parts)


@pytest.mark.parametrize("output_weight", [None, 0])
def test_a_profile_that_only_removes_whole_attentions_is_recovered_by_the_output_term(output_weight):
    """Every pruned layer sits inside a removed attention, so gAP's layer term has nothing to compare: the output
    term alone trains the rest of the block (its FFN), and with no output term there is nothing to fit."""
    from spdy_hf.modeling.groups import find_structured_groups, zero_fill

    model = sharp_llama()
    snapshot = DenseSnapshot(model)
    try:
        zero_fill(model, find_structured_groups(model)[0], [])  # block 0's attention, every head
        windows = example_inputs(8, 16)
        ffn = model.model.layers[0].mlp.down_proj.weight.detach().clone()
        settings = {"method": "gap", "epochs": 2, "learning_rate": 1e-3, "batch_size": 2,
                    "output_weight": output_weight}
        entry = Recovery(SPDYConfig(recovery=settings), model, snapshot, windows, "kl", progress=False).run()
    finally:
        snapshot.close()
    assert entry["method"] == "gap"
    if output_weight == 0:
        assert entry["epochs_run"] == 0 and torch.equal(model.model.layers[0].mlp.down_proj.weight, ffn)
    else:
        assert entry["epochs_run"] == 2 and entry["train_loss"][1] < entry["train_loss"][0]  # the output term trains
    assert bool((model.model.layers[0].self_attn.q_proj.weight == 0).all())


@pytest.mark.parametrize("name,kind", [("llama", "kl"), ("bert", "embedding")])
def test_the_held_back_score_taken_a_few_batches_at_a_time_is_the_score_of_all(name, kind, monkeypatch):
    """A causal LM's held-back reference (probabilities over the vocabulary for every token) is built a few batches
    at a time under a memory bound; the parts' scores combine to the score of all the windows at once."""
    import spdy_hf.recovery.fit as fit
    from spdy_hf.modeling.groups import find_structured_groups, zero_fill
    from spdy_hf.search.scoring import DistanceScorer

    model = MODEL_FACTORIES[name]()
    snapshot = DenseSnapshot(model)
    try:
        for g in find_structured_groups(model):
            zero_fill(model, g, list(range(g.num_groups // 2)))
        windows = example_inputs(24, 16, seed=3)
        windows["attention_mask"][::3, 11:] = 0  # some padding: parts hold different numbers of real tokens
        settings = {"method": "gap", "batch_size": 2, "holdout": 0.5}
        recovery = Recovery(SPDYConfig(recovery=settings), model, snapshot, windows, kind, progress=False)
        current = DenseSnapshot(model)
        try:
            whole = recovery._guard(current)
            monkeypatch.setattr(fit, "GUARD_REFERENCE_BYTES", 2 * 16 * VOCAB * 2)  # one batch of 2 windows a part
            parts = recovery._guard_parts()
            apart = recovery._guard(current)
        finally:
            current.close()
        pruned = {k: v.clone() for k, v in model.state_dict().items()}
        snapshot.restore(model)
        with recovery.autocast():  # the guard's passes run in recovery's precision
            direct = DistanceScorer(model, recovery.heldback, kind)
            for key, value in pruned.items():
                model.state_dict()[key].copy_(value)
            expected = direct()
    finally:
        snapshot.close()
    assert len(parts) == (len(recovery.heldback) if kind == "kl" else 1) and len(recovery.heldback) == 6
    assert whole[0] == apart[0] == direct.kind and expected > 0
    assert whole[1] == pytest.approx(expected, rel=1e-6) and apart[1] == pytest.approx(expected, rel=1e-5)


def test_a_zero_recovery_moved_is_an_error(tmp_path, tokenizer, monkeypatch):
    """The last check of recovery: every zero the search left in a pruned layer (read back from the snapshot taken
    before training) is zero still; one that is not stops the job, naming the parameter."""
    from spdy_hf.errors import SPDYError
    from spdy_hf.recovery.fit import Recovery

    def moving(self, lr):
        with torch.no_grad():
            name = next(iter(self.layers))
            weight = dict(self.model.named_modules())[name].weight
            weight[weight == 0] = 1e-3
        return {"heldback_before": 1.0, "heldback_after": 0.5}

    monkeypatch.setattr(Recovery, "_global", moving)
    monkeypatch.setattr(Recovery, "_guard", lambda self, current: ("kl", 0.0))  # kept, whatever it did
    with pytest.raises(SPDYError, match=r"moved profile zeros: \{'[^']+\.weight': [1-9]"):
        job("gpt2", "unstructured", tmp_path, tokenizer, {"method": "gap", **FAST})


def test_layerwise_recovery_of_blocks_that_do_not_chain_matches_the_chain(tmp_path, tokenizer, monkeypatch):
    """Where blocks do not chain, each block's dense inputs come from the dense model run up to it, its blocks read
    from the snapshot one at a time: the same inputs as the chain's, so the same recovered weights."""
    from spdy_hf.calibration.sequential import SequentialCalibrator

    settings = {"method": "layerwise", **FAST}
    chained = job("llama", "structured", tmp_path / "chained", tokenizer, settings)
    monkeypatch.setattr(SequentialCalibrator, "check_chain", lambda self, chain, kwargs: False)
    captured = job("llama", "structured", tmp_path / "captured", tokenizer, settings)
    assert len(chained.report["recovery"]["blocks"]) > 1
    for (n, p), q in zip(chained.model.named_parameters(), captured.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


def test_few_zeros_are_held_by_their_positions():
    """A parameter with few zeros (a checkpoint's own) holds their flat positions, not a mask of its size; many
    zeros (a profile's) a mask. Either way the same entries are counted, zeroed, and their gradients held, also a
    gradient laid out transposed."""
    layer = torch.nn.Linear(16, 8)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.weight[2, 3] = layer.weight[5, 11] = 0  # 2 of 128: few
        layer.bias[:6] = 0  # 6 of 8: many
    model = torch.nn.Sequential(layer)
    held = HeldZeros.of_modules(model, ["0"])
    assert held.masks["0.weight"].dtype == torch.int32 and held.masks["0.weight"].tolist() == [2 * 16 + 3, 5 * 16 + 11]
    assert held.masks["0.bias"].dtype == torch.bool
    assert held.counts() == {"0.weight": 2, "0.bias": 6}
    with torch.no_grad():
        layer.weight.add_(1.0)
        layer.bias.add_(1.0)
    assert held.violations() == {"0.weight": 2, "0.bias": 6}
    held.apply()
    assert held.violations() == {} and int((layer.weight == 0).sum()) == 2 and int((layer.bias == 0).sum()) == 6
    assert int((layer.weight == 2).sum()) == 126
    layer.weight.grad = torch.ones(16, 8).T  # not contiguous
    held.hold_gradients()
    assert layer.weight.grad[2, 3] == 0 and layer.weight.grad[5, 11] == 0
    assert int((layer.weight.grad == 0).sum()) == 2


def test_the_job_reports_the_recovered_models_quality_as_recovery_measured_it(tmp_path, tokenizer, monkeypatch):
    """The recovered model's held-out quality and calibration score are taken once, as recovery ends, and the
    report's figures are those: nothing measures them a second time."""
    from spdy_hf.pipeline.quality import HeldOutQuality

    calls = []
    compare = HeldOutQuality.compare
    monkeypatch.setattr(HeldOutQuality, "compare", lambda self, model: calls.append(1) or compare(self, model))
    result = job("llama", "structured", tmp_path, tokenizer, {"method": "gap", **FAST})
    report, entry = result.report, result.report["recovery"]
    assert len(calls) == 2  # before recovery and after it
    assert report["heldout"]["pruned"] == entry["after"]["heldout"]
    assert report["score_dense_vs_pruned"] == entry["after"]["calibration_score"]
