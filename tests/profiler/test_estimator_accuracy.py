"""Smoke test of benchmarks/estimator_accuracy.py --tiny: the script runs on the CPU and writes the agreed schema."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "estimator_accuracy.py"


def test_tiny_run_writes_rows_in_the_results_schema(tmp_path):
    out = tmp_path / "estimator_accuracy.json"
    # 64 tokens: memory and overhead rows; 128, past --overhead-max-seq: one profiled step, memory rows only.
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--configs", "lora16", "--modes", "plain",
                           "--seqs", "64", "128", "--overhead-max-seq", "64", "--trace", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert {"device", "versions", "date", "command", "rows"} <= set(doc)
    assert "torch" in doc["versions"]
    rows = {(r["benchmark"], r["contender"], r["config"], r["metric"]): r for r in doc["rows"]}
    for r in doc["rows"]:
        assert set(r) == {"benchmark", "contender", "config", "metric", "value", "unit"}
        assert r["metric"] != "error", r
    assert {r["config"] for r in doc["rows"]} == {"lora16 plain 64x1", "lora16 plain 128x1"}
    for config in ("lora16 plain 64x1", "lora16 plain 128x1"):
        ratio = rows["estimator_accuracy", "estimate", config, "ratio_to_measured"]["value"]
        assert 0.85 < ratio < 1.15
        assert (rows["estimator_accuracy", "estimate", config, "weights_gib"]["value"]
                == rows["estimator_accuracy", "measured", config, "weights_gib"]["value"])
        assert rows["estimator_accuracy", "estimate", config, "cuda_runtime_gib"]["value"] == 0  # the CPU's
    assert rows["profiler_overhead", "profiler", "lora16 plain 64x1", "overhead_fraction"]["unit"] == "fraction"
    assert rows["profiler_overhead", "control", "lora16 plain 64x1", "overhead_fraction"]["unit"] == "fraction"
    # the hooks' host time, split by hook: every phase hook ran in the profiled steps
    host = rows["profiler_overhead", "profiler", "lora16 plain 64x1", "host_ms_per_step"]["value"]
    assert host > 0
    split = rows["profiler_overhead", "profiler", "lora16 plain 64x1", "host_ms_by_call"]["value"]
    assert {"_on_forward_begin", "_on_forward_end", "mark", "step"} <= {part.split()[0] for part in split.split("; ")}
    # --trace: what a profiled step adds, from torch.profiler (on the CPU: the exact tracker's dispatch mode)
    assert "PythonDispatchMode" in rows["profiler_overhead", "profiler", "lora16 plain 64x1", "extra_calls"]["value"]
    assert not any(r["benchmark"] == "profiler_overhead" and r["config"] == "lora16 plain 128x1"
                   for r in doc["rows"])
    assert rows["estimator_accuracy", "profiled", "lora16 plain 128x1", "step_time_ms"]["value"] > 0
