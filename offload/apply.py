"""`offload.apply(model, optimizer, plan)`: carry out a Plan's runtime decisions on an unmodified model.

What it installs, all undone by the returned handle's `remove()`:

- per transformer block (see `offload.blocks.find_blocks`; `plan.activations[i].layer` indexes them), the
  activation policy: swap hooks or a recompute wrapper (`offload.activations`); blocks without a policy
  are left alone;
- the tier stores the swap policies need, built from `plan.tiers` by `offload.tiers.factory.stores_for_plan`
  (closed, and swap files deleted, on `remove()`);
- with `compile_blocks`, every block compiled (`torch.compile`) with its policy in a form the compiler keeps
  (`offload.activations.compiled`); `handle.compiled` says per block how, or why it runs eagerly;
- the chunked loss when `plan.loss.kind == "chunked"` (`offload.loss.install_chunked_loss`);
- optimizer-state offload when `plan.optimizer.offload`: `offload.optimizer.offload_optimizer` wraps the
  AdamW; the training loop steps `handle.optimizer`;
- streamed model state when `plan.model_state.stream`: parameters, gradients and optimizer state in the plan's
  tiers, streamed per block (`offload.state`); the loop steps `handle.optimizer`, `handle.state` checkpoints.

Everything is validated before anything is installed, so a bad plan leaves the model untouched.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from offload.activations import (
    BlockCompiler,
    BlockHooks,
    BlockPolicy,
    CompiledBlock,
    CompileOptions,
    PolicyError,
    SwapEngine,
    SwapStats,
    install_block_hooks,
)
from offload.activations.layout import storage_ptr
from offload.blocks import BlockList, find_blocks
from planner.plan import Plan, TierPlan

__all__ = ["OffloadHandle", "apply"]


class OffloadHandle:
    """What `apply` installed on a model; `remove()` undoes all of it. Also a context manager."""

    def __init__(self, *, model: nn.Module, blocks: BlockList, policies: tuple[BlockPolicy, ...]) -> None:
        self.model = model
        self.blocks = blocks
        self.policies = policies  # one per block, in block order
        self.tiers: dict[str, Any] = {}  # plan tier name -> TierStore
        self.engine: SwapEngine | None = None
        self.compiler: BlockCompiler | None = None  # set with apply(compile_blocks=...)
        self._block_hooks: list[BlockHooks] = []
        self._loss_handle: Any = None
        self._optimizer_handle: Any = None
        self.state: Any = None  # offload.state.StreamHandle when the plan streams model state
        self.optimizer: Any = None  # the optimizer to step: the offloaded one when the plan offloads
        self._model_hook: Any = None
        self.removed = False

    @property
    def compiled(self) -> tuple[CompiledBlock, ...]:
        """Per installed block: compiled (and how its decision is carried out) or eager (and why)."""
        return self.compiler.report() if self.compiler is not None else ()

    @property
    def loss(self) -> Any:
        """The chunked loss's handle (`offload.loss.ChunkedLossHandle`: `.calls` counts its forwards), or None."""
        return self._loss_handle

    @property
    def stats(self) -> SwapStats:
        return self.engine.stats if self.engine is not None else SwapStats()

    def synchronize(self) -> None:
        """Wait for every activation copy in flight."""
        if self.engine is not None:
            self.engine.synchronize()

    def remove(self) -> None:
        """Undo everything: the model behaves exactly as before; tiers are closed and swap files deleted.

        Call it after backward: tensors still swapped out (a graph that was never backpropagated) are gone.
        """
        if self.removed:
            return
        self.removed = True
        errors: list[BaseException] = []
        for undo in (
            *(h.remove for h in reversed(self._block_hooks)),
            *([self._model_hook.remove] if self._model_hook is not None else []),
            *([self._loss_handle.remove] if self._loss_handle is not None else []),
            *([self._optimizer_handle.remove] if self._optimizer_handle is not None else []),
            *([self.state.remove] if self.state is not None else []),
            *([self.engine.close] if self.engine is not None else []),
            *(t.close for t in self.tiers.values()),
        ):
            try:
                undo()
            except BaseException as exc:  # noqa: BLE001 - undo the rest, then raise the first
                errors.append(exc)
        self._block_hooks.clear()
        if errors:
            raise errors[0]

    def __enter__(self) -> OffloadHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        modes = [p.mode[0] for p in self.policies]
        return (
            f"OffloadHandle(blocks={self.blocks.path!r} x{len(self.blocks)}, modes={''.join(modes)}, "
            f"tiers={sorted(self.tiers)}, removed={self.removed})"
        )


def _check_tier(tier: TierPlan) -> None:
    """The tier entry can become a store (`offload.tiers.factory.tier_settings`); raises naming the field."""
    from offload.tiers.factory import TierPlanError, tier_settings

    try:
        tier_settings(tier)
    except TierPlanError as exc:
        raise PolicyError(exc.message, field=exc.field) from exc


def _swap_tiers(plan: Plan, policies: Sequence[BlockPolicy]) -> dict[str, TierPlan]:
    """The plan's entries of the tiers the swap policies name, checked (raises naming the layers or field)."""
    needed = sorted({p.swap_tier for p in policies if p.mode == "swap"})
    tier_plans: dict[str, TierPlan] = {}
    for name in needed:
        tp = plan.tier(name)
        if tp is None:
            layers = [p.layer for p in policies if p.mode == "swap" and p.swap_tier == name]
            raise PolicyError(
                f"layers {layers} swap to the {name!r} tier but the plan has no {name!r} entry in tiers",
                field="tiers",
            )
        _check_tier(tp)  # raises on a malformed entry
        tier_plans[name] = tp
    return tier_plans


def _install_blocks(
    handle: OffloadHandle, tier_plans: dict[str, TierPlan], *, seq_dim: int, param_pack: Any = None
) -> None:
    """The swap tiers and their engine, the blocks' hooks and the model's drain hook, onto ``handle``."""
    if tier_plans:
        from offload.tiers.factory import stores_for_plan

        # each at the plan's cap (a host arena allocates its whole cap)
        handle.tiers.update(stores_for_plan(tier_plans.values(), dict.fromkeys(tier_plans)))
        handle.engine = SwapEngine(handle.tiers)
    model = handle.model
    ptrs = _param_ptrs_fn(model)
    for block, policy in zip(handle.blocks, handle.policies):
        if policy.mode == "keep" and handle.engine is None and handle.compiler is None:
            continue
        # With swapping, kept blocks get the engine's back-pressure hooks too (see install_block_hooks).
        handle._block_hooks.append(
            install_block_hooks(
                block,
                policy,
                engine=handle.engine,
                seq_dim=seq_dim,
                param_ptrs=ptrs,
                param_pack=param_pack,
                compiler=handle.compiler,
            )
        )
    if handle.engine is not None:
        engine = handle.engine
        # Ordering: runs after the model's forward (also when it raises): the last swapped block's copies
        # are waited for and its sources released before backward starts.
        handle._model_hook = model.register_forward_hook(lambda _m, _a, _o: engine.drain(), always_call=True)


def _block_policies(plan: Plan, n_blocks: int) -> tuple[BlockPolicy, ...]:
    policies: list[BlockPolicy | None] = [None] * n_blocks
    for i, act in enumerate(plan.activations):
        if not 0 <= act.layer < n_blocks:
            raise PolicyError(
                f"layer {act.layer} is out of range: the model has {n_blocks} transformer blocks",
                field=f"activations[{i}].layer",
            )
        if policies[act.layer] is not None:
            raise PolicyError(f"layer {act.layer} has two policies", field=f"activations[{i}].layer")
        policies[act.layer] = BlockPolicy.from_plan(act, index=i)
    return tuple(p if p is not None else BlockPolicy(layer=i) for i, p in enumerate(policies))


def _param_ptrs_fn(model: nn.Module):
    def ptrs() -> frozenset[int]:
        # Recomputed at every block call (cheap: one pointer per tensor): parameters may be re-materialised
        # (model.to(), FSDP) between steps, and a stale pointer could let a weight be swapped.
        return frozenset(storage_ptr(t) for t in [*model.parameters(), *model.buffers()])

    return ptrs


def _compile_options(plan: Plan, compile_blocks: bool | str | CompileOptions | None) -> CompileOptions | None:
    """How the blocks are compiled: as the plan says (`compile_blocks` None), or as `compile_blocks` asks where
    the plan runs them eagerly (its costs are then an upper bound); never against a compiled plan."""
    w = plan.workload
    planned = (
        CompileOptions(backend=w.compile, activation_memory_budget=w.compile_memory_budget)
        if w.compile
        else None
    )
    if compile_blocks is None:
        return planned
    asked = CompileOptions.of(compile_blocks) if compile_blocks is not False else None
    if planned is not None and asked is not None and asked.same_as(planned):
        return planned  # e.g. compile_blocks=True on a plan at partitioner budget 1.0, torch's own
    if planned is not None and asked != planned:
        raise PolicyError(
            f"the plan runs the blocks compiled ({planned.backend}, partitioner budget "
            f"{planned.activation_memory_budget}); compile_blocks={compile_blocks!r} would run them another way "
            "(leave it unset to follow the plan)",
            field="compile_blocks",
        )
    return asked


def apply(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    plan: Plan,
    *,
    blocks: Iterable[nn.Module] | None = None,
    seq_dim: int = 1,
    optimizer_settings: Any = None,
    weights: Any = None,
    compile_blocks: bool | str | CompileOptions | None = None,
) -> OffloadHandle:
    """Install the plan's activation policies, tiers, loss and optimizer offload on `model`.

    `optimizer` is for optimizer-state offload (`plan.optimizer.offload`): it is wrapped by
    `offload.optimizer.offload_optimizer`, and the loop steps `handle.optimizer` (the optimizer itself
    when nothing is offloaded); `optimizer_settings` (an `offload.optimizer.OffloadSettings`) overrides
    what it reads from the plan.
    `weights` (streamed model state only): a safetensors file the parameters are read from group by group; the
    model may then be built on the meta device (`offload.state.weights`).
    `blocks` overrides the block discovery; `seq_dim` is the sequence dimension of the blocks' hidden-state
    input (1 for batch-first models). The blocks are compiled (`torch.compile`) with their policies in a form the
    compiler keeps (`offload.activations.compiled`) when the plan says so (`plan.workload.compile`, its
    partitioner budget `compile_memory_budget`) or `compile_blocks` asks (True: inductor, a backend name, or
    `offload.activations.CompileOptions`); a `compile_blocks` that contradicts a compiled plan is refused.
    `handle.compiled` reports per block, and a block that cannot run compiled runs eagerly with a warning.
    Call `remove()` on the result (or use it as a context manager) after the last backward.
    """
    if not isinstance(plan, Plan):
        raise PolicyError(f"expected a planner.plan.Plan, got {type(plan).__name__}", field="plan")
    found = find_blocks(model, blocks=blocks)
    policies = _block_policies(plan, len(found))
    handle = OffloadHandle(model=model, blocks=found, policies=policies)
    options = _compile_options(plan, compile_blocks)
    if options is not None:
        handle.compiler = BlockCompiler(options)

    # Validate before installing anything.
    tier_plans = _swap_tiers(plan, policies)
    chunked = plan.loss.kind == "chunked"
    if chunked and importlib.util.find_spec("offload.loss") is None:
        # TODO(issue 5): the chunked loss lives in offload/loss.py, written separately.
        raise NotImplementedError(
            "plan.loss.kind='chunked' needs offload.loss.install_chunked_loss (issue 5), "
            "which is not available in this build"
        )
    if weights is not None and not plan.model_state.stream:
        raise PolicyError("weights= reads streamed model state; the plan does not stream it", field="weights")
    if plan.optimizer.offload and optimizer is None:
        raise PolicyError(
            "plan.optimizer.offload needs the optimizer to offload, got None", field="optimizer"
        )

    handle.optimizer = optimizer
    try:
        param_pack = None
        if plan.model_state.stream:
            from offload.state import install_streaming

            swapped = frozenset(p.layer for p in policies if p.mode == "swap")
            handle.state = install_streaming(
                model, optimizer, plan, found.modules, swap_blocks=swapped, weights=weights
            )
            handle.optimizer = handle.state.optimizer
            param_pack = handle.state.streamer.param_ref
        _install_blocks(handle, tier_plans, seq_dim=seq_dim, param_pack=param_pack)
        if chunked:
            loss_module = importlib.import_module("offload.loss")
            # chunk_size 0 in a plan means "not set": the loss module's default applies.
            loss_kwargs = {"chunk_size": plan.loss.chunk_size} if plan.loss.chunk_size > 0 else {}
            handle._loss_handle = loss_module.install_chunked_loss(model, **loss_kwargs)
        if plan.optimizer.offload:
            from offload.optimizer import offload_optimizer

            if optimizer is None:
                raise PolicyError(
                    "the plan offloads the optimizer state: pass the model's optimizer to apply()",
                    field="optimizer",
                )

            # builds its own tier stores through the same factory (sized to its state, each within the plan's
            # cap), shares the AdamW's param_groups so LR schedulers keep driving it, and moves existing state
            # into the tiers
            handle._optimizer_handle = offload_optimizer(model, optimizer, plan, settings=optimizer_settings)
            handle.optimizer = handle._optimizer_handle
    except BaseException:
        handle.remove()
        raise
    return handle
