"""A whole fine-tune as one configuration: load, add LoRA, read the data, train, save the adapter.

The CLI, the magics and the Studio all describe a run with `FinetuneConfig` and call `run_finetune`, passing
their own callbacks (the profiler among them): this layer does not know who watches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_dir
from ..errors import ConfigError, DatasetError, TrainingError
from .checkpoints import latest_checkpoint, remove_partials
from .config import FinetuneConfig
from .distributed import check_distributed, gathered_state_dict, is_main_process, wait_for_everyone
from .guard import NonFiniteGuard
from .interrupt import GracefulStop
from .sft import TrainArgs, build_trainer


@dataclass
class FinetuneResult:
    model: object
    tokenizer: object
    trainer: object
    adapter_dir: Path
    losses: list[float]
    seconds: float
    stopped: str | None = None  # why training ended early ("Ctrl-C", "SIGTERM", "requested"); None: it finished
    checkpoint_dir: Path | None = None  # the checkpoint to resume from when it was stopped


def load_training_dataset(cfg: FinetuneConfig, tokenizer):
    """The dataset as SFTTrainer wants it, and the tokenizer (with the chosen chat template applied).

    A file with `cfg.text_field` trains on that text as is. Anything else (Alpaca, ShareGPT, OpenAI messages,
    prompt/completion) is converted to conversations that the chat template renders.
    """
    from ..data import demo_dataset_path, detect_shape, get_chat_template, load_dataset_file, standardize

    ds = load_dataset_file(cfg.dataset or str(demo_dataset_path()))
    if cfg.chat_template:
        tokenizer = get_chat_template(tokenizer, cfg.chat_template)
    if cfg.text_field in ds.column_names and not (cfg.chat_template or cfg.responses_only):
        from ..data import check_lengths

        check_lengths(ds, tokenizer, cfg.max_seq_length, cfg.text_field)  # warns once: over-long rows get cut
        return ds, tokenizer
    try:
        shape = detect_shape(ds)
    except DatasetError as exc:
        raise DatasetError(f"{exc} The text field '{cfg.text_field}' is not among them either: pass --text-field "
                           "with the column that holds the training text.") from exc
    if is_main_process():
        print(f"dataset: {len(ds)} rows in the {shape} shape")
    ds = standardize(ds)
    if "messages" not in ds.column_names and cfg.text_field != "text":
        ds = ds.rename_column("text", cfg.text_field)
    return ds, tokenizer


def run_finetune(cfg: FinetuneConfig, callbacks=(), model=None, tokenizer=None,
                 progress_bar: bool = True) -> FinetuneResult:
    """Train LoRA adapters as `cfg` says and save them (atomically) under the output folder.

    Ctrl-C, SIGTERM or `GracefulStop.request()` (pass your own GracefulStop in `callbacks` to hold it) end training
    after the current step with a checkpoint under <output>/checkpoints and the adapter saved; `cfg.resume`
    continues from a checkpoint. NaN/inf steps are skipped; `cfg.max_bad_steps` of them in a row raise a
    TrainingError after the last good adapter is saved. `progress_bar=False` leaves out Trainer's own bar, for
    callers that show progress themselves (in a kernel it is transformers' notebook bar, which fails in its
    on_train_end when training stops at its second step).
    """
    from ..fast import FastLanguageModel

    check_distributed(cfg.dtype)
    out = cfg.output_dir()
    checkpoint = _resume_from(cfg, out)
    if checkpoint is None:
        _check_output(cfg.adapter_path(out), cfg.overwrite)  # resuming replaces the adapter this run saved when it was stopped
    if model is None:
        model, tokenizer = FastLanguageModel.from_pretrained(
            cfg.model, max_seq_length=cfg.max_seq_length, dtype=cfg.dtype, load_in_4bit=cfg.load_in_4bit)
        model = FastLanguageModel.get_peft_model(
            model, r=cfg.r, lora_alpha=cfg.lora_alpha, random_state=cfg.seed,
            use_gradient_checkpointing=cfg.gradient_checkpointing)
    dataset, tokenizer = load_training_dataset(cfg, tokenizer)
    args = TrainArgs(
        output_dir=str(cfg.checkpoints_path(out)), max_steps=cfg.steps, learning_rate=cfg.lr,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        max_seq_length=cfg.max_seq_length, text_field=cfg.text_field, logging_steps=cfg.logging_steps,
        seed=cfg.seed, save_steps=cfg.save_steps, warmup_steps=min(5, cfg.steps // 10),
        disable_tqdm=not progress_bar,
    )
    stop = next((c for c in callbacks if isinstance(c, GracefulStop)), None) or GracefulStop()
    guard = NonFiniteGuard(cfg.max_bad_steps)
    others = [c for c in callbacks if c is not stop]
    trainer = build_trainer(model, tokenizer, dataset, args, callbacks=[stop, guard, *others])
    if cfg.responses_only:
        from ..data import train_on_responses_only

        train_on_responses_only(trainer, tokenizer)
    remove_partials(args.output_dir)
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        stop.restore_signals()  # train() raised before on_train_end could
    seconds = time.perf_counter() - start
    adapter_dir = cfg.adapter_path(out)
    state = gathered_state_dict(trainer)  # FSDP: every rank takes part in assembling the shards
    save_adapter(model, tokenizer, adapter_dir, overwrite=cfg.overwrite or checkpoint is not None, state_dict=state)
    if guard.error is not None:
        raise TrainingError(f"{guard.error} The adapter of the last good step is saved in {adapter_dir}.")
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    result = FinetuneResult(model, tokenizer, trainer, adapter_dir, losses, seconds)
    if stop.requested and trainer.state.global_step < trainer.state.max_steps:
        result.stopped = stop.reason
        result.checkpoint_dir = Path(args.output_dir) / f"checkpoint-{trainer.state.global_step}"
    return result


def _resume_from(cfg: FinetuneConfig, out: Path) -> Path | None:
    if cfg.resume is False or cfg.resume is None:
        return None
    if cfg.resume is True:
        if cfg.output is None:
            raise ConfigError("resume=True continues the run in an output folder: pass output= (--output) of the run.")
        return latest_checkpoint(cfg.checkpoints_path(out))
    path = Path(cfg.resume).expanduser()
    if not path.exists():
        raise ConfigError(f"resume={cfg.resume!r}: no such checkpoint folder. Pass resume=True for the latest one "
                          f"under {cfg.checkpoints_path(out)}.")
    return latest_checkpoint(path)


def _check_output(adapter: Path, overwrite: bool) -> None:
    if adapter.exists() and any(adapter.iterdir()) and not overwrite:
        raise ConfigError(f"{adapter} already holds an adapter. Choose another --output, or pass --overwrite to replace it.")


def save_adapter(model, tokenizer, path: Path, overwrite: bool = False, state_dict=None) -> Path:
    """Write the PEFT adapter and tokenizer to a temporary folder, then rename it into place.

    Under torch.distributed only rank 0 writes; every rank waits until the adapter is in place."""
    path = Path(path)
    if path.exists() and not overwrite and any(path.iterdir()):
        raise ConfigError(f"{path} already exists; pass overwrite=True to replace it.")
    if is_main_process():
        with atomic_dir(path) as tmp:
            model.save_pretrained(tmp, state_dict=state_dict)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    wait_for_everyone()
    return path
