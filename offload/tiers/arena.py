"""Offset allocator for a pre-allocated arena (host DRAM or CXL memory).

The arena is one block of memory allocated (and pinned) once; tensors live at offsets inside it, so there is
no per-tensor pin/unpin and no growth of the process's memory beyond the arena (MemAscend, Liao et al. 2025:
pooled pinned buffers avoid both the pinning cost and system-memory spikes).

Policy: best fit over a free list kept sorted by (size, offset), with immediate coalescing of neighbours on
free. Best fit keeps large blocks intact for large requests; coalescing means that once every allocation is
freed the arena is again a single free block, so fragmentation cannot grow across steps of a training loop
that frees what it allocated (the test suite checks this after thousands of random cycles).
"""

from __future__ import annotations

import bisect

from offload.tiers.errors import TierCapacityError, TierFragmentationError, TierValueError

__all__ = ["OffsetAllocator", "round_up"]


def round_up(nbytes: int, alignment: int) -> int:
    """Smallest multiple of ``alignment`` that is >= ``nbytes``."""
    return -(-nbytes // alignment) * alignment


class OffsetAllocator:
    """Hands out aligned byte ranges of ``[0, capacity_bytes)``.

    Not thread-safe on its own: the owning store serialises calls under its lock.
    """

    def __init__(self, capacity_bytes: int, *, alignment_bytes: int = 512, name: str = "arena") -> None:
        if alignment_bytes <= 0 or alignment_bytes & (alignment_bytes - 1):
            raise TierValueError("alignment_bytes", f"must be a positive power of two, got {alignment_bytes}")
        if capacity_bytes <= 0:
            raise TierValueError("capacity_bytes", f"must be > 0, got {capacity_bytes}")
        self.name = name
        self.alignment_bytes = alignment_bytes
        # Usable capacity is rounded down so every block stays aligned.
        self.capacity_bytes = capacity_bytes - capacity_bytes % alignment_bytes
        if self.capacity_bytes == 0:
            raise TierValueError(
                "capacity_bytes", f"{capacity_bytes} is smaller than the alignment ({alignment_bytes})"
            )
        self._free_by_size: list[tuple[int, int]] = [(self.capacity_bytes, 0)]  # sorted (size, offset)
        self._free_offsets: list[int] = [0]  # sorted offsets of free blocks
        self._free_size_at: dict[int, int] = {0: self.capacity_bytes}
        self._allocated: dict[int, int] = {}  # offset -> size of live allocations
        self._used_bytes = 0

    @property
    def used_bytes(self) -> int:
        return self._used_bytes

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self._used_bytes

    @property
    def largest_free_bytes(self) -> int:
        return self._free_by_size[-1][0] if self._free_by_size else 0

    @property
    def free_blocks(self) -> tuple[tuple[int, int], ...]:
        """Free blocks as (offset, size), by offset."""
        return tuple((off, self._free_size_at[off]) for off in self._free_offsets)

    @property
    def num_allocations(self) -> int:
        return len(self._allocated)

    def block_bytes(self, nbytes: int) -> int:
        """Bytes an allocation of ``nbytes`` occupies (rounded up to the alignment; at least one unit)."""
        return round_up(max(nbytes, 1), self.alignment_bytes)

    def allocate(self, nbytes: int) -> int:
        """Offset of a new block of at least ``nbytes``; raises before changing anything if it cannot fit."""
        if nbytes < 0:
            raise TierValueError("nbytes", f"must be >= 0, got {nbytes}")
        size = self.block_bytes(nbytes)
        if size > self.free_bytes:
            raise TierCapacityError(self.name, size, self._used_bytes, self.capacity_bytes)
        idx = bisect.bisect_left(self._free_by_size, (size, -1))
        if idx == len(self._free_by_size):
            raise TierFragmentationError(
                self.name, size, self._used_bytes, self.capacity_bytes, self.largest_free_bytes
            )
        block_size, offset = self._free_by_size[idx]
        self._remove_free(offset, block_size, idx)
        if block_size > size:
            self._insert_free(offset + size, block_size - size)
        self._allocated[offset] = size
        self._used_bytes += size
        return offset

    def free(self, offset: int) -> int:
        """Release the block at ``offset``; returns its size. Neighbouring free blocks are merged."""
        size = self._allocated.pop(offset, None)
        if size is None:
            raise TierValueError("offset", f"{offset} is not a live allocation of {self.name}")
        self._used_bytes -= size
        start, end = offset, offset + size
        pos = bisect.bisect_left(self._free_offsets, offset)
        if pos < len(self._free_offsets) and self._free_offsets[pos] == end:  # merge with the next block
            nxt_size = self._free_size_at[end]
            self._remove_free(end, nxt_size)
            end += nxt_size
        if pos > 0:
            prev = self._free_offsets[pos - 1]
            prev_size = self._free_size_at[prev]
            if prev + prev_size == start:  # merge with the previous block
                self._remove_free(prev, prev_size)
                start = prev
        self._insert_free(start, end - start)
        return size

    def _insert_free(self, offset: int, size: int) -> None:
        bisect.insort(self._free_by_size, (size, offset))
        bisect.insort(self._free_offsets, offset)
        self._free_size_at[offset] = size

    def _remove_free(self, offset: int, size: int, size_index: int | None = None) -> None:
        if size_index is None:
            size_index = bisect.bisect_left(self._free_by_size, (size, offset))
        del self._free_by_size[size_index]
        del self._free_offsets[bisect.bisect_left(self._free_offsets, offset)]
        del self._free_size_at[offset]
