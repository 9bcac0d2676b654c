"""dvc.yaml's promise: a stage re-runs when code it executes changes. Every project module a
stage script imports, directly or through other modules (imports inside functions included),
must be one of the stage's deps (the file, or a folder above it)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    """The project file of a dotted module name, if it is one of ours."""
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate.relative_to(ROOT)
    return None


def imported_files(path: Path) -> set[Path]:
    """Project files ``path`` imports (any import statement anywhere in it), with the package
    ``__init__``s on the way."""
    names = []
    for node in ast.walk(ast.parse((ROOT / path).read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    found = set()
    for name in names:
        parts = name.split(".")
        found |= {f for i in range(1, len(parts) + 1) if (f := module_file(".".join(parts[:i])))}
    return found


def executed_files(script: Path) -> set[Path]:
    """``script`` and every project file it imports, transitively."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += imported_files(path) - seen
    return seen


def stage_script(stage: dict) -> Path:
    body = stage.get("do", stage)
    return Path(re.search(r"python3?\s+(\S+\.py)", body["cmd"]).group(1))


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_module_a_stage_executes_is_a_dep(name):
    stage = STAGES[name]
    deps = [Path(d) for d in stage.get("do", stage)["deps"]]
    missing = sorted(str(f) for f in executed_files(stage_script(stage))
                     if not any(f == d or d in f.parents for d in deps))
    assert not missing, f"stage {name} executes {missing} but does not list them as deps"


def test_the_walk_finds_lazy_and_transitive_imports(tmp_path):
    """The checker itself: a module imported inside a function, through another module, is
    found (so a test that passes is not a walk that sees nothing)."""
    found = executed_files(Path("stages/allocate.py"))
    assert Path("mixq/allocate.py") in found and Path("mixq/__init__.py") in found
    assert Path("mixq/blas.py") in found  # through the package __init__
    lazy = executed_files(Path("mixq/cli.py"))
    assert Path("mixq/frontier.py") in lazy  # imported inside a function of cli.py
