"""Timing an export in its engine against the dense model exported the same way (`spdy-hf export --time`), and the
measurement in a saved output's report and model card."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import MODEL_FACTORIES, small_config

from spdy_hf.errors import SPDYError
from spdy_hf.export import export_model, time_export
from spdy_hf.export.timing import in_turns, time_exports


def test_timers_run_in_turns_after_a_warm_up_and_give_medians():
    calls = []

    def timer(name, values):
        it = iter(values)

        def run():
            calls.append(name)
            return next(it)
        return run

    out = in_turns({"a": timer("a", [9.0, 1.0, 3.0, 2.0]), "b": timer("b", [9.0, 5.0, 4.0, 6.0])}, repeats=3)
    assert out == {"a": 2.0, "b": 5.0}  # the warm-up call's 9.0 is not counted
    assert calls == ["a", "b", "a", "b", "a", "b", "a", "b"]


def test_timing_needs_two_exports_of_one_engine_format(tmp_path):
    for a, b in (("a.onnx", "b.gguf"), ("a.bin", "b.bin")):
        (tmp_path / a).write_bytes(b"")
        (tmp_path / b).write_bytes(b"")
        with pytest.raises(SPDYError, match="one format"):
            time_exports(str(tmp_path / a), str(tmp_path / b), {})


def test_a_gguf_timing_without_llama_cpp_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails, as where it is not installed
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(SPDYError, match="pip install llama-cpp-python"):
        time_exports(str(tmp_path / "a.gguf"), str(tmp_path / "b.gguf"), {})


@pytest.mark.timeout(600)
def test_an_onnx_export_is_timed_against_its_base_and_recorded_in_the_output(tmp_path, tokenizer, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from test_structured_pruner import structured_table

    from spdy_hf import SPDYPruner
    from spdy_hf.cli import main
    from spdy_hf.modeling.loading import load_model_and_tokenizer

    base = tmp_path / "tiny-bert"
    MODEL_FACTORIES["bert"]().save_pretrained(base)
    tokenizer.save_pretrained(base)
    model, tok = load_model_and_tokenizer(str(base))  # so the output records its base
    config = small_config(tmp_path, target_speedup=1.6, family="structured")
    result = SPDYPruner(model, config, tok).prune(latency_table=structured_table(model, config), progress=False)
    out = result.save_pretrained(tmp_path / "out")
    exported = export_model(out, tmp_path / "pruned.onnx")

    entry = time_export(out, exported, threads=1, repeats=2)
    assert entry["engine"] == "onnxruntime" and entry["threads"] == 1 and entry["repeats"] == 2
    (what, timing), = entry["timings"].items()
    assert what == "forward 1x32"  # the regime the job was pruned for
    assert timing["speedup"] == pytest.approx(timing["dense_ms"] / timing["pruned_ms"])
    assert entry["file_mb"] <= entry["dense_file_mb"]  # the removed heads and neurons are not in the file
    report = json.loads((tmp_path / "out" / "spdy_report.json").read_text())
    assert report["engines"] == [json.loads(json.dumps(entry))]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Measured in the engines" in card and "| forward 1x32 |" in card and "onnxruntime" in card

    # the command line measures again: the entry for this engine and file type is replaced, not added
    assert main(["export", str(out), "-o", str(tmp_path / "again.onnx"), "--time", "--threads", "1",
                 "--repeats", "2"]) == 0
    assert "onnxruntime forward 1x32: dense" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "spdy_report.json").read_text())
    assert len(report["engines"]) == 1 and report["engines"][0]["file"] == "again.onnx"

    # a dense directory records no base: the baseline has to be named
    with pytest.raises(SPDYError, match="--dense"):
        time_export(str(base), exported, repeats=1)
