"""The exceptions slothbook raises. Every message says what went wrong and what to do about it."""


class SlothbookError(Exception):
    """Base class of every error slothbook raises on purpose."""


class ModelNotFoundError(SlothbookError, FileNotFoundError):
    """A model path, file or hub id could not be found or reached."""


class UnsupportedArchitectureError(SlothbookError, ValueError):
    """The model's architecture is not one slothbook supports."""


class ConfigError(SlothbookError, ValueError):
    """An argument or configuration value is invalid."""


class DeviceError(SlothbookError, RuntimeError):
    """The hardware cannot do what was asked (bf16 without support, no GPU, too little memory)."""


class DatasetError(SlothbookError, ValueError):
    """A dataset is missing, unreadable, empty, or lacks the needed fields."""


class ExportError(SlothbookError, RuntimeError):
    """An export could not be written or verified."""


class TrainingError(SlothbookError, RuntimeError):
    """Training stopped on a fault (non-finite loss, out of memory, interruption)."""


class CorruptFileError(SlothbookError, ValueError):
    """A weights, adapter or GGUF file is truncated or corrupted."""
