"""`MemoryProfiler`: memory by category at the phase boundaries of every training step.

Phases are found with hooks, so a hand-written loop needs only `prof.step()` at the end of each step:
- after forward: a forward hook on the model (it returns loss and logits; the loss is computed inside);
- after backward: hooks on the forward's outputs (loss, logits, TRL's log-probs) run when backward reaches the
  one the loss was made from and queue a callback on the autograd engine, which runs once the whole backward
  pass is done (per micro-batch under gradient accumulation);
- after the optimizer step: a step post-hook on the optimizer (also fires under accelerate's wrapper).
Each sample reads host-side counters only: no device synchronisation. Byte counts of weights and LoRA are
computed once; the optimizer's are recomputed only when its state gains entries.
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from .meters import make_meter
from .samples import PEAK, PHASES, HostScalars, PendingScalar, Sample
from .tensors import (
    StorageSet,
    base_tensors,
    model_device,
    optimizer_tensors,
    trainable_parameters,
    unwrap_optimizer,
)


def _offloaded_bytes_reader():
    """`slothbook.train.offload.offloaded_bytes` where it exists; the offload pool is empty otherwise."""
    try:
        from ..train.offload import offloaded_bytes
    except ImportError:
        return lambda: 0
    return offloaded_bytes


class MemoryProfiler:
    """Samples memory by category after forward, after backward and after the optimizer step of every step.

    Use as a context manager around a hand-written loop::

        with MemoryProfiler(model, optimizer) as prof:
            for batch in batches:
                loss = model(**batch).loss
                loss.backward(); optimizer.step(); optimizer.zero_grad()
                prof.step()
        print(prof.summary())

    or inside a Trainer: `trainer.add_callback(MemoryProfiler().callback())`.

    device: the device to profile (default: the one holding most of the model's weights).
    cpu_mode: on the CPU, "saved" counts the tensors autograd keeps for backward (cheap); "exact" tracks every
        allocation like CUDA's allocator does (about 20% slower steps).
    live: show the live figure in Jupyter (None: when running in a Jupyter kernel).
    refresh_s: the live figure redraws at most this often.
    """

    def __init__(self, model: nn.Module | None = None, optimizer=None, *, device=None, cpu_mode: str = "saved",
                 live: bool | None = None, refresh_s: float = 1.0):
        self.device = torch.device(device) if device is not None else None
        self.cpu_mode = cpu_mode
        self.live = live
        self.refresh_s = refresh_s
        self.samples: list[Sample] = []
        self.model = None
        self.optimizer = None
        self.meter = None
        self.phase = "before training"
        self.last_shape: tuple[int, int] | None = None  # (batch, sequence length) of the latest forward
        self._handles: list = []
        self._opt_handle = None
        self._offloaded = _offloaded_bytes_reader()
        self._t0 = time.perf_counter()
        self._step = 0
        self._open = False
        self._step_t0 = 0.0
        self._tokens = 0
        self._losses: list[PendingScalar] = []
        self._pending: dict[int, list[PendingScalar]] = {}
        self._scalars = HostScalars()
        self._opt_cache = (-1, 0)
        self._step_max = 0
        self._rows_by_step: dict[int, Sample] = {}
        self._figure = None
        self._drawn_at = 0.0
        if model is not None:
            self.attach(model, optimizer)

    # ---- wiring -------------------------------------------------------------------------------------------

    def attach(self, model: nn.Module, optimizer=None) -> MemoryProfiler:
        """Hook into `model` (and `optimizer`): count its tensors once and sample at phase boundaries."""
        self.detach()
        self.model = model
        self.device = self.device or model_device(model)
        self._count_static()
        self.meter = make_meter(self.device, self.cpu_mode, self._param_ptrs)
        self._handles = [
            model.register_forward_pre_hook(self._on_forward_begin, with_kwargs=True),
            model.register_forward_hook(self._on_forward_end, always_call=True),
        ]
        if optimizer is not None:
            self.attach_optimizer(optimizer)
        return self

    def attach_optimizer(self, optimizer) -> None:
        if self._opt_handle is not None:
            self._opt_handle.remove()
        self.optimizer = optimizer
        self._opt_cache = (-1, 0)
        inner = unwrap_optimizer(optimizer)
        if hasattr(inner, "register_step_post_hook"):
            self._opt_handle = inner.register_step_post_hook(lambda *_: self.mark("optimizer"))

    def detach(self, finish: bool = True) -> None:
        """Remove the hooks. finish=False drops an unfinished step instead of recording it (after an error)."""
        if self._open and finish:
            self.end_step()
        elif self._open:
            self.meter.step_end()
            self._open = False
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._opt_handle is not None:
            self._opt_handle.remove()
            self._opt_handle = None
        if self.meter is not None:
            self.meter.close()

    def refresh(self) -> None:
        """Recount the weights and LoRA bytes (after adding adapters, quantizing or moving the model)."""
        self._count_static()

    def __enter__(self) -> MemoryProfiler:
        if self.live or (self.live is None and in_jupyter()):
            self.show()
        return self

    def __exit__(self, exc_type, exc, tb):
        translated = self.translate_oom(exc) if _is_oom(exc) else None
        self.detach(finish=exc is None)
        self._redraw(force=True)
        if translated is not None:
            raise translated from exc
        return False

    def callback(self):
        """A `transformers.TrainerCallback` that drives this profiler inside Trainer / TRL's SFTTrainer."""
        from .callback import ProfilerCallback

        return ProfilerCallback(self)

    # ---- the step -----------------------------------------------------------------------------------------

    def begin_step(self) -> None:
        """Start a step: reset the peak. Called by the callback, or on the first forward after `step()`."""
        if self._open:
            self.end_step()
        self._step += 1
        self._open = True
        self._tokens = 0
        self._losses = []
        self._step_max = 0
        self.meter.step_begin(self._named_tensors)
        self.meter.reset_peak()
        self._step_t0 = time.perf_counter()

    def mark(self, phase: str) -> Sample:
        """Take the sample after `phase` (forward, backward or optimizer) of the current step."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        if not self._open:
            self.begin_step()
        sample = self._measure(phase)
        # Under gradient accumulation a phase repeats within a step: keep its largest sample.
        index = self._find(phase)
        if index is None:
            self.samples.append(sample)
        elif sample.allocated >= self.samples[index].allocated:
            self.samples[index] = sample
        self.phase = {"forward": "backward", "backward": "optimizer step", "optimizer": "between steps"}[phase]
        return sample

    def end_step(self, loss=None, tokens: int | None = None) -> Sample | None:
        """Close the step: record its peak, tokens, time and loss (a float or tensor; by default the loss
        the model returned). Returns the step's summary row."""
        if not self._open:
            return None
        seconds = time.perf_counter() - self._step_t0
        phases = self._step_samples()
        if not phases:
            phases = [self._measure("optimizer")]
            self.samples.append(phases[0])
        row = self._peak_row(phases, seconds, self._tokens if tokens is None else tokens)
        self.meter.step_end()
        if loss is not None:
            self._losses = [self._scalars.read(torch.as_tensor(loss))]
        if self._losses:
            self._pending[self._step] = self._losses
        self.samples.append(row)
        self._rows_by_step[row.step] = row
        self._open = False
        self.phase = "between steps"
        self.resolve_losses()
        self._redraw()
        return row

    step = end_step

    # ---- hooks --------------------------------------------------------------------------------------------

    def _training(self) -> bool:
        return torch.is_grad_enabled() and self.model is not None and self.model.training

    def _on_forward_begin(self, module, args, kwargs):
        if not self._training():
            return
        if not self._open:
            self.begin_step()
        self.phase = "forward"
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        if ids is None and isinstance(kwargs.get("inputs_embeds"), torch.Tensor):
            ids = kwargs["inputs_embeds"][..., 0]
        if isinstance(ids, torch.Tensor):
            self._tokens += ids.numel()
            self.last_shape = (ids.shape[0], ids.shape[-1]) if ids.dim() > 1 else (1, ids.shape[0])
        self.meter.forward_begin(self._named_tensors)

    def _on_forward_end(self, module, args, output):
        if not self._training() or not self._open:
            return
        tensors = _output_tensors(output)
        self.meter.forward_end(tensors)
        if output is None:  # the forward raised (this hook is `always_call`): stay in the forward phase
            return
        self.mark("forward")
        loss = getattr(output, "loss", None) if not isinstance(output, torch.Tensor) else output
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._losses.append(self._scalars.read(loss))
        # Whichever output the caller's loss is made from (the loss, logits, TRL's per-token log-probs), backward
        # reaches it first; a hook there queues the "after backward" sample for when the pass is done.
        pending = [False]
        for t in tensors:
            if t.requires_grad:
                t.register_hook(lambda grad, pending=pending: self._on_backward_begin(pending))

    def _on_backward_begin(self, pending: list) -> None:
        if not pending[0]:
            pending[0] = True
            torch.autograd.Variable._execution_engine.queue_callback(lambda: self.mark("backward"))

    # ---- measuring ----------------------------------------------------------------------------------------

    def _count_static(self) -> None:
        model = self.model
        self._trainable = trainable_parameters(model)
        self._grad_sizes = [(p, p.numel() * p.element_size()) for p in self._trainable]
        seen = StorageSet(self.device)
        self.weights_bytes = seen.add_all(base_tensors(model))
        self.lora_bytes = seen.add_all(self._trainable)
        self._param_ptrs = {key[2] for key in seen.keys}
        self._opt_cache = (-1, 0)

    def _named_tensors(self):
        yield from base_tensors(self.model)
        yield from self._trainable
        yield from (p.grad for p in self._trainable if p.grad is not None)
        if self.optimizer is not None:
            yield from optimizer_tensors(self.optimizer)

    def gradient_bytes(self) -> int:
        # A gradient has its parameter's shape and dtype: sizes are known once, only presence changes.
        return sum(size for p, size in self._grad_sizes if p.grad is not None)

    def optimizer_bytes(self) -> int:
        if self.optimizer is None:
            return 0
        entries = len(unwrap_optimizer(self.optimizer).state)
        if entries != self._opt_cache[0]:  # state tensors are allocated once, then updated in place
            self._opt_cache = (entries, StorageSet(self.device).add_all(optimizer_tensors(self.optimizer)))
        return self._opt_cache[1]

    def _measure(self, phase: str) -> Sample:
        grads, opt = self.gradient_bytes(), self.optimizer_bytes()
        named = self.weights_bytes + self.lora_bytes + grads + opt
        offloaded = self._offloaded()
        reading = self.meter.read()
        activations = self.meter.activations(named, reading)
        pooled = self._pool_in_process(offloaded)
        if pooled and reading.allocated is not None:
            activations = max(0, activations - pooled)  # the exact tracker saw the pool's buffers too
        allocated = named + activations
        held = max(reading.held - pooled, allocated)
        self._step_max = max(self._step_max, allocated)
        peak = self._step_max if reading.peak is None else max(self._step_max, reading.peak)
        return Sample(self._step, phase, time.perf_counter() - self._t0, self.weights_bytes, self.lora_bytes,
                      grads, opt, activations, offloaded, held - allocated, allocated, held, peak,
                      self.meter.capacity)

    def _pool_in_process(self, offloaded: int) -> int:
        """On the CPU the offload pool lives in the memory measured: these bytes are offloaded, not rest."""
        return offloaded if self.meter.kind == "cpu" else 0

    def _peak_row(self, phases: list[Sample], seconds: float, tokens: int) -> Sample:
        """Split the step's peak: named tensors at their largest (gradients in full), activations the rest.

        Where the meter knows no peak (the CPU's saved-tensor mode), the peak is taken as the largest activations
        seen beside the largest named tensors: an upper bound of what was sampled.
        """
        grads = max(s.gradients for s in phases)
        opt = max(s.optimizer for s in phases)
        named = self.weights_bytes + self.lora_bytes + grads + opt
        measured = self.meter.read().peak
        if measured is None:
            peak = named + max(s.activations for s in phases)
        else:
            measured -= self._pool_in_process(max(s.offloaded for s in phases))
            peak = max([s.allocated for s in phases] + [measured])
        held = max([s.held for s in phases] + [peak])
        return Sample(self._step, PEAK, time.perf_counter() - self._t0, self.weights_bytes, self.lora_bytes, grads,
                      opt, max(0, peak - named), max(s.offloaded for s in phases), held - max(peak, named),
                      max(peak, named), held, peak, self.meter.capacity, tokens, seconds)

    @property
    def current_step(self) -> int:
        """The step running now (or the last one, between steps), counted from 1."""
        return self._step

    def measure_now(self) -> Sample:
        """A sample of this moment, outside the step's record (used to explain an out-of-memory error)."""
        return self._measure(self.phase)

    def _find(self, phase: str) -> int | None:
        """Index of the open step's sample of `phase` (samples of a step are at the end of the list)."""
        for i in range(len(self.samples) - 1, -1, -1):
            s = self.samples[i]
            if s.step != self._step:
                return None
            if s.phase == phase:
                return i
        return None

    def _step_samples(self) -> list[Sample]:
        out = []
        for s in reversed(self.samples):
            if s.step != self._step:
                break
            out.append(s)
        return out[::-1]

    def note_loss(self, loss: float) -> None:
        """Give the last finished step a loss the model did not return (Trainer's logged loss)."""
        row = self._rows_by_step.get(max(self._rows_by_step, default=0))
        if row is not None and row.loss is None and row.step not in self._pending:
            row.loss = float(loss)

    def resolve_losses(self, wait: bool = False) -> None:
        """Fill in the losses whose values have reached the host (all of them with wait=True)."""
        for step, pending in list(self._pending.items()):
            values = [p.value(wait) for p in pending]
            if all(v is not None for v in values):
                self._rows_by_step[step].loss = sum(values) / len(values)
                del self._pending[step]

    # ---- results ------------------------------------------------------------------------------------------

    @property
    def steps(self) -> list[Sample]:
        """One row per finished step: the step's peak split by category, with tokens, time and loss (a loss
        still on its way from the GPU reads None)."""
        self.resolve_losses()
        return self._rows()

    def _rows(self) -> list[Sample]:
        return list(self._rows_by_step.values())

    def to_pandas(self):
        """Every sample as a DataFrame (phase = forward/backward/optimizer, or `peak` for the step's row)."""
        from .report import to_dataframe

        self.resolve_losses(wait=True)
        return to_dataframe(self.samples)

    def summary(self) -> str:
        """A text table of the categories at the highest step peak and over the run."""
        from .report import summary_table

        self.resolve_losses(wait=True)
        return summary_table(self.steps, self.meter, self._step)

    def figure(self):
        """A static plotly figure: stacked categories per step, peak, device total, loss and tokens/s."""
        from .figure import memory_figure

        self.resolve_losses(wait=True)
        return memory_figure(self.steps, widget=False, cpu=self.device is not None and self.device.type == "cpu")

    def show(self):
        """Display the live FigureWidget in Jupyter (it redraws as steps finish) and return it."""
        from .figure import memory_figure

        if self._figure is None:
            self._figure = memory_figure(self.steps, widget=True,
                                         cpu=self.device is not None and self.device.type == "cpu")
        from IPython.display import display

        display(self._figure)
        return self._figure

    def _redraw(self, force: bool = False) -> None:
        if self._figure is None:
            return
        now = time.perf_counter()
        if not force and now - self._drawn_at < self.refresh_s:
            return
        from .figure import update_figure

        self.resolve_losses(wait=force)
        update_figure(self._figure, self.steps)
        self._drawn_at = now

    def save_html(self, path) -> None:
        from .figure import save_html

        save_html(self.figure(), path)

    def save_png(self, path, width: int = 1200, height: int = 500) -> None:
        from .figure import save_png

        save_png(self.figure(), path, width, height)

    # ---- out of memory ------------------------------------------------------------------------------------

    def translate_oom(self, exc: BaseException):
        """The `TrainingOutOfMemoryError` that explains `exc`: step, phase, largest category, what would fit."""
        from .oom import translate_oom

        return translate_oom(exc, self)

    @contextlib.contextmanager
    def oom_guard(self):
        """Re-raise an out-of-memory error inside the block as a `TrainingOutOfMemoryError` that explains it.
        On any error the profiler's hooks come off (and the CPU's exact tracker stops)."""
        try:
            yield self
        except torch.OutOfMemoryError as exc:
            if not _is_oom(exc):
                self.detach(finish=False)
                raise  # already translated
            translated = self.translate_oom(exc)
            self.detach(finish=False)
            raise translated from exc
        except BaseException:
            self.detach(finish=False)
            raise


def _is_oom(exc) -> bool:
    from .oom import TrainingOutOfMemoryError

    return isinstance(exc, torch.OutOfMemoryError) and not isinstance(exc, TrainingOutOfMemoryError)


def _output_tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    return [v for v in values if isinstance(v, torch.Tensor)]


def in_jupyter() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")
