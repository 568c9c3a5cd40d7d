"""`benchmarks.cgroup`: a real cgroup v1 memory limit OOM-kills a child above it and reports one below it.

Skipped, with the reason, where there is no v1 memory controller or no root.
"""

from __future__ import annotations

import os
import sys

import pytest

from benchmarks.cgroup import MemoryCgroup, run_capped, unavailable_reason
from benchmarks.ssd_offload import parse_bytes

MiB = 1 << 20
CAP = 64 * MiB
_REASON = unavailable_reason()
needs_cgroup = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

# touch every page so the allocation is really charged (a bare bytearray could stay lazily zero-mapped)
_ALLOC = "import sys; n = int(sys.argv[1]) << 20; b = bytearray(n); b[::4096] = b'x' * len(b[::4096]); print('done')"


@needs_cgroup
def test_child_above_the_cap_is_oom_killed_and_the_group_removed() -> None:
    result = run_capped([sys.executable, "-c", _ALLOC, "256"], limit_bytes=CAP)
    assert result.oom_killed
    assert result.returncode == -9
    assert "done" not in result.output_tail
    assert result.max_usage_bytes is not None and result.max_usage_bytes <= CAP
    assert not os.path.exists(result.cgroup)


@needs_cgroup
def test_child_below_the_cap_reports_its_peak() -> None:
    alloc = 24 * MiB
    result = run_capped([sys.executable, "-c", _ALLOC, str(alloc // MiB)], limit_bytes=CAP)
    assert result.returncode == 0 and not result.oom_killed
    assert result.output_tail[-1] == "done"
    assert result.max_usage_bytes is not None
    assert alloc <= result.max_usage_bytes <= CAP
    assert not os.path.exists(result.cgroup)


@needs_cgroup
def test_close_kills_what_is_left_and_removes_the_group() -> None:
    import subprocess

    group = MemoryCgroup(CAP)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        group.add(proc.pid)
        assert group.pids() == [proc.pid]
    finally:
        group.close()
    assert proc.wait(timeout=10) == -9
    assert not os.path.exists(group.path)


def test_parse_bytes() -> None:
    assert parse_bytes("2GiB") == 2 << 30
    assert parse_bytes("512MiB") == 512 * MiB
    assert parse_bytes("1.5G") == 3 << 29
    assert parse_bytes("4096") == 4096
