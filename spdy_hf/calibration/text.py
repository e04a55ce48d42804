"""Calibration data: the built-in offline corpus, local text files, and fixed-length token windows.

The built-in corpus mixes two kinds of text, neither downloaded: the docstrings of the Python standard library's
top-level modules, read with `ast` (nothing is imported), so every Python install has them; and everyday English
that a language model wrote for the package (`spdy_hf.calibration.written`). Each is split with a fixed hash (the
docstrings by file, the written texts one by one) into a calibration part and a disjoint held-out part for
evaluation.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import os
import sysconfig
from functools import lru_cache

import torch

from ..errors import SPDYError

logger = logging.getLogger(__name__)

SPLITS = ("calibration", "heldout")
MAX_STREAM_TOKENS = 4_000_000  # tokens read at most from a large dataset (beyond 4 x what the windows need)
MIN_DOCUMENT_TOKENS = 8  # the shortest piece of text `document_windows` draws


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


BUILTIN_SOURCES = ("builtin", "docstrings", "written", "mix")


def builtin_texts(name: str, split: str = "calibration") -> list[str]:
    """A built-in corpus's documents: "docstrings" (the standard library's, `builtin_corpus`), "written" (everyday
    English a language model wrote, `spdy_hf.calibration.written`; one text in five is held out, by a fixed hash),
    or "builtin" (the default; "mix" is another name for it): the two interleaved, a document of each in turn, then
    the rest of the longer one. Text of both kinds calibrates better for text of other kinds than either alone
    (docs/benchmarks/transfer.md)."""
    if name == "docstrings":
        return list(builtin_corpus(split))
    if name == "written":
        from .written import written_corpus

        return [t for t in written_corpus() if _split_of(t) == split]
    if name in ("builtin", "mix"):
        docs, written = builtin_texts("docstrings", split), builtin_texts("written", split)
        mixed = [d for pair in zip(docs, written) for d in pair]
        longer = docs if len(docs) > len(written) else written
        return mixed + longer[min(len(docs), len(written)):]
    raise SPDYError(f"Unknown built-in corpus {name!r}; use one of {BUILTIN_SOURCES}.")


def read_text_file(path: str) -> list[str]:
    """A UTF-8 text file as documents separated by blank lines."""
    if not os.path.isfile(path):
        raise SPDYError(f"Calibration text file {path!r} does not exist; pass 'builtin' or an existing file.")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return [d.strip() for d in text.split("\n\n") if d.strip()]


TEXT_SUFFIXES = (".txt", ".text", ".md")
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def texts_from_dataset(dataset, text_column: str = "text", split: str = "train") -> list[str]:
    """The text column of a `datasets.Dataset` (or one split of a `DatasetDict`) as a list of strings."""
    if isinstance(getattr(dataset, "column_names", None), dict):  # a DatasetDict: pick the split
        if split not in dataset:
            raise SPDYError(f"The dataset has no split {split!r}; its splits: {', '.join(dataset.keys())}. "
                            "Set calibration.split.")
        dataset = dataset[split]
    columns = list(getattr(dataset, "column_names", None) or [])
    if text_column not in columns:
        raise SPDYError(f"The calibration data has no column {text_column!r}; its columns: "
                        f"{', '.join(columns) or 'none'}. Set calibration.text_column (--text-column).")
    texts = []
    for value in dataset[text_column]:
        if value is None:
            continue
        if not isinstance(value, str):
            raise SPDYError(f"Column {text_column!r} holds {type(value).__name__} values, not text; choose a "
                            "text column.")
        texts.append(value)
    return texts


def load_texts(
    source="builtin", *, dataset_config: str | None = None, split: str = "train", text_column: str = "text",
    split_setting: str | None = None,
) -> list[str]:
    """The documents of a calibration source.

    Args:
        source: "builtin" (the offline corpus), a list of strings, a `datasets.Dataset` or `DatasetDict`, a local
            file (.txt/.text/.md: documents separated by blank lines; .json/.jsonl/.parquet/.csv: the
            `text_column` of its rows), or a Hugging Face Hub dataset name (loaded with `datasets.load_dataset`;
            `split` may slice, e.g. "train[:2000]").
        dataset_config: the Hub dataset's configuration name (e.g. "wikitext-2-raw-v1").
        split_setting: the setting `split` came from (e.g. "calibration.split"), named in the warning that a local
            file, which is read whole, ignores a split other than "train"; None: no warning (a caller whose split is
            not the user's, or whose default split is another).
    """
    if isinstance(source, (list, tuple)):
        if not all(isinstance(t, str) for t in source):
            raise SPDYError("Calibration texts must be strings.")
        return list(source)
    if not isinstance(source, str):
        if hasattr(source, "column_names") or hasattr(source, "keys"):
            return texts_from_dataset(source, text_column, split)
        raise SPDYError(f"Cannot read calibration data from a {type(source).__name__}; pass 'builtin', texts, a "
                        "datasets.Dataset, a data file or a Hub dataset name.")
    if source in BUILTIN_SOURCES:
        return builtin_texts(source, "calibration")
    suffix = os.path.splitext(source)[1].lower()
    if os.path.isdir(source):
        raise SPDYError(f"Calibration source {source!r} is a directory; pass a file in it (.txt, .json, .jsonl, "
                        ".parquet, .csv) or a Hub dataset name.")
    if (suffix in TEXT_SUFFIXES or suffix in DATA_FILE_BUILDERS) and split != "train" and split_setting:
        logger.warning("%s=%r is ignored: a local file is read whole (its every %s), and splits are chosen in Hub "
                       "datasets only. To calibrate on part of %s, write that part to a file of its own.",
                       split_setting, split, "document" if suffix in TEXT_SUFFIXES else "row", source)
    if suffix in TEXT_SUFFIXES:
        return read_text_file(source)
    if suffix in DATA_FILE_BUILDERS:
        if not os.path.isfile(source):
            raise SPDYError(f"Calibration data file {source!r} does not exist.")
        return texts_from_dataset(_load_dataset(DATA_FILE_BUILDERS[suffix], data_files=source, split="train"),
                                  text_column)
    if os.path.isfile(source):
        raise SPDYError(f"Calibration file {source!r} has an unknown type; use .txt, .json, .jsonl, .parquet or .csv.")
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise SPDYError(f"Calibration source {source!r} does not exist; pass 'builtin', an existing file or a Hub "
                        "dataset name.")
    return texts_from_dataset(_load_dataset(source, dataset_config, split=split), text_column, split)


def _load_dataset(path: str, name: str | None = None, **kwargs):
    try:
        import datasets
    except ImportError as e:
        raise SPDYError("Calibration data files and Hub datasets need the `datasets` package: "
                        "pip install datasets.") from e
    try:
        return datasets.load_dataset(path, name, **kwargs)
    except Exception as e:  # network, missing dataset or config, bad split: say what was asked and what to do
        raise SPDYError(
            f"Could not load calibration dataset {path!r}"
            + (f" (config {name!r})" if name else "")
            + (f", split {kwargs['split']!r}" if "split" in kwargs and "data_files" not in kwargs else "")
            + f": {type(e).__name__}: {e}. Without network access, pass a local file or 'builtin'.") from e


def special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The special token ids a tokenizer puts before and after one sequence (e.g. [CLS] and [SEP])."""
    probe = "hello"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return [], []


def _window_frame(tokenizer, texts: list[str], sequence_length: int) -> tuple[list[str], list[int], list[int], int]:
    """What both packings start from: the non-empty texts, the special tokens around one sequence, and the tokens
    of text a window holds between them."""
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise SPDYError("The calibration text is empty; pass some text (or use the built-in corpus).")
    prefix, suffix = special_tokens_around(tokenizer)
    body = sequence_length - len(prefix) - len(suffix)
    if body < 1:
        raise SPDYError(f"Calibration sequence length {sequence_length} leaves no room next to special tokens.")
    return texts, prefix, suffix, body


def token_windows(
    tokenizer, texts: list[str], num_samples: int, sequence_length: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Draws `num_samples` disjoint windows of `sequence_length` tokens from the concatenated texts.

    Each window holds the tokenizer's special tokens (e.g. BERT's [CLS] ... [SEP]) around a slice of the
    token stream, like a real input. Returns `input_ids` and `attention_mask`, each (num_samples, sequence_length).
    """
    texts, prefix, suffix, body = _window_frame(tokenizer, texts, sequence_length)
    n_special = len(prefix) + len(suffix)
    # whole documents may exceed the model's length limit: windows are cut below, so no warning is due.
    # A large dataset is tokenized only until there is ample text to draw from.
    enough = max(4 * num_samples * body, MAX_STREAM_TOKENS)
    stream: list[int] = []
    for i in range(0, len(texts), 1000):
        encoded = tokenizer(texts[i:i + 1000], add_special_tokens=False, verbose=False)["input_ids"]
        stream.extend(tok for ids in encoded for tok in ids)
        if len(stream) >= enough:
            break
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


def document_windows(
    tokenizer, texts: list[str], num_samples: int, sequence_length: int, seed: int = 0,
    min_tokens: int = MIN_DOCUMENT_TOKENS,
) -> dict[str, torch.Tensor]:
    """Draws `num_samples` windows that each hold one document, or one `sequence_length` slice of a longer one, at
    its own length: the tokenizer's special tokens around it, then padding (`attention_mask` 0) up to
    `sequence_length`.

    What an embedding model is given in use: one sentence, paragraph or passage per input, of many lengths, not a
    slice of running text that crosses documents. Every stage leaves the padding out (Hessians, scores, recovery).
    Pieces under `min_tokens` tokens (a one-word docstring) are not drawn. Returns `input_ids` and
    `attention_mask`, each (num_samples, sequence_length).
    """
    texts, prefix, suffix, body = _window_frame(tokenizer, texts, sequence_length)
    pieces: list[list[int]] = []
    tokens = 0
    for i in range(0, len(texts), 1000):  # a large dataset is tokenized only until there is ample text to draw from
        for ids in tokenizer(texts[i:i + 1000], add_special_tokens=False, verbose=False)["input_ids"]:
            for start in range(0, len(ids), body):
                piece = ids[start:start + body]
                if len(piece) >= min(min_tokens, body):
                    pieces.append(piece)
                    tokens += len(piece)
        if len(pieces) >= 4 * num_samples and tokens >= MAX_STREAM_TOKENS:
            break
    if len(pieces) < num_samples:
        raise SPDYError(f"The calibration text has {len(pieces)} documents of at least {min_tokens} tokens, too few "
                        f"for {num_samples} windows. Pass more text, fewer samples or calibration.packing: stream.")
    pad = pad_token_id(tokenizer)
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(pieces), generator=gen)[:num_samples].sort().values.tolist()
    input_ids = torch.full((num_samples, sequence_length), pad, dtype=torch.long)
    attention_mask = torch.zeros((num_samples, sequence_length), dtype=torch.long)
    for row, index in enumerate(chosen):
        ids = prefix + pieces[index] + suffix
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
    lengths = attention_mask.sum(1).float()
    logger.info("Calibration set: %d documents of %d tokens at most (median %d, %.0f%% of the window on average) from "
                "%d pieces of text.", num_samples, sequence_length, int(lengths.median()),
                100 * float(lengths.mean()) / sequence_length, len(pieces))
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def pad_token_id(tokenizer) -> int:
    """The id padding is written with: the tokenizer's pad token, else its end-of-sequence token, else 0. Padding
    is masked out everywhere, so any id would do; a real one keeps the embedding lookup in range."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0
