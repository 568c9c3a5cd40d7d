"""The stage interface: how memory decisions (optimizer placement, activation policy) join the search.

For every parallel layout the search runs an optimizer stage, then an activation
stage. Each stage is a strategy behind one Protocol: it reads the specs, the layout,
the device budget and the decisions earlier stages made (a `MemoryOptions`), and
returns a typed `StageResult` with its pieces applied to those options, the bytes
and exposed time it predicts, and a `SolverReport`. Baselines are strategies too
(CONVENTIONS: "Baselines are strategies too"):

  optimizer    "resident"           optimizer state on the device (ZeRO partitions it)
               "offload"            all optimizer state in host DRAM, the update on the CPU
                                    (ZeRO-Offload, Ren et al. 2021)
               "interleaved"        optimizer state in the host tiers by subgroup, each subgroup
                                    updated on the CPU or the device (Deep Optimizer States,
                                    `planner.optimizer_placement`); in OPTIMIZER_STAGES
  activations  "keep_all"           every block keeps what autograd saves
               "recompute_all"      every block is recomputed (Chen et al. 2016)
               "recompute_block"    the first N blocks of each pipeline stage are recomputed,
                                    the fewest N that fit (Megatron-LM's
                                    --recompute-method block --recompute-num-layers N)

The swap/recompute MIP (`planner.mip.activations`) joins as another activation
strategy: an adapter that turns its per-layer `ActivationPolicy`s into
`StageResult.options.policies` and its exposed swap time into `added_time_s`.
A strategy whose `expensive` flag is set is run by the search only on its best few
layouts (a MIP per layout of a 1024-GPU enumeration would not answer in a minute).
"""

from __future__ import annotations

import dataclasses
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
)
from planner.model import ModelSpec
from planner.optimizer_placement import OptimizerInterleaved  # imports this module lazily: no cycle
from planner.plan import ActivationPolicy, Layout, OptimizerPlan, SolverReport
from planner.workload import Workload

StageKind = Literal["optimizer", "activations"]


@dataclass(frozen=True, kw_only=True)
class StageInput:
    """What a stage sees: the specs, one layout, the budget and the earlier stages' decisions."""

    model: ModelSpec
    cluster: ClusterSpec
    workload: Workload
    layout: Layout
    budget_bytes: int  # usable device bytes per device (headroom already taken off)
    options: MemoryOptions = field(default_factory=MemoryOptions)  # decisions made so far
    links: dict[str, GroupLink] | None = None  # slowest link per group kind under the current mapping
    time_limit_s: float = 10.0  # for solver stages
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class StageResult:
    kind: StageKind
    strategy: str
    options: MemoryOptions  # the input's options with this stage's pieces applied
    device_bytes: int  # predicted peak bytes per device (worst pipeline stage) after this stage
    host_bytes: dict[str, int] = field(default_factory=dict)  # per device, by host tier
    added_time_s: float = 0.0  # exposed time the step-time model does not see from `options`
    fits: bool = True  # device and host capacities hold
    memory: MemoryBreakdown | None = None  # the full breakdown when the stage computed one
    # an optimizer stage's placement when it decides more than offload on/off (subgroups, tiers, split)
    optimizer_plan: OptimizerPlan | None = None
    report: SolverReport


@runtime_checkable
class Stage(Protocol):
    """One decision of the search, as a strategy."""

    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> StageKind: ...

    @property
    def expensive(self) -> bool: ...

    def applies(self, inp: StageInput) -> bool:
        """Whether this strategy can run on this layout at all (e.g. offload needs ZeRO >= 1)."""
        ...

    def solve(self, inp: StageInput) -> StageResult: ...


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
    from planner.memory import stage_layer_counts

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
        grads = 0 if gradients_consumed_in_backward(layout, offload) else st.gradients
        worst = max(worst, params + opt + grads)
    return worst


def host_fits(cluster: ClusterSpec, host_bytes: dict[str, int]) -> bool:
    """Per-device host bytes, times the devices of a node, within each tier's capacity."""
    for tier, b in host_bytes.items():
        spec = cluster.tier(tier)
        if spec is None or b * cluster.devices_per_node > spec.capacity:
            return False
    return True


def _report(kind: StageKind, strategy: str, fits: bool, objective: float = 0.0) -> SolverReport:
    return SolverReport(
        stage=kind, strategy=strategy, status="feasible" if fits else "infeasible", objective=objective
    )


# ---- optimizer-state placement ---------------------------------------------------------


def _placement_result(
    name: str, options: MemoryOptions, need: int, host: dict[str, int], *, fits: bool
) -> StageResult:
    """An optimizer baseline's result: model-state bytes on the device (a lower bound on the peak)."""
    return StageResult(
        kind="optimizer",
        strategy=name,
        options=options,
        device_bytes=need,
        host_bytes=host,
        fits=fits,
        report=_report("optimizer", name, fits, need),
    )


@dataclass(frozen=True)
class OptimizerResident:
    name: str = "resident"
    kind: StageKind = "optimizer"
    expensive: bool = False

    def applies(self, inp: StageInput) -> bool:
        return True

    def solve(self, inp: StageInput) -> StageResult:
        options = dataclasses.replace(inp.options, offload=Offload())
        need = states_bytes(inp.model, inp.workload, inp.layout, options.offload)
        return _placement_result(self.name, options, need, {}, fits=need <= inp.budget_bytes)


@dataclass(frozen=True)
class OptimizerOffload:
    """All optimizer state (fp32 master weights and moments) in a host tier, updated on the CPU.

    DeepSpeed offers this for ZeRO stages 1-3 (`zero_optimization.offload_optimizer`), so the
    layout must partition the optimizer (ZeRO >= 1) and the node's host tier must hold the
    state of all its devices.
    """

    name: str = "offload"
    kind: StageKind = "optimizer"
    expensive: bool = False
    tier: Literal["dram", "cxl", "nvme"] = "dram"

    def applies(self, inp: StageInput) -> bool:
        return inp.layout.zero_stage >= 1 and inp.cluster.tier(self.tier) is not None

    def solve(self, inp: StageInput) -> StageResult:
        options = dataclasses.replace(inp.options, offload=Offload(optimizer=True, tier=self.tier))
        need = states_bytes(inp.model, inp.workload, inp.layout, options.offload)
        host: dict[str, int] = {
            self.tier: max(
                model_states(inp.model, inp.workload, inp.layout, s).optimizer_states
                for s in dominant_stages(inp.model, inp.layout)
            )
        }
        fits = need <= inp.budget_bytes and host_fits(inp.cluster, host)
        return _placement_result(self.name, options, need, host, fits=fits)


# ---- activation policy -----------------------------------------------------------------


def _activation_result(
    inp: StageInput, name: str, options: MemoryOptions, mem: MemoryBreakdown | None = None
) -> StageResult:
    mem = mem or peak_memory(inp.model, inp.workload, inp.layout, options)
    fits = mem.total <= inp.budget_bytes and host_fits(inp.cluster, mem.host_bytes)
    return StageResult(
        kind="activations",
        strategy=name,
        options=options,
        device_bytes=mem.total,
        host_bytes=dict(mem.host_bytes),
        fits=fits,
        memory=mem,
        report=_report("activations", name, fits, mem.total),
    )


@dataclass(frozen=True)
class UniformActivations:
    """Every block alike: keep what autograd saves (`recompute="none"`) or recompute it all ("full")."""

    name: str
    recompute: Literal["none", "full"]
    kind: StageKind = "activations"
    expensive: bool = False

    def applies(self, inp: StageInput) -> bool:
        return True

    def solve(self, inp: StageInput) -> StageResult:
        return _activation_result(
            inp, self.name, dataclasses.replace(inp.options, recompute=self.recompute, policies=())
        )


@dataclass(frozen=True)
class KeepAll(UniformActivations):
    name: str = "keep_all"
    recompute: Literal["none", "full"] = "none"


@dataclass(frozen=True)
class RecomputeAll(UniformActivations):
    name: str = "recompute_all"
    recompute: Literal["none", "full"] = "full"


def block_policies(model: ModelSpec, layout: Layout, per_stage: int) -> tuple[ActivationPolicy, ...]:
    """Megatron's block method: the first `per_stage` blocks of every pipeline stage are recomputed."""
    from planner.memory import stage_layer_counts

    out = []
    first = 0
    for n in stage_layer_counts(model, layout.pp, layout.stage_layers):
        for j in range(n):
            if j < per_stage:
                out.append(ActivationPolicy(layer=first + j, keep_fraction=0.0, recompute_fraction=1.0))
            else:
                out.append(ActivationPolicy(layer=first + j))
        first += n
    return tuple(out)


@dataclass(frozen=True)
class RecomputeBlock:
    """The fewest recomputed blocks per pipeline stage (the same count in every stage) that fit.

    Between keep-all and recompute-all; the same count in every stage matches the
    step-time model, which spreads recompute over the stages by their share of blocks.
    Only offered when it differs from both ends (0 < N < blocks of the largest stage).
    """

    name: str = "recompute_block"
    kind: StageKind = "activations"
    expensive: bool = False

    def applies(self, inp: StageInput) -> bool:
        from planner.memory import stage_layer_counts

        return max(stage_layer_counts(inp.model, inp.layout.pp, inp.layout.stage_layers)) > 1

    def solve(self, inp: StageInput) -> StageResult:
        from planner.memory import stage_layer_counts

        top = max(stage_layer_counts(inp.model, inp.layout.pp, inp.layout.stage_layers))

        def at(n: int) -> tuple[MemoryOptions, MemoryBreakdown]:
            options = dataclasses.replace(
                inp.options, recompute="none", policies=block_policies(inp.model, inp.layout, n)
            )
            mem = peak_memory(inp.model, inp.workload, inp.layout, options, same_policy_per_stage=True)
            return options, mem

        # bisection on N: memory falls as N grows (a recomputed block keeps only its input)
        lo, hi = 1, top - 1
        best: tuple[MemoryOptions, MemoryBreakdown] | None = None
        while lo <= hi:
            mid = (lo + hi) // 2
            options, mem = at(mid)
            if mem.total <= inp.budget_bytes:
                best = (options, mem)
                hi = mid - 1
            else:
                lo = mid + 1
        if best is None:
            options, mem = at(top - 1)  # the most this strategy recomputes: report its bytes
            return _activation_result(inp, self.name, options, mem)
        return _activation_result(inp, self.name, best[0], best[1])


OPTIMIZER_BASELINES: tuple[Stage, ...] = (OptimizerResident(), OptimizerOffload())
ACTIVATION_BASELINES: tuple[Stage, ...] = (KeepAll(), RecomputeBlock(), RecomputeAll())


# ---- the swap/recompute MIP as an activation strategy ------------------------------------


@dataclass(frozen=True)
class ActivationMip:
    """MEMO's per-layer swap/recompute MIP (`planner.mip.activations`) behind the Stage protocol.

    Per pipeline stage, each block becomes a `LayerCost` (saved and input bytes of the
    micro-batches in flight, forward/backward/recompute seconds from the FLOP model), the
    device bytes left for activations are the budget less what the step holds besides the
    blocks' saved tensors, and the swap tier's bandwidth is the slower of the host link and
    the tier. The exposed swap time, per micro-batch, becomes `added_time_s`; recompute
    time reaches the step-time model through the policies' recompute fractions.
    """

    name: str = "swap_mip"
    kind: StageKind = "activations"
    expensive: bool = True
    tier: Literal["dram", "cxl", "nvme"] = "dram"
    strategy: str = "mip"  # or one of the MIP module's baselines ("greedy", ...)

    def applies(self, inp: StageInput) -> bool:
        return inp.cluster.tier(self.tier) is not None

    def solve(self, inp: StageInput) -> StageResult:
        from planner.memory import (
            block_input_bytes,
            block_saved_bytes,
            gradients_during_backward,
            in_flight_microbatches,
            stage_layer_counts,
        )
        from planner.mip.activations import (
            ActivationBudget,
            ActivationSettings,
            ActivationSolution,
            LayerCost,
            prefetch_helps,
            solve_activations,
            transfer_overlap,
        )
        from planner.mip.common import MipSettings
        from planner.steptime import block_forward_s, swap_out_early

        model, w, layout, cluster = inp.model, inp.workload, inp.layout, inp.cluster
        tier = cluster.tier(self.tier)
        if tier is None:  # applies() said so; keep mypy and -O honest
            raise ValueError(f"cluster has no {self.tier} tier")
        mb, tp, cp, sp = layout.micro_batch, layout.tp, layout.cp, layout.sequence_parallel
        saved = block_saved_bytes(model, w, micro_batch=mb, tp=tp, sp=sp, cp=cp)
        inp_bytes = block_input_bytes(model, w, micro_batch=mb, tp=tp, sp=sp, cp=cp)
        dev = cluster.device
        fwd_s = block_forward_s(model, cluster, w, tokens=mb * w.seq_len, shard=tp * cp)
        base_options = dataclasses.replace(
            inp.options, swap_out_early=swap_out_early(model, cluster, w, layout, self.tier)
        )
        per_node = cluster.devices_per_node
        link = min(dev.host_link.bandwidth, tier.write_bandwidth / per_node)
        link_in = min(dev.host_link.bandwidth, tier.read_bandwidth / per_node)
        counts = stage_layer_counts(model, layout.pp, layout.stage_layers)
        settings = ActivationSettings(mip=MipSettings(time_limit_s=min(5.0, inp.time_limit_s), gap_rel=1e-3))
        tier_share = int(tier.capacity / per_node)
        solutions = []
        first = 0
        for stage, n in enumerate(counts):
            inflight = in_flight_microbatches(layout, stage)
            layers = range(first, first + n)
            first += n
            # gradients alive while each block runs its backward: the fewest go into the budget's rest,
            # the excess over them is per block (planner.memory.gradients_during_backward)
            grads_at = gradients_during_backward(model, w, layout, inp.options, stage=stage)
            fewest = min(grads_at)
            costs = [
                LayerCost(
                    layer=i,
                    act_bytes=int(saved * inflight),
                    input_bytes=int(inp_bytes * inflight),
                    fwd_time_s=fwd_s,
                    bwd_time_s=2 * fwd_s,
                    recompute_time_s=fwd_s,
                    backward_extra_bytes=int(g - fewest),
                )
                for i, g in zip(layers, grads_at)
            ]
            # what the step holds besides the blocks' saved tensors, while a block runs its
            # backward: the stage's states and the final norm's tensors (the loss buffers are
            # gone by then); the MIP bounds every block's backward peak against the rest
            all_out = tuple(
                ActivationPolicy(layer=i, keep_fraction=0.0, swap_fraction=1.0, swap_tier=self.tier)
                for i in layers
            )
            rest = estimate_memory(
                model, w, layout, dataclasses.replace(base_options, policies=all_out), stage=stage
            )
            besides_block = rest.detail["backward_rest_bytes"] + int(fewest)
            hi = inp.budget_bytes - besides_block
            slack = rest.detail["backward_temp_bytes"] + (int(fewest) if layout.grad_accum == 1 else 0)
            tail = max(rest.detail["phase_backward"], rest.detail["phase_forward"]) - besides_block

            def attempt(
                device_bytes: int,
                costs: list[LayerCost] = costs,
                tail: int = tail,
                slack: int = slack,
                stage: int = stage,
            ) -> tuple[ActivationSolution, bool]:
                budget = ActivationBudget(
                    device_bytes=max(0, device_bytes),
                    tier_capacity_bytes=tier_share,
                    tier_write_bps=link,
                    tier_read_bps=link_in,
                    tier=self.tier,
                    tail_bytes=max(0, tail),
                    transfer_overlap=transfer_overlap(dev.kind),
                    prefetch=prefetch_helps(dev.kind, self.tier),
                    forward_slack_bytes=max(0, slack),
                    swap_out_early=base_options.swap_out_early,
                )
                sol = solve_activations(costs, budget, strategy=self.strategy, settings=settings)
                if not sol.fits:
                    return sol, False
                opts = dataclasses.replace(base_options, recompute="none", policies=sol.policies)
                return sol, estimate_memory(model, w, layout, opts, stage=stage).total <= inp.budget_bytes

            # the loss's backward buffers meet the resident shares but not a block's transient,
            # which the MIP's single budget cannot tell apart: the largest MIP budget whose
            # plan fits the full model, by bisection (a few cheap solves)
            sol, ok = attempt(hi)
            if not ok and sol.fits:
                lo, best = 0, None
                for _ in range(6):
                    mid = (lo + hi) // 2
                    trial, fits = attempt(mid)
                    if fits:
                        lo, best = mid, trial
                    elif trial.fits:
                        hi = mid  # the MIP's plan keeps too much for the loss phase
                    else:
                        lo = mid  # too little for the MIP: even its leanest plan misses
                if best is not None:
                    sol, ok = best, True
            if not ok:
                short = sol.shortfall_bytes if not sol.fits else 0
                return StageResult(
                    kind="activations",
                    strategy=self.name,
                    options=inp.options,
                    device_bytes=inp.budget_bytes + short,
                    fits=False,
                    report=sol.report(),
                )
            solutions.append(sol)
        policies = tuple(p for sol in solutions for p in sol.policies)
        options = dataclasses.replace(base_options, recompute="none", policies=policies)
        result = _activation_result(inp, self.name, options, estimate_memory(model, w, layout, options))
        # the exposed transfer repeats for every micro-batch of the step; stages run in parallel
        added = max(sol.exposed_transfer_s for sol in solutions) * layout.grad_accum
        worst = max(solutions, key=lambda sol: sol.objective_s)
        return dataclasses.replace(result, added_time_s=added, report=worst.report())


ACTIVATION_STAGES: tuple[Stage, ...] = (*ACTIVATION_BASELINES, ActivationMip())

# what `memtier plan` searches: the baselines and interleaved offload (picked only when it is faster
# than both and fits)
OPTIMIZER_STAGES: tuple[Stage, ...] = (*OPTIMIZER_BASELINES, OptimizerInterleaved())
