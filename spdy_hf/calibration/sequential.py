"""Sequential calibration: run the calibration set through the model block by block.

For each block in model order, the block's inputs are exactly what the model passes it: every positional and
keyword argument (attention masks, position ids or rotary embeddings, cache arguments), captured by a forward
pre-hook. The block runs once on them while hooks on its units accumulate each unit's input Hessian
H = 2 X X^T / n over the real tokens (a padded window's padding, by its `attention_mask`, is left out); a
callback prunes the units and returns the weights whose outputs the next blocks should see;
the block then runs again with those weights standing in (forward hooks replace the units' outputs, so no
weight in the model is ever written) and its outputs become the next block's inputs.

Only one block runs at a time and the activations of the calibration set are the only other thing held, so
memory is one block plus the activations. Models dispatched by `accelerate` (CPU or disk offload, device maps)
work unchanged: its hooks bring a block's weights in for each forward pass, and the unit hooks here read the
dense weights during that pass.

Feeding block i's outputs straight into block i + 1 assumes the blocks form a chain that receives the same
keyword arguments. That is checked once on the first batch against a plain forward pass of the model; where it
does not hold (encoder-decoder stacks, per-layer attention masks), each block's inputs are captured afresh
from a forward pass of the whole model with the earlier blocks' replacements in place.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device
from torch import nn
from tqdm.auto import tqdm

from ..errors import SPDYError
from ..modeling.units import Unit, find_blocks

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by a capture hook to end a forward pass once the block's inputs are caught."""


@dataclass
class BlockCall:
    """One call of a block: its positional and keyword arguments."""

    args: tuple
    kwargs: dict

    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden(self, hidden: torch.Tensor) -> BlockCall:
        if self.args:
            return BlockCall((hidden, *self.args[1:]), self.kwargs)
        return BlockCall(self.args, {**self.kwargs, "hidden_states": hidden})

    def to(self, device, non_blocking: bool = False) -> BlockCall:
        """The call with every tensor on `device`: what `send_to_device` asks of an object it moves, so that it
        moves a list of calls too."""
        return BlockCall(*send_to_device((self.args, self.kwargs), device, non_blocking=non_blocking))


@dataclass
class UnitStatistics:
    """What the calibration set tells about one unit: its input Hessian and its dense (out, in) weight."""

    hessian: torch.Tensor  # (in, in) float32, 2 X X^T / n
    samples: int  # rows of X (tokens) seen
    weight: torch.Tensor  # (out, in) dense weight, float32, CPU
    mean: torch.Tensor | None = None  # (in,) float32, the mean input row (X 1 / n)


@dataclass
class SequentialCalibrator:
    """Drives the calibration set through `model` block by block (see the module docstring).

    Args:
        model: the dense model; its weights are never modified.
        units: the units to calibrate; blocks are the model's repeated blocks that hold them.
        batches: calibration batches of keyword inputs of the model (`input_ids`, `attention_mask`, ...).
        device: where blocks run, e.g. "cuda"; each block is moved there for its turn and back. Default: where
            the model is (or where `accelerate` executes it).
        progress: show a progress bar over blocks.
    """

    model: nn.Module
    units: list[Unit]
    batches: list[dict[str, torch.Tensor]]
    device: str | torch.device | None = None
    progress: bool = True
    chained: bool | None = field(default=None, init=False)  # set by run(): whether outputs feed the next block

    @torch.no_grad()  # without it the pass with stand-ins records autograd graphs, each block's kept by the next
    def run(
        self,
        needs_statistics: Callable[[str], bool],
        process_block: Callable[[str, list[Unit], dict[str, UnitStatistics]], dict[str, torch.Tensor] | None],
    ) -> None:
        """For each block: statistics of its units (when `needs_statistics(block_name)`), then
        `process_block(block_name, units, statistics)`, which returns the (out, in) weights that stand in for
        the units in the block's outputs (None or a missing unit: the dense weight)."""
        model = self.model
        all_blocks = find_blocks(model)
        by_block: dict[str, list[Unit]] = {}
        for unit in self.units:
            by_block.setdefault(unit.block, []).append(unit)
        names = [name for name, _ in all_blocks]
        missing = [b for b in by_block if b not in names]
        if missing:
            raise SPDYError(f"Units outside the model's repeated blocks cannot be calibrated sequentially: {missing}.")
        positions = [names.index(b) for b in by_block]
        # blocks between units are run, not pruned; blocks after the last one that needs work are not run
        needed = [names.index(b) for b in by_block if needs_statistics(b)]
        if not needed:
            return
        chain = all_blocks[min(positions):max(needed) + 1]
        forward_kwargs = forward_kwargs_of(model)
        replacements: list = []  # hooks standing in pruned weights, while a later capture may need them
        try:
            self.chained = self.check_chain(chain, forward_kwargs)
            if not self.chained:
                logger.info("The blocks do not form a simple chain; capturing each block's inputs from the model.")
            calls: list[BlockCall] | None = None
            bar = tqdm(chain, desc="Calibrating blocks", unit="block", disable=not self.progress)
            for i, (name, block) in enumerate(bar):
                if calls is None or not self.chained:
                    calls = self.capture(block, forward_kwargs)
                units = by_block.get(name, [])
                original_device = _module_device(block)
                moved = self.device is not None and original_device is not None \
                    and torch.device(self.device) != original_device
                if moved:
                    block.to(self.device)
                    calls = send_to_device(calls, self.device)
                try:
                    stats: dict[str, UnitStatistics] = {}
                    outputs = None
                    if units and needs_statistics(name):
                        stats, outputs = self._statistics(block, units, calls)
                    stand_in = process_block(name, units, stats) or {}
                    del stats
                    hooks = [_replace_output(u, stand_in[u.name]) for u in units if u.name in stand_in]
                    replacements.extend(hooks)
                    last = i == len(chain) - 1
                    if self.chained and not last:
                        if outputs is None or hooks:  # the statistics pass ran the dense weights
                            outputs = [first_output(block(*c.args, **c.kwargs)) for c in calls]
                        calls = [c.with_hidden(o) for c, o in zip(calls, outputs)]
                        for h in hooks:  # in a chain the outputs carry the stand-ins on: their weights can go
                            h.remove()
                            replacements.remove(h)
                finally:
                    if moved:
                        block.to(original_device)
        finally:
            for h in replacements:
                h.remove()

    # ------------------------------------------------------------------ passes
    @torch.no_grad()
    def _statistics(self, block, units, calls):
        """One pass of the block: Hessians of its units' inputs and their dense weights; returns the outputs."""
        sums: dict[str, torch.Tensor] = {}
        totals: dict[str, torch.Tensor] = {}  # per unit, the sum of its input rows
        counts: dict[str, int] = {}
        weights: dict[str, torch.Tensor] = {}
        products: dict[tuple, tuple] = {}  # X^T X and X^T 1 per input tensor within one call: q, k, v share theirs

        masks = [token_mask(b) for b in self.batches]  # one call per batch, in order (`capture`)
        current: dict[str, torch.Tensor | None] = {"mask": None}

        def hook_for(unit: Unit):
            def hook(module, args, output):
                x = args[0].detach()
                x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
                mask = current["mask"]
                if mask is not None and x2.shape[0] == mask.numel():  # padding is no evidence about the inputs
                    x2 = x2[mask.to(x2.device)]
                # the key holds x itself, so its memory cannot be reused by another input during the call
                key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
                if key not in products or products[key][0] is not x:
                    xf = x2.to(torch.float32)
                    products[key] = (x, xf.T @ xf, xf.sum(dim=0))
                _, product, total = products[key]
                sums[unit.name] = sums[unit.name] + product if unit.name in sums else product.clone()
                totals[unit.name] = totals[unit.name] + total if unit.name in totals else total.clone()
                counts[unit.name] = counts.get(unit.name, 0) + x2.shape[0]
                if unit.name not in weights:
                    weights[unit.name] = dense_weight(unit).to("cpu", torch.float32).clone()
            return hook

        hooks = [u.module.register_forward_hook(hook_for(u)) for u in units]
        outputs = []
        try:
            for call, mask in zip(calls, masks):
                current["mask"] = mask
                outputs.append(first_output(block(*call.args, **call.kwargs)))
                products.clear()
        finally:
            for h in hooks:
                h.remove()
        stats = {}
        for unit in units:
            if unit.name not in sums:
                raise SPDYError(f"Unit {unit.name} was never called by its block on the calibration set.")
            n = counts[unit.name]
            stats[unit.name] = UnitStatistics(hessian=(2.0 / n) * sums.pop(unit.name), samples=n,
                                              weight=weights[unit.name], mean=totals.pop(unit.name) / n)
        return stats, outputs

    @torch.no_grad()
    def capture(self, block: nn.Module, forward_kwargs: dict, batches=None) -> list[BlockCall]:
        """The arguments the model passes `block`, for every calibration batch."""
        calls: list[BlockCall] = []

        def hook(module, args, kwargs):
            calls.append(BlockCall(tuple(args), dict(kwargs)))
            raise _StopForward

        handle = block.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for batch in batches if batches is not None else self.batches:
                try:
                    self.model(**send_to_device(batch, _input_device(self.model)), **forward_kwargs)
                except _StopForward:
                    pass
        finally:
            handle.remove()
        if len(calls) != len(batches if batches is not None else self.batches):
            raise SPDYError(f"The model's forward pass did not reach block {type(block).__name__}; "
                            "sequential calibration needs every block to be called once per forward pass.")
        return calls

    @torch.no_grad()
    def check_chain(self, chain, forward_kwargs) -> bool:
        """Whether each block's output, with the first block's keyword arguments, is the next block's input."""
        if len(chain) == 1:
            return True
        seen: dict[int, BlockCall] = {}
        handles = []
        for i, (_, block) in enumerate(chain):
            def hook(module, args, kwargs, i=i):
                seen.setdefault(i, BlockCall(tuple(args), dict(kwargs)))
                if i == len(chain) - 1:
                    raise _StopForward
            handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            try:
                self.model(**send_to_device(self.batches[0], _input_device(self.model)), **forward_kwargs)
            except _StopForward:
                pass
        finally:
            for h in handles:
                h.remove()
        if len(seen) != len(chain):
            return False
        first = seen[0]
        for i in range(len(chain) - 1):
            call, following = seen[i], seen[i + 1]
            if len(call.args) != len(first.args) or not _same(call.kwargs, first.kwargs) \
                    or not _same(call.args[1:], first.args[1:]):
                return False
            out = first_output(chain[i][1](*call.args, **call.kwargs))
            expected = following.hidden()
            if out.shape != expected.shape or not torch.allclose(out, expected, rtol=1e-4, atol=1e-5):
                return False
        return True


# ---------------------------------------------------------------------------------------------- helpers
def token_mask(batch: dict) -> torch.Tensor | None:
    """The batch's real tokens, flattened to (B * T,) bool from its 2-D `attention_mask`; None when every token is
    real (or the batch has no such mask). Padding enters no Hessian, score or recovery loss."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or bool(mask.bool().all()):
        return None
    return mask.reshape(-1).bool()


def forward_kwargs_of(model: nn.Module) -> dict:
    """No cache during calibration: it would hold every block's keys and values."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def first_output(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) or hasattr(output, "to_tuple"):
        return output[0]
    raise SPDYError(f"Cannot read the hidden states from a block output of type {type(output).__name__}.")


def _module_device(module: nn.Module) -> torch.device | None:
    for p in module.parameters():
        return p.device
    return None


def _input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: its first parameter's device (accelerate moves them on from there)."""
    hook = getattr(model, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # objects without a meaningful equality (caches, say) are taken as different
        return False


def _materialized(module: nn.Module, name: str) -> torch.Tensor | None:
    """A parameter's values, also when `accelerate` has offloaded it (the module holds a meta tensor then)."""
    tensor = getattr(module, name, None)
    if tensor is None or tensor.device.type != "meta":
        return None if tensor is None else tensor.detach()
    weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
    if weights_map is None:
        raise SPDYError(f"{type(module).__name__}.{name} is on the meta device with no offloaded copy; load the "
                        "model's weights (or dispatch it with accelerate) before pruning.")
    return weights_map[name]


def dense_weight(unit: Unit) -> torch.Tensor:
    """The unit's (out, in) weight values, wherever they are kept."""
    w = _materialized(unit.module, "weight")
    return w.T if unit.is_conv1d else w


def _replace_output(unit: Unit, weight: torch.Tensor):
    """A forward hook that makes `unit` compute with `weight` (out, in) instead of its own."""
    cache: dict[torch.device, torch.Tensor] = {}

    def hook(module, args, output):
        x = args[0]
        w = cache.get(x.device)
        if w is None:
            w = cache[x.device] = weight.to(device=x.device, dtype=x.dtype)
        bias = _materialized(module, "bias")
        return F.linear(x, w, None if bias is None else bias.to(device=x.device, dtype=x.dtype))

    return unit.module.register_forward_hook(hook)


def calibrate_windows(
    model: nn.Module,
    units: list[Unit],
    windows: dict[str, torch.Tensor],
    batch_size: int,
    needs_statistics: Callable[[str], bool],
    process_block: Callable[[str, list[Unit], dict[str, UnitStatistics]], dict[str, torch.Tensor] | None],
    device: str | torch.device | None = None,
    progress: bool = True,
) -> None:
    """`SequentialCalibrator.run` over calibration windows split into batches, with the model in eval mode for
    the pass (its training flag is restored afterwards)."""
    batches = [{k: v[i:i + batch_size] for k, v in windows.items()}
               for i in range(0, windows["input_ids"].shape[0], batch_size)]
    was_training = model.training
    model.eval()
    try:
        SequentialCalibrator(model, units, batches, device=device, progress=progress).run(
            needs_statistics, process_block)
    finally:
        model.train(was_training)
