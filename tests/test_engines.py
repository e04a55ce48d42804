"""Exports run in the engines themselves (slow: llama-cpp-python is built from source, see
benchmarks/export_engines.py). A shrunk Llama with uneven blocks (a first block without heads, a block without FFN
neurons) in llama.cpp: its logits and tokenization are the PyTorch model's."""

from __future__ import annotations

import os

import numpy as np
import pytest
from test_export_gguf import IDS, UNEVEN, byte_bpe_tokenizer, logits, make_llama, shrink_unevenly

from spdy_hf.export.to_gguf import write_gguf

pytestmark = pytest.mark.slow


def test_llama_cpp_runs_the_uneven_export_as_pytorch_does(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    model = shrink_unevenly(make_llama(), UNEVEN)
    tokenizer = byte_bpe_tokenizer(digits=True)
    for dtype, tolerance in (("float32", 1e-3), ("float16", 2e-2)):
        path = write_gguf(model, tokenizer, str(tmp_path / f"{dtype}.gguf"), dtype=dtype)
        engine = llama_cpp.Llama(path, n_threads=1, n_ctx=64, logits_all=True, verbose=False)
        try:
            engine.eval(IDS)
            got = np.array(engine.scores[: len(IDS)])
            expected = logits(model, IDS)
            assert np.abs(got - expected).max() < tolerance * max(1.0, np.abs(expected).max())
            text = "the 2024 theme"
            assert engine.tokenize(text.encode(), add_bos=False) == tokenizer(text)["input_ids"]
        finally:
            engine.close()


def test_llama_cpp_times_a_pruned_export_against_the_dense_one(tmp_path):
    pytest.importorskip("llama_cpp")
    from spdy_hf.export.timing import time_exports

    dense = make_llama()
    tokenizer = byte_bpe_tokenizer(digits=True)
    dense_path = write_gguf(dense, tokenizer, str(tmp_path / "dense.gguf"), dtype="float16")
    pruned_path = write_gguf(shrink_unevenly(make_llama(), UNEVEN), tokenizer, str(tmp_path / "pruned.gguf"),
                             dtype="float16")
    entry = time_exports(pruned_path, dense_path, {"sequence_length": 16, "context_length": 24}, threads=1,
                         repeats=2)
    assert entry["engine"] == "llama.cpp" and entry["format"] == "gguf"
    assert set(entry["timings"]) == {"prompt 16 tokens", "token after 24"}
    for timing in entry["timings"].values():
        assert timing["dense_ms"] > 0 and timing["pruned_ms"] > 0
        assert timing["speedup"] == pytest.approx(timing["dense_ms"] / timing["pruned_ms"])
    assert os.path.getsize(pruned_path) < os.path.getsize(dense_path)
