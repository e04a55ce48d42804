"""A score compares like with like: the pruned model is scored in the precision its dense reference ran in (the
search may run lowered to bfloat16; recovery and verify leave the model in float32), and the report's
`score_dtype` is the precision that ran, not the one asked for."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import MODEL_FACTORIES, example_inputs, handwritten_table, small_config
from test_cuda_backend import cuda_config, cuda_table

from spdy_hf import SPDYPruner
from spdy_hf.errors import SPDYError
from spdy_hf.modeling.units import find_units
from spdy_hf.search.lowered import lowered
from spdy_hf.search.scoring import DistanceScorer


def weights(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


@pytest.mark.parametrize("name", ["gpt2", "bert"])  # KL of next-token logits; 1 - cosine of hidden states
def test_a_reference_made_in_bfloat16_scores_the_float32_model_in_bfloat16(name):
    """The search's scorer makes its reference while the model is lowered; a score asked afterwards, on the float32
    model, is taken lowered again: the unpruned model scores exactly 0 (in float32 against the bfloat16 reference
    it would not), a pruned one what it scored lowered, and the float32 weights come back exactly."""
    model = MODEL_FACTORIES[name]()
    batches = [example_inputs(2, 16, seed=1)]
    with lowered(model, torch.bfloat16):
        scorer = DistanceScorer(model, batches)
    assert next(model.parameters()).dtype == torch.float32
    dense = weights(model)
    assert scorer() == 0.0
    assert scorer.dtype == torch.bfloat16
    layer = find_units(model, [])[0].module
    with torch.no_grad():
        layer.weight[:, ::2] = 0  # half the inputs of the first unit pruned
    pruned = weights(model)
    with lowered(model, torch.bfloat16):
        in_bfloat16 = scorer()
    assert in_bfloat16 > 0
    assert scorer() == in_bfloat16
    for n, t in weights(model).items():
        assert t.dtype == pruned[n].dtype and torch.equal(t, pruned[n]), n
    assert not all(torch.equal(dense[n], pruned[n]) for n in dense)


def test_a_model_that_cannot_run_in_the_reference_dtype_is_refused():
    """A reference made in float32 cannot score a float16 model (lowering only goes down from float32): an error,
    not a score of mixed precisions."""
    model = MODEL_FACTORIES["gpt2"]()
    scorer = DistanceScorer(model, [example_inputs(1, 8)])
    model.half()
    with pytest.raises(SPDYError, match="unlike precisions"):
        scorer()


def test_lowered_gives_the_dtype_that_runs():
    model = MODEL_FACTORIES["gpt2"]()
    with lowered(model, None) as running:
        assert running == torch.float32
    model.half()  # only a float32 model is lowered
    with lowered(model, torch.bfloat16) as running:
        assert running == torch.float16 and next(model.parameters()).dtype == torch.float16


def test_recovery_scores_the_profile_the_search_scored(tmp_path, tokenizer):
    """Searched in bfloat16 (`search.score_dtype`), then a recovery whose every epoch is worse than none (a
    learning rate that only hurts) keeps the unrecovered weights: the model is exactly the searched one, so recovery's score before and after, and the reported score,
    equal the search's best score. Scored in float32 against the bfloat16 reference, they differed."""
    model = MODEL_FACTORIES["gpt2"]()
    recovery = {"method": "gap", "learning_rate": 10.0, "epochs": 1, "patience": 1, "batch_size": 2}
    config = small_config(tmp_path, target_speedup=1.6, recovery=recovery,
                          search={"score_dtype": "bfloat16", "verify_corrections": 0})
    table = handwritten_table(model, find_units(model, config.skip_modules), config)
    report = SPDYPruner(model, config, tokenizer).prune(latency_table=table, progress=False).report
    assert report["search"]["score_dtype"] == "bfloat16"
    assert report["recovery"]["reverted"]  # one epoch, judged by the guard: worse, so the unrecovered weights
    searched = report["search"]["improvements"][-1][1]
    assert searched > 0
    assert report["recovery"]["before"]["calibration_score"] == searched
    assert report["recovery"]["after"]["calibration_score"] == searched
    assert report["score_dense_vs_pruned"] == searched


def test_score_dtype_reports_the_precision_that_ran(tmp_path, tokenizer, caplog):
    """A float16 model (the cuda backend's regime dtype, as the pruner leaves it on a GPU) with
    `search.score_dtype: bfloat16`: lowering applies to float32 models only, so candidates are scored in float16;
    the report says float16 and a warning names the setting (it said bfloat16)."""
    model = MODEL_FACTORIES["llama"]().half()
    config = cuda_config(tmp_path, 1.2, method="magnitude", search={"score_dtype": "bfloat16"},
                         regime={"batch_size": 1, "sequence_length": 32, "dtype": "float16"})
    table = cuda_table(model, find_units(model, config.skip_modules), config)
    with caplog.at_level(logging.WARNING, logger="spdy_hf"):
        report = SPDYPruner(model, config, tokenizer).prune(latency_table=table, progress=False).report
    assert report["search"]["score_dtype"] == "float16"
    assert any("search.score_dtype" in r.getMessage() and "float16" in r.getMessage() for r in caplog.records)
