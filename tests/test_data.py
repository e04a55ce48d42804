"""Calibration data: the offline built-in corpus, text files and token windows."""

from __future__ import annotations

import pytest
import torch

from spdy_hf.calibration.text import (
    builtin_corpus,
    load_texts,
    read_text_file,
    special_tokens_around,
    token_windows,
)
from spdy_hf.errors import SPDYError


def test_builtin_corpus_non_empty_deterministic_and_split():
    cal = builtin_corpus("calibration")
    held = builtin_corpus("heldout")
    assert len(cal) > 100 and len(held) > 20
    assert all(isinstance(d, str) and len(d) >= 40 for d in cal)
    assert not set(cal) & set(held)
    builtin_corpus.cache_clear()
    assert builtin_corpus("calibration") == cal  # the same documents in the same order, read again
    assert load_texts("docstrings") == list(cal)
    with pytest.raises(SPDYError, match="split"):
        builtin_corpus("train")


def test_special_tokens_of_bert_tokenizer(tokenizer):
    prefix, suffix = special_tokens_around(tokenizer)
    assert prefix == [tokenizer.cls_token_id] and suffix == [tokenizer.sep_token_id]


def test_token_windows_shape_specials_and_determinism(tokenizer):
    texts = load_texts("builtin")
    w = token_windows(tokenizer, texts, num_samples=8, sequence_length=32, seed=0)
    ids = w["input_ids"]
    assert ids.shape == (8, 32) and ids.dtype == torch.long
    assert w["attention_mask"].shape == (8, 32) and bool((w["attention_mask"] == 1).all())
    assert (ids[:, 0] == tokenizer.cls_token_id).all() and (ids[:, -1] == tokenizer.sep_token_id).all()
    body = ids[:, 1:-1]
    assert not torch.isin(body, torch.tensor([tokenizer.cls_token_id, tokenizer.sep_token_id,
                                              tokenizer.pad_token_id])).any()
    assert len({tuple(r) for r in ids.tolist()}) == 8  # disjoint windows of real text
    again = token_windows(tokenizer, texts, num_samples=8, sequence_length=32, seed=0)
    assert torch.equal(again["input_ids"], ids)
    other = token_windows(tokenizer, texts, num_samples=8, sequence_length=32, seed=1)
    assert not torch.equal(other["input_ids"], ids)


def test_token_windows_are_slices_of_the_text(tokenizer):
    texts = ["alpha beta gamma delta epsilon zeta eta theta iota kappa " * 10]
    stream = tokenizer(texts, add_special_tokens=False)["input_ids"][0]
    w = token_windows(tokenizer, texts, num_samples=3, sequence_length=10, seed=0)["input_ids"]
    for row in w.tolist():
        body = row[1:-1]
        starts = [i for i in range(0, len(stream) - 7, 8) if stream[i:i + 8] == body]
        assert starts, "each window body is an aligned 8-token slice of the token stream"


def test_too_little_text_raises_mentioning_tokens(tokenizer):
    with pytest.raises(SPDYError, match="tokens"):
        token_windows(tokenizer, ["just a few words here"], num_samples=8, sequence_length=32)


@pytest.mark.parametrize("texts", [[], [""], ["   ", "\n"]])
def test_empty_text_raises(tokenizer, texts):
    with pytest.raises(SPDYError, match="empty"):
        token_windows(tokenizer, texts, num_samples=1, sequence_length=16)


def test_sequence_too_short_for_special_tokens(tokenizer):
    with pytest.raises(SPDYError, match="special tokens"):
        token_windows(tokenizer, ["hello world " * 50], num_samples=1, sequence_length=2)


def test_text_file_source(tmp_path, tokenizer):
    path = tmp_path / "corpus.txt"
    docs = [f"Document number {i} talks about pruning neural networks for speed on a CPU." for i in range(30)]
    path.write_text("\n\n".join(docs) + "\n\n\n", encoding="utf-8")
    assert load_texts(str(path)) == docs
    assert read_text_file(str(path)) == docs
    w = token_windows(tokenizer, load_texts(str(path)), num_samples=4, sequence_length=16)
    assert w["input_ids"].shape == (4, 16)


def test_missing_text_file_raises(tmp_path):
    with pytest.raises(SPDYError, match="does not exist"):
        load_texts(str(tmp_path / "missing.txt"))


@pytest.mark.parametrize("name", ["corpus.txt", "corpus.jsonl"])
def test_a_split_a_local_file_cannot_honour_is_named_in_a_warning(name, tmp_path, caplog):
    """A local file is read whole: a split asked of it is not silently dropped but named, with what to do."""
    if name.endswith(".jsonl"):
        pytest.importorskip("datasets")
    path = tmp_path / name
    docs = [f"Document {i} is about pruning." for i in range(6)]
    path.write_text("\n".join(f'{{"text": "{d}"}}' for d in docs) if name.endswith(".jsonl") else "\n\n".join(docs))
    with caplog.at_level("WARNING", logger="spdy_hf.calibration.text"):
        assert load_texts(str(path), split="train[:2]", split_setting="calibration.split") == docs  # every document: the split does not apply
    assert "calibration.split='train[:2]' is ignored" in caplog.text and "a file of its own" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="spdy_hf.calibration.text"):
        load_texts(str(path), split_setting="calibration.split")  # the default split says nothing
        load_texts(str(path), split="test")  # a caller that names no setting
    assert caplog.text == ""
