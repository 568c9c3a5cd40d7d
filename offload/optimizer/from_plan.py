"""``offload_optimizer``: carry out a Plan's ``OptimizerPlan`` over an existing ``torch.optim.AdamW``."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from offload.optimizer.adamw import OffloadedAdamW
from offload.optimizer.schedule import Phase, initial_throughputs
from offload.optimizer.settings import OffloadSettings, OptimizerOffloadError
from offload.tiers import TierStore
from planner.plan import Plan

__all__ = ["offload_optimizer"]


def _check(model: nn.Module, optimizer: torch.optim.Optimizer, plan: Plan) -> None:
    if not isinstance(plan, Plan):
        raise OptimizerOffloadError(f"expected a planner.plan.Plan, got {type(plan).__name__}", field="plan")
    if not isinstance(optimizer, torch.optim.AdamW):
        raise OptimizerOffloadError(
            f"optimizer offload carries out AdamW; got {type(optimizer).__name__}", field="optimizer"
        )
    if plan.optimizer.kind != "adamw":
        raise OptimizerOffloadError(
            f"offload supports kind 'adamw', the plan has {plan.optimizer.kind!r}", field="optimizer.kind"
        )
    model_params = {id(p) for p in model.parameters()}
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            if id(p) not in model_params:
                raise OptimizerOffloadError(
                    "is not a parameter of the model", field=f"param_groups[{g}].params[{i}]"
                )


def offload_optimizer(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    plan: Plan,
    *,
    stores: Mapping[str, TierStore] | None = None,
    settings: OffloadSettings | None = None,
    free_device_bytes: Callable[[Phase], int] | None = None,
) -> OffloadedAdamW:
    """Carry out ``plan.optimizer``: an ``OffloadedAdamW`` over ``optimizer``'s parameter groups.

    ``optimizer`` must be a ``torch.optim.AdamW`` (its groups are shared, so a scheduler on it still drives
    the learning rate); its state, if any, is moved into the tiers. Use the returned optimizer for
    ``step()``/``zero_grad()``/``state_dict()``; ``remove()`` undoes the hooks and frees the state.
    Settings default from the plan: ``grad_accum`` from ``plan.layout``, ``max_grad_norm`` and ``cpu_kernel``
    from ``plan.optimizer.settings`` when present.
    """
    _check(model, optimizer, plan)
    placement = plan.optimizer
    if settings is None:
        opts = placement.settings
        settings = OffloadSettings(
            grad_accum=plan.layout.grad_accum,
            max_grad_norm=opts.get("max_grad_norm"),
            cpu_kernel=opts.get("cpu_kernel", "auto"),
        )
    device = next(iter(model.parameters())).device
    saved = optimizer.state_dict() if optimizer.state else None
    wrapped = OffloadedAdamW(
        [dict(g) for g in optimizer.param_groups],
        placement=placement,
        tier_plans=plan.tiers,
        stores=stores,
        settings=settings,
        throughputs=initial_throughputs(plan, device),
        free_device_bytes=free_device_bytes,
        share_param_groups=optimizer.param_groups,
    )
    if saved is not None:
        wrapped.load_state_dict(saved)
        optimizer.state.clear()  # the state now lives in the tiers
    return wrapped
