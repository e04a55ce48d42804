"""Damaged model files, given to `spdy-hf prune` as a new user would: one clear error naming the file and what to
do, exit code 2, no traceback and nothing written. Every file is made here (nothing is downloaded)."""

from __future__ import annotations

import pytest
from conftest import make_gpt2

from spdy_hf.cli import main
from spdy_hf.errors import DamagedModelFileError
from spdy_hf.modeling.loading import damaged_model_file, load_model_and_tokenizer

LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\n"
               b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 90868376\n")


def prune_fails_clearly(path, tmp_path, capsys, model=None) -> str:
    """Runs `spdy-hf prune model` (default: the damaged file `path` itself) and returns its error text, after
    checking the exit code, that it names `path`, that there was no traceback and that no output was made."""
    out = tmp_path / "out"
    code = main(["prune", str(model or path), "-o", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.count("spdy-hf: error:") == 1
    assert f"The model file {path} is damaged" in err
    assert not out.exists()
    return err


@pytest.fixture
def gguf_bytes(tmp_path):
    pytest.importorskip("gguf")
    from test_gguf import write_tiny_gguf

    path = tmp_path / "source.gguf"
    write_tiny_gguf(path)
    return path.read_bytes()


@pytest.mark.parametrize("keep", [100, 0.5, -1], ids=["cut-in-the-header", "cut-in-half", "last-byte-missing"])
def test_truncated_gguf(keep, gguf_bytes, tmp_path, capsys):
    """A download cut short: inside the metadata (struct.error deep in the reader), or in the tensor data."""
    cut = keep if isinstance(keep, int) and keep > 0 else len(gguf_bytes) + keep if keep < 0 else int(keep * len(gguf_bytes))
    path = tmp_path / "model.gguf"
    path.write_bytes(gguf_bytes[:cut])
    err = prune_fails_clearly(path, tmp_path, capsys)
    assert "not a readable GGUF file" in err and f"{cut:,} bytes" in err and "Download or export it again" in err


def test_a_file_named_gguf_that_is_not_one(tmp_path, capsys):
    pytest.importorskip("gguf")
    path = tmp_path / "model.gguf"
    path.write_text("<html>Sign in to download this model</html>\n")
    assert "not a readable GGUF file" in prune_fails_clearly(path, tmp_path, capsys)


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    """A tiny GPT-2 checkpoint with its tokenizer; its model.safetensors is replaced by each test."""
    directory = tmp_path / "tiny-gpt2"
    make_gpt2().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("damage", ["not-safetensors", "truncated", "empty"])
def test_damaged_safetensors(damage, model_dir, tmp_path, capsys):
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"not-safetensors": b"this is not a safetensors file\n" * 20,
                         "truncated": data[: len(data) // 2], "empty": b""}[damage])
    err = prune_fails_clearly(weights, tmp_path, capsys, model=model_dir)
    assert "not a readable safetensors file" in err and "Download or copy it again" in err


def test_a_git_lfs_pointer_instead_of_the_weights(model_dir, tmp_path, capsys):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(LFS_POINTER)
    err = prune_fails_clearly(weights, tmp_path, capsys, model=model_dir)
    assert "Git LFS pointer" in err and "git lfs pull" in err and str(model_dir) in err


def test_a_weights_file_given_for_its_directory(model_dir, tmp_path, capsys):
    """The file exists: the error says to pass the directory that holds it, not that the path does not exist."""
    code = main(["prune", str(model_dir / "model.safetensors"), "-o", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" not in err
    assert "is a file" in err and str(model_dir) in err


def test_the_library_raises_the_same_error(model_dir):
    (model_dir / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(DamagedModelFileError) as info:
        load_model_and_tokenizer(str(model_dir))
    assert info.value.path == str(model_dir / "model.safetensors")


def test_sound_files_and_other_failures_are_not_called_damaged(model_dir, tmp_path):
    """Only a file that does not read is blamed: a sound checkpoint has none, and a missing path keeps its own
    error."""
    assert damaged_model_file(str(model_dir)) is None
    assert damaged_model_file(str(tmp_path / "missing")) is None
    assert damaged_model_file(str(tmp_path / "missing.gguf")) is None
