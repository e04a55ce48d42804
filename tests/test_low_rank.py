"""Low-rank recovery (`recovery.rank`): an update of rank r on each linear layer's output while training, added to
the weight once when training ends; the optimizer never holds the model's own weights, except a layer with zeros
of a sparse level inside its kept weights, which is trained whole so that its zeros stay."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from conftest import example_inputs
from test_recovery import FAST, job, zeros
from transformers.pytorch_utils import Conv1D

from spdy_hf.config import DEFAULT_SKIP_MODULES, SPDYConfig
from spdy_hf.errors import ConfigError
from spdy_hf.modeling.units import find_units
from spdy_hf.recovery.low_rank import LowRankUpdates


def layers():
    torch.manual_seed(0)
    linear, conv = torch.nn.Linear(6, 4), Conv1D(4, 6)  # Conv1D(out, in) stores its weight (in, out)
    torch.nn.init.normal_(conv.bias)
    return {"linear": linear, "conv": conv}


def rows(module) -> torch.Tensor:
    """The weight as (out, in)."""
    return module.weight if isinstance(module, torch.nn.Linear) else module.weight.T


def dense(module, x, weight=None):
    return F.linear(x, rows(module) if weight is None else weight, module.bias)


def record_adam(monkeypatch) -> dict:
    """From now on, the parameters each Adam is made with are recorded under "trained"."""
    weights = {}
    adam = torch.optim.Adam

    class RecordingAdam(adam):
        def __init__(self, params, *args, **kwargs):
            params = list(params)
            weights["trained"] = params
            super().__init__(params, *args, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    return weights


def test_an_update_adds_to_the_output_while_training_and_to_the_weight_after():
    modules = layers()
    x = torch.randn(3, 5, 6)
    before = {n: rows(m).detach().clone() for n, m in modules.items()}
    updates = LowRankUpdates(modules, rank=2)
    assert [tuple(p.shape) for p in updates.parameters()] == [(2, 6), (4, 2)] * 2
    expected = {}
    with torch.no_grad(), updates:
        for m in modules.values():  # B starts at zero: the model is the pruned one
            torch.testing.assert_close(m(x), dense(m, x))
        for name, m, a, b in updates.entries:
            torch.nn.init.normal_(b)
            expected[name] = before[name] + updates.scale * b @ a
            torch.testing.assert_close(m(x), dense(m, x, expected[name]))
            assert torch.equal(rows(m), before[name])  # not merged yet
    for name, m in modules.items():  # merged once; the hooks are gone
        assert not m._forward_hooks
        torch.testing.assert_close(rows(m), expected[name])
        torch.testing.assert_close(m(x), dense(m, x, expected[name]))


def test_an_update_is_dropped_when_training_fails():
    modules = layers()
    before = {n: m.weight.detach().clone() for n, m in modules.items()}
    updates = LowRankUpdates(modules, rank=2)
    with pytest.raises(RuntimeError), torch.no_grad(), updates:
        for p in updates.parameters():
            torch.nn.init.normal_(p)
        raise RuntimeError("interrupted")
    for name, m in modules.items():
        assert torch.equal(m.weight, before[name])
        assert not m._forward_hooks


def test_rank_by_kind_of_model_is_checked_and_only_for_gap():
    recovery = SPDYConfig().recovery
    assert recovery.rank_for("kl") == 16 and recovery.rank_for("embedding") == 0  # causal LMs: updates
    assert recovery.lr("gap", "kl") == 1e-3 and recovery.lr("gap", "embedding") == 1e-4
    whole = SPDYConfig(recovery={"rank": 0}).recovery
    assert whole.rank_for("kl") == 0 and whole.lr("gap", "kl") == 3e-4
    assert SPDYConfig(recovery={"rank": 0, "method": "layerwise"}).recovery.rank_for("kl") == 0
    with pytest.raises(ConfigError, match="recovery.rank"):
        SPDYConfig(recovery={"rank": -1})
    with pytest.raises(ConfigError, match="layerwise"):
        SPDYConfig(recovery={"rank": 8, "method": "layerwise"})


@pytest.mark.parametrize("name,family", [("llama", "structured"), ("gpt2", "unstructured"), ("llama", "mixed")])
def test_low_rank_gap_trains_updates_and_holds_every_profile_zero(name, family, tmp_path, tokenizer, monkeypatch):
    """The optimizer gets the updates' factors and the blocks' norms and biases; a model weight only where the
    layer holds zeros of a sparse level (the per-layer and mixed families). The recovered weights moved, and every
    profile zero is still zero."""
    weights = record_adam(monkeypatch)

    plain = job(name, family, tmp_path / "plain", tokenizer, {"method": "none"})
    recovered = job(name, family, tmp_path / "rec", tokenizer, {"method": "gap", "rank": 2, **FAST})
    entry = recovered.report["recovery"]
    assert entry["method"] == "gap" and entry["rank"] == 2 and entry["heldback_after"] < entry["heldback_before"]
    trained = weights["trained"]
    factors = [p for p in trained if p.ndim == 2 and min(p.shape) <= 2]
    whole = [p for p in trained if p.ndim == 2 and min(p.shape) > 2]
    model_weights = {id(p) for p in recovered.model.parameters()}
    assert not any(id(p) in model_weights for p in factors)
    if family == "structured":
        assert factors and whole == []  # no sparse level: every linear layer through its update
    else:  # every layer of a sparse level holds zeros: trained whole (the per-layer family prunes them all)
        assert whole and all(id(p) in model_weights and bool((p == 0).any()) for p in whole)
    units = {u.name for u in find_units(plain.model, DEFAULT_SKIP_MODULES)}
    before, after = zeros(plain.model), zeros(recovered.model)
    moved = False
    for n, p in recovered.model.named_parameters():
        if n.rsplit(".", 1)[0] in units:
            assert int((before[n] & ~after[n]).sum()) == 0, n
            moved |= not torch.equal(p, dict(plain.model.named_parameters())[n])
    assert moved != entry["reverted"]


# ------------------------------------------------------------------ the dense model's outputs, kept instead of a copy
def test_the_teacher_setting_is_checked():
    assert SPDYConfig().recovery.teacher == "stream"
    with pytest.raises(ConfigError, match="recovery.teacher"):
        SPDYConfig(recovery={"teacher": "disk"})
    with pytest.raises(ConfigError, match="layerwise"):
        SPDYConfig(recovery={"teacher": "outputs", "method": "layerwise"})
    with pytest.raises(ConfigError, match="output_weight"):
        SPDYConfig(recovery={"teacher": "outputs", "output_weight": 0})


def test_the_kept_outputs_are_the_dense_models_for_every_pass_and_the_weights_come_back(tiny_llama):
    """What the dense model gives its head, pass by pass (one window a pass: a causal LM's passes), computed with
    the dense weights written into the pruned model, which is exactly the pruned model again afterwards."""
    from spdy_hf.modeling.snapshot import DenseSnapshot
    from spdy_hf.recovery.fit import Recovery, _parts, _pass_key
    from spdy_hf.recovery.teacher import HeadInputs, HeadReached

    model = tiny_llama
    snapshot = DenseSnapshot(model)
    dense = snapshot.model(model)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, :20] = 0
        model.model.layers[1].self_attn.o_proj.weight[:, 8:16] = 0
    pruned = {n: p.detach().clone() for n, p in model.named_parameters()}
    windows = example_inputs(8, 12, seed=1)
    config = SPDYConfig(recovery={"teacher": "outputs", "precision": "float32"})
    recovery = Recovery(config, model, snapshot, windows, "kl", progress=False)
    cache = recovery._dense_head_inputs()
    catch = HeadInputs(dense.lm_head)
    passes = [part for b in recovery.train + recovery.heldback for part, _ in _parts(b, 1)]
    assert len(cache) == len(passes) == 8
    for part in passes:
        with pytest.raises(HeadReached), torch.no_grad():
            dense(**part)
        torch.testing.assert_close(cache[_pass_key(part)], catch.take())
    for n, p in model.named_parameters():
        assert torch.equal(p, pruned[n]), n
    snapshot.close()


def test_recovery_against_the_kept_outputs_holds_no_dense_copy(tmp_path, tokenizer, monkeypatch):
    from spdy_hf.modeling.snapshot import DenseSnapshot

    plain = job("llama", "structured", tmp_path / "plain", tokenizer, {"method": "none"})
    monkeypatch.setattr(DenseSnapshot, "model", lambda *a, **k: pytest.fail("a dense copy was built"))
    recovered = job("llama", "structured", tmp_path / "rec", tokenizer,
                    {"method": "gap", "teacher": "outputs", **FAST, "epochs": 6, "patience": 6})
    entry = recovered.report["recovery"]
    assert entry["teacher"] == "outputs" and entry["epochs_run"] == 6
    losses = entry["train_loss"]  # the KL to the kept outputs falls epoch by epoch (a tiny random model overfits
    assert all(b < a for a, b in zip(losses, losses[1:]))  # its 7 training windows: the held-back loss does not)
    before, after = zeros(plain.model), zeros(recovered.model)
    for n in before:
        assert int((before[n] & ~after[n]).sum()) == 0, n


def test_an_encoder_cannot_keep_outputs_for_its_head(tmp_path, tokenizer):
    from spdy_hf.errors import SPDYError

    with pytest.raises(SPDYError, match="causal LM"):
        job("bert", "structured", tmp_path, tokenizer, {"method": "gap", "teacher": "outputs", **FAST})


# ------------------------------------------------------------------ blocks recomputed in the backward pass
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_checkpointed_recovery_takes_the_same_steps(name, tmp_path, tokenizer, monkeypatch):
    """With recovery.checkpoint the blocks run again in the backward pass (their layers' hooks too), and gap ends
    with the weights it reaches holding every activation: the gradients are the same."""
    from torch.utils import checkpoint

    calls = []
    original = checkpoint.checkpoint
    monkeypatch.setattr(checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    settings = {"method": "gap", "rank": 2 if name == "llama" else 0, **FAST}
    held = job(name, "structured", tmp_path / "held", tokenizer, settings)
    assert not calls
    again = job(name, "structured", tmp_path / "again", tokenizer, {**settings, "checkpoint": True})
    assert calls  # the blocks ran under checkpoint
    a, b = held.report["recovery"], again.report["recovery"]
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    for (n, p), q in zip(held.model.named_parameters(), again.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    with pytest.raises(ConfigError, match="recovery.checkpoint"):
        SPDYConfig.from_dict({"recovery": {"checkpoint": "yes"}})


def test_the_teacher_copies_only_the_blocks_recovery_trains(tmp_path, tokenizer, monkeypatch):
    """gap's dense teacher holds copies of the pruned blocks (with their dense values) and shares everything else
    with the model: the embeddings, the head, the final norm and any block the profile left dense."""
    from spdy_hf.modeling.snapshot import DenseSnapshot

    made = {}
    original = DenseSnapshot.model

    def recording(self, like, dtype=None, shared=None, streamed=(), source=None):
        made["model"], made["teacher"] = like, original(self, like, dtype, shared, streamed, source)
        made["dense"] = {n: self.tensor(n) for n in self.index}
        return made["teacher"]

    monkeypatch.setattr(DenseSnapshot, "model", recording)
    # passes in float32: the teacher is in the model's dtype, so it can share (a float32 model scored under bfloat16
    # autocast gets a bfloat16 copy of everything: half the memory of sharing float32 tensors)
    result = job("llama", "structured", tmp_path, tokenizer,
                 {"method": "gap", "teacher": "copy", "precision": "float32", **FAST})
    assert result.report["recovery"]["method"] == "gap"
    student, teacher = dict(made["model"].named_parameters()), dict(made["teacher"].named_parameters())
    pruned = {e["consumer"].rsplit(".", 2)[0] for e in result.groups if e["keep"] < e["num_groups"]}
    assert pruned
    for name, t in teacher.items():
        inside = any(name.startswith(block + ".") for block in pruned)
        assert (t is not student[name]) == inside, name  # copied where it is trained, the very tensor elsewhere
        if inside:
            assert torch.equal(t, made["dense"][name].to(t.dtype)), name  # in the teacher's dtype
    assert not any(t.requires_grad for n, t in teacher.items() if any(n.startswith(b + ".") for b in pruned))


def test_a_checkpoints_own_exact_zeros_do_not_make_a_layer_train_whole(tmp_path, tokenizer, monkeypatch):
    """A dequantized GGUF model has a few exact zeros in every layer. They are not a sparse level's: with a rank,
    every linear layer of a structured profile still trains through its update (none whole)."""
    import conftest

    weights = record_adam(monkeypatch)

    make = conftest.MODEL_FACTORIES["llama"]

    def with_zeros():
        model = make()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.ndim == 2 and ".layers." in n:
                    p.view(-1)[::97] = 0.0  # about 1 % of every layer
        return model

    monkeypatch.setitem(conftest.MODEL_FACTORIES, "llama", with_zeros)
    result = job("llama", "structured", tmp_path, tokenizer, {"method": "gap", "rank": 2, **FAST})
    assert result.report["recovery"]["rank"] == 2
    assert not [p for p in weights["trained"] if p.ndim == 2 and min(p.shape) > 2]  # factors only
    assert result.report["recovery"]["method"] == "gap"  # (recovery checks that every profile zero held, or raises)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_a_streamed_teacher_takes_the_steps_of_a_held_one(name, tmp_path, tokenizer, monkeypatch):
    """recovery.teacher: stream reads the pruned blocks' dense weights from the snapshot in every pass instead of
    holding them: the same teacher, so the same losses and the same recovered weights, bit for bit; and no more than
    one streamed block holds its weights at any moment of training. The float32 model's passes run in bfloat16: the
    blocks are read from a bfloat16 snapshot of theirs, closed when recovery ends."""
    from spdy_hf.modeling import snapshot as snapshot_module
    from spdy_hf.recovery.fit import Recovery

    sources = []
    make_source = Recovery._streamed_source
    monkeypatch.setattr(Recovery, "_streamed_source", lambda self: sources.append(make_source(self)) or sources[-1])

    filled, most = set(), [0]
    fill, release = snapshot_module._StreamedWeights.fill, snapshot_module._StreamedWeights.release

    def counting_fill(self, module, args):
        fill(self, module, args)
        filled.add(id(module))
        most[0] = max(most[0], len(filled))

    def counting_release(self, module, args, output):
        release(self, module, args, output)
        filled.discard(id(module))

    settings = {"method": "gap", "rank": 2 if name == "llama" else 0, "precision": "bfloat16", **FAST}
    held = job(name, "structured", tmp_path / "held", tokenizer, {**settings, "teacher": "copy"})
    assert not sources
    monkeypatch.setattr(snapshot_module._StreamedWeights, "fill", counting_fill)
    monkeypatch.setattr(snapshot_module._StreamedWeights, "release", counting_release)
    streamed = job(name, "structured", tmp_path / "streamed", tokenizer, {**settings, "teacher": "stream"})
    assert most[0] == 1 and not filled  # blocks were streamed, one at a time, and all released
    assert len(sources) == 1 and sources[0] is not None and not sources[0].index.keys() - {
        n for n, _ in streamed.model.named_parameters()} and not sources[0]._shards  # bfloat16 blocks, closed
    a, b = held.report["recovery"], streamed.report["recovery"]
    assert (a["teacher"], b["teacher"]) == ("copy", "stream")
    assert a["train_loss"] == b["train_loss"] and a["heldback_loss"] == b["heldback_loss"]
    for (n, p), q in zip(held.model.named_parameters(), streamed.model.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_frozen_weights_held_in_the_passes_dtype_take_the_same_steps(name, tmp_path, tokenizer, monkeypatch):
    """Recovery with a rank holds the frozen weights of the linear layers in bfloat16 while its passes run in it (a
    cast autocast would make in every pass), a weight tied to an embedding in float32; the losses and recovered
    weights are the same to the bit as when autocast casts them, and every weight is float32 again after."""
    import spdy_hf.recovery.fit as fit

    seen = {"linear": set(), "embedding": set()}
    original = fit.frozen_weights_in

    def watched(model, dtype):
        hooks = []
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, Conv1D)) and not module.weight.requires_grad:
                hooks.append(module.register_forward_hook(lambda m, a, o: seen["linear"].add(m.weight.dtype)))
            elif isinstance(module, torch.nn.Embedding):
                hooks.append(module.register_forward_hook(lambda m, a, o: seen["embedding"].add(m.weight.dtype)))
        with original(model, dtype) as lowered:
            yield lowered
        for h in hooks:
            h.remove()

    settings = {"method": "gap", "rank": 2, "precision": "bfloat16", **FAST}
    monkeypatch.setattr(fit, "frozen_weights_in", contextlib.contextmanager(watched))
    lowered = job(name, "structured", tmp_path / "lowered", tokenizer, settings)
    assert seen == {"linear": {torch.bfloat16}, "embedding": {torch.float32}}
    monkeypatch.setattr(fit, "frozen_weights_in", contextlib.contextmanager(lambda model, dtype: (yield 0)))
    cast = job(name, "structured", tmp_path / "cast", tokenizer, settings)
    a, b = lowered.report["recovery"], cast.report["recovery"]
    assert a["train_loss"] == b["train_loss"] and a["heldback_loss"] == b["heldback_loss"]
    for (n, p), q in zip(lowered.model.named_parameters(), cast.model.parameters()):
        assert p.dtype == torch.float32 and torch.equal(p, q), n
