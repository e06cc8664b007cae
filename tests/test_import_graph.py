"""Every import of the library points down the data path video -> crops -> JSON -> batch -> pseudo-fakes ->
loss -> metrics: a package may import packages of earlier steps, never of later ones.

The imports are read with ``ast`` (module level and inside functions alike: a deferred import is still a
dependency), so the check needs no import to succeed.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Package -> the packages of ours it may import (itself always allowed). Order of the data path:
#: package_utils (video, crops, JSON) -> facedata (JSON -> batch) -> synthesis (pseudo-fakes) -> models (loss)
#: -> training (trainer, evaluation, metrics, demos).
ALLOWED: dict[str, set[str]] = {
    "package_utils": set(),
    "facedata": {"package_utils"},
    "synthesis": {"facedata", "package_utils"},
    "models": {"synthesis", "facedata", "package_utils"},
    "training": {"models", "synthesis", "facedata", "package_utils"},
}


def imported_packages(path: Path, package: str) -> dict[str, list[int]]:
    """{top-level package of ours: line numbers} of every import in ``path`` (relative imports resolve to
    ``package``)."""
    found: dict[str, list[int]] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [package] if node.level else [node.module or ""]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in ALLOWED:
                found.setdefault(top, []).append(node.lineno)
    return found


def package_graph() -> dict[str, dict[str, list[str]]]:
    """{package: {imported package: ["file:line", ...]}} over the library's packages (tests excluded)."""
    graph: dict[str, dict[str, list[str]]] = {}
    for package in ALLOWED:
        for path in sorted((ROOT / package).rglob("*.py")):
            for target, lines in imported_packages(path, package).items():
                if target != package:
                    where = graph.setdefault(package, {}).setdefault(target, [])
                    where += [f"{path.relative_to(ROOT)}:{line}" for line in lines]
    return graph


def test_every_installed_package_has_a_place_on_the_path():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    include = re.search(r"^include = \[(.*)\]$", text, re.MULTILINE).group(1)
    installed = {name.strip().strip('"').rstrip("*") for name in include.split(",")}
    assert installed == set(ALLOWED)
    assert all((ROOT / package / "__init__.py").is_file() for package in ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_down_the_data_path(package):
    wrong = {target: where for target, where in package_graph().get(package, {}).items()
             if target not in ALLOWED[package]}
    assert not wrong, f"{package} imports later steps of the data path: {wrong}"


def test_the_checker_sees_deferred_and_relative_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\nfrom . import x\n\ndef f():\n    from training.train import DEFAULTS\n")
    assert imported_packages(source, "synthesis") == {"synthesis": [2], "training": [5]}


if __name__ == "__main__":  # prints the graph for reports
    for package, targets in package_graph().items():
        print(package, "->", ", ".join(f"{t} ({len(w)})" for t, w in sorted(targets.items())))
