"""Every backend times the regime's real work: a prefill pass over batch_size x sequence_length tokens, or in decode
one new token per sequence against a cache of context_length tokens. A recording clock stands in for the timers
(and, for cuda, for the GPU and its 2:4 kernel): it runs each timed function once, notes the rows of every linear
product it runs and what the model was called with, and answers with the products' multiply-adds as milliseconds,
so a table timed in one regime and checked in another cannot pass unseen."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import MODEL_FACTORIES, small_config
from torch import nn

import spdy_hf.deploy.two_four as two_four
import spdy_hf.families.base as family_base
import spdy_hf.families.structured as structured_family
import spdy_hf.latency.cpu as cpu
import spdy_hf.latency.cuda as cuda
from spdy_hf.deploy.kernels import FastLinear
from spdy_hf.families.structured import StructuredFamily
from spdy_hf.families.unstructured import UnstructuredFamily
from spdy_hf.latency.regime import regime_inputs
from spdy_hf.modeling.units import find_units

REGIMES = {
    "prefill": {"mode": "prefill", "batch_size": 2, "sequence_length": 8},
    "decode": {"mode": "decode", "batch_size": 2, "sequence_length": 8, "context_length": 12},
}


class ProductClock:
    """A fake clock and GPU. `timer` has the timers' signature, `(functions, warmup, repeats) -> ms each`: it runs
    each function once and answers with the multiply-adds of the linear products it ran (in millions; a 2:4 weight
    costs `two_four_cost` of dense; `FastLinear`'s CSR products are seen, not costed). Rows of every linear input
    and the model's calls are recorded while a timed function runs, or all the time with `record_all` (the cpu
    backend times its in-place passes with its own clock)."""

    def __init__(self, model: nn.Module, two_four_cost: float = 0.6):
        self.model, self.two_four_cost = model, two_four_cost
        self.rows: set[int] = set()  # rows (tokens) of every linear input seen
        self.calls: list[tuple[tuple[int, ...], int | None]] = []  # per model call: input ids shape, cached tokens
        self.sparse: set[int] = set()  # storage of the weights made 2:4
        self.kept: list[torch.Tensor] = []
        self.scale: dict[int, float] = {}  # storage of a weight -> its cost per multiply-add (default 1)
        self.timing = self.record_all = False
        self.ms = 0.0

    def install(self, monkeypatch) -> ProductClock:
        linear = F.linear

        def recording_linear(x, weight, bias=None):
            self.note(x)
            self.ms += self.cost(x, weight)
            return linear(x, weight, bias)

        forward = FastLinear.forward

        def fast_forward(module, x):  # its sparse and transposed products do not go through F.linear
            self.note(x)
            return forward(module, x)

        monkeypatch.setattr(F, "linear", recording_linear)
        monkeypatch.setattr(FastLinear, "forward", fast_forward)
        self.model.register_forward_pre_hook(self.note_call, with_kwargs=True)  # the test's own model
        return self

    def cost(self, x: torch.Tensor, weight: torch.Tensor) -> float:
        """The "milliseconds" of one product: its multiply-adds in millions, less for a 2:4 weight."""
        factor = self.two_four_cost if weight.data_ptr() in self.sparse else self.scale.get(weight.data_ptr(), 1.0)
        return factor * math.prod(x.shape[:-1]) * weight.shape[0] * weight.shape[1] / 1e6

    def note(self, x: torch.Tensor) -> None:
        if self.timing or self.record_all:
            self.rows.add(math.prod(x.shape[:-1]))

    def note_call(self, module, args, kwargs):
        if self.timing or self.record_all:
            ids = kwargs.get("input_ids")
            cache = kwargs.get("past_key_values", kwargs.get("cache"))
            self.calls.append((tuple(ids.shape), None if cache is None else int(cache.get_seq_length())))

    def timer(self, fns, warmup, repeats):
        out = []
        for fn in fns:
            self.ms, self.timing = 0.0, True
            try:
                fn()
            finally:
                self.timing = False
            out.append(self.ms)
        return out

    def two_four(self, weight: torch.Tensor) -> torch.Tensor:
        """The 2:4 kernel's stand-in: the weight as it is, remembered as 2:4."""
        w = weight.detach().clone()
        self.sparse.add(w.data_ptr())
        self.kept.append(w)  # alive, so that no later tensor takes its storage and passes for 2:4
        return w


def expected(config):
    """The rows every timed product must have, and what every timed model call must get (ids shape, cache)."""
    regime = config.regime
    if regime.mode == "decode":
        return regime.batch_size, ((regime.batch_size, 1), regime.context_length)
    return regime.batch_size * regime.sequence_length, ((regime.batch_size, regime.sequence_length), None)


def assert_timed_in_regime(clock: ProductClock, config) -> None:
    rows, call = expected(config)
    regime = config.regime
    # in prefill a causal LM's head gets one position per sequence: the last one's logits, as generate computes them
    head = {regime.batch_size} if regime.mode == "prefill" and regime.logits == "last" and \
        "logits_to_keep" in inspect.signature(clock.model.forward).parameters else set()
    assert clock.rows == {rows} | head, f"products timed with {sorted(clock.rows)} rows; the regime has {rows}"
    assert clock.calls and set(clock.calls) == {call}


def fake_gpu(monkeypatch, model: nn.Module, clock: type[ProductClock] = ProductClock) -> ProductClock:
    """The cuda backend's device pieces replaced: a GPU that is there, and CUDA events and the 2:4 kernel faked by
    a `ProductClock` of `model` (returned). The units and the model then run where they are, on the cpu."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(cuda, "cuda_environment", lambda: {"gpu": "Fake GPU", "cusparselt": 1})
    clock = clock(model).install(monkeypatch)
    monkeypatch.setattr(cuda, "cuda_interleaved_median_ms", clock.timer)
    monkeypatch.setattr(two_four, "to_two_four", clock.two_four)
    return clock


def cuda_config(tmp_path, mode, **overrides):
    return small_config(tmp_path, backend="cuda", regime={**REGIMES[mode], "dtype": "bfloat16"}, **overrides)


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_cuda_per_layer_table_times_the_regime(mode, tmp_path, monkeypatch):
    """`spdy-hf prune --backend cuda --regime decode` times every unit as one-token steps, like the whole model:
    the units and the base are in one regime, so the constant check holds."""
    model = MODEL_FACTORIES["llama"]()
    config = cuda_config(tmp_path, mode)
    clock = fake_gpu(monkeypatch, model)
    family = UnstructuredFamily(config, model, progress=False)
    plan = family.plan(find_units(model, config.skip_modules))
    assert_timed_in_regime(clock, config)
    assert plan.table.backend == "cuda" and plan.table.regime == config.regime.to_dict()
    # with work as the clock, the searched units plus the constant are the whole model
    assert 0 < plan.times[:, 0].sum() < plan.base_ms


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_cpu_per_layer_table_times_the_regime(mode, tmp_path, monkeypatch):
    model = MODEL_FACTORIES["llama"]()
    config = small_config(tmp_path, levels=[0.5], regime=REGIMES[mode], timing={"profile_rounds": 1})
    units = find_units(model, config.skip_modules)
    inputs = regime_inputs(model, config.regime)
    clock = ProductClock(model).install(monkeypatch)
    monkeypatch.setattr(cpu, "spin_up", lambda fn, seconds: fn())
    clock.record_all = True
    table = cpu.measure_latency_table(model, units, [0.0, 0.5], config, inputs, progress=False)
    assert_timed_in_regime(clock, config)
    assert table.regime == config.regime.to_dict()
    assert table.timing_noise == table.additivity["median_relative_error"]
    assert table.timing_noise_kind == "prediction_error"


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_cpu_kernel_benchmark_times_the_regime(mode, tmp_path, monkeypatch):
    """A unit timed alone (`time_shape`, the kernel benchmarks) gets the regime's input too."""
    model = MODEL_FACTORIES["llama"]()
    config = small_config(tmp_path, regime=REGIMES[mode])
    clock = ProductClock(model).install(monkeypatch)
    clock.record_all = True
    cpu.time_shape(64, 32, "cc", [0.0, 0.5], config)
    cpu.time_shape(64, 32, "tc", [0.0, 0.5], config)
    assert clock.rows == {expected(config)[0]}


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_structured_table_times_the_regime(mode, backend, tmp_path, monkeypatch):
    model = MODEL_FACTORIES["llama"]()
    if backend == "cuda":
        config = cuda_config(tmp_path, mode, family="structured")
        clock = fake_gpu(monkeypatch, model)
    else:
        config = small_config(tmp_path, family="structured", regime=REGIMES[mode])
        clock = ProductClock(model).install(monkeypatch)
    monkeypatch.setattr(family_base, "interleaved_timer", lambda backend: clock.timer)
    monkeypatch.setattr(structured_family, "spin_up", lambda fn, seconds: None)
    family = StructuredFamily(config, model, progress=False)
    plan = family.plan(find_units(model, config.skip_modules))
    assert_timed_in_regime(clock, config)
    assert plan.table.regime == config.regime.to_dict()


@pytest.mark.parametrize("family", ["unstructured", "structured"])
def test_cli_profile_on_cuda_in_decode_times_one_token_steps(family, tmp_path, monkeypatch, tokenizer):
    """`spdy-hf profile --backend cuda --regime decode`, as a user runs it on a GPU machine: every timed product has
    one row per sequence and every timed model call is a one-token step against the cache, and the table it writes
    says so."""
    import json

    import spdy_hf.modeling.loading as loading
    import spdy_hf.pruner as pruner
    from spdy_hf.cli import main

    model = MODEL_FACTORIES["llama"]()
    clock = fake_gpu(monkeypatch, model)
    monkeypatch.setattr(loading, "load_model_and_tokenizer", lambda name, trust_remote_code=False, dtype=None: (
        model, tokenizer))
    # on the fake GPU the model stays on the cpu, in the regime's dtype as on a real one
    monkeypatch.setattr(pruner, "to_target_device", lambda m, backend, dtype: m.to(getattr(torch, dtype)))
    monkeypatch.setattr(family_base, "interleaved_timer", lambda backend: clock.timer)
    monkeypatch.setattr(structured_family, "spin_up", lambda fn, seconds: None)
    config = cuda_config(tmp_path, "decode")
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(config.to_dict()))
    out = tmp_path / "table.json"
    code = main(["profile", "tiny-llama", "--recipe", str(recipe), "--backend", "cuda", "--regime", "decode",
                 "--dtype", "bfloat16", "--batch-size", "2", "--context-length", "12", "--family", family,
                 "-o", str(out), "--no-progress"])
    assert code == 0
    assert_timed_in_regime(clock, config)
    saved = json.loads(out.read_text())
    assert saved["backend"] == "cuda"
    assert saved["regime"] == {"mode": "decode", "batch_size": 2, "context_length": 12, "dtype": "bfloat16"}
