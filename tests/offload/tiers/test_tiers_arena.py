"""Offset allocator: alignment, best fit, coalescing, and errors raised before any state changes."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offload.tiers.arena import OffsetAllocator, round_up
from offload.tiers.errors import TierCapacityError, TierFragmentationError, TierValueError


def test_allocations_are_aligned_and_disjoint() -> None:
    alloc = OffsetAllocator(1 << 16, alignment_bytes=512)
    spans = []
    for n in (1, 511, 512, 513, 4097, 3):
        off = alloc.allocate(n)
        assert off % 512 == 0
        spans.append((off, off + round_up(n, 512)))
    spans.sort()
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start
    assert alloc.used_bytes == sum(e - s for s, e in spans)


def test_best_fit_picks_the_smallest_hole() -> None:
    alloc = OffsetAllocator(10 * 512, alignment_bytes=512)
    a = alloc.allocate(3 * 512)  # [0, 3)
    b = alloc.allocate(512)  # [3, 4)
    c = alloc.allocate(1 * 512)  # [4, 5)
    alloc.allocate(512)  # [5, 6), rest [6, 10) free (4 units)
    alloc.free(a)  # hole of 3 units at 0
    alloc.free(c)  # hole of 1 unit at 4
    assert alloc.allocate(512) == 4 * 512  # the 1-unit hole, not the 3- or 4-unit ones
    assert alloc.allocate(2 * 512) == 0  # the 3-unit hole beats the 4-unit tail
    del b


def test_capacity_error_before_any_change() -> None:
    alloc = OffsetAllocator(4096, alignment_bytes=512)
    alloc.allocate(3000)
    before = (alloc.used_bytes, alloc.free_blocks)
    with pytest.raises(TierCapacityError) as info:
        alloc.allocate(2000)
    assert (alloc.used_bytes, alloc.free_blocks) == before
    assert info.value.requested_bytes == 2048 and info.value.capacity_bytes == 4096
    assert "used(3072) + need(2048) = 5120 > capacity(4096)" in str(info.value)


def test_fragmentation_error_names_largest_block() -> None:
    alloc = OffsetAllocator(4 * 512, alignment_bytes=512)
    offs = [alloc.allocate(512) for _ in range(4)]
    alloc.free(offs[0])
    alloc.free(offs[2])
    with pytest.raises(TierFragmentationError) as info:
        alloc.allocate(1024)
    assert info.value.largest_free_bytes == 512
    assert isinstance(info.value, TierCapacityError)


def test_bad_arguments_name_the_field() -> None:
    with pytest.raises(TierValueError, match="alignment_bytes"):
        OffsetAllocator(4096, alignment_bytes=500)
    with pytest.raises(TierValueError, match="capacity_bytes"):
        OffsetAllocator(0)
    alloc = OffsetAllocator(4096)
    with pytest.raises(TierValueError, match="offset"):
        alloc.free(512)


def test_thousands_of_random_cycles_do_not_fragment() -> None:
    """Random sizes and free order; once everything is freed the arena is one block again, every time."""
    rng = random.Random(0)
    alloc = OffsetAllocator(1 << 22, alignment_bytes=512)
    live: list[int] = []
    for step in range(5000):
        if live and (rng.random() < 0.45 or alloc.free_bytes < (1 << 21)):  # stay under ~half full
            alloc.free(live.pop(rng.randrange(len(live))))
        else:
            live.append(alloc.allocate(rng.randint(1, 1 << 16)))
        if step % 1000 == 999:
            for off in live:
                alloc.free(off)
            live.clear()
            assert alloc.free_blocks == ((0, 1 << 22),)
            assert alloc.used_bytes == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 5000)), max_size=80))
def test_invariants_hold_for_any_sequence(ops: list[tuple[bool, int]]) -> None:
    alloc = OffsetAllocator(1 << 16, alignment_bytes=512)
    live: dict[int, int] = {}
    for is_free, n in ops:
        if is_free and live:
            off = sorted(live)[n % len(live)]
            alloc.free(off)
            del live[off]
            continue
        try:
            off = alloc.allocate(n)
        except TierCapacityError:
            continue
        live[off] = round_up(n, 512)
    # free blocks and live blocks tile the arena exactly, with no two free blocks adjacent
    spans = sorted([(o, s, "live") for o, s in live.items()] + [(o, s, "free") for o, s in alloc.free_blocks])
    pos = 0
    for (off, size, kind), nxt in zip(spans, spans[1:] + [None]):
        assert off == pos
        pos += size
        if nxt is not None:
            assert not (kind == "free" and nxt[2] == "free")
    assert pos == alloc.capacity_bytes
    assert alloc.used_bytes == sum(live.values())
