"""Dependencies used for what they are for: every third-party module the package imports is declared in
pyproject.toml (a required dependency or an extra), and every required dependency is imported somewhere."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalized(re.match(r"[A-Za-z0-9_.-]+", requirement).group(0))


def imported_modules() -> dict[str, str]:
    """Top-level module -> the first file of the package that imports it (lazy imports inside functions too)."""
    found = {}
    for path in sorted((ROOT / "spdy_hf").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module else []
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return {m: p for m, p in found.items() if m not in sys.stdlib_module_names and m != "spdy_hf"}


def declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    required = {requirement_name(r) for r in project["dependencies"]}
    extras = {requirement_name(r) for group in project.get("optional-dependencies", {}).values() for r in group}
    return required, extras


# modules whose distribution is named otherwise, for when it is not installed here to say so (llama-cpp-python is
# built from source, an optional extra)
NOT_INSTALLED = {"llama_cpp": ["llama-cpp-python"]}


def test_every_imported_module_is_declared():
    required, extras = declared()
    distributions = {**NOT_INSTALLED, **packages_distributions()}
    undeclared = {}
    for module, path in imported_modules().items():
        names = {normalized(d) for d in distributions.get(module, [module])}
        if not names & (required | extras):
            undeclared[module] = path
    assert undeclared == {}


def test_every_required_dependency_is_imported():
    required, _ = declared()
    distributions = packages_distributions()
    used = {normalized(d) for module in imported_modules() for d in distributions.get(module, [module])}
    assert sorted(required - used) == []
