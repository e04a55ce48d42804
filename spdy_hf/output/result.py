"""`PruningResult` and saving it: dense safetensors with zeros, loadable anywhere, plus SPDY's sidecars."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..config import SPDYConfig
from ..errors import SPDYError
from ..utils.io import atomic_write_json, default_mode

logger = logging.getLogger(__name__)

PROFILE_FILE = "spdy_profile.json"
REPORT_FILE = "spdy_report.json"
LATENCY_FILE = "spdy_latency_table.json"
CONFIG_KEY = "spdy"  # the key of SPDY's metadata in config.json


@dataclass
class PruningResult:
    """What `SPDYPruner.prune` returns.

    Attributes:
        model: the pruned model, dense weights with zeros (save it, fine-tune it, or call `to_sparse_kernels`).
        profile: per unit: name, shape, level, sparsity, dense_time_ms and time_ms.
        report: predicted and measured speedups, timings, scores, stage times and environment.
    """

    model: nn.Module
    tokenizer: Any
    config: SPDYConfig
    units: list = field(repr=False)
    profile: list[dict[str, Any]] = field(repr=False)
    report: dict[str, Any] = field(default_factory=dict)
    latency_table: Any = field(default=None, repr=False)
    # structured and mixed families: per attention/FFN group its family, kept heads/neurons or sparse level
    groups: list[dict[str, Any]] | None = field(default=None, repr=False)
    # a run with several targets went on to the next one, pruning this result's model again (`prune_targets`)
    superseded: bool = field(default=False, repr=False)

    def check_current(self) -> None:
        """Raises `SPDYError` when the model no longer holds this result (`superseded`)."""
        if self.superseded:
            raise SPDYError(f"This result's model (the {self.report.get('target_speedup')}x target) was pruned again "
                            "for the next target of the run: save, export or copy each result before asking for the "
                            "next one.")

    @property
    def target_met(self) -> bool | None:
        """Whether the measured speedup met the target (within `search.target_tolerance`); None where it could not
        be measured (the cuda backend without a GPU)."""
        return self.report.get("target_met")

    def to_sparse_kernels(self) -> nn.Module:
        """Swaps the units for their fast kernels, in place, for inference (save before this): on the cpu
        backend `FastLinear`s (CSR where sparse), on cuda `TwoFourLinear`s where the profile chose 2:4; with
        structured levels, the removed heads and neurons are cut out of the modules first."""
        from ..deploy.shrink import deploy_profile

        self.check_current()
        return deploy_profile(self.model, self.profile, self.groups, self.config.backend)

    def export(self, output: str | os.PathLike, format: str | None = None, **kwargs) -> str:
        """Writes the pruned model, its removed heads and neurons cut out, for a serving engine: `format` "gguf"
        (llama.cpp; Llama-family decoders) or "onnx" (ONNX Runtime), None to take it from the suffix of `output`.
        Keyword arguments as `spdy_hf.export.export_model` (dtype, tokenizer_from, tokenizer_pre, overwrite). The
        result's model is not changed. Returns the path written."""
        from ..export import export_result

        self.check_current()
        return export_result(self, os.fspath(output), format, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, overwrite: bool = False) -> str:
        """Writes model (safetensors), config, tokenizer, `spdy_profile.json`, `spdy_report.json`, the latency table,
        a model card (README.md) and a per-layer plot (spdy_profile.svg).

        Everything is written into a temporary directory beside the target and renamed into place at the end,
        so an interrupted save leaves no half-written output. An existing non-empty directory is replaced
        only with `overwrite=True`.
        """
        from ..deploy.kernels import FastLinear
        from ..modeling.groups import RemovedAttention

        self.check_current()
        if any(isinstance(m, (FastLinear, RemovedAttention)) for m in self.model.modules()) or \
                self.is_shrunk():
            raise SPDYError("The model runs on sparse kernels or shrunken modules (to_sparse_kernels) and cannot be "
                            "saved as a checkpoint; save the result before calling to_sparse_kernels().")
        target = os.path.abspath(os.fspath(save_directory))
        parent = os.path.dirname(target)
        clear_killed_saves(target)
        check_output_dir(target, overwrite)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-{os.getpid()}-", dir=parent)
        try:
            os.chmod(tmp, default_mode(directory=True))
            config = getattr(self.model, "config", None)
            if config is not None:
                setattr(config, CONFIG_KEY, self.metadata())
            try:
                self.model.save_pretrained(tmp, safe_serialization=True)
            finally:
                if config is not None and hasattr(config, CONFIG_KEY):
                    delattr(config, CONFIG_KEY)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            atomic_write_json(os.path.join(tmp, PROFILE_FILE), {"units": self.profile, **(
                {"groups": self.groups} if self.groups is not None else {})})
            atomic_write_json(os.path.join(tmp, REPORT_FILE), self.report)
            if self.latency_table is not None:
                self.latency_table.save(os.path.join(tmp, LATENCY_FILE))
            from ..integrations.hub import write_card

            write_card(tmp)  # README.md (model card) and spdy_profile.svg
            _replace_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("Saved the pruned model to %s.", target)
        return target

    def push_to_hub(self, repo_id: str, save_directory: str | os.PathLike | None = None, token: str | None = None,
                    private: bool | None = None, commit_message: str = "Upload SPDY-pruned model") -> str:
        """Saves (into `save_directory`, or a temporary directory) and uploads everything to the Hub repo
        `repo_id`: weights, config, tokenizer, profile, report, latency table, model card and plot. Returns the
        repo URL. A failed upload keeps the files and says how to retry; the token is never logged."""
        from ..integrations.hub import push_result

        return push_result(self, repo_id, save_directory=save_directory, token=token, private=private,
                           commit_message=commit_message)

    def is_shrunk(self) -> bool:
        """Whether a structured profile's modules were cut down (to_sparse_kernels): not saveable then."""
        if not self.groups:
            return False
        modules = dict(self.model.named_modules())
        for p in self.profile:
            module = modules.get(p["name"])
            if module is None:
                return True
            shape = module.weight.shape if isinstance(module, nn.Linear) else module.weight.shape[::-1]
            if list(shape) != list(p["shape"]):
                return True
        return False

    def metadata(self) -> dict[str, Any]:
        """SPDY's metadata for config.json: the job's config, the per-unit sparsities and the speedups."""
        keys = ("target_speedup", "predicted_speedup", "measured_speedup", "target_met", "backend", "regime",
                "overall_sparsity")
        return {
            "base_model": getattr(getattr(self.model, "config", None), "_name_or_path", None) or None,
            "config": self.config.to_dict(),
            "report": {k: self.report[k] for k in keys if k in self.report},
            "profile": {p["name"]: p["sparsity"] for p in self.profile},
            **({"structured": {e["name"]: e["keep"] for e in self.groups if e["family"] == "structured"}}
               if self.groups is not None else {}),
        }


def check_output_dir(path: str | os.PathLike, overwrite: bool = False) -> None:
    """Raises unless `path` is absent, an empty directory, or `overwrite` is set."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise SPDYError(f"Output path {path!r} is a file; choose a directory path.")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise SPDYError(
            f"Output directory {path!r} exists and is not empty; choose another one, or pass --overwrite "
            "(overwrite=True) to replace it."
        )


def clear_killed_saves(target: str) -> None:
    """What saves to `target` that were killed midway (their process is gone) left beside it: their temporary
    directories are removed; an output that a killed overwrite had moved aside, with no new one in its place, is
    put back. Saves still running (their process is alive) are left alone."""
    parent, base = os.path.split(target)
    pattern = re.compile(rf"\.{re.escape(base)}\.(tmp|old)-(\d+)-")
    for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        match = pattern.match(name)
        if match is None or _alive(int(match.group(2))):
            continue
        path = os.path.join(parent, name)
        if match.group(1) == "old" and not os.path.exists(target):
            os.rename(path, target)
            logger.warning("Put back %s: a save killed while replacing it had moved it to %s.", target, path)
        else:
            shutil.rmtree(path, ignore_errors=True)
            logger.info("Removed %s, left by a save that was killed (process %s).", path, match.group(2))


def _alive(pid: int) -> bool:
    if os.name == "nt":  # signal 0 is CTRL_C_EVENT there, not a probe: never clean up on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _replace_dir(tmp: str, target: str) -> None:
    if os.path.isdir(target):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-{os.getpid()}-", dir=os.path.dirname(target))
        os.rmdir(old)
        os.rename(target, old)  # keep the old output until the new one is in place
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
