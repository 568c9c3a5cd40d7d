"""Which subgroups update on the device this iteration: the performance model and the scheduler.

After Deep Optimizer States (Maurya et al. 2024, "Towards Scalable Training of Transformer Models Using
Interleaved Offloading"): the optimizer state lives off the device; each iteration some subgroups are
updated on the device (state moved in and back) and the rest on the CPU, the split chosen by a model of
transfer cost, device speed, CPU speed and contention, and bounded by the device memory free in that phase.

The model, per subgroup of ``n`` elements (``S = 12 n`` bytes of fp32 master weights and two moments):

  CPU side     grads down (``G`` bytes / d2h) + ``max(n / cpu_rate, tier I/O)`` + params up (``P`` / h2d)
               (ZeRO-Offload, Ren et al. 2021, Sec. 4: gradients to the CPU, the update there, fp16/bf16
               parameters back; NVMe-resident state is prefetched, so its I/O overlaps the update)
  device side  ``S / h2d`` + ``n / device_rate`` + ``S / d2h`` (+ tier I/O, not overlapped)
  tier I/O     staged tiers only (NVMe, or an arena without in-place views): ``S / read + S / write``

Subgroups become ready in backward order at ``ready_s``; the scheduler is a list scheduler: in readiness
order each subgroup goes to the lane (CPU or device) where it would finish first, the device lane only if
its working memory fits the free device memory of the phase. When the device *is* the CPU
(``shared_compute``) both lanes' copies and kernels run on the same cores: their jobs then also queue on one
shared compute resource, which is the contention term of the model. The schedule is compared with the baselines
(all on the CPU, all on the device when it fits, the plan's fixed split) and the best predicted is kept, so
the scheduler never predicts worse than a baseline (CONVENTIONS: baselines are strategies too).

Throughputs are measured at run time (``RateMeter``: an exponential moving average of what the lanes
achieved, contention included) and start from the plan's cluster numbers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "STATE_BYTES_PER_ELEM",
    "IterationRecord",
    "JobRecord",
    "RateMeter",
    "Schedule",
    "SubgroupWork",
    "Throughputs",
    "cpu_side_s",
    "device_side_s",
    "schedule_subgroups",
    "simulate",
]

Side = Literal["cpu", "device"]
Phase = Literal["backward", "step"]
# fp32 master weights + exp_avg + exp_avg_sq per element (ZeRO paper's K = 12 for mixed-precision Adam)
STATE_BYTES_PER_ELEM = 12


@dataclass(frozen=True, kw_only=True)
class Throughputs:
    """Rates the model uses (measured, or the plan's cluster numbers before the first measurement)."""

    cpu_params_per_s: float  # CPU update kernel, parameters per second
    device_params_per_s: float  # device update kernel
    h2d_bytes_per_s: float  # host -> device copies
    d2h_bytes_per_s: float  # device -> host copies
    read_bytes_per_s: Mapping[str, float] = field(default_factory=dict)  # per staged tier: state reads
    write_bytes_per_s: Mapping[str, float] = field(default_factory=dict)
    shared_compute: bool = False  # the "device" is the CPU: the kernels of both lanes share its cores

    def __post_init__(self) -> None:
        for name in ("cpu_params_per_s", "device_params_per_s", "h2d_bytes_per_s", "d2h_bytes_per_s"):
            value = getattr(self, name)
            if not value > 0 or math.isinf(value):
                raise ValueError(f"{name}: must be a positive finite rate, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class SubgroupWork:
    """One subgroup as the scheduler sees it."""

    index: int
    numel: int
    tier: str  # where its state lives: "device", "dram", "cxl", "nvme"
    staged: bool = False  # state read and written through a staging buffer (NVMe; arenas without views)
    grad_bytes: int = 0  # gradient bytes a CPU-side update moves device -> host
    param_bytes: int = 0  # parameter bytes a CPU-side update moves host -> device
    device_bytes: int = 0  # device working memory of a device-side update
    ready_s: float = 0.0  # when its gradients complete, seconds after the first subgroup's

    @property
    def state_bytes(self) -> int:
        return STATE_BYTES_PER_ELEM * self.numel

    @property
    def pinned_to_device(self) -> bool:
        """State resident on the device: it updates there, nothing moves."""
        return self.tier == "device"


def _io_parts(w: SubgroupWork, r: Throughputs) -> tuple[float, float]:
    """(read, write) seconds of a staged subgroup's state; nothing for in-place state."""
    if not w.staged:
        return 0.0, 0.0
    read = r.read_bytes_per_s.get(w.tier, 0.0)
    write = r.write_bytes_per_s.get(w.tier, 0.0)
    return (w.state_bytes / read if read > 0 else 0.0), (w.state_bytes / write if write > 0 else 0.0)


def _cpu_parts(w: SubgroupWork, r: Throughputs) -> tuple[float, float, float]:
    """(before the kernel, kernel, after the kernel) seconds of a CPU-side update."""
    kernel = w.numel / r.cpu_params_per_s
    io = sum(_io_parts(w, r))
    # the prefetch overlaps the state's I/O with the kernels before it: the lane runs at the slower of the two
    return w.grad_bytes / r.d2h_bytes_per_s + max(0.0, io - kernel), kernel, w.param_bytes / r.h2d_bytes_per_s


def _device_parts(w: SubgroupWork, r: Throughputs) -> tuple[float, float, float]:
    kernel = w.numel / r.device_params_per_s
    if w.pinned_to_device:
        return 0.0, kernel, 0.0
    read, write = _io_parts(w, r)
    return w.state_bytes / r.h2d_bytes_per_s + read, kernel, w.state_bytes / r.d2h_bytes_per_s + write


def cpu_side_s(w: SubgroupWork, r: Throughputs) -> float:
    return sum(_cpu_parts(w, r))


def device_side_s(w: SubgroupWork, r: Throughputs) -> float:
    return sum(_device_parts(w, r))


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """One iteration's decision."""

    sides: tuple[Side, ...]  # by subgroup index
    order: tuple[int, ...]  # subgroup indices in expected readiness order
    strategy: str  # "greedy", "cpu_only", "device_only", "plan", "forced:cpu", "forced:device"
    predicted_s: float  # predicted update makespan from the first ready subgroup
    baselines_s: dict[str, float] = field(default_factory=dict)  # predicted makespan of each candidate
    free_device_bytes: int = 0
    phase: Phase = "step"

    @property
    def device_subgroups(self) -> tuple[int, ...]:
        return tuple(i for i, s in enumerate(self.sides) if s == "device")

    def device_fraction(self, numels: Sequence[int]) -> float:
        total = sum(numels)
        return sum(n for n, s in zip(numels, self.sides) if s == "device") / total if total else 0.0


def simulate(
    work: Sequence[SubgroupWork], sides: Mapping[int, Side], order: Sequence[int], rates: Throughputs
) -> float:
    """Makespan of a fixed assignment, subgroups started in ``order`` on their lanes."""
    by_index = {w.index: w for w in work}
    free = {"cpu": 0.0, "device": 0.0}
    compute_free = 0.0
    end = 0.0
    for i in order:
        w = by_index[i]
        side = sides[i]
        finish, compute_free = _place(w, side, free[side], compute_free, rates)
        free[side] = finish
        end = max(end, finish)
    return end


def _place(
    w: SubgroupWork, side: Side, lane_free: float, compute_free: float, r: Throughputs
) -> tuple[float, float]:
    """(finish time, new compute-resource free time) of ``w`` started on ``side``."""
    pre, kernel, post = (_cpu_parts if side == "cpu" else _device_parts)(w, r)
    start = max(lane_free, w.ready_s)
    if r.shared_compute:
        # contention: the "device" is the CPU, so its copies and kernels and the CPU lane's all run on the
        # same cores; the lanes' jobs take turns on that one resource
        start = max(start, compute_free)
        finish = start + pre + kernel + post
        return finish, finish
    return start + pre + kernel + post, compute_free


def _fits(w: SubgroupWork, free_device_bytes: int) -> bool:
    return w.pinned_to_device or w.device_bytes <= free_device_bytes


def schedule_subgroups(
    work: Sequence[SubgroupWork],
    rates: Throughputs,
    *,
    free_device_bytes: int,
    order: Sequence[int] | None = None,
    plan_sides: Mapping[int, Side] | None = None,
    phase: Phase = "step",
) -> Schedule:
    """The best predicted of: the greedy list schedule, all-CPU, all-device (if it fits), the plan's split.

    ``order`` is the expected readiness order (default: by ``ready_s``, then index). A subgroup whose state
    is on the device always updates there; one whose working memory exceeds ``free_device_bytes`` never does.
    """
    if order is None:
        order = [w.index for w in sorted(work, key=lambda w: (w.ready_s, w.index))]
    order = tuple(order)
    by_index = {w.index: w for w in work}
    if sorted(order) != sorted(by_index):
        raise ValueError("order: must list every subgroup index exactly once")

    # greedy: earliest finish time, in readiness order
    free = {"cpu": 0.0, "device": 0.0}
    compute_free = 0.0
    greedy: dict[int, Side] = {}
    for i in order:
        w = by_index[i]
        options: list[Side] = ["device"] if w.pinned_to_device else ["cpu"]
        if not w.pinned_to_device and _fits(w, free_device_bytes):
            options.append("device")
        best: tuple[float, int, Side, float] | None = None
        for side in options:
            finish, cf = _place(w, side, free[side], compute_free, rates)
            key = (finish, 0 if side == "cpu" else 1, side, cf)  # a tie goes to the CPU (no transfers)
            if best is None or key[:2] < best[:2]:
                best = key
        assert best is not None  # options is never empty
        finish, _, side, compute_free = best
        free[side] = finish
        greedy[i] = side

    candidates: dict[str, dict[int, Side]] = {"greedy": greedy}
    candidates["cpu_only"] = {w.index: ("device" if w.pinned_to_device else "cpu") for w in work}
    if all(_fits(w, free_device_bytes) for w in work):
        candidates["device_only"] = {w.index: "device" for w in work}
    if plan_sides is not None:
        candidates["plan"] = {
            w.index: (
                "device"
                if w.pinned_to_device or (plan_sides.get(w.index) == "device" and _fits(w, free_device_bytes))
                else "cpu"
            )
            for w in work
        }
    predicted = {name: simulate(work, sides, order, rates) for name, sides in candidates.items()}
    # the lowest predicted makespan; ties keep the earlier candidate (greedy, then the baselines)
    names = list(candidates)
    chosen = min(names, key=lambda n: (predicted[n], names.index(n)))
    n_sub = max(by_index) + 1 if by_index else 0
    sides = tuple(candidates[chosen].get(i, "cpu") for i in range(n_sub))
    return Schedule(
        sides=sides,
        order=order,
        strategy=chosen,
        predicted_s=predicted[chosen],
        baselines_s=predicted,
        free_device_bytes=int(free_device_bytes),
        phase=phase,
    )


# ---- measurement ---------------------------------------------------------------------------------------------


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
