"""Smoke test of benchmarks/kernel_ops.py (--tiny: tiny shapes on the CPU under the Triton interpreter) and of the
helpers in benchmarks/common.py. Speed is not checked here; the schema, the accuracy rows and the plumbing are."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench_scripts import load

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPT = BENCHMARKS / "kernel_ops.py"
KERNELS = ("rms_norm", "rope", "swiglu", "geglu", "cross_entropy", "fused_linear_cross_entropy", "nf4_dequantize",
           "lora_mlp_bf16", "lora_mlp_nf4")
FIELDS = {"benchmark", "contender", "config", "metric", "value", "unit"}


common = load("common")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "kernels.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out)], env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text()), done.stdout


def _rows(doc, **match):
    return [r for r in doc["rows"] if all(r[k] == v for k, v in match.items())]


def test_results_document_schema(tiny):
    doc, _ = tiny
    assert {"device", "versions", "date", "command", "rows"} <= doc.keys()
    assert doc["versions"]["torch"] == torch.__version__
    assert "--tiny" in doc["command"]
    assert doc["rows"]
    for r in doc["rows"]:
        assert set(r) == FIELDS, r
        assert r["benchmark"] == "kernels"
        if r["metric"] == common.ERROR:
            assert isinstance(r["value"], str) and r["unit"] == "message"
        else:
            assert isinstance(r["value"], (int, float)) and math.isfinite(r["value"]), r


def test_no_contender_failed(tiny):
    doc, _ = tiny
    assert _rows(doc, metric=common.ERROR) == []


def test_every_kernel_timed_per_direction(tiny):
    doc, _ = tiny
    for kernel in KERNELS:
        directions = ("fwd",) if kernel == "nf4_dequantize" else ("fwd", "bwd", "fwd+bwd")
        for contender in ("slothbook", "torch"):
            for direction in directions:
                found = [r for r in _rows(doc, contender=contender, metric="time_ms")
                         if r["config"].split()[:2] == [kernel, direction]]
                assert len(found) == 1 and found[0]["value"] > 0, (kernel, contender, direction)
    assert _rows(doc, contender="bitsandbytes", metric="time_ms")


def test_slothbook_matches_the_fp32_reference(tiny):
    doc, _ = tiny
    errors = {r["config"]: r["value"] for r in _rows(doc, contender="slothbook", metric="rel_error")}
    for kernel in KERNELS:
        mine = {c: e for c, e in errors.items() if c.split()[0] == kernel}
        expected = 1 if kernel == "nf4_dequantize" else 2  # the output, and the input gradients
        assert len(mine) == expected, (kernel, mine)
        assert all(e < 2e-2 for e in mine.values()), mine  # bf16 rounding, not a wrong result
    assert [r["value"] for r in _rows(doc, metric="bitwise_equal_bitsandbytes")] == [1.0]


VARIANTS = {"rms_norm": ("slothbook-1sm", "slothbook-4sm", "slothbook-16w", "slothbook-torchsum"),
            "rope": ("slothbook-8w", "slothbook-2tok", "slothbook-4tok")}


def test_launch_variants_are_timed_beside_the_default(tiny):
    doc, _ = tiny
    for kernel, names in VARIANTS.items():
        for name in names:
            errors = [r["value"] for r in _rows(doc, contender=name, metric="rel_error")]
            assert len(errors) == 2 and all(e < 2e-2 for e in errors), (name, errors)
            timed = [r["config"] for r in _rows(doc, contender=name, metric="time_ms")]
            assert sorted(c.split()[1] for c in timed) == ["bwd", "fwd", "fwd+bwd"], (name, timed)
            assert {c.split()[0] for c in timed} == {kernel}


def test_every_timed_row_names_its_method(tiny):
    doc, _ = tiny
    timed = [r for r in doc["rows"] if r["metric"] in ("time_ms", "bandwidth_fraction", "compute_fraction")]
    assert timed and all(r["config"].split()[-1] == "cpu" for r in timed)  # --tiny: perf_counter on the CPU
    untimed = [r for r in doc["rows"] if r["metric"] == "rel_error"]
    assert untimed and not any(r["config"].endswith(" cpu") for r in untimed)


def test_fractions_of_the_measured_device_rates(tiny):
    doc, _ = tiny
    assert [r["metric"] for r in _rows(doc, contender="device")] == ["bandwidth_gbps", "tflops"]

    def kernels_with(metric):
        return {r["config"].split()[0] for r in _rows(doc, contender="slothbook", metric=metric)}

    assert kernels_with("bandwidth_fraction") == {"rms_norm", "rope", "swiglu", "geglu", "cross_entropy",
                                                  "nf4_dequantize"}
    assert kernels_with("compute_fraction") == {"fused_linear_cross_entropy", "lora_mlp_bf16", "lora_mlp_nf4"}


def test_summary_is_printed(tiny):
    _, stdout = tiny
    assert "targets:" in stdout and "errors: 0" in stdout
    assert "rms_norm fwd 16x64 bf16" in stdout


# ------------------------------------------------------------------ common.py


def test_recorder_guard_turns_an_exception_into_an_error_row():
    rec = common.Recorder("b")
    with rec.guard("liger", "rope import"):
        raise ImportError("no module named liger_kernel")
    with rec.guard("torch", "rope fwd"):
        rec.add("torch", "rope fwd", "time_ms", 1.5, "ms")
    assert rec.rows == [
        common.row("b", "liger", "rope import", "error", "ImportError: no module named liger_kernel", "message"),
        common.row("b", "torch", "rope fwd", "time_ms", 1.5, "ms"),
    ]
    assert rec.value("torch", "rope fwd", "time_ms") == 1.5


def test_write_results_append_replaces_rows_with_the_same_key(tmp_path):
    path = tmp_path / "r.json"
    old = [common.row("b", "x", "c", "time_ms", 1.0, "ms"), common.row("b", "y", "c", "time_ms", 2.0, "ms")]
    common.write_results(path, old, device={"name": "gpu"}, command="first")
    common.write_results(path, [common.row("b", "x", "c", "time_ms", 3.0, "ms")], device=None, append=True,
                         command="second")
    doc = json.loads(path.read_text())
    assert {(r["contender"], r["value"]) for r in doc["rows"]} == {("x", 3.0), ("y", 2.0)}
    assert doc["device"] == "gpu" and doc["command"] == "first ; second"


def test_rel_error_is_norm_relative_and_chunked():
    expected = torch.randn(300, 7, dtype=torch.float64)
    actual = expected + 1e-3 * torch.randn_like(expected)
    want = ((actual - expected).norm() / expected.norm()).item()
    assert common.rel_error(actual.float(), expected, chunk_elements=50) == pytest.approx(want, rel=1e-5)
    assert common.rel_error(torch.tensor(2.0), torch.tensor(1.0)) == 1.0
    assert math.isnan(common.rel_error(torch.tensor([float("nan"), 1.0]), torch.ones(2)))


def test_bench_ms_runs_setup_untimed_before_every_call():
    calls = []
    ms = common.bench_ms(lambda state: calls.append(state), setup=lambda: len(calls), device=torch.device("cpu"),
                         warmup_ms=0.0, rep_ms=1.0, min_reps=4, max_reps=4)
    assert ms >= 0
    assert calls == list(range(len(calls))) and len(calls) >= 4  # each call got the state its own setup made


def test_run_worker_keeps_the_last_result_and_reports_a_crash():
    script = (f"import json; print({common.RESULT_MARK!r} + json.dumps({{'rows': [1]}})); "
              f"print({common.RESULT_MARK!r} + json.dumps({{'rows': [1, 2]}}), flush=True); raise SystemExit(3)")
    result, failure = common.run_worker([sys.executable, "-c", script], timeout=60)
    assert result == {"rows": [1, 2]}
    assert "code 3" in failure


# ------------------------------------------------------------------ CUDA graph timing (GPU only)


@pytest.mark.gpu
def test_graph_timer_times_a_backward_and_refuses_a_host_sync():
    bench = load("kernel_ops")
    device = torch.device("cuda")
    timer = bench.GraphTimer(device)
    x = torch.randn(4096, 4096, device=device, requires_grad=True)

    def prepare():  # the forward, untimed
        y = (x * 2).sin()
        return y, x, torch.ones_like(y)

    ms = timer.time_ms(prepare, lambda st: torch.autograd.grad(*st, retain_graph=True), warmup_ms=1, rep_ms=5)
    assert 0 < ms < 50
    with pytest.raises(RuntimeError):  # .item() syncs with the host: not capturable, found before any capture
        timer.time_ms(lambda: x, lambda t: t.sum().item(), warmup_ms=1, rep_ms=5)
