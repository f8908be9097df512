"""Kernel wiring (slothbook/models/patch.py): with the kernels on, every family computes what transformers computes.

Each comparison runs one model twice, kernels on, then `unpatch` and the same inputs again. Without CUDA the
kernels run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1), which is slow per program, so
inputs are a few tokens long and the real model keeps only its first decoder layers.
"""

from __future__ import annotations

import logging

import pytest
import torch

from slothbook import FastLanguageModel
from slothbook.errors import DeviceError
from slothbook.forwards import inner_forward
from slothbook.kernels._utils import is_interpret
from slothbook.kernels.nf4 import NF4Weight
from slothbook.models.families import FAMILIES
from slothbook.models.families.tiny import save_tiny_model
from slothbook.models.patch import is_patched, lora_parts, patch_model, unpatch, wants_kernels
from slothbook.train.offload import enable_offloaded_checkpointing
from slothbook.train.tiled_mlp import _PATCH_KEY as TILED_KEY
from slothbook.train.tiled_mlp import disable_tiled_mlp, enable_tiled_mlp

FAMILY_NAMES = sorted(FAMILIES)
BASES = pytest.mark.parametrize("load_in_4bit", [False, True], ids=["lora16", "qlora"])


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Norm-relative difference."""
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, embedded_tokenizer):
    """One saved tiny random model per family, made on first use."""
    made = {}

    def get(model_type):
        if model_type not in made:
            made[model_type] = tmp_path_factory.mktemp(model_type)
            save_tiny_model(model_type, made[model_type], embedded_tokenizer)
        return made[model_type]

    return get


def tiny_lora(folder, load_in_4bit, kernels=True, checkpointing=True):
    model, tok = FastLanguageModel.from_pretrained(str(folder), max_seq_length=64, dtype=torch.float32,
                                                   load_in_4bit=load_in_4bit, kernels=kernels)
    # Random B (PEFT starts it at zero) so the adapters change the outputs and A gets gradients from step one.
    model = FastLanguageModel.get_peft_model(model, r=4, init_lora_weights=False,
                                             use_gradient_checkpointing=checkpointing)
    exact_cpu_nf4(model)
    return model, tok


def exact_cpu_nf4(model):
    """Keep bitsandbytes on exact NF4 math on the CPU: in eval it otherwise repacks the weights for a bf16 AVX-512
    kernel that is off by ~1e-3, which would make the reference, not the kernels, the inexact side."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def padded_batch(vocab: int, seed: int = 0):
    """Two rows of 8 tokens; the second is right-padded by 3 (masked out, labels ignored)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


def logits_loss_grads(model, ids, mask, labels, **loss_kwargs):
    ids, mask, labels = (t.to(model.device) for t in (ids, mask, labels))
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **loss_kwargs)
    out.loss.backward()
    return logits, out.loss.detach(), lora_grads(model), out.logits


def assert_wired(model, family):
    """Every module of the family's wiring has a kernel forward; every LoRA layer takes the fused path."""
    wiring = family.wiring
    names = {wiring.norm, wiring.attention, wiring.mlp, wiring.causal_lm}
    modules = [m for m in model.modules() if type(m).__name__ in names]
    assert {type(m).__name__ for m in modules} == names
    assert all("_slothbook_kernel_forward" in m.__dict__ for m in modules)
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert lora_layers
    for layer in lora_layers:
        parts = lora_parts(layer)
        assert parts is not None, type(layer).__name__
        base_is_4bit = hasattr(layer.base_layer.weight, "quant_state")
        assert isinstance(parts[0].weight, NF4Weight) == base_is_4bit


# ---------------------------------------------------------------- every family, tiny


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
@BASES
def test_forward_loss_and_lora_grads_match_transformers(model_type, load_in_4bit, tiny_dirs):
    model, tok = tiny_lora(tiny_dirs(model_type), load_in_4bit)
    assert_wired(model, FAMILIES[model_type])
    batch = padded_batch(len(tok))

    logits, loss, grads, fused_logits = logits_loss_grads(model, *batch)
    assert fused_logits is None  # the loss came from the fused linear cross-entropy: no logits were made
    assert unpatch(model) > 0 and not is_patched(model)
    want_logits, want_loss, want_grads, _ = logits_loss_grads(model, *batch)

    assert rel(logits, want_logits) < 1e-4
    assert rel(loss, want_loss) < 1e-4
    assert want_grads.keys() == grads.keys()
    assert len(grads) == 2 * 2 * len(FAMILIES[model_type].target_modules)  # A and B of every target, 2 layers
    worst = max(grads, key=lambda n: rel(grads[n], want_grads[n]))
    assert rel(grads[worst], want_grads[worst]) < 1e-3, worst


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
@BASES
def test_greedy_generation_with_kv_cache_matches_transformers(model_type, load_in_4bit, tiny_dirs):
    model, tok = tiny_lora(tiny_dirs(model_type), load_in_4bit)
    FastLanguageModel.for_inference(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, len(tok), (2, 6), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = tok.pad_token_id, 0  # left padding, as for_inference sets it
    ids, mask = ids.to(model.device), mask.to(model.device)

    def generate():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8,
                             do_sample=False)
        return out[:, ids.shape[1]:]

    got = generate()
    unpatch(model)
    assert torch.equal(got, generate())


@pytest.mark.parametrize("model_type, overrides", [
    ("mistral", {"sliding_window": 4}),  # 12 tokens: the window (from transformers' mask) cuts in, cached too
    ("phi3", {"partial_rotary_factor": 0.5}),  # Phi-4-mini style: RoPE on the first half of each head only
], ids=["sliding-window", "partial-rotary"])
def test_config_variants_match_transformers(model_type, overrides, tmp_path, embedded_tokenizer):
    from transformers import AutoModelForCausalLM

    from slothbook.models.families.tiny import tiny_config

    torch.manual_seed(0)
    config = tiny_config(model_type, vocab_size=len(embedded_tokenizer), **overrides)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    embedded_tokenizer.save_pretrained(tmp_path)
    model, tok = tiny_lora(tmp_path, load_in_4bit=False, checkpointing=False)
    ids = torch.randint(3, len(tok), (1, 12), generator=torch.Generator().manual_seed(2))
    batch = ids, torch.ones_like(ids), ids

    def run():
        logits, loss, grads, _ = logits_loss_grads(model, *batch)
        FastLanguageModel.for_inference(model)
        tokens = model.generate(input_ids=ids.to(model.device), max_new_tokens=4, min_new_tokens=4,
                                do_sample=False)
        return logits, loss, grads, tokens

    got = run()
    unpatch(model)
    want = run()
    assert rel(got[0], want[0]) < 1e-4 and rel(got[1], want[1]) < 1e-4
    assert all(rel(got[2][n], want[2][n]) < 1e-3 for n in want[2])
    assert torch.equal(got[3], want[3])


def test_nf4_weights_repacked_by_bitsandbytes_take_peft_path(tiny_dirs):
    """On an AVX-512-bf16 CPU, bitsandbytes repacks 4-bit weights at the first eval call: they are no longer NF4."""
    model, tok = FastLanguageModel.from_pretrained(str(tiny_dirs("llama")), load_in_4bit=True, kernels=False,
                                                   device_map={"": "cpu"})
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    if not getattr(q_proj.base_layer, "support_avx512bf16_for_cpu", False):
        pytest.skip("bitsandbytes repacks weights only on CPUs with AVX-512 bf16")
    assert isinstance(lora_parts(q_proj)[0].weight, NF4Weight)
    q_proj.eval()
    with torch.no_grad():
        q_proj.base_layer(torch.randn(1, 3, model.config.hidden_size))
    assert q_proj.base_layer.weight.quant_state.packing_format_for_cpu
    assert lora_parts(q_proj) is None


# ---------------------------------------------------------------- the loss


def test_loss_honours_num_items_in_batch(tiny_dirs):
    """Gradient accumulation: the Trainer divides summed token losses by the tokens of all micro-batches."""
    model, tok = tiny_lora(tiny_dirs("llama"), load_in_4bit=False, checkpointing=False)
    batch = padded_batch(len(tok), seed=3)
    n_items = torch.tensor(40)  # more than this micro-batch's 11 scored tokens

    _, loss, grads, fused_logits = logits_loss_grads(model, *batch, num_items_in_batch=n_items)
    assert fused_logits is None
    _, mean_loss, _, _ = logits_loss_grads(model, *batch)
    unpatch(model)
    _, want_loss, want_grads, _ = logits_loss_grads(model, *batch, num_items_in_batch=n_items)

    scored = (batch[2][:, 1:] != -100).sum()
    assert rel(loss, mean_loss * scored / n_items) < 1e-5
    assert rel(loss, want_loss) < 1e-4
    assert all(rel(grads[n], want_grads[n]) < 1e-3 for n in want_grads)


def test_eval_and_unlabelled_calls_keep_the_logits(tiny_dirs):
    model, tok = tiny_lora(tiny_dirs("llama"), load_in_4bit=False, checkpointing=False)
    ids, mask, labels = (t.to(model.device) for t in padded_batch(len(tok)))
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (2, 8, len(tok)) and torch.isfinite(out.loss)


# ---------------------------------------------------------------- the real model, end to end


def _first_layers(model, n):
    model.model.layers = model.model.layers[:n]
    model.config.num_hidden_layers = n


def _train(kernels: bool, steps: int = 10):
    model, tok = FastLanguageModel.from_pretrained("smollm2-135m", max_seq_length=64, dtype=torch.float32,
                                                   kernels=kernels)
    _first_layers(model, 2)
    model = FastLanguageModel.get_peft_model(model, r=8, use_gradient_checkpointing=False)
    # The GPU path of use_gradient_checkpointing="slothbook": layer inputs parked in the host pool, layers
    # recomputed in backward (on a CPU-only machine "slothbook" would pick plain torch checkpointing instead).
    enable_offloaded_checkpointing(model, offload_on_cpu=True)
    text = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France."]
    batch = tok(text, return_tensors="pt", padding=True).to(model.device)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        out = model(**batch, labels=labels)
        assert (out.logits is None) == kernels
        out.loss.backward()
        losses.append(out.loss.item())
        grads = lora_grads(model)
        opt.step()
    return torch.tensor(losses), grads, model


def test_ten_training_steps_on_the_real_model_match_transformers():
    """SmolLM2-135M in fp32, its first 2 of 30 decoder layers, offloaded checkpointing, 10 SGD steps."""
    losses, grads, model = _train(kernels=True)
    assert is_patched(model)
    want_losses, want_grads, plain = _train(kernels=False)
    assert not is_patched(plain)
    assert losses[-1] < losses[0], losses
    assert rel(losses, want_losses) < 1e-4 and (losses - want_losses).abs().max() / want_losses.abs().min() < 1e-4
    assert grads.keys() == want_grads.keys()
    assert all(rel(grads[n], want_grads[n]) < 1e-3 for n in want_grads)


# ---------------------------------------------------------------- switching the kernels on and off


def _has_own_forward(model) -> list[str]:
    return [name for name, m in model.named_modules() if "forward" in m.__dict__ or "_slothbook_kernel_forward"
            in m.__dict__]


def test_kernels_false_leaves_forwards_untouched_and_unpatch_restores_them(tiny_dirs):
    plain, _ = FastLanguageModel.from_pretrained(str(tiny_dirs("gemma3")), kernels=False)
    assert _has_own_forward(plain) == []
    assert not is_patched(plain)

    model, _ = FastLanguageModel.from_pretrained(str(tiny_dirs("gemma3")), kernels=True)
    wired = 2 * (6 + 1 + 1) + 1 + 1  # per layer: 4 sandwich norms, q/k norms, attention, MLP; final norm; LM
    assert len(_has_own_forward(model)) == wired
    assert patch_model(model) == {"norm": 0, "attention": 0, "mlp": 0, "loss": 0}  # already patched: no-op
    assert unpatch(model) == wired
    assert _has_own_forward(model) == []
    assert type(model).forward is model.forward.__func__


def test_unpatch_leaves_a_forward_wrapped_after_ours(tiny_dirs, caplog):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_dirs("llama")), kernels=True)
    patched = model.forward
    model.forward = lambda *a, **k: patched(*a, **k)  # e.g. TRL's fused LM head wraps the forward it finds
    with caplog.at_level(logging.WARNING, logger="slothbook"):
        unpatch(model)
    assert "wrapped after the kernels" in caplog.text
    assert _has_own_forward(model) == [""]  # only the causal LM itself keeps its (wrapped) forward


def test_kernels_patched_after_tiling_run_inside_the_tiled_mlp(tiny_dirs):
    # The order of long_context.py's first product-path run: get_peft_model("slothbook") tiles the MLPs, then
    # patch_model; replacing the tiled forward had left the MLP untiled (an out-of-memory at 385K tokens).
    model, _ = FastLanguageModel.from_pretrained(str(tiny_dirs("llama")), dtype=torch.float32, kernels=False)
    model = FastLanguageModel.get_peft_model(model, r=4, init_lora_weights=False, use_gradient_checkpointing=False)
    mlp = model.get_base_model().model.layers[0].mlp
    x = torch.randn(1, 24, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    plain = mlp(x)
    enable_tiled_mlp(model, chunk_tokens=8)
    patch_model(model)
    inner = inner_forward(mlp, TILED_KEY)
    assert getattr(inner, "__func__", None) is not type(mlp).forward  # the kernel's forward, inside the tiling
    tiled = mlp(x.requires_grad_())
    assert "TiledMLP" in type(tiled.grad_fn).__name__
    assert rel(tiled.detach(), plain.detach()) < 1e-5
    assert unpatch(model) == len(model.get_base_model().model.layers) * 4 + 2  # nothing wrapped over: all restored
    assert inner_forward(mlp, TILED_KEY).__func__ is type(mlp).forward  # the tiling wraps the MLP's own again
    disable_tiled_mlp(model)
    assert "forward" not in mlp.__dict__


def test_kernels_default_follows_the_device(tiny_dirs, monkeypatch):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_dirs("llama")), device_map={"": "cpu"})  # kernels=None
    assert not is_patched(model)
    assert wants_kernels(model, None) is False and wants_kernels(model, False) is False
    if is_interpret():  # as tests/conftest.py sets it without CUDA
        assert wants_kernels(model, True) is True
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(DeviceError, match="kernels=False"):
        wants_kernels(model, True)


def test_trl_sft_trainer_trains_through_the_kernels(tiny_dirs, tmp_path):
    """TRL 1.16 swaps in its own fused LM head (per-token log-probs for entropy/accuracy metrics) over our forward;
    the decoder layers still run the kernels, and its metrics still work."""
    from datasets import Dataset

    from slothbook.train.sft import TrainArgs, build_trainer

    model, tok = tiny_lora(tiny_dirs("qwen3"), load_in_4bit=False)
    data = Dataset.from_dict({"text": ["one two three four", "five six seven"] * 2})
    args = TrainArgs(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, max_seq_length=16,
                     logging_steps=1, warmup_steps=0, disable_tqdm=True)
    trainer = build_trainer(model, tok, data, args)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all("mean_token_accuracy" in h and "entropy" in h for h in logged)
    assert is_patched(model)


# ---------------------------------------------------------------- GPU (bf16, realistic sizes)


def _bigger_tiny(model_type, folder, tokenizer):
    from transformers import AutoModelForCausalLM

    from slothbook.models.families.tiny import tiny_config

    sizes = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=128)
    if model_type == "phi3":
        sizes.pop("head_dim")
        sizes["num_attention_heads"] = 8
    torch.manual_seed(0)
    config = tiny_config(model_type, vocab_size=len(tokenizer), **sizes)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", FAMILY_NAMES)
@BASES
def test_gpu_bf16_every_family_matches_transformers(model_type, load_in_4bit, tmp_path, embedded_tokenizer):
    _bigger_tiny(model_type, tmp_path, embedded_tokenizer)
    model, tok = FastLanguageModel.from_pretrained(str(tmp_path), max_seq_length=512, dtype=torch.bfloat16,
                                                   load_in_4bit=load_in_4bit)  # kernels=None: on, on a GPU
    assert is_patched(model)
    model = FastLanguageModel.get_peft_model(model, r=16, init_lora_weights=False,
                                             use_gradient_checkpointing="slothbook")
    assert_wired(model, FAMILIES[model_type])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tok), (4, 512), generator=g).cuda()
    mask = torch.ones_like(ids)
    mask[1, 400:] = 0
    labels = ids.masked_fill(mask == 0, -100)

    logits, loss, grads, _ = logits_loss_grads(model, ids, mask, labels)
    unpatch(model)
    want_logits, want_loss, want_grads, _ = logits_loss_grads(model, ids, mask, labels)
    # bf16: the kernels round at other points than transformers (fused LoRA in bf16, fp32 RoPE and norms).
    assert rel(logits, want_logits) < 2e-2
    assert rel(loss, want_loss) < 1e-2
    assert all(rel(grads[n], want_grads[n]) < 5e-2 for n in want_grads)


@pytest.mark.gpu
def test_gpu_bf16_real_model_generation_uses_the_cache_consistently(train_model_name):
    """Greedy decoding with the KV cache through the kernels agrees with one full forward over the same tokens."""
    model, tok = FastLanguageModel.from_pretrained(train_model_name, max_seq_length=512, dtype=torch.bfloat16)
    assert is_patched(model)
    FastLanguageModel.for_inference(model)
    ids = tok("The capital of France is", return_tensors="pt").input_ids.cuda()
    out = model.generate(ids, max_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True)
    if train_model_name == "smollm2-135m":  # the real weights; the random stand-in knows no geography
        assert "Paris" in tok.decode(out.sequences[0, ids.shape[1]:])
    with torch.no_grad():
        full = model(input_ids=out.sequences).logits[0, ids.shape[1] - 1:-1]
    cached = torch.stack(out.logits, dim=1)[0]
    assert rel(cached.float(), full.float()) < 2e-2
    # bf16 rounds differently with and without the cache: a near-tie may flip, most positions must not.
    assert (cached.argmax(-1) == full.argmax(-1)).float().mean() >= 0.9


@pytest.mark.gpu
@BASES
def test_gpu_bf16_real_model_training_matches_transformers(load_in_4bit, train_model_name):
    def run(kernels):
        model, tok = FastLanguageModel.from_pretrained(train_model_name, max_seq_length=1024, dtype=torch.bfloat16,
                                                       load_in_4bit=load_in_4bit, kernels=kernels)
        model = FastLanguageModel.get_peft_model(model, r=16, use_gradient_checkpointing="slothbook")
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, len(tok), (4, 1024), generator=g).cuda()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        losses = []
        for _ in range(5):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return torch.tensor(losses)

    got, want = run(True), run(False)
    assert rel(got, want) < 1e-2
