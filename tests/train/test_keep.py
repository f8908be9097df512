"""use_gradient_checkpointing="auto": the last k decoder layers keep their activations, the others are checkpointed.

On the CPU the embedded SmolLM2 (30 layers, fp32, transformers' modules) with a forced byte budget: which layers
recompute, that the LoRA gradients equal plain checkpointing's, and that the plan's bytes per layer are what a
layer really saves (measured with saved-tensor hooks). The GPU test checks the measured plan on a real device.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from slothbook import FastLanguageModel
from slothbook.errors import ConfigError
from slothbook.train.checkpointing import set_gradient_checkpointing
from slothbook.train.keep import KeepPlan, recipe_of
from slothbook.train.offload import (disable_offloaded_checkpointing, enable_offloaded_checkpointing, find_decoder_layers,
                                     keep_plan)
from lora_steps import lora_grads

LAYERS = 30
BATCH, SEQ = 2, 16


@pytest.fixture(scope="module")
def model():
    base, _ = FastLanguageModel.from_pretrained("smollm2-135m", max_seq_length=64)
    peft_model = FastLanguageModel.get_peft_model(base, r=4)  # the default: "auto"
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B starts at zero; make it non-zero so every LoRA matrix gets a gradient
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return peft_model


@pytest.fixture
def ids(model):
    return torch.randint(3, model.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def mlp_calls(model, ids):
    """LoRA gradients, and how often each layer's MLP ran in one step: 1 when kept, 2 when recomputed."""
    layers = find_decoder_layers(model)
    calls = [0] * len(layers)
    # A pre-hook: torch's checkpoint stops a recompute as soon as the last saved tensor is back, before the MLP
    # returns.
    hooks = [layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(layers)]
    try:
        _, grads = lora_grads(model, ids)
    finally:
        for hook in hooks:
            hook.remove()
    return calls, grads


def layer_bytes(model, ids) -> int:
    """What the plan charges for one kept layer over these tokens."""
    return ids.numel() * recipe_of(model.config, find_decoder_layers(model)[0]).kept_bytes(4, ids.shape[1])


@pytest.fixture(scope="module")
def plain(model):
    """Reference LoRA gradients from transformers' plain checkpointing."""
    ids = torch.randint(3, model.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    set_gradient_checkpointing(model, True)
    try:
        return lora_grads(model, ids)[1]
    finally:
        set_gradient_checkpointing(model, "auto")


def assert_equal_grads(got, expected):
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)


def test_default_is_auto_and_the_cpu_keeps_nothing(model, ids, plain):
    plan = keep_plan(model)
    assert isinstance(plan, KeepPlan) and plan.memory_budget is None
    calls, grads = mlp_calls(model, ids)
    assert plan.kept == 0 and calls == [2] * LAYERS  # the CPU: plain checkpointing
    assert_equal_grads(grads, plain)


@pytest.mark.parametrize("kept", [0, 1, 17, LAYERS])
def test_a_budget_for_k_layers_keeps_exactly_the_last_k(model, ids, plain, kept):
    """Budget 0 checkpoints every layer, one far beyond the model keeps them all, and in between exactly the last k."""
    one = layer_bytes(model, ids)
    budget = 1 << 40 if kept == LAYERS else kept * one + (one // 2 if kept else 0)
    set_gradient_checkpointing(model, "auto", memory_budget=budget)
    try:
        calls, grads = mlp_calls(model, ids)
        assert keep_plan(model).kept == kept
    finally:
        set_gradient_checkpointing(model, "auto")
    assert calls == [2] * (LAYERS - kept) + [1] * kept
    assert_equal_grads(grads, plain)


def test_the_offload_path_with_kept_layers(model, ids, plain):
    """The GPU's offload path, through ordinary host buffers: the checkpointed layers' inputs go to the pool."""
    budget = 5 * layer_bytes(model, ids)
    pool = enable_offloaded_checkpointing(model, offload_on_cpu=True, auto=True, memory_budget=budget)
    try:
        calls, grads = mlp_calls(model, ids)
        assert pool.stats().buffers == LAYERS - 5  # one host buffer per offloaded layer, back in the pool
    finally:
        set_gradient_checkpointing(model, "auto")
    assert calls == [2] * (LAYERS - 5) + [1] * 5
    assert_equal_grads(grads, plain)


def test_the_plan_follows_the_tokens_of_each_forward(model):
    budget = 4 * BATCH * SEQ * recipe_of(model.config, find_decoder_layers(model)[0]).kept_bytes(4, SEQ)
    set_gradient_checkpointing(model, "auto", memory_budget=budget)
    try:
        for length, kept in ((SEQ, 4), (2 * SEQ, 2), (SEQ // 2, 8)):
            ids = torch.randint(3, 1000, (BATCH, length))
            lora_grads(model, ids)
            assert keep_plan(model).kept == kept, length
        model.eval()
        with torch.no_grad():  # generation and eval do not plan (nor checkpoint)
            model(input_ids=torch.randint(3, 1000, (1, 3)))
        assert keep_plan(model).kept == 8
    finally:
        model.train()
        set_gradient_checkpointing(model, "auto")


@pytest.mark.parametrize("mode, budget", [("auto", -1), ("auto", 1.5), ("auto", True), ("auto", "1GB"),
                                          (True, 100), ("slothbook", 0.5)])
def test_bad_budgets_are_config_errors(model, mode, budget):
    with pytest.raises(ConfigError, match="memory_budget"):
        set_gradient_checkpointing(model, mode, memory_budget=budget)
    set_gradient_checkpointing(model, "auto")


def test_disable_removes_the_plan(model):
    enable_offloaded_checkpointing(model, offload=False, auto=True)
    disable_offloaded_checkpointing(model)
    assert keep_plan(model) is None
    set_gradient_checkpointing(model, "auto")
    assert keep_plan(model) is not None


# ------------------------------------------------------------------ the plan's bytes against what a layer saves

def saved_bytes_per_token(model, ids, index=1) -> float:
    """Bytes of the distinct storages one layer saves for backward (parameters and the shared rotary tables
    apart), measured with saved-tensor hooks around a forward without checkpointing."""
    layer = find_decoder_layers(model)[index]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    state = {"on": False, "shared": set(), "saved": {}}

    def enter(module, args, kwargs):
        state["on"] = True
        state["shared"] = {t.untyped_storage().data_ptr() for t in kwargs.get("position_embeddings", ())}

    def leave(module, args, out):
        state["on"] = False

    def pack(t):
        storage = t.untyped_storage()
        # A 1-D tensor has no token dimension: saved once a step whatever the tokens (Gemma's 1 + weight).
        if state["on"] and t.dim() > 1 and storage.data_ptr() not in params | state["shared"]:
            state["saved"][storage.data_ptr()] = storage.nbytes()
        return t

    hooks = [layer.register_forward_pre_hook(enter, with_kwargs=True), layer.register_forward_hook(leave)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids)
    finally:
        for hook in hooks:
            hook.remove()
    return sum(state["saved"].values()) / ids.numel()


def assert_plan_covers(model, ids, a):
    recipe = recipe_of(model.config, find_decoder_layers(model)[0])
    measured = saved_bytes_per_token(model, ids)
    planned = recipe.kept_bytes(a, ids.shape[1])
    assert measured > 0
    # An over-estimate only keeps fewer layers; an under-estimate could run out of memory.
    assert measured <= planned <= 2 * measured, (recipe, measured, planned)
    return measured, planned


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_plan_bytes_cover_what_a_layer_saves_hf_path(dtype):
    from transformers import AutoModelForCausalLM

    from slothbook.models.embedded import embedded_model_dir

    base = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=dtype, num_hidden_layers=2)
    model = FastLanguageModel.get_peft_model(base, r=8, use_gradient_checkpointing=False).train()
    assert recipe_of(model.config, find_decoder_layers(model)[0]).impl == "hf"
    assert_plan_covers(model, torch.randint(3, 1000, (2, 32)), 4 if dtype == torch.float32 else 2)


def tiny_llama(kernels: bool, layers=2, **sizes):
    """A small random Llama built in place, fp32, LoRA r=8 on every projection; slothbook's kernels on request
    (the Triton interpreter on the CPU)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from slothbook.models.patch import patch_model

    values = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=1 << 15) | sizes
    config = LlamaConfig(**values)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = FastLanguageModel.get_peft_model(AutoModelForCausalLM.from_config(config, dtype=torch.float32), r=8,
                                             use_gradient_checkpointing=False)
    if kernels:
        patch_model(model)
    return model.train()


def test_plan_bytes_cover_what_a_layer_saves_kernel_path():
    model = tiny_llama(kernels=True)
    assert recipe_of(model.config, find_decoder_layers(model)[0]).impl == "kernels"
    assert_plan_covers(model, torch.randint(3, 256, (2, 32)), 4)


@pytest.mark.parametrize("kernels", [False, True], ids=["hf", "kernels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_plan_bytes_cover_gemma2_eager_attention_whose_scores_grow_with_the_sequence(kernels, dtype):
    """Gemma-2 runs eager attention (soft-capped scores): a layer saves [heads x seq] scores per token, and four
    norms. A plan blind to that kept every layer of Gemma-2-9B at 2048x4 on a 140 GB GPU and ran out of memory."""
    from transformers import AutoModelForCausalLM

    from slothbook.models.families.tiny import tiny_config
    from slothbook.models.patch import patch_model

    config = tiny_config("gemma2", vocab_size=256, sliding_window=4096)  # no window: every key is seen
    torch.manual_seed(0)
    model = FastLanguageModel.get_peft_model(AutoModelForCausalLM.from_config(config, dtype=dtype), r=8,
                                             use_gradient_checkpointing=False)
    if kernels:
        patch_model(model)
    model.train()
    recipe = recipe_of(model.config, find_decoder_layers(model)[0])
    assert recipe.shape.eager and recipe.shape.softcap and recipe.shape.norms == 4
    a = dtype.itemsize
    # 256 tokens in both: what does not grow with the tokens weighs the same per token, and the difference is the
    # scores alone.
    (short, planned_short), (long, planned_long) = (assert_plan_covers(model, torch.randint(3, 256, shape), a)
                                                    for shape in ((8, 32), (2, 128)))
    # 96 more keys per query: softmax's fp32 output, its bf16 cast when not fp32, the soft-cap's tanh output.
    assert long - short == pytest.approx(config.num_attention_heads * 96 * 8, rel=0.02)
    assert planned_long - planned_short == config.num_attention_heads * 96 * 8


def test_a_kept_layer_never_tiles_its_mlp():
    """Above the tiling threshold the checkpointed layer's MLP runs in chunks, the kept one's in one piece."""
    from slothbook.train.tiled_mlp import TILED_MLP_ABOVE, TILED_MLP_CHUNK

    model = tiny_llama(kernels=False, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=64)
    ids = torch.randint(3, 64, (5, 3277))  # 16385 tokens: one above the threshold (5 rows: less attention work)
    assert ids.numel() == TILED_MLP_ABOVE + 1
    set_gradient_checkpointing(model, "auto", memory_budget=layer_bytes(model, ids))  # keeps the last layer
    rows = [[], []]
    layers = find_decoder_layers(model)
    for i, layer in enumerate(layers):
        layer.mlp.down_proj.register_forward_hook(
            lambda m, args, out, i=i: rows[i].append(args[0].shape[:-1].numel()))
    lora_grads(model, ids)
    assert keep_plan(model).kept == 1
    # The checkpointed layer: 4 chunks and 1 token, in its forward, in its recompute and in the tiled backward.
    assert rows[0] == ([TILED_MLP_CHUNK] * 4 + [1]) * 3
    assert rows[1] == [TILED_MLP_ABOVE + 1]  # the kept layer's MLP ran once, untiled


# ------------------------------------------------------------------ on a GPU

@pytest.mark.gpu
def test_cuda_auto_keeps_every_layer_when_it_fits_and_offloads_under_a_small_budget(train_model_name):
    model, tok = FastLanguageModel.from_pretrained(train_model_name, max_seq_length=1024, dtype=torch.bfloat16)
    model = FastLanguageModel.get_peft_model(model, r=16, init_lora_weights=False)  # "auto"; B non-zero
    assert keep_plan(model) is not None
    ids = torch.randint(3, len(tok), (2, 512), generator=torch.Generator().manual_seed(0)).cuda()

    def step():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loss, grads = lora_grads(model, ids)
        torch.cuda.synchronize()
        return loss, grads, torch.cuda.max_memory_allocated()

    with torch.autocast("cuda", dtype=torch.bfloat16):
        step()  # warm-up: cuBLAS workspaces, kernels compiled
        kept_loss, kept_grads, kept_peak = step()
        n_layers = len(find_decoder_layers(model))
        assert keep_plan(model).kept == n_layers  # a 135M model at 1K tokens: everything fits

        set_gradient_checkpointing(model, True)
        plain_loss, plain_grads, _ = step()

        per_layer = ids.numel() * recipe_of(model.config, find_decoder_layers(model)[0]).kept_bytes(2, ids.shape[1])
        set_gradient_checkpointing(model, "auto", memory_budget=2 * per_layer)
        step()
        small_loss, small_grads, small_peak = step()
        assert keep_plan(model).kept == 2
    torch.testing.assert_close(kept_loss, plain_loss, rtol=1e-2, atol=0)
    torch.testing.assert_close(small_loss, plain_loss, rtol=1e-2, atol=0)
    for name in plain_grads:
        for got in (kept_grads[name], small_grads[name]):
            scale = plain_grads[name].float().abs().max().item()
            assert (got.float() - plain_grads[name].float()).abs().max().item() <= 2e-2 * scale + 1e-6, name
    # 28 of 30 layers offloaded: most of the kept run's activations are gone.
    assert small_peak < kept_peak - (n_layers - 4) * per_layer // 2, (small_peak, kept_peak, per_layer)


# In a process of its own: earlier tests leave the caching allocator's reserve fragmented, and a fragmented reserve
# counts as room without granting one block of that size.
FRACTION_CHECK = """
import torch
from slothbook.train.keep import free_device_bytes

device = torch.device("cuda", torch.cuda.current_device())
total = torch.cuda.mem_get_info(device)[1]  # the allocator's fraction is of this (the properties' is less)
held = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)  # something allocated, to be subtracted
uncapped = free_device_bytes(device)
torch.cuda.set_per_process_memory_fraction(0.25, device)
capped = free_device_bytes(device)
room = int(0.25 * total) - torch.cuda.memory_allocated(device)
assert capped < uncapped, (capped, uncapped)
assert abs(capped - room) <= 64 * 2**20, (capped, room)  # the allocator's unused reserve counts as room
# what it reports is what the allocator grants: a tensor of that size less a margin fits
block = torch.empty(capped - 128 * 2**20, dtype=torch.uint8, device=device)
print("ok")
"""


@pytest.mark.gpu
def test_cuda_free_bytes_respect_the_process_memory_fraction():
    done = subprocess.run([sys.executable, "-c", FRACTION_CHECK], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
