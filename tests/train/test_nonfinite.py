"""NaN/inf steps: the update is skipped in the step it appears, training goes on, and a run of them stops training
with a TrainingError naming the steps and the cause, the last good adapter saved."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainerControl, TrainerState

from slothbook.errors import TrainingError
from slothbook.train.guard import NonFiniteGuard
from slothbook.train.job import FinetuneConfig, run_finetune


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/train/conftest.py


def tiny(output, **kw) -> FinetuneConfig:
    values = dict(load_in_4bit=False, gradient_checkpointing=False, max_seq_length=64, batch_size=2, lr=5e-4,
                  logging_steps=1, output=str(output))
    return FinetuneConfig(**{**values, **kw})


class PoisonSteps(TrainerCallback):
    """Makes the hidden states NaN in the chosen steps (a forward hook on the final norm; the loss may not call the LM
    head module) and keeps the adapter after each step."""

    def __init__(self, steps):
        self.steps, self.step, self.adapters = set(steps), 0, {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.get_base_model().model.norm.register_forward_hook(
            lambda mod, inp, out: out * float("nan") if self.step in self.steps else None)

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step + 1

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.adapters[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()
                                            if p.requires_grad}


def guard_of(trainer) -> NonFiniteGuard:
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, NonFiniteGuard))


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_one_nan_step_is_skipped_and_training_goes_on(tmp_path):
    poison = PoisonSteps({3})
    result = run_finetune(tiny(tmp_path, steps=5, max_bad_steps=2), callbacks=[poison])
    assert result.trainer.state.global_step == 5 and guard_of(result.trainer).skipped == [3]
    assert same(poison.adapters[3], poison.adapters[2])  # the bad step changed nothing
    assert not same(poison.adapters[4], poison.adapters[3])  # the next good step trained
    assert torch.isnan(torch.tensor(result.losses[2])) and torch.isfinite(torch.tensor(result.losses[3:])).all()
    opt = result.trainer.optimizer.optimizer
    assert opt.defaults["fused"]  # the skip happened inside the fused kernel, without a host sync
    assert all(int(s["step"]) == 4 for s in opt.state.values())  # Adam's step count skipped it too


def test_max_bad_steps_in_a_row_stop_with_the_steps_and_cause_keeping_the_last_good_adapter(tmp_path):
    poison = PoisonSteps(range(3, 100))
    with pytest.raises(TrainingError) as info:
        run_finetune(tiny(tmp_path, steps=12, max_bad_steps=3), callbacks=[poison])
    message = str(info.value)
    assert "steps 3-5" in message and "learning rate" in message and str(tmp_path / "adapter") in message
    assert max(poison.adapters) <= 6  # stopped within check_every (= max_bad_steps) steps of the third bad one
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    good = {name.replace(".default", ""): value for name, value in poison.adapters[2].items()}
    assert saved.keys() == good.keys() and same(saved, good)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_guard_skips_the_update_of_a_real_optimizer(fused):
    """The callback's two hooks around a torch AdamW step, as Trainer calls them, for both kinds of optimizer."""
    layer = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=fused, foreach=False if fused else None)
    guard = NonFiniteGuard(max_bad_steps=2)
    state, control = TrainerState(max_steps=10), TrainerControl()

    class Args:
        fp16, learning_rate = False, 0.1

    def step(bad: bool):
        layer.zero_grad()
        layer(torch.ones(1, 4)).sum().backward()
        if bad:
            layer.weight.grad[0, 0] = float("inf")
        guard.on_pre_optimizer_step(Args, state, control, model=layer, optimizer=opt)
        opt.step()
        guard.on_optimizer_step(Args, state, control, optimizer=opt)
        state.global_step += 1
        guard.on_step_end(Args, state, control)

    step(False)
    before = layer.weight.detach().clone()
    step(True)
    assert torch.equal(layer.weight, before) and int(opt.state[layer.weight]["step"]) == 1
    step(False)
    assert not torch.equal(layer.weight, before) and guard.error is None
    step(True)
    step(True)
    guard.on_train_end(Args, state, control)
    assert guard.skipped == [2, 4, 5] and "steps 4-5" in str(guard.error) and control.should_training_stop


@pytest.mark.gpu
def test_fp16_training_keeps_loss_scaling_and_its_overflow_message(tmp_path, train_model_name):
    poison = PoisonSteps(range(2, 100))
    with pytest.raises(TrainingError, match="fp16 overflow"):
        run_finetune(tiny(tmp_path, model=train_model_name, dtype="fp16", steps=8, max_bad_steps=2),
                     callbacks=[poison])
    result = run_finetune(tiny(tmp_path / "ok", model=train_model_name, dtype="fp16", steps=2))
    assert result.trainer.accelerator.scaler is not None and result.trainer.args.fp16
