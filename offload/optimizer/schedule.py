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

Throughputs are measured at run time (``offload.optimizer.records.RateMeter``: an exponential moving average
of what the lanes achieved, contention included) and start from the plan's cluster numbers
(``initial_throughputs``). Which work the optimizer hands this model each iteration is
``offload.optimizer.scheduler``'s business.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from planner.plan import Plan

__all__ = [
    "STATE_BYTES_PER_ELEM",
    "Phase",
    "Schedule",
    "Side",
    "SubgroupWork",
    "Throughputs",
    "cpu_side_s",
    "default_throughputs",
    "device_side_s",
    "initial_throughputs",
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


def _greedy_sides(
    order: Sequence[int], by_index: Mapping[int, SubgroupWork], rates: Throughputs, free_device_bytes: int
) -> dict[int, Side]:
    """The list schedule: in readiness order, each subgroup on the lane where it would finish first."""
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
    return greedy


def _baselines(
    work: Sequence[SubgroupWork], free_device_bytes: int, plan_sides: Mapping[int, Side] | None
) -> dict[str, dict[int, Side]]:
    """The baselines the list schedule is compared with: all on the CPU, all on the device (when it fits),
    the plan's split (where it fits)."""
    candidates: dict[str, dict[int, Side]] = {}
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
    return candidates


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
    candidates = {"greedy": _greedy_sides(order, by_index, rates, free_device_bytes)}
    candidates.update(_baselines(work, free_device_bytes, plan_sides))
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


# ---- starting rates ------------------------------------------------------------------------------------------


def default_throughputs(device: torch.device) -> Throughputs:
    """Order-of-magnitude starting rates when no plan is given (replaced by measurements after a step)."""
    cuda = device.type == "cuda"
    return Throughputs(
        cpu_params_per_s=2e8,
        device_params_per_s=2e10 if cuda else 2e8,
        h2d_bytes_per_s=2e10 if cuda else 8e9,
        d2h_bytes_per_s=2e10 if cuda else 8e9,
        read_bytes_per_s={"nvme": 2e9, "dram": 8e9, "cxl": 4e9},
        write_bytes_per_s={"nvme": 1.5e9, "dram": 8e9, "cxl": 4e9},
        shared_compute=not cuda,
    )


def initial_throughputs(plan: Plan, device: torch.device) -> Throughputs:
    """Starting rates from the plan's cluster: the CPU Adam rate, the host link, the host tiers' bandwidths."""
    cluster = plan.cluster
    dev = cluster.device
    d = plan.workload.dtype_bytes
    # device update: memory-bound, as the step-time model (planner/steptime.py): parameters, gradients and
    # state read, parameters and state written, (3d + 2 * 12) bytes per parameter at the memory bandwidth
    device_rate = dev.memory_bandwidth / (3 * d + 2 * STATE_BYTES_PER_ELEM)
    if device.type == "cpu":
        device_rate = cluster.cpu.adam_params_per_s  # the "device" is the CPU
    reads: dict[str, float] = {t.kind: t.read_bandwidth for t in cluster.host}
    writes: dict[str, float] = {t.kind: t.write_bandwidth for t in cluster.host}
    return Throughputs(
        cpu_params_per_s=cluster.cpu.adam_params_per_s,
        device_params_per_s=device_rate,
        h2d_bytes_per_s=dev.host_link.bandwidth,
        d2h_bytes_per_s=dev.host_link.bandwidth,
        read_bytes_per_s=reads,
        write_bytes_per_s=writes,
        shared_compute=device.type == "cpu",
    )
