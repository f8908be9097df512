"""`save_pretrained_gguf`: the merged model as a GGUF file for llama.cpp, Ollama and LM Studio.

f32, f16, bf16 and q8_0 are written directly, one tensor at a time (gguf-py's quantizers for bf16 and
q8_0; the f16 and q8_0 bytes equal what llama.cpp's own quantizer makes of the f32 file). The other types
(k-quants and the legacy q4_0 .. q5_1) come from llama.cpp's own quantizer, run through llama-cpp-python on
an f16 (bf16 for bf16 models) file written first.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, ExportError
from .atomic import atomic_file, check_destination, check_free_space, scratch_file
from .gguf_arch import (Arch, allowed_names, arch_of, as_numpy, extra_tensors, gguf_name, transform,
                        write_hparams)
from .gguf_vocab import vocab_from_tokenizer, write_vocab
from .merged import tokenizer_of
from .modelfile import write_modelfile
from .tensors import base_model_of, compute_dtype, merged_tensors

log = logging.getLogger("slothbook")

DIRECT_TYPES = ("f32", "f16", "bf16", "q8_0")
# llama.cpp file types reachable through its quantizer, by the name users type.
LLAMA_CPP_TYPES = {
    "q2_k": "Q2_K", "q3_k_s": "Q3_K_S", "q3_k_m": "Q3_K_M", "q3_k_l": "Q3_K_L",
    "q4_0": "Q4_0", "q4_1": "Q4_1", "q4_k_s": "Q4_K_S", "q4_k_m": "Q4_K_M",
    "q5_0": "Q5_0", "q5_1": "Q5_1", "q5_k_s": "Q5_K_S", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K",
}
ALIASES = {"not_quantized": "f16", "fast_quantized": "q8_0", "quantized": "q4_k_m"}
# Approximate bits per weight, for the disk-space check.
_BITS = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8.5, "q6_k": 6.6, "q5_k_m": 5.7, "q5_k_s": 5.5, "q5_0": 5.5,
         "q5_1": 6, "q4_k_m": 4.9, "q4_k_s": 4.6, "q4_0": 4.5, "q4_1": 5, "q3_k_l": 4.3, "q3_k_m": 3.9,
         "q3_k_s": 3.5, "q2_k": 3.4}


def quantization_methods(quantization_method) -> list[str]:
    """The requested methods as canonical lower-case names, validated."""
    methods = [quantization_method] if isinstance(quantization_method, str) else list(quantization_method)
    out = []
    for m in methods:
        m = ALIASES.get(str(m).lower(), str(m).lower())
        if m not in DIRECT_TYPES and m not in LLAMA_CPP_TYPES:
            raise ConfigError(f"Unknown GGUF quantization_method {m!r}. Choose from: "
                              f"{', '.join(DIRECT_TYPES + tuple(LLAMA_CPP_TYPES))} (or {', '.join(ALIASES)}).")
        if m not in out:
            out.append(m)
    if not out:
        raise ConfigError("quantization_method is empty; pass e.g. 'q8_0' or ['f16', 'q4_k_m'].")
    return out


def gguf_filename(method: str, stem: str = "model") -> str:
    return f"{stem}.{method.upper()}.gguf"


def save_pretrained_gguf(
    model,
    save_directory: str | os.PathLike,
    tokenizer=None,
    quantization_method: str | list[str] = "q8_0",
    overwrite: bool = False,
) -> list[Path]:
    """Write the merged model as GGUF file(s) plus an Ollama Modelfile into the folder `save_directory`.

    quantization_method: one name or a list: "f32", "f16", "bf16", "q8_0" (written directly), or a
    llama.cpp type such as "q4_k_m", "q5_k_m", "q6_k" (needs llama-cpp-python). Aliases: "not_quantized"
    (f16), "fast_quantized" (q8_0), "quantized" (q4_k_m).
    Files are `model.<METHOD>.gguf`, each with `Modelfile.<method>` beside it (`ollama create NAME -f
    Modelfile.q4_k_m`); separate calls for different methods can share a folder. Returns the GGUF paths.
    """
    methods = quantization_methods(quantization_method)
    tokenizer = tokenizer_of(model, tokenizer)
    if tokenizer is None:
        raise ExportError("GGUF export needs the tokenizer: pass tokenizer= (the one from from_pretrained).")
    folder = Path(save_directory).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"{folder} is a file; save_pretrained_gguf writes into a folder. Choose another path.")
    targets = {m: folder / gguf_filename(m) for m in methods}
    modelfiles = {m: folder / f"Modelfile.{m}" for m in methods}
    for path in [*targets.values(), *modelfiles.values()]:
        check_destination(path, overwrite, is_dir=False)
    if any(m in LLAMA_CPP_TYPES for m in methods):
        _require_llama_cpp()

    config = base_model_of(model).config
    arch = arch_of(config)
    vocab = vocab_from_tokenizer(tokenizer, base_model_of(model).get_input_embeddings().weight.shape[0])
    source = _intermediate_type(model)
    n_weights = sum(t.numel for t in merged_tensors(model))
    needed = sum(n_weights * _BITS[m] / 8 for m in methods)
    if any(m in LLAMA_CPP_TYPES for m in methods) and source not in methods:
        needed += n_weights * 2
    check_free_space(folder, int(needed), "the GGUF export")
    folder.mkdir(parents=True, exist_ok=True)
    for m in methods:
        if m in DIRECT_TYPES:
            with atomic_file(targets[m]) as tmp:
                write_gguf(tmp, model, vocab, m, arch)
    quantized = [m for m in methods if m in LLAMA_CPP_TYPES]
    if quantized:
        _quantize_all(model, vocab, arch, source, targets, quantized)
    num_ctx = getattr(base_model_of(model), "max_seq_length", None) or 4096
    for m in methods:
        write_modelfile(modelfiles[m], targets[m].name, tokenizer, num_ctx)
    return [targets[m] for m in methods]


def _intermediate_type(model) -> str:
    """The float type llama.cpp's quantizer reads: bf16 keeps a bf16 model's range, f16 otherwise."""
    return "bf16" if compute_dtype(model) == torch.bfloat16 else "f16"


def _quantize_all(model, vocab, arch, source: str, targets: dict, quantized: list[str]) -> None:
    if source in targets and targets[source].exists():
        _run_quantizers(targets[source], targets, quantized)
        return
    with scratch_file(targets[quantized[0]].with_name(gguf_filename(source))) as src:
        write_gguf(src, model, vocab, source, arch)
        _run_quantizers(src, targets, quantized)


def _run_quantizers(src: Path, targets: dict, quantized: list[str]) -> None:
    for m in quantized:
        with atomic_file(targets[m]) as tmp:
            llama_cpp_quantize(src, tmp, m)


# --- writing --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        import gguf

        block, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * type_size

    def encode(self):
        import gguf

        data = as_numpy(self.load())
        return gguf.quants.quantize(data, self.qtype)


def tensor_plan(model, arch: Arch, method: str) -> list[GGUFTensor]:
    """Every GGUF tensor in file order: name, shape, storage type and how to compute it."""
    import gguf

    config = base_model_of(model).config
    target = gguf.GGMLQuantizationType[method.upper()]
    allowed = allowed_names(arch, config.num_hidden_layers)
    plan, names = [], set()

    def add(name: str, shape, load):
        if name not in allowed:
            raise ExportError(f"Internal error: {name} is not a tensor of llama.cpp's '{arch.name}' architecture.")
        plan.append(GGUFTensor(name, tuple(shape), _storage_type(name, shape, target), load))
        names.add(name)

    for name, value in extra_tensors(config, arch):
        add(name, value.shape, lambda v=value: v)
    for t in merged_tensors(model):
        name = gguf_name(t.name, arch)
        if name == "output.weight" and arch.output == "never":
            raise ExportError(f"llama.cpp's '{arch.name}' always ties the output head to the embedding, but this "
                              "model has a separate lm_head. Export with save_pretrained_merged instead.")
        change = transform(name, arch, config)
        add(name, t.shape, t.load if change is None else (lambda t=t, change=change: change(t.load())))
    if arch.output == "always" and "output.weight" not in names:
        embedding = next(p for p in plan if p.name == "token_embd.weight")
        add("output.weight", embedding.shape, embedding.load)
    return plan


def _storage_type(name: str, shape, target):
    """1-D tensors and norms stay f32 (llama.cpp needs them so); rows that do not fill q8_0 blocks go f16."""
    import gguf

    types = gguf.GGMLQuantizationType
    if len(shape) < 2 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return types.F32
    block, _ = gguf.GGML_QUANT_SIZES[target]
    return target if shape[-1] % block == 0 else types.F16


def write_gguf(path: Path, model, vocab, method: str, arch: Arch) -> None:
    """Write one GGUF file, computing and writing one tensor at a time."""
    import gguf

    config = base_model_of(model).config
    plan = tensor_plan(model, arch, method)
    writer = gguf.GGUFWriter(path, arch.name)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(_model_name(config))
        writer.add_file_type(_file_type(method))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_hparams(writer, config, arch)
        write_vocab(writer, vocab)
        for t in plan:
            # The shape is the logical one (float32 as element type); raw_dtype says how it is stored.
            writer.add_tensor_info(t.name, t.shape, np.float32, t.nbytes, raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in plan:
            writer.write_tensor_data(t.encode())
    finally:
        writer.close()


def _model_name(config) -> str:
    name = getattr(config, "_name_or_path", "") or "model"
    return Path(str(name)).name or "model"


def _file_type(method: str):
    import gguf

    return gguf.LlamaFileType["ALL_F32" if method == "f32" else "MOSTLY_" + method.upper()]


# --- llama.cpp's quantizer ------------------------------------------------------------------------


def _require_llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:
        raise ExportError("k-quant GGUF types (q4_k_m, q5_k_m, q6_k, ...) use llama.cpp's quantizer: "
                          "pip install llama-cpp-python (or choose f16, bf16 or q8_0, written without it).") from exc
    return llama_cpp


def llama_cpp_quantize(src: Path, dst: Path, method: str) -> None:
    """Quantize the GGUF `src` into `dst` with llama.cpp (tensors that do not fit a k-quant fall back as
    llama.cpp decides, e.g. rows of 576 are not a multiple of 256)."""
    llama_cpp = _require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{LLAMA_CPP_TYPES[method]}")
    params.nthread = os.cpu_count() or 1
    rc, log = _capturing_native_output(
        lambda: llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)))
    if rc != 0:
        raise ExportError(f"llama.cpp could not quantize {src.name} to {method} (code {rc}). "
                          f"Its log ends with:\n{log[-2000:]}")


def _capturing_native_output(call):
    """Run `call` with the process's stdout/stderr (where llama.cpp prints its per-tensor report) sent to a
    temporary file; return its result and what was printed."""
    import sys
    import tempfile

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            result = call()
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
        log.seek(0)
        return result, log.read().decode("utf-8", "replace")
