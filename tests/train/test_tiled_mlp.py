"""Tiled MLP on the embedded SmolLM2 (2 of its layers) with LoRA on every linear layer."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from slothbook.errors import ConfigError
from slothbook.models.embedded import embedded_model_dir
from slothbook.train.offload import disable_offloaded_checkpointing, enable_offloaded_checkpointing, find_decoder_layers
from slothbook.train.tiled_mlp import disable_tiled_mlp, enable_tiled_mlp
from lora_steps import lora_grads

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def model():
    base = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.float32, num_hidden_layers=2)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B starts at zero; make it non-zero so every LoRA matrix gets a gradient
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return peft_model.train()


@pytest.fixture
def ids(model):
    return torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))


def close(got, expected):
    """Equal up to float summation order: within 1e-5 of the largest magnitude."""
    scale = expected.abs().max().item()
    return scale > 0 and (got - expected).abs().max().item() <= 1e-5 * scale


def assert_close(got, expected):
    for k in expected:
        assert close(got[k], expected[k]), k


def test_gradients_equal_untiled(model, ids):
    loss, expected = lora_grads(model, ids)
    assert enable_tiled_mlp(model, chunk_tokens=20) == 2  # 48 tokens: chunks of 20, 20 and 8
    try:
        tiled_loss, got = lora_grads(model, ids)
    finally:
        disable_tiled_mlp(model)
    assert torch.allclose(tiled_loss, loss, rtol=1e-6)
    assert_close(got, expected)


def test_backward_recomputes_one_chunk_at_a_time(model, ids):
    mlp = find_decoder_layers(model)[0].mlp
    seen = []
    hook = mlp.down_proj.register_forward_hook(lambda m, args, out: seen.append((torch.is_grad_enabled(),
                                                                                  args[0].shape)))
    enable_tiled_mlp(model, chunk_tokens=16)
    try:
        lora_grads(model, ids)
    finally:
        disable_tiled_mlp(model)
        hook.remove()
    # forward: 3 chunks without grad; backward: the same 3 chunks recomputed with grad
    assert [(grad, shape[0]) for grad, shape in seen] == [(False, 16)] * 3 + [(True, 16)] * 3
    assert all(shape[-1] == model.config.intermediate_size for _, shape in seen)


def test_input_gradient_and_no_grad_output_match_the_plain_mlp(model):
    mlp = find_decoder_layers(model)[1].mlp
    x = torch.randn(3, 10, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    grad_out = torch.randn_like(x)
    x1 = x.clone().requires_grad_()
    mlp(x1).backward(grad_out)
    with torch.no_grad():
        expected = mlp(x)
    enable_tiled_mlp(model, chunk_tokens=7)
    try:
        x2 = x.clone().requires_grad_()
        mlp(x2).backward(grad_out)
        with torch.no_grad():
            assert close(mlp(x), expected)
    finally:
        disable_tiled_mlp(model)
    assert close(x2.grad, x1.grad)


def test_short_inputs_run_untouched(model, ids):
    mlp = find_decoder_layers(model)[0].mlp
    x = torch.randn(2, 24, model.config.hidden_size, requires_grad=True)
    enable_tiled_mlp(model, chunk_tokens=48)
    try:
        y = mlp(x)
    finally:
        disable_tiled_mlp(model)
    assert "TiledMLP" not in type(y.grad_fn).__name__
    assert torch.equal(y, mlp(x))


def test_with_offloaded_checkpointing(model, ids):
    _, expected = lora_grads(model, ids)
    enable_offloaded_checkpointing(model, offload_on_cpu=True)
    enable_tiled_mlp(model, chunk_tokens=20)
    try:
        _, got = lora_grads(model, ids)
    finally:
        disable_tiled_mlp(model)
        disable_offloaded_checkpointing(model)
    assert_close(got, expected)


def test_disable_restores_and_rejects_bad_chunks(model):
    mlps = [layer.mlp for layer in find_decoder_layers(model)]
    enable_tiled_mlp(model, chunk_tokens=8)
    enable_tiled_mlp(model, chunk_tokens=16)  # again: replaces, does not stack
    disable_tiled_mlp(model)
    assert not any("forward" in mlp.__dict__ for mlp in mlps)
    with pytest.raises(ConfigError):
        enable_tiled_mlp(model, chunk_tokens=0)


def test_above_leaves_inputs_up_to_that_many_tokens_untouched(model, ids):
    mlp = find_decoder_layers(model)[0].mlp
    enable_tiled_mlp(model, chunk_tokens=8, above=ids.numel())
    try:
        x = torch.randn(2, 24, model.config.hidden_size, requires_grad=True)
        assert "TiledMLP" not in type(mlp(x).grad_fn).__name__  # 48 tokens: not above 48
        longer = torch.randn(2, 25, model.config.hidden_size, requires_grad=True)
        assert "TiledMLP" in type(mlp(longer).grad_fn).__name__
    finally:
        disable_tiled_mlp(model)
    with pytest.raises(ConfigError):
        enable_tiled_mlp(model, chunk_tokens=8, above=-1)


def test_offloaded_checkpointing_tiles_only_above_16k_tokens(model):
    """2048 x 4 tokens run the MLP whole (tiling would compute it a third time for memory that is not short)."""
    from slothbook.train.checkpointing import set_gradient_checkpointing
    from slothbook.train.tiled_mlp import TILED_MLP_ABOVE, TILED_MLP_CHUNK

    mlp = find_decoder_layers(model)[0].mlp
    rows = []
    hook = mlp.down_proj.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:-1].numel()))
    set_gradient_checkpointing(model, "slothbook")
    try:
        with torch.no_grad():  # the tiled path chunks a no-grad call the same way, without the backward's cost
            mlp(torch.randn(4, 2048, model.config.hidden_size))
            mlp(torch.randn(1, TILED_MLP_ABOVE + 1, model.config.hidden_size))
    finally:
        set_gradient_checkpointing(model, False)
        hook.remove()
    assert TILED_MLP_ABOVE == 16384 and rows == [8192] + [TILED_MLP_CHUNK] * 4 + [1]
