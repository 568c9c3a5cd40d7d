"""CXL memory tier: an arena bound to a CPU-less NUMA node (a CXL Type-3 memory expander).

Placement by access pattern ("Analysis and Optimized CXL-Attached Memory Allocation for Long-Context LLM
Fine-Tuning", 2025): CXL memory has higher latency and lower bandwidth for CPU loads than local DRAM, so the
CPU-side optimizer step slows down when its inputs (fp32 master weights, moments, gradients) live there, while
bulk swap traffic (activations written once and read once by DMA) barely notices. The planner therefore keeps
optimizer-step inputs in the host tier (local DRAM) and lets activation swap use this tier.

On a machine without a CPU-less node the tier reports itself absent (``CxlTier.availability()``); passing an
explicit ``node`` binds to any node with memory, which is how the binding code is tested on node 0.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from offload.tiers.errors import TierUnavailableError, TierValueError
from offload.tiers.host import ArenaStore
from offload.tiers.numa import (
    Backend,
    NumaBuffer,
    cpuless_memory_nodes,
    libnuma_available,
    syscalls_available,
)

__all__ = ["CxlSettings", "CxlTier"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class CxlSettings:
    """Settings of the CXL tier (the plan's ``tiers.cxl`` entry)."""

    capacity_bytes: int
    node: int | None = None  # None: the first CPU-less memory node
    numa_backend: Backend = "auto"  # "syscall" (raw mbind, nothing to install), "libnuma", or "auto"
    alignment_bytes: int = 512
    prefault: bool = True  # touch every page at construction: memory is on the node and committed up front
    pin_memory: bool | None = None  # None: register with CUDA (cudaHostRegister) when CUDA is available
    huge_pages: bool = True  # advise transparent huge pages before the first touch (HostSettings.huge_pages)

    def __post_init__(self) -> None:
        if not isinstance(self.capacity_bytes, int) or self.capacity_bytes <= 0:
            raise TierValueError("capacity_bytes", f"must be a positive int, got {self.capacity_bytes!r}")
        if self.node is not None and (not isinstance(self.node, int) or self.node < 0):
            raise TierValueError("node", f"must be a non-negative int or None, got {self.node!r}")
        if self.numa_backend not in ("auto", "syscall", "libnuma"):
            raise TierValueError(
                "numa_backend", f"must be auto, syscall or libnuma, got {self.numa_backend!r}"
            )


class CxlTier(ArenaStore):
    """Arena in CXL-attached memory; same contract as the host tier."""

    kind: ClassVar[str] = "cxl"

    def __init__(
        self,
        *,
        capacity_bytes: int,
        node: int | None = None,
        numa_backend: Backend = "auto",
        alignment_bytes: int = 512,
        prefault: bool = True,
        pin_memory: bool | None = None,
        huge_pages: bool = True,
    ) -> None:
        self.settings = CxlSettings(
            capacity_bytes=capacity_bytes,
            node=node,
            numa_backend=numa_backend,
            alignment_bytes=alignment_bytes,
            prefault=prefault,
            pin_memory=pin_memory,
            huge_pages=huge_pages,
        )
        if node is None:
            candidates = cpuless_memory_nodes()
            if not candidates:
                raise TierUnavailableError("cxl tier", self.availability()[1])
            node = candidates[0].node_id
        self.node = node
        self._buffer = NumaBuffer(
            capacity_bytes, node=node, backend=numa_backend, prefault=prefault, huge_pages=huge_pages
        )
        self.huge_pages = self._buffer.huge_pages
        arena = self._buffer.tensor
        if arena is None:
            raise TierUnavailableError("cxl tier", "NUMA buffer allocation returned nothing")
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        if pin and not torch.cuda.is_available():
            self._buffer.close()
            raise TierValueError("pin_memory", "pinned memory needs CUDA, which is not available")
        self._registered = False
        if pin:
            # Page-lock the bound pages for DMA without moving them (cudaHostRegisterDefault = 0).
            ret = torch.cuda.cudart().cudaHostRegister(arena.data_ptr(), arena.numel(), 0)
            if int(ret) != 0:
                self._buffer.close()
                raise TierUnavailableError("cxl tier pinning", f"cudaHostRegister returned {ret}")
            self._registered = True
        self.pinned = pin
        super().__init__(arena=arena, alignment_bytes=alignment_bytes)

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        nodes = cpuless_memory_nodes()
        if not nodes:
            return False, "no CPU-less NUMA node with memory (a CXL memory expander appears as one)"
        if not (syscalls_available()[0] or libnuma_available()[0]):
            return False, f"cannot bind memory: {syscalls_available()[1]}; {libnuma_available()[1]}"
        return True, ""

    def _close(self) -> None:
        arena = self._arena
        super()._close()
        if self._registered and arena is not None:
            torch.cuda.cudart().cudaHostUnregister(arena.data_ptr())
            self._registered = False
        del arena
        self._buffer.close()
