"""Stopping a fine-tune cleanly: Ctrl-C, a notebook's interrupt, SIGTERM (Colab/Kaggle time limits) or a Stop button.

`GracefulStop` is a TrainerCallback. Any of those requests ends training once the optimizer step in progress is done
and asks Trainer to save a full checkpoint (adapter, optimizer, scheduler, RNG states, data position), which
`trainer.train(resume_from_checkpoint=...)` and `slothbook finetune --resume` continue from. A second Ctrl-C aborts
at once, as Ctrl-C usually does.
"""

from __future__ import annotations

import signal
import sys
import threading

from transformers import TrainerCallback

from .checkpoints import any_rank

_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class GracefulStop(TrainerCallback):
    """`request()` (from any thread) or a SIGINT/SIGTERM ends training after the current step, with a checkpoint.

    Signal handlers are installed only when training runs in the main thread (signals are delivered there alone),
    at train begin, and the previous handlers come back at train end or on `restore_signals()`.
    """

    def __init__(self, signals: bool = True):
        self.signals = signals
        self.reason: str | None = None  # "Ctrl-C", "SIGTERM" or "requested"; None while not asked to stop
        self._event = threading.Event()
        self._previous: dict[int, object] = {}

    def request(self, reason: str = "requested") -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    # ---- signals ------------------------------------------------------------------------------------------

    def install_signals(self) -> None:
        if not self.signals or self._previous or threading.current_thread() is not threading.main_thread():
            return
        for signum in _SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def restore_signals(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested:
            # The second Ctrl-C: stop waiting for the step, as an unhandled Ctrl-C would.
            previous = self._previous.get(signum)
            self.restore_signals()
            if callable(previous):
                previous(signum, frame)
            raise KeyboardInterrupt
        name = _SIGNALS[signum]
        self.request(name)
        again = " (Ctrl-C again stops at once, without saving)" if signum == signal.SIGINT else ""
        print(f"\n{name}: stopping after this step and saving a checkpoint{again}", file=sys.stderr, flush=True)

    # ---- trainer events -----------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        self.install_signals()

    def on_step_end(self, args, state, control, **kwargs):
        # Under torch.distributed each rank gets its own signal; all must stop at the same step.
        if any_rank(self.requested) and state.global_step < state.max_steps:
            self.request(self.reason or "another rank")
            control.should_training_stop = True
            control.should_save = True  # Trainer writes the checkpoint right after this event

    def on_train_end(self, args, state, control, **kwargs):
        self.restore_signals()
