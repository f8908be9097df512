"""The profiler as a TrainerCallback inside TRL's SFTTrainer: one row per step, phases from its hooks."""

from __future__ import annotations

import pytest
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from slothbook.profiler import MemoryProfiler

TEXTS = [f"Question {i}: what is {i} + {i}? Answer: {2 * i}." for i in range(16)]


@pytest.fixture(scope="module")
def trained(train_model_name, lora_model_loader):
    """A model of its own: Trainer switches its checkpointing and TRL patches its head."""
    from slothbook import FastLanguageModel

    _, tokenizer = FastLanguageModel.from_pretrained(train_model_name, max_seq_length=64, device_map={"": "cpu"},
                                                     kernels=False)
    return lora_model_loader(train_model_name, load_in_4bit=False), tokenizer


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_sft_trainer_steps_are_profiled(trained, tmp_path, grad_accum):
    model16, tokenizer = trained
    args = SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                     gradient_accumulation_steps=grad_accum, max_length=32, learning_rate=1e-5, logging_steps=1,
                     save_strategy="no", report_to="none", use_cpu=True, dataloader_num_workers=0,
                     dataset_num_proc=1, disable_tqdm=True, bf16=False)
    prof = MemoryProfiler()
    trainer = SFTTrainer(model=model16, args=args, train_dataset=Dataset.from_dict({"text": TEXTS}),
                         processing_class=tokenizer, callbacks=[prof.callback()])
    with prof.oom_guard():
        trainer.train()

    assert [row.step for row in prof.steps] == [1, 2, 3]
    for step in (2, 3):
        phases = [s.phase for s in prof.samples if s.step == step]
        assert phases == ["forward", "backward", "optimizer", "peak"]
    trainable = [p for p in model16.parameters() if p.requires_grad]
    optimizer_state = trainer.optimizer.state
    for row in prof.steps:
        assert row.lora == sum(p.numel() * p.element_size() for p in trainable)
        assert row.tokens > 0 and 2 * grad_accum * 8 <= row.tokens <= 2 * grad_accum * 32
        assert row.loss is not None
    assert prof.steps[-1].optimizer == sum(t.numel() * t.element_size() for st in optimizer_state.values()
                                           for t in st.values() if hasattr(t, "numel"))
    assert "3 steps" in prof.summary()
    assert not model16._forward_hooks and not model16._forward_pre_hooks  # detached at train end
