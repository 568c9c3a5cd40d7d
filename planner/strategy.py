"""The strategy interface: how a memory decision (optimizer placement, activation policy) joins a plan.

A plan makes two memory decisions per parallel layout, optimizer placement first, then the activation
policy. Each is made by a *strategy* behind one Protocol (`Strategy`): it reads the specs, the layout, the
device budget and the decisions made so far (a `MemoryOptions`), all in a `StrategyInput`, and returns a
typed `StrategyResult` with its pieces applied to those options, the bytes and exposed time it predicts,
and a `SolverReport`. Baselines and solvers alike are strategies (CONVENTIONS: "Baselines are strategies
too"); `planner.strategies` and `planner.optimizer_placement` hold them, `planner.search` and
`planner.budget` run them.

"Stage" in this package means a pipeline stage only: the helpers below find the pipeline stage that holds
a layout's peak.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from planner.cluster import ClusterSpec
from planner.comm import GroupLink
from planner.memory import (
    MemoryBreakdown,
    MemoryOptions,
    Offload,
    estimate_memory,
    gradients_consumed_in_backward,
    model_states,
    stage_layer_counts,
)
from planner.model import ModelSpec
from planner.plan import Layout, OptimizerPlan, SolverReport
from planner.workload import Workload

StrategyKind = Literal["optimizer", "activations"]  # the decision a strategy makes
HostTier = Literal["dram", "cxl", "nvme"]


@dataclass(frozen=True, kw_only=True)
class StrategyInput:
    """What a strategy sees: the specs, one layout, the budget and the decisions made before it."""

    model: ModelSpec
    cluster: ClusterSpec
    workload: Workload
    layout: Layout
    budget_bytes: int  # usable device bytes per device (headroom already taken off)
    options: MemoryOptions = field(default_factory=MemoryOptions)  # decisions made so far
    links: dict[str, GroupLink] | None = None  # slowest link per group kind under the current mapping
    time_limit_s: float = 10.0  # for solver strategies
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class StrategyResult:
    kind: StrategyKind
    strategy: str
    options: MemoryOptions  # the input's options with this strategy's pieces applied
    device_bytes: int  # predicted peak bytes per device (worst pipeline stage) after this decision
    host_bytes: dict[str, int] = field(default_factory=dict)  # per device, by host tier
    added_time_s: float = 0.0  # exposed time the step-time model does not see from `options`
    fits: bool = True  # device and host capacities hold
    memory: MemoryBreakdown | None = None  # the full breakdown when the strategy computed one
    # an optimizer strategy's placement when it decides more than offload on/off (subgroups, tiers, split)
    optimizer_plan: OptimizerPlan | None = None
    report: SolverReport


@runtime_checkable
class Strategy(Protocol):
    """One way to make one memory decision."""

    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> StrategyKind: ...

    @property
    def expensive(self) -> bool:
        """Run by the layout search only on its best few layouts (a solver per layout would be too slow)."""
        ...

    def applies(self, inp: StrategyInput) -> bool:
        """Whether this strategy can run on this layout at all (e.g. ZeRO-Offload needs ZeRO >= 1)."""
        ...

    def solve(self, inp: StrategyInput) -> StrategyResult: ...


def strategy_report(kind: StrategyKind, strategy: str, fits: bool, objective: float = 0.0) -> SolverReport:
    """The report of a strategy that solves nothing (a baseline): feasible or not, and its objective."""
    return SolverReport(
        problem=kind, strategy=strategy, status="feasible" if fits else "infeasible", objective=objective
    )


# ---- memory of the worst pipeline stage ------------------------------------------------


def dominant_stages(model: ModelSpec, layout: Layout) -> list[int]:
    """Pipeline stages that can hold the peak; the others are dominated.

    A middle stage k holds the parameters of its blocks and, in 1F1B, the activations of
    min(pp - k, m) micro-batches (Narayanan et al. 2021, Sec. 2.2): of two middle stages
    with the same number of blocks the earlier one holds at least as much. So the peak is
    at the first stage, the last, or the first stage of each distinct block count. This
    holds for the uniform options; per-layer policies can differ between stages, and then
    every stage is checked.
    """
    counts = stage_layer_counts(model, layout.pp, layout.stage_layers)
    out = {0, layout.pp - 1}
    seen: set[int] = set()
    for s, n in enumerate(counts):
        if n not in seen:
            seen.add(n)
            out.add(s)
    return sorted(out)


def peak_memory(
    model: ModelSpec,
    workload: Workload,
    layout: Layout,
    options: MemoryOptions,
    *,
    same_policy_per_stage: bool = False,
) -> MemoryBreakdown:
    """`estimate_memory(..., stage=None)` (the worst stage), evaluating only stages that can win.

    With per-layer policies every stage is evaluated, unless the caller says each stage
    applies the same pattern to its blocks (`same_policy_per_stage`, as the block method).
    """
    if options.policies and not same_policy_per_stage:
        return estimate_memory(model, workload, layout, options)
    return max(
        (estimate_memory(model, workload, layout, options, stage=s) for s in dominant_stages(model, layout)),
        key=lambda m: m.total,
    )


def states_bytes(model: ModelSpec, workload: Workload, layout: Layout, offload: Offload) -> int:
    """Model-state bytes on the device of the worst stage: a lower bound on its peak."""
    worst = 0
    for s in dominant_stages(model, layout):
        st = model_states(model, workload, layout, s)
        opt = 0 if offload.optimizer else st.optimizer_states
        params = 0 if offload.params else st.parameters
        # grads live at the optimizer step whatever the activation policy, unless an offloaded
        # optimizer takes each as it completes (one micro-batch: planner.memory.gradients_during_backward)
        consumed = gradients_consumed_in_backward(layout, offload, layerwise=workload.layerwise)
        grads = 0 if consumed else st.gradients
        worst = max(worst, params + opt + grads)
    return worst


def host_fits(cluster: ClusterSpec, host_bytes: dict[str, int]) -> bool:
    """Per-device host bytes, times the devices of a node, within each tier's capacity."""
    for tier, b in host_bytes.items():
        spec = cluster.tier(tier)
        if spec is None or b * cluster.devices_per_node > spec.capacity:
            return False
    return True
