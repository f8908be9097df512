"""The estimator against the real model: exact named categories, activations within 15%, fitting."""

from __future__ import annotations

import pytest
import torch

from slothbook.errors import ConfigError
from slothbook.profiler import MemoryProfiler, estimate, max_fit
from slothbook.profiler.activations import CUBLAS_LARGE, CUBLAS_SMALL, cublas_workspace_bytes
from slothbook.profiler.estimator import nf4_bytes

LLAMA_31_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                   max_position_embeddings=131072)


def _profile(model, optimizer, run_steps, seq_len, cpu_mode="saved"):
    with MemoryProfiler(model, optimizer, cpu_mode=cpu_mode) as prof:
        run_steps(model, optimizer, seq_len=seq_len, steps=2, profiler=prof)
    return {s.phase: s for s in prof.samples if s.step == 2}


def _estimate(model, seq_len, load_in_4bit):
    # The CPU runs transformers' own modules (no Triton kernels) in fp32, with plain checkpointing.
    return estimate(model.config, seq_len, 1, r=16, load_in_4bit=load_in_4bit, checkpointing="plain",
                    optimizer="adamw", dtype="fp32", device="cpu")


@pytest.mark.parametrize("which,load_in_4bit", [("model16", False), ("model4", True)])
def test_weights_lora_gradients_optimizer_are_exact(which, load_in_4bit, request, adamw, run_steps):
    model = request.getfixturevalue(which)
    measured = _profile(model, adamw(model), run_steps, seq_len=16)
    est = _estimate(model, 16, load_in_4bit)
    assert est["weights"] == measured["optimizer"].weights
    assert est["lora"] == measured["optimizer"].lora
    assert est["gradients"] == measured["backward"].gradients
    assert est["optimizer"] == measured["optimizer"].optimizer


def test_activations_within_15_percent_at_three_lengths(model16, adamw, run_steps):
    opt = adamw(model16)
    for seq_len in (32, 64, 128):
        est = _estimate(model16, seq_len, False)
        saved = _profile(model16, opt, run_steps, seq_len)
        assert est.detail["held_after_forward"] == pytest.approx(saved["forward"].activations, rel=0.15)
        exact = _profile(model16, opt, run_steps, seq_len, cpu_mode="exact")
        assert est["activations"] == pytest.approx(exact["peak"].activations, rel=0.15)
        assert est.total == pytest.approx(exact["peak"].peak, rel=0.15)


def test_nf4_storage_of_one_weight():
    # 4096 x 4096: 8 MiB of packed nibbles, 262144 uint8 absmax, 1024 fp32 second-level absmax, the two codes, offset.
    n = 4096 * 4096
    assert nf4_bytes(n) == n // 2 + n // 64 + 4 * (n // 64 // 256) + 64 + 1024 + 4


def test_llama_8b_qlora_is_the_known_size():
    est = estimate(LLAMA_31_8B, 2048, 1, load_in_4bit=True)
    # 7.0B decoder weights in NF4 (~3.6 GB) plus 16-bit embeddings and head (2 x 1.05 GB).
    assert 5.5e9 < est["weights"] < 6.0e9
    # LoRA r=16 on the 7 projections of 32 layers: 41.9M fp32 parameters.
    assert est["lora"] == 4 * 41_943_040
    assert est["optimizer"] == 2 * est["lora"] + 4 * 7 * 32 * 2
    sixteen = estimate(LLAMA_31_8B, 2048, 1, load_in_4bit=False)
    assert 16.0e9 < sixteen["weights"] < 16.1e9


def test_checkpointing_modes_order_and_offload_reports_host_bytes():
    peaks = {mode: estimate(LLAMA_31_8B, 8192, 1, checkpointing=mode) for mode in ("off", "plain", "offload")}
    assert peaks["offload"]["activations"] < peaks["plain"]["activations"] < peaks["off"]["activations"]
    assert peaks["offload"].detail["offloaded"] == 32 * 8192 * 4096 * 2
    assert peaks["plain"].detail["offloaded"] == 0


def test_offload_tiles_the_mlp_only_above_16k_tokens_as_training_does():
    from slothbook.train.tiled_mlp import TILED_MLP_ABOVE

    at, above = (estimate(LLAMA_31_8B, n, 1, checkpointing="offload") for n in (TILED_MLP_ABOVE, TILED_MLP_ABOVE + 64))
    assert above["activations"] < at["activations"]  # the MLP's part drops to one 4096-token chunk


def test_auto_keeps_what_fits_between_offload_and_off():
    """2048 x 4 tokens of Llama-3.1-8B QLoRA: a roomy GPU keeps every layer (the "off" figure), a small one none (the
    "offload" figure); in between the kept layers grow with the memory and the estimate stays within it."""
    off = estimate(LLAMA_31_8B, 2048, 4, checkpointing="off")
    offload = estimate(LLAMA_31_8B, 2048, 4, checkpointing="offload")
    roomy = estimate(LLAMA_31_8B, 2048, 4, checkpointing="auto", gpu_memory=80 * 2**30)
    assert roomy.detail["kept_layers"] == 32 and roomy.bytes == off.bytes and roomy.detail["offloaded"] == 0
    small = estimate(LLAMA_31_8B, 2048, 4, checkpointing="auto", gpu_memory=8 * 2**30)
    assert small.detail["kept_layers"] == 0 and small.bytes == offload.bytes
    assert small.detail["offloaded"] == offload.detail["offloaded"] == 32 * 8192 * 4096 * 2
    kept = []
    for gib in (14, 18, 22, 26, 30):
        est = estimate(LLAMA_31_8B, 2048, 4, checkpointing="auto", gpu_memory=gib * 2**30)
        k = est.detail["kept_layers"]
        kept.append(k)
        assert est.fits() and offload.total < est.total < off.total, gib
        assert est.detail["offloaded"] == (32 - k) * 8192 * 4096 * 2
    assert kept == sorted(set(kept)) and 0 < kept[0] and kept[-1] < 32, kept


def test_auto_on_the_cpu_is_plain_checkpointing():
    auto = estimate(LLAMA_31_8B, 1024, 2, checkpointing="auto", device="cpu")
    assert auto.bytes == estimate(LLAMA_31_8B, 1024, 2, checkpointing="plain", device="cpu").bytes
    assert auto.detail["kept_layers"] == 0 and auto.settings["checkpointing"] == "auto"


@pytest.mark.skipif(torch.cuda.is_available(), reason="without gpu_memory 'auto' plans for this GPU")
def test_auto_without_a_gpu_needs_gpu_memory():
    with pytest.raises(ConfigError, match="gpu_memory"):
        estimate(LLAMA_31_8B, 1024, checkpointing="auto")


def test_max_fit_with_auto():
    """At the longest sequence that fits nothing is kept: "auto" fits what "offload" fits, and more memory goes to
    kept layers, not to length."""
    budget = 24 * 2**30
    fit = max_fit(LLAMA_31_8B, budget, seq_len=4096, batch_size=2, checkpointing="auto")
    at = estimate(LLAMA_31_8B, fit.seq_len, 2, checkpointing="auto", gpu_memory=budget)
    assert at.total <= budget < estimate(LLAMA_31_8B, fit.seq_len + 64, 2, checkpointing="auto",
                                         gpu_memory=budget).total
    assert at.detail["kept_layers"] == 0
    assert fit == max_fit(LLAMA_31_8B, budget, seq_len=4096, batch_size=2, checkpointing="offload")
    assert estimate(LLAMA_31_8B, 4096, 2, checkpointing="auto", gpu_memory=budget).detail["kept_layers"] > 0


def test_optimizers():
    adam = estimate(LLAMA_31_8B, 1024, optimizer="adamw")
    eight = estimate(LLAMA_31_8B, 1024, optimizer="adamw_8bit")
    sgd = estimate(LLAMA_31_8B, 1024, optimizer="sgd")
    assert sgd["optimizer"] == 0 < eight["optimizer"] < adam["optimizer"] / 3


def test_max_fit_is_the_boundary():
    budget = 24 * 2**30
    fit = max_fit(LLAMA_31_8B, budget, seq_len=4096, batch_size=2)
    assert estimate(LLAMA_31_8B, fit.seq_len, 2).total <= budget < estimate(LLAMA_31_8B, fit.seq_len + 64, 2).total
    assert estimate(LLAMA_31_8B, 4096, fit.batch_size).total <= budget < estimate(LLAMA_31_8B, 4096,
                                                                                  fit.batch_size + 1).total
    tiny = max_fit(LLAMA_31_8B, 2**30)  # 1 GiB does not hold the weights
    assert tiny.seq_len is None and tiny.batch_size is None


def test_result_table_figure_and_inputs(embedded_dir):
    by_name = estimate("smollm2-135m", 512, 2, gpu_memory=8 * 2**30)
    by_path = estimate(str(embedded_dir), 512, 2)
    assert by_name.total == by_path.total
    assert by_name.fits() and not by_name.fits(2**20)
    df = by_name.to_pandas()
    assert list(df.category) == ["weights", "lora", "gradients", "optimizer", "activations", "total"]
    assert df.bytes.iloc[-1] == by_name.total == sum(by_name.bytes.values())
    fig = by_name.figure()
    assert [round(y, 6) for y in fig.data[0].y] == [round(b / 2**30, 6) for b in by_name.bytes.values()]
    assert "predicted peak" in str(by_name)


@pytest.mark.parametrize("bad", [dict(checkpointing="sometimes"), dict(optimizer="lion"), dict(seq_len=0),
                                 dict(implementation="jax"), dict(device="tpu"), dict(kernels="yes")])
def test_bad_arguments_are_config_errors(bad):
    kwargs = dict(seq_len=128) | bad
    with pytest.raises(ConfigError):
        estimate(LLAMA_31_8B, **kwargs)


def test_unknown_target_module_is_a_config_error():
    with pytest.raises(ConfigError, match="match no linear layer"):
        estimate(LLAMA_31_8B, 128, target_modules=["qkv_proj"])


def test_estimate_reads_no_weights():
    before = torch.cuda.memory_allocated() if torch.cuda.is_available() else None
    estimate(LLAMA_31_8B, 128)  # 16 GB of bf16 weights if anything were materialised
    if before is not None:
        assert torch.cuda.memory_allocated() == before


def test_kernels_follow_the_device_as_from_pretrained_does():
    assert estimate(LLAMA_31_8B, 1024).settings["implementation"] == "kernels"
    assert estimate(LLAMA_31_8B, 1024, device="cpu").settings["implementation"] == "hf"
    assert estimate(LLAMA_31_8B, 1024, device="cpu", kernels=True).settings["implementation"] == "kernels"
    assert estimate(LLAMA_31_8B, 1024, kernels=False).settings["implementation"] == "hf"
    assert estimate(LLAMA_31_8B, 1024, kernels=False, implementation="kernels").settings["kernels"] is True


def test_fused_cross_entropy_makes_no_logits():
    # transformers' head holds the [tokens x vocab] logits (bf16) and their fp32 log-softmax from forward to
    # backward; the fused loss holds two [tokens x hidden] tensors instead.
    n, hidden, vocab = 8192, 4096, 128256
    kernels = estimate(LLAMA_31_8B, n, checkpointing="plain", device="cpu", kernels=True)
    hf = estimate(LLAMA_31_8B, n, checkpointing="plain", device="cpu", kernels=False)
    head = hf.detail["held_after_forward"] - kernels.detail["held_after_forward"]
    assert head >= n * vocab * (2 + 4) - n * 2 * hidden * 2
    assert hf.detail["peak_where"] == "head" and kernels.detail["peak_where"] == "layer"


def test_cublas_workspace_sizes(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert cublas_workspace_bytes((9, 0)) == CUBLAS_LARGE == 32 * 2**20  # Hopper
    assert cublas_workspace_bytes((8, 0)) == CUBLAS_SMALL == 8 * 2**20 + 128 * 2**10  # Ampere
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # the deterministic-algorithms setting
    assert cublas_workspace_bytes((8, 0)) == 32 * 2**20
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    assert cublas_workspace_bytes((9, 0)) == 128 * 2**10


def test_cuda_adds_two_cublas_workspaces_and_the_adamw_step(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    cuda, cpu = (estimate(LLAMA_31_8B, 2048, checkpointing="plain", device=d, kernels=True) for d in ("cuda", "cpu"))
    assert cuda.detail["cuda_runtime"] == 2 * 32 * 2**20 and cpu.detail["cuda_runtime"] == 0
    assert cuda["activations"] - cpu["activations"] == 2 * 32 * 2**20
    assert cuda.detail["held_after_forward"] - cpu.detail["held_after_forward"] == 2 * 32 * 2**20
    # A short sequence: foreach AdamW's square roots of every second moment outweigh the layer's activations.
    short = estimate(LLAMA_31_8B, 16, optimizer="adamw")
    assert short.detail["peak_where"] == "optimizer step"
    assert short["activations"] == short["lora"] + 2 * 32 * 2**20
    assert estimate(LLAMA_31_8B, 16, optimizer="adamw_8bit").detail["peak_where"] != "optimizer step"


def _tiny_llama(**overrides):
    """A small random Llama built in place (no files), fp32, LoRA r=16 on every projection, plain checkpointing."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from slothbook import FastLanguageModel

    values = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024) | overrides
    config = LlamaConfig(**values)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = FastLanguageModel.get_peft_model(AutoModelForCausalLM.from_config(config, dtype=torch.float32), r=16,
                                             use_gradient_checkpointing=True)
    return model, config


def test_kernel_path_activations_within_15_percent(adamw, run_steps):
    """slothbook's kernels (the Triton interpreter on the CPU) against the "kernels" activation model, measured by
    the exact tracker: the fused LoRA and MLP saved tensors, the norm kernel's saved input, the fused loss."""
    from slothbook.models.patch import is_patched, patch_model
    from slothbook.profiler.setup import training_setup

    model, config = _tiny_llama()
    patch_model(model)
    assert is_patched(model)
    opt = adamw(model)
    with MemoryProfiler(model, opt, cpu_mode="exact") as prof:
        run_steps(model, opt, seq_len=256, steps=2, profiler=prof)
    setup = training_setup(model, opt, "cpu")
    assert (setup["kernels"], setup["device"], setup["checkpointing"]) == (True, "cpu", "plain")
    est = estimate(config, 256, 1, **setup)
    assert est.settings["implementation"] == "kernels" and est.detail["cuda_runtime"] == 0
    # The step's peak (the top layer's backward, with every layer input held): what was held after forward is in
    # it. The forward sample itself is not compared: Triton's interpreter keeps the last launch's arguments (a
    # chunk of logits, as large as a layer input at this size) alive, which a GPU does not.
    assert est.detail["peak_where"] == "layer"
    assert est["activations"] == pytest.approx(prof.steps[-1].activations, rel=0.15)
    assert est.total == pytest.approx(prof.steps[-1].peak, rel=0.05)


# The CUDA comparison runs in a fresh process: memory_allocated() is the whole process's, so tensors that earlier
# tests keep alive (session fixtures, a failed test's traceback) would count as this step's activations, and
# cuBLAS's workspaces must be made by this run's own forward and backward threads, as in a user's session.
_CUDA_RUN = r"""
import json, sys
import torch
from slothbook import FastLanguageModel
from slothbook.profiler import MemoryProfiler, estimate
from slothbook.profiler.setup import training_setup

name, checkpointing, seq, batch = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model, _ = FastLanguageModel.from_pretrained(name, load_in_4bit=True, max_seq_length=seq)
model = FastLanguageModel.get_peft_model(model, r=16, use_gradient_checkpointing=checkpointing)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")
with MemoryProfiler(model, opt, live=False) as prof:
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        prof.step()
row = prof.steps[-1]
phases = {s.phase: s for s in prof.samples if s.step == row.step}
est = estimate(model.config, seq, batch, **training_setup(model, opt, "cuda"))
print(json.dumps(dict(
    measured=dict(peak=row.peak, weights=row.weights, lora=row.lora, gradients=row.gradients,
                  optimizer=row.optimizer, activations=row.activations,
                  held_after_forward=phases["forward"].activations,
                  peak_before=next((p for p, s in phases.items() if p != "peak" and s.peak >= row.peak), "after")),
    estimate=dict(est.bytes, total=est.total, **{k: v for k, v in est.detail.items()}),
    settings={k: v for k, v in est.settings.items() if k != "target_modules"})))
"""


@pytest.mark.gpu
@pytest.mark.parametrize("checkpointing", [True, "slothbook"], ids=["plain", "offload"])
def test_estimate_is_within_20_percent_of_the_cuda_peak(train_model_name, checkpointing):
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _CUDA_RUN, train_model_name, json.dumps(checkpointing), "2048", "2"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    measured, est = result["measured"], result["estimate"]
    table = json.dumps(result, indent=1)  # every part, in the failure message: which term is off, and by how much
    assert result["settings"]["implementation"] == "kernels", table
    # bitsandbytes may share its small code tables between CUDA weights: equal to a kilobyte per weight.
    assert est["weights"] == pytest.approx(measured["weights"], rel=1e-3), table
    assert est["total"] == pytest.approx(measured["peak"], rel=0.20), table


def _offloaded_tiny_model():
    """A small random Llama whose layer inputs are a large share of its activations (vocab 512)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from slothbook import FastLanguageModel
    from slothbook.train.offload import enable_offloaded_checkpointing

    config = LlamaConfig(hidden_size=256, intermediate_size=896, num_hidden_layers=8, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = FastLanguageModel.get_peft_model(AutoModelForCausalLM.from_config(config, dtype=torch.float32), r=16,
                                             use_gradient_checkpointing=False)
    enable_offloaded_checkpointing(model, offload_on_cpu=True)  # the GPU's offload path, through host buffers
    return model, config


def test_offloaded_checkpointing_holds_no_layer_inputs(adamw, run_steps):
    model, config = _offloaded_tiny_model()
    opt = adamw(model)
    with MemoryProfiler(model, opt, cpu_mode="exact") as prof:
        run_steps(model, opt, seq_len=1024, steps=2, profiler=prof)
    forward = next(s for s in prof.samples if s.step == 2 and s.phase == "forward")
    assert forward.offloaded >= 8 * 1024 * 256 * 4  # the inputs did go to the pool
    est = estimate(config, 1024, 1, load_in_4bit=False, checkpointing="offload", dtype="fp32", device="cpu")
    assert est.detail["held_after_forward"] == pytest.approx(forward.activations, rel=0.15)
    assert est["activations"] == pytest.approx(prof.steps[-1].activations, rel=0.15)


def test_eight_bit_adamw_state_matches_bitsandbytes():
    import bitsandbytes as bnb

    from slothbook.profiler.estimator import optimizer_bytes
    from slothbook.profiler.tensors import StorageSet, optimizer_tensors

    # A's and B's of r=16 adapters: above and below bitsandbytes' 4096-element threshold for 8-bit state.
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    params = [torch.nn.Parameter(torch.randn(shape, device=device))
              for shape in ((16, 576), (192, 16), (1536, 16), (16, 1536))]
    opt = bnb.optim.AdamW8bit(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    stored = StorageSet(device).add_all(optimizer_tensors(opt))
    assert optimizer_bytes([p.numel() for p in params], "adamw_8bit") == stored
