"""Host time of the CUDA calls the memory profiler makes, while the GPU is far behind (a sleep kernel queued).

Each call is timed five times, each time after ~100 ms of GPU work was queued, so a call that waits for the
device shows it. On an H200 (2026-12-03) the medians were 0.05-0.27 ms, none waiting for the device (one of five
copies into a pinned slot took 6.8 ms): `memory_stats_as_nested_dict` 0.16 ms, `memory_allocated` 0.27 ms (it
builds and flattens the whole statistics dict), which is why a sample reads the statistics once instead of once
per figure (docs/profiler.md).

  python3 benchmarks/profiler_calls.py
"""

import time

import torch


def main() -> None:
    dev = torch.device("cuda")
    loss = torch.randn((), device=dev)
    pinned = torch.empty(64, dtype=torch.float32, pin_memory=True)
    slots = torch.empty(64, device=dev)
    side = torch.cuda.Stream()
    out = (torch.randn(4, device=dev, requires_grad=True) * 2).sum()
    calls = {
        "nothing": lambda: None,
        "memory_stats_as_nested_dict": lambda: torch.cuda.memory_stats_as_nested_dict(dev),
        "memory_allocated": lambda: torch.cuda.memory_allocated(dev),
        "reset_peak_memory_stats": lambda: torch.cuda.reset_peak_memory_stats(dev),
        "mem_get_info": lambda: torch.cuda.mem_get_info(dev),
        "event_record": lambda: torch.cuda.Event().record(),
        "d2h_pinned_slot_nonblocking": lambda: pinned[3].copy_(loss, non_blocking=True),
        "d2h_fresh_pinned_nonblocking": lambda: torch.empty((), pin_memory=True).copy_(loss, non_blocking=True),
        "d2d_slot": lambda: slots[3].copy_(loss),
        "register_hook": lambda: out.register_hook(lambda g: None),
        "side_stream_d2h": lambda: (side.wait_stream(side), pinned[5].copy_(slots[5], non_blocking=True)),
    }
    for name, fn in calls.items():
        times = []
        for _ in range(5):
            torch.cuda.synchronize()
            torch.cuda._sleep(int(2e8))  # about 100 ms of GPU time queued ahead of the call
            time.sleep(0.001)
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000)
        torch.cuda.synchronize()
        print(f"{name:32s} median {sorted(times)[2]:8.3f} ms  max {max(times):8.3f} ms")


if __name__ == "__main__":
    main()
