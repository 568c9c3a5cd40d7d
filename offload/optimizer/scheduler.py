"""Each iteration's CPU/device split as the optimizer decides it at run time, and what it learns from each step.

Each iteration the scheduler (``offload.optimizer.schedule``), driven by the measured throughputs and the free
device memory of that phase, decides which subgroups update on the device instead of the CPU. On a CPU-only
machine the "device" is the CPU; the code paths are the same, and the schedule still runs and is logged
(``ScheduleLog``). The path around the kernel is kept short: right after a sweep through memory every line of
Python runs from cold caches, so a forced schedule is decided once and its iterations are logged in batches.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import psutil
import torch
from torch import nn

from offload.optimizer.iteration import Iteration
from offload.optimizer.layout import Slot
from offload.optimizer.records import RateMeter, ScheduleLog, Unlogged
from offload.optimizer.schedule import (
    Phase,
    Schedule,
    Side,
    SubgroupWork,
    Throughputs,
    schedule_subgroups,
    simulate,
)
from offload.optimizer.settings import OffloadSettings

__all__ = ["RECORD_BATCH", "Scheduler", "free_device_bytes", "subgroup_work"]

RECORD_BATCH = 32  # iterations of a forced schedule logged together (see Scheduler.learn)


def free_device_bytes(
    phase: Phase,
    *,
    device: torch.device,
    settings: OffloadSettings,
    probe: Callable[[Phase], int] | None,
    cached_bytes: int,
) -> int:
    """Device memory the device lane may use now: the probe, less the reserve, within the budget.

    ``probe`` overrides the measurement; ``cached_bytes`` are the lane's cached buffers (reusable).
    """
    if probe is not None:
        free = int(probe(phase))
    elif device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        free_now, _total = torch.cuda.mem_get_info(idx)
        # bytes the caching allocator holds but does not use are free for our buffers too
        free = free_now + torch.cuda.memory_reserved(idx) - torch.cuda.memory_allocated(idx)
    else:
        free = psutil.virtual_memory().available
    free += cached_bytes  # the lane's cached buffers can be reused
    free -= settings.device_reserve_bytes
    if settings.device_budget_bytes is not None:
        free = min(free, settings.device_budget_bytes)
    return max(0, free)


def subgroup_work(
    slot: Slot, params: Sequence[nn.Parameter], device: torch.device, ready_s: float
) -> SubgroupWork:
    """One subgroup as the scheduler sees it: its bytes to move and the device memory of a device update."""
    lay = slot.layout
    members = [params[i] for i in lay.params]
    grad_elem = max((p.element_size() for p in members), default=4)
    upcast = any(p.dtype != torch.float32 for p in members)
    # fp32 parameters on a CPU device: a CPU update reads .grad and writes the parameters where they are
    in_place = slot.master_is_param and device.type == "cpu"
    return SubgroupWork(
        index=lay.index,
        numel=lay.numel,
        tier=slot.tier,
        staged=slot.staged,
        grad_bytes=0 if in_place else lay.numel * grad_elem,
        param_bytes=0 if in_place else sum(p.numel() * p.element_size() for p in members),
        device_bytes=0 if slot.tier == "device" else (4 * slot.rows + (4 if upcast else 0)) * lay.numel,
        ready_s=ready_s,
    )


class Scheduler:
    """The optimizer's per-iteration decision (``decide``) and what it learns from each step (``learn``): the
    expected readiness order, the measured rates, the log.

    ``settings`` may be replaced between steps (the optimizer's ``settings`` setter); ``free_device_bytes`` is
    the optimizer's probe of the device memory of a phase.
    """

    def __init__(
        self,
        *,
        slots: Sequence[Slot],
        params: Sequence[nn.Parameter],
        device: torch.device,
        settings: OffloadSettings,
        throughputs: Throughputs,
        free_device_bytes: Callable[[Phase], int],
        lock: threading.RLock,
    ) -> None:
        self.settings = settings
        self._slots = slots
        self._params = params
        self._device = device
        self._free_device_bytes = free_device_bytes
        meter = RateMeter(throughputs, smoothing=settings.rate_smoothing)
        self.log = ScheduleLog(meter, limit=settings.log_limit, lock=lock)
        self._forced: dict[tuple[str, Phase], Schedule] = {}  # forced schedules by (mode, phase): decide
        self.order: tuple[int, ...] = tuple(reversed(range(len(slots))))  # backward: last layers first
        self._ready_s: dict[int, float] = {}

    def decide(self, phase: Phase) -> Schedule:
        """This iteration's CPU/device split (called once, at the first completed subgroup or in step())."""
        mode = self.settings.schedule
        # NOTE: a forced schedule's sides never change, so it is decided once per phase and expected order and
        # reused; its predicted_s and free_device_bytes are those of that first decision (jobs still check free
        # device memory when they run, and fall back to the CPU)
        schedule = self._forced.get((mode, phase)) if mode != "auto" else None
        if schedule is None or schedule.order != self.order:
            schedule = self._new_schedule(phase)
            if mode != "auto":
                self._forced[mode, phase] = schedule
        return schedule

    def _new_schedule(self, phase: Phase) -> Schedule:
        """The scheduler's decision ("auto"), or the forced sides with their predicted makespan."""
        deferred = phase == "step"
        work = [
            subgroup_work(
                s, self._params, self._device, 0.0 if deferred else self._ready_s.get(s.layout.index, 0.0)
            )
            for s in self._slots
        ]
        rates = self.log.meter.rates
        mode = self.settings.schedule
        # forced onto the CPU, nothing is lent device memory: the probe (a /proc read on CPU) is skipped
        free = 0 if mode == "cpu" else self._free_device_bytes(phase)
        order = self.order
        plan_sides = {s.layout.index: s.planned_side for s in self._slots if s.planned_side is not None}
        if mode == "auto":
            return schedule_subgroups(
                work, rates, free_device_bytes=free, order=order, plan_sides=plan_sides or None, phase=phase
            )
        forced: dict[int, Side] = {}
        for s in self._slots:
            i = s.layout.index
            if s.tier == "device":
                forced[i] = "device"
            elif mode == "plan":
                forced[i] = plan_sides.get(i) or "cpu"
            else:
                forced[i] = "device" if mode == "device" else "cpu"
        predicted = simulate(work, forced, order, rates)
        return Schedule(
            sides=tuple(forced[i] for i in range(len(self._slots))),
            order=order,
            strategy=mode if mode == "plan" else f"forced:{mode}",
            predicted_s=predicted,
            baselines_s={mode: predicted},
            free_device_bytes=free,
            phase=phase,
        )

    def learn(self, it: Iteration, iteration: int) -> None:
        """Log iteration ``it`` and learn from it: its readiness order now, its records and rates per batch."""
        assert it.schedule is not None
        # only what the record needs: the iteration's norms and futures are released now
        done = Unlogged(
            iteration=iteration, schedule=it.schedule, jobs=it.jobs, rates=self.log.meter.rates,
            grad_norm=it.grad_norm, coef_cpu=it.coef_cpu, skipped=tuple(it.skipped),
        )  # fmt: skip
        pending = self.log.append(done)
        # expected readiness of the next iteration: this one's observed order and times
        if it.ready_s:
            seen = sorted(it.ready_s, key=lambda s: it.ready_s[s])
            order = tuple(seen + [s for s in self.order if s not in it.ready_s])
            if order != self.order:  # the same object while unchanged (decide compares it)
                self.order = order
            self._ready_s = dict(it.ready_s)
        # NOTE: a forced schedule never reads the measured rates, so its iterations are logged and folded into
        # the rates in batches: right after an update's sweep through memory every line of this bookkeeping
        # runs from cold caches (~0.1 ms an iteration here), in a batch it runs warm. The scheduler ("auto")
        # decides from the rates, so its iterations are folded in at once, and so is any fallback (logged).
        if self.settings.schedule == "auto" or pending >= RECORD_BATCH or any(j.fallback for j in it.jobs):
            self.log.flush()
