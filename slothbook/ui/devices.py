"""The devices as a table (`%slothbook gpu`) and as choices (the Studio's device chooser)."""

from __future__ import annotations

from ..device import DeviceInfo, list_devices

GIB = 2**30


def device_id(dev: DeviceInfo) -> str:
    return "cpu" if dev.index is None else f"cuda:{dev.index}"


def device_table(devices: list[DeviceInfo] | None = None):
    """A DataFrame: one row per CUDA device (or the CPU alone), with bf16 support and memory in GiB."""
    import pandas as pd

    rows = [{
        "device": device_id(dev),
        "name": dev.name,
        "compute capability": dev.capability,
        "bf16": "yes" if dev.bf16 else "no",
        "total GiB": round(dev.total_bytes / GIB, 1),
        "free GiB": round(dev.free_bytes / GIB, 1),
    } for dev in (devices if devices is not None else list_devices())]
    return pd.DataFrame(rows).set_index("device")


def device_choices(devices: list[DeviceInfo] | None = None) -> list[tuple[str, str]]:
    """(label, device id) pairs such as ("cuda:0 NVIDIA H100 (78.1 GiB free)", "cuda:0")."""
    out = []
    for dev in devices if devices is not None else list_devices():
        name = dev.name if dev.index is None else f"{device_id(dev)} {dev.name}"
        out.append((f"{name} ({dev.free_bytes / GIB:.1f} GiB free)", device_id(dev)))
    return out


def free_bytes(device: str) -> int:
    """Free memory of one device id ("cpu", "cuda:N"); the CPU's is the machine's available memory."""
    for dev in list_devices():
        if device_id(dev) == device:
            return dev.free_bytes
    from ..errors import DeviceError

    raise DeviceError(f"There is no device '{device}' here. Available: "
                      f"{', '.join(device_id(d) for d in list_devices())}.")
