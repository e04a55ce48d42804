"""`SPDYPruner` and `prune_pretrained`: model + calibration data + config -> a pruned model that meets a measured
speedup.

The pruner checks the job and turns calibration data into token windows; `spdy_hf.pipeline` runs the stages
(profile, budget, database, search, verify) for the config's level family (`spdy_hf.families`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .backend import model_device, regime_inputs, to_target_device
from .config import SPDYConfig
from .data import load_texts, token_windows
from .errors import SPDYError
from .evaluation import heldout_windows
from .families import get_family
from .latency import LatencyTable
from .loading import loaded_from_gguf, plain_checkpoint
from .pipeline import run_pipeline
from .result import PruningResult
from .units import find_units

logger = logging.getLogger(__name__)


class SPDYPruner:
    """Prunes a Hugging Face model to a target end-to-end speedup on the configured backend and regime.

    Args:
        model: the dense model (pruned in place).
        config: the job; `SPDYConfig()` by default.
        tokenizer: turns calibration text into tokens; needed unless token ids are passed to `prune`.

    Example:
        ```python
        >>> from spdy_hf import SPDYConfig, SPDYPruner
        >>> result = SPDYPruner(model, SPDYConfig(target_speedup=1.5), tokenizer=tokenizer).prune()
        >>> result.report["measured_speedup"]
        ```
    """

    def __init__(self, model: nn.Module, config: SPDYConfig | None = None, tokenizer=None):
        if loaded_from_gguf(model):  # dequantized on load: make it an ordinary model that saves as safetensors
            plain_checkpoint(model)
        self.model = model
        self.config = config if config is not None else SPDYConfig()
        self.tokenizer = tokenizer
        self.stage_seconds: dict[str, float] = {}  # wall seconds of the last job's stages

    def prune(
        self,
        calibration=None,
        latency_table: LatencyTable | str | None = None,
        progress: bool = True,
    ) -> PruningResult:
        """Runs every stage and returns the pruned model (dense weights with zeros) with its profile and report.

        Args:
            calibration: texts, a `datasets.Dataset`, or token windows (`{"input_ids": (N, L) tensor, ...}`); by
                default the config's calibration source (the built-in offline corpus unless set).
            latency_table: a table (or its path) to use instead of measuring; overrides `config.latency_table`.
            progress: show progress bars.

        Raises:
            UnreachableTargetError: the target cannot be met; raised after profiling, before any other stage.
        """
        model = self._prepare()
        windows = self._calibration_windows(calibration)
        self.stage_seconds = {}
        return run_pipeline(self.config, model, windows, tokenizer=self.tokenizer, latency_table=latency_table,
                            progress=progress, stage_seconds=self.stage_seconds, heldout=self._heldout_windows())

    def profile(self, latency_table: LatencyTable | str | None = None, progress: bool = True) -> LatencyTable:
        """Only the profiling stage: the latency table of this model in the config's regime, on its backend
        (measured, or read from the cache); with the structured or mixed family, it holds the structured levels'
        times too. Measure it on the target machine, then pass it (saved with `LatencyTable.save`) as
        `latency_table` to prune anywhere."""
        model = self._prepare()
        example = regime_inputs(model, self.config.regime)
        units = find_units(model, self.config.skip_modules, example_inputs=example)
        family = get_family(self.config.family)(self.config, model, progress)
        return family.plan(units, latency_table).table

    # ------------------------------------------------------------------ inputs
    def _prepare(self) -> nn.Module:
        """The model in eval mode on the backend's device, after checking the regime against it."""
        model = self.model.eval()
        self._check_model(model)
        to_target_device(model, self.config.backend, self.config.regime.dtype)
        return model

    def _max_positions(self) -> int | None:
        """The longest input the model takes, from its config (or a bounded tokenizer limit); None if unbounded."""
        cfg = getattr(self.model, "config", None)
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        if limit is None and self.tokenizer is not None:
            tok_limit = getattr(self.tokenizer, "model_max_length", None)
            if isinstance(tok_limit, int) and tok_limit < 1_000_000:  # transformers' "unset" is ~1e30
                limit = tok_limit
        return limit

    def _calibration_length(self) -> int:
        length = self.config.calibration.sequence_length
        if length is not None:
            return length
        limit = self._max_positions()
        if limit is None:
            raise SPDYError("calibration.sequence_length is not set and the model states no maximum length "
                            "(max_position_embeddings); set calibration.sequence_length (--calibration-length).")
        logger.info("Calibration windows of %d tokens, the model's maximum.", limit)
        return limit

    def _check_model(self, model: nn.Module) -> None:
        limit = self._max_positions()
        for name, length in (("regime.sequence_length", self.config.regime.sequence_length),
                             ("calibration.sequence_length", self.config.calibration.sequence_length)):
            if limit is not None and length is not None and length > limit:
                raise SPDYError(f"{name}={length} exceeds the model's maximum of {limit} positions; lower it.")

    def _heldout_windows(self) -> dict[str, torch.Tensor] | None:
        """Held-out windows for the report's quality (`evaluation`), or None: no tokenizer, or source 'none'."""
        ev = self.config.evaluation
        if self.tokenizer is None or ev.source == "none":
            return None
        limit = self._max_positions()
        length = min(ev.sequence_length, limit) if limit else ev.sequence_length
        windows = heldout_windows(self.tokenizer, ev.source, ev.num_samples, length, split=ev.split,
                                  text_column=ev.text_column)
        return {k: v.to(model_device(self.model)) for k, v in windows.items()}

    def _calibration_windows(self, calibration) -> dict[str, torch.Tensor]:
        cal = self.config.calibration
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
            if self.tokenizer is None:
                raise SPDYError("Calibration text needs a tokenizer: pass SPDYPruner(model, config, tokenizer=...).")
            source = cal.source if calibration is None else calibration
            texts = load_texts(source, dataset_config=cal.dataset_config, split=cal.split,
                               text_column=cal.text_column, split_setting="calibration.split")
            windows = token_windows(self.tokenizer, texts, cal.num_samples, self._calibration_length(), cal.seed)
        n = windows["input_ids"].shape[0]
        if n < self.config.search.eval_samples:
            logger.info("Scoring candidates on all %d calibration windows (search.eval_samples=%d).",
                        n, self.config.search.eval_samples)
        return windows


def prune_pretrained(name_or_path: str | None = None, config=None, calibration=None, trust_remote_code: bool = False,
                     progress: bool = True) -> PruningResult:
    """The one-liner: load a model (safetensors only; the bundled MiniLM by default) and prune it to
    `config.target_speedup` on `config.backend`, calibrating on `config.calibration` (the built-in corpus by
    default). Returns the `PruningResult` (`.model`, `.report`, `.save_pretrained`, `.push_to_hub`).

        result = spdy_hf.prune_pretrained("sentence-transformers/all-MiniLM-L6-v2", SPDYConfig(target_speedup=1.5))
    """
    from .loading import load_model_and_tokenizer

    config = config if config is not None else SPDYConfig()
    if isinstance(config, dict):
        config = SPDYConfig.from_dict(config)
    model, tokenizer = load_model_and_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    return SPDYPruner(model, config, tokenizer=tokenizer).prune(calibration=calibration, progress=progress)
