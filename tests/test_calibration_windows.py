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
