"""MemoryProfiler around a hand-written loop on the real model: exact categories, phases, growth, outputs."""

from __future__ import annotations

import pytest
import torch

from slothbook.errors import ExportError
from slothbook.profiler import MemoryProfiler
from slothbook.profiler.samples import DEVICE_CATEGORIES

SEQ = 32  # as in conftest.run_steps


def _storage_bytes(tensors) -> int:
    """Bytes of distinct storages, written independently of the profiler's own counting."""
    seen, total = set(), 0
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def expected_weights(model) -> int:
    tensors = []
    for p in model.parameters():
        if p.requires_grad:
            continue
        tensors.append(p)
        state = getattr(p, "quant_state", None)
        while state is not None:
            tensors += [t for t in (state.absmax, state.code, state.offset) if t is not None]
            state = state.state2
    return _storage_bytes(tensors + list(model.buffers()))


@pytest.mark.parametrize("which", ["model16", "model4"])
def test_named_categories_match_the_tensors_exactly(which, request, adamw, run_steps):
    model = request.getfixturevalue(which)
    opt = adamw(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    with MemoryProfiler(model, opt) as prof:
        run_steps(model, opt, steps=2, profiler=prof)
    assert [s.phase for s in prof.samples if s.step == 2] == ["forward", "backward", "optimizer", "peak"]

    lora = sum(p.numel() * p.element_size() for p in trainable)
    grads = lora  # fp32 gradient per fp32 adapter weight
    optimizer = _storage_bytes(t for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
    naive = sum(p.numel() * p.element_size() for _, p in model.named_parameters(remove_duplicate=False)
                if not p.requires_grad)
    by_phase = {s.phase: s for s in prof.samples if s.step == 2}
    for s in prof.samples:
        assert (s.weights, s.lora) == (expected_weights(model), lora)
    assert expected_weights(model) < naive  # the tied embedding is counted once
    assert by_phase["forward"].gradients == 0  # zero_grad(set_to_none) freed them
    assert by_phase["backward"].gradients == grads
    assert by_phase["optimizer"].optimizer == optimizer > 0
    assert prof.samples[0].optimizer == 0  # step 1's forward comes before AdamW's state exists


def test_categories_add_up_to_the_tracked_total(model16, adamw, run_steps):
    opt = adamw(model16)
    with MemoryProfiler(model16, opt) as prof:
        run_steps(model16, opt, steps=2, profiler=prof)
    for s in prof.samples:
        parts = [getattr(s, c) for c in DEVICE_CATEGORIES]
        assert all(p >= 0 for p in parts)
        assert sum(parts) == s.held
        assert sum(parts[:-1]) == s.allocated <= s.peak
    # On the CPU the tracked total is the process's resident memory: it contains every named tensor.
    assert all(s.held >= s.weights + s.lora for s in prof.samples)


def test_activations_grow_with_sequence_length(model16, adamw, run_steps):
    opt = adamw(model16)
    held = {}
    for seq in (SEQ, 2 * SEQ, 4 * SEQ):
        with MemoryProfiler(model16, opt) as prof:
            run_steps(model16, opt, seq_len=seq, steps=1, profiler=prof)
        forward = next(s for s in prof.samples if s.phase == "forward")
        held[seq] = forward.activations
        backward = next(s for s in prof.samples if s.phase == "backward")
        assert backward.activations < forward.activations / 10  # the graph is freed by backward
    assert held[SEQ] < held[2 * SEQ] < held[4 * SEQ]
    # Saved activations are linear in the tokens here (SDPA keeps no seq x seq matrix).
    assert held[4 * SEQ] == pytest.approx(4 * held[SEQ], rel=0.05)


def test_exact_mode_sees_backward_working_set(model16, adamw, run_steps):
    import gc

    gc.collect()  # garbage of earlier tests freed mid-measurement would show up in the exact tracker's counts
    opt = adamw(model16)
    with MemoryProfiler(model16, opt, cpu_mode="exact") as exact:
        run_steps(model16, opt, seq_len=4 * SEQ, steps=2, profiler=exact)
    with MemoryProfiler(model16, opt) as saved:
        run_steps(model16, opt, seq_len=4 * SEQ, steps=2, profiler=saved)
    # Both see what forward leaves; only the exact tracker sees backward's transients (the logits' gradients),
    # which put the step's peak above every phase boundary.
    fwd_exact = next(s for s in exact.samples if s.step == 2 and s.phase == "forward")
    fwd_saved = next(s for s in saved.samples if s.step == 2 and s.phase == "forward")
    assert fwd_exact.activations == pytest.approx(fwd_saved.activations, rel=0.02)
    boundaries = [s.allocated for s in exact.samples if s.step == 2 and s.phase != "peak"]
    assert exact.steps[-1].peak > max(boundaries) + fwd_exact.activations / 10


def test_steps_carry_tokens_time_and_loss(model16, adamw, run_steps):
    opt = adamw(model16)
    with MemoryProfiler(model16, opt) as prof:
        run_steps(model16, opt, steps=2, batch_size=2, profiler=prof)
    for row in prof.steps:
        assert row.tokens == 2 * SEQ
        assert row.seconds > 0 and row.tokens_per_s > 0
        assert row.loss is not None and row.loss > 0
    df = prof.to_pandas()
    assert list(df.phase) == ["forward", "backward", "optimizer", "peak"] * 2
    assert df.loc[df.phase == "peak", "loss"].notna().all()
    text = prof.summary()
    for label in ("base weights", "LoRA weights", "gradients", "optimizer state", "activations",
                  "offloaded activations (host)", "rest of the process", "peak allocated"):
        assert label in text


def test_explicit_loss_and_no_model_hooks_outside_training(model16, adamw, run_steps):
    opt = adamw(model16)
    with MemoryProfiler(model16, opt) as prof:
        with torch.no_grad():
            model16(input_ids=torch.zeros(1, 8, dtype=torch.long))
        assert prof.samples == []  # evaluation is not a training step
        run_steps(model16, opt, steps=1)
        row = prof.step(loss=1.5)
    assert row.loss == 1.5


def test_hooks_are_removed_on_exit(model16, adamw, run_steps):
    opt = adamw(model16)
    with MemoryProfiler(model16, opt) as prof:
        run_steps(model16, opt, steps=1, profiler=prof)
    run_steps(model16, opt, steps=1)
    assert len(prof.steps) == 1


def test_save_html_and_png(model16, tmp_path, monkeypatch, adamw, run_steps):
    opt = adamw(model16)
    with MemoryProfiler(model16, opt) as prof:
        run_steps(model16, opt, steps=2, profiler=prof)
    prof.save_html(tmp_path / "memory.html")
    html = (tmp_path / "memory.html").read_text()
    assert "base weights" in html and "step peak" in html
    try:
        prof.save_png(tmp_path / "memory.png")
    except ExportError as exc:  # no Chrome on this machine: the error says what to install
        assert "chromium" in str(exc).lower()
    else:
        assert (tmp_path / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chrome"))
    with pytest.raises(ExportError, match="Chrome or Chromium"):
        prof.save_png(tmp_path / "other.png")


@pytest.mark.gpu
@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["lora16", "qlora"])
def test_cuda_categories_from_the_allocator(train_model_name, load_in_4bit):
    from slothbook import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(train_model_name, load_in_4bit=load_in_4bit, max_seq_length=1024)
    model = FastLanguageModel.get_peft_model(model, r=16, use_gradient_checkpointing="slothbook")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    with MemoryProfiler(model, opt) as prof:
        ids = torch.randint(0, model.config.vocab_size, (2, 512), device="cuda")
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            prof.step()
    torch.cuda.synchronize()
    assert prof.meter.kind == "cuda"
    by_phase = {s.phase: s for s in prof.samples if s.step == 3}
    assert by_phase["optimizer"].weights == expected_weights(model)
    assert by_phase["backward"].gradients == sum(p.numel() * p.element_size() for p in model.parameters()
                                                 if p.requires_grad)
    assert by_phase["forward"].activations > by_phase["optimizer"].activations
    for s in prof.samples:
        assert sum(getattr(s, c) for c in DEVICE_CATEGORIES) == s.held  # reserved by the caching allocator
        assert s.allocated <= s.peak <= s.held
    assert prof.steps[-1].peak == pytest.approx(torch.cuda.max_memory_allocated(), rel=0.01)
