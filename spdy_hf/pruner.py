"""`SPDYPruner` and `prune_pretrained`: model + calibration data + config -> a pruned model that meets a measured
speedup.

The pruner checks the job and turns calibration data into token windows; `spdy_hf.pipeline.run` runs the stages
(profile, budget, database, search, verify, recovery) for the config's level family (`spdy_hf.families`), for one
target (`prune`) or several in one run (`prune_targets`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .calibration import calibration_windows
from .config import SPDYConfig
from .errors import ConfigError, SPDYError
from .families import family_for
from .latency import LatencyTable
from .latency.backend import model_device, to_target_device, working_dtype
from .modeling.loading import loaded_from_gguf, own_memory, plain_checkpoint
from .modeling.units import find_units
from .output.result import PruningResult
from .pipeline import Job, StageTimer, run_pipeline, run_targets
from .pipeline.quality import heldout_windows, is_causal_lm
from .pipeline.run import profile_stage
from .search.lowered import bfloat16_is_faster
from .utils.processes import current_processes

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
        family_for(self.config)  # an unknown family or dtype is an error now, not after the model is prepared
        self.tokenizer = tokenizer
        self.stage_seconds: dict[str, float] = {}  # wall seconds of the last job's stages

    def prune(
        self,
        calibration=None,
        latency_table: LatencyTable | str | None = None,
        progress: bool = True,
    ) -> PruningResult | None:
        """Runs every stage and returns the pruned model (dense weights with zeros) with its profile and report.

        Under `accelerate launch` the processes share the database and the search; the main process returns the
        result, the others None (`spdy_hf.utils.processes`).

        Args:
            calibration: texts, a `datasets.Dataset`, or token windows (`{"input_ids": (N, L) tensor, ...}`); by
                default the config's calibration source (the built-in offline corpus unless set).
            latency_table: a table (or its path) to use instead of measuring; overrides `config.latency_table`.
            progress: show progress bars.

        Raises:
            UnreachableTargetError: the target cannot be met; raised after profiling, before any other stage.
        """
        return run_pipeline(self._job(calibration, latency_table, progress))

    def prune_targets(
        self,
        targets: Sequence[float],
        calibration=None,
        latency_table: LatencyTable | str | None = None,
        progress: bool = True,
    ) -> Iterator[PruningResult]:
        """Prunes to each of several targets in one run, yielding one result per target, in the order given.

        What does not depend on the target is done once: the latency table, the dense model's held-out reference
        and (for the structured family, the default) the pruning database. Each target after the first tries the
        earlier searches' best sensitivities before its own full search (`search.warm_candidates`: a short search
        from them instead). Every target is searched, verified and recovered on its own, so each result is what a
        job for that target alone would give, up to the search's starting points.

        The results share one model, which the next target restores to dense and prunes again: save, export or
        copy each result before asking for the next (a result whose model has moved on raises on `save_pretrained`).

        Example:
            ```python
            >>> for result in SPDYPruner(model, tokenizer=tokenizer).prune_targets([1.25, 1.5, 2.0]):
            ...     result.save_pretrained(f"out-{result.report['target_speedup']:g}x")
            ```

        Raises:
            UnreachableTargetError: a target cannot be met; raised after profiling, before any result.
        """
        targets = check_targets(targets)
        return run_targets(self._job(calibration, latency_table, progress), targets)

    def profile(self, latency_table: LatencyTable | str | None = None, progress: bool = True) -> LatencyTable:
        """Only the profiling stage: the latency table of this model in the config's regime, on its backend
        (measured, or read from the cache); with the structured or mixed family, it holds the structured levels'
        times too. Measure it on the target machine, then pass it (saved with `LatencyTable.save`) as
        `latency_table` to prune anywhere."""
        model = self._prepare()
        family = family_for(self.config)(self.config, model, progress)
        units = find_units(model, self.config.skip_modules, example_inputs=family.inputs)  # the regime's own work
        processes = current_processes()
        with processes.timing():  # under `accelerate launch` the main process measures, alone, on every core
            return profile_stage(family, units, latency_table, processes).table

    # ------------------------------------------------------------------ inputs
    def _job(self, calibration, latency_table, progress: bool) -> Job:
        """The job `prune` and `prune_targets` run: the model prepared, the calibration windows made, the stage
        clock reset (`stage_seconds`)."""
        model = self._prepare()
        windows = self.calibration_windows(calibration)
        self.stage_seconds = {}
        return Job(config=self.config, model=model, windows=windows, heldout=self._heldout_windows(),
                   tokenizer=self.tokenizer, latency_table=latency_table, progress=progress,
                   stages=StageTimer(self.stage_seconds))

    def calibration_windows(self, calibration=None) -> dict[str, torch.Tensor]:
        """The token windows `prune` calibrates on: `calibration` (texts, a dataset, or windows as given), or the
        config's calibration source, cut to `calibration.sequence_length` tokens (the model's maximum if null)."""
        return calibration_windows(self.config, self.tokenizer, calibration, self._max_positions(),
                                   causal=is_causal_lm(self.model))

    def _prepare(self) -> nn.Module:
        """The model in eval mode on the backend's device, after checking the regime against it."""
        model = self.model.eval()
        self._check_model(model)
        current_processes(cuda=self.config.backend == "cuda")  # under a launcher: each process on its own GPU
        to_target_device(model, self.config.backend, self.config.regime.dtype)
        own_memory(model)  # a model loaded as views of its file would hold every weight written twice
        if self.config.backend == "cpu" and self.config.regime.dtype == "float32" and bfloat16_is_faster():
            logger.info("This CPU multiplies bfloat16 matrices natively: the dense model in bfloat16 is likely much "
                        "faster already, at the same quality (MiniLM 1.70x, SmolLM2-135M 1.92x on a 2-core Xeon; "
                        "docs/benchmarks/bfloat16.md). To prune for a speedup over that, pass --dtype bfloat16 "
                        "(regime.dtype).")
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


def check_targets(targets: Sequence[float]) -> list[float]:
    """The targets of a run with several, checked: one or more distinct speedups, each a valid `target_speedup`."""
    if isinstance(targets, (int, float)):
        targets = [targets]
    targets = list(targets)
    if not targets:
        raise ConfigError("No target speedups given: pass one or more, e.g. [1.25, 1.5, 2.0].")
    checked = [SPDYConfig(target_speedup=t).target_speedup for t in targets]  # each > 1, a number
    if len(set(checked)) != len(checked):
        raise ConfigError(f"The target speedups {targets} repeat one; give each once.")
    return checked


def prune_pretrained(name_or_path: str | None = None, config=None, calibration=None, trust_remote_code: bool = False,
                     progress: bool = True) -> PruningResult | None:
    """The one-liner: load a model (safetensors only; the bundled MiniLM by default) and prune it to
    `config.target_speedup` on `config.backend`, calibrating on `config.calibration` (the built-in corpus by
    default). Returns the `PruningResult` (`.model`, `.report`, `.save_pretrained`, `.push_to_hub`).

        result = spdy_hf.prune_pretrained("sentence-transformers/all-MiniLM-L6-v2", SPDYConfig(target_speedup=1.5))
    """
    from .modeling.loading import load_model_and_tokenizer

    config = config if config is not None else SPDYConfig()
    if isinstance(config, dict):
        config = SPDYConfig.from_dict(config)
    family_for(config)  # before the model is loaded
    model, tokenizer = load_model_and_tokenizer(name_or_path, trust_remote_code=trust_remote_code,
                                                dtype=working_dtype(config.backend, config.regime.dtype))
    return SPDYPruner(model, config, tokenizer=tokenizer).prune(calibration=calibration, progress=progress)
