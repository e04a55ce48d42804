"""The promise itself on real timings: a model whose structured levels reach far more speed than a modest target asks
is profiled on this CPU, pruned, verified, and meets the target as measured (`target_met: true`). The test then times
the saved model, loaded as a user loads it, against the dense one on its own, interleaved, and finds the speedup.

The model is sized so that its FFN matrix products dominate a forward pass (removing every neuron would make it
about 10x faster), and the target, 1.3x, is far inside that reach: a busy 2-core machine blurs the table by tens of
percent, not by that factor, and verify's corrections absorb what is left. Timed on one torch thread (two threads
on two shared cores time erratically); the random-profile check is off as in every `small_config` job (the
constant check stays), and so is verify's busy-machine wait (`timing.busy_factor: 0`): what is asserted is the
measured ratio of the two models, timed interleaved, which a steady load slows alike. About 10 s alone, a minute
under a heavy load."""

from __future__ import annotations

import json
import time

import pytest
import torch
from conftest import VOCAB, example_inputs, small_config

from spdy_hf import SPDYPruner
from spdy_hf.output.load import load_pretrained

TARGET = 1.3


def ffn_heavy_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=4096,
                        vocab_size=VOCAB, max_position_embeddings=128)
    return BertModel(config).eval()


def interleaved_ratio(dense, pruned, inputs, pairs: int = 15) -> float:
    """Median dense time over median pruned time, the two timed in alternation (a load that comes and goes slows
    both alike)."""
    dense_ms, pruned_ms = [], []
    with torch.inference_mode():
        for model in (dense, pruned):  # warm-up
            model(**inputs)
        for _ in range(pairs):
            for model, times in ((dense, dense_ms), (pruned, pruned_ms)):
                start = time.perf_counter()
                model(**inputs)
                times.append(time.perf_counter() - start)
    return sorted(dense_ms)[pairs // 2] / sorted(pruned_ms)[pairs // 2]


@pytest.mark.timeout(240)
def test_a_reachable_target_is_met_as_measured(tmp_path, tokenizer, one_thread):
    model = ffn_heavy_bert()
    config = small_config(tmp_path, target_speedup=TARGET, family="structured", method="magnitude",
                          regime={"sequence_length": 128},
                          timing={"busy_factor": 0, "model_repeats": 5, "verify_repeats": 15})
    result = SPDYPruner(model, config, tokenizer).prune(progress=False)
    report = result.report
    tolerance = config.search.target_tolerance
    why = {k: report.get(k) for k in ("predicted_speedup", "measured_speedup", "max_reachable_speedup",
                                      "verify_corrections", "stage_seconds")}
    # the premise: the target is far inside the reach (~10x as a quiet machine measures it, 2.5x under a heavy load)
    assert report["max_reachable_speedup"] > 1.5 * TARGET, why
    assert report["predicted_speedup"] >= TARGET, why
    assert report["measured_speedup"] == pytest.approx(report["dense_time_ms"] / report["pruned_time_ms"])
    assert report["measured_speedup"] >= TARGET * (1 - tolerance), why
    assert report["target_met"] is True and report["verify_busy"] is None, why

    # the saved model, loaded as a user loads it (heads and neurons cut out), is that much faster, timed here
    result.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "spdy_report.json").read_text())["target_met"] is True
    pruned, _, _ = load_pretrained(str(tmp_path / "out"))
    inputs = example_inputs(1, 128)
    ratio = interleaved_ratio(ffn_heavy_bert(), pruned.eval(), inputs)
    assert ratio >= TARGET * (1 - 0.1), f"measured {ratio:.3f}x here, {report['measured_speedup']:.3f}x by the report"
