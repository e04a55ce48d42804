"""The data-aware pruning database: OBS (SparseGPT-style) levels of every unit from sequential calibration.

`build_obs_database` runs the calibration set block by block (`SequentialCalibrator`), prunes every unit of a
block to every level from one Hessian (`obs_prune_levels`), measures each level's relative output error on
the calibration inputs, and stores each unit as it finishes (`DatabaseStore`), so an interrupted build resumes
where it stopped. What the next block sees is chosen by `propagation`: the outputs of the block pruned to the
`anchor` level ("pruned", SparseGPT's practice: later layers learn to correct earlier ones' errors), or of the
dense block ("dense": every unit calibrated on dense inputs, as if pruned alone).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time

import numpy as np
import torch
from torch import nn

from ..calibration.sequential import UnitStatistics, calibrate_windows
from ..errors import SPDYError
from ..modeling.units import Unit
from ..utils.io import release_free_memory
from ..utils.processes import current_processes
from .base import PruningDatabase
from .obs import obs_prune_levels, obs_prune_nm
from .store import (
    STORE_VERSION,
    DatabaseStore,
    StoredTensors,
    agreed_pending,
    decode_level,
    encode_levels,
    load_stored_elsewhere,
    solve_cost,
)

logger = logging.getLogger(__name__)

PROPAGATIONS = ("pruned", "dense")
# a stored unit's level values (about 7 weights' worth at the 42 SPDY levels), read from its file when a level is
# stitched; only `pruned_at` (a byte per weight) is held in memory
LAZY = ("values.", "nm.")


def default_patterns(levels: list[float]) -> list[str]:
    return ["dense"] + ["unstructured"] * (len(levels) - 1)


def level_weight(tensors: dict[str, torch.Tensor], level: int, patterns: list[str]) -> torch.Tensor:
    """Level `level`'s (out, in) weight from a unit's stored tensors: nested levels from `encode_levels`' form
    (indexed among the non-2:4 levels), 2:4 levels stored whole as `nm.<level>`."""
    if patterns[level] == "2:4":
        return tensors[f"nm.{level}"].clone()
    return decode_level(tensors, sum(1 for p in patterns[:level] if p != "2:4"))


class EncodedDatabase(PruningDatabase):
    """A database of levels in `encode_levels` form, one mapping of tensors per unit (a dict, or `StoredTensors`
    that read a stored unit's level values from disk when a level is stitched), plus measured errors."""

    def __init__(self, units: list[Unit], levels: list[float], encoded: list[dict[str, torch.Tensor]],
                 errors: np.ndarray | None = None, patterns: list[str] | None = None):
        super().__init__(units, levels)
        if len(encoded) != len(units):
            raise ValueError("One encoded entry per unit is needed.")
        self.encoded = encoded
        self.errors = errors  # (U, K) relative output error on the calibration set, or None
        self.patterns = list(patterns) if patterns is not None else default_patterns(levels)

    def weight(self, unit_index: int, level_index: int) -> torch.Tensor:
        return level_weight(self.encoded[unit_index], level_index, self.patterns)


def relative_output_errors(weights: list[torch.Tensor], hessian: torch.Tensor,
                           residual: torch.Tensor | None = None) -> torch.Tensor:
    """||(W_k - W) X||^2 / ||W X||^2 for every level k, from H = 2 X X^T / n (no data pass needed). With
    `residual`, the Hessian the levels' errors are taken on instead (the inputs' covariance, for levels whose bias
    absorbs the mean); the norm stays the dense output's."""
    h = hessian.to(torch.float32)
    r = h if residual is None else residual.to(device=h.device, dtype=torch.float32)
    dense = weights[0].to(device=h.device, dtype=torch.float32)
    norm = float(((dense @ h) * dense).sum(dtype=torch.float64))
    out = torch.zeros(len(weights), dtype=torch.float64)
    if norm <= 0:
        return out
    for k, w in enumerate(weights[1:], start=1):
        delta = w.to(device=h.device, dtype=torch.float32) - dense
        out[k] = max(0.0, float(((delta @ r) * delta).sum(dtype=torch.float64))) / norm
    return out


def windows_digest(windows: dict[str, torch.Tensor]) -> str:
    """A fingerprint of the calibration windows: the database depends on exactly these tokens. Padded windows
    carry a mark of their own: their Hessians leave the padding out, and a store written by a version that counted
    it must not be read for them."""
    h = hashlib.sha1()
    for key in sorted(windows):
        t = windows[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    mask = windows.get("attention_mask")
    if isinstance(mask, torch.Tensor) and not bool(mask.bool().all()):
        h.update(b"padding left out")
    return h.hexdigest()


def solve_unit(stats: UnitStatistics, levels: list[float], patterns: list[str], dampening: float,
               block_size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One unit's levels from its weight and Hessian: the nested unstructured levels by OBS (encoded), 2:4 levels by
    OBS saliency in every group of 4 inputs; and the relative output error of each level."""
    nested = [k for k, p in enumerate(patterns) if p != "2:4"]
    nested_weights, masks = obs_prune_levels(stats.weight, stats.hessian, [levels[k] for k in nested],
                                             damp=dampening, blocksize=block_size, return_masks=True)
    nested_weights = [w.cpu() for w in nested_weights]
    weights = [None] * len(levels)
    for k, w in zip(nested, nested_weights):
        weights[k] = w
    tensors = encode_levels(nested_weights, [m.cpu() for m in masks])
    for k, pattern in enumerate(patterns):
        if pattern == "2:4":
            if stats.weight.shape[1] % 4 == 0:
                w = obs_prune_nm(stats.weight, stats.hessian, 2, 4, damp=dampening, blocksize=block_size).cpu()
            else:  # a shape 2:4 cannot take; the latency table gives it no 2:4 time either
                w = stats.weight.clone()
            weights[k] = tensors[f"nm.{k}"] = w.contiguous()
    return tensors, relative_output_errors(weights, stats.hessian)


def build_obs_database(
    model: nn.Module,
    units: list[Unit],
    levels: list[float],
    windows: dict[str, torch.Tensor],
    *,
    directory: str | os.PathLike,
    patterns: list[str] | None = None,
    build_info: dict | None = None,
    anchor_level: int | None = None,
    propagation: str = "pruned",
    dampening: float = 0.01,
    block_size: int = 128,
    batch_size: int = 8,
    device: str | None = None,
    progress: bool = True,
) -> EncodedDatabase:
    """Builds (or resumes, or loads) the OBS database of `units` in `directory`.

    Args:
        windows: calibration token windows, `{"input_ids": (N, L), "attention_mask": (N, L)}`.
        patterns: the pattern of each level ("dense", "unstructured", "2:4"; `spdy_hf.modeling.levels.get_patterns`); by
            default dense then unstructured. Unstructured levels are nested; 2:4 levels are chosen by OBS
            saliency in every group of 4 inputs, from the same Hessian.
        directory: where the database lives; a finished one is loaded without touching the model.
        build_info: extra facts the database depends on (the model fingerprint, say), checked on resume.
        anchor_level: the level whose outputs feed the next block with `propagation="pruned"`.
        dampening: fraction of the Hessian's mean diagonal added to it before inversion.
        block_size: columns per lazy batch of the OBS solver.
        batch_size: calibration windows per forward pass.
        device: where blocks run (each moved there for its turn); default where the model is.
    """
    if propagation not in PROPAGATIONS:
        raise SPDYError(f"propagation={propagation!r}; use one of {PROPAGATIONS}.")
    n_levels = len(levels)
    patterns = list(patterns) if patterns is not None else default_patterns(levels)
    if len(patterns) != n_levels or patterns[0] != "dense":
        raise SPDYError("patterns must give one pattern per level, 'dense' first.")
    anchor = n_levels - 1 if anchor_level is None else int(anchor_level)
    if not 0 <= anchor < n_levels:
        raise SPDYError(f"anchor_level={anchor_level} is outside the {n_levels} levels.")
    build = {
        "store_version": STORE_VERSION, "method": "obs", "levels": [float(x) for x in levels], "patterns": patterns,
        "units": [[u.name, list(u.shape)] for u in units], "calibration": windows_digest(windows),
        "propagation": propagation, "anchor_level": anchor if propagation == "pruned" else None,
        "dampening": float(dampening), "block_size": int(block_size), **(build_info or {}),
    }
    store = DatabaseStore(directory, build)
    store.open()
    encoded: dict[str, dict[str, torch.Tensor]] = {}
    errors: dict[str, torch.Tensor] = {}
    if store.is_complete():
        logger.info("Loading the finished pruning database from %s.", store.directory)
    start = time.perf_counter()
    for name, (tensors, err) in store.iter_stored({u.name for u in units}):  # one at a time, `LAZY` left on disk
        encoded[name], errors[name] = StoredTensors(store.unit_path(name), tensors, LAZY), err
    release_free_memory()
    processes = current_processes()
    processes.barrier()  # every process has read what was stored before any process stores more

    if len(encoded) < len(units):
        solved = 0
        # under `accelerate launch` each process solves its share of every block's units and reads the others' from
        # the store; with pruned propagation the processes meet after each block, whose pruned outputs feed the next
        pending = agreed_pending(processes, units, encoded, errors)
        owners = dict(zip([u.name for u in pending], processes.owners([solve_cost(u.shape) for u in pending])))
        elsewhere = [u.name for u in pending if owners[u.name] != processes.rank]

        def needs_statistics(block_name: str) -> bool:
            if propagation == "pruned":  # every process runs every block with units to solve: they meet after it
                return any(u.name in owners for u in units if u.block == block_name)
            return any(owners.get(u.name) == processes.rank for u in units if u.block == block_name)

        def process_block(block_name: str, block_units: list[Unit], stats: dict[str, UnitStatistics]):
            nonlocal solved
            for unit in block_units:
                if unit.name in encoded or owners.get(unit.name) != processes.rank:
                    continue
                encoded[unit.name], errors[unit.name] = solve_unit(stats[unit.name], levels, patterns, dampening,
                                                                   block_size)
                store.save_unit(unit.name, encoded[unit.name], errors[unit.name])
                encoded[unit.name] = StoredTensors(store.unit_path(unit.name), encoded[unit.name], LAZY)
                solved += 1
                release_free_memory()
            if propagation == "dense":
                return None
            processes.barrier()
            load_stored_elsewhere(store, [u.name for u in block_units if u.name not in encoded], encoded, errors,
                                  LAZY)
            return {u.name: level_weight(encoded[u.name], anchor, patterns) for u in block_units}

        if propagation == "pruned" or any(owner == processes.rank for owner in owners.values()):
            calibrate_windows(model, units, windows, batch_size, needs_statistics, process_block, device=device,
                              progress=progress)
        processes.barrier()
        load_stored_elsewhere(store, [name for name in elsewhere if name not in encoded], encoded, errors, LAZY)
        logger.info("OBS database: %d units solved%s, %d loaded, in %.1f s.", solved,
                    f" here, {len(elsewhere)} by the job's other processes" if processes.spread else "",
                    len(units) - solved - len(elsewhere), time.perf_counter() - start)
    if not store.is_complete() and processes.is_main:
        store.write_manifest([{"name": u.name, "shape": list(u.shape), "errors": errors[u.name].tolist()}
                              for u in units])
    error_matrix = np.stack([errors[u.name].numpy() for u in units])
    return EncodedDatabase(units, levels, [encoded[u.name] for u in units], error_matrix, patterns)


def load_obs_database(directory: str | os.PathLike, units: list[Unit], levels: list[float]) -> EncodedDatabase:
    """A finished database (one with a manifest) from `directory`, for these units and levels."""
    import json

    store = DatabaseStore(directory, build={})
    if not store.is_complete():
        raise SPDYError(f"{store.directory} holds no finished pruning database (no manifest.json); build it first.")
    with open(store.manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
    built = manifest["build"]
    if [float(x) for x in built["levels"]] != [float(x) for x in levels]:
        raise SPDYError(f"The pruning database in {store.directory} has other levels than the ones asked for.")
    names = [name for name, _ in built["units"]]
    missing = [u.name for u in units if u.name not in names]
    if missing:
        raise SPDYError(f"The pruning database in {store.directory} lacks units {missing[:3]}...")
    encoded, errors = [], []
    for unit in units:
        tensors, err = store.load_unit(unit.name)
        encoded.append(StoredTensors(store.unit_path(unit.name), tensors, LAZY))
        errors.append(err.numpy())
        del tensors
    return EncodedDatabase(units, levels, encoded, np.stack(errors), built.get("patterns"))
