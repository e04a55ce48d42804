"""Gradual pruning with `transformers.Trainer` toward a SPDY profile."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import make_gpt2

from spdy_hf.errors import SPDYError
from spdy_hf.integrations.trainer import SPDYPruningCallback, cubic_sparsity
from spdy_hf.modeling.groups import rows_view
from spdy_hf.modeling.units import find_units


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n=32, seq=16, vocab=30522, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1000, vocab, (n, seq), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def profile_for(model, patterns=False):
    units = find_units(model, ["*embed*", "*lm_head*"])
    levels = [0.0, 0.5, 0.75, 0.9]
    entries = []
    for i, u in enumerate(units):
        entry = {"name": u.name, "shape": list(u.shape), "sparsity": levels[i % 4], "pattern": "unstructured"}
        if patterns and i % 4 == 1:
            entry["pattern"] = "2:4"
        entries.append(entry)
    return units, entries


class MaskChecker:
    """Runs after the pruning callback: after every optimizer step, no masked weight is non-zero."""

    def __init__(self, pruning):
        self.pruning, self.steps, self.losses = pruning, 0, []

    def __getattr__(self, name):  # every other TrainerCallback event: nothing to do
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.steps += 1
        for unit, mask in zip(self.pruning.units, self.pruning.masks):
            if mask is not None:
                assert (unit.weight.detach()[mask] == 0).all(), unit.name

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_trainer_reaches_the_profile_and_masks_hold(tmp_path, precision):
    from transformers import Trainer, TrainingArguments

    model = make_gpt2()
    units, entries = profile_for(model, patterns=True)
    pruning = SPDYPruningCallback(entries, start_step=2, end_step=8, update_every=2)
    checker = MaskChecker(pruning)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=12, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=5e-3, logging_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, bf16=precision == "bf16", fp16=precision == "fp16",
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(), callbacks=[pruning, checker])
    trainer.train()
    # the precision asked for is the one that ran (torch autocasts fp16 and bf16 on the CPU)
    assert trainer.accelerator.mixed_precision == ("no" if precision == "fp32" else precision)
    assert checker.steps == 12  # one check per optimizer step, not per micro-batch
    assert checker.losses and all(math.isfinite(x) for x in checker.losses)
    for unit, entry in zip(units, entries):
        zeros = int((unit.weight == 0).sum())
        if entry["pattern"] == "2:4":
            assert zeros == unit.numel // 2
            groups = (unit.weight.detach().reshape(unit.shape[0], -1, 4) != 0).sum(-1)
            assert (groups <= 2).all()
        else:
            assert zeros == round(entry["sparsity"] * unit.numel), unit.name
        if entry["sparsity"] == 0.0 and entry["pattern"] != "2:4":
            assert zeros == 0
    assert pruning.sparsity() == pytest.approx(pruning._final_sparsity(), rel=1e-3)


def test_cubic_schedule():
    assert cubic_sparsity(0.9, 0, 10, 20) == 0.0
    assert cubic_sparsity(0.9, 10, 10, 20) == 0.0
    assert cubic_sparsity(0.9, 20, 10, 20) == 0.9 == cubic_sparsity(0.9, 50, 10, 20)
    assert cubic_sparsity(0.9, 15, 10, 20) == pytest.approx(0.9 * (1 - 0.5 ** 3))
    values = [cubic_sparsity(0.8, t, 0, 100) for t in range(101)]
    assert all(b >= a for a, b in zip(values, values[1:]))  # monotone, fastest early


def test_profile_sources_and_mismatches(tmp_path):
    model = make_gpt2()
    _, entries = profile_for(model)
    path = tmp_path / "spdy_profile.json"
    path.write_text(json.dumps({"units": entries}))
    assert SPDYPruningCallback(tmp_path).entries == entries  # the directory holding spdy_profile.json
    assert SPDYPruningCallback(str(path)).entries == entries
    with pytest.raises(SPDYError, match="No SPDY profile"):
        SPDYPruningCallback(tmp_path / "nowhere")
    with pytest.raises(SPDYError, match="start_step < end_step"):
        SPDYPruningCallback(entries, start_step=5, end_step=5)
    callback = SPDYPruningCallback([{"name": "no.such.module", "sparsity": 0.5}])
    with pytest.raises(SPDYError, match="profile was made for another model"):
        callback._bind(model)
    name = entries[0]["name"]
    with pytest.raises(SPDYError, match=r"spdy_profile.json: units\[0\].sparsity = 5.0"):
        SPDYPruningCallback([{"name": name, "sparsity": 5.0}])._bind(model)
    path.write_text('{"units": [')
    with pytest.raises(SPDYError, match="cannot be read as JSON"):
        SPDYPruningCallback(path)


@pytest.mark.parametrize("family", ["structured", "mixed", "unstructured"])
def test_fine_tuning_a_one_shot_pruned_model_holds_every_zero(family, tmp_path, tokenizer):
    """One-shot SPDY (any family), then `Trainer` with `SPDYHeldZerosCallback`: after training every zero of
    every unit is still zero (counted exactly per unit), the weights moved, and the structured shrink still
    gives the trained model's outputs."""
    from test_recovery import job
    from test_structured_pruner import outputs
    from transformers import Trainer, TrainingArguments

    from spdy_hf import SPDYHeldZerosCallback, load_pretrained

    result = job("llama", family, tmp_path, tokenizer, {"method": "none"})
    model = result.model.train()
    before = {n: (p.detach() == 0).clone() for n, p in model.named_parameters()}
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=RandomTokens(), callbacks=[SPDYHeldZerosCallback()]).train()
    for unit in result.units:  # every unit's zeros exactly where they were
        for suffix in ("weight", "bias"):
            name = f"{unit.name}.{suffix}"
            if name in before:
                now = dict(model.named_parameters())[name].detach() == 0
                assert int((before[name] & ~now).sum()) == 0, name
    assert sum(int(b.sum()) for b in before.values()) > 0
    assert any(not torch.equal(p.detach(), start[n]) for n, p in model.named_parameters())
    model.eval()
    inputs = {"input_ids": RandomTokens().ids[:2]}
    expected = outputs(model, inputs)
    fast, _, _ = load_pretrained(result.save_pretrained(tmp_path / "tuned"))  # shrunk, or with sparse kernels
    torch.testing.assert_close(outputs(fast, inputs), expected, rtol=1e-4, atol=1e-4)


def test_gradual_pruning_needs_the_groups_of_a_structured_profile():
    with pytest.raises(SPDYError, match="no 'groups' entries"):
        SPDYPruningCallback([{"name": "a", "sparsity": 0.5, "family": "structured"}])


class RemovalLog(MaskChecker):
    """After every optimizer step: how many heads/neurons each shrunk group has removed, and that the removed ones'
    producer rows and consumer columns are zero."""

    def __init__(self, pruning):
        super().__init__(pruning)
        self.removed = []

    def on_optimizer_step(self, args, state, control, **kwargs):
        super().on_optimizer_step(args, state, control, **kwargs)
        modules = dict(self.pruning.model.named_modules())
        for ramp in self.pruning.ramps:
            gone, group = ramp.order[: ramp.removed], ramp.group
            assert (rows_view(modules[group.consumer])[0][:, group.consumer_columns(gone)] == 0).all()
            for name in group.producers:
                assert (rows_view(modules[name])[0][group.producer_indices(name, gone)] == 0).all()
        self.removed.append([r.removed for r in self.pruning.ramps])


@pytest.mark.parametrize("family", ["structured", "mixed"])
def test_gradual_pruning_to_a_structured_profile(family, tmp_path, tokenizer):
    """From the dense model, `Trainer` with the callback removes every shrunk group's heads/neurons on the cubic
    schedule, in the database's order, never putting one back; at the end each unit has exactly the one-shot
    result's zeros, and the shrunk (deployed) form gives the trained model's outputs."""
    from conftest import MODEL_FACTORIES
    from test_recovery import job
    from test_structured_pruner import outputs
    from transformers import Trainer, TrainingArguments

    from spdy_hf.deploy.shrink import deploy_profile

    # mixed: enough random starts that the search's best profile mixes the kinds (5 starts find a sparse-only one)
    search = {"verify_corrections": 0, "num_random_inits": 8 if family == "mixed" else 5}
    result = job("llama", family, tmp_path, tokenizer, {"method": "none"}, search=search)
    shrunk = [g for g in result.groups if len(g["kept"]) < g["num_groups"]]
    assert shrunk and all(len(g["removal_order"]) == g["num_groups"] - len(g["kept"]) for g in shrunk)
    if family == "mixed":  # shrunk groups whose remaining weights are also sparse: both kinds at once
        assert any(p["family"] == "structured+sparse" for p in result.profile)
    model = MODEL_FACTORIES["llama"]().train()
    pruning = SPDYPruningCallback(result, start_step=1, end_step=7, update_every=2)
    log = RemovalLog(pruning)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=10, per_device_train_batch_size=4,
                             learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=RandomTokens(), callbacks=[pruning, log]).train()
    assert [r.order for r in pruning.ramps] == [g["removal_order"] for g in shrunk]  # the database's order
    counts = torch.tensor(log.removed)  # (steps, groups)
    assert (counts.diff(dim=0) >= 0).all()  # never put back
    assert counts[-1].tolist() == [len(g["removal_order"]) for g in shrunk]
    assert ((counts > 0) & (counts < counts[-1])).any()  # a ramp, not one cut
    assert log.losses and all(math.isfinite(x) for x in log.losses)
    one_shot = {u.name: int((u.weight == 0).sum()) for u in result.units}
    trained = {u.name: int((u.weight == 0).sum()) for u in find_units(model, result.config.skip_modules)}
    assert trained == one_shot
    model.eval()
    inputs = {"input_ids": RandomTokens().ids[:2] % model.config.vocab_size}
    expected = outputs(model, inputs)
    fast = deploy_profile(copy.deepcopy(model), result.profile, result.groups, "cpu")
    assert sum(p.numel() for p in fast.parameters()) < sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(outputs(fast, inputs), expected, rtol=1e-4, atol=1e-4)


def test_a_profile_saved_without_removal_order_removes_the_smallest_consumer_columns_first(tmp_path, tokenizer):
    """Profiles saved before `removal_order` existed: each group's heads/neurons go smallest consumer columns
    (L2 norm) first, and exactly the ones the profile removes."""
    from conftest import MODEL_FACTORIES
    from test_recovery import job

    result = job("llama", "structured", tmp_path, tokenizer, {"method": "none"})
    result.save_pretrained(tmp_path / "saved")
    profile = json.loads((tmp_path / "saved" / "spdy_profile.json").read_text())
    for g in profile["groups"]:
        g.pop("removal_order", None)
    path = tmp_path / "old_profile.json"
    path.write_text(json.dumps(profile))
    model = MODEL_FACTORIES["llama"]()
    pruning = SPDYPruningCallback(path)
    pruning._bind(model)
    modules = dict(model.named_modules())
    shrunk = [g for g in profile["groups"] if len(g["kept"]) < g["num_groups"]]
    assert len(pruning.ramps) == len(shrunk) > 0
    for ramp, entry in zip(pruning.ramps, shrunk):
        assert sorted(ramp.order) == sorted(set(range(entry["num_groups"])) - set(entry["kept"]))
        w = rows_view(modules[ramp.group.consumer])[0]
        norms = [float(w[:, ramp.group.consumer_columns([k])].detach().norm()) for k in ramp.order]
        assert norms == sorted(norms)
