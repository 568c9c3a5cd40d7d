"""How the runtime carries out an optimizer placement (``OffloadSettings``), and the errors it raises."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from planner.errors import SpecError

__all__ = ["OffloadSettings", "OptimizerOffloadError", "validate_groups"]


class OptimizerOffloadError(SpecError):
    """A setting, plan or call the offloaded optimizer cannot carry out (the message names the field)."""


@dataclass(frozen=True, kw_only=True)
class OffloadSettings:
    """How the runtime carries out an optimizer placement (the placement itself is an ``OptimizerPlan``)."""

    grad_accum: int = 1  # micro-batches per optimizer step: the hooks start updates on the last one
    max_grad_norm: float | None = None  # global-norm clipping (defers updates to step(), see the package doc)
    schedule: Literal["auto", "plan", "cpu", "device"] = "auto"  # auto: the scheduler; plan: the plan's sides
    cpu_kernel: str = "auto"  # "auto" (fastest measured here), "torch_fused", "deepspeed"
    build_kernels: bool = False  # allow compiling DeepSpeed's cpu_adam op (~100 s once)
    prefetch_depth: int = 2  # staged (NVMe) subgroups read ahead of their update
    free_grads: bool = True  # drop each .grad once its subgroup has consumed it (ZeRO-Offload behaviour)
    device_budget_bytes: int | None = None  # cap on device working memory (CPU "device": the default pool)
    device_reserve_bytes: int = 0  # device bytes the scheduler leaves free
    rate_smoothing: float = 0.5  # weight of the newest measurement in the throughput averages
    log_limit: int = 1000  # iterations kept in schedule_log
    # a CPU device: fp32 parameters that own their storage move into one buffer of transparent huge pages
    # (their .data; the Parameter objects stay), as the host tier keeps the moments (HostSettings.huge_pages)
    huge_page_params: bool = True
    nvme_io_engine: Literal["auto", "aio", "posix"] = "auto"

    def __post_init__(self) -> None:
        def bad(field: str, message: str) -> OptimizerOffloadError:
            return OptimizerOffloadError(message, field=field)

        if not isinstance(self.grad_accum, int) or self.grad_accum < 1:
            raise bad("grad_accum", f"must be a positive int, got {self.grad_accum!r}")
        if self.max_grad_norm is not None and not (
            self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)
        ):
            raise bad(
                "max_grad_norm", f"must be a positive finite number or None, got {self.max_grad_norm!r}"
            )
        if self.schedule not in ("auto", "plan", "cpu", "device"):
            raise bad("schedule", f"must be auto, plan, cpu or device, got {self.schedule!r}")
        if self.cpu_kernel not in ("auto", "torch_fused", "deepspeed"):
            raise bad("cpu_kernel", f"must be auto, torch_fused or deepspeed, got {self.cpu_kernel!r}")
        if not isinstance(self.prefetch_depth, int) or self.prefetch_depth < 0:
            raise bad("prefetch_depth", f"must be a non-negative int, got {self.prefetch_depth!r}")
        if self.device_budget_bytes is not None and self.device_budget_bytes < 0:
            raise bad("device_budget_bytes", f"must be >= 0 or None, got {self.device_budget_bytes}")
        if self.device_reserve_bytes < 0:
            raise bad("device_reserve_bytes", f"must be >= 0, got {self.device_reserve_bytes}")
        if not 0.0 < self.rate_smoothing <= 1.0:
            raise bad("rate_smoothing", f"must be in (0, 1], got {self.rate_smoothing}")
        if self.nvme_io_engine not in ("auto", "aio", "posix"):
            raise bad("nvme_io_engine", f"must be auto, aio or posix, got {self.nvme_io_engine!r}")

    def replace(self, **changes: Any) -> OffloadSettings:
        return dataclasses.replace(self, **changes)


def validate_groups(param_groups: Sequence[dict[str, Any]]) -> None:
    """The parameter groups' settings this AdamW can carry out (raises naming the group's field)."""
    for g, group in enumerate(param_groups):
        if group.get("amsgrad"):
            raise OptimizerOffloadError("AMSGrad is not supported", field=f"param_groups[{g}].amsgrad")
        if group.get("maximize"):
            raise OptimizerOffloadError("maximize is not supported", field=f"param_groups[{g}].maximize")
        betas = group.get("betas")
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise OptimizerOffloadError(
                f"must be two numbers, got {betas!r}", field=f"param_groups[{g}].betas"
            )
        for i, p in enumerate(group["params"]):
            if not p.is_floating_point():
                raise OptimizerOffloadError(
                    f"must be floating point, got {p.dtype}", field=f"param_groups[{g}].params[{i}]"
                )
