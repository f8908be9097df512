"""Glue to TRL's SFTTrainer: the arguments a LoRA fine-tune needs, chosen for the model's dtype and device."""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from ..device import world_size
from ..errors import ConfigError


@dataclass
class TrainArgs:
    output_dir: str
    max_steps: int = 60
    learning_rate: float = 2e-4
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_seq_length: int = 2048
    text_field: str = "text"
    logging_steps: int = 5
    warmup_steps: int = 5
    lr_scheduler_type: str = "linear"
    weight_decay: float = 0.0
    optim: str = "adamw_torch_fused"  # fused: NonFiniteGuard skips a bad step inside the kernel, without a sync
    seed: int = 3407
    save_steps: int = 0  # 0: no intermediate checkpoints
    save_total_limit: int | None = None  # keep this many newest checkpoints (None: all)
    packing: bool = False
    disable_tqdm: bool = False

    def validate(self) -> None:
        if self.max_steps <= 0:
            raise ConfigError(f"steps must be positive, got {self.max_steps}.")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning rate must be positive, got {self.learning_rate}.")
        if self.per_device_train_batch_size <= 0:
            raise ConfigError(f"batch size must be positive, got {self.per_device_train_batch_size}.")
        if self.max_seq_length <= 0:
            raise ConfigError(f"max_seq_length must be positive, got {self.max_seq_length}.")


def sft_config(args: TrainArgs, model_dtype: torch.dtype):
    from trl import SFTConfig

    args.validate()
    on_gpu = torch.cuda.is_available()
    return SFTConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_length=args.max_seq_length,
        dataset_text_field=args.text_field,
        packing=args.packing,
        logging_steps=args.logging_steps,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type=args.lr_scheduler_type,
        weight_decay=args.weight_decay,
        optim=args.optim,
        seed=args.seed,
        data_seed=args.seed,
        bf16=on_gpu and model_dtype == torch.bfloat16,
        fp16=on_gpu and model_dtype == torch.float16,  # fp16 needs loss scaling, which Trainer's GradScaler does
        use_cpu=not on_gpu,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        save_total_limit=args.save_total_limit,
        logging_nan_inf_filter=False,  # its per-step isnan() is a host sync; NonFiniteGuard watches on the device
        report_to="none",
        dataloader_num_workers=0,
        dataset_num_proc=1,
        # LoRA under DDP uses every trainable parameter each step: skip DDP's per-step search for unused ones.
        ddp_find_unused_parameters=False if world_size() > 1 else None,
        disable_tqdm=args.disable_tqdm,
        **_trainer_leaves_checkpointing_alone(SFTConfig),
    )


def _trainer_leaves_checkpointing_alone(config_cls) -> dict:
    """The model's checkpointing is what get_peft_model(use_gradient_checkpointing=...) set; TRL defaults the
    Trainer's flag to True, which would switch transformers' checkpointing on over it (and over an explicit False).
    transformers >= 5.25 renamed the field (the old name warns); the GPU image's 5.17 knows only the old one."""
    names = {f.name for f in fields(config_cls)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": False}


def build_trainer(model, tokenizer, dataset, args: TrainArgs, callbacks=()):
    """An SFTTrainer over a model and tokenizer as returned by FastLanguageModel."""
    from transformers.trainer_callback import PrinterCallback

    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point() and not p.requires_grad)
    adapter_dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    trainer = trainer_class()(
        model=model,
        args=sft_config(args, dtype),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[LossPrinter(), *callbacks],
    )
    _restore_dtypes(model, adapter_dtypes)
    # Our LossPrinter replaces the raw dict lines that Trainer's printers write.
    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(_BarWithoutLogs)
    return trainer


@functools.cache
def trainer_class():
    """TRL's SFTTrainer whose checkpoints are written atomically (checkpoints.py) and whose loss log survives a
    NaN step (guard.py)."""
    from trl import SFTTrainer

    from .checkpoints import AtomicCheckpoints
    from .guard import NonFiniteLossLog

    return type("SlothbookTrainer", (AtomicCheckpoints, NonFiniteLossLog, SFTTrainer), {"__module__": __name__})


def _restore_dtypes(model, dtypes: dict) -> None:
    """TRL casts the adapters of a quantized model to bf16; keep the fp32 adapters PEFT made instead, so Adam's small
    updates are not rounded away, the saved adapter reloads to the very model that trained, and CPUs stay in fp32."""
    for name, p in model.named_parameters():
        if name in dtypes and p.dtype != dtypes[name]:
            p.data = p.data.to(dtypes[name])


class _BarWithoutLogs(ProgressCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


class LossPrinter(TrainerCallback):
    """One line per logging step: step, loss, learning rate."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and state.is_world_process_zero:
            lr = logs.get("learning_rate", 0.0)
            print(f"step {state.global_step:>5} | loss {logs['loss']:.4f} | lr {lr:.2e}", flush=True)
