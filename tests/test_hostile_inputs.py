"""Hostile and broken input, one table: each bad input through the public API or the command line must end in a
SlothbookError of the stated type whose message names the culprit (file, line, row or key), without a traceback
on the command line, and without half-written files left behind.

The damaged files are copies of the real embedded model, its GGUF and a real LoRA adapter saved from it. A damaged
copy of a large file keeps the original's first bytes (patched) and gets its full length as a sparse hole, so a
"flipped header" file is the right size without copying half a gigabyte.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from slothbook import FastLanguageModel
from slothbook.errors import (ConfigError, CorruptFileError, DatasetError, ExportError, ModelNotFoundError,
                              SlothbookError)

MAX_LEN = 64


# ---- making damaged copies -----------------------------------------------------------------------------------------

def damaged_copy(src: Path, dst: Path, keep: int, size: int | None = None, patch: dict[int, bytes] | None = None):
    """The first `keep` bytes of `src`, with `patch` {offset: bytes} applied, grown to `size` bytes (a sparse hole)."""
    with open(src, "rb") as f:
        head = bytearray(f.read(keep))
    for offset, data in (patch or {}).items():
        head[offset:offset + len(data)] = data
    with open(dst, "wb") as f:
        f.write(head)
        if size is not None:
            f.truncate(size)
    return dst


def model_folder(base: Path, dst: Path, skip=()) -> Path:
    """A model folder whose files link to `base`'s, but for those in `skip` (the test writes its own)."""
    dst.mkdir(parents=True)
    for p in base.iterdir():
        if p.name not in skip:
            (dst / p.name).symlink_to(p)
    return dst


def safetensors_header_len(path: Path) -> int:
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")


def partial_leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".partial-" in p.name or ".scratch-" in p.name or ".converting-" in p.name]


# ---- the shared world: the embedded model, an adapter saved from it, and every damaged file --------------------------

@pytest.fixture(scope="module")
def w(tmp_path_factory, embedded_dir):
    from slothbook.models.embedded import embedded_gguf_path

    tmp = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    model, tok = FastLanguageModel.from_pretrained("smollm2-135m", load_in_4bit=False, max_seq_length=MAX_LEN,
                                                   kernels=False)
    peft_base, _ = FastLanguageModel.from_pretrained("smollm2-135m", load_in_4bit=False, max_seq_length=MAX_LEN,
                                                     kernels=False)
    peft = FastLanguageModel.get_peft_model(peft_base, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    adapter = peft.save_pretrained_merged(tmp / "adapter", tok, save_method="lora")
    big_tok = copy.deepcopy(tok)
    big_tok.add_tokens(["<|slothbook_extra_0|>", "<|slothbook_extra_1|>"], special_tokens=True)

    st = embedded_dir / "model.safetensors"
    size, header = st.stat().st_size, safetensors_header_len(st)
    gguf = embedded_gguf_path()
    d = SimpleNamespace(tmp=tmp, base=embedded_dir, model=model, tok=tok, peft=peft, adapter=adapter, big_tok=big_tok)

    d.st_truncated = model_folder(embedded_dir, tmp / "st-truncated", skip={"model.safetensors"})
    damaged_copy(st, d.st_truncated / "model.safetensors", keep=8 + header + 4096, size=size // 2)
    d.st_header_len = model_folder(embedded_dir, tmp / "st-header-len", skip={"model.safetensors"})
    damaged_copy(st, d.st_header_len / "model.safetensors", keep=8 + header, size=size, patch={6: b"\x7f"})
    d.st_header_json = model_folder(embedded_dir, tmp / "st-header-json", skip={"model.safetensors"})
    damaged_copy(st, d.st_header_json / "model.safetensors", keep=8 + header, size=size,
                 patch={8: b"\xff\xfe", 8 + header // 2: b"\x00\x00"})
    d.st_empty = model_folder(embedded_dir, tmp / "st-empty", skip={"model.safetensors"})
    (d.st_empty / "model.safetensors").write_bytes(b"")

    d.config_cut = model_folder(embedded_dir, tmp / "config-cut", skip={"config.json"})
    (d.config_cut / "config.json").write_text((embedded_dir / "config.json").read_text()[:200])

    d.pickled = tmp / "pickled"
    d.pickled.mkdir()
    (d.pickled / "config.json").symlink_to(embedded_dir / "config.json")
    (d.pickled / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle would run code here")

    # Custom code that would leave a mark if anything imported it.
    d.code_ran = tmp / "code-ran"
    planted = f"open({str(d.code_ran)!r}, 'w').write('imported')\n"
    d.remote = model_folder(embedded_dir, tmp / "remote-code", skip={"config.json"})
    cfg = json.loads((embedded_dir / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (d.remote / "config.json").write_text(json.dumps(cfg))
    (d.remote / "modeling_evil.py").write_text(planted)
    d.remote_tok = model_folder(embedded_dir, tmp / "remote-tokenizer", skip={"tokenizer_config.json"})
    tcfg = json.loads((embedded_dir / "tokenizer_config.json").read_text())
    tcfg["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (d.remote_tok / "tokenizer_config.json").write_text(json.dumps(tcfg))
    (d.remote_tok / "tokenization_evil.py").write_text(planted)

    d.big_vocab = model_folder(embedded_dir, tmp / "big-vocab",
                               skip={"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"})
    big_tok.save_pretrained(d.big_vocab)

    d.gguf_cut = damaged_copy(gguf, tmp / "cut.gguf", keep=gguf.stat().st_size // 2)
    d.gguf_magic = damaged_copy(gguf, tmp / "magic.gguf", keep=1 << 20, size=gguf.stat().st_size, patch={0: b"GGML"})
    d.gguf_version = damaged_copy(gguf, tmp / "version.gguf", keep=1 << 20, size=gguf.stat().st_size,
                                  patch={4: (99).to_bytes(4, "little")})

    def adapter_copy(name, skip=()):
        return model_folder(adapter, tmp / name, skip=skip)

    weights = adapter / "adapter_model.safetensors"
    d.ad_truncated = adapter_copy("adapter-truncated", skip={"adapter_model.safetensors"})
    damaged_copy(weights, d.ad_truncated / "adapter_model.safetensors", keep=weights.stat().st_size - 1000)
    d.ad_config_cut = adapter_copy("adapter-config-cut", skip={"adapter_config.json"})
    (d.ad_config_cut / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text()[:100])
    d.ad_pickled = adapter_copy("adapter-pickled", skip={"adapter_model.safetensors"})
    (d.ad_pickled / "adapter_model.bin").write_bytes(b"\x80\x04 a pickle")
    d.ad_missing = adapter_copy("adapter-missing", skip={"adapter_model.safetensors"})
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    d.ad_no_base = adapter_copy("adapter-no-base", skip={"adapter_config.json"})
    (d.ad_no_base / "adapter_config.json").write_text(json.dumps({**acfg, "base_model_name_or_path": None}))
    d.ad_wrong_rank = adapter_copy("adapter-wrong-rank", skip={"adapter_config.json"})
    (d.ad_wrong_rank / "adapter_config.json").write_text(json.dumps({**acfg, "r": 8}))

    d.data = tmp / "data"
    d.data.mkdir()
    good = '{"text": "a fine row"}\n'
    (d.data / "bad-row.jsonl").write_text(good * 2 + '{"text": "no closing brace"\n' + good)
    (d.data / "list-row.jsonl").write_text(good + "[1, 2]\n")
    (d.data / "broken.json").write_text('[\n  {"text": "one"},\n  {"text": "two",\n')
    (d.data / "latin1.jsonl").write_bytes(good.encode() + '{"text": "caf\u00e9"}\n'.encode("latin-1"))
    (d.data / "latin1.csv").write_bytes("text\nfine\ncaf\u00e9 cr\u00e8me\n".encode("latin-1"))

    d.user_file = tmp / "notes.txt"
    d.user_file.write_text("my notes")
    d.user_folder = tmp / "thesis"
    d.user_folder.mkdir()
    (d.user_folder / "chapter1.docx").write_text("years of work")
    d.old_export = tmp / "old-export"
    d.old_export.mkdir()
    (d.old_export / "adapter_config.json").write_text("{}")
    d.gguf_dir = tmp / "gguf-out"
    d.gguf_dir.mkdir()
    (d.gguf_dir / "model.F16.gguf").write_text("an earlier export")
    d.escape_link = tmp / "run-with-link"
    d.escape_link.mkdir()
    (d.escape_link / "adapter").symlink_to(tmp / "elsewhere", target_is_directory=True)
    return d


# ---- the table -------------------------------------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    error: type | None  # None: a command line case (exit code != 0, no traceback)
    run: Callable  # w -> None (raises), or w -> argv for `python -m slothbook`
    names: Callable  # w -> the text the message must contain


def load(path, **kw):
    return FastLanguageModel.from_pretrained(str(path), max_seq_length=MAX_LEN, load_in_4bit=False, kernels=False, **kw)


def data(w, name):
    from slothbook.data import load_dataset_file

    return load_dataset_file(w.data / name)


def config(**values):
    from slothbook.train.config import FinetuneConfig

    return FinetuneConfig.from_dict(values)


def peft_with_tokenizer(w, tokenizer):
    from slothbook.data import get_chat_template

    w.model.slothbook_tokenizer = get_chat_template(copy.deepcopy(tokenizer), "llama-3")  # adds 4 marker tokens
    try:
        FastLanguageModel.get_peft_model(w.model, r=4)
    finally:
        w.model.slothbook_tokenizer = w.tok


def finetune_bad_dataset(w):
    from slothbook.train.job import run_finetune

    cfg = config(dataset=str(w.data / "bad-row.jsonl"), output=str(w.tmp / "run-bad-data"), steps=1,
                 max_seq_length=MAX_LEN)
    run_finetune(cfg, model=w.peft, tokenizer=w.tok)


def too_long(w):
    from datasets import Dataset

    from slothbook.data import check_lengths

    ds = Dataset.from_dict({"text": ["short", "word " * 300, "fine"]})
    check_lengths(ds, w.tok, MAX_LEN, on_long="error")


def symlink_escape(w):
    config(output=str(w.escape_link)).adapter_path(w.escape_link)


def magic_cell(w):
    from slothbook.magics import parse_finetune_cell

    parse_finetune_cell("steps: 2\nadapter_subdir: ../../home/user\n")


def estimate(path):
    from slothbook.profiler import estimate as est

    est(str(path), 64)


def cli_finetune(*args):
    return lambda w: ["finetune", "--no-load-in-4bit", "--steps", "1", "--max-seq-length", str(MAX_LEN),
                      "--output", str(w.tmp / "cli-run"), *[a(w) if callable(a) else a for a in args]]


ST = "model.safetensors"
CASES = [
    # loading a model folder
    Case("folder-safetensors-truncated", CorruptFileError, lambda w: load(w.st_truncated),
         lambda w: str(w.st_truncated / ST)),
    Case("folder-safetensors-header-length-flipped", CorruptFileError, lambda w: load(w.st_header_len),
         lambda w: str(w.st_header_len / ST)),
    Case("folder-safetensors-header-garbled", CorruptFileError, lambda w: load(w.st_header_json),
         lambda w: str(w.st_header_json / ST)),
    Case("folder-safetensors-empty", CorruptFileError, lambda w: load(w.st_empty), lambda w: str(w.st_empty / ST)),
    Case("folder-config-json-truncated", CorruptFileError, lambda w: load(w.config_cut),
         lambda w: str(w.config_cut / "config.json")),
    Case("folder-pickled-weights-only", ConfigError, lambda w: load(w.pickled), lambda w: "pytorch_model.bin"),
    Case("folder-custom-code-auto-map", ConfigError, lambda w: load(w.remote), lambda w: "trust_remote_code=True"),
    Case("folder-custom-tokenizer-code", ConfigError, lambda w: load(w.remote_tok),
         lambda w: str(w.remote_tok / "tokenizer_config.json")),
    Case("folder-tokenizer-beyond-embedding", ConfigError, lambda w: load(w.big_vocab),
         lambda w: f"{len(w.big_tok)} tokens but the model's embedding has 49152 rows"),
    # loading a .gguf
    Case("gguf-truncated", CorruptFileError, lambda w: load(w.gguf_cut), lambda w: str(w.gguf_cut)),
    Case("gguf-bad-magic", CorruptFileError, lambda w: load(w.gguf_magic), lambda w: str(w.gguf_magic)),
    Case("gguf-bad-version", CorruptFileError, lambda w: load(w.gguf_version), lambda w: "version 99"),
    # loading a saved adapter folder
    Case("adapter-safetensors-truncated", CorruptFileError, lambda w: load(w.ad_truncated),
         lambda w: str(w.ad_truncated / "adapter_model.safetensors")),
    Case("adapter-config-json-truncated", CorruptFileError, lambda w: load(w.ad_config_cut),
         lambda w: str(w.ad_config_cut / "adapter_config.json")),
    Case("adapter-pickled-weights-only", ConfigError, lambda w: load(w.ad_pickled), lambda w: "adapter_model.bin"),
    Case("adapter-weights-missing", ModelNotFoundError, lambda w: load(w.ad_missing),
         lambda w: "no adapter_model.safetensors"),
    Case("adapter-config-without-base", ConfigError, lambda w: load(w.ad_no_base),
         lambda w: "base_model_name_or_path"),
    Case("adapter-shapes-do-not-match", CorruptFileError, lambda w: load(w.ad_wrong_rank),
         lambda w: str(w.ad_wrong_rank)),
    # LoRA and tokenizers
    Case("get-peft-model-tokenizer-beyond-embedding", ConfigError, lambda w: peft_with_tokenizer(w, w.tok),
         lambda w: "49156 tokens but the model's embedding has 49152 rows"),
    # datasets
    Case("jsonl-row-not-json", DatasetError, lambda w: data(w, "bad-row.jsonl"), lambda w: "line 3"),
    Case("jsonl-row-not-an-object", DatasetError, lambda w: data(w, "list-row.jsonl"), lambda w: "line 2"),
    Case("json-document-cut", DatasetError, lambda w: data(w, "broken.json"), lambda w: "line 4"),
    Case("jsonl-not-utf8", DatasetError, lambda w: data(w, "latin1.jsonl"), lambda w: "latin1.jsonl, line 2: byte 36"),
    Case("csv-not-utf8", DatasetError, lambda w: data(w, "latin1.csv"), lambda w: "latin1.csv, line 3"),
    Case("run-finetune-dataset-row-not-json", DatasetError, finetune_bad_dataset,
         lambda w: "bad-row.jsonl as JSON: line 3"),
    Case("sample-longer-than-max-seq-length", DatasetError, too_long, lambda w: "row 1 ("),
    # configuration
    Case("config-unknown-key", ConfigError, lambda w: config(stpes=10), lambda w: "stpes"),
    Case("config-wrong-type", ConfigError, lambda w: config(steps="ten"), lambda w: "steps: 'ten'"),
    Case("config-adapter-subdir-climbs-out", ConfigError, lambda w: config(adapter_subdir="../../etc"),
         lambda w: "adapter_subdir: '../../etc'"),
    Case("config-checkpoints-subdir-absolute", ConfigError, lambda w: config(checkpoints_subdir="/tmp/x"),
         lambda w: "checkpoints_subdir: '/tmp/x'"),
    Case("config-adapter-subdir-symlink-out", ConfigError, symlink_escape, lambda w: "through a symlink"),
    Case("magic-cell-subdir-climbs-out", ConfigError, magic_cell, lambda w: "adapter_subdir"),
    # exports never replace a user's files
    Case("export-lora-onto-a-user-file", ExportError,
         lambda w: w.peft.save_pretrained_merged(w.user_file, w.tok, save_method="lora"), lambda w: str(w.user_file)),
    Case("export-lora-over-an-export-without-overwrite", ExportError,
         lambda w: w.peft.save_pretrained_merged(w.old_export, w.tok, save_method="lora"), lambda w: str(w.old_export)),
    Case("export-merged-overwrite-a-user-folder", ExportError,
         lambda w: w.peft.save_pretrained_merged(w.user_folder, w.tok, overwrite=True), lambda w: str(w.user_folder)),
    Case("export-gguf-over-a-gguf-without-overwrite", ExportError,
         lambda w: w.peft.save_pretrained_gguf(w.gguf_dir, w.tok, quantization_method="f16"),
         lambda w: str(w.gguf_dir / "model.F16.gguf")),
    Case("export-merged-tokenizer-beyond-embedding", ConfigError,
         lambda w: w.peft.save_pretrained_merged(w.tmp / "merged-big-vocab", w.big_tok),
         lambda w: f"{len(w.big_tok)} tokens"),
    Case("export-gguf-tokenizer-beyond-embedding", ExportError,
         lambda w: w.peft.save_pretrained_gguf(w.tmp / "gguf-big-vocab", w.big_tok, quantization_method="f16"),
         lambda w: f"{len(w.big_tok)} tokens"),
    # the estimator reads configs too
    Case("estimate-config-json-truncated", CorruptFileError, lambda w: estimate(w.config_cut),
         lambda w: str(w.config_cut / "config.json")),
    Case("estimate-custom-code", ConfigError, lambda w: estimate(w.remote), lambda w: "trust_remote_code=True"),
    # the command line
    Case("cli-finetune-dataset-row-not-json", None, cli_finetune("--dataset", lambda w: str(w.data / "bad-row.jsonl")),
         lambda w: f"{w.data / 'bad-row.jsonl'} as JSON: line 3"),
    Case("cli-finetune-dataset-not-utf8", None, cli_finetune("--dataset", lambda w: str(w.data / "latin1.csv")),
         lambda w: "latin1.csv, line 3"),
    Case("cli-finetune-model-safetensors-truncated", None, cli_finetune("--model", lambda w: str(w.st_truncated)),
         lambda w: str(w.st_truncated / ST)),
    Case("cli-finetune-model-gguf-bad-magic", None, cli_finetune("--model", lambda w: str(w.gguf_magic)),
         lambda w: str(w.gguf_magic)),
    Case("cli-estimate-custom-code", None, lambda w: ["estimate", "--model", str(w.remote)],
         lambda w: str(w.remote / "config.json")),
]


def run_cli(argv, cwd):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "slothbook", *argv], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_naming_the_culprit(case, w):
    culprit = case.names(w)
    if case.error is None:
        result = run_cli(case.run(w), cwd=w.tmp)
        output = result.stdout + result.stderr
        assert result.returncode != 0, output[-2000:]
        assert "Traceback" not in output, output[-3000:]
        assert "slothbook: error:" in result.stderr and culprit in result.stderr, result.stderr[-2000:]
        message = result.stderr.strip().splitlines()[-1]
    else:
        with pytest.raises(SlothbookError) as info:
            case.run(w)
        assert type(info.value) is case.error, f"{type(info.value).__name__}: {info.value}"
        assert culprit in str(info.value), str(info.value)
        message = f"{type(info.value).__name__}: {info.value}"
    assert not w.code_ran.exists(), "code from a model folder was executed"
    assert not partial_leftovers(w.tmp), partial_leftovers(w.tmp)
    print(f"\n{case.id}: {message}")


def test_the_table_is_large_enough():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


def test_user_files_survive_refused_exports(w):
    assert w.user_file.read_text() == "my notes"
    assert (w.user_folder / "chapter1.docx").read_text() == "years of work"
    assert (w.gguf_dir / "model.F16.gguf").read_text() == "an earlier export"
    assert not (w.tmp / "elsewhere").exists()


def test_long_samples_are_truncated_with_one_warning(w, caplog):
    from datasets import Dataset

    from slothbook.data import check_lengths

    ds = Dataset.from_dict({"text": ["short", "word " * 300, "fine", "more " * 100]})
    with caplog.at_level("WARNING", logger="slothbook.data"):
        long = check_lengths(ds, w.tok, MAX_LEN)
    assert long == [1, 3]
    warnings = [r.getMessage() for r in caplog.records if "max_seq_length" in r.getMessage()]
    assert len(warnings) == 1 and "2 of 4 samples" in warnings[0] and "row 1 (" in warnings[0], warnings


def test_adapter_folder_loads_onto_its_base(w):
    from peft import PeftModel

    model, tok = load(w.adapter)
    assert isinstance(model, PeftModel)
    saved = {n: p for n, p in w.peft.named_parameters() if "lora_" in n}
    loaded = dict(model.named_parameters())
    assert saved and all(torch.equal(p, loaded[n]) for n, p in saved.items())
    assert any(p.requires_grad for n, p in loaded.items() if "lora_" in n)  # it can train on
    assert len(tok) == len(w.tok)
    assert callable(model.save_pretrained_merged) and callable(model.save_pretrained_gguf)  # exports like any other

