"""The calibration stage: the token windows every later stage reads, from the config's source (the built-in corpus,
a data file or a Hub dataset), from texts or a `datasets.Dataset` the user passes, or as given token windows."""

from __future__ import annotations

import logging

import torch

from ..config import SPDYConfig
from ..errors import SPDYError
from .text import document_windows, load_texts, token_windows

logger = logging.getLogger(__name__)


def calibration_windows(config: SPDYConfig, tokenizer=None, calibration=None, max_positions: int | None = None,
                        causal: bool = False) -> dict[str, torch.Tensor]:
    """`{"input_ids": (N, L), "attention_mask": (N, L)}`: `calibration` as given (token windows), or tokenized from
    it (texts, a dataset) or from `config.calibration.source` when it is None, packed as `calibration.packing` says.

    Args:
        max_positions: the longest input the model takes; the window length when `calibration.sequence_length` is
            null.
        causal: the model is a causal LM (`calibration.packing: auto` packs its text as a stream).
    """
    cal = config.calibration
    if isinstance(calibration, dict) and not hasattr(calibration, "column_names"):
        if "input_ids" not in calibration:
            raise SPDYError("Calibration windows must be a dict with an 'input_ids' tensor of shape (N, L).")
        windows = dict(calibration)
        windows.setdefault("attention_mask", torch.ones_like(windows["input_ids"]))
        given = windows["input_ids"].shape[0]
        if given > cal.num_samples:
            # the databases are built from the first num_samples windows; recovery and scoring read their own
            # counts (recovery.num_samples, search.eval_samples) from all of them
            logger.warning("%d calibration windows were given but calibration.num_samples=%d: the pruning "
                           "database is built from the first %d only. Set calibration.num_samples=%d to use "
                           "them all.", given, cal.num_samples, cal.num_samples, given)
    else:
        if tokenizer is None:
            raise SPDYError("Calibration text needs a tokenizer: pass SPDYPruner(model, config, tokenizer=...).")
        source = cal.source if calibration is None else calibration
        texts = load_texts(source, dataset_config=cal.dataset_config, split=cal.split,
                           text_column=cal.text_column, split_setting="calibration.split")
        pack = document_windows if packing(config, causal) == "documents" else token_windows
        windows = pack(tokenizer, texts, cal.num_samples, window_length(config, max_positions), cal.seed)
    n = windows["input_ids"].shape[0]
    if n < config.search.eval_samples:
        logger.info("Scoring candidates on all %d calibration windows (search.eval_samples=%d).",
                    n, config.search.eval_samples)
    return windows


def window_length(config: SPDYConfig, max_positions: int | None) -> int:
    """Tokens per calibration window: `calibration.sequence_length`, or the model's maximum where that is null."""
    length = config.calibration.sequence_length
    if length is not None:
        return length
    if max_positions is None:
        raise SPDYError("calibration.sequence_length is not set and the model states no maximum length "
                        "(max_position_embeddings); set calibration.sequence_length (--calibration-length).")
    logger.info("Calibration windows of %d tokens, the model's maximum.", max_positions)
    return max_positions


def packing(config: SPDYConfig, causal: bool) -> str:
    """`calibration.packing`, with 'auto' resolved: 'documents' for an encoder (it embeds one text at a time, of
    any length: windows of running text taught it only full-length inputs, and short texts of other domains lost
    most; docs/benchmarks/transfer.md), 'stream' for a causal LM (it reads and continues running text)."""
    choice = config.calibration.packing
    if choice == "auto":
        return "stream" if causal else "documents"
    return choice
