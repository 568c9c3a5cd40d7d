"""Optimizer-state placement for interleaved offload: subgroup size, tier per subgroup, expected split.

The planner half of Deep Optimizer States (Maurya et al. 2024, "Towards Scalable Training of Transformer
Models Using Interleaved Offloading"); the runtime half is ``offload.optimizer``. From the ClusterSpec numbers
alone (pure Python, no torch) it decides:

- the subgroup size: about ``target_subgroups`` subgroups per device (enough to pipeline the updates behind
  backward and the NVMe reads behind the updates), at least ``min_subgroup_elems`` (per-subgroup overheads:
  kernel launches, I/O latency), and small enough that one subgroup's device working set (12 B/element of
  fp32 master weights and moments, plus 4 B for an fp32 gradient in mixed precision) fits the device memory
  free during the update. The runtime packs whole tensors up to this size (DeepSpeed ZeRO-3's
  ``sub_group_size`` semantics).
- the tier of each subgroup: host DRAM first, then CXL, then NVMe, each up to its capacity share per device
  (less a reserve for swapped activations and the OS). Backward completes the last subgroups first, so they
  are placed in DRAM and the first subgroups (updated last, with the most time to be prefetched) go to NVMe
  (the prefetch order of ZeRO-Infinity, Rajbhandari et al. 2021, Sec. 6.2).
- the expected split: the number of subgroups updated on the device that minimises the update time of the
  model below, interleaved evenly among the CPU ones (the paper's interleaving).

The update-time model, per device, for ``n_cpu`` elements updated on the CPU and ``n_dev`` on the device
(``S`` = 12 bytes of state per element, ``d`` bytes per parameter/gradient in the workload dtype):

  CPU lane     g * n_cpu / cpu.adam_params_per_s     (ZeRO-Offload's CPU Adam, Ren et al. 2021, Sec. 4; the
                                                      node's CPU serves its g devices at once)
  device lane  n_dev / device update rate            (memory-bound, as the step-time model)
  host link    (n_cpu * d + n_dev * S) / host_link    per direction: gradients down and parameters up for
                                                      the CPU side, the state in and out for the device side
  NVMe         g * n_nvme * S * (1/read + 1/write)   (whichever side updates it; the node's drives)

  update time = max(CPU lane, device lane, host link, NVMe)   (the four resources work concurrently)

Memory tiers (DRAM, CXL) are assumed updated in place (no staging copy). The time is not credited with the
overlap of CPU updates and the last backward (the runtime does it when clipping is off; with clipping it
must wait for the global norm), so the prediction is conservative.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from planner.cluster import ClusterSpec
from planner.errors import SpecError
from planner.memory import MemoryOptions, Offload, device_params, stage_layer_counts, trainable_device_params
from planner.model import ModelSpec
from planner.plan import Layout, OptimizerPlan, Subgroup
from planner.steptime import estimate_step_time
from planner.strategy import (
    HostTier,
    StrategyInput,
    StrategyKind,
    StrategyResult,
    host_fits,
    strategy_report,
)
from planner.workload import Workload

__all__ = [
    "STATE_BYTES_PER_ELEM",
    "OptimizerInterleaved",
    "Placement",
    "PlacementSettings",
    "place_optimizer",
    "plan_placement",
    "update_time_s",
]

STATE_BYTES_PER_ELEM = 12  # fp32 master weights + exp_avg + exp_avg_sq (ZeRO paper, K = 12)
GRAD_UPCAST_BYTES = 4  # an fp32 copy of a 16-bit gradient for the device-side update


@dataclass(frozen=True, kw_only=True)
class PlacementSettings:
    target_subgroups: int = 16  # subgroups per device to aim for
    min_subgroup_elems: int = 1 << 20  # smallest subgroup worth its per-subgroup overheads
    max_subgroup_elems: int = 1 << 28  # largest subgroup (bounds host staging buffers)
    round_elems: int = 1 << 20  # subgroup sizes are multiples of this
    host_reserve_fraction: float = 0.1  # of each host tier, kept for activation swap, pinned buffers, the OS
    tier_order: tuple[HostTier, ...] = ("dram", "cxl", "nvme")  # preference
    interleave: bool = True  # allow device-side updates at all (False: the ZeRO-Offload split, all CPU)

    def __post_init__(self) -> None:
        for name in ("target_subgroups", "min_subgroup_elems", "max_subgroup_elems", "round_elems"):
            if getattr(self, name) < 1:
                raise SpecError(f"must be >= 1, got {getattr(self, name)}", field=name)
        if self.min_subgroup_elems > self.max_subgroup_elems:
            raise SpecError(
                f"min_subgroup_elems({self.min_subgroup_elems}) > max_subgroup_elems({self.max_subgroup_elems})",
                field="min_subgroup_elems",
            )
        if not 0.0 <= self.host_reserve_fraction < 1.0:
            raise SpecError(
                f"must be in [0, 1), got {self.host_reserve_fraction}", field="host_reserve_fraction"
            )
        if not self.tier_order or any(t not in ("dram", "cxl", "nvme") for t in self.tier_order):
            raise SpecError(f"must list dram, cxl, nvme tiers, got {self.tier_order}", field="tier_order")


@dataclass(frozen=True, kw_only=True)
class Placement:
    """The placement and what it predicts (per device)."""

    plan: OptimizerPlan
    device_bytes: int  # model states on the device with the optimizer offloaded (parameters + gradients)
    update_free_bytes: int  # device bytes free in the update phase (budget less the model states)
    host_bytes: dict[str, int]  # optimizer state per host tier
    update_s: float  # predicted update time with the chosen split
    cpu_only_s: float  # the same model with every subgroup on the CPU (ZeRO-Offload)
    fits: bool
    reason: str = ""  # why it does not fit


# ---- the model -------------------------------------------------------------------------------------------------


def device_update_rate(cluster: ClusterSpec, workload: Workload) -> float:
    """Parameters per second of the device-side AdamW update.

    As the step-time model (planner/steptime.py): an element-wise update is memory-bound, reading parameters,
    gradients and state and writing parameters and state back, (3d + 2 * 12) bytes per parameter at the
    device's memory bandwidth. When the device is the CPU, the CPU's measured AdamW rate.
    """
    dev = cluster.device
    if dev.kind == "cpu":
        return cluster.cpu.adam_params_per_s
    return dev.memory_bandwidth / (3 * workload.dtype_bytes + 2 * STATE_BYTES_PER_ELEM)


def update_time_s(
    cluster: ClusterSpec, workload: Workload, *, cpu_elems: int, device_elems: int, nvme_elems: int
) -> float:
    """The update-time model of the module docstring, seconds per step, for one device's elements.

    A node's CPU and NVMe drives serve all of its devices at once (as the step-time model charges the CPU
    step), so their terms scale with ``devices_per_node``; when the device is the CPU both lanes are one
    resource.
    """
    d = workload.dtype_bytes
    per_node = cluster.devices_per_node
    cpu = cpu_elems * per_node / cluster.cpu.adam_params_per_s
    dev = device_elems / device_update_rate(cluster, workload)
    if cluster.device.kind == "cpu":
        cpu, dev = cpu + dev * per_node, 0.0
    link = (cpu_elems * d + device_elems * STATE_BYTES_PER_ELEM) / cluster.device.host_link.bandwidth
    nvme = 0.0
    if nvme_elems:
        spec = cluster.tier("nvme")
        if spec is not None:
            state = nvme_elems * STATE_BYTES_PER_ELEM * per_node
            nvme = state / spec.read_bandwidth + state / spec.write_bandwidth
    return max(cpu, dev, link, nvme)


def _states_on_device(model: ModelSpec, workload: Workload, layout: Layout) -> tuple[int, int]:
    """(parameters of the worst pipeline stage, their parameter + gradient bytes on one device)."""
    worst_params, worst_bytes = 0, 0
    d = workload.dtype_bytes
    dp = layout.dp * layout.cp
    for s in range(len(stage_layer_counts(model, layout.pp, layout.stage_layers))):
        psi = trainable_device_params(model, workload, layout, s)  # (LoRA: the adapters)
        params = device_params(model, layout, s) * d / (dp if layout.zero_stage >= 3 else 1)
        grads = psi * d / (dp if layout.zero_stage >= 2 else 1)
        if psi > worst_params:
            worst_params, worst_bytes = psi, int(params + grads)
    return worst_params, worst_bytes


def _subgroup_size(psi: int, free: int, working_per_elem: int, s: PlacementSettings) -> int:
    size = math.ceil(psi / s.target_subgroups)
    size = max(s.min_subgroup_elems, min(s.max_subgroup_elems, size))
    fit = free // working_per_elem if working_per_elem else size
    if fit >= s.min_subgroup_elems:
        size = min(size, fit)  # a device-side update's working set fits the free device memory
    size = math.ceil(size / s.round_elems) * s.round_elems
    return max(1, min(size, psi)) if psi else 0


def _interleaved(count: int, k: int) -> list[bool]:
    """``k`` of ``count`` slots marked, spread evenly (Bresenham): the device subgroups among the CPU ones."""
    return [(i + 1) * k // count > i * k // count for i in range(count)] if count else []


def plan_placement(
    model: ModelSpec,
    cluster: ClusterSpec,
    workload: Workload,
    layout: Layout,
    budget_bytes: int,
    *,
    settings: PlacementSettings | None = None,
    update_free_bytes: int | None = None,
) -> Placement:
    """Subgroup size, tier per subgroup and the expected device/CPU split for one layout.

    ``budget_bytes`` is the usable device memory per device (headroom taken off); ``update_free_bytes``
    overrides the device memory free during the update (default: the budget less parameters and gradients).
    """
    s = settings or PlacementSettings()
    if workload.optimizer.kind != "adamw":
        raise SpecError(
            f"interleaved offload carries out AdamW, the workload uses {workload.optimizer.kind!r}",
            field="workload.optimizer.kind",
        )
    psi, on_device = _states_on_device(model, workload, layout)
    free = max(0, budget_bytes - on_device) if update_free_bytes is None else max(0, update_free_bytes)
    working = STATE_BYTES_PER_ELEM + (GRAD_UPCAST_BYTES if workload.mixed_precision else 0)
    size = _subgroup_size(psi, free, working, s)
    numels = [min(size, psi - i) for i in range(0, psi, size)] if size else []
    count = len(numels)

    # tiers: DRAM for the last subgroups (updated first), NVMe for the first (updated last, prefetched)
    per_device = cluster.devices_per_node
    room = {
        t: int(spec.capacity * (1 - s.host_reserve_fraction) / per_device)
        for t in s.tier_order
        if (spec := cluster.tier(t)) is not None
    }
    tiers: list[str] = [""] * count
    host: dict[str, int] = {}
    reason = ""
    for i in reversed(range(count)):
        need = numels[i] * STATE_BYTES_PER_ELEM
        for t in s.tier_order:
            if t in room and room[t] >= need:
                room[t] -= need
                tiers[i] = t
                host[t] = host.get(t, 0) + need
                break
        else:
            tiers[i] = s.tier_order[-1] if s.tier_order[-1] in room else (next(iter(room), "dram"))
            host[tiers[i]] = host.get(tiers[i], 0) + need
            reason = (
                f"optimizer state {psi * STATE_BYTES_PER_ELEM} B per device does not fit the host tiers "
                f"({', '.join(t for t in s.tier_order if cluster.tier(t) is not None) or 'none'}) with "
                f"{100 * s.host_reserve_fraction:.0f}% reserved"
            )
    nvme_elems = sum(n for n, t in zip(numels, tiers) if t == "nvme")

    # the split: k device-side subgroups (interleaved) minimising the update time
    def timed(k: int) -> float:
        marks = _interleaved(count, k)
        dev = sum(n for n, m in zip(numels, marks) if m)
        return update_time_s(cluster, workload, cpu_elems=psi - dev, device_elems=dev, nvme_elems=nvme_elems)

    cpu_only = timed(0)
    best_k, best_t = 0, cpu_only
    if s.interleave and count and max(numels) * working <= free:
        for k in range(1, count + 1):
            took = timed(k)
            if took < best_t - 1e-12:
                best_k, best_t = k, took
    marks = _interleaved(count, best_k)
    subgroups = tuple(
        Subgroup(index=i, numel=n, tier=tiers[i], update_side="device" if m else "cpu")  # type: ignore[arg-type]
        for i, (n, m) in enumerate(zip(numels, marks))
    )
    dev_elems = sum(n for n, m in zip(numels, marks) if m)
    primary = max(host, key=lambda t: host[t]) if host else "dram"
    opt = workload.optimizer
    plan = OptimizerPlan(
        kind="adamw",
        settings={"lr": opt.lr, "betas": list(opt.betas), "eps": opt.eps, "weight_decay": opt.weight_decay},
        offload=True,
        tier=primary,  # type: ignore[arg-type]
        subgroup_size=size,
        subgroups=subgroups,
        device_update_fraction=dev_elems / psi if psi else 0.0,
        # each subgroup on the side planned for it (an "auto" schedule, measured per rank, would differ
        # between data-parallel ranks); with no subgroup, nothing to schedule: the CPU
        schedule="plan" if subgroups else "cpu",
        max_grad_norm=workload.max_grad_norm,
    )
    fits = not reason and on_device <= budget_bytes
    if not reason and on_device > budget_bytes:
        reason = f"parameters + gradients {on_device} B > device budget {budget_bytes} B"
    return Placement(
        plan=plan,
        device_bytes=on_device,
        update_free_bytes=free,
        host_bytes=host,
        update_s=best_t,
        cpu_only_s=cpu_only,
        fits=fits,
        reason=reason,
    )


def place_optimizer(
    model: ModelSpec,
    cluster: ClusterSpec,
    workload: Workload,
    layout: Layout,
    budget: int,
    *,
    settings: PlacementSettings | None = None,
) -> OptimizerPlan:
    """The ``OptimizerPlan`` of ``plan_placement`` (what ``offload.optimizer.offload_optimizer`` carries out)."""
    return plan_placement(model, cluster, workload, layout, budget, settings=settings).plan


# ---- the planning strategy ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimizerInterleaved:
    """Optimizer state in the host tiers, each subgroup updated on the CPU or the device (Deep Optimizer States).

    A ``planner.strategy.Strategy``. It applies to AdamW with ZeRO-0 (memtier's runtime replicates the optimizer
    over data parallelism; ZeRO-partitioned offload is DeepSpeed's "offload" strategy) on an accelerator
    (not a CPU device) when the cluster has a host tier. ``added_time_s`` is the predicted update time less
    what the step-time model charges for a CPU-only offload of the same state (negative: the time
    interleaving saves); the search books it under the "optimizer" term of the breakdown.
    """

    name: str = "interleaved"
    kind: StrategyKind = "optimizer"
    expensive: bool = False
    settings: PlacementSettings = dataclasses.field(default_factory=PlacementSettings)

    def applies(self, inp: StrategyInput) -> bool:
        return (
            inp.workload.optimizer.kind == "adamw"
            and inp.layout.zero_stage == 0
            # a CPU device and the host update on one resource: there is nothing to interleave
            and inp.cluster.device.kind != "cpu"
            and any(inp.cluster.tier(t) is not None for t in self.settings.tier_order)
        )

    def placement(self, inp: StrategyInput) -> Placement:
        return plan_placement(
            inp.model, inp.cluster, inp.workload, inp.layout, inp.budget_bytes, settings=self.settings
        )

    def solve(self, inp: StrategyInput) -> StrategyResult:
        pl = self.placement(inp)
        options: MemoryOptions = dataclasses.replace(
            inp.options,
            offload=Offload(optimizer=True, tier=pl.plan.tier if pl.plan.tier != "device" else "dram"),
        )
        charged = estimate_step_time(
            inp.model, inp.cluster, inp.workload, inp.layout, options, links=inp.links
        ).optimizer_s
        fits = pl.fits and host_fits(inp.cluster, pl.host_bytes)
        return StrategyResult(
            kind="optimizer",
            strategy=self.name,
            options=options,
            device_bytes=pl.device_bytes,
            host_bytes=dict(pl.host_bytes),
            added_time_s=pl.update_s - charged,
            fits=fits,
            optimizer_plan=pl.plan,
            report=strategy_report("optimizer", self.name, fits, pl.update_s),
        )
