"""Smoke test of benchmarks/train.py (--tiny --profile: a two-layer Llama on the CPU, slothbook's kernels under the
Triton interpreter, one profiled step per contender and config), its FLOP count and the merging of results files.
Speed is not checked; the plumbing, the schema and the agreement of the contenders' first losses are."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

from bench_scripts import load

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train.py"
FIELDS = {"benchmark", "contender", "config", "metric", "value", "unit"}
slow = pytest.mark.slow  # the --tiny run: several processes and the Triton interpreter


train = load("train")


def _run(*args, timeout=900):
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("train-bench")
    out = base / "train.json"
    done = _run("--tiny", "--profile", "--profile-top", "6", "--out", str(out), "--workdir", str(base / "work"))
    return json.loads(out.read_text()), done.stdout, base


def _values(doc, **match):
    return {(r["contender"], r["config"]): r["value"] for r in doc["rows"]
            if all(r[k] == v for k, v in match.items())}


@slow
def test_results_document_schema(tiny):
    doc, _, _ = tiny
    assert {"device", "versions", "date", "command", "rows"} <= doc.keys()
    assert "--tiny" in doc["command"] and doc["device"].startswith("cpu")
    for r in doc["rows"]:
        assert set(r) == FIELDS, r
        assert r["benchmark"] == "train"
        assert isinstance(r["value"], (int, float)) and math.isfinite(r["value"]), r  # no error rows either


@slow
def test_every_contender_trains_every_config_and_batch(tiny):
    doc, _, _ = tiny
    measured = _values(doc, metric="tokens_per_s")
    for contender in ("hf", "slothbook"):
        for config in ("qlora", "lora16"):
            for batch in train.TINY.batches:
                key = (contender, f"{config} {train.TINY_SIZES['seq']}x{batch} tiny-llama")
                assert measured.get(key, 0) > 0, key
                assert key in _values(doc, metric="mfu") and key in _values(doc, metric="first_loss")
    assert _values(doc, metric="kernels_on") == {("slothbook", "qlora tiny-llama"): 1.0,
                                                 ("slothbook", "lora16 tiny-llama"): 1.0,
                                                 ("slothbook", "gen tiny-llama"): 1.0}


@slow
def test_contenders_see_the_same_model_and_tokens(tiny):
    """Same weights, same token ids, LoRA B starting at zero: the first step's loss must agree."""
    doc, _, _ = tiny
    losses = _values(doc, metric="first_loss")
    configs = {config for _, config in losses}
    assert len(configs) == 2 * len(train.TINY.batches)
    for config in configs:
        hf, ours = losses[("hf", config)], losses[("slothbook", config)]
        assert abs(hf - ours) < 2e-3 * hf, (config, hf, ours)
        assert abs(hf - math.log(train.TINY.get("vocab_size"))) < 0.5  # random weights: about uniform


@slow
def test_the_gemma2_shape_trains_in_both_contenders_at_toy_size(tmp_path):
    # The device run's Gemma-2-9B shape (eager attention, logit soft-caps, sliding window, tied 256K head) at toy
    # sizes: its code path in each contender, before device time is spent on it.
    out = tmp_path / "gemma.json"
    _run("--tiny", "--models", "gemma", "--configs", "qlora", "--out", str(out), "--workdir", str(tmp_path / "work"))
    shape = train.tiny_of(train.MODELS["gemma"])
    assert shape.name == "tiny-gemma" and shape.attention == "eager" and shape.get("sliding_window") == 16
    losses = _values(json.loads(out.read_text()), metric="first_loss")
    for batch in shape.batches:
        config = f"qlora {train.TINY_SIZES['seq']}x{batch} tiny-gemma"
        hf, ours = losses[("hf", config)], losses[("slothbook", config)]
        assert abs(hf - ours) < 2e-3 * hf, (config, hf, ours)


@slow
def test_generation_rows(tiny):
    doc, _, _ = tiny
    prompt, new = train.TINY_SIZES["gen_prompt"], train.TINY_SIZES["gen_new"]
    measured = _values(doc, metric="tokens_per_s")
    for contender in ("hf", "slothbook"):
        for batch in train.TINY_SIZES["gen_batches"]:
            assert measured.get((contender, f"gen {prompt}+{new}x{batch} tiny-llama"), 0) > 0


@slow
def test_flop_count_and_calibration_are_recorded(tiny):
    doc, _, _ = tiny
    assert _values(doc, contender="model", metric="gflop_per_token")
    assert list(_values(doc, contender="device", metric="tflops").values())[0] > 0


@slow
def test_profiles_of_the_first_batch_of_every_contender_and_config(tiny):
    doc, stdout, _ = tiny
    profiles = {(p["contender"], p["config"]): p for p in doc["profiles"]}
    first = train.TINY.batches[0]
    assert set(profiles) == {(c, f"{config} {train.TINY_SIZES['seq']}x{first} tiny-llama")
                             for c in ("hf", "slothbook") for config in ("qlora", "lora16")}
    for p in profiles.values():
        assert p["source"] == "cpu" and p["steps"] == train.TINY_SIZES["profile_steps"] and p["timed_ms"] > 0
        assert 0 < p["busy_ms"] <= p["wall_ms"] * 1.01 and 0 < p["busy_fraction"] <= 1.01
        assert list(p["categories"]) == list(train.profile_table.CATEGORIES)
        assert abs(sum(p["categories"].values()) - p["device_ms"]) < 0.01 * p["device_ms"] + 0.01
        assert 0 < len(p["kernels"]) <= 6 and all(k["category"] in p["categories"] for k in p["kernels"])
        assert [k["ms"] for k in p["kernels"]] == sorted((k["ms"] for k in p["kernels"]), reverse=True)
        assert 0 < sum(k["share"] for k in p["kernels"]) <= 1.0001
    hf_qlora = profiles[("hf", f"qlora {train.TINY_SIZES['seq']}x{first} tiny-llama")]
    assert hf_qlora["categories"]["nf4_dequant"] > 0 and hf_qlora["categories"]["matmul"] > 0  # bitsandbytes' ops
    assert "| config | contender | step ms | profiled ms | busy ms | busy | kernel ms |" in stdout  # the overview


@slow
def test_summary_and_cleanup(tiny):
    doc, stdout, base = tiny
    assert "x hf tok/s" in stdout and "errors: 0" in stdout
    assert "lora16 32x2 tiny-llama" in stdout
    assert not list((base / "work").glob("*-random*"))  # the random checkpoint is removed after the run
    assert not (base / "train.partial.json").exists()


# ------------------------------------------------------------------ FLOP count


def test_llama_flops_per_token_against_a_hand_count():
    layer = 4096 * (4096 + 1024 + 1024) + 4096 * 4096 + 3 * 4096 * 14336
    n_base = 32 * layer + 4096 * 128256
    n_lora = 32 * 16 * ((4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096) + 3 * (4096 + 14336))
    attention = 32 * 2 * 4096 * 2048  # causal QK^T and PV per token
    expected = 4 * n_base + 6 * n_lora + 3 * attention
    got = train.flops_per_token(train.MODELS["llama"], 2048)
    assert got == expected
    assert abs(got / 32.1e9 - 1) < 0.01  # the estimate


def test_flops_grow_with_sequence_only_through_attention():
    shape = train.MODELS["gemma"]
    growth = train.flops_per_token(shape, 4096) - train.flops_per_token(shape, 2048)
    assert growth == 3 * 42 * 2 * (16 * 256) * 2048


def test_checkpoint_size_counts_an_untied_head_twice():
    llama, gemma = train.MODELS["llama"], train.MODELS["gemma"]
    assert 14.5 < train.checkpoint_bytes(llama) / 2**30 < 15.5  # 8.0B weights in bf16 (norms left out)
    assert 17 < train.checkpoint_bytes(gemma) / 2**30 < 18  # 9.2B, tied embeddings


# ------------------------------------------------------------------ parent plumbing


def _doc(command, rows, versions):
    return {"device": "NVIDIA H100 80GB HBM3", "device_details": {}, "versions": versions, "date": command,
            "command": command, "rows": rows, "notes": []}


def test_merge_keeps_later_rows_and_every_part(tmp_path):
    row = lambda contender, value: {"benchmark": "train", "contender": contender,  # noqa: E731
                                    "config": "qlora 2048x4 llama-3.1-8b", "metric": "tokens_per_s",
                                    "value": value, "unit": "tokens/s"}
    a = _doc("a", [row("hf", 1.0), row("slothbook", 2.0)], {"torch": "2.11", "trl": "1.16.0"})
    b = _doc("b", [row("slothbook", 3.0), row("unsloth", 4.0)], {"torch": "2.11", "trl": "1.15.0", "unsloth": "x"})
    config = "qlora 2048x4 llama-3.1-8b"
    kernel = ("sm90_xmma_gemm_bf16bf16", 1000.0)
    profile = lambda contender, wall: dict(  # noqa: E731
        train.profile_table.summarize([kernel], steps=1, wall_ms=wall, busy=1000.0, source="cuda"),
        contender=contender, config=config)
    a["profiles"] = [profile("hf", 4.0), profile("slothbook", 8.0)]
    b["profiles"] = [profile("slothbook", 2.0)]
    paths = []
    for name, doc in (("a", a), ("b", b)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(doc))
    out, chart = tmp_path / "merged.json", tmp_path / "chart.svg"
    done = _run("--merge", *map(str, paths), "--out", str(out), "--markdown", "--chart", str(chart), timeout=120)
    merged = json.loads(out.read_text())
    assert {r["contender"]: r["value"] for r in merged["rows"]} == {"hf": 1.0, "slothbook": 3.0, "unsloth": 4.0}
    assert merged["command"] == "a ; b" and [p["command"] for p in merged["parts"]] == ["a", "b"]
    assert merged["versions"]["unsloth"] == "x" and any("trl 1.15.0" in n for n in merged["notes"])
    assert "3.00" in done.stdout and "4.00" in done.stdout  # tokens/s as ratios to hf's
    assert "| qlora 2048x4 llama-3.1-8b | unsloth | 4 | - | - | - | - | 4.00 | - |" in done.stdout
    svg = ElementTree.parse(chart).getroot()
    labels = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")]
    assert {"hf", "slothbook", "unsloth", "qlora 2048x4 llama-3.1-8b"} <= set(labels)
    assert "3 (3.00x hf)" in labels
    assert [(p["contender"], p["wall_ms"]) for p in merged["profiles"]] == [("hf", 4.0), ("slothbook", 2.0)]
    assert f"| {config} | slothbook | - | 2.0 | 1.0 | 50% | 1.0 | 1.0 |" in done.stdout
    assert f"#### hf, {config}" in done.stdout
    assert "| `sm90_xmma_gemm_bf16bf16` | matmul | 1 | 1.00 | 100.0% |" in done.stdout
    # A merged file merged again (results kept from an earlier session) brings its parts, not one joined part.
    c = tmp_path / "c.json"
    c.write_text(json.dumps(_doc("c", [row("liger", 5.0)], {"torch": "2.11"})))
    again = tmp_path / "again.json"
    _run("--merge", str(out), str(c), "--out", str(again), timeout=120)
    assert [p["command"] for p in json.loads(again.read_text())["parts"]] == ["a", "b", "c"]


def test_spent_budget_records_what_did_not_run(tmp_path):
    out = tmp_path / "t.json"
    _run("--tiny", "--budget-s", "0", "--out", str(out), "--workdir", str(tmp_path), timeout=120)
    rows = json.loads(out.read_text())["rows"]
    errors = [r for r in rows if r["metric"] == "error"]
    assert errors and all(r["value"] == "not run: time budget spent" for r in errors)


@pytest.mark.skipif(importlib.util.find_spec("unsloth") is not None, reason="unsloth is installed here")
def test_missing_unsloth_is_an_error_row_with_the_import_message():
    spec = dict(kind="train", contender="unsloth", config="qlora", model="tiny-llama", tiny=True)
    done = _run("--worker", json.dumps(spec), timeout=120)
    result = json.loads(done.stdout.strip().splitlines()[-1].removeprefix("@@RESULT@@ "))
    [row] = result["rows"]
    assert row["contender"] == "unsloth" and row["metric"] == "error"
    assert "No module named 'unsloth'" in row["value"]


def test_generation_only_contender_gets_a_generation_worker_and_no_training_one(tmp_path):
    args = train.parse_args(["--models", "llama", "--contenders", "slothbook", "slothbook-eager"])
    names = [label for _, label in train.plan(args, train.MODELS["llama"], tmp_path)]
    assert not any(n.startswith("slothbook-eager") and " gen " not in n for n in names), names
    assert "slothbook-eager gen llama-3.1-8b" in names and "slothbook gen llama-3.1-8b" in names
    assert "slothbook qlora llama-3.1-8b" in names


def test_host_profile_writes_where_the_python_time_goes(tmp_path):
    import torch

    from slothbook.kernels import rms_norm_reference

    weight = torch.ones(64)

    def step(ids):  # a real (tiny) piece of slothbook's Python, so the restricted section has a row
        return rms_norm_reference(ids.float(), weight, 1e-6).sum()

    spec = {"contender": "slothbook", "host_profile": str(tmp_path / "host")}
    train.host_profile(step, torch.randn(4, 64), spec, "qlora 2048x1 llama", torch.device("cpu"), steps=2)
    text = (tmp_path / "host" / "slothbook qlora 2048x1 llama.txt").read_text()
    assert text.startswith("slothbook qlora 2048x1 llama: 2 steps under cProfile")
    assert "Ordered by: internal time" in text and "Ordered by: cumulative time" in text
    restricted = text.split("Only the Python of slothbook")[1]
    assert "rms_norm_reference" in restricted
