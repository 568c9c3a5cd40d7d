"""The planning strategies: every way the planner makes a memory decision, behind `planner.strategy`.

For every parallel layout a plan runs an optimizer strategy, then an activation strategy
(`planner.strategy.Strategy`). Baselines are strategies too (CONVENTIONS: "Baselines are strategies
too"):

  optimizer    "resident"           optimizer state on the device (ZeRO partitions it)
               "offload"            all optimizer state in host DRAM, the update on the CPU
                                    (ZeRO-Offload, Ren et al. 2021)
               "interleaved"        optimizer state in the host tiers by subgroup, each subgroup
                                    updated on the CPU or the device (Deep Optimizer States,
                                    `planner.optimizer_placement`); in OPTIMIZER_STRATEGIES
  activations  "keep_all"           every block keeps what autograd saves
               "recompute_all"      every block is recomputed (Chen et al. 2016)
               "recompute_block"    the first N blocks of each pipeline stage are recomputed,
                                    the fewest N that fit (Megatron-LM's
                                    --recompute-method block --recompute-num-layers N)
               "swap_mip"           MEMO's per-layer swap/recompute MIP (`planner.mip.activations`),
                                    through its one adapter, `ActivationMip`

A strategy whose `expensive` flag is set is run by the layout search only on its best few
layouts (a MIP per layout of a 1024-GPU enumeration would not answer in a minute).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from planner.cluster import ClusterSpec
from planner.memory import (
    MemoryBreakdown,
    MemoryOptions,
    Offload,
    block_input_bytes,
    block_saved_bytes,
    estimate_memory,
    gradients_during_backward,
    in_flight_microbatches,
    model_states,
    stage_layer_counts,
)
from planner.mip.activations import (
    ActivationBudget,
    ActivationSettings,
    ActivationSolution,
    LayerCost,
    evaluate_fractions,
    prefetch_helps,
    solve_activations,
    transfer_overlap,
)
from planner.mip.common import MipSettings
from planner.model import ModelSpec
from planner.optimizer_placement import OptimizerInterleaved
from planner.plan import ActivationPolicy, Layout
from planner.steptime import block_times, swap_out_early
from planner.strategy import (
    HostTier,
    Strategy,
    StrategyInput,
    StrategyKind,
    StrategyResult,
    dominant_stages,
    host_fits,
    peak_memory,
    states_bytes,
    strategy_report,
)
from planner.workload import Workload

# ---- optimizer-state placement ---------------------------------------------------------


def host_update_runs(workload: Workload) -> bool:
    """Whether the offloaded (host) optimizer runs the workload's memory mode: it keeps fp32 master weights
    and fp32 moments (ZeRO-Offload, memtier's OffloadedAdamW), so not quantized or pure 16-bit states."""
    return not workload.optimizer.state_bits and (workload.dtype == "fp32" or workload.precision == "mixed")


@dataclass(frozen=True)
class InterleavedHostUpdate(OptimizerInterleaved):
    """Interleaved offload (`planner.optimizer_placement`) where the host update runs the memory mode."""

    def applies(self, inp: StrategyInput) -> bool:
        return host_update_runs(inp.workload) and super().applies(inp)


def _placement_result(
    name: str, options: MemoryOptions, need: int, host: dict[str, int], *, fits: bool
) -> StrategyResult:
    """An optimizer baseline's result: model-state bytes on the device (a lower bound on the peak)."""
    return StrategyResult(
        kind="optimizer",
        strategy=name,
        options=options,
        device_bytes=need,
        host_bytes=host,
        fits=fits,
        report=strategy_report("optimizer", name, fits, need),
    )


@dataclass(frozen=True)
class OptimizerResident:
    name: str = "resident"
    kind: StrategyKind = "optimizer"
    expensive: bool = False

    def applies(self, inp: StrategyInput) -> bool:
        return True

    def solve(self, inp: StrategyInput) -> StrategyResult:
        options = dataclasses.replace(inp.options, offload=Offload())
        need = states_bytes(inp.model, inp.workload, inp.layout, options.offload)
        return _placement_result(self.name, options, need, {}, fits=need <= inp.budget_bytes)


@dataclass(frozen=True)
class OptimizerOffload:
    """All optimizer state (fp32 master weights and moments) in a host tier, updated on the CPU.

    DeepSpeed offers this for ZeRO stages 1-3 (`zero_optimization.offload_optimizer`), so by default the
    layout must partition the optimizer (ZeRO >= 1); memtier's own runtime (`offload.optimizer`) offloads
    at ZeRO-0 too (`min_zero_stage=0`, what the fixed-layout mode, `planner.budget`, plans for). The node's
    host tier must hold the state of all its devices.
    """

    name: str = "offload"
    kind: StrategyKind = "optimizer"
    expensive: bool = False
    tier: HostTier = "dram"
    min_zero_stage: int = 1

    def applies(self, inp: StrategyInput) -> bool:
        return (
            inp.layout.zero_stage >= self.min_zero_stage
            and inp.cluster.tier(self.tier) is not None
            and host_update_runs(inp.workload)
        )

    def solve(self, inp: StrategyInput) -> StrategyResult:
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
    inp: StrategyInput, name: str, options: MemoryOptions, mem: MemoryBreakdown | None = None
) -> StrategyResult:
    mem = mem or peak_memory(inp.model, inp.workload, inp.layout, options)
    fits = mem.total <= inp.budget_bytes and host_fits(inp.cluster, mem.host_bytes)
    return StrategyResult(
        kind="activations",
        strategy=name,
        options=options,
        device_bytes=mem.total,
        host_bytes=dict(mem.host_bytes),
        fits=fits,
        memory=mem,
        report=strategy_report("activations", name, fits, mem.total),
    )


@dataclass(frozen=True)
class UniformActivations:
    """Every block alike: keep what autograd saves (`recompute="none"`) or recompute it all ("full")."""

    name: str
    recompute: Literal["none", "full"]
    kind: StrategyKind = "activations"
    expensive: bool = False

    def applies(self, inp: StrategyInput) -> bool:
        return True

    def solve(self, inp: StrategyInput) -> StrategyResult:
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
    kind: StrategyKind = "activations"
    expensive: bool = False

    def applies(self, inp: StrategyInput) -> bool:
        return max(stage_layer_counts(inp.model, inp.layout.pp, inp.layout.stage_layers)) > 1

    def solve(self, inp: StrategyInput) -> StrategyResult:
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


OPTIMIZER_BASELINES: tuple[Strategy, ...] = (OptimizerResident(), OptimizerOffload())
ACTIVATION_BASELINES: tuple[Strategy, ...] = (KeepAll(), RecomputeBlock(), RecomputeAll())


# ---- the swap/recompute MIP as an activation strategy ------------------------------------

# solves of the MIP per pipeline stage after the first, to find a MIP budget whose plan the whole step fits
FIT_SOLVES = 6


def layer_costs(
    model: ModelSpec,
    cluster: ClusterSpec,
    workload: Workload,
    layout: Layout,
    layers: Sequence[int],
    *,
    in_flight: float = 1.0,
    backward_extra_bytes: Sequence[float] = (),
) -> list[LayerCost]:
    """Per-block inputs of the activation MIP from the memory and FLOP models.

    Saved and input bytes of the `in_flight` micro-batches a pipeline stage holds (planner.memory), the
    forward time from the FLOP model (planner.steptime.block_times), backward twice the forward
    (Narayanan et al. 2021, Sec. 3.3) plus what a fused attention kernel's backward adds (planner.kernels) and
    a recompute one forward.
    """
    mb, tp, cp, sp = layout.micro_batch, layout.tp, layout.cp, layout.sequence_parallel
    kernels = cluster.device.kernel_options(workload)
    saved = block_saved_bytes(model, workload, micro_batch=mb, tp=tp, sp=sp, cp=cp, **kernels)
    inp = block_input_bytes(model, workload, micro_batch=mb, tp=tp, sp=sp, cp=cp)
    times = block_times(model, cluster, workload, tokens=mb * workload.seq_len, shard=tp * cp)
    fwd_s = times.forward_s
    extra = list(backward_extra_bytes) or [0.0] * len(layers)
    return [
        LayerCost(
            layer=i,
            act_bytes=int(saved * in_flight),
            input_bytes=int(inp * in_flight),
            fwd_time_s=fwd_s,
            bwd_time_s=2 * fwd_s + times.backward_extra_s,
            recompute_time_s=fwd_s,
            backward_extra_bytes=int(x),
        )
        for i, x in zip(layers, extra)
    ]


@dataclass(frozen=True, kw_only=True)
class PipelineStageProblem:
    """The activation MIP of one pipeline stage, as the rest of the step leaves it."""

    stage: int  # the pipeline stage
    costs: tuple[LayerCost, ...]  # its blocks, forward order
    # `device_bytes`: the most the blocks' saved tensors may hold (the budget less what the step holds
    # besides them while a block runs its backward); the swap tier, its share and bandwidths
    budget: ActivationBudget


@dataclass(frozen=True, kw_only=True)
class PipelineStageFit:
    """What the MIP found for one pipeline stage."""

    solution: ActivationSolution  # the last solve: the one the whole step fits when `fits`
    fits: bool
    need_bytes: int  # the step's peak under it (memory model), or the budget + the MIP's own shortfall


@dataclass(frozen=True)
class ActivationMip:
    """MEMO's per-layer swap/recompute MIP (`planner.mip.activations`) behind the Strategy protocol.

    Per pipeline stage, each block becomes a `LayerCost` (`layer_costs`), the device bytes left for
    activations are the budget less what the step holds besides the blocks' saved tensors, and the swap
    tier's bandwidth is the slower of the host link and the tier (`PipelineStageProblem`). The MIP's one budget
    cannot tell all of the step's moments apart (the loss's buffers meet the resident shares, a block's
    swap-out is in flight beside the next block's activations), so each answer is checked against the
    whole step with the memory model and the MIP's budget tightened until it fits (`fit`); then blocks it
    moved are kept again, last first, while the step still fits (`keep_what_fits`). The exposed swap
    time, per micro-batch, becomes `added_time_s`; recompute time reaches the step-time model through
    the policies' recompute fractions.
    """

    name: str = "swap_mip"
    kind: StrategyKind = "activations"
    expensive: bool = True
    tier: HostTier = "dram"
    strategy: str = "mip"  # or one of the MIP module's baselines ("greedy", ...)

    def applies(self, inp: StrategyInput) -> bool:
        return inp.cluster.tier(self.tier) is not None

    def solve(self, inp: StrategyInput) -> StrategyResult:
        model, w, layout = inp.model, inp.workload, inp.layout
        base = dataclasses.replace(
            inp.options,
            recompute="none",
            swap_out_early=swap_out_early(model, inp.cluster, w, layout, self.tier),
        )
        settings = ActivationSettings(mip=MipSettings(time_limit_s=min(5.0, inp.time_limit_s), gap_rel=1e-3))
        solutions = []
        for stage in range(layout.pp):
            problem = self.problem(inp, base, stage)
            found = self.fit(inp, base, problem, settings)
            if not found.fits:
                return StrategyResult(
                    kind="activations",
                    strategy=self.name,
                    options=inp.options,
                    device_bytes=found.need_bytes,
                    fits=False,
                    report=found.solution.report(),
                )
            solutions.append(self.keep_what_fits(inp, base, problem, found.solution))
        policies = tuple(p for sol in solutions for p in sol.policies)
        options = dataclasses.replace(base, policies=policies)
        result = _activation_result(inp, self.name, options, estimate_memory(model, w, layout, options))
        # the exposed transfer repeats for every micro-batch of the step; stages run in parallel
        added = max(sol.exposed_transfer_s for sol in solutions) * layout.grad_accum
        worst = max(solutions, key=lambda sol: sol.objective_s)
        return dataclasses.replace(result, added_time_s=added, report=worst.report())

    def problem(self, inp: StrategyInput, base: MemoryOptions, stage: int) -> PipelineStageProblem:
        """Pipeline stage `stage`'s blocks and the device bytes the rest of the step leaves them."""
        model, w, layout, cluster = inp.model, inp.workload, inp.layout, inp.cluster
        tier = cluster.tier(self.tier)
        if tier is None:  # applies() said so; keep mypy and -O honest
            raise ValueError(f"cluster has no {self.tier} tier")
        counts = stage_layer_counts(model, layout.pp, layout.stage_layers)
        layers = range(sum(counts[:stage]), sum(counts[: stage + 1]))
        # gradients alive while each block runs its backward: the fewest go into the budget's rest,
        # the excess over them is per block (planner.memory.gradients_during_backward)
        grads_at = gradients_during_backward(model, w, layout, inp.options, stage=stage)
        fewest = min(grads_at)
        costs = layer_costs(
            model, cluster, w, layout, layers,
            in_flight=in_flight_microbatches(layout, stage),
            backward_extra_bytes=[g - fewest for g in grads_at],
        )  # fmt: skip
        # what the step holds besides the blocks' saved tensors, while a block runs its backward: the
        # stage's states and the final norm's tensors (the loss buffers are gone by then); the MIP bounds
        # every block's backward peak against the rest
        all_out = tuple(
            ActivationPolicy(layer=i, keep_fraction=0.0, swap_fraction=1.0, swap_tier=self.tier)
            for i in layers
        )
        rest = estimate_memory(model, w, layout, dataclasses.replace(base, policies=all_out), stage=stage)
        besides_block = rest.detail["backward_rest_bytes"] + int(fewest)
        slack = rest.detail["backward_temp_bytes"] + (int(fewest) if layout.grad_accum == 1 else 0)
        tail = max(rest.detail["phase_backward"], rest.detail["phase_forward"]) - besides_block
        per_node = cluster.devices_per_node
        dev = cluster.device
        budget = ActivationBudget(
            device_bytes=max(0, inp.budget_bytes - besides_block),
            tier_capacity_bytes=int(tier.capacity / per_node),
            tier_write_bps=min(dev.host_link.bandwidth, tier.write_bandwidth / per_node),
            tier_read_bps=min(dev.host_link.bandwidth, tier.read_bandwidth / per_node),
            tier=self.tier,
            tail_bytes=max(0, tail),
            transfer_overlap=transfer_overlap(dev.kind),
            prefetch=prefetch_helps(dev.kind, self.tier),
            forward_slack_bytes=max(0, slack),
            swap_out_early=base.swap_out_early,
        )
        return PipelineStageProblem(stage=stage, costs=tuple(costs), budget=budget)

    def stage_peak(
        self, inp: StrategyInput, base: MemoryOptions, stage: int, policies: Sequence[ActivationPolicy]
    ) -> int:
        """The whole step's peak on pipeline stage `stage` under `policies` (the memory model)."""
        options = dataclasses.replace(base, policies=tuple(policies))
        return estimate_memory(inp.model, inp.workload, inp.layout, options, stage=stage).total

    def fit(
        self,
        inp: StrategyInput,
        base: MemoryOptions,
        problem: PipelineStageProblem,
        settings: ActivationSettings,
    ) -> PipelineStageFit:
        """The MIP's answer at the largest budget; while the whole step misses, a tighter budget.

        The step's peak falls about one for one with the MIP's budget (the blocks' resident bytes are in
        every phase), so the next budget is the last less the step's excess; where that leaves the
        interval known to be too small for the MIP or too large for the step, its midpoint (bisection).
        """
        limit = inp.budget_bytes

        def attempt(device_bytes: int) -> PipelineStageFit:
            budget = dataclasses.replace(problem.budget, device_bytes=max(0, device_bytes))
            sol = solve_activations(problem.costs, budget, strategy=self.strategy, settings=settings)
            if not sol.fits:
                return PipelineStageFit(solution=sol, fits=False, need_bytes=limit + sol.shortfall_bytes)
            need = self.stage_peak(inp, base, problem.stage, sol.policies)
            return PipelineStageFit(solution=sol, fits=need <= limit, need_bytes=need)

        hi = problem.budget.device_bytes
        found = attempt(hi)
        if found.fits or not found.solution.fits:
            return found
        lo, closest = 0, found  # lo: a MIP budget too small for the MIP (or 0); hi: too large for the step
        for _ in range(FIT_SOLVES):
            guess = hi - (found.need_bytes - limit)
            mid = guess if lo < guess < hi else (lo + hi) // 2
            if mid <= lo:
                break
            trial = attempt(mid)
            if trial.fits:
                return trial
            if trial.solution.fits:
                hi, found = mid, trial  # the MIP's plan keeps too much for another moment of the step
                closest = min(closest, trial, key=lambda f: f.need_bytes)
            else:
                lo = mid  # too little for the MIP: even its leanest plan misses
        return closest

    def keep_what_fits(
        self, inp: StrategyInput, base: MemoryOptions, problem: PipelineStageProblem, sol: ActivationSolution
    ) -> ActivationSolution:
        """Turn swapped or recomputed blocks back to kept, last block first, while the whole step still fits.

        The MIP's budget was tightened by the whole step's excess, uniformly over the blocks, so it may move
        more than the memory model needs; a hidden swap is free in its objective, yet it still takes link
        bandwidth (a GPU) or memory bandwidth (a CPU). Keeping a block never adds time in the MIP's cost
        model (its recompute, which is the only window it gave the block before it, goes too); the
        result is re-scored by that model.
        """
        policies = list(sol.policies)
        for i in reversed(range(len(policies))):
            if policies[i].keep_fraction >= 1.0:
                continue
            trial = list(policies)
            trial[i] = ActivationPolicy(layer=policies[i].layer, swap_tier=policies[i].swap_tier)
            if self.stage_peak(inp, base, problem.stage, trial) <= inp.budget_bytes:
                policies = trial
        if policies == list(sol.policies):
            return sol
        fractions = [
            [getattr(p, f) for p in policies]
            for f in ("keep_fraction", "swap_fraction", "recompute_fraction")
        ]
        cost = evaluate_fractions(problem.costs, problem.budget, *fractions)
        return dataclasses.replace(
            sol,
            policies=tuple(policies),
            objective_s=float(cost.objective_s),
            recompute_s=float(cost.recompute_s),
            exposed_transfer_s=float(cost.exposed_transfer_s),
            device_bytes=int(math.ceil(float(cost.device_bytes))),
            tier_bytes=int(math.ceil(float(cost.tier_bytes))),
        )


ACTIVATION_STRATEGIES: tuple[Strategy, ...] = (*ACTIVATION_BASELINES, ActivationMip())

# what `memtier plan` searches: the baselines and interleaved offload (picked only when it is faster
# than both and fits)
OPTIMIZER_STRATEGIES: tuple[Strategy, ...] = (*OPTIMIZER_BASELINES, InterleavedHostUpdate())
