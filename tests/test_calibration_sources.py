"""Calibration data from `datasets`: data files, Dataset objects, Hub names (never downloaded here), and the
calibration length."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_bert, small_config

import spdy_hf.calibration.text as data_module
from spdy_hf.calibration.text import load_texts, token_windows
from spdy_hf.config import SPDYConfig
from spdy_hf.errors import ConfigError, SPDYError
from spdy_hf.pruner import SPDYPruner

DOCS = [f"Document number {i} talks about pruning, sparse kernels and latency tables at some length." for i in
        range(40)]


@pytest.fixture
def data_files(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"content": DOCS, "id": list(range(len(DOCS)))})
    paths = {"jsonl": tmp_path / "docs.jsonl", "json": tmp_path / "docs.json", "parquet": tmp_path / "docs.parquet",
             "csv": tmp_path / "docs.csv"}
    paths["jsonl"].write_text("".join(json.dumps({"content": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    paths["json"].write_text("\n".join(json.dumps({"content": d, "id": i}) for i, d in enumerate(DOCS)))
    ds.to_parquet(str(paths["parquet"]))
    ds.to_csv(str(paths["csv"]))
    return paths


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv"])
def test_data_files(data_files, kind):
    assert load_texts(str(data_files[kind]), text_column="content") == DOCS


def test_unknown_column_names_the_columns(data_files):
    with pytest.raises(SPDYError, match="no column 'text'.*content, id"):
        load_texts(str(data_files["parquet"]))


def test_non_text_column_is_refused(data_files):
    with pytest.raises(SPDYError, match="int values, not text"):
        load_texts(str(data_files["jsonl"]), text_column="id")


def test_dataset_objects_and_lists():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": DOCS[:3] + [None]})
    assert load_texts(ds) == DOCS[:3]  # missing values are skipped
    dd = datasets.DatasetDict({"train": ds, "validation": datasets.Dataset.from_dict({"text": ["v"]})})
    assert load_texts(dd, split="validation") == ["v"]
    with pytest.raises(SPDYError, match="no split 'test'.*train, validation"):
        load_texts(dd, split="test")
    assert load_texts(["a", "b"]) == ["a", "b"]
    with pytest.raises(SPDYError, match="must be strings"):
        load_texts(["a", 3])


def test_hub_name_goes_to_load_dataset_with_config_and_split(monkeypatch):
    datasets = pytest.importorskip("datasets")
    seen = {}

    def fake_load_dataset(path, name=None, **kwargs):
        seen.update(path=path, name=name, **kwargs)
        return datasets.Dataset.from_dict({"text": ["hub text"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_texts("someorg/corpus", dataset_config="v1", split="train[:100]") == ["hub text"]
    assert seen == {"path": "someorg/corpus", "name": "v1", "split": "train[:100]"}


def test_hub_failure_is_a_clear_error(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SPDYError, match="Could not load calibration dataset 'wikitext'.*config 'x'.*local file"):
        load_texts("wikitext", dataset_config="x")


def test_bad_paths(tmp_path):
    with pytest.raises(SPDYError, match="does not exist"):
        load_texts(str(tmp_path / "missing.jsonl"))
    with pytest.raises(SPDYError, match="does not exist"):
        load_texts("./no/such/file")
    (tmp_path / "data.xml").write_text("<x/>")
    with pytest.raises(SPDYError, match="unknown type"):
        load_texts(str(tmp_path / "data.xml"))
    with pytest.raises(SPDYError, match="is a directory"):
        load_texts(str(tmp_path))
    with pytest.raises(SPDYError, match="Cannot read calibration data"):
        load_texts(42)


def test_large_text_is_tokenized_only_as_far_as_needed(tokenizer, monkeypatch):
    monkeypatch.setattr(data_module, "MAX_STREAM_TOKENS", 0)
    calls = []
    real = type(tokenizer).__call__

    def counting(self, texts, *args, **kwargs):
        if isinstance(texts, list):  # not the single-string probes for special tokens
            calls.append(len(texts))
        return real(self, texts, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", counting)
    texts = DOCS * 100  # 4000 documents, about 80 000 tokens
    windows = token_windows(tokenizer, texts, num_samples=2, sequence_length=16, seed=0)
    assert windows["input_ids"].shape == (2, 16)
    assert calls == [1000]  # one chunk of documents was enough


def test_calibration_config_fields():
    c = SPDYConfig.from_dict({"calibration": {"source": "wikitext", "dataset_config": "wikitext-2-raw-v1",
                                              "split": "train[:500]", "text_column": "text",
                                              "sequence_length": None}})
    assert c.calibration.sequence_length is None and c.calibration.dataset_config == "wikitext-2-raw-v1"
    with pytest.raises(ConfigError, match="calibration.text_column"):
        SPDYConfig.from_dict({"calibration": {"text_column": ""}})
    with pytest.raises(ConfigError, match="calibration.sequence_length"):
        SPDYConfig.from_dict({"calibration": {"sequence_length": 4}})


def test_missing_calibration_length_takes_the_model_maximum(tmp_path, tokenizer):
    config = small_config(tmp_path, calibration={"num_samples": 2, "sequence_length": None})
    model = make_bert()  # max_position_embeddings 128
    windows = SPDYPruner(model, config, tokenizer).calibration_windows(None)
    assert windows["input_ids"].shape == (2, 128)


def test_unbounded_calibration_length_is_an_error(tmp_path, tokenizer, monkeypatch):
    config = small_config(tmp_path, calibration={"num_samples": 2, "sequence_length": None})
    model = torch.nn.Linear(4, 4)  # a model without a config: no stated maximum length
    monkeypatch.setattr(tokenizer, "model_max_length", int(1e30))  # transformers' "no limit"
    with pytest.raises(SPDYError, match="no maximum length.*calibration.sequence_length"):
        SPDYPruner(model, config, tokenizer).calibration_windows(None)


def test_pruner_accepts_a_dataset(tmp_path, tokenizer):
    datasets = pytest.importorskip("datasets")
    from spdy_hf.calibration.text import builtin_corpus

    config = small_config(tmp_path, calibration={"num_samples": 3, "sequence_length": 16, "text_column": "body"})
    ds = datasets.Dataset.from_dict({"body": list(builtin_corpus())[:50]})
    windows = SPDYPruner(make_bert(), config, tokenizer).calibration_windows(ds)
    assert windows["input_ids"].shape == (3, 16) and torch.all(windows["attention_mask"] == 1)
