"""What makes a 30-block job cheap must not change its results: the structured OBS solver on
shrinking matrices, consumer-only stitching with weights read from disk, candidates scored past an unchanged
prefix of blocks, and shrunk forms timed in the live model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import MODEL_FACTORIES, example_inputs, small_config
from test_structured_obs import layer

from spdy_hf.database.store import StoredTensors
from spdy_hf.database.structured_database import build_structured_database
from spdy_hf.database.structured_obs import structured_obs_levels
from spdy_hf.latency.structured import keep_counts
from spdy_hf.modeling.groups import find_structured_groups
from spdy_hf.modeling.units import find_blocks
from spdy_hf.search.run import unit_blocks
from spdy_hf.search.scoring import DistanceScorer


def reference_obs(weight, hessian, group_size, keep_counts_, damp=0.01):
    """The solver as first written: full-size matrices throughout, one group eliminated at a time."""
    from spdy_hf.database.obs import damped_inverse_cholesky

    upper = damped_inverse_cholesky(hessian, damp).to(torch.float64)
    hinv, w = upper.T @ upper, weight.to(torch.float64).clone()
    groups = w.shape[1] // group_size
    alive, removed, results = list(range(groups)), torch.zeros(groups, dtype=torch.bool), {}
    results[groups] = (list(alive), w.float().clone())
    while len(alive) > min(keep_counts_):
        blocks = hinv.reshape(groups, group_size, groups, group_size).diagonal(dim1=0, dim2=2)
        block_inv = torch.linalg.inv(blocks.permute(2, 0, 1))
        ws = w.reshape(w.shape[0], groups, group_size).permute(1, 0, 2)
        errors = ((ws @ block_inv) * ws).sum(dim=(1, 2))
        errors[removed] = float("inf")
        best = int(torch.argmin(errors))
        s = slice(best * group_size, (best + 1) * group_size)
        w -= w[:, s] @ block_inv[best] @ hinv[s, :]
        w[:, s] = 0.0
        hinv -= hinv[:, s] @ block_inv[best] @ hinv[s, :]
        hinv[s, :], hinv[:, s], hinv[s, s] = 0.0, 0.0, torch.eye(group_size, dtype=hinv.dtype)
        removed[best] = True
        alive.remove(best)
        results[len(alive)] = (list(alive), w.float().clone())
    return [results[k] for k in keep_counts_]


@pytest.mark.parametrize("group_size,groups", [(1, 96), (1, 700), (4, 8), (3, 20)])
def test_structured_obs_on_shrinking_matrices_matches_the_full_size_solver(group_size, groups):
    w, _, h = layer(groups=groups, group_size=group_size)
    keep = [groups, groups - 1, groups // 2, groups // 3, 1, 0]
    for (kept, got), (kept_ref, want) in zip(structured_obs_levels(w, h, group_size, keep),
                                             reference_obs(w, h, group_size, keep)):
        assert kept == kept_ref
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_consumer_only_stitching_gives_the_zero_filled_outputs_with_weights_on_disk(name, tmp_path):
    model = MODEL_FACTORIES[name]()
    groups = find_structured_groups(model)
    counts = [keep_counts(g, 1, 4) for g in groups]
    windows = example_inputs(8, 16)
    sdb = build_structured_database(model, groups, counts, windows, directory=tmp_path / "db", progress=False)
    assert all(isinstance(e, StoredTensors) for e in sdb.entries) and not sdb._dense  # no copy held in memory
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = example_inputs(2, 12, seed=1)
    levels = [len(c) // 2 for c in counts]
    for i, level in enumerate(levels):
        sdb.stitch(i, level)
    with torch.no_grad():
        stitched = model(**inputs)[0]
    for i, level in enumerate(levels):
        sdb.zero_producers(i, level)
        producer = dict(model.named_modules())[groups[i].producers[0]]
        rows = groups[i].producer_indices(groups[i].producers[0],
                                          [g for g in range(groups[i].num_groups) if g not in sdb.kept(i, level)])
        w = producer.weight.T if name == "gpt2" else producer.weight
        assert (w[rows] == 0).all()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs)[0], stitched)  # zeroed producers change no output
    for i in range(len(groups)):
        sdb.stitch(i, 0)
    for k, v in model.state_dict().items():  # consumers back to dense (producers stay zeroed: final form)
        if not any(k.startswith(p) for g in groups for p in g.producers):
            torch.testing.assert_close(v, dense_state[k])


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "opt"])
def test_reusing_an_unchanged_prefix_of_blocks_gives_the_same_score(name):
    """Scores past reused block outputs equal full forward passes, to the bit, and run fewer blocks."""
    model = MODEL_FACTORIES[name]()
    windows = example_inputs(4, 12)
    batches = [{k: v[i:i + 2] for k, v in windows.items()} for i in (0, 2)]
    scorer = DistanceScorer(model, batches)
    blocks = find_blocks(model)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    levels = [0] * len(blocks)
    full_runs = 0
    for _ in range(10):
        levels[int(rng.integers(len(blocks)))] = int(rng.integers(3))
        model.load_state_dict(dense)
        with torch.no_grad():
            for b, (_, block) in enumerate(blocks):
                for p in block.parameters():
                    if p.dim() == 2 and levels[b]:
                        gen = torch.Generator().manual_seed(100 * b + levels[b])
                        p.mul_(1 + 0.5 * levels[b] * torch.rand(p.shape, generator=gen))
        before = scorer.blocks_run
        reused = scorer([[lv] for lv in levels])
        used = scorer.blocks_run - before
        assert reused == scorer()
        full_runs += len(blocks) * len(batches)
        assert used <= len(blocks) * len(batches)
    assert scorer.blocks_run < 2 * full_runs  # some prefixes were reused
    assert all("forward" not in vars(block) for _, block in blocks)  # the stand-ins are gone


def test_unit_blocks_map_layers_and_groups_to_their_block():
    blocks = ["model.layers.0", "model.layers.1", "model.layers.10"]
    names = ["model.layers.1:ffn", "model.layers.10.mlp.up_proj", "model.layers.0.self_attn.q_proj", "lm_head"]
    assert unit_blocks(names, blocks) == [1, 2, 0, -1]


def test_structured_job_holds_no_copy_of_the_model(tmp_path, tokenizer):
    """The structured family keeps no dense copy of the groups, times deployed forms in place, and saves the
    zero-filled model (producers zeroed) it verified."""
    from test_structured_pruner import structured_table

    from spdy_hf import SPDYPruner

    model = MODEL_FACTORIES["llama"]()
    config = small_config(tmp_path, target_speedup=1.6, family="structured")
    modules_before = [n for n, _ in model.named_modules()]
    result = SPDYPruner(model, config, tokenizer).prune(latency_table=structured_table(model, config), progress=False)
    assert [n for n, _ in result.model.named_modules()] == modules_before  # every deployed form swapped out again
    named = dict(result.model.named_modules())
    for e in result.groups:
        removed = [g for g in range(e["num_groups"]) if g not in e["kept"]]
        for p in e["producers"]:
            group = next(g for g in find_structured_groups(result.model) if g.consumer == e["consumer"])
            assert (named[p].weight[group.producer_indices(p, removed)] == 0).all()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_bfloat16_shadow_follows_the_live_model(name):
    """Scoring in bfloat16: the copy holds every weight of the live model in bfloat16 (ties kept), picks up what
    stitching writes in place, and scores like a bfloat16 model built from the live one."""
    model = MODEL_FACTORIES[name]()
    windows = example_inputs(2, 12)
    scorer = DistanceScorer(model, [windows], dtype=torch.bfloat16)
    shadow = scorer.shadow.model
    assert all(p.dtype == torch.bfloat16 for p in shadow.parameters())
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert (shadow.get_output_embeddings().weight is shadow.get_input_embeddings().weight) == tied
    assert scorer() == pytest.approx(0.0, abs=1e-6)
    first = find_structured_groups(model)[1]
    with torch.no_grad():
        dict(model.named_modules())[first.consumer].weight.mul_(0.5)  # what stitching does: in place
    score = scorer()
    for live, low in zip(model.parameters(), shadow.parameters()):
        assert torch.equal(low, live.detach().to(torch.bfloat16))
    assert score > 0
    assert next(model.parameters()).dtype == torch.float32  # the live model is untouched


def test_a_model_lowered_for_the_search_comes_back_exactly():
    """`lowered`: bfloat16 inside (stitched writes included), every float32 weight and buffer exact afterwards."""
    from spdy_hf.search.lowered import lowered

    model = MODEL_FACTORIES["llama"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    with lowered(model, torch.bfloat16):
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.zero_()  # a candidate stitched in
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k


def test_scoring_batches_keep_a_language_models_logits_small():
    """An LM's scoring passes hold at most `LOGITS_BYTES` of float32 logits; an encoder's batch size is the user's."""
    from spdy_hf.search.run import LOGITS_BYTES, scoring_batch_size

    llama, bert = MODEL_FACTORIES["llama"](), MODEL_FACTORIES["bert"]()
    vocab = llama.config.vocab_size
    length = 128
    size = scoring_batch_size(llama, 64, length)
    assert 1 <= size < 64
    assert size * length * vocab * 4 <= LOGITS_BYTES < (size + 1) * length * vocab * 4
    assert scoring_batch_size(llama, 1, length) == 1
    assert scoring_batch_size(llama, 64, 10**9) == 1  # never below one window
    assert scoring_batch_size(bert, 64, length) == 64


def test_the_chunked_kl_score_is_the_kl_divergence():
    """The scorer's KL (float16 probabilities, in chunks of positions) against torch's KL in float64."""
    import spdy_hf.search.scoring as scoring

    model = MODEL_FACTORIES["llama"]()
    batch = example_inputs(2, 12)
    with torch.no_grad():
        dense = model(**batch).logits.double()
    scorer = DistanceScorer(model, [batch], "kl")
    with torch.no_grad():
        model.model.norm.weight.mul_(4.0)  # sharper next-token distributions: far from the dense ones
        pruned = model(**batch).logits.double()
    old = scoring.KL_CHUNK
    try:
        scoring.KL_CHUNK = 5  # several chunks, the last one short
        got = scorer()
    finally:
        scoring.KL_CHUNK = old
    p, q = dense.log_softmax(-1), pruned.log_softmax(-1)
    expected = float((p.exp() * (p - q)).sum(-1).mean())
    assert expected > 1e-4
    assert got == pytest.approx(expected, rel=2e-3, abs=1e-6)


def _resident_file_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("RssFile:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) / 1024


def test_a_loaded_structured_store_does_not_keep_its_weights_resident(tmp_path):
    """Loading a finished structured database reads every byte (the checksum) but keeps only each unit's small
    tensors: were they views of the file's memory map, every weight page read would stay resident for the job
    (SmolLM2: 1 GB more)."""
    from spdy_hf.database.store import DatabaseStore

    if _resident_file_mb() is None:
        pytest.skip("needs Linux's /proc/self/status")
    store = DatabaseStore(tmp_path / "db", {"test": 1})
    store.open()
    for u in range(4):  # 4 units of 16 MB of weights each
        tensors = {"kept.0": torch.arange(8), "weight.0": torch.randn(2048, 2048)}
        store.save_unit(f"unit{u}", tensors, torch.zeros(1, dtype=torch.float64))
    before = _resident_file_mb()
    held = [StoredTensors(store.unit_path(name), t, ("weight.",)) for name, (t, _) in store.iter_stored({f"unit{u}" for u in range(4)})]
    assert len(held) == 4 and torch.equal(held[0]["kept.0"], torch.arange(8))
    assert held[0]["weight.0"].shape == (2048, 2048)  # read from disk when asked for
    assert _resident_file_mb() - before < 24  # not the 64 MB the checksum read


def test_a_per_layer_database_holds_only_each_units_pruned_at_and_reads_level_values_from_disk(tmp_path):
    """The unstructured family's database stores about 7 weights' worth of level values per unit (SmolLM2: 2.9 GB);
    built or loaded, it holds only each unit's `pruned_at` and reads a level's values when stitched, with the same
    weights as the stored unit decoded whole."""
    from spdy_hf.database import build_obs_database, load_obs_database
    from spdy_hf.database.store import DatabaseStore, decode_level
    from spdy_hf.modeling.units import find_units

    model = MODEL_FACTORIES["bert"]()
    units = find_units(model, ["*embed*", "*pooler*"], example_inputs=example_inputs(1, 8))
    levels = [0.0, 0.5, 0.8]
    built = build_obs_database(model, units, levels, example_inputs(4, 16), directory=tmp_path / "db",
                               progress=False)
    store = DatabaseStore(tmp_path / "db", {})
    for db in (built, load_obs_database(tmp_path / "db", units, levels),
               build_obs_database(model, units, levels, example_inputs(4, 16), directory=tmp_path / "db",
                                  progress=False)):
        assert all(isinstance(e, StoredTensors) and set(e._held) == {"pruned_at"} for e in db.encoded)
        for i, unit in enumerate(units):
            whole, _ = store.load_unit(unit.name)
            for k in range(len(levels)):
                assert torch.equal(db.weight(i, k), decode_level(whole, k)), (unit.name, k)
