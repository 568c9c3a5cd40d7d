"""NUMA discovery and memory binding, through ctypes: the raw ``mbind``/``get_mempolicy`` system calls on libc
(nothing to install) or libnuma (``libnuma.so.1``, Debian package ``libnuma1``) when present.

A CXL Type-3 memory expander appears to Linux as a NUMA node with memory and no CPUs (Linux kernel
documentation, "Compute Express Link: Linux Conventions"; the CXL fine-tuning study, "Analysis and Optimized
CXL-Attached Memory Allocation for Long-Context LLM Fine-Tuning", 2025, binds its buffers the same way).
Binding a buffer to such a node with ``MPOL_BIND`` places every page of it there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import mmap
import os
import platform
from pathlib import Path
from typing import Literal

import torch

from offload.tiers.errors import TierCapacityError, TierUnavailableError, TierValueError

__all__ = [
    "MPOL_BIND",
    "NumaBuffer",
    "advise_huge_pages",
    "NumaNode",
    "cpuless_memory_nodes",
    "libnuma_available",
    "mbind",
    "memory_policy",
    "node_of_address",
    "numa_nodes",
    "syscalls_available",
]

SYSFS_NODES = Path("/sys/devices/system/node")

# <linux/mempolicy.h>
MPOL_DEFAULT = 0
MPOL_PREFERRED = 1
MPOL_BIND = 2
MPOL_MF_STRICT = 1 << 0  # fail if existing pages do not follow the policy
MPOL_MF_MOVE = 1 << 1  # move existing pages of this process to conform
MPOL_F_NODE = 1 << 0
MPOL_F_ADDR = 1 << 1

# System call numbers: arch/x86/entry/syscalls/syscall_64.tbl and include/uapi/asm-generic/unistd.h (arm64,
# riscv64).
_SYSCALLS = {
    "x86_64": {"mbind": 237, "get_mempolicy": 239},
    "aarch64": {"mbind": 235, "get_mempolicy": 236},
    "riscv64": {"mbind": 235, "get_mempolicy": 236},
}
_MASK_BITS = 1024  # node mask size passed to the kernel (kernel CONFIG_NODES_SHIFT <= 10)
_ULONG_BITS = ctypes.sizeof(ctypes.c_ulong) * 8
_PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


@dataclasses.dataclass(frozen=True, kw_only=True)
class NumaNode:
    """One NUMA node as sysfs describes it."""

    node_id: int
    cpus: tuple[int, ...]
    mem_total_bytes: int
    mem_free_bytes: int

    @property
    def is_cpuless(self) -> bool:
        """A memory-only node: how a CXL memory expander appears."""
        return not self.cpus and self.mem_total_bytes > 0


def _parse_cpulist(text: str) -> tuple[int, ...]:
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(cpus)


def _parse_meminfo(text: str) -> dict[str, int]:
    # lines look like "Node 0 MemTotal:       24576000 kB"
    out: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2].endswith(":"):
            out[fields[2][:-1]] = int(fields[3]) * (1024 if fields[-1] == "kB" else 1)
    return out


def numa_nodes(sysfs: Path = SYSFS_NODES) -> tuple[NumaNode, ...]:
    """The online NUMA nodes (empty if sysfs has no NUMA information)."""
    nodes: list[NumaNode] = []
    if not sysfs.is_dir():
        return ()
    for entry in sorted(sysfs.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        try:
            cpus = _parse_cpulist((entry / "cpulist").read_text())
            meminfo = _parse_meminfo((entry / "meminfo").read_text())
        except OSError:
            continue
        nodes.append(
            NumaNode(
                node_id=int(entry.name[4:]),
                cpus=cpus,
                mem_total_bytes=meminfo.get("MemTotal", 0),
                mem_free_bytes=meminfo.get("MemFree", 0),
            )
        )
    return tuple(nodes)


def cpuless_memory_nodes(sysfs: Path = SYSFS_NODES) -> tuple[NumaNode, ...]:
    """Memory-only nodes: the CXL expanders of this machine (empty without any)."""
    return tuple(n for n in numa_nodes(sysfs) if n.is_cpuless)


def syscalls_available() -> tuple[bool, str]:
    """Whether the raw mbind/get_mempolicy path works here (architecture known, kernel has NUMA support)."""
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        return False, f"no mbind syscall number known for architecture {platform.machine()}"
    mode = ctypes.c_int(-1)
    if _libc.syscall(numbers["get_mempolicy"], ctypes.byref(mode), None, ctypes.c_ulong(0), None, 0) != 0:
        err = ctypes.get_errno()
        return False, f"get_mempolicy failed: {os.strerror(err)} (kernel without NUMA support?)"
    return True, ""


def _node_mask(node: int) -> ctypes.Array[ctypes.c_ulong]:
    if not 0 <= node < _MASK_BITS:
        raise TierValueError("node", f"must be in [0, {_MASK_BITS}), got {node}")
    mask = (ctypes.c_ulong * (_MASK_BITS // _ULONG_BITS))()
    mask[node // _ULONG_BITS] = 1 << (node % _ULONG_BITS)
    return mask


def advise_huge_pages(mapping: mmap.mmap) -> bool:
    """Ask Linux for transparent huge pages on ``mapping`` (madvise MADV_HUGEPAGE); whether it took.

    Call it before the first touch: the faults that populate the mapping then take 2 MiB pages where they can
    (under THP "always" or "madvise"; "never" accepts the advice and ignores it). A kernel without THP refuses
    it (EINVAL): the mapping keeps 4 KiB pages.
    """
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        return False
    return True


def mbind(addr: int, nbytes: int, node: int, *, mode: int = MPOL_BIND, move: bool = True) -> None:
    """Bind ``[addr, addr + nbytes)`` (page-aligned) to ``node``; raises ``OSError`` with the kernel's errno."""
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        raise TierUnavailableError("mbind", f"unknown architecture {platform.machine()}")
    if addr % _PAGE:
        raise TierValueError("addr", f"must be page-aligned ({_PAGE}), got {addr:#x}")
    mask = _node_mask(node)
    flags = MPOL_MF_STRICT | (MPOL_MF_MOVE if move else 0)
    # maxnode is the mask size in bits + 1: the kernel's get_nodes() drops one bit (see mbind(2), NOTES).
    ret = _libc.syscall(
        numbers["mbind"],
        ctypes.c_void_p(addr),
        ctypes.c_ulong(nbytes),
        ctypes.c_int(mode),
        mask,
        ctypes.c_ulong(_MASK_BITS + 1),
        ctypes.c_uint(flags),
    )
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mbind({addr:#x}, {nbytes}, node={node}) failed: {os.strerror(err)}")


def node_of_address(addr: int) -> int:
    """The node holding the page at ``addr`` (the page must have been touched)."""
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        raise TierUnavailableError("get_mempolicy", f"unknown architecture {platform.machine()}")
    node = ctypes.c_int(-1)
    ret = _libc.syscall(
        numbers["get_mempolicy"], ctypes.byref(node), None, ctypes.c_ulong(0), ctypes.c_void_p(addr),
        ctypes.c_ulong(MPOL_F_NODE | MPOL_F_ADDR),
    )  # fmt: skip
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"get_mempolicy(addr={addr:#x}) failed: {os.strerror(err)}")
    return node.value


def memory_policy(addr: int) -> tuple[int, tuple[int, ...]]:
    """(mode, nodes) of the policy governing the mapping that holds ``addr``."""
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        raise TierUnavailableError("get_mempolicy", f"unknown architecture {platform.machine()}")
    mode = ctypes.c_int(-1)
    mask = (ctypes.c_ulong * (_MASK_BITS // _ULONG_BITS))()
    ret = _libc.syscall(
        numbers["get_mempolicy"], ctypes.byref(mode), mask, ctypes.c_ulong(_MASK_BITS + 1),
        ctypes.c_void_p(addr), ctypes.c_ulong(MPOL_F_ADDR),
    )  # fmt: skip
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"get_mempolicy(addr={addr:#x}) failed: {os.strerror(err)}")
    nodes = tuple(i for i in range(_MASK_BITS) if mask[i // _ULONG_BITS] >> (i % _ULONG_BITS) & 1)
    return mode.value, nodes


def _load_libnuma() -> ctypes.CDLL | None:
    for name in ("libnuma.so.1", ctypes.util.find_library("numa")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError:
            continue
        lib.numa_available.restype = ctypes.c_int
        lib.numa_alloc_onnode.restype = ctypes.c_void_p
        lib.numa_alloc_onnode.argtypes = [ctypes.c_size_t, ctypes.c_int]
        lib.numa_free.restype = None
        lib.numa_free.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        if lib.numa_available() < 0:
            return None
        return lib
    return None


_LIBNUMA: ctypes.CDLL | None | bool = False  # False: not probed yet


def _libnuma() -> ctypes.CDLL | None:
    global _LIBNUMA
    if _LIBNUMA is False:
        _LIBNUMA = _load_libnuma()
    return _LIBNUMA if isinstance(_LIBNUMA, ctypes.CDLL) else None


def libnuma_available() -> tuple[bool, str]:
    if _libnuma() is None:
        return False, "libnuma.so.1 not found or numa_available() < 0 (Debian package libnuma1)"
    return True, ""


Backend = Literal["auto", "syscall", "libnuma"]


class NumaBuffer:
    """``nbytes`` of anonymous memory bound to one NUMA node, exposed as a 1-D ``uint8`` tensor.

    ``backend="syscall"`` maps anonymous memory and binds it with the raw ``mbind`` call (strict: existing pages
    are moved, and a failure raises with the kernel's errno); ``"libnuma"`` allocates with
    ``numa_alloc_onnode``; ``"auto"`` prefers the syscall. With ``prefault`` every page is touched at
    construction, so the memory is on the node from the start; the node's free memory is checked first, so a
    cap larger than the node raises ``TierCapacityError`` instead of invoking the OOM killer.
    """

    def __init__(
        self,
        nbytes: int,
        *,
        node: int,
        backend: Backend = "auto",
        prefault: bool = True,
        huge_pages: bool = False,
    ) -> None:
        if nbytes <= 0:
            raise TierValueError("capacity_bytes", f"must be > 0, got {nbytes}")
        nodes = {n.node_id: n for n in numa_nodes()}
        if node not in nodes:
            raise TierValueError("node", f"NUMA node {node} does not exist (nodes: {sorted(nodes)})")
        if nodes[node].mem_total_bytes == 0:
            raise TierValueError("node", f"NUMA node {node} has no memory")
        if prefault and nbytes > nodes[node].mem_free_bytes:
            raise TierCapacityError(
                f"numa node {node}",
                nbytes,
                0,
                nodes[node].mem_free_bytes,
                message=f"capacity_bytes({nbytes}) > free memory of NUMA node {node}({nodes[node].mem_free_bytes})",
            )
        if backend == "auto":
            backend = "syscall" if syscalls_available()[0] else "libnuma"
        self.node = node
        self.backend = backend
        self.nbytes = nbytes
        self.huge_pages = False  # advised MADV_HUGEPAGE (the syscall backend's own mapping only)
        self._mmap: mmap.mmap | None = None
        self._libnuma_ptr: int | None = None
        if backend == "syscall":
            ok, why = syscalls_available()
            if not ok:
                raise TierUnavailableError("mbind syscall", why)
            self._mmap = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            tensor = torch.frombuffer(self._mmap, dtype=torch.uint8)
            try:
                # Bind before the first touch: no page exists yet, so all of them will be allocated on `node`.
                mbind(tensor.data_ptr(), nbytes, node)
                # also before the first touch: the pages (on `node`) are 2 MiB ones where they can be
                self.huge_pages = huge_pages and advise_huge_pages(self._mmap)
            except BaseException:
                del tensor
                self._mmap.close()
                raise
        elif backend == "libnuma":
            lib = _libnuma()
            if lib is None:
                raise TierUnavailableError("libnuma", libnuma_available()[1])
            ptr = lib.numa_alloc_onnode(nbytes, node)
            if not ptr:
                raise OSError(ctypes.get_errno(), f"numa_alloc_onnode({nbytes}, {node}) returned NULL")
            self._libnuma_ptr = ptr
            tensor = torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(ptr), dtype=torch.uint8)
        else:
            raise TierValueError("numa_backend", f"must be 'auto', 'syscall' or 'libnuma', got {backend!r}")
        if prefault:
            tensor.zero_()
        self.tensor: torch.Tensor | None = tensor

    @property
    def address(self) -> int:
        if self.tensor is None:
            raise ValueError("NumaBuffer is closed")
        return self.tensor.data_ptr()

    def close(self) -> None:
        """Unmap / free the memory. Views of :attr:`tensor` must not be used afterwards."""
        if self.tensor is None:
            return
        self.tensor = None
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                # A view of the tensor is still alive somewhere; the mapping is released when it dies.
                pass
            self._mmap = None
        if self._libnuma_ptr is not None:
            lib = _libnuma()
            if lib is not None:
                lib.numa_free(self._libnuma_ptr, self.nbytes)
            self._libnuma_ptr = None
