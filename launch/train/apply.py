"""Carrying out the plan on the built model and optimizer: `offload.apply`, with the plan's own settings."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from launch.train.config import Settings, TrainConfigError


@dataclass
class Applied:
    """What carrying out the plan installed: offload.apply's handle and the optimizer to step."""

    handle: Any = None  # offload.apply's handle (hooks, tiers, chunked loss)
    optimizer: Any = None  # the optimizer to step: the plan's offloaded one when it has one

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()  # closes the tiers: swap files deleted


def apply_plan(model: torch.nn.Module, optimizer: Any, settings: Settings) -> Applied:
    """`offload.apply(model, optimizer, plan)` (nothing without a plan); every setting comes from the plan.

    Under DeepSpeed the optimizer is DeepSpeed's: only the plan's activation and loss decisions are applied
    here, and an optimizer offload DeepSpeed cannot carry out (ZeRO-0) is refused, not dropped.
    """
    plan = settings.plan
    if plan is None:
        return Applied(optimizer=optimizer)
    import offload

    if settings.engine == "deepspeed":
        if plan.optimizer.offload and plan.layout.zero_stage == 0:
            raise TrainConfigError(
                "DeepSpeed offloads optimizer state only with ZeRO >= 1; re-plan with --engine torch or --zero 1",
                field="layout.engine",
                source=settings.plan_path,
            )
        plan = plan.replace(optimizer=dataclasses.replace(plan.optimizer, offload=False))
        return Applied(handle=offload.apply(model, None, plan), optimizer=optimizer)
    offload_settings = None
    if plan.optimizer.offload:
        from offload.optimizer import OffloadSettings

        # The offloaded optimizer reads gradients in backward hooks (and clips there when asked): with several
        # ranks the TorchEngine averages them before those hooks run (GradientAverager), not DDP after.
        offload_settings = OffloadSettings(
            grad_accum=plan.layout.grad_accum,
            max_grad_norm=plan.optimizer.max_grad_norm or None,
            cpu_kernel=plan.optimizer.cpu_kernel,
            schedule=plan.optimizer.schedule,
        )
    handle = offload.apply(model, optimizer, plan, optimizer_settings=offload_settings)
    if plan.optimizer.offload:
        handle.optimizer.clips_gradients = bool(plan.optimizer.max_grad_norm)
    return Applied(handle=handle, optimizer=handle.optimizer)
