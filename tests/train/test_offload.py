"""Offloaded checkpointing on the embedded SmolLM2 (3 of its layers) with LoRA on every linear layer."""

import gc
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from slothbook.device import host_memory_available
from slothbook.errors import TrainingError, UnsupportedArchitectureError
from slothbook.models.embedded import EMBEDDED_ALIAS, embedded_model_dir
from slothbook.train.offload import (PinnedPool, disable_offloaded_checkpointing, enable_offloaded_checkpointing,
                                     find_decoder_layers, offloaded_bytes)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(dtype=torch.float32, four_bit=False, device="cpu", layers=3, dropout=0.0, source=None):
    quant = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
             if four_bit else None)
    model = AutoModelForCausalLM.from_pretrained(source or embedded_model_dir(), dtype=dtype, num_hidden_layers=layers,
                                                 quantization_config=quant, device_map={"": device})
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B starts at zero; make it non-zero so every LoRA matrix gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.train()


def tokens(model, length=16, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=gen).to(model.device)


def lora_grads(model, ids, seed=0):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def plain_checkpoint_grads(model, ids, seed=0):
    """Reference: transformers' own checkpointing (torch.utils.checkpoint, non-reentrant)."""
    base = model.get_base_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_* is renamed activation_* in newer releases
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        try:
            return lora_grads(model, ids, seed)
        finally:
            base.gradient_checkpointing_disable()


def max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def fp32_model():
    return lora_model()


def test_grads_equal_plain_checkpointing_exactly(fp32_model):
    ids = tokens(fp32_model)
    no_checkpoint = lora_grads(fp32_model, ids)
    plain = plain_checkpoint_grads(fp32_model, ids)
    assert len(plain) == 3 * 2 * len(TARGETS)
    assert all(g.abs().sum() > 0 for g in plain.values())
    for offload_on_cpu in (False, True):  # the CPU fallback, then the offload path through the pool
        pool = enable_offloaded_checkpointing(fp32_model, offload_on_cpu=offload_on_cpu)
        try:
            got = lora_grads(fp32_model, ids)
        finally:
            disable_offloaded_checkpointing(fp32_model)
        assert all(torch.equal(got[k], plain[k]) for k in plain), offload_on_cpu
        assert max_diff(got, no_checkpoint) <= 1e-6
        assert pool.stats().allocations == (3 if offload_on_cpu else 0)


def test_lora_dropout_replays_the_same_masks():
    model = lora_model(dropout=0.2, layers=2)
    ids = tokens(model, length=12)
    plain = plain_checkpoint_grads(model, ids, seed=3)
    enable_offloaded_checkpointing(model, offload_on_cpu=True)
    got = lora_grads(model, ids, seed=3)
    assert all(torch.equal(got[k], plain[k]) for k in plain)
    assert max_diff(got, lora_grads(model, ids, seed=4)) > 0  # the dropout did act: other seed, other grads


@pytest.mark.parametrize("dtype, four_bit", [(torch.bfloat16, False), (torch.float32, True)],
                         ids=["bf16", "nf4"])
def test_16bit_and_4bit_bases(dtype, four_bit):
    model = lora_model(dtype=dtype, four_bit=four_bit, layers=2)
    if four_bit:
        import bitsandbytes as bnb
        assert isinstance(model.get_base_model().model.layers[0].mlp.up_proj.base_layer, bnb.nn.Linear4bit)
    ids = tokens(model, length=12)
    plain = plain_checkpoint_grads(model, ids)
    enable_offloaded_checkpointing(model, offload_on_cpu=True)
    got = lora_grads(model, ids)
    assert all(torch.equal(got[k], plain[k]) for k in plain)


def test_hf_checkpointing_switched_on_afterwards_is_replaced(fp32_model):
    ids = tokens(fp32_model)
    plain = plain_checkpoint_grads(fp32_model, ids)
    pool = enable_offloaded_checkpointing(fp32_model, offload_on_cpu=True)
    try:
        base = fp32_model.get_base_model()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            base.gradient_checkpointing_enable()  # what a Trainer with gradient_checkpointing=True does
        got = lora_grads(fp32_model, ids)
        assert not any(layer.gradient_checkpointing for layer in find_decoder_layers(fp32_model))
        assert pool.stats().allocations == 3  # the layers went through our path, not a second checkpoint
        assert all(torch.equal(got[k], plain[k]) for k in plain)
    finally:
        disable_offloaded_checkpointing(fp32_model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            fp32_model.get_base_model().gradient_checkpointing_disable()


def test_eval_and_no_grad_run_layers_untouched(fp32_model):
    ids = tokens(fp32_model)
    fp32_model.eval()
    try:
        with torch.no_grad():
            expected = fp32_model(input_ids=ids).logits
        pool = enable_offloaded_checkpointing(fp32_model, offload_on_cpu=True)
        with torch.no_grad():
            assert torch.equal(fp32_model(input_ids=ids).logits, expected)
        fp32_model.train()
        with torch.no_grad():
            fp32_model(input_ids=ids)
        out = fp32_model.generate(input_ids=ids[:1, :8], max_new_tokens=3, do_sample=False)
        assert out.shape == (1, 11)
        assert pool.stats().allocations == 0
    finally:
        fp32_model.train()
        disable_offloaded_checkpointing(fp32_model)


def test_disable_restores_the_layer_forwards(fp32_model):
    layers = find_decoder_layers(fp32_model)
    enable_offloaded_checkpointing(fp32_model)
    enable_offloaded_checkpointing(fp32_model)  # again: replaces, does not stack
    assert all("forward" in layer.__dict__ for layer in layers)
    disable_offloaded_checkpointing(fp32_model)
    assert not any("forward" in layer.__dict__ for layer in layers)
    assert layers[0].forward.__func__ is type(layers[0]).forward


def test_second_backward_raises_and_dropped_graphs_return_buffers(fp32_model):
    ids = tokens(fp32_model)
    pool = enable_offloaded_checkpointing(fp32_model, offload_on_cpu=True)
    try:
        loss = fp32_model(input_ids=ids, labels=ids).loss
        assert pool.stats().in_use > 0
        loss.backward(retain_graph=True)
        assert pool.stats().in_use == 0
        with pytest.raises(TrainingError, match="differentiated twice"):
            loss.backward()
        loss = fp32_model(input_ids=ids, labels=ids).loss  # a forward whose graph is never differentiated
        del loss
        gc.collect()
        assert pool.stats().in_use == 0
    finally:
        disable_offloaded_checkpointing(fp32_model)


def test_find_decoder_layers(fp32_model):
    layers = find_decoder_layers(fp32_model)
    assert layers is fp32_model.get_base_model().model.layers and len(layers) == 3
    assert find_decoder_layers(fp32_model.get_base_model()) is layers
    with pytest.raises(UnsupportedArchitectureError):
        find_decoder_layers(nn.Linear(2, 2))


# ---------------------------------------------------------------- the pool

def test_pool_grows_once_for_a_longer_sequence_and_reuses_otherwise():
    pool = PinnedPool(pin=False)
    assert pool.stats().capacity == 0 and offloaded_bytes() >= 0

    def step(nbytes, layers=4):
        buffers = [pool.acquire(nbytes) for _ in range(layers)]
        assert all(b.numel() >= nbytes for b in buffers) and len({b.data_ptr() for b in buffers}) == layers
        for b in buffers:
            pool.release(b)
        return pool.stats()

    first = step(3000)
    assert (first.allocations, first.capacity, first.buffers, first.in_use) == (4, 4 * 4096, 4, 0)
    assert step(3000) == first and step(4096) == first and step(100) == first  # same size class or smaller
    longer = step(5000)
    assert (longer.allocations, longer.capacity, longer.buffers) == (8, 4 * 8192, 4)  # replaced, not added
    assert step(5000) == longer and step(3000) == longer
    before = offloaded_bytes()
    extra = PinnedPool(pin=False)
    extra.release(extra.acquire(1 << 20))
    assert offloaded_bytes() == before + (1 << 20)


def test_pool_refuses_a_layer_input_the_host_cannot_hold_and_stays_usable():
    # Past the memory left, the kernel would kill the process (a notebook's kernel with it) as the pages fill.
    pool = PinnedPool(pin=False)
    kept = pool.acquire(100 << 20)  # above the exact-size threshold, so checked too, and it fits
    with pytest.raises(TrainingError, match=r"needs \S+ GiB more host memory .* only \S+ GiB is available "
                                            r"\(the offload pool already holds 0\.10 GiB.*use_gradient_checkpointing"):
        pool.acquire(2 * host_memory_available())
    assert pool.stats().buffers == 1
    pool.release(kept)
    assert pool.acquire(50 << 20).data_ptr() == kept.data_ptr()


def test_pool_in_use_accounting():
    pool = PinnedPool(pin=False)
    a, b = pool.acquire(1000), pool.acquire(3000)
    assert pool.stats().in_use == 1024 + 4096 == pool.capacity
    pool.release(a)
    assert pool.stats().in_use == 4096
    assert pool.acquire(500).data_ptr() == a.data_ptr()  # the smallest free buffer that fits
    pool.release(b)


def test_ten_steps_leave_memory_flat(fp32_model):
    ids = tokens(fp32_model, length=8, batch=1)
    pool = enable_offloaded_checkpointing(fp32_model, offload_on_cpu=True)
    optimizer = torch.optim.SGD([p for p in fp32_model.parameters() if p.requires_grad], lr=1e-3)

    def train_step():
        fp32_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def live_tensors():
        gc.collect()
        with warnings.catch_warnings():  # isinstance() touches deprecated module attributes
            warnings.simplefilter("ignore")
            found = [t for t in gc.get_objects() if isinstance(t, torch.Tensor)]
        return len(found), sum(t.numel() * t.element_size() for t in found if not t.is_meta)

    try:
        train_step()
        stats, live = pool.stats(), live_tensors()
        assert live[0] > 0
        for _ in range(10):
            train_step()
        assert pool.stats() == stats
        assert live_tensors() == live
    finally:
        disable_offloaded_checkpointing(fp32_model)


# ---------------------------------------------------------------- CUDA (skipped without it by tests/conftest.py)

@pytest.fixture(scope="module")
def gpu_source(train_model_name):
    """The embedded model's folder; on a GPU machine without it, the random model of the same shape."""
    return str(embedded_model_dir()) if train_model_name == EMBEDDED_ALIAS else train_model_name


class _Stack(nn.Module):
    """Decoder-shaped toy: model.layers, each taking the hidden state and keyword arguments."""

    class Block(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.fc = nn.Linear(width, width)

        def forward(self, hidden_states, scale=None, **kwargs):
            return hidden_states + torch.tanh(self.fc(hidden_states)) * scale

    def __init__(self, width=64, depth=4):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(self.Block(width) for _ in range(depth))

    def forward(self, x, scale):
        for layer in self.model.layers:
            x = layer(x, scale=scale)
        return x


@pytest.mark.gpu
def test_cuda_step_never_synchronises_and_matches_no_checkpointing():
    torch.manual_seed(0)
    model = _Stack().cuda()
    x, scale = torch.randn(2, 256, 64, device="cuda"), torch.tensor(0.5, device="cuda")

    def grads():
        model.zero_grad(set_to_none=True)
        model(x, scale).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    expected = grads()
    pool = enable_offloaded_checkpointing(model)
    grads()  # first step allocates the pinned buffers
    torch.cuda.set_sync_debug_mode("error")  # any host-device synchronisation now raises
    try:
        model.zero_grad(set_to_none=True)
        model(x, scale).square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    got = {n: p.grad for n, p in model.named_parameters()}
    assert all(torch.allclose(got[k], expected[k], rtol=1e-5, atol=1e-7) for k in expected)
    assert pool.pin and pool.stats().allocations == 4


@pytest.mark.gpu
@pytest.mark.parametrize("four_bit", [False, True], ids=["bf16", "nf4"])
def test_cuda_offload_matches_plain_checkpointing(four_bit, gpu_source):
    model = lora_model(dtype=torch.bfloat16, four_bit=four_bit, device="cuda", source=gpu_source)
    ids = tokens(model, length=256)
    plain = plain_checkpoint_grads(model, ids)
    pool = enable_offloaded_checkpointing(model)
    got = lora_grads(model, ids)
    assert pool.pin and pool.stats().allocations == 3
    for k in plain:  # bf16: equal up to rounding
        scale = plain[k].float().abs().max().item()
        assert (got[k].float() - plain[k].float()).abs().max().item() <= 2e-2 * scale + 1e-6, k


@pytest.mark.gpu
def test_cuda_memory_flat_over_ten_steps_and_grows_once_for_longer_sequences(gpu_source):
    model = lora_model(dtype=torch.bfloat16, device="cuda", source=gpu_source)
    pool = enable_offloaded_checkpointing(model)

    def step(length):
        lora_grads(model, tokens(model, length=length))
        model.zero_grad(set_to_none=True)
        torch.cuda.current_stream().synchronize()  # the test reads counters; training never does this
        return torch.cuda.memory_allocated(), offloaded_bytes(), pool.stats()

    first = step(512)
    for _ in range(10):
        assert step(512) == first
    assert step(256) == first  # shorter: reuses
    longer = step(2048)
    assert longer[2].allocations == first[2].allocations + 3  # one new buffer per layer, once
    assert longer[2].capacity == 4 * first[2].capacity and longer[2].buffers == 3
    assert step(2048)[1:] == longer[1:] and step(1024)[2] == longer[2]


def test_large_buffers_are_sized_in_small_steps_not_powers_of_two():
    from slothbook.train.offload import _EXACT_FROM, _size_class

    assert _size_class(3000) == 4096 and _size_class(_EXACT_FROM) == _EXACT_FROM
    sizes = [_EXACT_FROM + 1, 3 * 10**8, 2_885_681_152, 2**32 + 5]  # the last but one: 352K tokens x 4096 x bf16
    for n in sizes:
        got = _size_class(n)
        assert n <= got <= n * 1.0625, (n, got)
    assert _size_class(2_885_681_152) < 2**32 * 0.75  # a power of two would have reserved 4 GiB
    assert [_size_class(n) for n in sorted(sizes)] == sorted(_size_class(n) for n in sizes)


@pytest.mark.gpu
def test_a_large_buffer_is_page_locked_in_place_and_copies_asynchronously():
    pool = PinnedPool()
    nbytes = (64 << 20) + 12345
    buffer = pool.acquire(nbytes)
    assert buffer.numel() < 2 * nbytes and buffer.is_pinned()
    src = torch.arange(nbytes, dtype=torch.uint8, device="cuda")
    buffer[:nbytes].copy_(src, non_blocking=True)
    back = buffer[:nbytes].to("cuda", non_blocking=True)
    assert torch.equal(back, src)
    pool.release(buffer)
    del buffer
    pool.release(pool.acquire(4 * nbytes))  # grows: the old registered buffer is dropped and unregistered
    assert pool.stats().buffers == 1
