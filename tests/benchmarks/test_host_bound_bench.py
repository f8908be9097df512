"""Smoke test of benchmarks/host_bound.py --tiny: a tiny Llama through slothbook's contender on the CPU (Triton
interpreter), the per-step rows and the launch-cost rows, with no error row. Speed is not checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "host_bound.py"


def test_tiny_run_writes_step_and_launch_rows(tmp_path):
    out = tmp_path / "host_bound.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--configs", "qlora", "--workdir", str(tmp_path),
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert not [r for r in doc["rows"] if r["metric"] == "error"], doc["rows"]
    step = {r["metric"]: r["value"] for r in doc["rows"] if r["config"] == "slothbook qlora 32x1 tiny-llama"}
    assert set(step) == {"time_ms", "time_ms_min", "time_ms_max", "host_issue_ms", "device_allocs", "time_ms_gc_off"}
    assert 0 < step["time_ms_min"] <= step["time_ms"] <= step["time_ms_max"]
    assert step["host_issue_ms"] <= step["time_ms"] + 1e-6  # issue time is part of the step's wall time
    launches = {r["config"] for r in doc["rows"] if r["metric"] == "host_us_per_call"}
    assert "dequantize_nf4 128x128" in launches and len(launches) == 5
