"""One optimizer step's bookkeeping, from the first completed gradient to the end of ``step()``.

A post-accumulate-grad hook on each parameter counts the micro-batches (``Iteration.complete``); on the last one
of an accumulation the parameter's gradient is complete, and when every parameter of a subgroup is, the
subgroup is ready for its update.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import torch

from offload.optimizer.layout import SubgroupLayout
from offload.optimizer.records import Job
from offload.optimizer.schedule import Schedule
from offload.optimizer.settings import OptimizerOffloadError

__all__ = ["Iteration"]


class Iteration:
    """Bookkeeping of one optimizer step, from the first completed gradient to the end of step()."""

    def __init__(self, n_params: int, layouts: Sequence[SubgroupLayout]) -> None:
        self.hits = [0] * n_params  # backward passes that reached each parameter since the last step
        self.remaining = [len(lay.params) for lay in layouts]  # parameters of a subgroup not yet complete
        self.t0: float | None = None  # the first subgroup's completion
        self.ready_s: dict[int, float] = {}
        self.schedule: Schedule | None = None
        self.dispatched: set[int] = set()  # subgroups handed to a lane or queued inline
        self.futures: list[Future[None]] = []  # of the jobs handed to a lane thread
        self.norms: dict[int, torch.Tensor] = {}  # parameter index -> its gradient's 2-norm
        self.grad_events: dict[int, Any] = {}  # subgroup -> CUDA event after its gradients
        self.step_event: Any = None  # CUDA event at step() entry, for gradients no hook saw
        self.coef: torch.Tensor | None = None  # clip coefficient (device) ...
        self.coef_cpu: torch.Tensor | None = None  # ... and on the host
        self.grad_norm: float | None = None
        self.in_step = False
        self.jobs: list[Job] = []
        self.cpu_pending: list[int] = []  # CPU-side subgroups not started, in expected order (prefetch)
        self.cpu_lane_futures: list[Future[None]] = []  # jobs handed to the CPU lane's thread
        self.skipped: list[int] = []

    @property
    def started(self) -> bool:
        return bool(self.dispatched)

    def now(self) -> float:
        return time.perf_counter() - (self.t0 if self.t0 is not None else time.perf_counter())

    def complete(self, pid: int, subgroup: int, grad_accum: int) -> bool:
        """Count one backward pass through parameter ``pid`` (of subgroup ``subgroup``); whether that made the
        subgroup's gradients complete for this iteration (called with the optimizer's lock held)."""
        if self.in_step:
            raise OptimizerOffloadError("backward ran during step()", field="step")
        self.hits[pid] += 1
        if self.hits[pid] > grad_accum:
            raise OptimizerOffloadError(
                f"parameter {pid} received gradients from {self.hits[pid]} backward passes since the last "
                f"step(), more than grad_accum={grad_accum}; call step() every grad_accum "
                "micro-batches or set grad_accum",
                field="grad_accum",
            )
        if self.hits[pid] < grad_accum:
            return False
        # the parameter's gradient is complete for this iteration
        self.remaining[subgroup] -= 1
        return not self.remaining[subgroup]
