"""Calibration data: the built-in offline corpus, local text files, and fixed-length token windows.

The built-in corpus is the docstrings of the Python standard library's top-level modules, read with `ast`
(nothing is imported or downloaded), so every Python install has it. It is split by file, with a fixed
hash, into a calibration part and a disjoint held-out part for evaluation.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import os
import sysconfig
from functools import lru_cache

import torch

from .errors import SPDYError

logger = logging.getLogger(__name__)

SPLITS = ("calibration", "heldout")


def _split_of(filename: str) -> str:
    # one file in five goes to the held-out split; the hash keeps the split fixed across runs and machines
    return "heldout" if int(hashlib.sha1(filename.encode()).hexdigest(), 16) % 5 == 0 else "calibration"


@lru_cache(maxsize=2)
def builtin_corpus(split: str = "calibration") -> tuple[str, ...]:
    """Docstrings of the standard library's top-level modules, one string per docstring, in a fixed order."""
    if split not in SPLITS:
        raise SPDYError(f"Unknown corpus split {split!r}; use one of {SPLITS}.")
    root = sysconfig.get_paths()["stdlib"]
    docs: list[str] = []
    for filename in sorted(os.listdir(root)):
        if not filename.endswith(".py") or _split_of(filename) != split:
            continue
        try:
            with open(os.path.join(root, filename), encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40:
                    docs.append(doc)
    if not docs:
        raise SPDYError(f"Found no standard-library docstrings under {root}; pass calibration text instead.")
    return tuple(docs)


def read_text_file(path: str) -> list[str]:
    """A UTF-8 text file as documents separated by blank lines."""
    if not os.path.isfile(path):
        raise SPDYError(f"Calibration text file {path!r} does not exist; pass 'builtin' or an existing file.")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return [d.strip() for d in text.split("\n\n") if d.strip()]


def load_texts(source: str) -> list[str]:
    """The documents of a calibration source: 'builtin' or a text file."""
    if source == "builtin":
        return list(builtin_corpus("calibration"))
    return read_text_file(source)


def special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The special token ids a tokenizer puts before and after one sequence (e.g. [CLS] and [SEP])."""
    probe = "hello"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return [], []


def token_windows(
    tokenizer, texts: list[str], num_samples: int, sequence_length: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Draws `num_samples` disjoint windows of `sequence_length` tokens from the concatenated texts.

    Each window holds the tokenizer's special tokens (e.g. BERT's [CLS] ... [SEP]) around a slice of the
    token stream, like a real input. Returns `input_ids` and `attention_mask`, each (num_samples, sequence_length).
    """
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise SPDYError("The calibration text is empty; pass some text (or use the built-in corpus).")
    prefix, suffix = special_tokens_around(tokenizer)
    n_special = len(prefix) + len(suffix)
    body = sequence_length - n_special
    if body < 1:
        raise SPDYError(f"Calibration sequence length {sequence_length} leaves no room next to special tokens.")
    # whole documents may exceed the model's length limit: windows are cut below, so no warning is due
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    stream = [tok for ids in encoded for tok in ids]
    n_windows = len(stream) // body
    if n_windows < num_samples:
        raise SPDYError(
            f"The calibration text has {len(stream)} tokens, too few for {num_samples} windows of {body} tokens "
            f"(plus {n_special} special tokens). Pass more text, fewer samples or a shorter sequence length."
        )
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n_windows, generator=gen)[:num_samples].sort().values.tolist()
    rows = [prefix + stream[i * body:(i + 1) * body] + suffix for i in chosen]
    input_ids = torch.tensor(rows, dtype=torch.long)  # (N, L)
    logger.info("Calibration set: %d windows of %d tokens from %d tokens of text.", num_samples, sequence_length,
                len(stream))
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
