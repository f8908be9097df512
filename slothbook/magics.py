"""`%load_ext slothbook`: notebook commands over the same layers as the CLI and the Studio.

Thin on purpose: each command parses its words, calls the layers below and displays what they return. An
error slothbook raises on purpose is shown as its message alone (IPython's UsageError), without a traceback.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Callable
from dataclasses import dataclass

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class

from .errors import ConfigError, SlothbookError
from .train.job import FinetuneConfig

# ---- arguments ------------------------------------------------------------------------------------------------

_TRUE = {"yes", "true", "on", "1", "y"}
_FALSE = {"no", "false", "off", "0", "n"}


def _bool(text: str) -> bool:
    low = text.lower()
    if low in _TRUE | _FALSE:
        return low in _TRUE
    raise ValueError("expected yes or no")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("expected a positive integer")
    return value


@dataclass(frozen=True)
class Option:
    name: str
    parse: Callable[[str], object]
    default: object
    help: str


ESTIMATE_OPTIONS = (
    Option("model", str, "smollm2-135m", "smollm2-135m (embedded), a model folder, a .gguf file or a hub id"),
    Option("seq", _positive_int, 2048, "sequence length in tokens"),
    Option("batch", _positive_int, 1, "batch size"),
    Option("r", _positive_int, 16, "LoRA rank"),
    Option("4bit", _bool, True, "QLoRA: base weights in 4-bit NF4 (yes/no)"),
    Option("offload", _bool, True, "offload activations to CPU memory while training (yes/no)"),
    Option("gpu", float, None, "plan for a GPU with this many GiB (default: this machine's current device)"),
    Option("device", str, None, "plan for a device of this machine: cpu, cuda:0, ... (its free memory)"),
    Option("dtype", str, None, "compute dtype: bf16, fp16 or fp32 (default: what the target supports)"),
    Option("optimizer", str, "adamw", "adamw, adamw_8bit or sgd"),
)
EXPORT_OPTIONS = (
    Option("path", str, None, "output folder (required)"),
    Option("model", str, "model", "name of the variable holding the fine-tuned model"),
    Option("tokenizer", str, "tokenizer", "name of the variable holding its tokenizer"),
    Option("overwrite", _bool, False, "replace an existing export (yes/no)"),
)
# Keys of a `%%slothbook finetune` cell that name variables to bind rather than configure the run.
BINDINGS = {"model_var": "model", "tokenizer_var": "tokenizer", "result_var": None, "profiler_var": None}


def parse_words(line: str) -> tuple[list[str], dict[str, str]]:
    """Split a magic's line into positional words and key=value pairs (quotes as in a shell)."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise ConfigError(f"Cannot split the arguments ({exc}); check the quotes.") from exc
    positional, pairs = [], {}
    for word in words:
        key, eq, value = word.partition("=")
        if eq:
            pairs[key] = value
        else:
            positional.append(word)
    return positional, pairs


def parse_options(command: str, pairs: dict[str, str], options: tuple[Option, ...]) -> dict:
    """Typed values for `options`, defaults filled in; unknown keys and bad values are ConfigErrors."""
    known = {o.name: o for o in options}
    unknown = sorted(set(pairs) - set(known))
    if unknown:
        raise ConfigError(f"%slothbook {command}: unknown option(s) {', '.join(unknown)}. "
                          f"Known: {', '.join(known)}. See %slothbook --help.")
    values = {o.name: o.default for o in options}
    for key, text in pairs.items():
        try:
            values[key] = known[key].parse(text)
        except ValueError as exc:
            raise ConfigError(f"%slothbook {command}: {key}={text!r} is not valid ({exc}). "
                              f"{key}: {known[key].help}.") from exc
    return values


def parse_gpus(positional: list[str], pairs: dict[str, str]) -> int:
    """`--gpus N` (or `--gpus=N`) on the first line of a finetune cell: how many GPUs train; 1 when absent."""
    words = list(positional) + [f"{key}={value}" for key, value in pairs.items()]
    if not words:
        return 1
    text = None
    if len(words) == 2 and words[0] == "--gpus":
        text = words[1]
    elif len(words) == 1 and words[0].startswith("--gpus="):
        text = words[0].partition("=")[2]
    if text is None:
        raise ConfigError("%%slothbook finetune takes only --gpus N on its first line; put every other setting in the "
                          "cell as `key: value`.")
    try:
        return _positive_int(text)
    except ValueError as exc:
        raise ConfigError(f"--gpus {text!r}: {exc} (the number of GPUs to train on).") from exc


def parse_finetune_cell(cell: str) -> tuple[FinetuneConfig, dict]:
    """The cell's YAML as a FinetuneConfig, and the names of the variables to bind (BINDINGS' keys)."""
    import yaml

    try:
        values = yaml.safe_load(cell) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"The cell is not valid YAML: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigError("The cell must hold `key: value` lines (a YAML mapping), e.g. `steps: 60`.")
    names = {key: values.pop(key, default) for key, default in BINDINGS.items()}
    for key, name in names.items():
        if name is not None and not (isinstance(name, str) and name.isidentifier()):
            raise ConfigError(f"{key}: {name!r} is not a valid Python variable name.")
    return FinetuneConfig.from_dict(values), names


# ---- help -----------------------------------------------------------------------------------------------------

# What some FinetuneConfig keys mean, beyond their names.
_FINETUNE_NOTES = {
    "model": "smollm2-135m (embedded), a model folder, a .gguf file or a hub id",
    "dataset": "a .jsonl/.json/.csv/.parquet file or a hub id; null: the bundled demo",
    "text_field": "the column holding the training text",
    "chat_template": "render conversations with this template (chatml, llama-3, ...)",
    "gradient_checkpointing": "auto (default: keep what fits in GPU memory, offload the rest), true, false, or "
                              "slothbook (offload every layer's activations to CPU memory)",
    "dtype": "bf16, fp16 or fp32; null: the best the device supports",
    "output": "run folder; null: outputs/run-<time>",
    "save_steps": "checkpoint every N steps (0: none)",
    "model_var": "variable that receives the trained model",
    "tokenizer_var": "variable that receives its tokenizer",
    "result_var": "variable that receives the FinetuneResult (losses, adapter_dir, trainer)",
    "profiler_var": "variable that receives the MemoryProfiler (summary(), to_pandas(), figure())",
}


def _word(value, yaml: bool = False) -> str:
    if isinstance(value, bool):
        return ("true" if value else "false") if yaml else ("yes" if value else "no")
    return ("null" if yaml else "") if value is None else str(value)


def _option_lines(options: tuple[Option, ...]) -> list[str]:
    return [f"      {o.name + '=' + _word(o.default):<24} {o.help}" for o in options]


def _finetune_lines() -> list[str]:
    defaults = {f.name: f.default for f in dataclasses.fields(FinetuneConfig) if f.name != "extra"}
    lines = []
    for key, default in [*defaults.items(), *BINDINGS.items()]:
        note = _FINETUNE_NOTES.get(key)
        entry = f"{key}: {_word(default, yaml=True)}"
        lines.append(f"      {entry:<30} # {note}" if note else f"      {entry}")
    return lines


def usage() -> str:
    from .ui.export import METHODS

    return "\n".join([
        "slothbook in a notebook. Load with: %load_ext slothbook",
        "",
        "%slothbook gpu",
        "    The devices: name, compute capability, bf16 support, total and free memory (the CPU when there is no GPU).",
        "",
        "%slothbook estimate [key=value ...]",
        "    Predict one training step's peak memory by category, before anything loads: table, chart, and whether",
        "    it fits (with what would fit when it does not). Options:",
        *_option_lines(ESTIMATE_OPTIONS),
        "    e.g. %slothbook estimate model=smollm2-135m seq=2048 batch=4 r=16 4bit=yes offload=yes",
        "",
        "%%slothbook finetune [--gpus N]",
        "    Fine-tune with LoRA/QLoRA. --gpus N trains on N GPUs of this machine (DDP, one forked process each: run it",
        "    before anything in this kernel touches the GPU; only the adapter comes back, so no variables are bound).",
        "    The cell body is YAML: FinetuneConfig keys (defaults shown), plus the names",
        "    of the variables that receive the trained model, its tokenizer, the FinetuneResult and the profiler:",
        *_finetune_lines(),
        "    Shows the live memory profiler and a progress bar; saves the adapter under <output>/adapter.",
        "",
        f"%slothbook export METHOD [QUANTIZATION] path=DIR [key=value ...]",
        f"    Save the fine-tuned model. METHOD: {', '.join(METHODS)}; QUANTIZATION (gguf only): q8_0 (default),",
        "    f16, bf16, f32, q4_k_m, q5_k_m, q6_k, ... Options:",
        *_option_lines(EXPORT_OPTIONS),
        "    e.g. %slothbook export gguf q4_k_m path=outputs/gguf",
        "",
        "%vram [MODEL_VARIABLE]",
        "    One line of the memory in use now, by category (default variable: model).",
        "",
        "%slothbook help  (or --help, -h, %slothbook?)",
        "    This text.",
    ])


# ---- the magics -----------------------------------------------------------------------------------------------

@magics_class
class SlothbookMagics(Magics):
    def __init__(self, shell):
        super().__init__(shell)
        self.last_result = None  # the last FinetuneResult, for %vram's optimizer state

    @line_cell_magic
    def slothbook(self, line: str, cell: str | None = None):
        positional, pairs = parse_words(line)
        command = positional[0] if positional else "help"
        try:
            if cell is not None:
                if command != "finetune":
                    raise ConfigError(f"%%slothbook {command}: only `finetune` takes a cell. See %slothbook --help.")
                return self._finetune(cell, positional[1:], pairs)
            if command in ("help", "--help", "-h"):
                print(usage())
                return None
            handler = {"gpu": self._gpu, "estimate": self._estimate, "export": self._export,
                       "finetune": self._finetune_line}.get(command)
            if handler is None:
                raise ConfigError(f"Unknown command {command!r}: use gpu, estimate, finetune (as %%slothbook finetune) "
                                  "or export. See %slothbook --help.")
            return handler(positional[1:], pairs)
        except SlothbookError as exc:
            raise UsageError(f"{type(exc).__name__}: {exc}") from None

    @line_magic
    def vram(self, line: str):
        """%vram [MODEL_VARIABLE]: one line of the memory in use now, by category: weights, LoRA, gradients,
        optimizer state, other tensors and cached (on the CPU: the rest of the process). MODEL_VARIABLE names the
        model to attribute memory to (default: `model`, when it exists)."""
        from .ui.vram import memory_line

        name = line.strip() or "model"
        model = self.shell.user_ns.get(name)
        if line.strip() and model is None:
            raise UsageError(f"There is no variable {name!r}.")
        if not hasattr(model, "parameters"):
            model = None
        result = self.last_result
        optimizer = result.trainer.optimizer if result is not None and result.model is model else None
        print(memory_line(model, optimizer))

    # ---- commands ---------------------------------------------------------------------------------------------

    def _gpu(self, positional, pairs):
        from IPython.display import display

        from .ui.devices import device_table

        if positional or pairs:
            raise ConfigError("%slothbook gpu takes no arguments.")
        display(device_table())

    def _estimate(self, positional, pairs):
        from .ui.estimate import plan, resolve_target, show_estimate

        if positional:
            raise ConfigError(f"%slothbook estimate takes key=value options only, not {' '.join(positional)!r}.")
        o = parse_options("estimate", pairs, ESTIMATE_OPTIONS)
        if o["gpu"] is not None and o["device"] is not None:
            raise ConfigError("Give gpu=GiB (a GPU you plan for) or device=NAME (one of this machine's), not both.")
        target = resolve_target(o["device"], o["gpu"], o["dtype"])
        est = plan(o["model"], o["seq"], o["batch"], o["r"], o["4bit"], o["offload"], target, o["optimizer"])
        show_estimate(est, target, o["model"])

    def _finetune_line(self, positional, pairs):
        raise ConfigError("finetune reads its configuration from the cell: start the cell with %%slothbook finetune "
                          "and put `key: value` lines under it (e.g. steps: 60).")

    def _finetune(self, cell, positional, pairs):
        gpus = parse_gpus(positional, pairs)
        cfg, names = parse_finetune_cell(cell)
        if gpus > 1:
            return self._finetune_on_gpus(cfg, gpus)
        from .ui.run import notebook_finetune

        result, profiler = notebook_finetune(cfg)
        self.last_result = result
        values = {"model_var": result.model, "tokenizer_var": result.tokenizer, "result_var": result,
                  "profiler_var": profiler}
        bound = {names[key]: value for key, value in values.items() if names[key]}
        self.shell.user_ns.update(bound)
        if bound:
            print(f"bound: {', '.join(bound)}")

    def _finetune_on_gpus(self, cfg, gpus: int):
        """One process per GPU (DDP), forked from this kernel; the adapter is what comes back."""
        from .train.distributed import launch

        cfg.output = str(cfg.output_dir())  # fixed here, so every rank writes to the same run folder
        launch(finetune_rank, cfg, num_gpus=gpus, dtype=cfg.dtype)
        print(f"adapter saved to {cfg.output_dir() / 'adapter'}; load it with "
              f"FastLanguageModel.from_pretrained({str(cfg.output_dir() / 'adapter')!r})")

    def _export(self, positional, pairs):
        from IPython.display import display

        from .ui.export import METHODS, export_model
        from .ui.feedback import Message

        if not positional or len(positional) > 2:
            raise ConfigError(f"%slothbook export needs METHOD [QUANTIZATION] (METHOD: {', '.join(METHODS)}), "
                              "e.g. %slothbook export gguf q4_k_m path=outputs/gguf.")
        o = parse_options("export", pairs, EXPORT_OPTIONS)
        if not o["path"]:
            raise ConfigError("%slothbook export needs path=FOLDER, where the export is written.")
        model = self.shell.user_ns.get(o["model"])
        if model is None:
            raise ConfigError(f"There is no variable {o['model']!r} holding a model: fine-tune first, or pass "
                              "model=NAME.")
        tokenizer = self.shell.user_ns.get(o["tokenizer"])
        method, quantization = positional[0], (positional[1] if len(positional) > 1 else None)
        result = export_model(model, tokenizer, method, o["path"], quantization, o["overwrite"])
        display(Message(f"exported {result}", "ok"))


SlothbookMagics.slothbook.__doc__ = usage()


def finetune_rank(cfg: FinetuneConfig) -> None:
    """One process of `%%slothbook finetune --gpus N`: the run, profiled; rank 0 prints the summary with every
    rank's peak."""
    from .profiler import MemoryProfiler, gather_peaks, peaks_line
    from .train.distributed import is_main_process
    from .train.job import run_finetune

    profiler = MemoryProfiler(live=False)
    with profiler.oom_guard():
        result = run_finetune(cfg, callbacks=[profiler.callback()])
    peaks = gather_peaks(profiler)  # every rank takes part
    if is_main_process():
        print(profiler.summary())
        print(peaks_line(peaks))
        if result.losses:
            print(f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f} in {result.seconds:.1f} s")


def load_ipython_extension(ipython) -> None:
    ipython.register_magics(SlothbookMagics)
