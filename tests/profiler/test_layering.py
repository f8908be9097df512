"""Floor 4: the profiler reads from the layers below and from nothing above; the trainer never imports it."""

from __future__ import annotations

import ast
from pathlib import Path

import slothbook

PACKAGE = Path(slothbook.__file__).resolve().parent
ABOVE = ("ui", "cli", "magics")


def _imports(path: Path) -> set[str]:
    """Absolute names of the slothbook modules a file imports (relative imports resolved)."""
    package = ["slothbook", *path.relative_to(PACKAGE).parent.parts]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names |= {module} | {f"{module}.{a.name}" for a in node.names}
    return {n for n in names if n.startswith("slothbook")}


def test_profiler_imports_nothing_above_it():
    for path in (PACKAGE / "profiler").glob("*.py"):
        for name in _imports(path):
            parts = name.split(".")
            assert len(parts) < 2 or parts[1] not in ABOVE, f"{path.name} imports {name}"


def test_train_layer_does_not_import_the_profiler():
    for path in (PACKAGE / "train").glob("*.py"):
        assert not any(n.startswith("slothbook.profiler") for n in _imports(path)), path.name


def test_generation_sits_beside_train_and_export():
    # generation/ (floor 3) may use models/ and kernels/; models/ below it never imports it
    for path in (PACKAGE / "generation").glob("*.py"):
        for name in _imports(path):
            parts = name.split(".")
            assert len(parts) < 2 or parts[1] not in ABOVE + ("profiler", "train", "export"), f"{path.name}: {name}"
    for path in (PACKAGE / "models").rglob("*.py"):
        assert not any(n.startswith("slothbook.generation") for n in _imports(path)), path.name
