"""What each optimizer step did: per-job timings, per-iteration records, the throughputs measured from them.

A lane fills a ``Job`` while it updates a subgroup; at the end of ``step()`` the iteration's jobs wait, as an
``Unlogged`` entry, to become an ``IterationRecord`` in ``ScheduleLog`` and to be folded into the ``RateMeter``
(the scheduler's rates: an exponential moving average of what the lanes achieved, contention included).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from offload.optimizer.schedule import Schedule, Side, Throughputs

__all__ = ["IterationRecord", "Job", "JobRecord", "RateMeter", "ScheduleLog", "Unlogged"]

logger = logging.getLogger("memtier.offload.optimizer")


@dataclass(frozen=True, kw_only=True)
class JobRecord:
    """What one subgroup's update did and how long its parts took (seconds, wall clock)."""

    index: int
    side: Side
    numel: int
    start_s: float  # since the iteration's first ready subgroup
    end_s: float
    kernel_s: float
    grads_s: float = 0.0  # gradient copy (device -> host for the CPU side)
    state_in_s: float = 0.0  # state into the working buffer (tier read and/or host -> device)
    state_out_s: float = 0.0  # state back to its tier
    params_s: float = 0.0  # master weights -> model parameters
    state_bytes: int = 0
    grad_bytes: int = 0
    param_bytes: int = 0
    staged: bool = False
    tier: str = "dram"
    fallback: bool = False  # scheduled on the device, run on the CPU for lack of device memory


@dataclass(frozen=True, kw_only=True)
class IterationRecord:
    """The log of one iteration's optimizer update: the decision and what happened."""

    iteration: int
    schedule: Schedule
    jobs: tuple[JobRecord, ...]
    rates: Throughputs  # the rates the decision used
    wall_s: float  # first ready subgroup -> last update done
    grad_norm: float | None = None
    clip_coef: float | None = None
    skipped: tuple[int, ...] = ()  # subgroups without gradients this iteration

    @property
    def executed_sides(self) -> dict[int, Side]:
        return {j.index: j.side for j in self.jobs}

    @property
    def fallbacks(self) -> tuple[int, ...]:
        return tuple(j.index for j in self.jobs if j.fallback)

    def busy_s(self, side: Side) -> float:
        return sum(j.end_s - j.start_s for j in self.jobs if j.side == side)


class RateMeter:
    """Exponential moving averages of the throughputs the lanes achieved (contention included)."""

    def __init__(self, initial: Throughputs, *, smoothing: float = 0.5) -> None:
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"smoothing: must be in (0, 1], got {smoothing}")
        self.smoothing = smoothing
        self._rates = initial
        self.observations = 0

    @property
    def rates(self) -> Throughputs:
        return self._rates

    def _mix(self, old: float, amount: float, seconds: float) -> float:
        if amount <= 0 or seconds <= 1e-9:
            return old
        new = amount / seconds
        return (1 - self.smoothing) * old + self.smoothing * new

    def update(self, jobs: Sequence[JobRecord]) -> Throughputs:
        """Fold one iteration's jobs into the rates (sums per kind, so many small jobs weigh as one big one)."""
        r = self._rates
        sums: dict[str, list[float]] = {}

        def add(key: str, amount: float, seconds: float) -> None:
            acc = sums.setdefault(key, [0.0, 0.0])
            acc[0] += amount
            acc[1] += seconds

        for j in jobs:
            add(f"{j.side}_kernel", j.numel, j.kernel_s)
            if j.side == "cpu":
                add("d2h", j.grad_bytes, j.grads_s)
                add("h2d", j.param_bytes, j.params_s)
                if j.staged:
                    add(f"read:{j.tier}", j.state_bytes, j.state_in_s)
                    add(f"write:{j.tier}", j.state_bytes, j.state_out_s)
            elif j.tier != "device" and not j.staged:
                add("h2d", j.state_bytes, j.state_in_s)
                add("d2h", j.state_bytes, j.state_out_s)

        def mixed(key: str, old: float) -> float:
            acc = sums.get(key)
            return self._mix(old, acc[0], acc[1]) if acc else old

        reads = dict(r.read_bytes_per_s)
        writes = dict(r.write_bytes_per_s)
        for key in sums:
            if key.startswith("read:"):
                tier = key.split(":", 1)[1]
                reads[tier] = mixed(key, reads.get(tier, sums[key][0] / max(sums[key][1], 1e-9)))
            elif key.startswith("write:"):
                tier = key.split(":", 1)[1]
                writes[tier] = mixed(key, writes.get(tier, sums[key][0] / max(sums[key][1], 1e-9)))
        self._rates = dataclasses.replace(
            r,
            cpu_params_per_s=mixed("cpu_kernel", r.cpu_params_per_s),
            device_params_per_s=mixed("device_kernel", r.device_params_per_s),
            h2d_bytes_per_s=mixed("h2d", r.h2d_bytes_per_s),
            d2h_bytes_per_s=mixed("d2h", r.d2h_bytes_per_s),
            read_bytes_per_s=reads,
            write_bytes_per_s=writes,
        )
        if jobs:
            self.observations += 1
        return self._rates


# ---- the optimizer's log -------------------------------------------------------------------------------------


@dataclass
class Job:
    """Timings of one subgroup's update (filled by the lane; frozen into a JobRecord at step end)."""

    index: int
    side: Side
    numel: int
    tier: str
    staged: bool
    start: float = 0.0
    end: float = 0.0
    kernel_s: float = 0.0
    grads_s: float = 0.0
    state_in_s: float = 0.0
    state_out_s: float = 0.0
    params_s: float = 0.0
    state_bytes: int = 0
    grad_bytes: int = 0
    param_bytes: int = 0
    fallback: bool = False

    def record(self) -> JobRecord:
        return JobRecord(
            index=self.index, side=self.side, numel=self.numel, start_s=self.start, end_s=self.end,
            kernel_s=self.kernel_s, grads_s=self.grads_s, state_in_s=self.state_in_s,
            state_out_s=self.state_out_s, params_s=self.params_s, state_bytes=self.state_bytes,
            grad_bytes=self.grad_bytes, param_bytes=self.param_bytes, staged=self.staged, tier=self.tier,
            fallback=self.fallback,
        )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Unlogged:
    """A finished step not yet turned into an IterationRecord (see ScheduleLog)."""

    iteration: int
    schedule: Schedule
    jobs: list[Job]
    rates: Throughputs  # the rates its decision used
    grad_norm: float | None
    coef_cpu: torch.Tensor | None
    skipped: tuple[int, ...]

    def record(self) -> IterationRecord:
        jobs = tuple(j.record() for j in sorted(self.jobs, key=lambda j: j.start))
        return IterationRecord(
            iteration=self.iteration,
            schedule=self.schedule,
            jobs=jobs,
            rates=self.rates,
            wall_s=max((j.end_s for j in jobs), default=0.0),
            grad_norm=self.grad_norm,
            clip_coef=None if self.coef_cpu is None else float(self.coef_cpu),
            skipped=self.skipped,
        )


class ScheduleLog:
    """One ``IterationRecord`` per step (the newest ``limit``), and the rates measured from them.

    Steps are appended as ``Unlogged`` entries and turned into records in batches (``flush``): right after an
    update's sweep through memory every line of Python runs from cold caches, in a batch it runs warm.
    ``records`` and ``rates`` flush first, so what a reader sees is always complete.
    """

    def __init__(self, meter: RateMeter, *, limit: int, lock: threading.RLock) -> None:
        self.meter = meter
        self._log: collections.deque[IterationRecord] = collections.deque(maxlen=limit)
        self._unlogged: list[Unlogged] = []  # steps not yet in the log
        self._lock = lock  # the optimizer's: flush() may run on another thread (schedule_log, throughputs)

    def append(self, done: Unlogged) -> int:
        """Queue a finished step; how many are waiting now."""
        with self._lock:
            self._unlogged.append(done)
            return len(self._unlogged)

    @property
    def records(self) -> collections.deque[IterationRecord]:
        self.flush()
        return self._log

    @property
    def rates(self) -> Throughputs:
        self.flush()
        return self.meter.rates

    def flush(self) -> None:
        """Turn the iterations not yet logged into IterationRecords and fold their jobs into the rates."""
        with self._lock:
            pending, self._unlogged = self._unlogged, []
        for it in pending:
            record = it.record()
            self._log.append(record)
            self.meter.update(record.jobs)
            if record.fallbacks:
                logger.info(
                    "iteration %d: subgroups %s fell back to the CPU (device memory)",
                    it.iteration,
                    list(record.fallbacks),
                )
            if logger.isEnabledFor(logging.DEBUG):  # the arguments cost time on every step
                logger.debug(
                    "iteration %d done: %.4f s (predicted %.4f s), cpu busy %.4f s, device busy %.4f s",
                    it.iteration, record.wall_s, it.schedule.predicted_s, record.busy_s("cpu"),
                    record.busy_s("device"),
                )  # fmt: skip
