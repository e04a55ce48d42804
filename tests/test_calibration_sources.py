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
    # an encoder's windows are documents (packing auto): [CLS] text [SEP], then padding the mask leaves out
    mask = windows["attention_mask"]
    assert windows["input_ids"].shape == (3, 16) and torch.all(mask[:, 0] == 1)
    assert torch.all(windows["input_ids"][:, 0] == tokenizer.cls_token_id)
    assert torch.all(mask[:, 1:] <= mask[:, :-1])  # real tokens first, padding after
    for row, n in zip(windows["input_ids"], mask.sum(1)):
        assert row[n - 1] == tokenizer.sep_token_id and torch.all(row[n:] == tokenizer.pad_token_id)
    config = small_config(tmp_path, calibration={"num_samples": 3, "sequence_length": 16, "text_column": "body",
                                                 "packing": "stream"})
    windows = SPDYPruner(make_bert(), config, tokenizer).calibration_windows(ds)
    assert windows["input_ids"].shape == (3, 16) and torch.all(windows["attention_mask"] == 1)


def test_builtin_corpora_are_disjoint_splits_of_their_own_kinds():
    from spdy_hf.calibration.text import BUILTIN_SOURCES, builtin_texts

    assert set(BUILTIN_SOURCES) >= {"builtin", "docstrings", "written", "mix"}
    written = {split: builtin_texts("written", split) for split in ("calibration", "heldout")}
    assert len(written["calibration"]) > 3 * len(written["heldout"]) > 0
    assert not set(written["calibration"]) & set(written["heldout"])
    assert all(len(t.split()) >= 20 for t in written["calibration"])
    mix = builtin_texts("builtin")
    assert mix == builtin_texts("mix")
    docs = builtin_texts("docstrings")
    assert mix[0] == docs[0] and mix[1] == written["calibration"][0]  # a document of each in turn
    assert sorted(mix) == sorted(docs + written["calibration"])
    assert load_texts("written") == written["calibration"] and load_texts("builtin") == mix
    with pytest.raises(SPDYError, match="Unknown built-in corpus"):
        builtin_texts("poems")


def test_writing_prompts_are_fixed_varied_and_name_no_code():
    from spdy_hf.calibration.written import KINDS, SUBJECTS, writing_prompts

    prompts = writing_prompts()
    assert len(prompts) == len(set(prompts)) == len(KINDS) * len(SUBJECTS)
    assert prompts == writing_prompts() and prompts != writing_prompts(seed=1)
    assert not any(word in p.lower() for p in prompts for word in ("python", "code", "licen", "program"))


def test_write_texts_answers_through_the_chat_template_and_drops_short_answers(monkeypatch):
    from spdy_hf.calibration.written import write_texts

    class Tokenizer:
        padding_side, pad_token_id, eos_token_id = "right", 0, 0
        chat_template = "yes"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "<user>" + messages[0]["content"] + "<assistant>"

        def __call__(self, texts, **kwargs):
            assert self.padding_side == "left" and all(t.startswith("<user>") for t in texts)
            return {"input_ids": torch.ones(len(texts), 3, dtype=torch.long),
                    "attention_mask": torch.ones(len(texts), 3, dtype=torch.long)}

        def decode(self, row, skip_special_tokens):
            return " ".join(["word"] * int(row[0]))

    class Model:
        def generate(self, input_ids, attention_mask, **kwargs):
            assert kwargs["do_sample"] and kwargs["pad_token_id"] == 0
            lengths = torch.tensor([[30], [5]]).repeat(input_ids.shape[0] // 2 + 1, 1)[: input_ids.shape[0]]
            return torch.cat([input_ids, lengths], dim=1)

    tok = Tokenizer()
    texts = write_texts(Model(), tok, ["a", "b", "c", "d"], batch_size=4, progress=False)
    assert texts == [" ".join(["word"] * 30)] * 2  # the 5-word answers are dropped
    assert tok.padding_side == "right"  # restored
