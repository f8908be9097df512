"""Smoke test of benchmarks/distributed.py --tiny: DDP of a two-layer QLoRA Llama on 1 and 2 gloo processes on the CPU,
launched by torchrun as on the GPUs. The plumbing and the schema are checked; speed is not (2 CPU cores)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "distributed.py"
FIELDS = {"benchmark", "contender", "config", "metric", "value", "unit"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed-bench") / "distributed.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out)], cwd=out.parent, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return dict(json.loads(out.read_text()), stderr=done.stderr)


@pytest.mark.slow
def test_schema_and_no_error_rows(tiny):
    assert {"device", "versions", "date", "command", "rows", "notes"} <= tiny.keys()
    assert "--tiny" in tiny["command"] and tiny["device"].startswith("cpu")
    for r in tiny["rows"]:
        assert set(r) == FIELDS and r["benchmark"] == "distributed", r
        assert r["metric"] != "error", f"{r['config']}: {r['value']}\n{tiny['stderr'][-3000:]}"
        assert isinstance(r["value"], (int, float)) and math.isfinite(r["value"]), r


@pytest.mark.slow
def test_one_and_two_ranks_train_and_report_every_rank(tiny):
    values = {(r["config"], r["metric"]): r["value"] for r in tiny["rows"]}
    for world in (1, 2):
        assert values[(f"ddp tiny-llama x{world}", "tokens_per_s")] > 0
        for rank in range(world):
            assert (f"ddp tiny-llama x{world} rank {rank}", "peak_alloc_gib") in values
    assert values[("ddp tiny-llama 1->2", "scaling")] > 0
    # Same random weights on every launch, random ids: the first loss is about log(vocab) both times.
    losses = [values[(f"ddp tiny-llama x{w}", "first_loss")] for w in (1, 2)]
    assert all(abs(loss - math.log(1024)) < 0.5 for loss in losses)
