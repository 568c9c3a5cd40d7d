"""The model's parameters as the optimizer touches them: huge pages, gathered into and scattered from master rows.

The update is memory-bound (it streams parameters, gradients and both moments once per step), so on a CPU
device the fp32 parameters themselves move into transparent huge pages, once, at construction
(``OffloadSettings.huge_page_params``), as the host tier's arena holds the moments.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import torch
from torch import nn

from offload.optimizer.layout import SubgroupLayout
from offload.tiers.host import anonymous_memory

__all__ = ["active_params", "gather_params", "host_fp32", "params_into_huge_pages", "scatter_params"]

HUGE_PAGE_BYTES = 2 << 20  # x86-64's transparent huge page


def params_into_huge_pages(params: Sequence[nn.Parameter], device: torch.device) -> int:
    """Move the fp32 parameters of a CPU device into one buffer advised MADV_HUGEPAGE; how many moved.

    The CPU update streams parameters, gradients and both moments through memory once per step; with the
    parameters and the moments (HostTier) in 2 MiB pages the kernel takes fewer TLB misses (measured here,
    33.5M parameters: memtier's step 1.7% ahead of DeepSpeed's CPU Adam in two runs, 0.8-0.9% behind it in
    three without). Only parameters that own their whole storage move (no
    views, no storage shared with another parameter): their bytes are copied exactly and ``p.data`` is
    pointed at the copy, so the model, hooks and references to the Parameter objects are unaffected.
    """
    if device.type != "cpu":
        return 0
    storages = collections.Counter(p.untyped_storage().data_ptr() for p in params)
    movable = [
        p
        for p in params
        if p.dtype == torch.float32
        and p.is_contiguous()
        and p.storage_offset() == 0
        and p.untyped_storage().nbytes() == p.numel() * 4
        and storages[p.untyped_storage().data_ptr()] == 1
        and p.numel() > 0
    ]
    sizes = [-(-p.numel() * 4 // 64) * 64 for p in movable]  # 64-byte aligned slots (a cache line)
    if sum(sizes) < HUGE_PAGE_BYTES:
        return 0  # less than one huge page: nothing to gain
    buf, advised = anonymous_memory(sum(sizes), huge_pages=True)
    if not advised:
        return 0
    offset = 0
    with torch.no_grad():
        for p, size in zip(movable, sizes):
            dst = buf[offset : offset + p.numel() * 4].view(torch.float32).view(p.shape)
            dst.copy_(p)
            # NOTE: .data is replaced, not the Parameter: modules, hooks and the caller's references keep
            # the same object; the old storage is freed when nothing else holds it
            p.data = dst
            offset += size
    return len(movable)


def gather_params(params: Sequence[nn.Parameter], lay: SubgroupLayout, out: torch.Tensor) -> None:
    """A subgroup's parameters, concatenated, into ``out`` (its master row)."""
    for pid, off, n in zip(lay.params, lay.offsets, lay.numels):
        out[off : off + n].view_as(params[pid]).copy_(params[pid].detach())


def scatter_params(
    params: Sequence[nn.Parameter],
    lay: SubgroupLayout,
    master: torch.Tensor,
    active: Sequence[int] | None = None,
) -> int:
    """Model parameters <- master weights (cast to the parameter dtype); returns the bytes written."""
    nbytes = 0
    ks = range(len(lay.params)) if active is None else active
    for k in ks:
        p = params[lay.params[k]]
        off, n = lay.offsets[k], lay.numels[k]
        # non_blocking: from pinned host memory on CUDA; the caller orders it (see the lanes)
        p.detach().copy_(master[off : off + n].view_as(p), non_blocking=True)
        nbytes += n * p.element_size()
    return nbytes


def active_params(params: Sequence[nn.Parameter], lay: SubgroupLayout) -> list[int]:
    """Positions in the subgroup of the parameters that have a gradient this iteration."""
    return [k for k, pid in enumerate(lay.params) if params[pid].grad is not None]


def host_fp32(t: torch.Tensor) -> bool:
    """A dense, contiguous fp32 CPU tensor: what the CPU kernels can read in place."""
    return (
        t.device.type == "cpu"
        and t.dtype == torch.float32
        and t.layout == torch.strided
        and t.is_contiguous()
    )
