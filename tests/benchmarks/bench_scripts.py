"""The benchmark scripts as modules, for the tests: benchmarks/common.py's `load_script`, which loads a script from
its file under a name of its own (benchmarks/ on sys.path would put its generic names in front of installed ones)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str):
    common = sys.modules.get("slothbook_benchmarks_common")
    if common is None:  # the loader lives in common.py, so that one file is loaded by hand
        spec = importlib.util.spec_from_file_location("slothbook_benchmarks_common", BENCHMARKS / "common.py")
        common = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = common
        spec.loader.exec_module(common)
    return common.load_script(name)
