"""The shape of the code, kept by a test: no two modules of spdy_hf import each other (directly or through
others, lazy imports inside functions and TYPE_CHECKING blocks included), no module imports another's private
(`_`-prefixed) names. How long a function or module is follows its idea, so no line count is checked."""

from __future__ import annotations

import ast
import dataclasses
import importlib
from pathlib import Path

import numpy as np
import pytest

from spdy_hf.config import SPDYConfig
from spdy_hf.errors import ConfigError
from spdy_hf.families import family_for, get_family
from spdy_hf.pruner import SPDYPruner

PACKAGE = Path(__file__).resolve().parent.parent / "spdy_hf"


def modules_of(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the package `root`."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) for every import of the package's own modules in `path`,
    wherever it stands (module level, inside functions, under TYPE_CHECKING). `from pkg import sub` counts as an
    import of the module `pkg.sub`; importing a module does not count as importing its parent package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = next(iter(modules)).split(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name in modules]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if base.split(".")[0] != top:
                continue
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.append((target, "", node.lineno) if target in modules else (base, alias.name, node.lineno))
    return found


def import_cycles(root: Path) -> list[list[str]]:
    """The groups of modules that import one another (strongly connected components of more than one module, or a
    module importing itself)."""
    modules = modules_of(root)
    graph = {m: sorted({t for t, _, _ in imports_of(m, p, modules) if t in modules}) for m, p in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def private_imports(root: Path) -> list[str]:
    """`module:line imports other._name` for each import of a `_`-prefixed name from another module."""
    modules = modules_of(root)
    return [f"{m}:{line} imports {target}.{imported}" for m, p in modules.items()
            for target, imported, line in imports_of(m, p, modules)
            if imported.startswith("_") and target != m]


def test_no_module_imports_another_that_imports_it_back():
    assert import_cycles(PACKAGE) == []


def test_no_module_imports_private_names_of_another():
    assert private_imports(PACKAGE) == []


def test_every_family_is_a_plug_in_of_one_interface():
    """The families a config and the CLI accept are the registered ones, each a `Family` under its own name."""
    from spdy_hf.cli import build_parser
    from spdy_hf.families import FAMILIES, Family, family_names

    assert family_names() == tuple(FAMILIES) and {"structured", "mixed", "unstructured"} <= set(FAMILIES)
    assert all(issubclass(cls, Family) and cls.name == name for name, cls in FAMILIES.items())
    for name in FAMILIES:
        assert get_family(SPDYConfig(family=name).family) is FAMILIES[name]
    with pytest.raises(ConfigError, match="structured"):  # a job with another name stops before the model is touched
        SPDYPruner(None, SPDYConfig(family="no-such-family"))
    prune = next(a for a in build_parser()._subparsers._group_actions[0].choices["prune"]._actions
                 if a.dest == "family")
    assert tuple(prune.choices) == family_names()


STAGES = {"calibration": "calibration_windows", "latency": "measure_latency_table", "database": "build_obs_database",
          "search": "run_search", "recovery": "recovery_stage", "deploy": "deploy_profile",
          "pipeline": "run_pipeline", "output": "PruningResult", "families": "get_family",
          "export": "export_model"}


def test_the_root_keeps_the_public_api_and_each_stage_is_a_folder_with_its_entry():
    root = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root) <= 8, root
    for folder, entry in STAGES.items():
        assert (PACKAGE / folder / "__init__.py").is_file(), folder
        module = importlib.import_module(f"spdy_hf.{folder}")
        assert entry in module.__all__ and callable(getattr(module, entry)), (folder, entry)


@pytest.mark.parametrize("model_name,family", [("bert", "structured"), ("llama", "mixed"), ("gpt2", "unstructured")])
def test_a_family_keeps_no_state_of_the_job(model_name, family, tmp_path, tokenizer, monkeypatch):
    """Every stage's result is in its artifact: a family object assigns no attribute after `__init__`, through a
    whole job with recovery and a verify correction (nothing written through `__setattr__` or into `__dict__`)."""
    from test_recovery import FAST, job

    import spdy_hf.pipeline.run as pipeline

    made, late = [], []

    def watched(config):
        cls = family_for(config)

        class Watched(cls):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                made.append((self, set(vars(self))))

            def __setattr__(self, attribute, value):
                if any(obj is self for obj, _ in made):
                    late.append(attribute)
                super().__setattr__(attribute, value)

        return Watched

    real_verify = pipeline.verify

    def corrected(config, family_, plan, databases, budgets, outcome):  # a re-aim, so recovery runs twice
        out = real_verify(config, family_, plan, databases, budgets, outcome)
        profile = np.array(out.profile)
        profile[int(np.flatnonzero(profile)[0])] = 0
        outcome.live(profile)
        return dataclasses.replace(out, profile=profile, corrections=[{"aim": 0.0, "note": "forced by the test"}])

    monkeypatch.setattr(pipeline, "family_for", watched)
    monkeypatch.setattr(pipeline, "verify", corrected)
    result = job(model_name, family, tmp_path, tokenizer, {"method": "gap", **FAST})
    assert result.report["recovery"] and len(made) == 1
    family_object, attributes = made[0]
    assert late == [] and set(vars(family_object)) == attributes == {"config", "model", "progress", "inputs"}


# ------------------------------------------------------------------ the checks themselves catch what they name
def write_package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root / "pkg"


@pytest.mark.parametrize("files, cycle", [
    ({"__init__.py": "", "a.py": "from .b import f\n", "b.py": "def f():\n    from .a import g\n"}, ["pkg.a", "pkg.b"]),
    ({"__init__.py": "", "a.py": "from . import b\n", "b.py": "from .c import x\n", "c.py": "import pkg.a\n"},
     ["pkg.a", "pkg.b", "pkg.c"]),
    ({"__init__.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\n",
      "a.py": "from pkg import version\n", "version.py": ""}, None),
    ({"__init__.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\n",
      "a.py": "from . import __version__\n"}, ["pkg", "pkg.a"]),
    ({"__init__.py": "", "sub/__init__.py": "from .x import y\n", "sub/x.py": "from ..a import z\n", "a.py": ""},
     None),
])
def test_cycle_check_finds_direct_indirect_and_lazy_cycles(tmp_path, files, cycle):
    cycles = import_cycles(write_package(tmp_path, files))
    assert cycles == ([cycle] if cycle else [])


def test_private_import_check(tmp_path):
    root = write_package(tmp_path, {"__init__.py": "", "a.py": "def _f(): ...\n_X = 1\n",
                                    "b.py": "from .a import _f\n", "c.py": "def g():\n    from pkg.a import _X\n"})
    assert private_imports(root) == ["pkg.b:1 imports pkg.a._f", "pkg.c:2 imports pkg.a._X"]


def test_the_report_is_merged_and_no_stage_overwrites_another():
    from spdy_hf.pipeline.report import merge_report

    report = merge_report({"a": 1, "search": {"candidates": 3}}, {"search": {"score_dtype": "bfloat16"}}, {"b": None})
    assert report == {"a": 1, "search": {"candidates": 3, "score_dtype": "bfloat16"}, "b": None}
    with pytest.raises(ValueError, match="'a'"):
        merge_report({"a": 1}, {"a": 1})
    with pytest.raises(ValueError, match="search.candidates"):
        merge_report({"search": {"candidates": 3}}, {"search": {"candidates": 4}})
    first = {"search": {"candidates": 3}}
    merge_report(first, {"search": {"levels": "all"}})
    assert first == {"search": {"candidates": 3}}  # the fragments themselves are left as they were
