"""Out-of-memory errors become TrainingOutOfMemoryError naming the step, the phase, the largest category and a fit."""

from __future__ import annotations

import pytest
import torch

from slothbook.errors import TrainingError
from slothbook.profiler import MemoryProfiler, TrainingOutOfMemoryError, translate_oom

CUDA_MESSAGE = "CUDA out of memory. Tried to allocate 2.00 GiB."


def _fail_in_backward(loss):
    """Raise the allocator's error from inside backward, as a failed allocation there would."""
    def hook(grad):
        raise torch.OutOfMemoryError(CUDA_MESSAGE)

    loss.register_hook(hook)


def test_oom_in_backward_names_step_phase_category_and_fit(model16, adamw, run_steps):
    opt = adamw(model16)
    with pytest.raises(TrainingOutOfMemoryError) as info:
        with MemoryProfiler(model16, opt) as prof:
            run_steps(model16, opt, seq_len=64, steps=1, profiler=prof)
            ids = torch.randint(0, model16.config.vocab_size, (2, 64))
            loss = model16(input_ids=ids, labels=ids).loss
            _fail_in_backward(loss)
            loss.backward()
    err = info.value
    assert isinstance(err, TrainingError) and isinstance(err, torch.OutOfMemoryError)
    assert (err.step, err.phase, err.largest) == (2, "backward", "weights")
    message = str(err)
    assert "at step 2, during backward" in message
    assert "Largest category: base weights" in message
    assert err.fit is not None and err.fit.at_seq_len == 64 and err.fit.at_batch_size == 2
    assert f"seq_len {err.fit.seq_len} at batch_size 2" in message
    assert CUDA_MESSAGE in message
    assert "max_seq_length" in message and "use_gradient_checkpointing='slothbook'" in message


def test_guard_translates_and_other_errors_pass_through(model16, adamw):
    prof = MemoryProfiler(model16, adamw(model16))
    try:
        with pytest.raises(TrainingOutOfMemoryError, match="during forward"):
            with prof.oom_guard():
                ids = torch.zeros(1, 16, dtype=torch.long)
                handle = model16.get_input_embeddings().register_forward_hook(_raise_oom)
                try:
                    model16(input_ids=ids, labels=ids)
                finally:
                    handle.remove()
        with pytest.raises(ValueError):
            with prof.oom_guard():
                raise ValueError("not memory")
    finally:
        prof.detach()


def _raise_oom(*_):
    raise torch.OutOfMemoryError(CUDA_MESSAGE)


def test_translate_without_profiler_still_explains():
    err = translate_oom(torch.OutOfMemoryError(CUDA_MESSAGE))
    assert isinstance(err, TrainingOutOfMemoryError)
    assert "Out of" in str(err) and CUDA_MESSAGE in str(err)
    assert err.step is None and err.fit is None


@pytest.mark.gpu
def test_real_cuda_oom_in_backward_is_translated(train_model_name):
    from slothbook import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(train_model_name, max_seq_length=256)
    model = FastLanguageModel.get_peft_model(model, r=16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    too_much = 2 * torch.cuda.get_device_properties(0).total_memory
    with pytest.raises(TrainingOutOfMemoryError) as info:
        with MemoryProfiler(model, opt):
            ids = torch.randint(0, model.config.vocab_size, (1, 128), device="cuda")
            loss = model(input_ids=ids, labels=ids).loss
            loss.register_hook(lambda g: torch.empty(too_much, dtype=torch.uint8, device="cuda"))
            loss.backward()
    message = str(info.value)
    assert "Out of GPU memory at step 1, during backward" in message
    assert info.value.fit is not None and info.value.fit.seq_len >= 128
