"""A job spread over processes: the search scoring several candidates at once takes the one-at-a-time search's steps,
the units are shared out by cost, and `accelerate launch --num_processes 2` writes the bytes one process writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import handwritten_table, make_llama, small_config

from spdy_hf.errors import SPDYError
from spdy_hf.modeling.units import find_units
from spdy_hf.search.scoring import DistanceScorer
from spdy_hf.search.spdy import SearchResult, spdy_search
from spdy_hf.utils.processes import Processes, process_backend


def noisy_score(profile: np.ndarray) -> float:
    """A deterministic score with many local minima: the search improves often and late."""
    rng = np.random.default_rng(abs(hash(tuple(int(k) for k in profile))) % 2**32)
    return float(np.sum((profile / 4.0) ** 2 * np.linspace(1, 3, len(profile)))) + 2.0 * rng.random()


def search(width: int, batches: list[int], **kwargs) -> SearchResult:
    def evaluate_many(profiles):
        batches.append(len(profiles))
        return [noisy_score(p) for p in profiles]

    rng = np.random.default_rng(1)
    times = np.sort(rng.uniform(0.1, 1.0, size=(20, 8)), axis=1)[:, ::-1].copy()
    times[:, 0] = 1.2
    return spdy_search(noisy_score, times, 0.6 * times[:, 0].sum(), buckets=400, progress=False, width=width,
                       evaluate_many=evaluate_many if width > 1 else None, **kwargs)


@pytest.mark.parametrize("width", [2, 3, 5])
@pytest.mark.parametrize("setting", [
    {"num_random_inits": 8, "patience": 10, "seed": 0},
    {"num_random_inits": 6, "patience": 5, "seed": 4, "max_candidates": 30, "keep_top": 4},
    {"num_random_inits": 6, "patience": 4, "seed": 2, "starts": [np.full(20, 0.5), np.linspace(0, 1, 20)],
     "subsets": {"light": np.tile(np.arange(8) < 4, (20, 1))}},
])
def test_scoring_several_candidates_at_once_takes_the_same_steps(width, setting):
    one_batches, batches = [], []
    alone = search(1, one_batches, **setting)
    spread = search(width, batches, **setting)
    for name in ("profile", "sensitivities", "score", "candidates", "evaluations", "history", "cut_short",
                 "schedule", "subset", "started_from"):
        a, b = getattr(alone, name), getattr(spread, name)
        assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b, name
    assert [(p.tolist(), c.tolist(), s) for p, c, s in alone.top] == \
           [(p.tolist(), c.tolist(), s) for p, c, s in spread.top]
    # the candidates really were scored side by side, never more at once than the width
    assert max(batches) <= width and len(batches) < spread.evaluations
    assert sum(batches) == spread.evaluations + spread.unused_scores
    assert alone.unused_scores == 0


def test_units_go_to_the_least_loaded_process_costliest_first():
    processes = Processes(rank=1, size=2)
    assert processes.owners([1.0, 8.0, 3.0, 3.0]) == [1, 0, 1, 1]  # 8 | 3 + 3 + 1
    # the loads carry over: the next call evens them out (process 0 holds 8, process 1 holds 7)
    assert processes.owners([2.0, 1.0]) == [1, 0]
    assert processes._loads == [9.0, 9.0]
    assert Processes().owners([5.0, 1.0]) == [0, 0]


def test_a_job_alone_needs_no_process_group():
    processes = Processes()
    assert processes.is_main and not processes.spread
    assert processes.map(lambda x: x * 2, [1, 2, 3]) == [2, 4, 6]
    assert processes.share("table") == "table" and processes.gather(7) == [7]
    assert processes.on_main(lambda: 5) == 5
    with pytest.raises(SPDYError, match="boom"):
        processes.on_main(lambda: (_ for _ in ()).throw(SPDYError("boom")))
    with processes.timing():
        pass
    assert process_backend(cuda=False) == "gloo"
    if not torch.cuda.is_available():
        assert process_backend(cuda=True) == "gloo"  # no GPU here: the CPU's backend alone


def test_staged_selection_judges_against_the_dense_model():
    """The search leaves the last candidate stitched; the judge of a staged selection must record the dense model's
    outputs, not that candidate's."""
    from spdy_hf.search.run import select_on_unseen

    model = make_llama()
    layer = model.model.layers[0].mlp.down_proj
    dense = layer.weight.detach().clone()

    @torch.no_grad()
    def stitch(profile):  # level k scales one layer by 1 - k / 4
        layer.weight.copy_(dense * (1 - int(profile[0]) / 4))

    windows = {"input_ids": torch.randint(0, 1000, (6, 16)), "attention_mask": torch.ones(6, 16, dtype=torch.long)}
    unseen = {k: v[2:] for k, v in windows.items()}
    reference = DistanceScorer(model, [unseen], "kl")  # made on the dense model
    expected = []
    for level in (1, 2):
        stitch(np.array([level]))
        expected.append(reference())
    stitch(np.array([3]))  # where a search could have left the model
    result = SearchResult(profile=np.array([1]), sensitivities=np.zeros(1), score=0.1, candidates=3, evaluations=3,
                          top=[(np.array([1]), np.zeros(1), 0.1), (np.array([2]), np.zeros(1), 0.2)])
    chosen = select_on_unseen(result, model, windows, stitch, skip=2, samples=4, batch_size=4, kind="kl")
    assert [u for u, _ in chosen.selection] == pytest.approx(expected, rel=1e-6)
    assert chosen.profile.tolist() == [1]  # the smaller change is the closer to the dense model


# ---------------------------------------------------------------------------------------------- accelerate launch
def _llama_dir(tmp_path, tokenizer, family: str):
    from test_structured_pruner import structured_table
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=make_llama().config.vocab_size, max_position_embeddings=128, bos_token_id=101, eos_token_id=102,
        pad_token_id=0)).eval()
    model_dir = tmp_path / "llama"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    config = small_config(tmp_path, target_speedup=1.4, family=family, recovery={"method": "gap", "epochs": 2},
                          search={"num_random_inits": 6, "patience": 6, "verify_corrections": 0, "select_top": 3,
                                  "select_samples": 4},
                          calibration={"num_samples": 12, "sequence_length": 32})
    table = tmp_path / "table.json"
    if family == "structured":
        structured_table(model, config).save(table)
    else:
        handwritten_table(model, find_units(model, config.skip_modules), config).save(table)
    data = config.to_dict()
    data.pop("cache_dir", None)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    return model_dir, table, recipe


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", ["structured", "unstructured"])
def test_accelerate_launch_with_two_processes_writes_what_one_process_writes(family, tmp_path, tokenizer):
    """Two CPU processes (one thread each) share the database and the search; the main process recovers and writes.
    Its weights and profile are bit-identical to a one-thread job's."""
    model_dir, table, recipe = _llama_dir(tmp_path, tokenizer, family)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("WORLD_SIZE", None)
    outputs = {}
    for processes in (1, 2):
        out = tmp_path / f"out{processes}"
        job = ["spdy_hf", "prune", str(model_dir), "--recipe", str(recipe), "--latency-table", str(table),
               "--database-dir", str(tmp_path / f"db{processes}"), "-o", str(out), "--no-progress",
               "--allow-shortfall"]
        if processes == 1:
            command = [sys.executable, "-m", *job]
        else:
            command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                       "--num_cpu_threads_per_process", "1", "--num_machines", "1", "--mixed_precision", "no",
                       "--dynamo_backend", "no", "--main_process_port", str(29500 + os.getpid() % 1000), "-m", *job]
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240,
                              cwd=str(tmp_path))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert proc.stdout.count("Pruned model written to") == 1  # the main process alone writes
        outputs[processes] = (out, proc)
    (one, _), (two, spread) = outputs[1], outputs[2]
    assert "by the job's other processes" in spread.stderr  # the units were shared out
    assert (one / "model.safetensors").read_bytes() == (two / "model.safetensors").read_bytes()
    assert (one / "spdy_profile.json").read_text() == (two / "spdy_profile.json").read_text()
    a, b = (json.loads((d / "spdy_report.json").read_text()) for d in (one, two))
    assert b["search"]["processes"] == 2 and "processes" not in a["search"]
    for key in ("candidates", "evaluations", "improvements", "selection", "schedule"):
        assert a["search"][key] == b["search"][key], key
    assert a["score_dense_vs_pruned"] == b["score_dense_vs_pruned"]
    assert a["recovery"]["method"] == b["recovery"]["method"] == "gap"


def test_a_launched_gpu_job_takes_nccl_beside_gloo_and_the_gpu_of_its_local_rank(monkeypatch):
    """No GPU here: torch.distributed and CUDA faked, the process group a launcher's environment asks for."""
    import torch.distributed as dist

    from spdy_hf.utils import processes as module

    made, devices = {}, []
    monkeypatch.setattr(module, "_CURRENT", None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: "backend" in made)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: made.update(backend=backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_backend", lambda: made["backend"])
    processes = module.current_processes(cuda=True)
    assert made["backend"] == "cpu:gloo,cuda:nccl" and devices == [1]
    assert (processes.rank, processes.size, processes.is_main, processes.spread) == (1, 2, False, True)
    assert module.current_processes() is processes  # made once


def test_a_launcher_without_its_address_is_a_clear_error(monkeypatch):
    from spdy_hf.utils import processes as module

    monkeypatch.setattr(module, "_CURRENT", None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(SPDYError, match="accelerate launch"):
        module.current_processes()
