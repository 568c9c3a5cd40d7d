"""Per-block forward wrapping: recompute under checkpoint, swap under saved-tensor hooks, KV cache dropped.

`install_block_hooks` carries out one block's `BlockPolicy`; `BlockHooks.remove()` undoes it.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from offload.activations.compiled import BlockCompiler
from offload.activations.engine import SwapEngine, _Saved
from offload.activations.layout import _block_tokens, storage_ptr
from offload.activations.policy import BlockPolicy, PolicyError

__all__ = ["BlockHooks", "install_block_hooks"]

# kwargs a block writes a KV cache through: a recomputed block would write it twice (HF drops them too).
# transformers 5.25 renamed the decoder layers' `past_key_values` to `cache` (the old name is still accepted
# and renamed by `deprecate_kwarg` until 5.40); both are dropped.
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


class BlockHooks:
    """The hooks installed on one block; `remove()` restores the block's own `forward` and drops the hooks."""

    _MISSING = object()

    def __init__(
        self,
        block: nn.Module,
        *,
        wrapped: Callable[..., Any] | None = None,
        original: Any = _MISSING,
        handles: Sequence[Any] = (),
    ) -> None:
        self.block = block
        self._wrapped = wrapped  # our instance-level forward, or None when only module hooks are installed
        self._original = original  # the instance attribute `forward` before us, or _MISSING
        self._handles = list(handles)
        self.removed = False

    def remove(self) -> None:
        if self.removed:
            return
        self.removed = True
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._wrapped is None:
            return
        current = self.block.__dict__.get("forward", self._MISSING)
        if current is not self._wrapped:
            warnings.warn(
                f"memtier: forward of {type(self.block).__name__} was replaced after offload.apply(); "
                "leaving the replacement in place",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        if self._original is self._MISSING:
            del self.block.__dict__["forward"]
        else:
            self.block.__dict__["forward"] = self._original


def install_block_hooks(
    block: nn.Module,
    policy: BlockPolicy,
    *,
    engine: SwapEngine | None = None,
    seq_dim: int = 1,
    param_ptrs: Callable[[], frozenset[int]] | None = None,
    param_pack: Callable[[torch.Tensor], Any] | None = None,
    compiler: BlockCompiler | None = None,
) -> BlockHooks:
    """Carry out `policy` on `block`; `remove()` on the result undoes it.

    Recompute and swap wrap the block's `forward` (an instance attribute). With an `engine`, every block,
    kept ones included, also gets the back-pressure hooks (`SwapEngine.enter_block` / `exit_block`), so
    the sources of earlier swapped blocks are released during later blocks whatever their policy.
    `param_ptrs` returns the storage pointers never to swap (the model's parameters and buffers); by
    default the block's own. `param_pack` (streamed model state, `offload.state`) is asked first for every saved
    tensor of a swapped block: a non-None answer (an object with `unpack()`) is saved instead.
    `compiler` (`offload.activations.compiled.BlockCompiler`): the block runs compiled, its decision in a form
    the compiler keeps (see that module); a block with `param_pack` runs eagerly (warned and reported).
    """
    if policy.mode == "swap" and engine is None:
        raise PolicyError(f"layer {policy.layer}: swapping needs a SwapEngine", field="engine")
    handles = _back_pressure_hooks(block, engine) if engine is not None else []
    if compiler is not None and param_pack is not None:
        compiler.eager(policy, "its parameters are streamed from the tiers (model_state.stream)")
        compiler = None
    if policy.mode == "keep" and compiler is None:
        return BlockHooks(block, handles=handles)
    original = block.__dict__.get("forward", BlockHooks._MISSING)
    forward = block.forward  # the bound method (or an earlier instance-level wrapper)
    without_cache = _cache_dropper(forward, policy)
    if policy.mode == "keep":
        wrapped = compiler.compile(
            forward, policy
        )  # compiler is set: a keep block without one returned above
    elif policy.mode == "recompute":
        wrapped = _recompute_forward(forward, without_cache, compiler, policy)
    else:
        if engine is None:  # narrowed above
            raise PolicyError("engine", field="engine")
        ptrs_fn = param_ptrs or functools.partial(_own_ptrs, block)
        inner = compiler.compile(forward, policy) if compiler is not None else forward
        wrapped = _swap_forward(inner, without_cache, policy, engine, seq_dim, ptrs_fn, param_pack)
    block.__dict__["forward"] = wrapped
    return BlockHooks(block, wrapped=wrapped, original=original, handles=handles)


def _back_pressure_hooks(block: nn.Module, engine: SwapEngine) -> list[Any]:
    """The module hooks that tell `engine` where each block's forward starts and ends."""
    # Ordering: the pre-hook runs before the block's forward (and our wrapper), the post-hook after it,
    # also when it raises (always_call).
    return [
        block.register_forward_pre_hook(lambda _m, _a: engine.enter_block()),
        block.register_forward_hook(lambda _m, _a, _o: engine.exit_block(), always_call=True),
    ]


def _own_ptrs(block: nn.Module) -> frozenset[int]:
    """Storage pointers of the block's own parameters and buffers (the default never-swap set)."""
    return frozenset(storage_ptr(p) for p in [*block.parameters(), *block.buffers()])


_Call = tuple[tuple[Any, ...], dict[str, Any]]  # a forward call's (args, kwargs)
_CacheDropper = Callable[[tuple[Any, ...], dict[str, Any]], _Call]


def _cache_dropper(forward: Callable[..., Any], policy: BlockPolicy) -> _CacheDropper:
    """A function from a call's (args, kwargs) to the same with any KV cache dropped (see `without_cache`).

    Warns once per installed block, the first time it drops a cache.
    """
    try:
        signature: inspect.Signature | None = inspect.signature(forward)
    except (TypeError, ValueError):
        signature = None
    cache_params = [n for n in _CACHE_KWARGS if signature is not None and n in signature.parameters]
    warned = False

    def without_cache(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Call:
        """The call's arguments with any KV cache dropped (as HF gradient checkpointing does).

        NOTE: in training a block that is not kept does not write a KV cache. A recomputed block would write
        it a second time in backward; a swapped block's cache would hold its keys and values on the device,
        undoing that part of the swap (measured: ~10% of a Llama block's saved bytes stayed). Training
        outputs do not depend on the cache.
        """
        nonlocal warned
        if signature is None or not (cache_params or kwargs.get("use_cache")):
            return args, kwargs
        bound = signature.bind_partial(*args, **kwargs)
        dropped = [n for n in cache_params if bound.arguments.get(n) is not None]
        if not dropped:
            return args, kwargs
        for n in dropped:
            bound.arguments[n] = None
        if "use_cache" in bound.arguments:
            bound.arguments["use_cache"] = False
        if not warned:
            warned = True
            warnings.warn(
                f"memtier: block {policy.layer} is {'recomputed' if policy.mode == 'recompute' else 'swapped'}"
                f"; not writing its KV cache ({', '.join(dropped)} ignored)",
                RuntimeWarning,
                stacklevel=3,
            )
        return tuple(bound.args), dict(bound.kwargs)

    return without_cache


def _recompute_forward(
    forward: Callable[..., Any],
    without_cache: _CacheDropper,
    compiler: BlockCompiler | None = None,
    policy: BlockPolicy | None = None,
) -> Callable[..., Any]:
    """`forward` under a non-reentrant checkpoint when grad is enabled (compiled as one with `compiler`)."""

    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        # Non-reentrant checkpoint: the block's graph is kept with placeholders for its saved tensors,
        # which are recomputed (with the forward's RNG state restored) when backward first needs one.
        # Under torch.compile the checkpoint is traced as a higher-order op: its nodes are recomputed in the
        # compiled backward graph.
        return torch.utils.checkpoint.checkpoint(
            forward, *args, use_reentrant=False, preserve_rng_state=True, **kwargs
        )

    run = (
        compiler.compile(checkpointed, policy)
        if compiler is not None and policy is not None
        else checkpointed
    )

    @functools.wraps(forward)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        args, kwargs = without_cache(args, kwargs)
        return run(*args, **kwargs)

    return wrapped


def _swap_forward(
    forward: Callable[..., Any],
    without_cache: _CacheDropper,
    policy: BlockPolicy,
    eng: SwapEngine,
    seq_dim: int,
    ptrs_fn: Callable[[], frozenset[int]],
    param_pack: Callable[[torch.Tensor], Any] | None = None,
) -> Callable[..., Any]:
    """`forward` with its saved tensors packed by `eng` (one record per call) when grad is enabled."""

    @functools.wraps(forward)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        args, kwargs = without_cache(args, kwargs)
        tokens = _block_tokens(args, kwargs, seq_dim)
        ptrs = ptrs_fn()
        record = eng.new_record(policy.layer, prefetch=policy.prefetch)

        def pack(t: torch.Tensor) -> Any:
            if param_pack is not None:
                ref = param_pack(t)
                if ref is not None:
                    return ref
            return eng.pack(t, record, policy, tokens, seq_dim, ptrs)

        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
                return forward(*args, **kwargs)
        finally:
            record.dedupe = None  # the block's forward is over: no more packs into this record

    return wrapped


def _unpack(packed: Any) -> torch.Tensor:
    if isinstance(packed, _Saved):
        return packed.engine.unpack(packed)
    return packed.unpack()  # _Kept, or a streamed parameter's reference (`param_pack`)
