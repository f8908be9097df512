"""Streaming: the merged and GGUF exports of the 135M model never hold the whole merged model in host memory.

Peak resident memory is sampled by a background thread (torch's CPU allocations bypass tracemalloc). The bound:
the extra memory during export stays below half the size of the merged weights. An export that built the full
merged state dict would need at least their whole size. `pytest -s` prints the measured numbers (docs/export.md).
"""

from __future__ import annotations

import gc
import threading
import time

import psutil
import pytest


class PeakRSS:
    """Peak resident set size above the level at entry, sampled every millisecond."""

    def __enter__(self):
        gc.collect()
        self._proc = psutil.Process()
        self.base = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def merged_size_mib(model) -> float:
    from slothbook.export.tensors import merged_tensors

    return sum(t.numel * 4 for t in merged_tensors(model)) / 2**20  # fp32 on the CPU


@pytest.mark.parametrize("shard", ["50MB", "200MB"])
def test_merged_16bit_export_streams(finetuned, tmp_path, shard):
    from slothbook.export import save_pretrained_merged

    size = merged_size_mib(finetuned.model)
    with PeakRSS() as rss:
        save_pretrained_merged(finetuned.model, tmp_path / "m", finetuned.tokenizer, max_shard_size=shard)
    print(f"\nmerged_16bit (fp32, shards {shard}): model {size:.0f} MiB, peak extra host memory {rss.extra_mib:.0f} MiB")
    assert rss.extra_mib < 0.5 * size


def test_gguf_f16_export_streams(finetuned, tmp_path):
    from slothbook.export import save_pretrained_gguf

    size = merged_size_mib(finetuned.model)
    with PeakRSS() as rss:
        save_pretrained_gguf(finetuned.model, tmp_path / "g", finetuned.tokenizer, "f16")
    print(f"\nGGUF f16: model {size:.0f} MiB (fp32), peak extra host memory {rss.extra_mib:.0f} MiB")
    assert rss.extra_mib < 0.5 * size
