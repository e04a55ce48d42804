"""Gradual pruning toward a SPDY profile inside `transformers.Trainer`.

`SPDYPruningCallback` ramps the profile in from the dense model on a cubic schedule (Zhu & Gupta, 2017:
s(t) = s_final * (1 - (1 - (t - t0) / (t1 - t0))^3)) between `start_step` and `end_step`, for every level family:
- sparse units (unstructured levels; the sparse part of a mixed group's layers): the share of zero weights follows
  the schedule, the mask recomputed by magnitude;
- structured groups (attention heads, FFN neurons): the number of removed heads/neurons follows the schedule, and
  they go in the order the pruning database removed them (the profile's `removal_order`; a profile saved without
  it removes the smallest consumer columns first), their producer rows, biases and consumer columns zeroed.
Masks and removals are updated every `update_every` optimizer steps (and at the end of the ramp) and re-applied
after *every* optimizer step (`on_optimizer_step`), so nothing pruned grows back. The callback acts on optimizer
steps only, so gradient accumulation is handled; it zeroes weights in their own dtype, so fp16/bf16 mixed
precision and bf16 models work. Units whose profile pattern is 2:4 get their 2:4 mask at `start_step` (the pattern
has one level, nothing to ramp). At the end the model holds the profile's zeros: save it with the profile and
`load_pretrained` shrinks it as it does a one-shot result.

    from spdy_hf.integrations.trainer import SPDYPruningCallback
    trainer = Trainer(model, args, train_dataset=...,
                      callbacks=[SPDYPruningCallback("spdy-minilm-1.5x/spdy_profile.json", end_step=600)])

`SPDYHeldZerosCallback` fine-tunes a model SPDY has already pruned one-shot, of any family (removed heads and FFN
neurons, CSR levels, 2:4): every zero of the blocks' linear layers when training begins is held from step 0, with
the mechanism few-sample recovery uses (`spdy_hf.recovery.held_zeros.HeldZeros`: gradients zeroed before each optimizer step,
entries zeroed after it), so the latency the profile was chosen for still holds.

    result = SPDYPruner(model, config, tokenizer).prune()
    trainer = Trainer(result.model, args, train_dataset=..., callbacks=[SPDYHeldZerosCallback()])
    trainer.train()
    result.save_pretrained("spdy-minilm-1.5x-tuned")  # the tuned weights and the profile: load_pretrained shrinks them
"""

from __future__ import annotations

import logging
import os

import torch
from transformers import TrainerCallback

from ..config import DEFAULT_SKIP_MODULES
from ..deploy.shrink import STRUCTURED_SPARSE, check_profile
from ..errors import SPDYError
from ..modeling.groups import StructuredGroup, find_structured_groups, group_name, rows_view, zero_fill
from ..modeling.patterns import two_four_magnitude_mask
from ..modeling.units import Unit, find_units
from ..recovery.held_zeros import HeldZeros
from ..utils.io import read_json

logger = logging.getLogger(__name__)


def cubic_sparsity(final: float, step: int, start: int, end: int) -> float:
    """The cubic schedule: 0 before `start`, `final` from `end` on."""
    if step <= start:
        return 0.0
    if step >= end:
        return final
    progress = (step - start) / (end - start)
    return final * (1.0 - (1.0 - progress) ** 3)


def _load_profile(profile) -> tuple[list[dict], list[dict] | None]:
    """The profile's unit entries and its group entries (None for a per-layer profile)."""
    groups = None
    if isinstance(profile, (str, os.PathLike)):
        path = os.fspath(profile)
        if os.path.isdir(path):
            path = os.path.join(path, "spdy_profile.json")
        if not os.path.isfile(path):
            raise SPDYError(f"No SPDY profile at {path}; pass a spdy_profile.json or the directory holding it.")
        data = read_json(path)
        entries = data.get("units", data) if isinstance(data, dict) else data
        groups = data.get("groups") if isinstance(data, dict) else None
    elif hasattr(profile, "profile"):  # a PruningResult
        entries, groups = profile.profile, getattr(profile, "groups", None)
    else:
        entries = list(profile)
    if not entries or not all(isinstance(e, dict) and "name" in e and "sparsity" in e for e in entries):
        raise SPDYError("A profile is a list of {'name', 'sparsity'[, 'pattern']} entries (spdy_profile.json).")
    if groups is None and any(e.get("family") in ("structured", STRUCTURED_SPARSE) for e in entries):
        raise SPDYError("This profile removes whole heads and FFN neurons but has no 'groups' entries saying which: "
                        "pass the PruningResult, its spdy_profile.json or the directory holding it.")
    if any(g.get("family") == STRUCTURED_SPARSE and g.get("pattern") == "2:4" for g in groups or []):
        raise SPDYError("Gradual pruning cannot ramp a group that is both shrunk and 2:4 (the 2:4 pattern must "
                        "hold in the shrunk layer); prune one-shot and fine-tune with SPDYHeldZerosCallback.")
    return entries, groups


class _GroupRamp:
    """One structured group's heads/neurons removed gradually, in `order`."""

    def __init__(self, group: StructuredGroup, order: list[int]):
        self.group, self.order, self.removed = group, order, 0

    def kept(self) -> list[int]:
        gone = set(self.order[: self.removed])
        return [k for k in range(self.group.num_groups) if k not in gone]


class SPDYPruningCallback(TrainerCallback):
    """Prunes the trained model gradually to a SPDY profile (see the module docstring).

    Args:
        profile: a `PruningResult`, its `spdy_profile.json` (or the directory holding it), or a list of entries
            with the unit `name`, its `sparsity` and optionally its `pattern` ("unstructured" or "2:4"); a profile
            that removes heads or neurons needs its "groups" entries (the result or the file has them).
        start_step: the optimizer step the ramp starts from (sparsity 0 before).
        end_step: the step the ramp ends at; by default two thirds of the run's steps, so the last third trains
            with the final masks.
        update_every: optimizer steps between mask updates during the ramp (masks are applied after every step).
    """

    def __init__(self, profile, start_step: int = 0, end_step: int | None = None, update_every: int = 10):
        if start_step < 0 or update_every < 1 or (end_step is not None and end_step <= start_step):
            raise SPDYError("Need 0 <= start_step < end_step and update_every >= 1.")
        self.entries, self.group_entries = _load_profile(profile)
        self.start_step, self.end_step, self.update_every = start_step, end_step, update_every
        self.units: list[Unit] = []
        self.masks: list[torch.Tensor | None] = []  # True where pruned, in the (out, in) view
        self.current: list[float] = []
        self.ramps: list[_GroupRamp] = []
        self.model = None

    @classmethod
    def from_config(cls, profile, config) -> SPDYPruningCallback:
        """The callback with the schedule of `config.gradual` (an `SPDYConfig`, e.g. from a recipe)."""
        g = config.gradual
        return cls(profile, start_step=g.start_step, end_step=g.end_step, update_every=g.update_every)

    # ------------------------------------------------------------------ helpers
    def _bind(self, model) -> None:
        modules = dict(model.named_modules())
        missing = [e["name"] for e in self.entries if e["name"] not in modules]
        if missing:
            raise SPDYError(f"The model has no modules named {missing[:3]}{'...' if len(missing) > 3 else ''}: the "
                            "profile was made for another model.")
        check_profile(model, self.entries, self.group_entries)  # sparsities in [0, 1], known patterns, ...
        self.units = [Unit(name=e["name"], module=modules[e["name"]], block=e["name"].rsplit(".", 1)[0])
                      for e in self.entries]
        for unit, entry in zip(self.units, self.entries):
            if list(unit.shape) != list(entry.get("shape", unit.shape)):
                raise SPDYError(f"{unit.name} is {unit.shape_key} here but {entry['shape']} in the profile.")
        self.masks = [None] * len(self.units)
        self.current = [0.0] * len(self.units)
        self.model = model
        self.ramps = [_GroupRamp(group, self._order(modules, group, entry)) for group, entry in self._shrunk(model)]

    def _shrunk(self, model) -> list[tuple[StructuredGroup, dict]]:
        """The groups whose profile entry removes heads/neurons, with their entries."""
        groups = {group_name(g): g for g in find_structured_groups(model)} if self.group_entries else {}
        return [(groups[e["name"]], e) for e in self.group_entries or []
                if e["family"] in ("structured", STRUCTURED_SPARSE) and len(e["kept"]) < groups[e["name"]].num_groups]

    @staticmethod
    @torch.no_grad()
    def _order(modules: dict, group: StructuredGroup, entry: dict) -> list[int]:
        """The order to remove the group's heads/neurons in: the database's, or smallest consumer columns first."""
        if entry.get("removal_order") is not None:
            return [int(k) for k in entry["removal_order"]]
        removed = sorted(set(range(group.num_groups)) - set(entry["kept"]))
        w, _ = rows_view(modules[group.consumer])
        norms = [float(w[:, group.consumer_columns([k])].float().norm()) for k in removed]
        return [k for _, k in sorted(zip(norms, removed))]

    def removals(self, step: int) -> list[int]:
        """How many heads/neurons each shrunk group has removed at `step` (the cubic schedule on the count)."""
        return [int(round(cubic_sparsity(len(r.order), step, self.start_step, self.end_step))) for r in self.ramps]

    def target(self, index: int, step: int) -> float:
        entry = self.entries[index]
        if entry.get("family") == "structured":  # its zeros are its group's removed heads/neurons
            return 0.0
        if entry.get("pattern") == "2:4":
            return 0.5 if step >= self.start_step and self.start_step < self.end_step else 0.0
        return cubic_sparsity(float(entry["sparsity"]), step, self.start_step, self.end_step)

    @torch.no_grad()
    def update_masks(self, step: int) -> None:
        """Removes the heads/neurons due at `step` (zeroed at once, before the magnitude masks, so that a shrunk
        and sparse layer's removed entries are among its smallest), then recomputes every sparse unit's mask by
        magnitude at the schedule's sparsity for `step`."""
        for ramp, count in zip(self.ramps, self.removals(step)):
            ramp.removed = count
        self._apply_removals()
        for i, unit in enumerate(self.units):
            sparsity = self.target(i, step)
            if sparsity == self.current[i] and self.masks[i] is not None:
                continue
            w = unit.weight.detach()
            if self.entries[i].get("pattern") == "2:4" and sparsity > 0:
                mask = two_four_magnitude_mask(w.float())
            else:
                n = int(round(sparsity * w.numel()))
                mask = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
                if n:
                    # stable, so the entries already at zero (pruned before) go first: masks stay nested
                    order = torch.argsort(w.float().abs().reshape(-1), stable=True)[:n]
                    mask.view(-1)[order] = True
            self.masks[i] = mask
            self.current[i] = sparsity

    @torch.no_grad()
    def _apply_removals(self) -> None:
        modules = dict(self.model.named_modules()) if self.ramps else {}
        for ramp in self.ramps:
            if ramp.removed:
                zero_fill(self.model, ramp.group, ramp.kept(), modules)

    @torch.no_grad()
    def apply_masks(self) -> None:
        self._apply_removals()
        for unit, mask, sparsity in zip(self.units, self.masks, self.current):
            if mask is not None and sparsity > 0:
                unit.weight.masked_fill_(mask.to(unit.weight.device), 0)

    def sparsity(self) -> float:
        """The share of the profile's weights that are pruned now (masked, or in a removed head/neuron)."""
        total = sum(u.numel for u in self.units)
        pruned = 0.0
        for unit, mask, entry in zip(self.units, self.masks, self.entries):
            if entry.get("family") == "structured":
                pruned += float((unit.weight == 0).sum())
            elif mask is not None:
                pruned += float(mask.sum())
        return pruned / max(total, 1)

    # ------------------------------------------------------------------ TrainerCallback
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise SPDYError("SPDYPruningCallback needs the Trainer's model.")
        self._bind(model)
        if self.end_step is None:
            self.end_step = max(self.start_step + 1, (2 * state.max_steps) // 3)
        logger.info("SPDY gradual pruning: %d units, cubic ramp over optimizer steps %d-%d, masks updated every "
                    "%d steps.", len(self.units), self.start_step, self.end_step, self.update_every)
        self.update_masks(state.global_step)
        self.apply_masks()

    def on_optimizer_step(self, args, state, control, **kwargs):
        step = state.global_step + 1  # the step being completed: global_step counts it after this event
        if step >= self.start_step and ((step - self.start_step) % self.update_every == 0 or step >= self.end_step):
            self.update_masks(step)
        self.apply_masks()

    def on_train_end(self, args, state, control, **kwargs):
        self.apply_masks()
        done = all(self.current[i] == self.target(i, 10 ** 12) for i in range(len(self.units))) and all(
            r.removed == len(r.order) for r in self.ramps)
        if not done:
            logger.warning("Training ended at step %d, before the pruning ramp ended (step %d): the model is at %.1f%% "
                           "of the profile's sparsity, not all of it.", state.global_step, self.end_step,
                           100 * self.sparsity() / max(self._final_sparsity(), 1e-12))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.units:
            logs["spdy_sparsity"] = round(self.sparsity(), 6)

    def _final_sparsity(self) -> float:
        total = sum(u.numel for u in self.units)
        final = [float(e["sparsity"]) if e.get("family") == "structured" else self.target(i, 10 ** 12)
                 for i, e in enumerate(self.entries)]  # a structured unit's zeros: its group's removals
        return sum(f * u.numel for f, u in zip(final, self.units)) / max(total, 1)


class SPDYHeldZerosCallback(TrainerCallback):
    """Holds every zero of a pruned model's layers through training (see the module docstring).

    Args:
        skip_modules: patterns of modules that were never pruned (the config's `skip_modules`); the zeros of every
            other linear layer inside the model's blocks, weights and biases, are held.
    """

    def __init__(self, skip_modules=DEFAULT_SKIP_MODULES):
        self.skip_modules = list(skip_modules)
        self.held: HeldZeros | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise SPDYError("SPDYHeldZerosCallback needs the Trainer's model.")
        self.held = HeldZeros.of_modules(model, [u.name for u in find_units(model, self.skip_modules)])
        if not len(self.held):
            logger.warning("SPDYHeldZerosCallback found no zero in the model's layers: is it a pruned model?")
        logger.info("Holding %d zero entries of %d parameters through training.",
                    sum(self.held.counts().values()), len(self.held))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.held.hold_gradients()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.held.apply()

    def on_train_end(self, args, state, control, **kwargs):
        self.held.apply()
        problems = self.held.violations()
        if problems:  # cannot happen: every step re-applies them
            raise SPDYError(f"Zeros of the pruned model moved in training: {problems}.")

