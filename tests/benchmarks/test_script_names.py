"""Every script in benchmarks/ is run with its folder first on sys.path: none may share a name with an installed
module, or a library that imports that module gets the script (transformers 5.25 imports Hugging Face's `kernels`,
which benchmarks/kernels.py once shadowed)."""

from __future__ import annotations

import importlib.machinery
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"


def _installed(name: str) -> bool:
    """Importable from outside the checkout's own folders (pytest also puts tests/ on sys.path; a venv may sit in
    the checkout)."""
    ours = (ROOT / "tests", BENCHMARKS)
    outside = [p for p in sys.path
               if (q := Path(p or ".").resolve()) != ROOT and not any(q.is_relative_to(d) for d in ours)]
    # PathFinder searches the given folders only (importlib.util.find_spec would answer from sys.modules).
    return importlib.machinery.PathFinder.find_spec(name, outside) is not None


def test_no_benchmark_module_shadows_an_installed_one():
    names = [p.stem for p in BENCHMARKS.glob("*.py")] + [p.name for p in BENCHMARKS.iterdir()
                                                           if (p / "__init__.py").is_file()]
    assert "train" in names and "contenders" in names
    clashes = [n for n in names if _installed(n)]
    assert not clashes, f"benchmarks/ modules named like installed ones: {clashes}"


def test_the_check_sees_a_clash():
    assert _installed("json") and _installed("torch")
