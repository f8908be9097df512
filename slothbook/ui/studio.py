"""`Studio()`: one ipywidgets panel to pick a model, a device and data, estimate memory, train, stop and export.

Everything the buttons do is also a method (`estimate()`, `train()`, `stop()`, `wait()`, `export()`), so a
notebook can drive the panel from code. Training and export run in a background thread: the notebook stays
responsive, the panel updates as steps finish, and an error shows in the panel instead of a lost traceback.
"""

from __future__ import annotations

import time
from pathlib import Path

import ipywidgets as w
from IPython.display import clear_output

from ..data import TEMPLATES, demo_dataset_path, detect_shape, load_dataset_file
from ..errors import ConfigError, DatasetError
from ..models.embedded import EMBEDDED_ALIAS
from ..train.job import FinetuneConfig
from .devices import device_choices
from .export import METHODS, export_model, gguf_types
from .feedback import error_html, message_html
from .jobs import Job
from .kernel_interrupt import REASON, InterruptStops
from .sources import describe_model, preview_html, save_upload

TABS = ("Memory estimate", "Training", "Export", "Log")
LOG_LINES = 400


def _reports_errors(method):
    """Show an exception in the panel's status line, then raise it to the caller (a cell shows it too)."""
    import functools

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            self.status.value = error_html(exc)
            raise

    return wrapper


def _label(text: str, width: str = "110px") -> w.HTML:
    return w.HTML(f"<b>{text}</b>", layout=w.Layout(width=width))


def _row(label: str, *children) -> w.HBox:
    return w.HBox([_label(label), *children], layout=w.Layout(align_items="center"))


def _text_field_choices(dataset, shape: str) -> list[tuple[str, str]]:
    """The columns holding text, used as they are; without a "text" column, first the choice to render the rows
    as chats ("text" then names no column, which makes run_finetune convert the dataset's shape)."""
    first = dataset[0]
    choices = [(c, c) for c in dataset.column_names if isinstance(first[c], str)]
    if "text" not in dataset.column_names and shape != "unrecognised":
        choices.insert(0, (f"render the {shape} rows as chats", "text"))
    return choices or [(c, c) for c in dataset.column_names]


class LogView:
    """The Log tab: what background jobs print, carriage returns (progress bars) overwriting their line."""

    def __init__(self, refresh_s: float = 0.5):
        self.widget = w.Textarea(value="", disabled=True, layout=w.Layout(width="100%", height="220px"))
        self.lines = [""]
        self.refresh_s = refresh_s
        self._shown_at = 0.0

    def write(self, text: str) -> None:
        for i, line in enumerate(text.split("\n")):
            if i:
                self.lines.append("")
            if "\r" in line:
                self.lines[-1] = line.rsplit("\r", 1)[1]
            else:
                self.lines[-1] += line
        del self.lines[:-LOG_LINES]
        if time.perf_counter() - self._shown_at >= self.refresh_s:
            self.flush()

    def flush(self) -> None:
        self.widget.value = "\n".join(self.lines)
        self._shown_at = time.perf_counter()


class Studio:
    """The panel. Keyword arguments set the starting values: model, dataset (a path or hub id; None: the demo),
    output (folder for runs; None: outputs/run-<time>), and FinetuneConfig's hyperparameters (r, lora_alpha,
    lr, steps, max_seq_length, batch_size, load_in_4bit, offload, chat_template, responses_only)."""

    def __init__(self, model: str = EMBEDDED_ALIAS, dataset: str | None = None, output: str | None = None,
                 offload: bool = False, **hyperparameters):
        d = FinetuneConfig.from_dict(hyperparameters)  # unknown names fail here, with the known ones listed
        self.output = output
        self.result = None
        self.profiler = None
        self.view = None  # the TrainingView of the last run
        self.last_estimate = None
        self.last_export = None
        self.job: Job | None = None
        self._stop = None  # the GracefulStop of the training in progress
        self._interrupt = None  # its InterruptStops, until the main thread can take the handler back
        self._dataset_source: str | None = None  # None: the bundled demo
        self.log = LogView()
        self._build(model, d, offload)
        self._wire()
        if dataset:
            self.data_kind.value = "path"
            self.data_path.value = dataset
        else:
            self._show_dataset()

    # ---- layout -------------------------------------------------------------------------------------------

    def _build(self, model: str, d: FinetuneConfig, offload: bool) -> None:
        full = w.Layout(width="420px")
        self.model_box = w.Combobox(value=model, options=[EMBEDDED_ALIAS], ensure_option=False, layout=full,
                                    placeholder="smollm2-135m, a model folder, a .gguf file or a hub id")
        self.model_hint = w.HTML()
        self.device_box = w.Dropdown(options=device_choices(), layout=full)
        self.data_kind = w.ToggleButtons(options=[("bundled demo", "demo"), ("upload", "upload"),
                                                  ("path or hub id", "path")], value="demo",
                                         style={"button_width": "125px"})
        self.upload = w.FileUpload(accept=".jsonl,.json,.csv,.parquet", multiple=False, description="Upload")
        self.data_path = w.Text(placeholder="data/train.jsonl or owner/dataset", layout=w.Layout(width="330px"))
        self.data_load = w.Button(description="Load", layout=w.Layout(width="80px"))
        self.text_field = w.Dropdown(options=[d.text_field], value=d.text_field, layout=w.Layout(width="200px"))
        self.data_preview = w.HTML()

        small = w.Layout(width="210px")
        style = {"description_width": "115px"}
        self.r = w.Dropdown(options=[4, 8, 16, 32, 64, 128], value=d.r, description="LoRA rank r",
                            layout=small, style=style)
        self.lora_alpha = w.BoundedIntText(value=d.lora_alpha, min=1, max=4096, description="LoRA alpha",
                                           layout=small, style=style)
        self.lr = w.BoundedFloatText(value=d.lr, min=0.0, max=1.0, step=1e-5, description="learning rate",
                                     layout=small, style=style)
        self.steps = w.BoundedIntText(value=d.steps, min=1, max=10**7, description="steps", layout=small, style=style)
        self.max_seq_length = w.BoundedIntText(value=d.max_seq_length, min=8, max=2**20, description="max seq length",
                                               layout=small, style=style)
        self.batch_size = w.BoundedIntText(value=d.batch_size, min=1, max=4096, description="batch size",
                                           layout=small, style=style)
        self.load_in_4bit = w.Checkbox(value=d.load_in_4bit, description="4-bit (QLoRA)", indent=False)
        self.offload = w.Checkbox(value=offload, description="offload activations", indent=False)
        self.responses_only = w.Checkbox(value=d.responses_only, description="train on responses only",
                                         indent=False)
        # "" stands for no template: a Dropdown cannot show None as a selected value.
        self.chat_template = w.Dropdown(options=[("none: use the text field as it is", "")] +
                                        [(n, n) for n in TEMPLATES], value=d.chat_template or "",
                                        description="chat template", layout=w.Layout(width="380px"), style=style)

        self.estimate_button = w.Button(description="Estimate", icon="calculator", tooltip="memory before loading")
        self.train_button = w.Button(description="Train", icon="play", button_style="success")
        self.stop_button = w.Button(description="Stop", icon="stop", button_style="danger", disabled=True,
                                    tooltip="end after the current step and keep the adapter")
        self.status = w.HTML()

        self.estimate_out = w.Output()
        self.training_box = w.VBox([w.HTML("Press <b>Train</b> to start.")])
        self.export_method = w.Dropdown(options=METHODS, value="lora", description="method", style=style,
                                        layout=w.Layout(width="260px"))
        self.export_quant = w.Dropdown(options=gguf_types(), value="q8_0", description="quantization", style=style,
                                       disabled=True, layout=w.Layout(width="260px"))
        self.export_path = w.Text(value="", placeholder="folder (default: next to the adapter)", description="path",
                                  style=style, layout=w.Layout(width="520px"))
        self.export_overwrite = w.Checkbox(value=False, description="overwrite", indent=False)
        self.export_button = w.Button(description="Export", icon="download", button_style="primary")
        self.export_progress = w.IntProgress(value=0, min=0, max=10, bar_style="info", layout=w.Layout(width="300px"))
        self.export_result = w.HTML()
        export_box = w.VBox([w.HBox([self.export_method, self.export_quant]),
                             w.HBox([self.export_path, self.export_overwrite]),
                             w.HBox([self.export_button, self.export_progress]), self.export_result])

        self.tabs = w.Tab(children=[self.estimate_out, self.training_box, export_box, self.log.widget])
        for i, title in enumerate(TABS):
            self.tabs.set_title(i, title)

        data_line = w.HBox([self.upload, self.data_path, self.data_load])
        left = w.VBox([
            _row("Model", self.model_box), _row("", self.model_hint),
            _row("Device", self.device_box),
            _row("Dataset", self.data_kind), _row("", data_line),
            _row("Text field", self.text_field),
        ], layout=w.Layout(width="600px"))
        right = w.VBox([
            w.HTML("<b>Hyperparameters</b>"),
            w.GridBox([self.r, self.lora_alpha, self.lr, self.steps, self.max_seq_length, self.batch_size],
                      layout=w.Layout(grid_template_columns="repeat(2, 220px)")),
            w.HBox([self.load_in_4bit, self.offload]), self.chat_template, self.responses_only,
        ])
        self.panel = w.VBox([
            w.HTML("<h3 style='margin:4px 0'>slothbook Studio</h3>"),
            w.HBox([left, right]),
            self.data_preview,
            w.HBox([self.estimate_button, self.train_button, self.stop_button]),
            self.status,
            self.tabs,
        ], layout=w.Layout(border="1px solid #ddd", padding="8px", width="1080px"))

    def _wire(self) -> None:
        self.model_box.observe(lambda _: self._describe_model(), "value")
        self._describe_model()
        self.data_kind.observe(lambda _: self._guarded(self._show_dataset), "value")
        self.upload.observe(lambda _: self._guarded(self._show_dataset), "value")
        self.data_path.observe(lambda _: self._guarded(self._show_dataset), "value")
        self.data_load.on_click(lambda _: self._guarded(self._show_dataset))
        self.export_method.observe(lambda _: setattr(self.export_quant, "disabled",
                                                     self.export_method.value != "gguf"), "value")
        self.estimate_button.on_click(lambda _: self._guarded(self.estimate))
        self.train_button.on_click(lambda _: self._guarded(self.train))
        self.stop_button.on_click(lambda _: self._guarded(self.stop))
        self.export_button.on_click(lambda _: self._guarded(self.export))

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.panel._repr_mimebundle_(**kwargs)
        # What a saved notebook shows where widgets are not rendered (GitHub), instead of a widget repr.
        bundle["text/plain"] = "slothbook Studio (a live panel: run the notebook to use it)"
        return bundle

    # ---- feedback -----------------------------------------------------------------------------------------

    def _say(self, text: str, kind: str = "info") -> None:
        self.status.value = message_html(text, kind)

    def _guarded(self, action) -> None:
        """Run a button's action; an error shows in the panel (a widget callback's traceback would be lost)."""
        try:
            action()
        except Exception as exc:
            self.status.value = error_html(exc)

    def _describe_model(self) -> None:
        kind, sentence = describe_model(self.model_box.value)
        self.model_hint.value = f"<span style='font-size:12px'>{message_html(sentence, kind)}</span>"

    # ---- dataset ------------------------------------------------------------------------------------------

    def _dataset_choice(self) -> str | None:
        kind = self.data_kind.value
        self.upload.layout.display = "" if kind == "upload" else "none"
        for widget in (self.data_path, self.data_load):
            widget.layout.display = "" if kind == "path" else "none"
        if kind == "demo":
            return None
        if kind == "upload":
            if not self.upload.value:
                return ""
            return str(save_upload(self.upload.value, Path(self.output or "outputs") / "uploads"))
        return self.data_path.value.strip()

    def _show_dataset(self) -> None:
        source = self._dataset_choice()
        if source == "":
            self.data_preview.value = message_html("Choose a file or type a path / hub id.", "info")
            return
        try:
            dataset = load_dataset_file(source or str(demo_dataset_path()))
        except DatasetError as exc:
            self.data_preview.value = error_html(exc)
            raise
        try:
            shape = detect_shape(dataset)
        except DatasetError:
            shape = "unrecognised"
        self._dataset_source = source
        wanted = self.text_field.value  # new options reset the value to the first one
        self.text_field.options = _text_field_choices(dataset, shape)
        values = [value for _, value in self.text_field.options]
        self.text_field.value = wanted if wanted in values else "text" if "text" in values else values[0]
        self.data_preview.value = preview_html(dataset, shape)

    # ---- actions ------------------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self.job is not None and self.job.running

    def config(self) -> FinetuneConfig:
        """The FinetuneConfig the panel describes now."""
        return FinetuneConfig.from_dict(dict(
            model=self.model_box.value.strip() or EMBEDDED_ALIAS, dataset=self._dataset_source or None,
            text_field=self.text_field.value, chat_template=self.chat_template.value or None,
            responses_only=self.responses_only.value, max_seq_length=self.max_seq_length.value,
            steps=self.steps.value, batch_size=self.batch_size.value, r=self.r.value,
            lora_alpha=self.lora_alpha.value, lr=self.lr.value, load_in_4bit=self.load_in_4bit.value,
            gradient_checkpointing="slothbook" if self.offload.value else "auto", output=self._run_folder(),
            logging_steps=1,
        ))

    def _run_folder(self) -> str | None:
        return str(Path(self.output) / time.strftime("run-%Y%m%d-%H%M%S")) if self.output else None

    @_reports_errors
    def estimate(self) -> None:
        """Predict the peak memory of a step with these settings on the chosen device, before anything loads;
        shows the table, the chart and whether it fits. `last_estimate` holds the Estimate."""
        from .estimate import display_estimate, plan, resolve_target, verdict

        self.tabs.selected_index = 0
        cfg = self.config()
        # Compute outside the Output widget: an exception inside its `with` block is swallowed into the widget.
        target = resolve_target(device=self.device_box.value)
        est = plan(cfg.model, cfg.max_seq_length, cfg.batch_size, cfg.r, cfg.load_in_4bit, self.offload.value, target)
        fits, sentence = verdict(est, target, cfg.model)
        with self.estimate_out:
            clear_output(wait=True)
            display_estimate(est, fits, sentence)
        self.last_estimate = est
        self._say("Estimate ready." if fits else "The estimate says this will not fit: see the Memory estimate tab.",
                  "ok" if fits else "warning")

    @_reports_errors
    def train(self, wait: bool = False) -> None:
        """Start training in a background thread. Returns at once unless `wait`; then `result` holds the
        FinetuneResult (model, tokenizer, losses, adapter_dir) and `model` / `tokenizer` the trained pair."""
        from ..profiler import MemoryProfiler
        from ..train.interrupt import GracefulStop
        from ..train.job import run_finetune
        from .run import on_device, profiler_callback, quiet_progress_bars
        from .training import TrainingView

        if self.busy:
            raise ConfigError("A job is already running: wait for it, or press Stop.")
        cfg = self.config()
        device = self.device_box.value
        self.profiler = profiler = MemoryProfiler(device=device, live=False)  # shown in the view instead
        self._stop = stop = GracefulStop()  # in the worker thread it installs no signal handler: see below
        self.view = view = TrainingView(cfg.steps, profiler)
        self.training_box.children = [view.widget]
        self.tabs.selected_index = 1
        view.show_profiler(profiler)

        def work():
            with on_device(device), quiet_progress_bars():
                # The view is the progress bar: Trainer's own would land in whichever cell runs.
                return run_finetune(cfg, callbacks=[stop, profiler_callback(profiler), view], progress_bar=False)

        def done(job):
            self._finish_training(job, view)

        self._set_busy(True, stoppable=True)
        self._say(f"Training {cfg.model} for {cfg.steps} steps ...", "info")
        self.job = job = Job(work, on_done=done, log=self.log.write, name="slothbook-train")
        job.start()
        self._release_interrupt()
        self._interrupt = InterruptStops(stop, lambda: job.running, on_stop=lambda: self._say_stopping(REASON))
        self._interrupt.install()  # the kernel's Interrupt stops training too (called from the main thread)
        if wait:
            self.wait()

    def _finish_training(self, job: Job, view) -> None:
        from .feedback import error_text
        from .run import outcome

        self.log.flush()
        self._stop = None
        self._set_busy(False)
        if job.error is not None:
            view.finish(error_text(job.error), "error")
            self.status.value = error_html(job.error)
            return
        self.result = job.result
        text, kind = outcome(job.result)
        view.finish(text, kind)
        self._say(text, kind)
        if not self.export_path.value:
            self.export_path.value = str(Path(job.result.adapter_dir).parent / "export")

    def _release_interrupt(self) -> None:
        if self._interrupt is not None:
            self._interrupt.uninstall()
            self._interrupt = None

    @_reports_errors
    def stop(self, reason: str = "Stop button") -> None:
        """End training after the step in progress, saving a checkpoint to resume from and the adapter."""
        stop = self._stop  # the worker thread clears it when training ends
        if stop is None or not self.busy:
            self._say("Nothing is training.", "info")
            return
        stop.request(reason)
        self._say_stopping(reason)

    def _say_stopping(self, reason: str) -> None:
        self.stop_button.disabled = True
        self._say(f"{reason}: stopping after the current step and saving a checkpoint ...", "warning")

    def wait(self, timeout: float | None = None) -> None:
        """Block until the running job ends; raise its error (which the panel shows too). Results land in
        `result` (training) and `last_export` (export). Interrupting the kernel while it waits for training
        stops training after the step, as Stop does; a second interrupt stops the waiting."""
        if self.job is None:
            raise ConfigError("Nothing has been started: press Train or Export first.")
        try:
            self.job.wait(timeout)
        except KeyboardInterrupt:
            stop = self._stop
            if stop is None or stop.requested or not self.busy:
                raise
            self.stop(reason=REASON)
            self.job.wait(timeout)
        finally:
            if not self.busy:
                self._release_interrupt()

    def _set_busy(self, busy: bool, stoppable: bool = False) -> None:
        self.train_button.disabled = self.export_button.disabled = self.estimate_button.disabled = busy
        self.stop_button.disabled = not (busy and stoppable)

    @property
    def model(self):
        return self.result.model if self.result is not None else None

    @property
    def tokenizer(self):
        return self.result.tokenizer if self.result is not None else None

    @_reports_errors
    def export(self, method: str | None = None, quantization: str | None = None, path: str | None = None,
               wait: bool = False) -> None:
        """Export the trained model in a background thread: lora, merged_16bit, merged_4bit or gguf (with a
        quantization such as q4_k_m). `last_export` holds the ExportResult (paths and size) when done."""
        if self.busy:
            raise ConfigError("A job is already running: wait for it to finish before exporting.")
        if self.result is None:
            raise ConfigError("Train a model first: there is nothing to export yet.")
        if method is not None:
            self.export_method.value = method
        if quantization is not None:
            self.export_quant.value = quantization
        if path is not None:
            self.export_path.value = path
        method = self.export_method.value
        quant = self.export_quant.value if method == "gguf" else None
        target = self.export_path.value.strip() or str(Path(self.result.adapter_dir).parent / "export")
        model, tokenizer, overwrite = self.model, self.tokenizer, self.export_overwrite.value
        self.tabs.selected_index = 2
        self.export_result.value = message_html(f"exporting {method}{' ' + quant if quant else ''} to {target} ...")
        self.export_progress.bar_style = "info"

        def done(job):
            self.log.flush()
            self._set_busy(False)
            if job.error is not None:
                self.export_progress.bar_style = "danger"
                self.export_result.value = self.status.value = error_html(job.error)
                return
            self.last_export = job.result
            self.export_progress.bar_style = "success"
            self.export_result.value = message_html(f"exported {job.result}", "ok")
            self._say(f"exported {job.result}", "ok")

        self.job = Job(lambda: export_model(model, tokenizer, method, target, quant, overwrite), on_done=done,
                       log=self.log.write, name="slothbook-export")
        self._set_busy(True)
        self.job.start()
        _pulse(self.export_progress, self.job)
        if wait:
            self.wait()


def _pulse(bar: w.IntProgress, job: Job, period_s: float = 0.4) -> None:
    """Move the bar while `job` runs: the export functions report no progress of their own."""
    import threading

    def tick():
        while job.running:
            bar.value = (bar.value + 1) % bar.max
            time.sleep(period_s)
        bar.value = bar.max

    threading.Thread(target=tick, daemon=True, name="slothbook-pulse").start()
