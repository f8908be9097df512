"""`%load_ext slothbook` in a real Jupyter kernel: help, devices, estimate, a fine-tune cell, %vram and export.

The parsing helpers are also tested directly (no kernel) for their error messages.
"""

from __future__ import annotations

import dataclasses
import re

import pytest

from slothbook.errors import ConfigError
from slothbook.magics import ESTIMATE_OPTIONS, parse_finetune_cell, parse_options, parse_words, usage
from slothbook.train.job import FinetuneConfig
from ui.kernel import KernelSession, mimes, stream, text

# ---- parsing, without a kernel ------------------------------------------------------------------------------


def test_words_split_like_a_shell_into_positional_and_pairs():
    positional, pairs = parse_words("export gguf q4_k_m path='my dir/out' overwrite=yes")
    assert positional == ["export", "gguf", "q4_k_m"]
    assert pairs == {"path": "my dir/out", "overwrite": "yes"}


def test_options_are_typed_and_defaulted():
    values = parse_options("estimate", {"seq": "4096", "4bit": "no", "gpu": "24"}, ESTIMATE_OPTIONS)
    assert values["seq"] == 4096 and values["4bit"] is False and values["gpu"] == 24.0
    assert values["batch"] == 1 and values["offload"] is True and values["model"] == "smollm2-135m"


@pytest.mark.parametrize("pairs, expected", [
    ({"sq": "10"}, "unknown option(s) sq. Known: model, seq"),
    ({"seq": "abc"}, "seq='abc' is not valid"),
    ({"seq": "0"}, "expected a positive integer"),
    ({"offload": "maybe"}, "expected yes or no"),
])
def test_bad_options_say_what_is_wrong(pairs, expected):
    with pytest.raises(ConfigError, match="estimate") as info:
        parse_options("estimate", pairs, ESTIMATE_OPTIONS)
    assert expected in str(info.value)


def test_finetune_cell_is_yaml_with_binding_names_taken_out():
    cfg, names = parse_finetune_cell("steps: 3\nr: 8\ngradient_checkpointing: slothbook\nmodel_var: m\n")
    assert (cfg.steps, cfg.r, cfg.gradient_checkpointing) == (3, 8, "slothbook")
    assert names == {"model_var": "m", "tokenizer_var": "tokenizer", "result_var": None, "profiler_var": None}


@pytest.mark.parametrize("cell, expected", [
    ("stepz: 3", "Unknown configuration key(s): stepz"),
    ("steps: [3", "not valid YAML"),
    ("- steps", "YAML mapping"),
    ("model_var: 2x", "not a valid Python variable name"),
])
def test_bad_finetune_cells_say_what_is_wrong(cell, expected):
    with pytest.raises(ConfigError) as info:
        parse_finetune_cell(cell)
    assert expected in str(info.value)


def test_help_names_every_finetune_key_and_option():
    text_ = usage()
    for f in dataclasses.fields(FinetuneConfig):
        if f.name != "extra":
            assert f"      {f.name}:" in text_, f.name
    for option in ESTIMATE_OPTIONS:
        assert f"      {option.name}=" in text_
    for word in ("%slothbook gpu", "%%slothbook finetune", "%slothbook export METHOD", "%vram", "model_var"):
        assert word in text_


# ---- in a kernel --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    with KernelSession(tmp_path_factory.mktemp("magics")) as session:
        session.run("%load_ext slothbook")
        yield session


def _no_traceback(message: str) -> None:
    assert "Traceback" not in message and "---->" not in message, message


def test_the_kernel_is_this_interpreter(kernel):
    import sys

    assert kernel.value("__import__('sys').executable") == sys.executable


def test_question_mark_and_help_show_the_same_documentation(kernel):
    printed = stream(kernel.run("%slothbook --help"), "stdout")
    assert printed.strip() == usage().strip()
    # `%slothbook?` shows the magic's docstring.
    assert kernel.value("get_ipython().find_line_magic('slothbook').__doc__") == usage()
    assert "MODEL_VARIABLE" in kernel.value("get_ipython().find_line_magic('vram').__doc__")


def test_gpu_lists_devices_or_the_cpu(kernel):
    import torch

    outputs = kernel.run("%slothbook gpu")
    shown = text(outputs)
    for column in ("compute capability", "bf16", "total GiB", "free GiB"):
        assert column in shown
    assert ("cuda:0" in shown) if torch.cuda.is_available() else ("cpu" in shown and "CPU" in shown)


@pytest.mark.parametrize("line, expected", [
    ("%slothbook bogus", "UsageError: ConfigError: Unknown command 'bogus'"),
    ("%slothbook estimate sq=10", "unknown option(s) sq"),
    ("%slothbook estimate gpu=24 device=cpu", "not both"),
    ("%slothbook finetune", "%%slothbook finetune"),
    ("%slothbook export lora", "needs path=FOLDER"),
    ("%slothbook export lora path=x model=nothing_here", "no variable 'nothing_here'"),
    ("%%slothbook finetune\nstepz: 3", "Unknown configuration key(s): stepz"),
    ("%%slothbook estimate\nseq: 3", "only `finetune` takes a cell"),
    ("%slothbook estimate model=./no/such/folder", "ModelNotFoundError"),
])
def test_wrong_arguments_show_the_message_without_a_traceback(kernel, line, expected):
    message = kernel.fails(line)
    assert expected in message
    _no_traceback(message)


def test_estimate_shows_table_chart_and_whether_it_fits(kernel):
    outputs = kernel.run("%slothbook estimate seq=256 batch=2 r=8")
    shown = text(outputs)
    assert "predicted peak" in shown and "base weights" in shown
    assert "Fits: predicted peak" in shown
    assert {"image/png", "application/vnd.plotly.v1+json"} & mimes(outputs)

    outputs = kernel.run("%slothbook estimate seq=65536 batch=8 4bit=no offload=no gpu=1")
    shown = text(outputs)
    assert "Will not fit" in shown and "exceeds a 1 GiB GPU" in shown and "What fits: seq_len" in shown


@pytest.fixture(scope="module")
def trained(kernel):
    """One short fine-tune through the cell magic (16-bit LoRA: the quickest on a CPU)."""
    outputs = kernel.run(
        "%%slothbook finetune\n"
        "steps: 2\nmax_seq_length: 32\nbatch_size: 1\nload_in_4bit: false\nlogging_steps: 1\n"
        "output: runs/magic\nmodel_var: m\ntokenizer_var: tok\nresult_var: res\nprofiler_var: prof\n"
    )
    return outputs


def test_finetune_cell_trains_shows_the_figure_and_binds_names(kernel, trained):
    # The live view (a widget) was replaced in place by the finished figure, which saved notebooks can show.
    # No other widget is left behind: the profiler's figure is not shown twice, the library bars stay hidden.
    first = trained[0]["data"]
    assert "application/vnd.plotly.v1+json" in first or "image/png" in first
    assert "application/vnd.jupyter.widget-view+json" not in mimes(trained)
    shown = text(trained)
    assert "2 steps: loss" in shown and "slothbook memory profile: 2 steps" in shown
    assert "bound: m, tok, res, prof" in shown
    assert kernel.value("len(prof.steps)") == 2
    assert kernel.value("type(m).__name__") == "PeftModelForCausalLM"
    assert kernel.value("type(tok).__name__").endswith(("Tokenizer", "TokenizerFast", "TokenizersBackend"))
    assert kernel.value("res.trainer.state.global_step") == 2
    assert kernel.value("(res.adapter_dir / 'adapter_model.safetensors').is_file()")


def test_vram_attributes_memory_to_the_trained_model(kernel, trained):
    line = stream(kernel.run("%vram m"), "stdout").strip()
    assert "\n" not in line
    for category in ("weights", "LoRA", "optimizer"):  # the AdamW state of the last fine-tune counts too
        amount = re.search(rf"{category} ([\d.]+ \w+)", line).group(1)
        assert amount != "0 B", line
    assert kernel.fails("%vram not_a_variable").count("no variable") == 1


def test_export_lora_and_gguf(kernel, trained):
    shown = text(kernel.run("%slothbook export lora path=runs/lora model=m tokenizer=tok"))
    assert "exported lora: runs/lora" in shown
    assert kernel.value("__import__('pathlib').Path('runs/lora/adapter_model.safetensors').is_file()")

    shown = text(kernel.run("%slothbook export gguf q8_0 path=runs/gguf model=m tokenizer=tok"))
    assert "exported gguf: runs/gguf/model.Q8_0.gguf" in shown
    assert kernel.value("open('runs/gguf/model.Q8_0.gguf', 'rb').read(4)") == b"GGUF"

    message = kernel.fails("%slothbook export gguf q9 path=runs/g model=m tokenizer=tok")
    assert "Unknown GGUF quantization_method 'q9'" in message
    _no_traceback(message)
