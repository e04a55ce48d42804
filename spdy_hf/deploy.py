"""A profile's fast form: the model with removed heads and neurons cut out and sparse kernels swapped in, in place.

The checkpoint is always the zero-filled dense model (it loads anywhere); this is what runs it fast on the backend
it was profiled for. Used by verify (on a copy), by `PruningResult.to_sparse_kernels` and by `load_pretrained`.
Deployed modules cannot be saved as a checkpoint.
"""

from __future__ import annotations

from torch import nn

from .apply import UnitLayout, apply_sparse_kernels
from .errors import SPDYError
from .structured import find_structured_groups, group_name, shrink
from .units import Unit

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
        from .latency.cuda import TwoFourSwap

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


def deploy_profile(model: nn.Module, profile: list[dict], groups: list[dict] | None, backend: str) -> nn.Module:
    """A saved or returned profile's fast form (`spdy_profile.json`'s "units" and "groups" entries), in place."""
    if groups is not None:
        return deploy_groups(model, groups, backend, *layout_maps(profile))
    modules = dict(model.named_modules())
    missing = [p["name"] for p in profile if p["name"] not in modules]
    if missing:
        raise SPDYError(f"The model has no module {missing[0]}; was the profile saved from another architecture?")
    units = [Unit(name=p["name"], module=modules[p["name"]], block=p["name"].rsplit(".", 1)[0]) for p in profile]
    return deploy_units(model, units, [p["sparsity"] for p in profile], [p.get("pattern", "dense") for p in profile],
                        backend, *layout_maps(profile))
