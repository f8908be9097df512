"""Memory by category during training (a callback / context manager the caller plugs in) and its estimator.

    prof = MemoryProfiler(model, optimizer)       # or trainer.add_callback(MemoryProfiler().callback())
    estimate("smollm2-135m", seq_len=2048, batch_size=4).total
    max_fit(config, gpu_memory_bytes=24 * 2**30)
"""

from .estimator import Estimate, Fit, estimate, max_fit
from .oom import TrainingOutOfMemoryError, translate_oom
from .profiler import MemoryProfiler
from .ranks import gather_peaks, peaks_line
from .samples import CATEGORIES, Sample

__all__ = [
    "CATEGORIES",
    "Estimate",
    "Fit",
    "MemoryProfiler",
    "Sample",
    "TrainingOutOfMemoryError",
    "estimate",
    "gather_peaks",
    "max_fit",
    "peaks_line",
    "translate_oom",
]

