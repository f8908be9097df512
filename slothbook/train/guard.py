"""Skipping optimizer steps whose loss or gradients are NaN or infinite, and stopping when they keep coming.

The check stays on the device: before each optimizer step a fused norm over the trainable gradients gives a 0/1
flag (a NaN or infinite loss makes every gradient NaN, so the gradients cover the loss too), and the flag goes to
the optimizer as `found_inf`, the tensor torch's GradScaler uses: a fused Adam/AdamW/SGD then skips the update (and
its step count) inside its kernel. The flags are read on the host only every few steps, so there is no host sync
per step. Optimizers without `found_inf` support get the flag checked on the host before their step (one sync each).

After `max_bad_steps` flagged steps in a row training stops; `error` then holds a TrainingError naming the steps
and the likely cause. The adapter still holds the last good step's weights, as no flagged step changed it.
"""

from __future__ import annotations

import functools

import torch
from transformers import TrainerCallback

from ..errors import TrainingError


def nonfinite_flag(params) -> torch.Tensor | None:
    """A float 0-d tensor on the gradients' device: 1.0 when any gradient holds a NaN or inf, else 0.0."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    norms = torch._foreach_norm(grads)
    device = grads[0].device
    return (~torch.isfinite(torch.stack([n.float().to(device) for n in norms]).sum())).float()


def _inner(optimizer):
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


class NonFiniteGuard(TrainerCallback):
    def __init__(self, max_bad_steps: int = 5, check_every: int | None = None):
        self.max_bad_steps = max(1, int(max_bad_steps))
        self.check_every = check_every or self.max_bad_steps
        self.skipped: list[int] = []  # every step whose update was skipped
        self.error: TrainingError | None = None
        self._pending: list[tuple[int, torch.Tensor]] = []  # (step, flag) not yet read on the host
        self._run: list[int] = []  # the current run of consecutive bad steps
        self._flag: torch.Tensor | None = None
        self._wrapped = None

    # ---- trainer events -----------------------------------------------------------------------------------

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._flag = nonfinite_flag(p for p in model.parameters() if p.requires_grad)
        if self._flag is None:
            return
        opt = _inner(optimizer)
        if getattr(opt, "_step_supports_amp_scaling", False):  # torch's fused Adam, AdamW, SGD
            # Under fp16, GradScaler replaces this with its own found_inf (which also counts NaN/inf gradients).
            opt.found_inf = self._flag
        else:
            self._guard_unfused(opt)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        opt = _inner(optimizer)
        if getattr(opt, "found_inf", None) is self._flag:
            del opt.found_inf
        if self._flag is not None:
            self._pending.append((state.global_step + 1, self._flag))  # global_step is incremented after this event
        self._flag = None

    def on_step_end(self, args, state, control, **kwargs):
        if len(self._pending) >= self.check_every or control.should_log or state.global_step >= state.max_steps:
            self._check(args, state, control)

    def on_train_end(self, args, state, control, **kwargs):
        self._check(args, state, control)

    # ---- host side ----------------------------------------------------------------------------------------

    def _check(self, args, state, control) -> None:
        if not self._pending or self.error is not None:
            return
        steps = [step for step, _ in self._pending]
        flags = torch.stack([f.to("cpu", non_blocking=False) for _, f in self._pending]).tolist()  # the one sync
        self._pending.clear()
        for step, bad in zip(steps, flags):
            if not bad:
                self._run.clear()
                continue
            self.skipped.append(step)
            self._run.append(step)
            print(f"step {step}: the loss or gradients are NaN/inf; this update was skipped", flush=True)
            if len(self._run) >= self.max_bad_steps:
                self.error = TrainingError(self._message(args, state))
                control.should_training_stop = True
                return

    def _message(self, args, state) -> str:
        first, last = self._run[0], self._run[-1]
        if args.fp16:
            cause = ("fp16 overflow: the values outgrew float16 even with loss scaling. Train in bf16 if the GPU "
                     "supports it (dtype='bf16'), or fp32, or lower the learning rate")
        else:
            cause = (f"a learning rate too high for this model and data ({args.learning_rate:g}): lower it "
                     "(e.g. 10x), add warmup steps, or check the data for empty or extreme samples")
        return (f"Training stopped at step {state.global_step}: the loss or gradients were NaN/inf in {len(self._run)} "
                f"steps in a row (steps {first}-{last}); those updates were skipped. Likely cause: {cause}.")

    def _guard_unfused(self, opt) -> None:
        """Wrap the optimizer's step once so it is skipped when the current flag is set (a host read per step)."""
        if self._wrapped is opt:
            return
        step = opt.step

        @functools.wraps(step)
        def guarded_step(*args, **kwargs):
            if self._flag is not None and self._flag.item():
                return None
            return step(*args, **kwargs)

        opt.step = guarded_step
        self._wrapped = opt


class NonFiniteLossLog:
    """Trainer mixin: a NaN/inf loss shows in the log of its own logging window, not in every later one.

    With Trainer's per-step NaN filter off (it reads the loss on the host each step), its running loss is reset by
    `tr_loss -= tr_loss`, which leaves a NaN in place; zeroing it after each log keeps later windows clean.
    """

    def _maybe_log_save_evaluate(self, tr_loss, *args, **kwargs):
        logged = self._globalstep_last_logged
        super()._maybe_log_save_evaluate(tr_loss, *args, **kwargs)
        if self._globalstep_last_logged != logged:
            tr_loss.zero_()
