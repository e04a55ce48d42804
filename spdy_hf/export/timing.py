"""Timing an export in its engine against the dense model exported the same way: the speedup a user serving the
model there gets, in the regime the job was pruned for.

- ONNX Runtime (`onnxruntime`): one forward pass over batch x sequence length token ids, as the prefill regime.
- llama.cpp (`llama-cpp-python`): prompt processing of sequence-length tokens (the prefill regime) and one
  generated token after a prompt of context-length tokens (the decode regime); both are measured whatever regime
  the job searched, as for the report's `speedups`.

Dense and pruned are loaded side by side and timed in turns, one call of each per round, after a warm-up call; the
median of each is kept. The token ids are drawn at random from the vocabulary: what the engines compute does not
depend on their values.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import numpy as np

from ..errors import SPDYError

logger = logging.getLogger(__name__)

ENGINES = {"onnx": "onnxruntime", "gguf": "llama.cpp"}


def in_turns(timers: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median seconds of each named timer, run in turns (one call of each per round) after one warm-up call each."""
    for timer in timers.values():
        timer()
    samples: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(repeats):
        for name, timer in timers.items():
            samples[name].append(timer())
    return {name: statistics.median(s) for name, s in samples.items()}


def time_exports(pruned: str, dense: str, regime: dict[str, Any], threads: int | None = None, repeats: int = 10
                 ) -> dict[str, Any]:
    """The pruned export's speedup over the dense export in their engine (from the files' format), in `regime` (a
    job's `regime` entry: batch_size, sequence_length, context_length). Returns the report's `engines` entry for
    one engine: engine, version, format, threads, what was timed, and per measurement dense and pruned ms with
    their ratio."""
    threads = threads or os.cpu_count() or 1
    if repeats < 1:
        raise SPDYError("The engine timing needs at least 1 repeat.")
    formats = {os.path.splitext(p)[1].lower().lstrip(".") for p in (pruned, dense)}
    if len(formats) != 1 or (fmt := formats.pop()) not in ENGINES:
        raise SPDYError(f"Timing compares two exports of one format, .onnx or .gguf; got {pruned} and {dense}.")
    measure = _time_onnx if fmt == "onnx" else _time_gguf
    timings, version = measure(pruned, dense, regime, threads, repeats)
    for name, t in timings.items():
        t["speedup"] = t["dense_ms"] / t["pruned_ms"]
        logger.info("%s, %s: dense %.2f ms, pruned %.2f ms: %.3fx.", ENGINES[fmt], name, t["dense_ms"],
                    t["pruned_ms"], t["speedup"])
    return {"engine": ENGINES[fmt], "version": version, "format": fmt, "file": os.path.basename(pruned),
            "file_mb": round(os.path.getsize(pruned) / 2**20, 1),
            "dense_file_mb": round(os.path.getsize(dense) / 2**20, 1), "threads": threads, "repeats": repeats,
            "timings": timings, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _token_ids(vocab: int, batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length), dtype=np.int64)


def _time_onnx(pruned: str, dense: str, regime: dict, threads: int, repeats: int):
    try:
        import onnxruntime as ort
    except ImportError:
        raise SPDYError("Timing an ONNX export needs ONNX Runtime: pip install onnxruntime "
                        "(or pip install \"spdy-hf[onnx]\").") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    sessions = {name: ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
                for name, path in (("dense", dense), ("pruned", pruned))}
    batch, length = int(regime.get("batch_size") or 1), int(regime.get("sequence_length") or 128)
    ids = _token_ids(1000, batch, length)  # below every tokenizer's vocabulary size

    def feeds(session) -> dict[str, np.ndarray]:
        out = {}
        for i in session.get_inputs():
            if i.name == "input_ids":
                out[i.name] = ids
            elif i.name == "attention_mask":
                out[i.name] = np.ones_like(ids)
            elif i.name == "token_type_ids":
                out[i.name] = np.zeros_like(ids)
            else:
                raise SPDYError(f"The ONNX file asks for an input {i.name!r} that the timing cannot feed.")
        return out

    inputs = {name: feeds(s) for name, s in sessions.items()}

    def timer(name: str) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            sessions[name].run(None, inputs[name])
            return time.perf_counter() - start
        return run

    seconds = in_turns({name: timer(name) for name in sessions}, repeats)
    key = f"forward {batch}x{length}"
    return {key: {"dense_ms": 1e3 * seconds["dense"], "pruned_ms": 1e3 * seconds["pruned"]}}, ort.__version__


def _time_gguf(pruned: str, dense: str, regime: dict, threads: int, repeats: int):
    try:
        import llama_cpp
    except ImportError:
        raise SPDYError("Timing a GGUF export needs llama-cpp-python: pip install llama-cpp-python (on a CPU "
                        "that advertises AMX without granting it, build it without: docs/USAGE.md).") from None
    prompt_len = int(regime.get("sequence_length") or 128)
    context = int(regime.get("context_length") or 512)
    generated = 16
    size = max(prompt_len, context) + generated + 8
    models = {name: llama_cpp.Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=size, n_batch=size,
                                    verbose=False) for name, path in (("dense", dense), ("pruned", pruned))}
    try:
        vocab = min(m.n_vocab() for m in models.values())
        prompt = _token_ids(vocab, 1, prompt_len)[0].tolist()
        history = _token_ids(vocab, 1, context, seed=1)[0].tolist()

        def prompt_timer(m) -> Callable[[], float]:
            def run() -> float:
                m.reset()
                start = time.perf_counter()
                m.eval(prompt)
                return time.perf_counter() - start
            return run

        def token_timer(m) -> Callable[[], float]:
            def run() -> float:
                m.reset()
                m.eval(history)
                start = time.perf_counter()
                for i in range(generated):
                    m.eval([history[i]])
                return (time.perf_counter() - start) / generated
            return run

        prompt_s = in_turns({name: prompt_timer(m) for name, m in models.items()}, repeats)
        token_s = in_turns({name: token_timer(m) for name, m in models.items()}, repeats)
    finally:
        for m in models.values():
            m.close()
    timings = {f"prompt {prompt_len} tokens": {"dense_ms": 1e3 * prompt_s["dense"], "pruned_ms": 1e3 * prompt_s["pruned"]},
               f"token after {context}": {"dense_ms": 1e3 * token_s["dense"], "pruned_ms": 1e3 * token_s["pruned"]}}
    return timings, getattr(llama_cpp, "__version__", "unknown")
