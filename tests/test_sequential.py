"""Sequential calibration, the OBS pruning database and its on-disk store, on tiny models built from config."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import MODEL_FACTORIES, example_inputs

import spdy_hf.database.obs_database as obs_database
from spdy_hf.calibration.sequential import SequentialCalibrator
from spdy_hf.database import build_obs_database, load_obs_database
from spdy_hf.database.store import DatabaseStore, decode_level, encode_levels
from spdy_hf.errors import SPDYError
from spdy_hf.modeling.units import find_units

LEVELS = [0.0, 0.4, 0.7, 0.9]
SKIP = ["*embed*", "*lm_head*", "*pooler*"]


def windows(n=6, seq=16, seed=0):
    """Token windows, some padded at the end: a block that missed the attention mask would see other inputs."""
    data = example_inputs(n, seq, seed)
    data["attention_mask"][1, seq - 5:] = 0
    data["attention_mask"][4, seq - 9:] = 0
    return data


def setup(name):
    model = MODEL_FACTORIES[name]()
    units = find_units(model, SKIP, example_inputs=example_inputs(1, 8))
    return model, units


def direct_hessians(model, units, data, batch_size):
    """H = 2 X X^T / n of every unit over the real tokens (attention mask 1) from plain forward passes of the whole
    model, no calibrator involved."""
    sums, counts, hooks, real = {}, {}, [], {}
    for unit in units:
        def hook(module, args, output, name=unit.name):
            x = args[0].reshape(-1, args[0].shape[-1]).float()[real["tokens"]]
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        hooks.append(unit.module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for i in range(0, data["input_ids"].shape[0], batch_size):
                batch = {k: v[i:i + batch_size] for k, v in data.items()}
                real["tokens"] = batch["attention_mask"].reshape(-1).bool()
                model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return {name: 2 * sums[name] / counts[name] for name in sums}


def calibrator_hessians(model, units, data, batch_size, stand_in=None):
    """The Hessians the calibrator computes, block by block; `stand_in(unit)` gives replacement weights."""
    seen = {}
    batches = [{k: v[i:i + batch_size] for k, v in data.items()} for i in range(0, data["input_ids"].shape[0],
                                                                               batch_size)]
    calibrator = SequentialCalibrator(model, units, batches, progress=False)

    def process(block_name, block_units, stats):
        for name, s in stats.items():
            seen[name] = s
        return {u.name: stand_in(u) for u in block_units} if stand_in else None

    calibrator.run(lambda block: True, process)
    return seen, calibrator


@pytest.mark.parametrize("name", ["bert", "gpt2", "opt", "llama"])
def test_dense_propagation_sees_exactly_what_the_model_passes(name):
    """Every block's inputs (masks, positions, rotary embeddings) are the model's own: Hessians match a plain pass."""
    model, units = setup(name)
    data = windows()
    expected = direct_hessians(model, units, data, batch_size=4)
    seen, calibrator = calibrator_hessians(model, units, data, batch_size=4)
    assert calibrator.chained  # these models' blocks form a chain
    assert set(seen) == {u.name for u in units}
    for unit in units:
        torch.testing.assert_close(seen[unit.name].hessian, expected[unit.name], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(seen[unit.name].weight, unit.weight.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_padding_enters_no_hessian(name):
    """What stands in the padded positions changes no Hessian, and the token counts are the real tokens'."""
    model, units = setup(name)
    data = windows()
    seen, _ = calibrator_hessians(model, units, data, batch_size=4)
    other = {k: v.clone() for k, v in data.items()}
    other["input_ids"][other["attention_mask"] == 0] = 3
    again, _ = calibrator_hessians(model, units, other, batch_size=4)
    real = int(data["attention_mask"].sum())
    assert real < data["input_ids"].numel()
    for unit in units:
        assert seen[unit.name].samples == real
        torch.testing.assert_close(again[unit.name].hessian, seen[unit.name].hessian, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["bert", "gpt2", "opt", "llama"])
def test_pruned_propagation_feeds_the_pruned_outputs_on(name):
    """With stand-in weights, later blocks see what a model holding those weights would give them."""
    model, units = setup(name)
    data = windows()

    def stand_in(unit):
        w = unit.weight.detach().clone()
        w[w.abs() < w.abs().median()] = 0.0
        return w

    seen, _ = calibrator_hessians(model, units, data, batch_size=3, stand_in=stand_in)
    replaced = {u.name: stand_in(u) for u in units}
    first_block = units[0].block
    with torch.no_grad():  # the reference: write the stand-ins of every block but the last into the model
        for unit in units:
            if unit.block != units[-1].block:
                unit.weight.copy_(replaced[unit.name])
    expected = direct_hessians(model, units, data, batch_size=3)
    later = [u for u in units if u.block != first_block]
    assert later
    for unit in later:
        torch.testing.assert_close(seen[unit.name].hessian, expected[unit.name], rtol=1e-4, atol=1e-5)


def test_pruned_propagation_holds_no_graph_and_drops_spent_stand_ins():
    """The pass with stand-ins records no autograd graph (each block's would keep every earlier block's
    activations alive: 17.9 GB on SmolLM2), and in a chain a block's stand-ins are gone once the next block
    has its inputs."""
    model, units = setup("llama")
    assert all(p.requires_grad for p in model.parameters())
    blocks = list(dict.fromkeys(u.block for u in units))
    modules = dict(model.named_modules())
    received, hooks_left = [], {}
    handles = [modules[b].register_forward_pre_hook(lambda m, args, kwargs: received.append(
        args[0] if args else kwargs["hidden_states"]), with_kwargs=True) for b in blocks[1:]]
    calibrator = SequentialCalibrator(model, units, [windows()], progress=False)

    def process(block_name, block_units, stats):
        hooks_left[block_name] = {u.name: len(u.module._forward_hooks) for u in units}
        return {u.name: u.weight.detach() * 0.5 for u in block_units}

    try:
        calibrator.run(lambda block: True, process)
    finally:
        for h in handles:
            h.remove()
    assert calibrator.chained and received
    assert all(x.grad_fn is None and not x.requires_grad for x in received)
    earlier = {u.name for u in units if u.block == blocks[0]}
    assert all(hooks_left[blocks[1]][name] == 0 for name in earlier)
    assert all(len(u.module._forward_hooks) == 0 for u in units)


def test_recapture_mode_matches_the_chain(monkeypatch, tmp_path):
    """Where blocks do not chain, each block's inputs are captured from the model: same database."""
    data = windows()
    model, units = setup("llama")
    chained = build_obs_database(model, units, LEVELS, data, directory=tmp_path / "a", anchor_level=2, batch_size=3,
                                 progress=False)
    monkeypatch.setattr(SequentialCalibrator, "check_chain", lambda self, chain, kwargs: False)
    model, units = setup("llama")
    recaptured = build_obs_database(model, units, LEVELS, data, directory=tmp_path / "b", anchor_level=2,
                                    batch_size=3, progress=False)
    for u in range(len(units)):
        for k in range(len(LEVELS)):
            torch.testing.assert_close(chained.weight(u, k), recaptured.weight(u, k), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["bert", "gpt2", "opt", "llama"])
def test_obs_database_levels(name, tmp_path):
    model, units = setup(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    db = build_obs_database(model, units, LEVELS, windows(), directory=tmp_path / "db", anchor_level=2,
                            batch_size=4, progress=False)
    for k, v in model.state_dict().items():  # building never writes the model
        assert torch.equal(v, before[k]), k
    assert db.errors.shape == (len(units), len(LEVELS))
    assert np.all(db.errors[:, 0] == 0) and np.all(np.diff(db.errors, axis=1) >= -1e-6)  # more zeros, more error
    for u, unit in enumerate(units):
        torch.testing.assert_close(db.weight(u, 0), unit.weight.detach(), rtol=0, atol=0)
        previous = torch.zeros(unit.shape, dtype=torch.bool)
        for k, sparsity in enumerate(LEVELS):
            w = db.weight(u, k)
            zero = w == 0
            assert torch.isfinite(w).all()
            assert zero.float().mean().item() == pytest.approx(sparsity, abs=0.02)
            assert (zero | ~previous).all()  # nested: zeros stay zeros
            previous = zero
    manifest = json.loads((tmp_path / "db" / "manifest.json").read_text())
    assert [m["name"] for m in manifest["units"]] == [u.name for u in units]


def test_measured_errors_are_relative_output_errors(tmp_path):
    model, units = setup("opt")
    data = windows()
    db = build_obs_database(model, units, LEVELS, data, directory=tmp_path / "db", propagation="dense",
                            batch_size=6, progress=False)
    inputs = {}
    hook = units[0].module.register_forward_hook(lambda m, a, o: inputs.setdefault("x", a[0].detach()))
    with torch.no_grad():
        model(**data)
    hook.remove()
    x = inputs["x"].reshape(-1, inputs["x"].shape[-1])[data["attention_mask"].reshape(-1).bool()]  # (real tokens, in)
    dense = x @ units[0].weight.detach().T
    for k in range(1, len(LEVELS)):
        err = ((x @ db.weight(0, k).T - dense).pow(2).sum() / dense.pow(2).sum()).item()
        assert db.errors[0, k] == pytest.approx(err, rel=1e-3)


def test_interrupted_build_resumes_with_the_same_weights(tmp_path, monkeypatch):
    data = windows()
    model, units = setup("gpt2")
    reference = build_obs_database(model, units, LEVELS, data, directory=tmp_path / "ref", anchor_level=3,
                                   batch_size=3, progress=False)
    real = obs_database.obs_prune_levels
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # a crash half way, inside the second block
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(obs_database, "obs_prune_levels", failing)
    model, units = setup("gpt2")
    with pytest.raises(RuntimeError, match="injected"):
        build_obs_database(model, units, LEVELS, data, directory=tmp_path / "db", anchor_level=3, batch_size=3,
                           progress=False)
    stored = os.listdir(tmp_path / "db" / "units")
    assert len(stored) == 5 and not (tmp_path / "db" / "manifest.json").exists()
    assert not [f for f in stored if f.startswith(".")]  # no half-written file left behind

    calls.clear()
    resumed = build_obs_database(model, units, LEVELS, data, directory=tmp_path / "db", anchor_level=3,
                                 batch_size=3, progress=False)
    assert len(calls) == len(units) - 5  # only the missing units were solved again
    for u in range(len(units)):
        for k in range(len(LEVELS)):
            assert torch.equal(resumed.weight(u, k), reference.weight(u, k)), (units[u].name, k)
    np.testing.assert_array_equal(resumed.errors, reference.errors)

    calls.clear()  # a finished database loads without solving anything
    again = build_obs_database(model, units, LEVELS, data, directory=tmp_path / "db", anchor_level=3,
                               batch_size=3, progress=False)
    assert not calls and torch.equal(again.weight(2, 2), reference.weight(2, 2))
    loaded = load_obs_database(tmp_path / "db", units, LEVELS)
    assert torch.equal(loaded.weight(3, 1), reference.weight(3, 1))


def test_store_refuses_another_build_and_foreign_directories(tmp_path):
    data = windows()
    model, units = setup("bert")
    build_obs_database(model, units, LEVELS, data, directory=tmp_path / "db", anchor_level=1, batch_size=6,
                       progress=False)
    with pytest.raises(SPDYError, match="other inputs.*anchor_level"):
        build_obs_database(model, units, LEVELS, data, directory=tmp_path / "db", anchor_level=2, batch_size=6,
                           progress=False)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(SPDYError, match="not empty"):
        build_obs_database(model, units, LEVELS, data, directory=foreign, progress=False)
    assert os.listdir(foreign) == ["notes.txt"]
    with pytest.raises(SPDYError, match="no finished pruning database"):
        load_obs_database(foreign, units, LEVELS)


def test_encode_decode_round_trip():
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(5, 7, generator=gen)
    masks = [torch.zeros(5, 7, dtype=torch.bool)]
    weights = [w0]
    for _ in range(3):
        mask = masks[-1] | (torch.rand(5, 7, generator=gen) < 0.4)
        w = torch.randn(5, 7, generator=gen)
        w[mask] = 0.0
        w[~mask & (torch.rand(5, 7, generator=gen) < 0.1)] = 0.0  # an alive weight may be exactly zero
        masks.append(mask)
        weights.append(w)
    tensors = encode_levels(weights, masks)
    assert tensors["pruned_at"].dtype == torch.uint8
    for k, w in enumerate(weights):
        assert torch.equal(decode_level(tensors, k), w)


def test_store_rejects_unsafe_unit_names(tmp_path):
    store = DatabaseStore(tmp_path / "db", {"x": 1})
    store.open()
    with pytest.raises(SPDYError, match="cannot name a file"):
        store.save_unit("../escape", {"pruned_at": torch.zeros(1, dtype=torch.uint8)}, torch.zeros(1))


def test_accelerate_offloaded_model_gives_the_same_database(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    data = windows()
    model, units = setup("llama")
    plain = build_obs_database(model, units, LEVELS, data, directory=tmp_path / "a", anchor_level=2, batch_size=3,
                               progress=False)
    model, units = setup("llama")
    accelerate.cpu_offload(model, execution_device="cpu")
    assert units[0].module.weight.device.type == "meta"  # weights live in the offload map, not the module
    offloaded = build_obs_database(model, units, LEVELS, data, directory=tmp_path / "b", anchor_level=2,
                                   batch_size=3, progress=False)
    for u in range(len(units)):
        for k in range(len(LEVELS)):
            torch.testing.assert_close(plain.weight(u, k), offloaded.weight(u, k), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_blocks_run_on_the_gpu(tmp_path):
    data = windows()
    model, units = setup("llama")
    cpu = build_obs_database(model, units, LEVELS, data, directory=tmp_path / "a", anchor_level=2, batch_size=3,
                             progress=False)
    gpu = build_obs_database(model, units, LEVELS, data, directory=tmp_path / "b", anchor_level=2, batch_size=3,
                             device="cuda", progress=False)
    assert next(model.parameters()).device.type == "cpu"  # each block went back
    for u in range(len(units)):
        assert ((cpu.weight(u, 2) == 0) == (gpu.weight(u, 2) == 0)).float().mean() > 0.95


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_unit_file_is_detected_and_computed_again(damage, tmp_path, monkeypatch, caplog):
    """A finished database whose unit file was overwritten (one byte flipped in its data) or truncated is never
    loaded as it is: the checksum written with each unit catches it, and the unit is solved again."""
    import logging

    data = windows()
    model, units = setup("gpt2")
    reference = build_obs_database(model, units, LEVELS, data, directory=tmp_path / "db", anchor_level=3,
                                   batch_size=3, progress=False)
    path = tmp_path / "db" / "units" / f"{units[2].name}.safetensors"
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[-5] ^= 0x01  # a value bit inside the last tensor: the file still parses
    else:
        raw = raw[: len(raw) // 2]
    path.write_bytes(bytes(raw))
    real = obs_database.obs_prune_levels
    calls = []
    monkeypatch.setattr(obs_database, "obs_prune_levels", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, units = setup("gpt2")
    with caplog.at_level(logging.WARNING, logger="spdy_hf.database.store"):
        again = build_obs_database(model, units, LEVELS, data, directory=tmp_path / "db", anchor_level=3,
                                   batch_size=3, progress=False)
    assert ("checksum mismatch" if damage == "flip" else "Cannot read") in caplog.text
    assert len(calls) == 1 and (tmp_path / "db" / "manifest.json").exists()  # that unit only, store complete
    for u in range(len(units)):
        for k in range(len(LEVELS)):
            assert torch.equal(again.weight(u, k), reference.weight(u, k)), (units[u].name, k)


def test_a_lazily_read_unit_whose_file_went_away_or_changed_says_so(tmp_path):
    """A search reads each unit's level weights from its file when it stitches them: a file deleted or replaced
    by another job meanwhile is a clear `DamagedUnitError`, an identical rebuild is read as before."""
    from spdy_hf.database.store import DamagedUnitError, StoredTensors

    store = DatabaseStore(tmp_path / "db", {"x": 1})
    store.open()
    tensors = {"pruned_at": torch.zeros(4, dtype=torch.uint8), "weight.0": torch.arange(4.0)}
    store.save_unit("u", tensors, torch.zeros(1))
    held = StoredTensors(store.unit_path("u"), store.load_unit("u")[0], ("weight.",))
    assert torch.equal(held["weight.0"], torch.arange(4.0))
    store.save_unit("u", tensors, torch.zeros(1))  # the same contents written again: a new file, same checksum
    assert torch.equal(held["weight.0"], torch.arange(4.0))
    store.save_unit("u", {**tensors, "weight.0": torch.ones(4)}, torch.zeros(1))
    with pytest.raises(DamagedUnitError, match="not the file loaded"):
        held["weight.0"]
    assert torch.equal(held["pruned_at"], torch.zeros(4, dtype=torch.uint8))  # held in memory: still there
    os.unlink(store.unit_path("u"))
    with pytest.raises(DamagedUnitError, match="is gone.*run the job again"):
        held["weight.0"]


def test_captured_block_calls_move_whole_to_another_device():
    """A block's captured call (hidden states, rotary embeddings in a tuple, masks, flags) moves to another device
    with accelerate's `send_to_device`, as the calibrator moves a block's inputs to `database.device`: every tensor
    moves, shapes and everything else stay."""
    from accelerate.utils import send_to_device

    model, _ = setup("llama")
    data = windows()
    batches = [{k: v[i:i + 3] for k, v in data.items()} for i in range(0, 6, 3)]
    calibrator = SequentialCalibrator(model, [], batches, progress=False)
    block = model.model.layers[1]
    calls = calibrator.capture(block, {"use_cache": False})
    moved = send_to_device(calls, "meta")
    assert len(moved) == len(calls) == 2

    def leaves(obj):
        if isinstance(obj, (tuple, list)):
            return [x for o in obj for x in leaves(o)]
        if isinstance(obj, dict):
            return [x for v in obj.values() for x in leaves(v)]
        return [obj]

    for call, far in zip(calls, moved):
        before, after = leaves([call.args, call.kwargs]), leaves([far.args, far.kwargs])
        assert len(before) == len(after)
        tensors = 0
        for a, b in zip(before, after):
            if isinstance(a, torch.Tensor):
                tensors += 1
                assert b.device.type == "meta" and b.shape == a.shape and b.dtype == a.dtype
            else:
                assert b is a or b == a
        assert tensors >= 3  # hidden states, and the cos and sin of the rotary embeddings at least
