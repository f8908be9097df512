"""Every committed benchmark result has the documented shape (benchmarks/common.py, docs/benchmarks.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
ROW_KEYS = {"benchmark", "contender", "config", "metric", "value", "unit"}


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_results_file_has_the_documented_shape(path):
    doc = json.loads(path.read_text())
    for key in ("device", "versions", "date", "command", "rows"):
        assert doc.get(key), f"{path.name}: '{key}' is missing or empty"
    assert isinstance(doc["versions"], dict) and "torch" in doc["versions"], path.name
    for row in doc["rows"]:
        assert set(row) == ROW_KEYS, (path.name, row)
        assert all(isinstance(row[k], str) and row[k] for k in ROW_KEYS - {"value"}), (path.name, row)
