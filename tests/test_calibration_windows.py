"""Token windows passed to `prune(calibration=...)`: more than calibration.num_samples are not dropped silently."""

import logging

import torch
from conftest import make_llama

from spdy_hf import SPDYConfig, SPDYPruner


def _windows(n: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 1000, (n, 16), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids}


def test_more_windows_than_num_samples_warns_naming_the_setting(caplog):
    config = SPDYConfig.from_dict({"calibration": {"num_samples": 4}})
    pruner = SPDYPruner(make_llama(), config)
    with caplog.at_level(logging.WARNING, logger="spdy_hf.pruner"):
        windows = pruner.calibration_windows(_windows(10))
    assert windows["input_ids"].shape[0] == 10  # recovery and scoring still see every window
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("calibration.num_samples=4" in m and "10 calibration windows" in m for m in messages), messages


def test_windows_within_num_samples_do_not_warn(caplog):
    config = SPDYConfig.from_dict({"calibration": {"num_samples": 16}})
    pruner = SPDYPruner(make_llama(), config)
    with caplog.at_level(logging.WARNING, logger="spdy_hf.pruner"):
        pruner.calibration_windows(_windows(10))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_split_asked_of_a_local_calibration_file_is_named(tmp_path, tokenizer, caplog):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"Document {i} talks about pruning models for speed." for i in range(200)))
    config = SPDYConfig.from_dict({"calibration": {"source": str(path), "split": "train[:10]", "num_samples": 2,
                                                   "sequence_length": 16}})
    pruner = SPDYPruner(make_llama(), config, tokenizer=tokenizer)
    with caplog.at_level(logging.WARNING, logger="spdy_hf.calibration.text"):
        pruner.calibration_windows(None)
    assert "calibration.split='train[:10]' is ignored" in caplog.text


def test_document_windows_hold_one_document_each_at_its_own_length(tokenizer):
    from spdy_hf.calibration.text import document_windows

    short = "the cat sat on the mat and looked at the door"  # about a dozen tokens
    long = " ".join(["alpha"] * 50)  # 50 tokens: two full slices of 22, and a last one of 6 that is too short
    texts = [short, long, "too short", short.upper()]
    windows = document_windows(tokenizer, texts, 4, 24, seed=0, min_tokens=8)
    ids, mask = windows["input_ids"], windows["attention_mask"]
    assert ids.shape == mask.shape == (4, 24)
    assert int((mask.sum(1) == 24).sum()) == 2  # the long document's two full slices
    lengths = mask.sum(1)
    assert torch.all(mask[:, 1:] <= mask[:, :-1])  # real tokens first
    assert len(set(lengths.tolist())) > 1  # documents keep their lengths: not every window is full
    n_short = len(tokenizer(short, add_special_tokens=False)["input_ids"]) + 2
    assert n_short in lengths.tolist()
    for row, n in zip(ids, lengths):
        assert row[0] == tokenizer.cls_token_id and row[n - 1] == tokenizer.sep_token_id
        assert torch.all(row[n:] == tokenizer.pad_token_id)
    # a piece under min_tokens is never drawn: "too short" is 2 tokens
    assert all(int(n) - 2 >= 8 for n in lengths)
    again = document_windows(tokenizer, texts, 4, 24, seed=0, min_tokens=8)
    assert torch.equal(again["input_ids"], ids)


def test_document_windows_name_what_to_do_when_there_are_too_few(tokenizer):
    import pytest

    from spdy_hf.calibration.text import document_windows
    from spdy_hf.errors import SPDYError

    with pytest.raises(SPDYError, match="packing: stream"):
        document_windows(tokenizer, ["one short document with a few words in it"], 4, 32)


def test_padding_changes_no_score():
    """The search's scores (cosine, NMSE, KL) average over real tokens: what stands in the padding is no evidence."""
    from conftest import example_inputs, make_bert

    from spdy_hf.search.scoring import DistanceScorer

    for make, kinds in ((make_bert, ("cosine", "nmse")), (make_llama, ("kl", "cosine", "nmse"))):
        model = make().eval()
        data = example_inputs(4, 16, seed=1)
        data["attention_mask"][1, 10:] = 0
        data["attention_mask"][3, 5:] = 0
        other = {k: v.clone() for k, v in data.items()}
        other["input_ids"][other["attention_mask"] == 0] = 7
        for kind in kinds:
            first, second = DistanceScorer(model, [data], kind), DistanceScorer(model, [other], kind)
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(0.9)
                a, b = first(), second()
                for p in model.parameters():
                    p.div_(0.9)
            assert a > 0 and abs(a - b) <= 1e-5 * max(a, 1e-6), (make.__name__, kind, a, b)


def test_recovery_losses_leave_padding_out():
    from types import SimpleNamespace

    from spdy_hf.recovery.teacher import layer_loss, output_distance

    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).reshape(-1).bool()
    t, s = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    moved = s.clone()
    moved.reshape(-1, 5)[~mask] += 100.0  # only the padding differs
    assert torch.allclose(layer_loss({"a": s}, {"a": t}, tokens=mask), layer_loss({"a": moved}, {"a": t}, tokens=mask))
    assert not torch.allclose(layer_loss({"a": s}, {"a": t}), layer_loss({"a": moved}, {"a": t}))
    for kind, field in (("kl", "logits"), ("cosine", "last_hidden_state")):
        a = output_distance(SimpleNamespace(**{field: s}), SimpleNamespace(**{field: t}), kind, mask)
        b = output_distance(SimpleNamespace(**{field: moved}), SimpleNamespace(**{field: t}), kind, mask)
        assert torch.allclose(a, b), kind


def test_recovery_losses_take_a_layer_with_no_live_output_on_padded_batches():
    """A layer whose every output is removed for good (a whole attention pruned) adds nothing, padded or not."""
    from spdy_hf.recovery.teacher import layer_loss

    mask = torch.tensor([[1, 1, 0], [1, 0, 0]]).reshape(-1).bool()
    t, s = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    dead = {"a": torch.zeros(4, dtype=torch.bool)}
    assert float(layer_loss({"a": s}, {"a": t}, dead, tokens=mask)) == 0.0
