"""The device table of `%slothbook gpu` and the Studio's device choices."""

from __future__ import annotations

from slothbook.device import DeviceInfo
from slothbook.ui.devices import device_choices, device_table

GPUS = [DeviceInfo(0, "NVIDIA H100", "9.0", True, 80 * 2**30, 70 * 2**30),
        DeviceInfo(1, "Tesla T4", "7.5", False, 15 * 2**30, 14.5 * 2**30)]


def test_table_rows_per_device():
    table = device_table(GPUS)
    assert list(table.index) == ["cuda:0", "cuda:1"]
    assert table.loc["cuda:1"].to_dict() == {"name": "Tesla T4", "compute capability": "7.5", "bf16": "no",
                                             "total GiB": 15.0, "free GiB": 14.5}


def test_choices_label_free_memory():
    assert device_choices(GPUS) == [("cuda:0 NVIDIA H100 (70.0 GiB free)", "cuda:0"),
                                    ("cuda:1 Tesla T4 (14.5 GiB free)", "cuda:1")]
    assert device_choices()[0][1] in ("cpu", "cuda:0")  # this machine
