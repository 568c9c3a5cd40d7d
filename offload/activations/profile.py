"""Measured block memory (keep-all forward and backward) and the activation peak it predicts per policy.

For checking the planner's cost models: `profile_block(s)` measure, `predict_activation_peak_bytes` combines
the measurements under a list of `BlockPolicy` with the runtime's semantics.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from offload.activations.layout import (
    _block_tokens,
    _extent,
    _non_overlapping,
    _storage_key,
    _swappable,
    _token_dim,
    storage_ptr,
)
from offload.activations.policy import BlockPolicy, PolicyError, swap_tokens

__all__ = ["BlockProfile", "predict_activation_peak_bytes", "profile_block", "profile_blocks"]


# ---------------------------------------------------------------------------------------------- profiling
@dataclass(frozen=True, kw_only=True)
class BlockProfile:
    """Measured memory of one block's forward and backward (keep-all), for checking cost models.

    All sizes in bytes. `saved_bytes` counts the distinct storages of the saved non-parameter tensors (what
    a kept block holds between forward and backward, its input included). `saved_tensors` lists the
    distinct saved tensors (by view) as (bytes, tokens along their token dim, 0 if none): what swap splits.
    Transients come from dispatch-mode tracking (torch MemTracker): the peak of live tensors above the live
    bytes when the phase starts.
    """

    seq_len: int
    input_bytes: int  # the hidden-state input: what a recomputed block keeps
    output_bytes: int
    param_bytes: int
    saved_bytes: int
    saved_tensors: tuple[tuple[int, int], ...]
    num_saved: int  # saved-tensor packs, parameters included
    forward_peak_bytes: int  # peak during forward above the live bytes before it
    backward_transient_bytes: int  # peak during backward above the live bytes before it

    @property
    def token_saved_bytes(self) -> int:
        """Bytes of the saved tensors that have a token dim (split token-wise by swap)."""
        return sum(b for b, n in self.saved_tensors if n)

    @property
    def other_saved_bytes(self) -> int:
        """Bytes of the saved tensors without a token dim (swapped whole from s >= 0.5)."""
        return sum(b for b, n in self.saved_tensors if not n)

    def _split(self, policy: BlockPolicy) -> tuple[int, int]:
        """(bytes swapped, bytes kept) of the saved tensors under a swap policy (runtime semantics)."""
        s = policy.swap_fraction
        out = kept = 0
        for nbytes, n in self.saved_tensors:
            if n:
                k = swap_tokens(s, n)
                if k == 0:
                    kept += nbytes
                else:
                    out += nbytes * k // n
                    kept += nbytes - nbytes * k // n
            elif s >= 0.5:
                out += nbytes
            else:
                kept += nbytes
        return out, kept

    def swap_bytes(self, policy: BlockPolicy) -> int:
        """Bytes this block sends to its tier under `policy`."""
        return self._split(policy)[0] if policy.mode == "swap" else 0

    def resident_bytes(self, policy: BlockPolicy) -> int:
        """Bytes this block holds on the device between its forward and its backward under `policy`."""
        if policy.mode == "keep":
            return self.saved_bytes
        if policy.mode == "recompute":
            return self.input_bytes
        return self._split(policy)[1]


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tensors(obj: Any) -> list[torch.Tensor]:
    flat, _ = torch.utils._pytree.tree_flatten(obj)
    return [x for x in flat if isinstance(x, torch.Tensor)]


def _total(snapshot: Mapping[Any, Mapping[str, int]]) -> int:
    return sum(dev.get("Total", 0) for dev in snapshot.values())


class SavedCollector:
    """A saved-tensor pack hook that counts every pack and keeps the swappable ones (what swap would move):
    not the block's parameters or buffers, nor casts or views of them."""

    def __init__(self, block: nn.Module | Iterable[torch.Tensor]) -> None:
        """`block`: the module, or the tensors that are its weights (a block written as a function)."""
        weights = [*block.parameters(), *block.buffers()] if isinstance(block, nn.Module) else list(block)
        self.ptrs = frozenset(storage_ptr(p) for p in weights)
        self.saved: list[torch.Tensor] = []
        self.num_saved = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.num_saved += 1
        if _swappable(t, self.ptrs):
            self.saved.append(t)
        return t


def _saved_summary(
    saved: Sequence[torch.Tensor], tokens: tuple[int, int], seq_dim: int
) -> tuple[int, tuple[tuple[int, int], ...]]:
    """(bytes of the distinct storages, (bytes, tokens) per distinct view) of the saved tensors."""
    distinct: dict[tuple[Any, ...], torch.Tensor] = {}
    for t in saved:
        distinct.setdefault(_storage_key(t), t)
    views = []
    for t in distinct.values():
        if not _non_overlapping(t.shape, t.stride()):
            views.append((_extent(t.shape, t.stride()) * t.element_size(), 0))
            continue
        dim = _token_dim(t.shape, tokens, seq_dim)
        views.append((_tensor_bytes(t), int(t.shape[dim]) if dim is not None else 0))
    return distinct_storage_bytes(distinct.values()), tuple(views)


def distinct_storage_bytes(saved: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `saved` (views of one storage count once)."""
    storages = {(t.device, t.untyped_storage().data_ptr()): t.untyped_storage().nbytes() for t in saved}
    return sum(storages.values())


def profile_block(
    block: nn.Module,
    example_input: torch.Tensor | tuple[Any, ...],
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    seq_dim: int = 1,
) -> BlockProfile:
    """Run `block` forward and backward once (keep-all) on `example_input` and measure its memory.

    `example_input` is the hidden state (or a tuple of positional arguments). Floating tensors among them
    become non-leaf tensors that require grad, as inside a model. The parameters' `.grad` are restored.
    """
    from torch.distributed._tools.mem_tracker import MemTracker

    raw_args = example_input if isinstance(example_input, tuple) else (example_input,)
    leaves = [
        a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else None
        for a in raw_args
    ]
    args = tuple(leaf.clone() if leaf is not None else a for leaf, a in zip(leaves, raw_args))
    kwargs = dict(example_kwargs or {})
    tokens = _block_tokens(args, kwargs, seq_dim)
    if tokens is None:
        raise PolicyError(
            "profile_block needs a tensor input with a sequence dimension", field="example_input"
        )
    collect = SavedCollector(block)
    saved, pack = collect.saved, collect.pack
    with scratch_grads(block.parameters()):
        fwd_tracker = MemTracker()
        fwd_tracker.track_external(block, *_tensors(args), *_tensors(kwargs))
        with fwd_tracker:
            before = _total(fwd_tracker.get_tracker_snapshot("current"))
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = block(*args, **kwargs)
        forward_peak = _total(fwd_tracker.get_tracker_snapshot("peak")) - before
        saved_bytes, views = _saved_summary(saved, tokens, seq_dim)
        x = next(a for a in args if isinstance(a, torch.Tensor))
        input_bytes = _tensor_bytes(x)
        outs = [o for o in _tensors(out) if o.requires_grad]
        output_bytes = sum(_tensor_bytes(o) for o in _tensors(out))
        grads = [torch.randn_like(o) for o in outs]
        bwd_tracker = MemTracker()
        bwd_tracker.track_external(block, *_tensors(args), *_tensors(kwargs), *outs, *grads, *saved)
        saved.clear()  # from here only the graph holds the saved tensors: they are freed as backward runs
        del out
        with bwd_tracker:
            before = _total(bwd_tracker.get_tracker_snapshot("current"))
            torch.autograd.backward(outs, grads)
        backward_transient = _total(bwd_tracker.get_tracker_snapshot("peak")) - before
        return BlockProfile(
            seq_len=tokens[0],
            input_bytes=input_bytes,
            output_bytes=output_bytes,
            param_bytes=sum(_tensor_bytes(p) for p in block.parameters()),
            saved_bytes=saved_bytes,
            saved_tensors=views,
            num_saved=collect.num_saved,
            forward_peak_bytes=forward_peak,
            backward_transient_bytes=backward_transient,
        )


@contextlib.contextmanager
def scratch_grads(params: Iterable[nn.Parameter]) -> Iterator[None]:
    """While a profiling backward runs, every allocated `.grad` is swapped for a zeroed scratch tensor of its
    shape; after it, the original tensors are put back untouched. (Backward accumulates into an existing
    `.grad` in place: putting the same object back alone would keep what the profile added, and the next
    optimizer step would apply it.)"""
    before = {p: p.grad for p in params}
    for p, g in before.items():
        if g is not None:
            p.grad = torch.zeros_like(g)
    try:
        yield
    finally:
        for p, g in before.items():
            p.grad = g


def profile_blocks(
    model: nn.Module, *args: Any, blocks: Iterable[nn.Module] | None = None, seq_dim: int = 1, **kwargs: Any
) -> list[BlockProfile]:
    """Profile every transformer block of `model` on the inputs it receives in `model(*args, **kwargs)`."""
    from offload.blocks import find_blocks

    found = find_blocks(model, blocks=blocks)
    captured: list[tuple[tuple[Any, ...], dict[str, Any]] | None] = [None] * len(found)
    handles = []

    def capture(i: int) -> Callable[..., None]:
        def hook(_mod: nn.Module, a: tuple[Any, ...], kw: dict[str, Any]) -> None:
            if captured[i] is None:
                detach = functools.partial(
                    torch.utils._pytree.tree_map_only, torch.Tensor, lambda t: t.detach()
                )
                captured[i] = (detach(a), detach(kw))

        return hook

    try:
        for i, b in enumerate(found):
            handles.append(b.register_forward_pre_hook(capture(i), with_kwargs=True))
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    profiles = []
    for i, b in enumerate(found):
        call = captured[i]
        if call is None:
            raise PolicyError(f"block {i} was not called by the model's forward", field="blocks")
        profiles.append(profile_block(b, call[0], example_kwargs=call[1], seq_dim=seq_dim))
    return profiles


def predict_activation_peak_bytes(
    profiles: Sequence[BlockProfile], policies: Sequence[BlockPolicy], *, head_bytes: int = 0
) -> int:
    """Peak activation bytes of a training step under `policies`, from measured block profiles.

    The largest of: the end of forward (every block's resident bytes plus `head_bytes`, the activations of
    the layers outside the blocks), and the backward of each block l, when blocks before l still hold their
    resident bytes, block l's saved tensors are all materialised (kept, fetched or recomputed), the
    gradient of its output is live, its backward transient is reached, and the swapped share of the
    previous swapped block is being prefetched (unless its policy says not to prefetch).
    """
    if len(profiles) != len(policies):
        raise PolicyError(f"{len(profiles)} profiles but {len(policies)} policies", field="policies")
    resident = [p.resident_bytes(pol) for p, pol in zip(profiles, policies)]
    swapped = [i for i, pol in enumerate(policies) if pol.mode == "swap"]
    peak = sum(resident) + head_bytes
    below = 0  # resident bytes of the blocks before l
    for l, (p, res) in enumerate(zip(profiles, resident)):
        at_l = below + p.saved_bytes + p.output_bytes + p.backward_transient_bytes
        # The closest swapped block j < l is prefetched when the first swapped block at or after l starts its
        # backward, and stays fetched until j's own backward: it is live during l's backward if one exists.
        before = [j for j in swapped if j < l]
        if before and any(j >= l for j in swapped) and policies[before[-1]].prefetch:
            at_l += profiles[before[-1]].swap_bytes(policies[before[-1]])
        peak = max(peak, at_l)
        below += res
    return peak
