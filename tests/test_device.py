"""slothbook.device.host_memory_available: the OS's available memory, capped by the container's cgroup limit."""

from __future__ import annotations

import psutil

from slothbook.device import host_memory_available

GIB = 2**30


def test_this_machine_has_some_memory_available_and_no_more_than_it_has():
    assert 0 < host_memory_available() <= psutil.virtual_memory().total


def test_a_cgroup_v2_limit_caps_what_is_available(tmp_path):
    (tmp_path / "memory.max").write_text(f"{GIB}\n")
    (tmp_path / "memory.current").write_text(f"{GIB // 4}\n")
    assert host_memory_available(str(tmp_path)) == min(GIB - GIB // 4, psutil.virtual_memory().available)
    (tmp_path / "memory.current").write_text(f"{2 * GIB}\n")  # over the limit (page cache counted): nothing left
    assert host_memory_available(str(tmp_path)) == 0


def test_no_limit_leaves_the_os_figure(tmp_path):
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text("12345\n")
    assert abs(host_memory_available(str(tmp_path)) - psutil.virtual_memory().available) < GIB
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{2**63 - 4096}\n")  # v1's "unlimited"
    (v1 / "memory" / "memory.usage_in_bytes").write_text("12345\n")
    assert abs(host_memory_available(str(v1)) - psutil.virtual_memory().available) < GIB
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{GIB}\n")
    assert host_memory_available(str(v1)) == min(GIB - 12345, psutil.virtual_memory().available)
