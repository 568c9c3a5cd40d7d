"""The layout of a saved tensor: its token dim, the storage it spans, and whether it may be swapped.

Shared by the swap engine (what to split and how to rebuild it on unpack) and the profiler (what a swap
would split).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

# Storage offsets are preserved modulo this many bytes on unpack: CUDA's caching allocator aligns blocks to
# 512 bytes and CPU allocations to 64, so a kernel sees the same pointer alignment as without hooks.
ALIGN_BYTES = 512


def _extent(size: Sequence[int], stride: Sequence[int]) -> int:
    """Elements of storage a (size, stride) view spans from its first element (0 if empty)."""
    if any(s == 0 for s in size):
        return 0
    return 1 + sum((s - 1) * st for s, st in zip(size, stride))


def _non_overlapping(size: Sequence[int], stride: Sequence[int]) -> bool:
    """True when no two elements of the view share memory (sufficient test: sorted-stride nesting)."""
    dims = sorted((st, s) for s, st in zip(size, stride) if s > 1)
    span = 1  # elements covered by the dims already visited
    for st, s in dims:
        if st < span:
            return False
        span = st * (s - 1) + span
    return True


def _offset_mod(t: torch.Tensor) -> int:
    per = max(1, ALIGN_BYTES // t.element_size())
    return int(t.storage_offset()) % per


def _empty_with_layout(
    size: torch.Size, stride: tuple[int, ...], offset: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A fresh tensor with exactly (size, stride) at storage offset `offset` (storage of the needed extent)."""
    storage = torch.empty(offset + _extent(size, stride), dtype=dtype, device=device)
    return storage.as_strided(size, stride, offset)


def _token_dim(shape: Sequence[int], tokens: tuple[int, int] | None, prefer: int) -> int | None:
    """The dim of a saved tensor along which its tokens lie, or None.

    `tokens` is (seq_len, flat_tokens) of the block input. A dim of size seq_len, preferring `prefer` (the
    dim after batch), then the first one after dim 0; else a dim of size flat_tokens = batch * seq_len (the
    (batch*seq, hidden) views a Linear saves), whose leading rows are then the tokens swapped.
    """
    if tokens is None:
        return None
    seq_len, flat_tokens = tokens
    dims = [d for d, n in enumerate(shape) if n == seq_len]
    if dims:
        if prefer in dims:
            return prefer
        later = [d for d in dims if d > 0]
        return later[0] if later else dims[0]
    if flat_tokens > seq_len:
        flat = [d for d, n in enumerate(shape) if n == flat_tokens]
        return flat[0] if flat else None
    return None


def _block_tokens(args: tuple[Any, ...], kwargs: Mapping[str, Any], seq_dim: int) -> tuple[int, int] | None:
    """(seq_len, flat_tokens) of a block call, from its hidden-state input (first tensor argument)."""
    x = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if x is None:
        x = kwargs.get("hidden_states")
    if not isinstance(x, torch.Tensor):
        x = next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
    if x is None or x.dim() <= seq_dim:
        return None
    return int(x.shape[seq_dim]), math.prod(int(n) for n in x.shape[: seq_dim + 1])


def _storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def local_tensor(t: torch.Tensor) -> torch.Tensor | None:
    """A DTensor's local shard (tensor parallelism, FSDP2), or None for any other tensor.

    Duck-typed on DTensor's `_local_tensor` and `_spec` so this module does not import torch.distributed.
    """
    if type(t) in (torch.Tensor, nn.Parameter):
        return None
    local = getattr(t, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) and hasattr(t, "_spec") else None


def storage_ptr(t: torch.Tensor) -> int:
    """The data pointer of the storage behind `t`, of its local shard for a DTensor (which has no storage)."""
    local = local_tensor(t)
    return (local if local is not None else t).untyped_storage().data_ptr()


def _swappable(t: torch.Tensor, param_ptrs: frozenset[int]) -> bool:
    if type(t) is not torch.Tensor and not isinstance(t, nn.Parameter):
        return False  # tensor subclasses (DTensor, fake tensors): left to their own machinery
    if isinstance(t, nn.Parameter) or t.layout != torch.strided or t.is_quantized:
        return False
    if t.device.type not in ("cpu", "cuda") or t.numel() == 0:
        return False
    if t.is_leaf and t.requires_grad:
        return False  # a user leaf (held by the caller anyway: swapping would free nothing)
    if t.untyped_storage().data_ptr() in param_ptrs:
        return False
    return not cast_of_parameter(t, param_ptrs)


# Autograd nodes of casts and views: a tensor reached from a parameter through these only is that
# parameter in another dtype or layout (autocast's bf16 weight copy, a transposed weight).
_CAST_OR_VIEW_NODES = frozenset(
    {
        "ToCopyBackward0",
        "TBackward0",
        "ViewBackward0",
        "TransposeBackward0",
        "PermuteBackward0",
        "ExpandBackward0",
        "AliasBackward0",
        "UnsafeViewBackward0",
    }
)


def cast_of_parameter(t: torch.Tensor, param_ptrs: frozenset[int], max_hops: int = 4) -> bool:
    """True for a cast/view of a parameter: treated as the parameter (never swapped; the planner's
    activation formulas do not count it, and swapping it would move weight bytes every step)."""
    node = t.grad_fn
    for _ in range(max_hops):
        if node is None:
            return False
        name = type(node).__name__
        if name == "AccumulateGrad":
            variable = getattr(node, "variable", None)  # AccumulateGrad holds the leaf it accumulates into
            return variable is not None and storage_ptr(variable) in param_ptrs
        if name not in _CAST_OR_VIEW_NODES or not node.next_functions:
            return False
        node = node.next_functions[0][0]
    return False
