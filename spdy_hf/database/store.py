"""The on-disk pruning database: one safetensors file per unit, a manifest written last.

Layout of a database directory:

    build.json                  what the database was built from (written first; a resume must match it)
    units/<unit name>.safetensors   one unit's levels (see `encode_levels`), written atomically
    manifest.json               written last, once every unit is there: units, shapes, measured errors

A build that stops half way leaves `build.json` and the finished units; the next build with the same inputs
loads those and computes only the missing ones. Files are written to a temporary name and renamed, so a unit
file is either complete or absent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator

import torch

from ..errors import SPDYError
from ..utils.io import atomic_write_json, default_mode

logger = logging.getLogger(__name__)

STORE_VERSION = 4  # part of every build key: a change to how databases are computed invalidates caches


class DamagedUnitError(SPDYError):
    """A stored unit's file is unreadable or not what was written (truncated, overwritten, bit rot)."""


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """A checksum of tensors' names, dtypes, shapes and bytes (written with each unit, checked on every load)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def encode_levels(weights: list[torch.Tensor], masks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Nested levels of one unit in compact form.

    `pruned_at` (out, in, uint8) holds the level at which each entry was pruned (K for never); level k's weight
    is zero where `pruned_at <= k` and `values.k` (its surviving entries, row-major) elsewhere. Storing survivors
    only costs about 7 dense copies for the 42 SPDY levels instead of 42.
    """
    n_levels = len(weights)
    if n_levels > 255:
        raise ValueError("At most 255 levels fit the uint8 encoding.")
    pruned_at = torch.full(weights[0].shape, n_levels, dtype=torch.uint8)
    for k, mask in enumerate(masks):
        pruned_at[mask & (pruned_at == n_levels)] = k
    tensors = {"pruned_at": pruned_at}
    for k, w in enumerate(weights):
        tensors[f"values.{k}"] = w[pruned_at > k].to(torch.float32).contiguous()
    return tensors


def decode_level(tensors: dict[str, torch.Tensor], level: int) -> torch.Tensor:
    """The (out, in) weight of one level from `encode_levels`' tensors."""
    pruned_at = tensors["pruned_at"]
    w = torch.zeros(pruned_at.shape, dtype=torch.float32)
    w[pruned_at > level] = tensors[f"values.{level}"]
    return w


class DatabaseStore:
    """A database directory (see the module docstring). `build` describes the inputs; a directory built from
    other inputs is never mixed in: it is an error, so nothing a user stored is overwritten."""

    def __init__(self, directory: str | os.PathLike, build: dict):
        self.directory = os.fspath(directory)
        self.build = json.loads(json.dumps(build))  # plain JSON types, comparable with what is read back
        self.unit_dir = os.path.join(self.directory, "units")

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.directory, "manifest.json")

    def open(self) -> None:
        """Creates the directory, or checks that an existing one was built from the same inputs.

        A new directory appears whole: its skeleton (build.json, units/) is made beside it and renamed into place,
        so two jobs building the same database at once never see each other's half-made directory; the one whose
        rename loses uses the winner's."""
        build_path = os.path.join(self.directory, "build.json")
        if not os.path.exists(self.directory):
            parent = os.path.dirname(os.path.abspath(self.directory))
            os.makedirs(parent, exist_ok=True)
            skeleton = tempfile.mkdtemp(prefix=f".{os.path.basename(self.directory)}.tmp-", dir=parent)
            os.chmod(skeleton, default_mode(directory=True))
            os.makedirs(os.path.join(skeleton, "units"))
            atomic_write_json(os.path.join(skeleton, "build.json"), self.build)
            try:
                os.rename(skeleton, self.directory)
                return
            except OSError:  # another job created it first: check theirs below
                shutil.rmtree(skeleton, ignore_errors=True)
        if os.path.isfile(build_path):
            try:
                with open(build_path, encoding="utf-8") as f:
                    existing = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise SPDYError(f"The pruning database {self.directory} has an unreadable build.json ({e}); "
                                "delete the directory or choose another database.dir.") from e
            if existing != self.build:
                differ = sorted(k for k in set(existing) | set(self.build) if existing.get(k) != self.build.get(k))
                raise SPDYError(
                    f"The pruning database {self.directory} was built from other inputs (differing: "
                    f"{', '.join(differ)}); delete it or choose another database.dir.")
            done = len(self.stored_units())
            if done:
                logger.info("Resuming the pruning database in %s: %d units already stored.", self.directory, done)
            return
        if os.path.isdir(self.directory) and os.listdir(self.directory):
            raise SPDYError(f"{self.directory} is not empty and holds no pruning database; choose another "
                            "database.dir.")
        os.makedirs(self.unit_dir, exist_ok=True)
        atomic_write_json(build_path, self.build)

    def stored_units(self) -> set[str]:
        if not os.path.isdir(self.unit_dir):
            return set()
        return {f[: -len(".safetensors")] for f in os.listdir(self.unit_dir)
                if f.endswith(".safetensors") and not f.startswith(".")}

    def unit_path(self, unit_name: str) -> str:
        """The file a unit is stored in."""
        return self._path(unit_name)

    def _path(self, unit_name: str) -> str:
        if "/" in unit_name or os.sep in unit_name or unit_name.startswith("."):
            raise SPDYError(f"Unit name {unit_name!r} cannot name a file.")
        return os.path.join(self.unit_dir, f"{unit_name}.safetensors")

    def save_unit(self, unit_name: str, tensors: dict[str, torch.Tensor], errors: torch.Tensor) -> None:
        from safetensors.torch import save_file

        os.makedirs(self.unit_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=self.unit_dir)
        os.close(fd)
        tensors = {**tensors, "errors": errors.to(torch.float64).contiguous()}
        try:
            save_file(tensors, tmp, metadata={"store_version": str(STORE_VERSION), "unit": unit_name,
                                              "sha256": tensors_digest(tensors)})
            os.chmod(tmp, default_mode())
            os.replace(tmp, self._path(unit_name))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def load_unit(self, unit_name: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One stored unit, after checking its contents against the checksum written with it.

        Raises:
            DamagedUnitError: the file cannot be read, or its contents are not what was written.
        """
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = self._path(unit_name)
        try:
            tensors = load_file(path)
            with safe_open(path, framework="pt") as f:
                expected = (f.metadata() or {}).get("sha256")
        except Exception as e:  # truncated or overwritten: say which, and how to recover
            raise DamagedUnitError(f"Cannot read {path} ({e}); delete it and the build resumes without it.") from e
        if expected is None or tensors_digest(tensors) != expected:
            raise DamagedUnitError(f"{path} does not hold what was written to it (checksum mismatch); delete it "
                                   "and the build resumes without it.")
        errors = tensors.pop("errors").clone()  # held for the whole job: not a view of the file's memory map
        return tensors, errors

    def load_stored(self, names: set[str]) -> dict[str, tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """The stored units among `names` that are intact. A damaged one is deleted with a warning (and the store
        marked incomplete), so the build computes it again instead of loading it."""
        return dict(self.iter_stored(names))

    def iter_stored(self, names: set[str]) -> Iterator[tuple[str, tuple[dict[str, torch.Tensor], torch.Tensor]]]:
        """`load_stored` one unit at a time, for a caller that keeps only part of each (the memory of one unit's
        tensors at a time, not of the whole database)."""
        for name in sorted(self.stored_units() & set(names)):
            try:
                unit = self.load_unit(name)
            except DamagedUnitError as e:
                logger.warning("%s Computing it again.", e)
                os.unlink(self._path(name))
                if self.is_complete():
                    os.unlink(self.manifest_path)
                continue
            yield name, unit

    def is_complete(self) -> bool:
        return os.path.isfile(self.manifest_path)

    def write_manifest(self, units: list[dict]) -> None:
        atomic_write_json(self.manifest_path, {"store_version": STORE_VERSION, "build": self.build, "units": units})


class StoredTensors:
    """A stored unit's tensors as a read-only mapping: the small ones held in memory, those whose names start with
    one of `lazy` read from the unit's file each time they are asked for (the weights of its levels: a database's
    bulk, which a search reads only for the units it stitches).

    The file was checked against its checksum when it was loaded; a later read first checks that the file is still
    the one loaded (its size, time and inode), and one that was deleted or replaced meanwhile raises
    `DamagedUnitError` (or, replaced by a file with the same checksum, an identical rebuild, is checked again and
    read)."""

    def __init__(self, path: str, tensors: dict[str, torch.Tensor], lazy: tuple[str, ...]):
        self.path = path
        self._names = set(tensors)
        # copies: a loaded tensor is a view of its file's memory map, which would keep the whole file resident
        # (the lazy tensors too, every page of which the checksum has read) for as long as the view lives
        self._held = {k: v.clone() for k, v in tensors.items() if not k.startswith(lazy)}
        self._stamp = _file_stamp(path)
        self._digest = _stored_digest(path)

    def __contains__(self, key: str) -> bool:
        return key in self._names

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._held:
            return self._held[key]
        if key not in self._names:
            raise KeyError(key)
        from safetensors import safe_open

        self._check_unchanged()
        with safe_open(self.path, framework="pt") as f:
            return f.get_tensor(key)

    def get(self, key: str, default=None):
        return self[key] if key in self._names else default

    def _check_unchanged(self) -> None:
        stamp = _file_stamp(self.path)
        if stamp == self._stamp:
            return
        hint = ("the database directory was changed while this job used it (deleted, or rebuilt by another job); "
                "run the job again and it rebuilds what is missing, or give each concurrent job its own cache_dir")
        if stamp is None:
            raise DamagedUnitError(f"{self.path} is gone: {hint}.")
        from safetensors.torch import load_file

        try:
            same = self._digest is not None and tensors_digest(load_file(self.path)) == self._digest
        except Exception:  # unreadable: as damaged as a different file
            same = False
        if not same:
            raise DamagedUnitError(f"{self.path} is not the file loaded at the start of this job: {hint}.")
        self._stamp = stamp  # an identical rebuild: read it from now on


def _file_stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _stored_digest(path: str) -> str | None:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return (f.metadata() or {}).get("sha256")


def solve_cost(shape: tuple[int, int]) -> float:
    """The relative cost of solving one unit of weight shape (out, in) by OBS: its Hessian's inverse (in³) and the
    updates of its rows (out · in²). What the processes of a spread job share the units out by."""
    out_features, in_features = shape
    return float(in_features) ** 2 * (out_features + in_features)


def load_stored_elsewhere(store: DatabaseStore, names: list[str], entries: dict, errors: dict,
                          lazy: tuple[str, ...]) -> None:
    """Reads the units `names`, which the job's other processes solved and stored, into `entries` (their small
    tensors held, `lazy` ones left in their files) and `errors`.

    Raises:
        SPDYError: a unit is not in the store: the processes do not share the database directory.
    """
    if not names:
        return
    for name, (tensors, err) in store.iter_stored(set(names)):
        entries[name], errors[name] = StoredTensors(store.unit_path(name), tensors, lazy), err
        del tensors
    missing = [name for name in names if name not in entries]
    if missing:
        raise SPDYError(f"The job's other processes solved {len(missing)} units ({missing[0]}, ...) that are not in "
                        f"{store.directory}: every process must see the same database directory (one machine, or a "
                        "filesystem they share; set database.dir to one).")


def agreed_pending(processes, units: list, entries: dict, errors: dict) -> list:
    """The units (of `units`, in order) still to solve: those not in `entries`, as the main process sees them, in
    every process of the job (a unit another process read but the main process found damaged is solved again)."""
    names = processes.share([u.name for u in units if u.name not in entries])
    for name in names:
        entries.pop(name, None)
        errors.pop(name, None)
    names = set(names)
    return [u for u in units if u.name in names]
