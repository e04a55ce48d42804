"""What recovery holds in memory: the dense weights stay on disk (`DenseSnapshot`, safetensors files that vanish
with it), and `auto` chooses by the memory free now: gap where it fits, else, and where the free memory cannot be
told, the variant that holds less (`layerwise` for an encoder, none for a causal LM, which layerwise does not
help), saying so with the setting to change."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from types import SimpleNamespace

import pytest
import torch
from conftest import MODEL_FACTORIES, example_inputs, small_config

import spdy_hf.modeling.snapshot as snapshot_module
from spdy_hf.modeling.snapshot import DenseSnapshot
from spdy_hf.recovery.fit import Recovery


def pruned_recovery(tmp_path, name: str) -> tuple[Recovery, DenseSnapshot]:
    """A tiny model with one FFN layer half pruned against its dense snapshot, recovery.method: auto."""
    model = MODEL_FACTORIES[name]()
    snapshot = DenseSnapshot(model)
    layer = model.model.layers[0].mlp.up_proj if name == "llama" else model.encoder.layer[0].intermediate.dense
    with torch.no_grad():
        layer.weight[:, ::2] = 0
    config = small_config(tmp_path, recovery={"method": "auto"})
    return Recovery(config, model, snapshot, example_inputs(4, 16), "kl" if name == "llama" else "cosine",
                    progress=False), snapshot


@pytest.fixture(params=["llama", "bert"])
def recovery(request, tmp_path):
    made, snapshot = pruned_recovery(tmp_path, request.param)
    yield made
    snapshot.close()


def fake_psutil(available: int) -> SimpleNamespace:
    return SimpleNamespace(virtual_memory=lambda: SimpleNamespace(available=available))


def fallback(recovery: Recovery) -> str:
    return "none" if type(recovery.model).__name__.endswith("ForCausalLM") else "layerwise"


def test_auto_takes_the_lighter_choice_when_free_memory_is_unknown(recovery, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "psutil", None)  # the host's free memory cannot be read
    with caplog.at_level(logging.WARNING, logger="spdy_hf"):
        assert recovery.method() == fallback(recovery)
    assert any("recovery.method" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("roomy", [True, False])
def test_auto_follows_the_free_memory(recovery, monkeypatch, roomy):
    monkeypatch.setitem(sys.modules, "psutil", fake_psutil(2**40 if roomy else 2**10))
    assert recovery.method() == ("gap" if roomy else fallback(recovery))


def test_a_causal_lm_without_room_for_gap_is_left_as_it_is(tmp_path, monkeypatch):
    made, snapshot = pruned_recovery(tmp_path, "llama")
    try:
        monkeypatch.setitem(sys.modules, "psutil", fake_psutil(2**10))
        before = {n: p.detach().clone() for n, p in made.model.named_parameters()}
        entry = made.run()
        assert entry["method"] == "none" and "memory" in entry["reason"]
        assert all(torch.equal(p, before[n]) for n, p in made.model.named_parameters())
    finally:
        snapshot.close()


def snapshot_files() -> set[str]:
    return {f for f in os.listdir(tempfile.gettempdir()) if f.startswith("spdy-snapshot-")}


@pytest.mark.parametrize("shard_bytes", [snapshot_module.SHARD_BYTES, 4096])
def test_a_snapshot_gives_back_every_tensor_exactly_and_leaves_no_file(monkeypatch, shard_bytes):
    """Every floating parameter and buffer (float32 and bfloat16, empty ones, a tied embedding once), in one file or
    in many small shards; a tensor read back is its own memory; no file is left in the temporary directory while
    the snapshot is open (the files are unlinked once open) or after it is closed."""
    monkeypatch.setattr(snapshot_module, "SHARD_BYTES", shard_bytes)
    model = MODEL_FACTORIES["gpt2"]()  # lm_head.weight is the token embedding
    model.register_buffer("low", torch.randn(3, 5).to(torch.bfloat16))
    model.register_buffer("empty", torch.zeros(0, 4))
    dense = {n: t.detach().clone() for n, t in snapshot_module.floating_tensors(model)}
    before = snapshot_files()
    snapshot = DenseSnapshot(model)
    try:
        assert snapshot_files() == before
        assert (len(set(snapshot.index.values())) > 1) == (shard_bytes == 4096)
        assert set(snapshot.index) == set(dense) and "low" in snapshot and "lm_head.weight" not in snapshot
        with torch.no_grad():
            for t in model.parameters():
                t.zero_()
        snapshot.tensor("transformer.wte.weight").fill_(7.0)  # a copy: the snapshot keeps its values
        snapshot.restore(model)
        for name, t in snapshot_module.floating_tensors(model):
            assert t.dtype == dense[name].dtype and torch.equal(t, dense[name]), name
        block = model.transformer.h[1]
        with torch.no_grad():
            block.mlp.c_fc.weight.zero_()
        snapshot.restore(block, prefix="transformer.h.1.")
        assert torch.equal(block.mlp.c_fc.weight, dense["transformer.h.1.mlp.c_fc.weight"])
    finally:
        snapshot.close()
    assert snapshot_files() == before


def test_a_streamed_copy_holds_one_blocks_weights_only_while_it_runs():
    """`DenseSnapshot.model(streamed=...)`: the named blocks hold empty parameters except during their own forward
    pass, when they hold the snapshot's values (in the copy's dtype); the outputs are a held copy's exactly, and a
    block whose forward raises releases its weights too."""
    model = MODEL_FACTORIES["llama"]()
    inputs = example_inputs(2, 8)
    snapshot = DenseSnapshot(model)
    try:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)  # the snapshot's values, not the model's, are read
        blocks = [f"model.layers.{i}" for i in range(len(model.model.layers))]
        held = snapshot.model(model, torch.bfloat16)
        streamed = snapshot.model(model, torch.bfloat16, streamed=blocks)
        seen = []

        def look(module, args):
            seen.append([int(sum(p.numel() for p in b.parameters())) for b in streamed.model.layers])

        for block in streamed.model.layers:
            block.register_forward_pre_hook(look)  # after the streaming hook: the block is filled by now
        assert all(p.numel() == 0 for b in streamed.model.layers for p in b.parameters())
        assert streamed.model.embed_tokens.weight.shape == model.model.embed_tokens.weight.shape
        with torch.no_grad():
            torch.testing.assert_close(streamed(**inputs).logits, held(**inputs).logits, rtol=0, atol=0)
        full = int(sum(p.numel() for p in held.model.layers[0].parameters()))
        assert seen == [[full if j == i else 0 for j in range(len(blocks))] for i in range(len(blocks))]
        assert all(p.numel() == 0 and p.dtype == torch.bfloat16 for b in streamed.model.layers for p in b.parameters())

        def fail(module, args, output):
            raise RuntimeError("stop")

        streamed.model.layers[0].mlp.register_forward_hook(fail)
        with pytest.raises(RuntimeError, match="stop"), torch.no_grad():
            streamed(**inputs)
        assert all(p.numel() == 0 for p in streamed.model.layers[0].parameters())
    finally:
        snapshot.close()


def test_a_teacher_is_built_in_the_dtype_asked_from_the_snapshot():
    """The dense copy recovery trains against: the snapshot's values in bfloat16, allocated so (no float32 copy of
    the model is made first), ties kept, the model it was shaped on left as it is."""
    model = MODEL_FACTORIES["gpt2"]()
    dense = {n: t.detach().clone() for n, t in snapshot_module.floating_tensors(model)}
    inputs = example_inputs(2, 8)
    with torch.no_grad():
        expected = model(**inputs).logits
    snapshot = DenseSnapshot(model)
    try:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)
        teacher = snapshot.model(model, torch.bfloat16)
    finally:
        snapshot.close()
    for name, t in snapshot_module.floating_tensors(teacher):
        assert t.dtype == torch.bfloat16 and torch.equal(t, dense[name].to(torch.bfloat16)), name
        assert not t.requires_grad
    assert teacher.lm_head.weight is teacher.transformer.wte.weight
    assert torch.equal(model.transformer.h[0].mlp.c_fc.weight, 0.5 * dense["transformer.h.0.mlp.c_fc.weight"])
    with torch.no_grad():
        torch.testing.assert_close(teacher(**inputs).logits.float(), expected, rtol=0.05, atol=0.05)
