"""NUMA discovery and binding (the CXL tier's machinery), exercised on node 0 with both backends."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest

from offload.tiers import CxlTier, TierCapacityError, TierUnavailableError, TierValueError, make_tier
from offload.tiers.numa import (
    MPOL_BIND,
    NumaBuffer,
    cpuless_memory_nodes,
    libnuma_available,
    memory_policy,
    node_of_address,
    numa_nodes,
    syscalls_available,
)


def _fake_node(root: Path, node: int, cpulist: str, mem_kb: int) -> None:
    d = root / f"node{node}"
    d.mkdir(parents=True)
    (d / "cpulist").write_text(cpulist + "\n")
    (d / "meminfo").write_text(
        f"Node {node} MemTotal:       {mem_kb} kB\nNode {node} MemFree:        {mem_kb // 2} kB\n"
    )


def test_cpuless_node_is_detected_as_cxl(tmp_path: Path) -> None:
    _fake_node(tmp_path, 0, "0-3,8", 1000)
    _fake_node(tmp_path, 1, "", 2000)  # memory, no CPUs: a CXL expander
    _fake_node(tmp_path, 2, "", 0)  # neither: not a memory node
    nodes = numa_nodes(tmp_path)
    assert [n.node_id for n in nodes] == [0, 1, 2]
    assert nodes[0].cpus == (0, 1, 2, 3, 8) and nodes[0].mem_total_bytes == 1000 * 1024
    assert nodes[1].mem_free_bytes == 1000 * 1024
    assert [n.node_id for n in cpuless_memory_nodes(tmp_path)] == [1]


def test_this_machine_has_node_zero() -> None:
    nodes = numa_nodes()
    assert nodes and nodes[0].node_id == 0 and nodes[0].mem_total_bytes > 0


def test_cxl_tier_reports_absence_consistently() -> None:
    if cpuless_memory_nodes():
        pytest.skip("this machine has a CPU-less NUMA node")
    ok, why = CxlTier.availability()
    assert not ok and "CPU-less" in why
    with pytest.raises(TierUnavailableError, match="CPU-less"):
        make_tier("cxl", capacity_bytes=1 << 20)


@pytest.mark.parametrize("backend", ["syscall", "libnuma"])
def test_buffer_pages_live_on_the_bound_node(backend: str) -> None:
    ok, why = syscalls_available() if backend == "syscall" else libnuma_available()
    if not ok:
        pytest.skip(why)
    nbytes = 4 << 20
    buf = NumaBuffer(nbytes, node=0, backend=backend)  # type: ignore[arg-type]
    try:
        assert buf.tensor is not None and buf.tensor.numel() == nbytes
        for page in range(0, nbytes, 97 * mmap.PAGESIZE):
            assert node_of_address(buf.address + page) == 0
        mode, nodes = memory_policy(buf.address)
        assert mode == MPOL_BIND and nodes == (0,)
    finally:
        buf.close()


def test_binding_errors_are_typed() -> None:
    existing = {n.node_id for n in numa_nodes()}
    missing = max(existing) + 1
    with pytest.raises(TierValueError, match="node"):
        NumaBuffer(1 << 20, node=missing)
    free = numa_nodes()[0].mem_free_bytes
    with pytest.raises(TierCapacityError, match="free memory of NUMA node 0"):
        NumaBuffer(free + (1 << 30), node=0)
    with pytest.raises(TierValueError, match="numa_backend"):
        CxlTier(capacity_bytes=1 << 20, node=0, numa_backend="magic")  # type: ignore[arg-type]
