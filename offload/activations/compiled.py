"""memtier's per-block activation decisions on compiled blocks (`torch.compile`), and what falls back.

Each block's forward is compiled on its own (`fullgraph=True`: a graph break is an error here, not a silent
eager region), and its `BlockPolicy` is expressed in a form the compiler keeps:

keep
    The compiled block; its saved tensors are whatever the compiler's partitioner saves (the min-cut
    partitioner already recomputes cheap pointwise ops: fewer, smaller saved tensors than eager, which is
    why the planner is fed profiles measured under compile, `profile_compiled_blocks`).
recompute
    `torch.compile` of the block under a non-reentrant `torch.utils.checkpoint`: dynamo captures the
    checkpoint as a higher-order op whose nodes AOTAutograd's partitioner tags "must recompute", so the
    block's backward graph recomputes its forward (fused) and only its inputs are saved.
swap
    The compiled block runs inside memtier's `saved_tensors_hooks` (installed eagerly, around the compiled
    call): AOTAutograd's compiled autograd function saves its activations with `save_for_backward`, so the
    hooks pack exactly the tensors the compiled backward needs, and the swap engine moves their token share
    to the tier as in eager (measured: the engine's counters, `tests/offload/test_compiled.py`).
    NOTE: torch's own compiled activation offload (`torch._functorch.config.enable_activation_offloading`)
    moves saved tensors from an accelerator to host memory as graph nodes; it has no NVMe/CXL target and no
    token share, so it is not used.

What runs eagerly instead (each with a `RuntimeWarning` and a `CompiledBlock.fallback` reason, never
silently): blocks whose parameters are streamed from the tiers (`plan.model_state.stream`: their storages
are swapped between calls, which compiled graphs do not expect); and any block whose first compiled call
fails to compile (a graph break under `fullgraph=True`, a backend failure, the recompile limit; the decision
itself is then carried out eagerly, as without compile).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import types
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from offload.activations.layout import _block_tokens
from offload.activations.policy import BlockPolicy, Mode, PolicyError
from offload.activations.profile import (
    BlockProfile,
    SavedCollector,
    _saved_summary,
    profile_blocks,
    scratch_grads,
)

__all__ = ["BlockCompiler", "CompileOptions", "CompiledBlock", "profile_compiled_blocks"]

_HOW: dict[Mode, str] = {
    "keep": "compiled block (the partitioner's own saved set)",
    "recompute": "torch.compile(checkpoint(block)): the backward graph recomputes the block",
    "swap": "compiled block inside saved_tensors_hooks: its saved_for_backward tensors go through the engine",
}


@dataclass(frozen=True, kw_only=True)
class CompileOptions:
    """How `offload.apply(..., compile_blocks=CompileOptions(...))` compiles the blocks.

    `activation_memory_budget` is AOTAutograd's min-cut partitioner knob (a share of the compiled graph's saved
    bytes, `torch._functorch.config.activation_memory_budget`; None: torch's own setting), applied to every
    compiled block: the partitioner's cheap-op recompute inside each block, memtier's whole-block recompute and
    token-share swap across blocks, planned together from costs measured at that setting.
    NOTE: dynamo's cache of compiled frames does not key on the partitioner's budget: where graphs of the same
    block class were compiled at another budget earlier in the process, memtier resets dynamo (with a warning,
    `BlockCompiler.resets`) rather than run them.
    """

    backend: str = "inductor"
    activation_memory_budget: float | None = None

    def __post_init__(self) -> None:
        known = torch._dynamo.list_backends(exclude_tags=())
        if self.backend not in known:
            raise PolicyError(
                f"unknown torch.compile backend {self.backend!r}; this torch has: {', '.join(sorted(known))}",
                field="compile_blocks",
            )
        b = self.activation_memory_budget
        if b is not None and not 0.0 <= b <= 1.0:
            raise PolicyError(
                f"activation_memory_budget={b} is not a share in [0, 1]", field="activation_memory_budget"
            )

    @classmethod
    def of(cls, value: bool | str | CompileOptions) -> CompileOptions:
        """`compile_blocks` as given to `offload.apply`: True (inductor), a backend name, or options."""
        if isinstance(value, CompileOptions):
            return value
        return cls() if value is True else cls(backend=str(value))

    def same_as(self, other: CompileOptions) -> bool:
        """The same backend and the same partitioner budget in effect (None: torch's own setting)."""
        return self.backend == other.backend and _effective(self.activation_memory_budget) == _effective(
            other.activation_memory_budget
        )

    def config(self) -> Any:
        """The context the blocks are compiled (and run) in: the partitioner's budget patched, if set."""
        import torch._functorch.config as functorch_config

        if self.activation_memory_budget is None:
            return contextlib.nullcontext()
        return functorch_config.patch(activation_memory_budget=self.activation_memory_budget)


@dataclass(frozen=True, kw_only=True)
class CompiledBlock:
    """How one block's decision runs under compile: compiled, or eagerly with the reason."""

    layer: int
    mode: Mode
    compiled: bool  # False: the block runs eagerly (see `fallback`)
    how: str  # the form the decision takes under compile (or "eager" when it fell back)
    fallback: str | None = None  # why the block is not compiled


# the partitioner budget memtier compiled each of dynamo's cached graphs at, keyed by the graph's code (a
# `CacheEntry.code`): `_claim_graphs` tells a cached graph of another budget from one of this budget by it
_entry_budgets: weakref.WeakKeyDictionary[types.CodeType, float] = weakref.WeakKeyDictionary()
# per compiled function's code, the budget memtier last compiled it at: what is known where this torch cannot
# list a code's cache entries
_last_budget: dict[types.CodeType, float] = {}


def _code_of(fn: Callable[..., Any]) -> types.CodeType | None:
    return getattr(getattr(fn, "__func__", fn), "__code__", None)


def _effective(budget: float | None) -> float:
    """The budget a graph compiled now at `budget` is partitioned with (None: torch's own setting)."""
    import torch._functorch.config as functorch_config

    return float(functorch_config.activation_memory_budget if budget is None else budget)


def _cached(code: types.CodeType) -> list[types.CodeType] | None:
    """The codes of dynamo's cached graphs for `code` (None where this torch cannot list them)."""
    entries = getattr(torch._dynamo.eval_frame, "_debug_get_cache_entry_list", None)
    return None if entries is None else [e.code for e in entries(code)]


def _note_compiled(fn: Callable[..., Any], budget: float | None) -> None:
    """Record that `fn`'s cached graphs were compiled (or found valid by `_claim_graphs`) at `budget`."""
    code = _code_of(fn)
    for graph in (_cached(code) or []) if code is not None else []:
        _entry_budgets.setdefault(graph, _effective(budget))


def _claim_graphs(fn: Callable[..., Any], budget: float | None) -> str | None:
    """Make `fn`'s next compile honour the partitioner `budget`; the reason when dynamo had to be reset.

    dynamo's cache of compiled frames is keyed on the code object (every block of a class shares its forward's)
    and does not key on `activation_memory_budget`: graphs compiled for the same code at another budget earlier
    in this process (a profile, an earlier plan) would be run as they are (checked: a plan at 1.0 applied after
    a profile at 0.1 saved 0.1's set). Where such a graph is cached (one memtier compiled at another budget, or
    one compiled outside memtier, taken to be at torch's own setting), `torch._dynamo.reset()` is called (every
    compiled function in the process compiles again on its next call) with a warning; never a plan run
    silently at another budget.
    """
    code = _code_of(fn)
    if code is None:
        return None
    want = _effective(budget)
    cached = _cached(code)
    if cached is None:  # this torch cannot list them: the budget memtier last compiled this code at
        others = {_last_budget[code]} - {want} if code in _last_budget else set()
    else:
        others = {_entry_budgets.get(graph, _effective(None)) for graph in cached} - {want}
    _last_budget[code] = want
    if not others:
        return None
    reason = (
        f"{getattr(code, 'co_qualname', code.co_name)} has graphs compiled in this process at partitioner "
        f"budget {', '.join(map(str, sorted(others)))}; dynamo would reuse them at {want}, so "
        "torch._dynamo.reset() was called"
    )
    warnings.warn(f"memtier: {reason}", RuntimeWarning, stacklevel=3)
    torch._dynamo.reset()
    _entry_budgets.clear()
    return reason


class BlockCompiler:
    """Compiles block forwards for `install_block_hooks` and records how each block ended up running.

    `report()` lists one `CompiledBlock` per installed block.
    """

    def __init__(self, options: CompileOptions | None = None) -> None:
        self.options = options or CompileOptions()
        self._blocks: dict[int, CompiledBlock] = {}
        self._lock = threading.Lock()
        self.eager_calls = 0  # block calls run eagerly under an active dispatch mode (see `compile`)
        self.resets: list[str] = []  # why dynamo was reset for this plan's budget (`_claim_graphs`)

    def report(self) -> tuple[CompiledBlock, ...]:
        return tuple(self._blocks[k] for k in sorted(self._blocks))

    def eager(self, policy: BlockPolicy, reason: str) -> None:
        """Record (and warn) that `policy.layer` runs eagerly for `reason`."""
        self._record(policy, compiled=False, reason=reason)

    def compile(self, fn: Callable[..., Any], policy: BlockPolicy) -> Callable[..., Any]:
        """`fn` compiled; on a compile failure at a call, `fn` itself from then on (warned and recorded).

        `fn` is the block's forward (keep, swap) or the checkpointed forward (recompute).
        """
        budget = self.options.activation_memory_budget
        self._claim(fn)
        compiled = torch.compile(fn, backend=self.options.backend, fullgraph=True)
        self._record(policy, compiled=True)
        state = {"fn": compiled}

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            current = state["fn"]
            if current is fn:
                return fn(*args, **kwargs)
            if _get_current_dispatch_mode() is not None:
                # A TorchDispatchMode is active (torch's MemTracker in the trainer's tracked step, a profiler
                # of memory): dynamo does not compile under one. This call runs the block eagerly with the same
                # decision, and later calls compiled again; the tracked figure is then the eager block's (an
                # upper bound: the compiled one saves less). Counted in `eager_calls`.
                with self._lock:
                    self.eager_calls += 1
                return fn(*args, **kwargs)
            try:
                # NOTE: dynamo's default on hitting the recompile limit is to run the frame eagerly without
                # saying so; here it raises, and the block falls back below with a warning.
                # NOTE: a recomputed block's Python side effects (HF's `kernels` hub sets and resets a
                # ContextVar around attention) are not replayed by the compiled backward's recompute, as eager
                # checkpoint would; the graph it recomputes is the forward's, so the gradients are the same.
                # Ordering: the partitioner reads its budget when the graph is compiled, i.e. inside this call
                # (the first one, or a recompile). Before it, what dynamo holds for this code is checked (a
                # graph of another budget, compiled since the last call by anyone, resets dynamo); after it,
                # the graphs it compiled are recorded at this budget (a few microseconds each way).
                self._claim(fn)
                with (
                    self.options.config(),
                    torch._dynamo.config.patch(
                        fail_on_recompile_limit_hit=True,
                        skip_fwd_side_effects_in_bwd_under_checkpoint=policy.mode == "recompute",
                    ),
                ):
                    out = current(*args, **kwargs)
                _note_compiled(fn, budget)
                return out
            except (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit) as exc:
                state["fn"] = fn
                self._record(policy, compiled=False, reason=f"{type(exc).__name__}: {str(exc)[:3000]}")
                # Ordering: nothing of the failed call ran on the block (the compile failed before its graph
                # was executed), so the call is simply made again eagerly.
                return fn(*args, **kwargs)

        return call

    def _claim(self, fn: Callable[..., Any]) -> None:
        reset = _claim_graphs(fn, self.options.activation_memory_budget)
        if reset is not None:
            with self._lock:
                self.resets.append(reset)

    def _record(self, policy: BlockPolicy, *, compiled: bool, reason: str | None = None) -> None:
        if not compiled:
            warnings.warn(
                f"memtier: block {policy.layer} ({policy.mode}) runs eagerly, not compiled: {reason}",
                RuntimeWarning,
                stacklevel=3,
            )
        with self._lock:
            self._blocks[policy.layer] = CompiledBlock(
                layer=policy.layer,
                mode=policy.mode,
                compiled=compiled,
                how=_HOW[policy.mode] if compiled else "eager",
                fallback=reason,
            )


def profile_compiled_blocks(
    model: nn.Module,
    *args: Any,
    options: CompileOptions | None = None,
    blocks: Sequence[nn.Module] | None = None,
    seq_dim: int = 1,
    eager: Sequence[BlockProfile] | None = None,
    **kwargs: Any,
) -> list[BlockProfile]:
    """Block profiles whose saved tensors are those of the compiled block (what the compiler changes).

    The saved tensors (`saved_bytes`, `saved_tensors`, `num_saved`) are packed from each block compiled with
    `options` (backend, partitioner budget), run forward and backward once on the inputs it receives in `model(*args, **kwargs)`; the
    input/output sizes and the forward/backward transients are the eager profile's (`eager`, or measured
    here): dispatch-mode memory tracking runs compiled code eagerly, so the compiled transients cannot be
    tracked the same way (the eager ones are an upper bound: fusion only removes intermediates).
    """
    from offload.blocks import find_blocks

    found = find_blocks(model, blocks=blocks)
    eager = (
        list(eager)
        if eager is not None
        else profile_blocks(model, *args, blocks=found, seq_dim=seq_dim, **kwargs)
    )
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    handles = [
        b.register_forward_pre_hook(
            lambda _m, a, kw: calls.append(_detached((a, kw))) if len(calls) < len(found) else None,
            with_kwargs=True,
        )
        for b in found
    ]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    if len(calls) != len(found):
        raise PolicyError(f"{len(calls)} of {len(found)} blocks were called by the forward", field="blocks")
    out = []
    for block, (a, kw), prof in zip(found, calls, eager):
        out.append(_compiled_saved(block, a, kw, prof, options=options or CompileOptions(), seq_dim=seq_dim))
    return out


def _detached(call: Any) -> Any:
    return torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.detach(), call)


def _compiled_saved(
    block: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    eager: BlockProfile,
    *,
    options: CompileOptions,
    seq_dim: int,
) -> BlockProfile:
    """`eager` with the saved tensors replaced by those the compiled block saves."""
    # non-leaf inputs, as inside a model (a leaf that requires grad is never swapped)
    args = tuple(
        a.detach().requires_grad_().clone() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        for a in args
    )
    tokens = _block_tokens(args, kwargs, seq_dim)
    collect = SavedCollector(block)
    saved, pack = collect.saved, collect.pack
    _claim_graphs(block.forward, options.activation_memory_budget)
    compiled = torch.compile(block.forward, backend=options.backend, fullgraph=True)
    with scratch_grads(block.parameters()):
        with options.config(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = compiled(*args, **kwargs)
        _note_compiled(block.forward, options.activation_memory_budget)
        saved_bytes, views = _saved_summary(saved, tokens, seq_dim) if tokens else (0, ())
        saved.clear()
        outs = [o for o in torch.utils._pytree.tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        outs = [o for o in outs if o.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return replace(eager, saved_bytes=saved_bytes, saved_tensors=views, num_saved=collect.num_saved)
