"""slothbook: fast, memory-lean LoRA and QLoRA fine-tuning, made for notebooks."""

__version__ = "0.1.0"

from .errors import SlothbookError  # noqa: E402
from .fast import FastLanguageModel  # noqa: E402


def estimate(*args, **kwargs):
    """Predicted peak memory by category: see `slothbook.profiler.estimate`."""
    from .profiler import estimate as _estimate  # imported on use: the profiler pulls in pandas

    return _estimate(*args, **kwargs)


def launch(train_fn, *args, num_gpus: int, **kwargs):
    """Run `train_fn` in one process per GPU from a notebook: see `slothbook.train.distributed.launch`."""
    from .train.distributed import launch as _launch  # imported on use: it pulls in accelerate

    return _launch(train_fn, *args, num_gpus=num_gpus, **kwargs)


__all__ = ["FastLanguageModel", "SlothbookError", "__version__", "estimate", "launch"]


def load_ipython_extension(ipython):  # `%load_ext slothbook`
    from .magics import load_ipython_extension as _load

    _load(ipython)
