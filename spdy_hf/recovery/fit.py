"""Few-sample recovery after pruning: global AdaPrune (gAP) and its block-by-block variant.

SPDY's second half (Frantar & Alistarh, 2022; the reference code's `global_adaprune`): once the profile is stitched
in, the pruned model's remaining weights are fitted so that every pruned layer's output matches the dense model's
on the calibration windows: gAP's normalised squared error of every pruned layer's output (`spdy_hf.recovery.teacher`),
each model on its own activations; `gap` adds `output_weight` times the job's score on the final output (KL for
LMs, 1 - cosine per token otherwise). Adam. The reference uses a learning rate of 1e-5 for the global variant, 1e-3
for the layer-wise one and no output term; the defaults here are the best measured
(docs/benchmarks/recovery.md): for gap 1e-4 on an encoder (MiniLM) and 3e-4 on a causal LM (SmolLM2-135M,
scored by KL), 1e-4 for the layer-wise variant; output weight 10 on an encoder and 1000 on a causal LM, whose
recovery transfers best to other text when it fits the output distribution all but alone.

What may change: every parameter of the blocks that hold a pruned layer. What may not: a zero of the profile
(`spdy_hf.recovery.held_zeros.HeldZeros`: their gradients are zeroed before each step and the entries set to zero after it), so
the latency table's times still hold and a structured model still shrinks to the same outputs.

Overfitting a few samples: a slice of the windows (`recovery.holdout`) is never trained on; the objective on it is
measured before training and after every epoch, training stops after `patience` epochs without a better value, and
the best epoch's weights are kept, the unrecovered ones if no epoch beat them. Last, the guard scores the job's own
score (KL, cosine) on those windows before and after recovery, and keeps the unrecovered weights if it got worse;
where gap runs one epoch (a causal LM's default), whose only rival is the start, the guard alone decides, and the
objective is not taken on the held-back windows at all.

Two variants (`recovery.method`):
- `gap`: the whole pruned model against the dense model, each on its own activations. The dense model
  (`recovery.teacher`) shares with the pruned one every tensor recovery does not train (where their dtypes agree),
  and its pruned blocks are read from the snapshot on disk one block at a time in every pass (`stream`, the
  default: one block's dense weights in memory, for a read of the pruned blocks per pass) or held in memory
  beside the pruned model (`copy`). The pruned model is trained shrunk
  (`spdy_hf.recovery.shrunk.ShrunkModel`): its removed heads and neurons are cut out for the length of training and
  its kept weights written back after, so neither the passes nor the gradients and Adam's two moments are spent
  on zeros. It holds the dense model's shared part (in bfloat16 when the passes run in bfloat16, built so from the
  start), the shrunk model's gradients and moments, and one pass's activations: a batch runs as passes of
  `recovery.micro_batch_size` windows whose gradients add up to one step. The best epoch's weights wait in a
  snapshot on disk, and the guard's dense reference is built for each of its two scores rather than held. A
  causal LM's output term is taken from the hidden states its head gets, a slice of tokens at a time
  (`sliced_kl`), so no batch's logits over the whole vocabulary are ever held. With a rank (`recovery.rank`, 16
  for a causal LM by default) the kept weights are not trained themselves: updates of that rank are, and added to
  them once at the end (`spdy_hf.recovery.low_rank`), so no gradient or moment of a weight is held. The
  profile's zeros are checked at the end against the snapshot taken before training, a tensor at a time, not
  against masks of the whole model. With
  `recovery.teacher: outputs` (causal LMs) there is no dense model at all: the hidden states the dense model gives
  its head are computed once for every pass, with the dense weights written into the model for the while, and
  kept; the objective is then the output KL alone.
- `layerwise`: block by block. Each block of the pruned model, on the inputs the (already recovered) blocks before
  it give, is fitted to the dense block's layer outputs on the dense inputs. It holds one block's training state
  and the windows' hidden states at one block (two sets: pruned and dense), not a second model; the dense weights
  are read one block at a time from the snapshot on disk.
`auto`, the default, takes `gap` when the dense teacher and a pass (about the kept weights' size), with the weights'
gradients, moments and float32 copies when they are trained themselves, fit in the memory free now; otherwise, and
where the free memory cannot be told (with a warning), `layerwise` for an encoder and nothing for a causal LM, which
the layer-wise variant does not help (docs/benchmarks/transfer.md). On SmolLM2-135M at 1.5x gap once over every
calibration window (the causal-LM default: `recovery.num_samples` and `recovery.epochs` null) took 6 minutes, cut
the perplexity on text of four other domains by 25-35 % and made greedy generation read as English, the job peaking
under 2 GiB.

Precision (`recovery.precision`): forward passes in bfloat16 under `torch.autocast` on a GPU that supports it and
on a CPU with bfloat16 matrix instructions (the default there: half the time, the same held-out quality, measured on
SmolLM2-135M and MiniLM), float32 on other CPUs; the weights, their gradients and Adam's state stay float32 and every
loss is taken in float32, so no loss scaling is needed. On a CPU the attention of a pass that a backward pass follows
runs in float32 (`spdy_hf.recovery.attention`): PyTorch's bfloat16 attention backward is several times slower there
than its float32 one. Placement is the model's device. `accelerate`'s `Accelerator` is not
used for this: its state is process-wide (another `Accelerator` with other mixed-precision settings in the same
process is refused), and a `Trainer` later in the same process (gradual pruning, fine-tuning with the held-zeros
callback) makes one of its own.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.sequential import (
    BlockCall,
    SequentialCalibrator,
    first_output,
    forward_kwargs_of,
    token_mask,
)
from ..config import SPDYConfig
from ..errors import SPDYError
from ..latency.backend import model_device
from ..modeling.snapshot import DenseSnapshot
from ..modeling.units import conv1d_classes, find_blocks
from ..search.lowered import model_dtype
from ..search.scoring import DistanceScorer
from .attention import Float32Attention
from .held_zeros import HeldZeros, module_parameters
from .low_rank import LowRankUpdates
from .shrunk import ShrunkModel
from .teacher import (
    HeadInputs,
    HeadReached,
    LayerOutputs,
    layer_loss,
    live_outputs,
    modules_named,
    output_distance,
    pruned_layers,
    sliced_kl,
)

logger = logging.getLogger(__name__)


# the most dense reference the held-back score holds at once (a causal LM's float16 probabilities over its vocabulary):
# the windows past it are scored in further runs, each against a reference of its own
GUARD_REFERENCE_BYTES = 128 * 2**20


class _Stop(Exception):
    """Ends a forward pass after the last block: the layer objective needs nothing after it."""


class Recovery:
    """Runs `config.recovery` on `model` (its profile stitched and finalized) against the dense `snapshot`.

    The pruned layers are those of the model's blocks with more zero weights than in the snapshot, whatever the
    family (a structured group's producers and consumer, a CSR or 2:4 unit); their outputs make the objective, and
    their zeros are held.

    Args:
        windows: the calibration windows; the first `recovery.num_samples` are used (all of them for a causal LM,
            128 for an encoder, when it is null), the last `holdout` share of those held back.
        kind: the job's score ("kl", "cosine", ...), for `output_weight`.
    """

    def __init__(self, config: SPDYConfig, model: nn.Module, snapshot: DenseSnapshot,
                 windows: dict[str, torch.Tensor], kind: str, progress: bool = True):
        self.config, self.cfg, self.model, self.snapshot = config, config.recovery, model, snapshot
        self.kind, self.progress = kind, progress
        self.layers = pruned_layers(model, snapshot)
        self.live = {n: keep for n, m in self.layers.items() if (keep := live_outputs(m)) is not None}
        self.blocks = [(name, block) for name, block in find_blocks(model)
                       if any(layer.startswith(name + ".") for layer in self.layers)]
        available, wanted = windows["input_ids"].shape[0], self.cfg.samples_for(kind)
        n = available if wanted is None else min(wanted, available)
        if n < 2:
            raise SPDYError("Recovery needs at least 2 calibration windows (one to train on, one held back); "
                            "raise calibration.num_samples or set recovery.method: none.")
        held_back = min(n - 1, max(1, int(round(self.cfg.holdout * n))))
        device = model_device(model)
        cut = {k: v[:n].to(device) for k, v in windows.items()}
        self.train = _batches({k: v[: n - held_back] for k, v in cut.items()}, self.cfg.batch_size)
        self.heldback = _batches({k: v[n - held_back:] for k, v in cut.items()}, self.cfg.batch_size)
        self.extra = forward_kwargs_of(model)
        self.device, self.dtype = device, recovery_dtype(self.cfg.precision, device)
        weights = model_dtype(model)
        if weights in (torch.bfloat16, torch.float16) and weights != self.dtype:
            # a model held in half precision (a bfloat16 regime) runs its passes in it: its trained weights become
            # float32 for training only (`float32_training`), so Adam's small steps are not rounded away
            if self.cfg.precision == "float32":
                logger.info("recovery.precision: float32 asked, but the model is held in %s: its passes run in it.",
                            str(weights).removeprefix("torch."))
            self.dtype = weights

    def autocast(self):
        """The forward passes' precision: bfloat16 autocast (`recovery.precision`, or the dtype the model is held
        in), float16 for a model held in float16, or nothing (float32)."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def float32_attention(self):
        """Around training (its forward passes, and the backward passes that recompute a checkpointed block's): the
        attention of every pass that records gradients in float32 on a CPU when the passes run in half precision
        (`Float32Attention`: its bfloat16 backward kernel is several times slower there); elsewhere nothing."""
        if self.device.type == "cpu" and self.dtype != torch.float32:
            return Float32Attention()
        return nullcontext()

    def method(self) -> str:
        """`recovery.method`, with 'auto' settled by the memory free now: gap where the dense teacher (in the
        forward passes' precision) and the shrunk model's gradients and Adam's two moments fit, with as much again
        for a pass's activations; otherwise layerwise for an encoder and none for a causal LM (the layer-wise
        variant did not help one: docs/benchmarks/transfer.md)."""
        if self.cfg.method != "auto":
            return self.cfg.method
        from ..pipeline.quality import is_causal_lm

        fallback = "none" if is_causal_lm(self.model) else "layerwise"
        trained = [p for _, b in self.blocks for p in b.parameters()]
        kept = sum(int(torch.count_nonzero(p)) for p in trained) * 4  # trained in float32
        held = sum(int(torch.count_nonzero(p)) * p.element_size() for p in trained)  # as the model holds them
        if self.cfg.teacher == "outputs":  # the head's inputs for every window
            head = _language_model_head(self.model)
            tokens = sum(b["input_ids"].numel() for b in self.train + self.heldback)
            teacher = tokens * (head.in_features if head is not None else 0) * self.teacher_dtype().itemsize
        else:  # the teacher copies the pruned blocks only, where it is in the model's dtype (it shares the rest)
            dtype = self.teacher_dtype()
            copied = [p for _, b in self.blocks for p in b.parameters()] if dtype == model_dtype(self.model) \
                else list(self.model.parameters())
            teacher = sum(p.numel() for p in copied) * dtype.itemsize
            if self.cfg.teacher == "stream":  # the pruned blocks one at a time
                teacher -= sum(p.numel() for _, b in self.blocks for p in b.parameters()) * dtype.itemsize
                teacher += max(sum(p.numel() for p in b.parameters()) for _, b in self.blocks) * dtype.itemsize
        # a pass's activations (about the kept weights' size), the shrunk model's gradients and Adam's moments, and
        # float32 copies of weights the model holds in half precision
        # (with `recovery.rank`, the updates' factors and the whole-trained norms and biases are small: the pass)
        need = teacher + kept + (0 if self.cfg.rank_for(self.kind) else 3 * kept + (kept - held))
        free = free_memory(model_device(self.model))
        if free is None:
            logger.warning("Recovery 'auto' cannot tell the free memory: taking '%s'; recovery.method: gap trains the "
                           "whole model at once (%.2f GB more).", fallback, need / 1e9)
            return fallback
        choice = "gap" if need < 0.8 * free else fallback
        logger.info("Recovery 'auto': %s (gap needs about %.2f GB beside the model, %.2f GB free).", choice,
                    need / 1e9, free / 1e9)
        return choice

    def run(self) -> dict:
        """Recovers the model in place; returns the report's entry (without the before/after scores)."""
        if not self.blocks:
            logger.info("Recovery: nothing is pruned; nothing to recover.")
            return {"method": "none", "reason": "nothing pruned"}
        method = self.method()
        if method == "none":  # 'auto' on a causal LM without room for gap (or with its free memory unknown)
            return {"method": "none", "reason": "no free memory known to hold gap"}
        start = time.perf_counter()
        lr = self.cfg.lr(method, self.kind)
        held_zeros = self._profile_zeros()
        was_training = self.model.training
        self.model.eval()
        unrecovered = DenseSnapshot(self.model)  # the weights the search left, to fall back on
        try:
            guard_kind, guard_before = self._guard(unrecovered)  # the dense reference is not held while training
            history = self._global(lr) if method == "gap" else self._layerwise(lr)
            recovered = DenseSnapshot(self.model)
            try:
                guard_after = self._guard(recovered)[1]
            finally:
                recovered.close()
            reverted = guard_after > guard_before
            if reverted:
                unrecovered.restore(self.model)
                logger.warning("Recovery (%s) made the %s score on the held-back windows worse (%.5g -> %.5g): the "
                               "unrecovered weights are kept.", method, guard_kind, guard_before, guard_after)
            problems = self._moved_zeros(unrecovered)
        finally:
            unrecovered.close()
            self.model.train(was_training)
        if problems:  # cannot happen: every step puts the zeros back
            raise SPDYError(f"Recovery moved profile zeros: {problems}.")
        seconds = time.perf_counter() - start
        return {"method": method, "learning_rate": lr, "schedule": self.cfg.schedule,
                "epochs": self.cfg.epochs_for(self.kind), "batch_size": self.cfg.batch_size,
                "precision": str(self.dtype).removeprefix("torch."),
                "train_windows": sum(len(b["input_ids"]) for b in self.train),
                "heldback_windows": sum(len(b["input_ids"]) for b in self.heldback),
                "output_weight": self.cfg.output_weight_for(self.kind) if method == "gap" else 0.0,
                "rank": self.cfg.rank_for(self.kind) if method == "gap" else None,
                "teacher": self.cfg.teacher if method == "gap" else None,
                "held_zeros": held_zeros, "trained_blocks": len(self.blocks),
                "seconds": round(seconds, 3), "heldback_score": {"kind": guard_kind, "before": guard_before,
                                                                  "after": guard_after},
                "reverted": reverted, **history}

    def _profile_parameters(self) -> dict[str, nn.Parameter]:
        """The weights and biases of the pruned layers, by name."""
        return module_parameters(self.model, self.layers)

    @torch.no_grad()
    def _profile_zeros(self) -> int:
        """How many entries of the pruned layers are zero: the profile's zeros, which recovery holds."""
        return sum(int((p == 0).sum()) for p in self._profile_parameters().values())

    @torch.no_grad()
    def _moved_zeros(self, before: DenseSnapshot) -> dict[str, int]:
        """Entries of the pruned layers zero in `before` (the weights the search left) and not zero now, per
        parameter; empty when every zero held. Read a tensor at a time, so no mask of the whole model is held
        through recovery (on a 1.1 B model, a byte per weight: 0.9 GiB)."""
        moved = {}
        for name, p in self._profile_parameters().items():
            n = int(((before.tensor(name).to(p.device) == 0) & (p != 0)).sum())
            if n:
                moved[name] = n
        return moved

    def _guard(self, current: DenseSnapshot) -> tuple[str, float]:
        """The job's score on the held-back windows against the dense model, of the weights in `current` (the
        model's own): the last word on whether recovery helped the final output. A layer objective that improves
        block by block can still hurt the output (the layer-wise variant does on heavily sparse MiniLM). The dense
        reference comes from the dense weights written into the model for one pass, `current` written back after:
        no second model in memory, and the reference is built for each score rather than held through training.

        A causal LM's reference holds every position's probabilities over the vocabulary (64 windows of 128 tokens
        over SmolLM2's 49 k: 0.8 GB), so the held-back windows are scored a few batches at a time, at most
        `GUARD_REFERENCE_BYTES` of reference each, and the parts' scores combined as one (`DistanceScorer.weight`).
        Both models run in the passes' precision (`autocast`), as training does: in bfloat16 on a CPU with bfloat16
        matrix instructions a pass takes a third of a float32 one's time.

        Returns (the score's kind, the score)."""
        kind, total, weight = None, 0.0, 0.0
        with torch.no_grad(), self.autocast():
            for part in self._guard_parts():
                self.snapshot.restore(self.model)
                try:
                    scorer = DistanceScorer(self.model, part, self.kind)
                finally:
                    current.restore(self.model)
                kind = scorer.kind
                total += scorer() * scorer.weight
                weight += scorer.weight
                del scorer
        return kind, total / max(weight, 1e-30)

    def _guard_parts(self) -> list[list[dict]]:
        """The held-back batches in runs whose dense reference stays under `GUARD_REFERENCE_BYTES`: float16
        probabilities over the vocabulary for each token of a causal LM scored by KL; a hidden state per token (a
        vector per window) otherwise, which all the batches share one run for."""
        if self.kind != "kl":
            return [self.heldback]
        head = _language_model_head(self.model)
        vocabulary = head.out_features if head is not None else getattr(self.model.config, "vocab_size", 1)
        parts, size = [], 0
        for batch in self.heldback:
            need = batch["input_ids"].numel() * vocabulary * 2
            if not parts or size + need > GUARD_REFERENCE_BYTES:
                parts.append([])
                size = 0
            parts[-1].append(batch)
            size += need
        return parts

    def teacher_dtype(self) -> torch.dtype:
        """The dense teacher's dtype: the passes' (they run in it under autocast anyway: half the memory of a
        float32 copy), the model's own when they run in float32."""
        return self.dtype if self.dtype != torch.float32 else (model_dtype(self.model) or torch.float32)

    # ------------------------------------------------------------------ gAP: the whole model at once
    def _global(self, lr: float) -> dict:
        model = self.model
        source = None
        if self.cfg.teacher == "outputs":
            cached, teacher = self._dense_head_inputs(), None
        else:
            # the teacher holds (copy) or reads one at a time (stream) the blocks recovery trains; the rest it shares
            # with the model, which holds the dense values there and keeps them (nothing outside those blocks is
            # trained)
            streamed = [name for name, _ in self.blocks] if self.cfg.teacher == "stream" else []
            source = self._streamed_source() if streamed else None
            try:
                cached, teacher = None, self.snapshot.model(model, self.teacher_dtype(), shared=self._untrained,
                                                            streamed=streamed, source=source)
            except BaseException:
                if source is not None:
                    source.close()
                raise
            if streamed:
                logger.info("Recovery reads the dense weights of %d blocks from disk a block at a time in every pass "
                            "(recovery.teacher: stream).", len(streamed))
        frozen = [p for p in model.parameters() if p.requires_grad]
        model.requires_grad_(False)
        try:
            with ShrunkModel(model) as cut:
                if len(cut):
                    logger.info("Recovery trains the model shrunk: %d groups of heads or neurons cut out.", len(cut))
                history = self._global_fit(teacher, cut.teacher_index, lr, cached)
                # gone before the full-size weights come back, so that the teacher and the model at full size are
                # never held together (on a 1.1 B model that moment was the job's peak)
                del teacher, cached
            return history
        finally:
            if source is not None:
                source.close()
            model.requires_grad_(False)
            for p in frozen:
                p.requires_grad_(True)

    def _streamed_source(self) -> DenseSnapshot | None:
        """Where a streamed teacher reads its blocks from: the job's snapshot where it holds them in the teacher's
        dtype; otherwise (a float32 model whose passes run in bfloat16) a snapshot of theirs in that dtype, written
        once a tensor at a time, so that each pass reads half the bytes and converts none."""
        dtype = self.teacher_dtype()
        params = {f"{block}.{n}": p for block, module in self.blocks for n, p in module.named_parameters()
                  if p.is_floating_point()}
        if all(p.dtype == dtype for p in params.values()):
            return None
        return DenseSnapshot((name, self.snapshot.tensor(name).to(dtype)) for name in params)

    def _untrained(self, name: str) -> bool:
        """Whether the model's tensor `name` lies outside the pruned blocks, which are all that gap trains."""
        return not any(name.startswith(block + ".") for block, _ in self.blocks)

    def _dense_head_inputs(self) -> dict[tuple, torch.Tensor]:
        """`recovery.teacher: outputs`: the hidden states the dense model gives its head in every pass recovery will
        make (the training and held-back windows, split into passes as training splits them), computed once with
        the dense weights written into the model, in the teacher's dtype; the model's own weights are put back
        after. Keyed by the pass's windows (`_pass_key`)."""
        model = self.model
        head = _language_model_head(model)
        if self.kind != "kl" or head is None:
            raise SPDYError("recovery.teacher: outputs needs a causal LM (the hidden states its head gets are what "
                            "it keeps); use teacher: copy for this model.")
        size = self.cfg.micro_batch_for(self.kind)
        current = DenseSnapshot(model)
        catch = HeadInputs(head)
        cache = {}
        try:
            self.snapshot.restore(model)
            with torch.no_grad(), self.autocast():
                for batch in self.train + self.heldback:
                    for part, _ in _parts(batch, size):
                        _run(model, part, self.extra)
                        cache[_pass_key(part)] = catch.take().to(self.teacher_dtype())
        finally:
            catch.remove()
            current.restore(model)
            current.close()
        logger.info("Recovery fits the dense model's outputs, kept for %d passes (%.0f MB), with no dense copy.",
                    len(cache), sum(t.numel() * t.element_size() for t in cache.values()) / 1e6)
        return cache

    def _global_fit(self, teacher: nn.Module | None, teacher_index: dict[str, torch.Tensor], lr: float,
                    cached: dict[tuple, torch.Tensor] | None = None) -> dict:
        """gAP on the model as it is now (shrunk where `teacher_index` maps a shrunk layer's outputs to the dense
        teacher's), against `teacher` or, without one, against the dense head inputs `cached` (the output term
        alone)."""
        model = self.model
        modules = dict(model.named_modules())
        layers = {n: modules[n] for n in self.layers if n in modules}  # a removed attention's layers are gone
        held = HeldZeros.of_modules(model, layers)  # the zeros left inside the kept weights (sparse levels)
        if cached is not None:  # no layer term: nothing to compare a layer's output with
            layers = {}
        live = {n: keep for n, m in layers.items() if (keep := live_outputs(m)) is not None}
        index = {n: i for n, i in teacher_index.items() if n in layers}
        whole, updated = self._trained(held)
        rank = self.cfg.rank_for(self.kind)
        updates = LowRankUpdates(updated, rank, seed=self.config.search.seed)
        if len(updates):
            logger.info("Recovery trains updates of rank %d of %d layers (and %d tensors whole).", rank,
                        len(updates), len(whole))
        params = whole + updates.parameters()
        # only what is trained takes gradients: the shrunk layers are new parameters, which require them by default;
        # with updates their weights are not trained, and their gradients (the size of the pruned blocks, never
        # cleared by the optimizer) and autocast's kept casts of them would be held for nothing
        model.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        student_out = LayerOutputs(layers, detach=False)
        teacher_out = LayerOutputs(dict(modules_named(teacher, layers)) if teacher is not None else {}, detach=True)
        weight = self.cfg.output_weight_for(self.kind)
        stop = weight == 0
        if not layers and stop:
            logger.info("Recovery: every pruned layer went with a removed attention and recovery.output_weight is 0: "
                        "nothing to fit.")
            return {"epochs_run": 0}
        last = [dict(find_blocks(m))[self.blocks[-1][0]] for m in (model, teacher)] if stop else []
        stops = [b.register_forward_hook(_raise_stop) for b in last]
        head = _language_model_head(model) if not stop and self.kind == "kl" else None
        heads = [HeadInputs(head)] if head is not None else []
        if heads and teacher is not None:
            heads.append(HeadInputs(_language_model_head(teacher)))
        # the head is never trained: cast once to the passes' dtype rather than by autocast in each of its products
        head_weight = head.weight.detach().to(self.dtype) if head is not None else None

        def objective(batch) -> torch.Tensor:
            student_out.values.clear()  # what a checkpointed block's second pass caught in the last backward
            with self.autocast():
                t = None
                if teacher is not None:
                    with torch.no_grad():
                        t = _run(teacher, batch, self.extra)
                s = _run(model, batch, self.extra)
            tokens = token_mask(batch)
            targets = {n: v[..., index[n].to(v.device)] if n in index else v for n, v in teacher_out.values.items()}
            # no layer term where every pruned layer went with a removed attention: the output term alone
            loss = layer_loss(student_out.values, targets, live, tokens) if layers else 0.0
            student_out.values.clear()
            teacher_out.values.clear()
            if heads:
                student_hidden = heads[0].take()
                teacher_hidden = cached[_pass_key(batch)] if cached is not None else heads[1].take()
                with self.autocast():
                    distance = sliced_kl(head, student_hidden, teacher_hidden, tokens, weight=head_weight)
                loss = loss + weight * distance
            elif not stop:
                loss = loss + weight * output_distance(s, t, self.kind, tokens)
            return loss

        recomputed = [b for _, b in find_blocks(model)] if self.cfg.checkpoint else []
        try:
            # the updates are added to their weights as it ends
            with float32_training(whole), updates, self.float32_attention(), \
                    checkpointed(recomputed, around=self.float32_attention), \
                    frozen_weights_in(model, self.dtype) as lowered:
                if lowered:
                    logger.debug("Recovery holds %d frozen tensors in %s for its passes.", lowered, self.dtype)
                # one epoch has only the start to beat, which the guard compares it with on the job's score
                history = self._fit(params, objective, lr, desc="Recovery (gAP)", held=held,
                                    micro_batch_size=self.cfg.micro_batch_for(self.kind),
                                    judged=self.cfg.epochs_for(self.kind) > 1)
            held.apply()  # a layer's own exact zeros an update moved (a sparse level's it never meets) go back
            return history
        finally:
            for h in stops + heads:
                h.remove()
            student_out.remove()
            teacher_out.remove()

    def _trained(self, held: HeldZeros) -> tuple[list[nn.Parameter], dict[str, nn.Module]]:
        """What gap trains, as (parameters trained whole, layers trained through low-rank updates): every parameter
        of the pruned blocks whole; with a rank (`recovery.rank`; 16 for a causal LM by default), their linear
        layers through updates instead, except those holding zeros of the profile inside their kept weights (an
        update would fill them)."""
        params = [p for _, b in self.blocks for p in b.parameters()]
        if not self.cfg.rank_for(self.kind):
            return params, {}
        holding = {id(p) for p in held.params.values()}
        updated = {}
        for name, block in self.blocks:
            for n, m in block.named_modules():
                full = f"{name}.{n}"
                if isinstance(m, (nn.Linear, *conv1d_classes())) and m.weight.numel() and not (
                        id(m.weight) in holding and self._sparse(full, m.weight)):
                    updated[full] = m
        by_weight = {id(m.weight) for m in updated.values()}
        return [p for p in params if id(p) not in by_weight], updated

    def _sparse(self, name: str, weight: torch.Tensor) -> bool:
        """Whether layer `name` holds zeros of a sparse level: more zero weights than the dense layer had in all. A
        layer cut down to its kept heads or neurons holds at most the dense layer's own exact zeros, which checkpoints
        have (a dequantized GGUF model's: a few in every layer); an update may move those, as training the weight
        would have, and they are put back with the held zeros when it is added in."""
        key = f"{name}.weight"
        if key not in self.snapshot:
            return True
        return int((weight.detach() == 0).sum()) > int((self.snapshot.tensor(key) == 0).sum())

    # ------------------------------------------------------------------ block by block
    def _layerwise(self, lr: float) -> dict:
        model = self.model
        blocks = find_blocks(model)
        names = [n for n, _ in blocks]
        first = names.index(self.blocks[0][0])
        calibrator = SequentialCalibrator(model, [], self.train + self.heldback, progress=False)
        chain = blocks[first:names.index(self.blocks[-1][0]) + 1]
        with torch.no_grad():
            chained = calibrator.check_chain(chain, self.extra)
            calls = calibrator.capture(chain[0][1], self.extra)  # dense and pruned inputs agree here
        dense_calls = list(calls)
        histories = {}
        frozen = [p for p in model.parameters() if p.requires_grad]
        model.requires_grad_(False)
        try:
            bar = tqdm(chain, desc="Recovery (layer-wise)", unit="block", disable=not self.progress)
            for i, (name, block) in enumerate(bar):
                if i and not chained:  # inputs from the models themselves (slow, but right for any wiring)
                    with torch.no_grad():
                        calls = calibrator.capture(block, self.extra)
                        dense_calls = self._dense_inputs(model, name, block)
                dense_block = copy.deepcopy(block)  # one block's dense weights at a time
                self.snapshot.restore(dense_block, prefix=name + ".")
                dense_block.requires_grad_(False)
                layers = {n[len(name) + 1:] for n in self.layers if n.startswith(name + ".")}
                if layers:
                    live = {n[len(name) + 1:]: v for n, v in self.live.items() if n.startswith(name + ".")}
                    histories[name] = self._fit_block(block, dense_block, layers, live, calls, dense_calls, lr)
                with torch.no_grad():
                    if chained and i < len(chain) - 1:
                        calls = [c.with_hidden(first_output(block(*c.args, **c.kwargs))) for c in calls]
                        dense_calls = [c.with_hidden(first_output(dense_block(*c.args, **c.kwargs))) for c in dense_calls]
                del dense_block
        finally:
            model.requires_grad_(False)
            for p in frozen:
                p.requires_grad_(True)
        before = sum(h["heldback_before"] for h in histories.values())
        after = sum(h["heldback_after"] for h in histories.values())
        return {"heldback_before": before, "heldback_after": after, "blocks": histories}

    def _dense_inputs(self, model: nn.Module, name: str, block: nn.Module) -> list[BlockCall]:
        """The dense model's inputs to block `name`: the whole dense model run up to it (unchained models only),
        its blocks read from the snapshot one at a time."""
        teacher = self.snapshot.model(model, streamed=[n for n, _ in find_blocks(model)])
        try:
            return SequentialCalibrator(teacher, [], self.train + self.heldback, progress=False).capture(
                dict(find_blocks(teacher))[name], self.extra)
        finally:
            del teacher

    def _fit_block(self, block, dense_block, layers, live, calls, dense_calls, lr) -> dict:
        student_out = LayerOutputs({n: m for n, m in block.named_modules() if n in layers}, detach=False)
        teacher_out = LayerOutputs({n: m for n, m in dense_block.named_modules() if n in layers}, detach=True)
        targets = []
        with torch.no_grad():
            for c in dense_calls:
                dense_block(*c.args, **c.kwargs)
                targets.append(dict(teacher_out.values))
                teacher_out.values.clear()
        teacher_out.remove()
        params = list(block.parameters())
        for p in params:
            p.requires_grad_(True)
        held = HeldZeros.of_modules(block, layers)
        index = {id(b): i for i, b in enumerate(self.train + self.heldback)}

        def objective(batch) -> torch.Tensor:
            i = index[id(batch)]
            with self.autocast():
                block(*calls[i].args, **calls[i].kwargs)
            loss = layer_loss(student_out.values, targets[i], live, token_mask(batch))
            student_out.values.clear()
            return loss

        try:
            with float32_training(params), self.float32_attention():
                return self._fit(params, objective, lr, desc=None, held=held)
        finally:
            student_out.remove()
            for p in params:
                p.requires_grad_(False)

    # ------------------------------------------------------------------ the training loop both share
    def _fit(self, params: list[nn.Parameter], objective, lr: float, desc: str | None,
             held: HeldZeros, micro_batch_size: int | None = None, judged: bool = True) -> dict:
        """Adam on `params` against `objective(batch)`, a batch's loss; with `micro_batch_size`, each training batch
        runs as passes of that many windows whose gradients add up to one step (`objective` then gets those parts).
        The best epoch's values, by the held-back loss, are kept in a snapshot on disk and come back at the end.
        Unless `judged`, the held-back loss is not taken and every epoch runs: for one epoch, whose only rival is the
        start, which the guard compares it with on the job's own score (a pass of the teacher and the model over
        the held-back windows saved twice)."""
        optimizer = torch.optim.Adam(params, lr=lr, fused=True)  # in place: no temporaries the size of params
        rng = np.random.default_rng(self.config.search.seed)
        trained = nn.ParameterList(params)  # the same tensors, named for the snapshot of the best epoch

        def heldback_loss() -> float:
            with torch.no_grad():
                return sum(float(objective(part)) * share for b in self.heldback
                           for part, share in _parts(b, micro_batch_size)) / len(self.heldback)

        best = before = heldback_loss() if judged else None
        best_state = DenseSnapshot(trained) if judged else None
        best_epoch, bad, train_losses, heldback_losses = 0, 0, [], []
        epochs = self.cfg.epochs_for(self.kind)
        total = epochs * len(self.train)
        decay = None
        if self.cfg.schedule == "linear":  # to zero at the last step the epochs allow
            decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total))
        bar = tqdm(total=total, desc=desc, unit="step", disable=not self.progress or desc is None)
        try:
            for epoch in range(1, epochs + 1):
                running = 0.0
                for i in rng.permutation(len(self.train)):
                    step_loss = 0.0
                    for part, share in _parts(self.train[i], micro_batch_size):
                        loss = objective(part) * share
                        loss.backward()
                        step_loss += float(loss.detach())
                    held.hold_gradients()
                    optimizer.step()
                    if decay is not None:
                        decay.step()
                    optimizer.zero_grad(set_to_none=True)
                    held.apply()
                    running += step_loss
                    bar.update(1)
                    bar.set_postfix(loss=f"{step_loss:.4g}")
                train_losses.append(running / len(self.train))
                if not judged:
                    logger.debug("Recovery epoch %d: train %.5g.", epoch, train_losses[-1])
                    best_epoch = epoch
                    continue
                heldback_losses.append(heldback_loss())
                logger.debug("Recovery epoch %d: train %.5g, held back %.5g.", epoch, train_losses[-1],
                             heldback_losses[-1])
                if heldback_losses[-1] < best:
                    best, best_epoch, bad = heldback_losses[-1], epoch, 0
                    best_state.close()
                    best_state = DenseSnapshot(trained)
                else:
                    bad += 1
                    if bad >= self.cfg.patience:
                        break
            bar.close()
            del optimizer
            if best_state is not None:
                best_state.restore(trained)
        finally:
            if best_state is not None:
                best_state.close()
        held.apply()
        history = {"best_epoch": best_epoch, "epochs_run": len(train_losses), "train_loss": train_losses}
        if judged:
            history.update(heldback_before=before, heldback_after=best, heldback_loss=heldback_losses)
        return history


@contextmanager
def checkpointed(blocks: list[nn.Module], around: Callable[[], AbstractContextManager] = nullcontext
                 ) -> Iterator[None]:
    """Within the block, each of `blocks` runs under `torch.utils.checkpoint` (non-reentrant) where gradients are
    taken: autograd keeps its inputs only, and runs it again when the backward pass reaches it, so what one block's
    backward needs is held at a time rather than every block's. Hooks on its layers run again in that second pass.
    `around()` is entered in both passes, inside the checkpointed function: the second pass runs in the autograd
    engine, where a `TorchFunctionMode` entered around training (`Float32Attention`) is not active, and must compute
    what the first computed."""
    from torch.utils.checkpoint import checkpoint

    wrapped = []
    try:
        for block in blocks:
            forward = block.forward

            def again(*args, _forward=forward, **kwargs):
                with around():
                    return _forward(*args, **kwargs)

            def run(*args, _forward=forward, _again=again, **kwargs):
                if not torch.is_grad_enabled():
                    return _forward(*args, **kwargs)
                return checkpoint(_again, *args, use_reentrant=False, **kwargs)

            block.forward = run  # an instance attribute: nn.Module.__call__ finds it before the class's method
            wrapped.append(block)
        yield
    finally:
        for block in wrapped:
            del block.forward


@contextmanager
def frozen_weights_in(model: nn.Module, dtype: torch.dtype) -> Iterator[int]:
    """Within the block, the frozen float32 weights and biases of the model's linear layers are held in `dtype`, the
    passes' autocast dtype. Autocast casts each of them to it in every pass (a copy of every layer per pass, and
    another kept for the backward pass) with the same rounding as this one cast, so the passes compute the same
    values, without the copies. A tensor that a module of another kind shares is left as it is (a language-model
    head tied to the input embeddings: the lookup is no autocast operation, and would run in `dtype`). The float32
    values wait in a snapshot on disk, not beside the lowered ones, and come back exactly on leaving. Gives how
    many tensors were lowered."""
    if dtype == torch.float32:
        yield 0
        return
    linear = (nn.Linear, *conv1d_classes())
    others = {id(p) for m in model.modules() if not isinstance(m, linear) for p in m.parameters(recurse=False)}
    lowered, seen = {}, set()
    for name, module in model.named_modules():
        if not isinstance(module, linear):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.dtype == torch.float32 and not p.requires_grad and id(p) not in others and id(p) not in seen:
                seen.add(id(p))
                lowered[f"{name}.{pname}" if name else pname] = p
    if not lowered:
        yield 0
        return
    snapshot = DenseSnapshot(lowered.items())
    try:
        for p in lowered.values():
            p.data = p.data.to(dtype)
        yield len(lowered)
    finally:
        for name, p in lowered.items():
            p.data = snapshot.tensor(name).to(p.device)
        snapshot.close()


@contextmanager
def float32_training(parameters: list[nn.Parameter]) -> Iterator[None]:
    """Within the block, the half-precision parameters among `parameters` are float32 (the same `nn.Parameter`s,
    their data replaced): Adam's steps at recovery's learning rates (1e-5 to 3e-4 of a weight) are below bfloat16's
    resolution (2^-8), so weights trained in it would barely move. The passes still run in half precision under
    autocast. On leaving, each parameter goes back to its dtype, rounded once."""
    seen, params = set(), []
    for p in parameters:
        if id(p) not in seen and p.is_floating_point() and p.dtype != torch.float32:
            seen.add(id(p))
            params.append((p, p.dtype))
    for p, _ in params:
        p.data = p.data.to(torch.float32)
    try:
        yield
    finally:
        for p, dtype in params:
            p.data = p.data.to(dtype)


def planned_method(config: SPDYConfig, model: nn.Module) -> str:
    """`recovery.method` as far as it is known before the job runs ('auto' is settled by `Recovery.method` when
    recovery starts, by the memory free then): whether the job needs the dense snapshot recovery fits to."""
    return config.recovery.method


def recovery_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of recovery's forward passes: `recovery.precision`, with 'auto' bfloat16 on a GPU that supports it
    and on a CPU with bfloat16 matrix instructions, float32 elsewhere (without them a CPU's bfloat16 products are
    emulated, not measured to pay)."""
    if precision == "bfloat16":
        return torch.bfloat16
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_has_bf16_matmul():
            return torch.bfloat16
    return torch.float32


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX tiles), as oneDNN uses them: there
    recovery's forward and backward passes in bfloat16 take about half the time of float32 ones (SmolLM2-135M on an
    AVX512-BF16 EPYC, docs/benchmarks/recovery.md) and recover as well."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):  # torch.cpu's, private: probed with care
        check = getattr(torch.cpu, probe, None)
        try:
            if check is not None and bool(check()):
                return True
        except Exception:  # noqa: BLE001 - a probe that fails means "not known to be there"
            continue
    return False


def _raise_stop(module, args, output):
    raise _Stop


def _run(model: nn.Module, batch: dict, extra: dict):
    try:
        return model(**batch, **extra)
    except (_Stop, HeadReached):
        return None


def _language_model_head(model: nn.Module) -> nn.Module | None:
    """A causal LM's head (its output embeddings, a Linear over the vocabulary), which recovery neither prunes nor
    trains; None where the model has none."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Linear) else None


def _batches(windows: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    n = windows["input_ids"].shape[0]
    return [{k: v[i:i + size] for k, v in windows.items()} for i in range(0, n, size)]


def _pass_key(batch: dict[str, torch.Tensor]) -> tuple:
    """A pass's windows, as recovery cuts them from its batches (views of the same tensors every epoch)."""
    ids = batch["input_ids"]
    return ids.data_ptr(), tuple(ids.shape)


def _parts(batch: dict[str, torch.Tensor], size: int | None) -> list[tuple[dict[str, torch.Tensor], float]]:
    """The batch as passes of `size` windows, each with its share of the batch's windows (the batch itself, whole,
    when `size` is None or covers it)."""
    n = batch["input_ids"].shape[0]
    if size is None or size >= n:
        return [(batch, 1.0)]
    return [(part, part["input_ids"].shape[0] / n) for part in _batches(batch, size)]


def free_memory(device: torch.device) -> int | None:
    """Bytes free now on `device` (the GPU's count on CUDA, the host's on the CPU and MPS), None where unknown. Not
    `accelerate.utils.get_max_memory`: it reads the same counts, but starts every GPU of the machine to do so."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type in ("cpu", "mps"):
            import psutil

            return int(psutil.virtual_memory().available)
    except (ImportError, RuntimeError, OSError) as error:
        logger.debug("Free memory on %s unknown: %s", device, error)
    return None


@dataclass(frozen=True)
class RecoveryRecord:
    """What the recovery stage hands on: its report entry (method, epochs, the scores before and after), and the
    recovered model's score on the scoring windows and held-out comparison (`HeldOutQuality.compare`, None without
    one), which the job reports as they are instead of taking them again."""

    entry: dict
    score: float
    heldout: dict | None

    def report(self) -> dict:
        return {"recovery": self.entry}


def recovery_stage(config: SPDYConfig, model: nn.Module, windows: dict[str, torch.Tensor], snapshot: DenseSnapshot,
                   scorer, finalize: Callable[[], None], quality=None, progress: bool = True) -> RecoveryRecord:
    """The pipeline's recovery stage: the stitched profile made final (`finalize`), then recovered toward the dense
    weights in `snapshot`; the record holds the job's score on the scoring windows and, given `quality`
    (`HeldOutQuality`), the held-out quality before and after recovery."""
    finalize()
    before = {"calibration_score": scorer()}
    if quality is not None:
        before["heldout"] = quality.compare(model)["pruned"]
    entry = Recovery(config, model, snapshot, windows, scorer.kind, progress).run()
    after = {"calibration_score": scorer()}
    heldout = quality.compare(model) if quality is not None else None
    if heldout is not None:
        after["heldout"] = heldout["pruned"]
    logger.info("Recovery (%s): score %.5g -> %.5g%s.", entry["method"], before["calibration_score"],
                after["calibration_score"], "" if quality is None else
                f", held-out {'perplexity' if quality.causal else 'cosine'} {before['heldout']:.4g} -> "
                f"{after['heldout']:.4g}")
    return RecoveryRecord({**entry, "score_kind": scorer.kind, "before": before, "after": after},
                          score=after["calibration_score"], heldout=heldout)
