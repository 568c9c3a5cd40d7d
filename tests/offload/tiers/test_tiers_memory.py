"""Host and CXL arena tiers: byte-exact round trips, views, caps, handle errors, leak-free cycles."""

from __future__ import annotations

import gc

import psutil
import pytest
import torch
from tiers_testlib import DTYPES, ODD_NUMELS, random_tensor, same_bytes

from offload.tiers import (
    CxlTier,
    HostTier,
    InvalidHandleError,
    TierCapacityError,
    TierClosedError,
    TierFragmentationError,
    TierValueError,
)
from offload.tiers.host import ArenaStore
from tests.helpers import vm_flags


def make_memory_tier(kind: str, capacity_bytes: int) -> ArenaStore:
    if kind == "host":
        return HostTier(capacity_bytes=capacity_bytes)
    return CxlTier(capacity_bytes=capacity_bytes, node=0)  # the binding code, exercised on node 0


@pytest.fixture(params=["host", "cxl"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_is_byte_exact(kind: str, dtype: torch.dtype) -> None:
    with make_memory_tier(kind, 1 << 20) as store:
        for i, numel in enumerate(ODD_NUMELS):
            t = random_tensor(numel, dtype, seed=i).reshape(-1, 1) if numel > 1 else random_tensor(1, dtype)
            h = store.put(t)
            assert h.shape == t.shape and h.dtype == dtype and h.nbytes == t.numel() * t.element_size()
            got = store.get(h)
            assert same_bytes(got, t) and got.is_contiguous()
            out = torch.empty_like(t)
            assert store.get(h, out=out) is out and same_bytes(out, t)
            store.free(h)
        assert store.used_bytes == 0


def test_views_and_noncontiguous_sources(kind: str) -> None:
    base = torch.randn(64, 48, generator=torch.Generator().manual_seed(3))  # finite: torch.equal applies
    sources = {
        "transpose": base.t(),
        "strided": base[:, ::3],
        "slice": base[5:17, 7:40],
        "expanded": base[0:1, :].expand(10, 48),
        "conj": torch.complex(base[:4], base[4:8]).conj(),
    }
    with make_memory_tier(kind, 1 << 20) as store:
        for name, src in sources.items():
            h = store.put(src)
            got = store.get(h)
            assert got.is_contiguous(), name
            assert torch.equal(got, src.resolve_conj()), name
            # `out` may itself be non-contiguous
            out = torch.empty(src.shape[::-1], dtype=src.dtype).transpose(0, 1)
            store.get(h, out=out)
            assert torch.equal(out, src.resolve_conj()), name
            store.free(h)


def test_view_aliases_the_stored_bytes_in_the_arena(kind: str) -> None:
    with make_memory_tier(kind, 1 << 20) as store:
        lo, hi = store.arena.data_ptr(), store.arena.data_ptr() + store.arena.numel()
        keep = store.put(torch.full((100,), 7.0))
        src = torch.arange(3 * 4097, dtype=torch.float32).reshape(3, 4097)
        h = store.put(src)
        v = store.view(h)
        assert v.shape == src.shape and v.dtype == src.dtype and v.is_contiguous()
        assert lo <= v.data_ptr() and v.data_ptr() + v.nbytes <= hi and torch.equal(v, src)
        v[1].mul_(2)  # a write through the view is the stored data
        assert torch.equal(store.get(h)[1], src[1] * 2) and torch.equal(store.get(h)[0], src[0])
        assert store.view(h).data_ptr() == v.data_ptr()  # the same bytes every time
        assert torch.equal(store.get(keep), torch.full((100,), 7.0))  # neighbours untouched
        assert store.view(store.put(torch.empty(0, 5))).shape == (0, 5)
        store.free(h)
        with pytest.raises(InvalidHandleError):
            store.view(h)
    with pytest.raises(TierClosedError):
        store.view(keep)


def test_source_may_be_mutated_after_put(kind: str) -> None:
    t = torch.arange(1000, dtype=torch.float32)
    with make_memory_tier(kind, 1 << 16) as store:
        h = store.put(t)
        t.zero_()
        assert torch.equal(store.get(h), torch.arange(1000, dtype=torch.float32))


def test_zero_size_and_scalar(kind: str) -> None:
    with make_memory_tier(kind, 1 << 16) as store:
        e = store.put(torch.empty(0, 5, dtype=torch.bfloat16))
        s = store.put(torch.tensor(3.5, dtype=torch.float16))
        assert store.get(e).shape == (0, 5) and store.get(e).dtype == torch.bfloat16
        assert store.get(s).shape == () and store.get(s).item() == 3.5


def test_cap_is_enforced_before_allocation(kind: str) -> None:
    with make_memory_tier(kind, 64 * 1024) as store:
        h = store.put(torch.zeros(10_000, dtype=torch.float32))  # 40 000 bytes
        used = store.used_bytes
        with pytest.raises(TierCapacityError) as info:
            store.put(torch.zeros(10_000, dtype=torch.float32))
        assert info.value.tier == kind and info.value.capacity_bytes == store.capacity_bytes
        assert store.used_bytes == used and len(store) == 1
        store.free(h)
        store.put(torch.zeros(10_000, dtype=torch.float32))  # fits again after the free


def test_fragmentation_error_is_typed() -> None:
    with HostTier(capacity_bytes=4 * 512, alignment_bytes=512) as store:
        hs = [store.put(torch.zeros(128)) for _ in range(4)]  # 512 bytes each
        store.free(hs[0])
        store.free(hs[2])
        with pytest.raises(TierFragmentationError):
            store.put(torch.zeros(256))


def test_handle_errors(kind: str) -> None:
    with make_memory_tier(kind, 1 << 16) as store, HostTier(capacity_bytes=1 << 16) as other:
        h = store.put(torch.ones(10))
        with pytest.raises(InvalidHandleError, match="another store"):
            other.get(h)
        with pytest.raises(InvalidHandleError, match="out"):
            store.get(h, out=torch.empty(11))
        with pytest.raises(InvalidHandleError, match="out"):
            store.get(h, out=torch.empty(10, dtype=torch.float64))
        store.free(h)
        with pytest.raises(InvalidHandleError, match="freed"):
            store.get(h)
        with pytest.raises(InvalidHandleError, match="freed"):
            store.free(h)
        with pytest.raises(TierValueError, match="tensor"):
            store.put(torch.ones(3).to_sparse())
    with pytest.raises(TierClosedError):
        store.put(torch.ones(1))
    store.close()  # idempotent


def test_stats_count_bytes(kind: str) -> None:
    with make_memory_tier(kind, 1 << 20) as store:
        t = torch.ones(1000)
        h = store.put(t)
        store.get(h)
        store.get(h)
        store.free(h)
        s = store.stats
        assert (s.bytes_written, s.bytes_read, s.puts, s.gets, s.frees) == (4000, 8000, 1, 2, 1)
        assert s.write_seconds > 0 and s.read_seconds > 0 and s.write_gbps > 0


def test_settings_are_validated() -> None:
    with pytest.raises(TierValueError, match="capacity_bytes"):
        HostTier(capacity_bytes=0)
    with pytest.raises(TierValueError, match="alignment_bytes"):
        HostTier(capacity_bytes=4096, alignment_bytes=3)
    with pytest.raises(TierValueError, match="pin_memory"):
        if torch.cuda.is_available():
            pytest.skip("CUDA present: pinning is allowed")
        HostTier(capacity_bytes=4096, pin_memory=True)
    huge = psutil.virtual_memory().total * 4
    with pytest.raises(TierCapacityError, match="available system memory"):
        HostTier(capacity_bytes=huge)


def test_thousand_cycles_do_not_grow_memory(kind: str) -> None:
    """1,000 put/get/free cycles of varied sizes: resident memory stays within the arena, arena ends whole."""
    arena_bytes = 8 << 20
    proc = psutil.Process()
    with make_memory_tier(kind, arena_bytes) as store:
        sizes = [1 + (i * 7919) % 300_000 for i in range(1000)]
        src = torch.randint(0, 255, (max(sizes),), dtype=torch.uint8)
        out = torch.empty_like(src)
        for n in sizes[:50]:  # warm-up: touch the arena and the allocator's caches
            store.free(store.put(src[:n]))
        gc.collect()
        rss_before = proc.memory_info().rss
        live = []
        for i, n in enumerate(sizes):
            live.append(store.put(src[:n]))
            if i % 3 == 0:  # keep a few alive at a time so frees come out of order
                for h in live:
                    got = store.get(h, out=out[: h.nbytes])
                    if not torch.equal(got, src[: h.nbytes]):
                        raise AssertionError(f"cycle {i}: data mismatch")
                    store.free(h)
                live.clear()
        for h in live:
            store.free(h)
        gc.collect()
        growth = proc.memory_info().rss - rss_before
        assert growth < arena_bytes, f"resident memory grew by {growth} bytes"
        assert store.used_bytes == 0 and len(store) == 0
        assert store.free_blocks == ((0, store.capacity_bytes),)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_trip(kind: str) -> None:
    with make_memory_tier(kind, 1 << 20) as store:
        t = torch.randn(1000, device="cuda")
        h = store.put(t)
        t.zero_()  # stream order: the D2H copy of put() ran first
        got = store.get(h)
        assert got.device.type == "cuda" and torch.equal(got.cpu(), store.get(h, out=torch.empty(1000)))


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_HUGEPAGE"), reason="no MADV_HUGEPAGE here")
def test_arena_asks_for_huge_pages_unless_told_not_to(kind: str) -> None:
    """An unpinned arena is its own anonymous mapping advised MADV_HUGEPAGE before its first touch ("hg" in its
    VmFlags), so the CPU update streams the state through 2 MiB pages; huge_pages=False leaves it as it is."""
    cls = HostTier if kind == "host" else CxlTier
    extra = {} if kind == "host" else {"node": 0, "numa_backend": "syscall"}
    values = torch.arange(1 << 20, dtype=torch.float32)
    with cls(capacity_bytes=8 << 20, **extra) as store:
        assert store.huge_pages
        h = store.put(values)
        assert "hg" in vm_flags(store.arena.data_ptr())
        assert torch.equal(store.get(h), values)
        view = store.view(h)
    if kind == "host":
        assert torch.equal(view, values)  # the mapping outlives close() while a view holds it
    del view
    with cls(capacity_bytes=8 << 20, huge_pages=False, **extra) as plain:
        assert not plain.huge_pages
        assert "hg" not in vm_flags(plain.arena.data_ptr())
