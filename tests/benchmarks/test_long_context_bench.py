"""Smoke test of benchmarks/long_context.py (--tiny: a two-layer Llama on the CPU): the check phase steps through
its lengths in order, reports one row set per completed length (with the host memory still available) and the
longest as max_seq_len, in the results schema. Memory and speed are not checked here (no CUDA statistics on the
CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "long_context.py"
FIELDS = {"benchmark", "contender", "config", "metric", "value", "unit"}


def test_check_phase_reports_each_length_and_the_longest(tmp_path):
    out = tmp_path / "long.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--contenders", "slothbook", "--configs", "lora16",
                           "--phases", "check", "--check-seqs", "96", "64", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.index("at 64 tokens") < done.stderr.index("at 96 tokens")  # ascending
    doc = json.loads(out.read_text())
    assert {"device", "versions", "date", "command", "rows"} <= set(doc)
    assert all(set(r) == FIELDS for r in doc["rows"])
    times = {r["config"]: r["value"] for r in doc["rows"] if r["metric"] == "time_ms"}
    assert set(times) == {"lora16 64x1", "lora16 96x1"} and all(v > 0 for v in times.values())
    available = [r["value"] for r in doc["rows"] if r["metric"] == "host_available_gib"]
    assert len(available) == 2 and all(0 < v < 1e5 for v in available)
    best = [r for r in doc["rows"] if r["metric"] == "max_seq_len"]
    assert [(r["config"], r["value"]) for r in best] == [("lora16 checked", 96)]
