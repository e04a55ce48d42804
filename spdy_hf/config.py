"""`SPDYConfig`: the one home of every default in spdy_hf.

The config is a tree of small dataclasses. It round-trips through plain dicts, JSON and YAML. Reading a
user's recipe (`from_dict(..., strict=True)`, the default) rejects unknown keys by name; reading a file
that spdy_hf itself saved (`strict=False`) drops them with a warning, so newer files stay readable.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import ConfigError

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------ checks of field values


def check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not supported; allowed values: {', '.join(map(repr, allowed))}.")


def check_fields(section, prefix: str) -> None:
    """Every field whose metadata names a "min" must be an integer at least that; every text field a string (a
    path object becomes its string), or null where the field allows it."""
    for f in dataclasses.fields(section):
        name, value, optional = f"{prefix}{f.name}", getattr(section, f.name), "None" in str(f.type)
        if "min" in f.metadata:
            check_int(name, value, f.metadata["min"])
        elif str(f.type) in ("str", "str | None") and isinstance(value, os.PathLike):
            setattr(section, f.name, os.fspath(value))
        elif str(f.type) in ("str", "str | None") and not (isinstance(value, str) or (value is None and optional)):
            raise ConfigError(f"{name}={value!r} must be a string{' or null' if optional else ''}.")


def check_number(name: str, value: Any, in_range: Callable[[float], bool], interval: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not in_range(value):
        hint = ""
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+[eE][+-]?\d+", value.strip()):
            # YAML 1.1, which PyYAML reads, takes 1e-4 for text: its floats need a decimal point
            hint = (f" YAML reads {value} as text, not as a number: write it with a decimal point "
                    f"({float(value):.1e}) or as a decimal ({float(value):g}).")
        raise ConfigError(f"{name}={value!r} must be a number in {interval}.{hint}")


def check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an integer >= {minimum}.")


def build_section(cls, data: dict[str, Any], strict: bool, prefix: str, sections: dict, root: type):
    """A config section (or the whole config, `root`) from a dict: unknown keys an error with `strict`, else a
    warning; nested sections built the same way."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        names = ", ".join(prefix + k for k in unknown)
        if strict:
            raise ConfigError(f"Unknown config key(s): {names}. Known keys: {', '.join(prefix + k for k in known)}.")
        logger.warning("Ignoring unknown config key(s) %s (written by another spdy_hf version?).", names)
    kwargs = {name: build_section(sections[name], value, strict, f"{prefix}{name}.", sections, root)
              if cls is root and name in sections and isinstance(value, dict) else value
              for name, value in data.items() if name in known}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a wrong type that __post_init__ did not catch
        raise ConfigError(f"Invalid config: {e}") from e


# ------------------------------------------------------------------ sections

BACKENDS = ("cpu", "cuda")
METHODS = ("obs", "magnitude")
ERROR_PRIORS = ("auto", "spdy", "measured")
PROPAGATIONS = ("auto", "pruned", "dense")
LEVEL_GRIDS = ("auto", "spdy", "2:4")
LEVEL_PATTERNS = ("2:4",)
DEFAULT_LEVELS = {"cpu": "spdy", "cuda": "2:4"}  # what levels "auto" means on each backend
DTYPES = ("float32", "float16", "bfloat16")
REGIME_MODES = ("prefill", "decode")
REGIME_LOGITS = ("last", "all")
# the regime dtypes each backend profiles in: on a CPU, float32 and bfloat16 (fast where the CPU has bfloat16
# matrix instructions, AVX512-BF16 or AMX); on NVIDIA GPUs float16 and bfloat16, the dtypes 2:4 semi-structured
# products take. A family can allow fewer (`Family.backend_dtypes`): torch.sparse CSR products on CPU run in
# float32 only.
BACKEND_DTYPES = {"cpu": ("float32", "bfloat16"), "cuda": ("float16", "bfloat16")}


@dataclass
class RegimeConfig:
    """The deployment regime the model must be fast in: what one unit of production work looks like. "prefill":
    one forward pass over batch_size x sequence_length tokens; "decode": generating one token for each of
    batch_size sequences with a key/value cache that already holds context_length tokens (causal LMs)."""

    batch_size: int = field(default=1, metadata={"min": 1, "help": "Sequences per forward pass at deployment."})
    sequence_length: int = field(default=128, metadata={"min": 1, "help": "Tokens per sequence (prefill)."})
    dtype: str = field(default="float32", metadata={"help": "Weight and activation dtype at deployment."})
    mode: str = field(default="prefill", metadata={"help": "'prefill' (one forward pass over the sequences) or "
                                                   "'decode' (one new token against a cache of context_length)."})
    context_length: int = field(default=512, metadata={"min": 1, "help": "Decode: tokens already in the cache."})
    logits: str = field(default="last", metadata={
        "help": "Prefill of a causal LM: whose logits the pass computes. 'last' (the last position's only, as "
                "`generate` does before the first new token: the time to the first token) or 'all' (every "
                "position's, as scoring text or measuring perplexity needs). Models without a language-model head "
                "ignore it."})

    def __post_init__(self):
        check_fields(self, "regime.")
        check_choice("regime.dtype", self.dtype, DTYPES)
        check_choice("regime.mode", self.mode, REGIME_MODES)
        check_choice("regime.logits", self.logits, REGIME_LOGITS)

    def to_dict(self) -> dict[str, Any]:
        """What latency tables and reports record (a prefill regime as before decode existed, with whose logits it
        computes)."""
        if self.mode == "decode":
            return {"mode": "decode", "batch_size": self.batch_size, "context_length": self.context_length,
                    "dtype": self.dtype}
        return {"batch_size": self.batch_size, "sequence_length": self.sequence_length, "dtype": self.dtype,
                "logits": self.logits}

    @property
    def tokens(self) -> int:
        """Tokens per forward pass: each layer's input rows."""
        return self.batch_size * (1 if self.mode == "decode" else self.sequence_length)


CALIBRATION_PACKINGS = ("auto", "stream", "documents")


@dataclass
class CalibrationConfig:
    """The small calibration set: it prunes (data-aware methods) and scores candidate profiles."""

    source: str = field(
        default="builtin",
        metadata={"help": "'builtin' (the offline corpus: Python standard-library docstrings and everyday English a "
                  "language model wrote, interleaved), 'docstrings' or 'written' (one of the two alone), a local "
                  "file (.txt, .json, .jsonl, .parquet, .csv) or a Hugging Face Hub dataset name."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    split: str = field(default="train", metadata={"help": "Dataset split (Hub datasets and data files)."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text (datasets and data files)."})
    num_samples: int = field(
        default=512, metadata={"min": 1, "help": "Number of calibration windows (the database's Hessians, the search's "
                               "scoring windows, recovery). More text carries over to other text better: 512 "
                               "instead of 128 added 0.01-0.03 of embedding cosine on every held-out set of MiniLM "
                               "(docs/benchmarks/transfer.md)."})
    sequence_length: int | None = field(
        default=128,
        metadata={"help": "Tokens per calibration window; null takes the model's maximum number of positions."})
    packing: str = field(default="auto", metadata={
        "help": "How text becomes windows: 'stream' (slices of the documents' running text, every window full), "
                "'documents' (one document, or one window-long slice of a longer one, per window, at its own "
                "length, padded; the padding is left out of every stage) or 'auto' (documents for encoders, which "
                "embed one text at a time; stream for causal LMs)."})
    seed: int = field(default=0, metadata={"min": 0, "help": "Seed for drawing the windows."})

    def __post_init__(self):
        check_fields(self, "calibration.")
        check_choice("calibration.packing", self.packing, CALIBRATION_PACKINGS)
        for name in ("source", "split", "text_column"):  # strings by now (`check_fields`)
            if not getattr(self, name):
                raise ConfigError(f"calibration.{name} must be a non-empty string (calibration.source: 'builtin', "
                                  "a data file or a Hub dataset name).")
        if self.sequence_length is not None:
            check_int("calibration.sequence_length", self.sequence_length, 8)


@dataclass
class EvaluationConfig:
    """Held-out quality in the report: perplexity (causal LMs) or embedding cosine, dense and pruned."""

    source: str = field(default="builtin", metadata={"help": "'builtin' (the built-in corpus's held-out split, which "
                        "calibration never sees), a local file or a Hub dataset name; 'none': not measured."})
    split: str = field(default="test", metadata={"help": "Dataset split (Hub datasets)."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    num_samples: int = field(default=16, metadata={"min": 1, "help": "Held-out windows."})
    sequence_length: int = field(default=256, metadata={"min": 8, "help": "Tokens per window (at most the model's)."})

    def __post_init__(self):
        check_fields(self, "evaluation.")


@dataclass
class DatabaseConfig:
    """How the pruning database is built and where it is kept (data-aware methods)."""

    dampening: float = field(
        default=0.01, metadata={"help": "OBS: fraction of the Hessian's mean diagonal added before inversion."})
    compensation: float = field(
        default=1.0,
        metadata={"help": "Structured OBS: the share of the optimal update that the kept weights receive when heads or "
                  "neurons are removed (1: all of it, fitted to the calibration text; lower: less of the calibration "
                  "text's statistics carried into every kept weight)."})
    fit_bias: bool = field(
        default=True,
        metadata={"help": "Structured OBS: refit the bias of each attention output / FFN down projection that has "
                  "one (BERT, GPT-2, OPT; Llama-style models have none), so that it keeps what the removed heads or "
                  "neurons gave on average (their mean moves into the bias; the kept weights are fitted to what is "
                  "left). On MiniLM at 1.5x: +0.004-0.009 embedding cosine on every held-out set."})
    block_size: int = field(default=128, metadata={"min": 1, "help": "OBS: columns per lazy batch of updates."})
    propagation: str = field(
        default="auto",
        metadata={"help": "What the next block is calibrated on: 'pruned' (outputs of the block pruned to the "
                  "anchor level, the uniform level that meets the target; per-layer databases only) or 'dense' "
                  "(outputs of the dense block); 'auto': pruned for per-layer databases, dense for structured ones."})
    batch_size: int = field(default=8, metadata={"min": 1, "help": "Calibration windows per forward pass."})
    device: str | None = field(
        default=None, metadata={"help": "Where blocks run while calibrating (e.g. 'cuda'); default the model's."})
    dir: str | None = field(
        default=None,
        metadata={"help": "Directory of the database (resumable); default <cache_dir>/database/<key>. With family "
                          "structured or mixed it holds structured/ (and unstructured/ for mixed)."})

    def propagation_for(self, database: str) -> str:
        """What a "per-layer" or "structured" database propagates, with 'auto' decided."""
        if self.propagation != "auto":
            return self.propagation
        return "pruned" if database == "per-layer" else "dense"

    def __post_init__(self):
        check_fields(self, "database.")
        check_number("database.dampening", self.dampening, lambda v: 0 < v < 1, "(0, 1)")
        self.dampening = float(self.dampening)
        check_number("database.compensation", self.compensation, lambda v: 0 <= v <= 1, "[0, 1]")
        self.compensation = float(self.compensation)
        if not isinstance(self.fit_bias, bool):
            raise ConfigError(f"database.fit_bias must be true or false, not {self.fit_bias!r}.")
        check_choice("database.propagation", self.propagation, PROPAGATIONS)
        for name in ("device", "dir"):
            if getattr(self, name) == "":
                raise ConfigError(f"database.{name} must be a non-empty string or null.")


@dataclass
class SearchConfig:
    """SPDY's local search over unit sensitivities and its dynamic program (docs/ALGORITHM.md)."""

    num_random_inits: int = field(default=100, metadata={"min": 1, "help": "Random sensitivity vectors tried first."})
    patience: int = field(
        default=100, metadata={"min": 1, "help": "Consecutive failed mutations before the neighbourhood shrinks."})
    neighbourhood_fraction: float = field(
        default=0.1, metadata={"help": "Initial share of units redrawn per mutation (rounded, at least 1)."})
    max_candidates: int | None = field(
        default=600,
        metadata={"help": "Most candidates the search tries, random starts included; each neighbourhood size then gets "
                  "at most an equal share of those left, so the search still ends on single-unit redraws. Binds "
                  "only on large models (MiniLM's 12 structured units take 220-440); on SmolLM2 the candidates "
                  "past 600 bought 2.5 % calibration score and a worse held-out perplexity (docs/benchmarks/decoder-llm.md). "
                  "null: SPDY's schedule, at least num_random_inits + patience x round(neighbourhood_fraction x "
                  "units) candidates (each improvement restarts a size's count)."})
    warm_candidates: int | None = field(
        default=None,
        metadata={"help": "In a run with several targets (`spdy-hf prune --target-speedup 1.25,1.5,2.0`), each target "
                  "after the first tries the earlier targets' best sensitivities first (SPDY's sensitivities do not "
                  "depend on the budget: the DP re-solves them for this target's). null: then the full search, as a "
                  "job for that target alone runs it. A number: only that many candidates, redrawing one unit's "
                  "sensitivity at a time from the best start, no random starts: a shorter search (on MiniLM with one "
                  "latency table, 100 candidates scored within the spread of full searches on every held-out set; "
                  "docs/benchmarks/several-targets.md)."})
    select_top: int = field(
        default=1,
        metadata={"min": 1, "help": "Staged selection: the search screens candidates on its eval_samples windows; "
                  "its best select_top distinct profiles are then scored again on select_samples calibration "
                  "windows the search never scored, and the best of them there is the result. 1: the search's best."})
    select_samples: int = field(
        default=32, metadata={"min": 1, "help": "Calibration windows the staged selection scores on (taken after "
                              "the search's eval_samples; at most what the calibration set has left)."})
    max_cut_ratio: float | None = field(
        default=1.5,
        metadata={"help": "How far the profile may stray from uniform: no search unit may lose more than this multiple "
                  "of the share of time the target removes from all of them (e.g. 2.0 at a target that cuts 30 % of "
                  "the searched time: no unit loses more than 60 % of its own). Bounds how much of a block's "
                  "heads or neurons goes: an unbounded profile empties whole units where the calibration text lets it, and "
                  "holds up worse on other text (docs/benchmarks/transfer.md). null: unbounded, as in SPDY."})
    dp_buckets: int = field(default=10_000, metadata={"min": 10, "help": "Time buckets of the dynamic program."})
    speedup_margin: float = field(
        default=0.05,
        metadata={"help": "The search aims at target * (1 + margin), as far as reachable, so that the measured speedup "
                  "still meets the target when the latency table is off by a few percent (timing noise, cache "
                  "effects); 0 aims at the target exactly."},
    )
    verify_corrections: int = field(
        default=2,
        metadata={"min": 0, "help": "When the verified speedup falls short of the target, re-aim the DP higher by the "
                  "shortfall (same sensitivities, no new search) and verify again, at most this many times."})
    verify_overshoot: float | None = field(
        default=0.05,
        metadata={"help": "When the verified speedup exceeds the target by more than this fraction, re-aim the DP "
                  "lower once, for target x (1 + speedup_margin / 2) as measured (speed beyond the target is paid in "
                  "quality); a lower profile that misses is re-aimed up, below the first, while verify_corrections "
                  "are left, else the first comes back. null: off."})
    target_tolerance: float = field(
        default=0.02,
        metadata={"help": "How far below the target (a fraction of it) a measured speedup may land and still count "
                  "as met (timing noise). A larger shortfall, after the corrections, sets target_met: false in the "
                  "report and on the model card, and `spdy-hf prune` exits with code 3."})
    eval_samples: int = field(
        default=8, metadata={"min": 1, "help": "Calibration windows used to score each candidate profile."})
    eval_batch_size: int = field(default=8, metadata={
        "min": 1, "help": "Windows per forward pass while scoring (fewer for an LM whose logits would pass 64 MB)."})
    score_dtype: str = field(
        default="auto", metadata={"help": "dtype every score of the job is taken in: 'float32'; 'bfloat16' (a float32 "
                                  "model lowered; others keep their own); 'auto': bfloat16 on a cpu float32 job "
                                  "where this CPU multiplies bfloat16 at least 1.5x faster (measured), else the model's own."})
    error_prior: str = field(
        default="auto",
        metadata={"help": "Per-level error prior of the DP: 'spdy', SPDY's reference prior ((k/(K-1))^2 over a "
                  "layer's levels; the fraction of a group removed, squared, for structured levels); 'measured', "
                  "each level's relative output error on the calibration set (method 'obs'); 'auto': measured for "
                  "the structured and mixed families with OBS, else spdy."})
    score: str = field(
        default="auto",
        metadata={"help": "Distance to the dense model that the search minimises: 'auto' (KL of next-token "
                  "distributions with an LM head, else 'cosine'), 'kl', 'cosine' (1 - cosine of each token's final "
                  "hidden state), 'embedding' (1 - cosine of each window's mean-pooled sentence embedding) or 'nmse' "
                  "(normalised MSE of the final hidden states). Recovery's output term uses the same distance."})
    seed: int = field(default=0, metadata={"min": 0, "help": "Seed of the local search."})

    def __post_init__(self):
        check_fields(self, "search.")
        check_choice("search.score", self.score, ("auto", "kl", "cosine", "embedding", "nmse"))
        check_choice("search.score_dtype", self.score_dtype, ("auto", "float32", "bfloat16"))
        check_number("search.neighbourhood_fraction", self.neighbourhood_fraction, lambda v: 0 < v <= 1, "(0, 1]")
        if self.max_candidates is not None and (isinstance(self.max_candidates, bool) or not isinstance(
                self.max_candidates, int) or self.max_candidates < self.num_random_inits):
            raise ConfigError(f"search.max_candidates={self.max_candidates!r} must be null (no bound) or an integer "
                              f">= search.num_random_inits ({self.num_random_inits}): the random starts count toward "
                              "it. Raise it with num_random_inits, or set it to null.")
        if self.warm_candidates is not None:
            check_int("search.warm_candidates", self.warm_candidates, 1)
        if self.max_cut_ratio is not None:
            check_number("search.max_cut_ratio", self.max_cut_ratio, lambda v: v >= 1, "[1, inf) or null")
        check_number("search.speedup_margin", self.speedup_margin, lambda v: 0 <= v < 1, "[0, 1)")
        check_choice("search.error_prior", self.error_prior, ERROR_PRIORS)
        check_number("search.target_tolerance", self.target_tolerance, lambda v: 0 <= v < 1, "[0, 1)")
        if self.verify_overshoot is not None:
            check_number("search.verify_overshoot", self.verify_overshoot, lambda v: v > 0, "(0, inf) or null")


@dataclass
class TimingConfig:
    """How latencies are measured: every number is a median of repeats after a warm-up."""

    warmup: int = field(default=3, metadata={"min": 0, "help": "Untimed calls before timing."})
    repeats: int = field(default=25, metadata={"min": 1, "help": "Timed calls of a layer alone (kernel benchmarks)."})
    model_repeats: int = field(default=20, metadata={"min": 1, "help": "Timed forward passes of the whole model (median)."})
    profile_rounds: int = field(
        default=3, metadata={"min": 1, "help": "Rounds of in-place unit profiling; each times every unit once at every level."})
    attempts: int = field(default=3, metadata={"min": 1, "help": "Measurements of a latency table before a "
                                                "table that fails its checks (a busy machine) stops the job."})
    verify_repeats: int = field(
        default=50, metadata={"min": 1, "help": "Interleaved dense/pruned forward-pass pairs in the final check (>= 10)."})
    check_profiles: int = field(default=3, metadata={"min": 0, "help": "Random profiles a newly measured table must "
                                                     "predict (end to end, within check_tolerance) before it is used."})
    check_tolerance: float = field(default=0.1, metadata={"help": "How far a table's predicted speedup of a random "
                                                          "profile may be from the measured one (a fraction)."})
    busy_factor: float = field(default=1.5, metadata={"help": "Verify: the dense model this many times slower than "
                                                      "when profiled means a busy machine (wait, measure again); 0: off."})
    generate_tokens: int = field(default=32, metadata={"min": 2, "help": "Decode regime: tokens each timed "
                                                       "`generate` call makes (greedy, no early stop) in verify."})

    def __post_init__(self):
        check_fields(self, "timing.")
        check_number("timing.check_tolerance", self.check_tolerance, lambda v: 0 < v < 1, "(0, 1)")
        check_number("timing.busy_factor", self.busy_factor, lambda v: v == 0 or v > 1, "{0} or (1, inf)")


@dataclass
class StructuredConfig:
    """Structured levels (`family: structured` or `mixed`): attention heads and FFN neurons kept per block."""

    head_step: int = field(
        default=1, metadata={"min": 1, "help": "Attention levels keep every head_step-th head count, down to none."})
    ffn_grid: int = field(
        default=8, metadata={"min": 1, "help": "FFN levels keep 1/ffn_grid steps of the neurons, down to none."})
    mixed_combos: int = field(
        default=8, metadata={"min": 0, "help": "Family mixed: how many of a group's sparse levels that are faster than dense "
                                     "(the least sparse first) also combine with its partial structured levels."})

    def __post_init__(self):
        check_fields(self, "structured.")


RECOVERY_METHODS = ("none", "gap", "layerwise", "auto")
RECOVERY_PRECISIONS = ("auto", "float32", "bfloat16")
RECOVERY_SCHEDULES = ("constant", "linear")
RECOVERY_TEACHERS = ("stream", "copy", "outputs")


@dataclass
class RecoveryConfig:
    """Few-sample recovery after verify (`spdy_hf.recovery.fit`): the pruned model's remaining weights
    fitted to the dense model's layer outputs on the calibration windows, every profile zero held."""

    method: str = field(default="auto", metadata={
        "help": "'gap' (global AdaPrune: the whole model at once, against the dense model: recovery.teacher), "
                "'layerwise' (block by block: one block's activations at a time), 'none', or 'auto': gap where its "
                "memory is free (the dense teacher and a pass; training the weights themselves, four times the kept weights), else "
                "layerwise for an encoder and none for a causal LM (layerwise did not help one). On SmolLM2-135M at 1.5x gap cut the perplexity on text "
                "of other domains by a quarter to a third and made greedy generation read as language, for 6 "
                "minutes of a 15-minute job peaking under 2 GiB."})
    epochs: int | None = field(default=None, metadata={
        "help": "Passes over the training windows (at most); null: 16 for an encoder (with its learning rate of 1e-4 the "
                "held-back loss of MiniLM still fell at epoch 16; docs/benchmarks/recovery.md), 1 for a causal LM (which "
                "trains on every calibration window once: on SmolLM2-135M 448 windows seen once recovered better on every "
                "held-out set than 112 windows seen four times, in the same number of steps; docs/benchmarks/transfer.md)."})
    learning_rate: float | None = field(default=None, metadata={
        "help": "Adam's learning rate; null: for gap 3e-4 when the job's score is KL (causal LMs: the best measured on "
                "SmolLM2-135M) and 1e-4 otherwise (encoders: on MiniLM, over 16 epochs, better on every other-domain "
                "set than 3e-5 over 8 at 1.5x and 2x; 2e-4 and 3e-4 overfit), 1e-4 for layerwise; "
                "with a rank (recovery.rank, 16 for a causal LM by default), 1e-3 for a causal LM and 1e-4 "
                "otherwise."})
    schedule: str = field(default="constant", metadata={
        "help": "The learning rate over training: 'constant', or 'linear' (from recovery.learning_rate down to zero "
                "at the last step recovery.epochs allow). Constant recovered better on both models measured: "
                "MiniLM at 1.5x and 2x (worst other-domain cosine 0.830 against 0.826, 0.692 against 0.686) and "
                "SmolLM2-135M at 1.5x (worst perplexity ratio 4.74 against 5.15; docs/benchmarks/recovery.md)."})
    batch_size: int = field(default=8, metadata={"min": 1, "help": "Windows per optimizer step."})
    micro_batch_size: int | None = field(default=None, metadata={
        "help": "gap only: windows per forward and backward pass; the gradients of batch_size / micro_batch_size "
                "passes make one step, so the activations held are those of this many windows (each pass's "
                "objective is normalized on its own windows). null: 1 for a causal LM (long, full windows: its "
                "job's peak is then under 3 GiB for SmolLM2-135M), the whole batch in one pass for an encoder "
                "(short documents, whose objective is best normalized over the batch)."})
    num_samples: int | None = field(default=None, metadata={
        "help": "Calibration windows used (the first ones; a number above the calibration set's takes all of it); "
                "null: by the kind of model, all of them for a causal LM and the first 128 for an encoder (on MiniLM "
                "as good on other domains' text as 512 windows, in a quarter to half the time; "
                "docs/benchmarks/transfer.md)."})
    holdout: float = field(default=0.125, metadata={
        "help": "Share of those windows held back for early stopping (never trained on)."})
    patience: int = field(default=3, metadata={"min": 1, "help": "Epochs without a better held-back loss before "
                                                                  "stopping; the best epoch's weights are kept (3: on "
                                                                  "MiniLM's 16 held-back windows 2 stopped a still "
                                                                  "improving recovery early)."})
    output_weight: float | None = field(default=None, metadata={
        "help": "gap only: weight of the job's score on the final output (KL for LMs, cosine distance otherwise) "
                "added to the layer loss; 0: layer outputs only, as the reference gAP. null: 1000 for a causal LM "
                "(on SmolLM2-135M at 1.5x the output KL all but alone recovered better than 100 or 10 on every "
                "held-out set of other domains), 10 for an encoder (the best measured on MiniLM; 100 changed nothing "
                "there)."})
    rank: int | None = field(default=None, metadata={
        "help": "gap only: train updates of this rank of each kept linear weight of the pruned blocks (with their "
                "norms and biases) instead of the weights themselves, and add them in once at the end: no gradient, "
                "Adam moment or float32 copy of the model's weights is held, so recovery's memory is the dense "
                "teacher and one pass. A layer holding zeros of a sparse level is trained whole. 0: the weights "
                "themselves. null: 16 for a causal LM (on one pruned SmolLM2-135M at 1.5x within 5 % of training the "
                "weights on text of other domains, either way; docs/benchmarks/scaling.md), 0 for an encoder."})

    teacher: str = field(default="stream", metadata={
        "help": "gap only: what the pruned model is fitted to, and how the dense model is held. 'stream': the dense "
                "model (every pruned layer's output and the final output), its pruned blocks read from the snapshot "
                "on disk one at a time in every pass, so one block's dense weights are in memory at once; 'copy': "
                "the same dense model with its pruned blocks held in memory beside the pruned model (no reading, "
                "their size more memory); 'outputs' (causal LMs): the hidden states the "
                "dense model gives its head, computed once for every window and kept (for 512 windows of 128 tokens "
                "of a 2,048-wide model, 268 MB in bfloat16), the objective the output KL alone: no second model in "
                "memory."})

    checkpoint: bool = field(default=False, metadata={
        "help": "gap only: recompute each block's forward pass during the backward pass instead of holding what it "
                "saved (activations, and the half-precision casts of the weights under autocast) for the whole "
                "model (torch.utils.checkpoint): one block's at a time, for about a third more compute. The "
                "gradients are the same."})

    precision: str = field(default="auto", metadata={
        "help": "Forward passes of recovery: 'bfloat16' (torch.autocast; the weights, gradients and Adam's state "
                "stay float32, the losses are taken in float32), 'float32', or 'auto' (bfloat16 on a GPU that "
                "supports it and on a CPU with bfloat16 matrix instructions, AVX512-BF16 or AMX; float32 on other "
                "CPUs)."})

    def __post_init__(self):
        check_fields(self, "recovery.")
        check_choice("recovery.method", self.method, RECOVERY_METHODS)
        if self.micro_batch_size is not None:
            check_int("recovery.micro_batch_size", self.micro_batch_size, 1)
        check_choice("recovery.precision", self.precision, RECOVERY_PRECISIONS)
        check_choice("recovery.schedule", self.schedule, RECOVERY_SCHEDULES)
        if self.epochs is not None:
            check_int("recovery.epochs", self.epochs, 1)
        if self.learning_rate is not None:
            check_number("recovery.learning_rate", self.learning_rate, lambda x: x > 0, "(0, inf)")
        check_number("recovery.holdout", self.holdout, lambda x: 0 < x < 1, "(0, 1)")
        if self.output_weight is not None:
            check_number("recovery.output_weight", self.output_weight, lambda x: x >= 0, "[0, inf)")
        if self.num_samples is not None:
            check_int("recovery.num_samples", self.num_samples, 2)
        check_choice("recovery.teacher", self.teacher, RECOVERY_TEACHERS)
        if self.teacher == "outputs" and self.method == "layerwise":
            raise ConfigError("recovery.teacher: outputs is gap's (layerwise reads the dense weights a block at a "
                              "time already); use method gap or auto, or teacher copy.")
        if self.teacher == "outputs" and self.output_weight == 0:
            raise ConfigError("recovery.teacher: outputs fits the output alone; recovery.output_weight must not be 0.")
        if not isinstance(self.checkpoint, bool):
            raise ConfigError(f"recovery.checkpoint={self.checkpoint!r} must be true or false.")
        if self.rank is not None:
            check_int("recovery.rank", self.rank, 0)
            if self.rank and self.method == "layerwise":
                raise ConfigError("recovery.rank trains low-rank updates in gap; recovery.method: layerwise holds "
                                  "one block's training state already. Use method gap or auto, or leave rank null.")

    def epochs_for(self, kind: str | None = None) -> int:
        """The epochs for a job scored by `kind` ('kl' for causal LMs): `epochs`, else 1 for a causal LM, 16
        otherwise."""
        if self.epochs is not None:
            return int(self.epochs)
        return 1 if kind == "kl" else 16

    def samples_for(self, kind: str | None = None) -> int | None:
        """The calibration windows recovery uses for a job scored by `kind` ('kl' for causal LMs): `num_samples`,
        else all of them (None) for a causal LM and 128 otherwise."""
        if self.num_samples is not None:
            return int(self.num_samples)
        return None if kind == "kl" else 128

    def output_weight_for(self, kind: str | None = None) -> float:
        """The output term's weight for a job scored by `kind` ('kl' for causal LMs): `output_weight`, else 1000 for a
        causal LM and 10 otherwise."""
        if self.output_weight is not None:
            return float(self.output_weight)
        return 1000.0 if kind == "kl" else 10.0

    def rank_for(self, kind: str | None = None) -> int:
        """The rank of gap's updates for a job scored by `kind` ('kl' for causal LMs): `rank`, else 16 for a causal
        LM and 0 (the weights themselves) otherwise."""
        if self.rank is not None:
            return int(self.rank)
        return 16 if kind == "kl" else 0

    def micro_batch_for(self, kind: str | None = None) -> int | None:
        """Windows per pass for a job scored by `kind` ('kl' for causal LMs): `micro_batch_size`, else 1 for a
        causal LM and None (the whole batch) otherwise."""
        if self.micro_batch_size is not None:
            return int(self.micro_batch_size)
        return 1 if kind == "kl" else None

    def lr(self, method: str, kind: str | None = None) -> float:
        """The learning rate for `method` ('gap' or 'layerwise') in a job scored by `kind` ('kl' for causal LMs)."""
        if self.learning_rate is not None:
            return float(self.learning_rate)
        if method != "gap":
            return 1e-4
        if self.rank_for(kind):  # a step of the factors moves a weight about a third as far as gap's own step (an
            # encoder's updates are not measured above 1e-4)
            return 1e-3 if kind == "kl" else 1e-4
        return 3e-4 if kind == "kl" else 1e-4


@dataclass
class GradualConfig:
    """Gradual pruning with `transformers.Trainer` toward the profile (`SPDYPruningCallback.from_config`)."""

    start_step: int = field(default=0, metadata={"min": 0, "help": "Optimizer step the cubic sparsity ramp starts at."})
    end_step: int | None = field(
        default=None, metadata={"help": "Step the ramp ends at; null: two thirds of the training steps."})
    update_every: int = field(default=10, metadata={"min": 1, "help": "Optimizer steps between mask updates in the ramp."})

    def __post_init__(self):
        check_fields(self, "gradual.")
        if self.end_step is not None:
            check_int("gradual.end_step", self.end_step, self.start_step + 1)


DEFAULT_SKIP_MODULES = ("*embed*", "*lm_head*", "*pooler*", "*classifier*", "*score*")


@dataclass
class SPDYConfig:
    """Everything that defines a speedup-targeted pruning job; each field's `help` metadata says what it does.

    The main ones: `target_speedup` (end to end, over the dense model), `backend` (`"cpu"`: dense vs `torch.sparse`
    CSR; `"cuda"`: dense vs 2:4 on an NVIDIA GPU), `regime` (batch size, sequence length, dtype), `family`
    (`"structured"`: heads and FFN neurons removed, the default; `"mixed"`: those or the backend's sparse `levels`
    per block, or both; `"unstructured"`: every linear layer its own unit at `levels`), `levels` (`"auto"`: the
    backend's, `"spdy"` on cpu (dense + 41 sparsities from 0.40 to 0.99), `"2:4"` on cuda; or a list of
    sparsities and patterns), `method` (`"obs"`, SparseGPT-style from calibration data, or `"magnitude"`), and the
    sections `calibration`, `evaluation`, `database`, `search`, `timing`, `structured`,
    `recovery` and `gradual`.
    """

    target_speedup: float = field(default=1.5, metadata={"help": "End-to-end speedup to reach (> 1)."})
    backend: str = field(default="cpu", metadata={"help": "Target backend."})
    regime: RegimeConfig = field(default_factory=RegimeConfig)
    levels: str | list[float | str] = field(
        default="auto", metadata={"help": "'auto', 'spdy', '2:4', or a list of sparsities and patterns ('2:4')."})
    family: str = field(
        default="structured", metadata={"help": "Level families: 'structured', 'mixed' or 'unstructured'."})
    structured: StructuredConfig = field(default_factory=StructuredConfig)
    method: str = field(default="obs", metadata={"help": "Pruning method of the database: 'obs' or 'magnitude'."})
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    timing: TimingConfig = field(default_factory=TimingConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    gradual: GradualConfig = field(default_factory=GradualConfig)
    skip_modules: list[str] = field(default_factory=lambda: list(DEFAULT_SKIP_MODULES))
    latency_table: str | None = field(default=None, metadata={"help": "Path of a latency table to reuse."})
    cache_dir: str | None = field(default=None, metadata={"help": "Latency table cache directory."})

    def __post_init__(self):
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _from_dict(cls, value, strict=True, prefix=f"{name}."))
            elif not isinstance(value, cls):
                raise ConfigError(f"{name} must be a {cls.__name__} or a dict, got {type(value).__name__}.")
        check_fields(self, "")
        if isinstance(self.target_speedup, bool) or not isinstance(self.target_speedup, (int, float)):
            raise ConfigError(f"target_speedup={self.target_speedup!r} must be a number greater than 1.")
        if not self.target_speedup > 1.0:
            raise ConfigError(
                f"target_speedup={self.target_speedup!r} is meaningless: it must be greater than 1 "
                "(1.5 asks for a model 1.5 times faster than the dense one)."
            )
        self.target_speedup = float(self.target_speedup)
        check_choice("backend", self.backend, BACKENDS)
        if self.regime.dtype not in BACKEND_DTYPES[self.backend]:
            raise ConfigError(
                f"regime.dtype={self.regime.dtype!r} is not supported by backend {self.backend!r}; "
                f"allowed values: {', '.join(map(repr, BACKEND_DTYPES[self.backend]))}."
            )
        check_choice("method", self.method, METHODS)
        if not isinstance(self.family, str) or not self.family:
            raise ConfigError(f"family={self.family!r} must be the name of a level family, such as 'structured'.")
        if self.search.error_prior == "measured" and self.method != "obs":
            raise ConfigError("search.error_prior='measured' needs method='obs': magnitude pruning measures no errors.")
        if self.database.propagation == "pruned" and self.family != "unstructured":
            raise ConfigError(f"database.propagation='pruned' is not available with family {self.family!r}: the "
                              "structured database calibrates every block on the dense model's outputs. Use 'auto' "
                              "(pruned for the per-layer database, dense for the structured one) or 'dense'.")
        if isinstance(self.levels, str):
            check_choice("levels", self.levels, LEVEL_GRIDS)
            if self.levels == "auto":
                self.levels = DEFAULT_LEVELS[self.backend]
        elif isinstance(self.levels, (list, tuple)) and self.levels:
            numbers = [x for x in self.levels if not isinstance(x, str)]
            patterns = [x for x in self.levels if isinstance(x, str)]
            if any(p not in LEVEL_PATTERNS for p in patterns) or \
                    not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in numbers):
                raise ConfigError(f"levels={self.levels!r}: every level must be a sparsity in (0, 1) or one of "
                                  f"{', '.join(map(repr, LEVEL_PATTERNS))}.")
            numbers = [float(x) for x in numbers]
            if any(not 0.0 < x < 1.0 for x in numbers) or len(set(numbers)) != len(numbers) \
                    or len(set(patterns)) != len(patterns):
                raise ConfigError(f"levels={self.levels!r}: every sparsity must be distinct and in (0, 1).")
            self.levels = sorted(numbers) + patterns
        else:
            raise ConfigError(f"levels={self.levels!r} must be 'auto', 'spdy', '2:4' or a non-empty list of "
                              "sparsities in (0, 1).")
        if self.backend == "cuda":
            from .modeling.levels import get_patterns

            other = sorted({p for p in get_patterns(self.levels)[1:] if p != "2:4"})
            if other:
                raise ConfigError(f"levels={self.levels!r}: the cuda backend runs dense and 2:4 levels only "
                                  "(use levels: '2:4').")
        if isinstance(self.skip_modules, str) or not all(isinstance(p, str) for p in self.skip_modules):
            raise ConfigError("skip_modules must be a list of glob patterns of module names.")
        self.skip_modules = list(self.skip_modules)

    def resolved_error_prior(self) -> str:
        """`search.error_prior` with 'auto' decided: measured errors for the structured and mixed families with OBS
        (their levels have no common index), SPDY's reference prior otherwise."""
        if self.search.error_prior != "auto":
            return self.search.error_prior
        return "measured" if self.family != "unstructured" and self.method == "obs" else "spdy"

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], strict: bool = True) -> SPDYConfig:
        """Builds a config from a dict. With `strict`, unknown keys are an error; otherwise a warning."""
        if not isinstance(data, dict):
            raise ConfigError(f"A config must be a mapping of fields, got {type(data).__name__}.")
        return _from_dict(cls, data, strict=strict, prefix="")

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def to_yaml_string(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the config as YAML (`.yaml`/`.yml`) or JSON (anything else), atomically."""
        from .utils.io import atomic_write_text

        path = os.fspath(path)
        text = self.to_yaml_string() if path.endswith((".yaml", ".yml")) else self.to_json_string()
        atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | os.PathLike, strict: bool = True) -> SPDYConfig:
        """Reads a YAML or JSON config (a recipe). YAML is read with `yaml.safe_load`."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ConfigError(f"Config file {path!r} does not exist.")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"Config file {path!r} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: {e}") from e
        return cls.from_dict(data or {}, strict=strict)


_SECTIONS = {"structured": StructuredConfig, "regime": RegimeConfig, "calibration": CalibrationConfig,
             "evaluation": EvaluationConfig, "database": DatabaseConfig, "search": SearchConfig, "timing": TimingConfig,
             "recovery": RecoveryConfig, "gradual": GradualConfig}


def _from_dict(cls, data: dict[str, Any], strict: bool, prefix: str):
    return build_section(cls, data, strict, prefix, _SECTIONS, SPDYConfig)
