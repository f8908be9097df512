"""The profiler as a `transformers.TrainerCallback` (Trainer, TRL's SFTTrainer).

Trainer's events bracket the step (on_step_begin / on_step_end) and the optimizer step
(on_pre_optimizer_step / on_optimizer_step), but it has no event between forward and backward. So the callback
attaches the profiler's model hooks (after forward: a forward hook; after backward: a callback queued on the
autograd engine, see profiler.py) and uses Trainer's events for the step's bounds. on_pre_optimizer_step is not
used as "after backward": it comes after gradient clipping, whose temporaries would be counted as activations.
"""

from __future__ import annotations

from transformers import TrainerCallback

from .profiler import in_jupyter


class ProfilerCallback(TrainerCallback):
    def __init__(self, profiler):
        self.profiler = profiler

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        prof = self.profiler
        if model is not None and (prof.model is not model or not prof._handles):
            prof.attach(model, optimizer)
        elif optimizer is not None and prof.optimizer is not optimizer:
            prof.attach_optimizer(optimizer)
        if prof.live or (prof.live is None and in_jupyter()):
            prof.show()

    def on_step_begin(self, args, state, control, **kwargs):
        if self.profiler.model is not None:
            self.profiler.begin_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        # The optimizer's own post-hook has sampled already unless the optimizer has no hooks (non-torch ones).
        prof = self.profiler
        if prof.model is not None and prof._opt_handle is None:
            prof.mark("optimizer")

    def on_step_end(self, args, state, control, **kwargs):
        self.profiler.end_step()

    def on_log(self, args, state, control, logs=None, **kwargs):
        # TRL computes its loss outside the model (from per-token log-probs): take the logged one.
        if logs and "loss" in logs:
            self.profiler.note_loss(logs["loss"])

    def on_train_end(self, args, state, control, **kwargs):
        self.profiler.detach()
        self.profiler._redraw(force=True)
