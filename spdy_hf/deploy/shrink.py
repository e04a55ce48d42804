"""A profile's fast form: the model with removed heads and neurons cut out and sparse kernels swapped in, in place.

The checkpoint is always the zero-filled dense model (it loads anywhere); this is what runs it fast on the backend
it was profiled for. Used by verify (on a copy), by `PruningResult.to_sparse_kernels` and by `load_pretrained`.
Deployed modules cannot be saved as a checkpoint.
"""

from __future__ import annotations

from torch import nn

from ..errors import SPDYError
from ..modeling.groups import find_structured_groups, group_name, shrink
from ..modeling.units import Unit
from ..utils.io import read_json
from .kernels import UnitLayout, apply_sparse_kernels

STRUCTURED_SPARSE = "structured+sparse"  # the mixed family's combination: heads/neurons removed, the rest sparse


def layout_maps(profile: list[dict]) -> tuple[dict[str, str], dict[str, str]]:
    """Each unit's layout code and input leader, from saved profile entries (what `deploy_groups` takes)."""
    return ({p["name"]: p.get("layout", "cc") for p in profile},
            {p["name"]: p["input_leader"] for p in profile if p.get("input_leader")})


def deploy_units(model: nn.Module, units: list[Unit], sparsities: list[float], patterns: list[str],
                 backend: str = "cpu", unit_layouts: dict[str, str] | None = None,
                 input_leaders: dict[str, str] | None = None) -> nn.Module:
    """Puts per-layer sparse levels on the backend's kernels: 2:4 semi-structured weights on cuda, `FastLinear`s
    (CSR where sparse, in the layouts the latency table was measured with) on cpu."""
    if backend == "cuda":
        from .two_four import TwoFourSwap

        TwoFourSwap(model, units, patterns).use_deployed()
        return model
    index = {u.name: i for i, u in enumerate(units)}
    layouts = [UnitLayout((unit_layouts or {}).get(u.name, "cc"), index.get((input_leaders or {}).get(u.name)))
               for u in units]
    return apply_sparse_kernels(model, units, sparsities, layouts)


def deploy_groups(model: nn.Module, group_entries: list[dict], backend: str = "cpu",
                  unit_layouts: dict[str, str] | None = None, input_leaders: dict[str, str] | None = None
                  ) -> nn.Module:
    """Puts a structured/mixed profile's fast form into `model` (zero-filled weights), in place: groups with a
    structured level are shrunk to their kept heads/neurons; groups with a sparse level run their layers on the
    backend's sparse kernels; groups with both are shrunk, then their remaining layers run sparse."""
    groups = {group_name(g): g for g in find_structured_groups(model)}
    sparse_units, sparsities, patterns = [], [], []
    modules = dict(model.named_modules())
    for entry in group_entries:
        group = groups.get(entry["name"])
        if group is None:
            raise SPDYError(f"The model has no group {entry['name']}; was it saved from another architecture?")
        if entry["family"] in ("structured", STRUCTURED_SPARSE) and len(entry["kept"]) < group.num_groups:
            shrink(model, group, entry["kept"])
            modules = dict(model.named_modules())
        if entry["family"] in ("unstructured", STRUCTURED_SPARSE) and entry["kept"] and (
                entry["sparsity"] > 0 or entry["pattern"] == "2:4"):
            for name in [*group.producers, group.consumer]:
                sparse_units.append(Unit(name=name, module=modules[name], block=group.block))
                sparsities.append(entry["sparsity"])
                patterns.append(entry["pattern"])
    if not sparse_units:
        return model
    return deploy_units(model, sparse_units, sparsities, patterns, backend, unit_layouts, input_leaders)


def read_profile_file(path: str) -> tuple[list, list | None]:
    """The "units" and "groups" (None where absent) of a `spdy_profile.json`, unchecked (see `check_profile`)."""
    saved = read_json(path)
    if not isinstance(saved, dict) or "units" not in saved:
        raise SPDYError(f"{path}: a spdy_profile.json is an object with a 'units' list; this one is not.")
    return saved["units"], saved.get("groups")


def check_profile(model: nn.Module, profile, groups) -> None:
    """Checks a profile read from a file (`spdy_profile.json`) against the model before anything is built from
    it; raises `SPDYError` naming the first bad field."""
    def bad(where: str, why: str):
        raise SPDYError(f"spdy_profile.json: {where} {why}; the file is damaged or not from this model.")

    def fraction(where: str, value) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            bad(where, f"= {value!r} must be a sparsity in [0, 1]")

    modules = dict(model.named_modules())
    if not isinstance(profile, list) or (groups is not None and not isinstance(groups, list)):
        bad("'units' / 'groups'", "must be lists")
    for i, p in enumerate(profile):
        if not isinstance(p, dict) or not isinstance(p.get("name"), str) or p["name"] not in modules:
            bad(f"units[{i}].name", f"= {p.get('name') if isinstance(p, dict) else p!r} names no module of the model")
        fraction(f"units[{i}].sparsity", p.get("sparsity"))
        if p.get("pattern", "dense") not in ("dense", "unstructured", "2:4", "structured"):
            bad(f"units[{i}].pattern", f"= {p.get('pattern')!r} is not dense, unstructured, 2:4 or structured")
        if p.get("layout", "cc") not in ("cc", "ct", "tc", "tt", "sc", "st"):
            bad(f"units[{i}].layout", f"= {p.get('layout')!r} is not a layout code")
    model_groups = {group_name(g): g for g in find_structured_groups(model)}
    for i, g in enumerate(groups or []):
        group = model_groups.get(g.get("name")) if isinstance(g, dict) else None
        if group is None:
            bad(f"groups[{i}].name", "names no attention/FFN group of the model")
        if g.get("family") not in ("dense", "structured", "unstructured", STRUCTURED_SPARSE):
            bad(f"groups[{i}].family", f"= {g.get('family')!r} is not a level family")
        kept = g.get("kept")
        if not isinstance(kept, list) or len(set(kept)) != len(kept) or not all(
                isinstance(k, int) and not isinstance(k, bool) and 0 <= k < group.num_groups for k in kept):
            bad(f"groups[{i}].kept", f"must list distinct head/neuron indices in [0, {group.num_groups})")
        fraction(f"groups[{i}].sparsity", g.get("sparsity"))
        order = g.get("removal_order")  # optional (older profiles lack it): the removed ones, in removal order
        if order is not None and (not isinstance(order, list) or sorted(order) != sorted(
                set(range(group.num_groups)) - set(kept)) or not all(isinstance(k, int) for k in order)):
            bad(f"groups[{i}].removal_order", "must list each head/neuron the group removes, once")


def deploy_profile(model: nn.Module, profile: list[dict], groups: list[dict] | None, backend: str) -> nn.Module:
    """A saved or returned profile's fast form (`spdy_profile.json`'s "units" and "groups" entries), in place."""
    check_profile(model, profile, groups)
    if groups is not None:
        return deploy_groups(model, groups, backend, *layout_maps(profile))
    modules = dict(model.named_modules())
    units = [Unit(name=p["name"], module=modules[p["name"]], block=p["name"].rsplit(".", 1)[0]) for p in profile]
    return deploy_units(model, units, [p["sparsity"] for p in profile], [p.get("pattern", "dense") for p in profile],
                        backend, *layout_maps(profile))
