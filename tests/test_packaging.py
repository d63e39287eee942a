"""pyproject.toml against the code: each third-party module webhookd imports at run time is a
declared dependency, and each declared dependency is imported (not only reached through
another's requirements, which may drop it, and which the dependency floors cannot pin)."""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def _imported() -> dict[str, set[str]]:
    """Distribution → the files of webhookd/ that import it at run time (imports under ``if
    TYPE_CHECKING:`` left out)."""
    owners = packages_distributions()
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "webhookd").rglob("*.py")):
        tree = ast.parse(path.read_text("utf-8"))
        typing_only = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for stmt in node.body
            for inner in ast.walk(stmt)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.partition(".")[0]
                if top == "webhookd" or top in sys.stdlib_module_names:
                    continue
                for dist in owners.get(top, [top]):
                    found.setdefault(canonicalize_name(dist), set()).add(path.name)
    return found


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}


def test_every_module_webhookd_imports_is_a_declared_dependency_and_back() -> None:
    imported, declared = _imported(), _declared()
    assert {d: sorted(f) for d, f in imported.items() if d not in declared} == {}
    assert declared - set(imported) == set()
