"""A Plan for one device-memory budget, built from the planner's pieces.

Used by `memtier bench` (memtier at 100/50/25% of the baseline's peak) and by `memtier launch --auto` while
`memtier plan` (planner/planning.py) is not there to call. It tries, cheapest first, until the memory
model (planner.memory.estimate_memory) says the step fits:

1. everything kept on the device;
2. the chunked linear cross-entropy (no full logits; Wijmans et al. 2024);
3. the activation MIP (planner.mip.activations.solve_activations: per block, swap a token share to the
   DRAM tier or recompute, whichever adds less time; a copy hides behind the neighbour block's compute on
   an accelerator and nowhere on a CPU device, `transfer_overlap`), whose activation budget is what the
   memory model leaves after weights, optimizer state, gradients and backward temporaries;
4. the same with optimizer state offloaded to DRAM, when the runtime can do it (`optimizer_offload`);
   when both 3 and 4 fit, the one with the faster predicted step (offloading the optimizer can cost less
   than the recompute it saves);
5. the same with a smaller micro-batch (more accumulation steps: same tokens per step; accumulation keeps
   every gradient on the device, so a smaller micro-batch saves less than it seems).

Every candidate is checked with the memory model itself (the MIP's activation view is re-checked against
the whole step's phases and its budget tightened by the excess), and the result carries the memory
model's and the step-time model's predictions in `Plan.predicted`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from planner.cluster import ClusterSpec
from planner.errors import InfeasibleError
from planner.memory import (
    MemoryBreakdown,
    MemoryOptions,
    Offload,
    block_input_bytes,
    block_saved_bytes,
    estimate_memory,
    gradients_during_backward,
)
from planner.mip.activations import (
    ActivationBudget,
    ActivationSolution,
    LayerCost,
    evaluate_fractions,
    prefetch_helps,
    solve_activations,
    transfer_overlap,
)
from planner.mip.common import MipSettings
from planner.model import ModelSpec
from planner.plan import (
    ActivationPolicy,
    Layout,
    LossPlan,
    OptimizerPlan,
    Plan,
    Predicted,
    SolverReport,
    TierPlan,
)
from planner.steptime import block_forward_s, estimate_step_time, swap_out_early
from planner.workload import Workload

# tokens per chunk of the chunked loss, largest first (offload/loss.py measured 1024 as the knee on 2 CPU
# threads for a 128K vocabulary; a smaller chunk frees the budget the activations need)
LOSS_CHUNK_TOKENS = (1024, 512, 256)
# head-room of the DRAM arena over the bytes the plan swaps (alignment, the block being fetched)
TIER_SLACK = 1.25
OPTIMIZER_STATE_BYTES = 12  # per parameter in the tier: fp32 master weights and two Adam moments
_MAX_TIGHTEN = 6


@dataclasses.dataclass(frozen=True, kw_only=True)
class BudgetPlan:
    """The plan and how it was reached."""

    plan: Plan
    memory: MemoryBreakdown
    steps: tuple[str, ...]  # the stages tried, in order, ending with the one that fit


def layer_costs(
    model: ModelSpec,
    cluster: ClusterSpec,
    workload: Workload,
    layout: Layout,
    backward_extra_bytes: Sequence[float] = (),
) -> list[LayerCost]:
    """Per-block inputs of the activation MIP from the memory and FLOP models."""
    fwd = block_forward_s(model, cluster, workload, tokens=layout.micro_batch * workload.seq_len)
    saved = block_saved_bytes(model, workload, micro_batch=layout.micro_batch)
    inp = block_input_bytes(model, workload, micro_batch=layout.micro_batch)
    return [
        LayerCost(
            layer=i,
            act_bytes=saved,
            input_bytes=inp,
            fwd_time_s=fwd,
            bwd_time_s=2 * fwd,
            recompute_time_s=fwd,
            backward_extra_bytes=int(backward_extra_bytes[i]) if backward_extra_bytes else 0,
        )
        for i in range(model.num_layers)
    ]


def _options(
    *,
    chunk: int,
    offload_optimizer: bool,
    policies: Sequence[ActivationPolicy],
    optimizer_impl: str,
    early: bool = False,
) -> MemoryOptions:
    return MemoryOptions(
        policies=tuple(policies),
        loss_chunk_tokens=chunk,
        offload=Offload(optimizer=offload_optimizer, tier="dram"),
        optimizer_impl=optimizer_impl,  # type: ignore[arg-type]
        swap_out_early=early,
    )


def _solve(
    model: ModelSpec,
    cluster: ClusterSpec,
    workload: Workload,
    layout: Layout,
    budget: int,
    *,
    chunk: int,
    offload_optimizer: bool,
    optimizer_impl: str,
    early: bool,
    time_limit_s: float,
) -> tuple[ActivationSolution | None, MemoryBreakdown]:
    """The activation MIP for what the rest of the step leaves, tightened until the whole step fits."""
    dram = cluster.tier("dram")
    keep = estimate_memory(
        model,
        workload,
        layout,
        _options(
            early=early,
            chunk=chunk,
            offload_optimizer=offload_optimizer,
            policies=(),
            optimizer_impl=optimizer_impl,
        ),
    )
    # The MIP bounds each block's backward (earlier blocks' resident shares + the block + the previous block's
    # swapped share, fetched ahead + the gradients alive then beyond the fewest) and the loss (every resident
    # share + `tail_bytes`) by its budget: what the memory model says the rest of the step holds at those
    # moments (planner.memory.backward_sweep, gradients_during_backward).
    grads_at = gradients_during_backward(model, workload, layout, _options(early=early,
        chunk=chunk, offload_optimizer=offload_optimizer, policies=(), optimizer_impl=optimizer_impl
    ))  # fmt: skip
    rest_backward = keep.detail["backward_rest_bytes"] + min(grads_at)
    saved = keep.detail["in_flight_block_bytes"]
    rest_loss = keep.detail["phase_backward"] - saved * model.num_layers
    act_budget = budget - rest_backward
    # what a block's backward holds beyond its forward: the temporaries, and (one micro-batch) the gradients
    forward_slack = int(keep.detail["backward_temp_bytes"] + (min(grads_at) if layout.grad_accum == 1 else 0))
    costs = layer_costs(model, cluster, workload, layout, [g - min(grads_at) for g in grads_at])
    sol: ActivationSolution | None = None
    mem = keep
    for _ in range(_MAX_TIGHTEN):
        if act_budget <= 0:
            return None, mem
        tier_cap = int(dram.capacity * 0.5) if dram is not None else 0
        swap = ActivationBudget(
            device_bytes=int(act_budget),
            tier_capacity_bytes=tier_cap,
            tier_write_bps=dram.write_bandwidth if dram is not None else 0.0,
            tier_read_bps=dram.read_bandwidth if dram is not None else 0.0,
            tier="dram",
            tail_bytes=max(0, int(rest_loss - rest_backward)),
            transfer_overlap=transfer_overlap(cluster.device.kind),
            prefetch=prefetch_helps(cluster.device.kind, "dram"),
            forward_slack_bytes=forward_slack,
            swap_out_early=early,
        )
        sol = solve_activations(costs, swap, settings=None if time_limit_s <= 0 else _settings(time_limit_s))
        if not sol.fits:
            return None, mem
        mem = estimate_memory(
            model,
            workload,
            layout,
            _options(
                early=early,
                chunk=chunk,
                offload_optimizer=offload_optimizer,
                policies=sol.policies,
                optimizer_impl=optimizer_impl,
            ),
        )
        peak = mem.total
        if peak <= budget:
            return _keep_what_fits(
                model, workload, layout, budget, sol, mem, costs=costs, swap=swap, chunk=chunk,
                offload_optimizer=offload_optimizer, optimizer_impl=optimizer_impl, early=early,
            )  # fmt: skip
        act_budget -= peak - budget  # the rest of the step (a fetched block, the loss, gradients) needs more
    return None, mem


def _keep_what_fits(
    model: ModelSpec,
    workload: Workload,
    layout: Layout,
    budget: int,
    sol: ActivationSolution,
    mem: MemoryBreakdown,
    *,
    costs: Sequence[LayerCost],
    swap: ActivationBudget,
    chunk: int,
    offload_optimizer: bool,
    optimizer_impl: str,
    early: bool,
) -> tuple[ActivationSolution, MemoryBreakdown]:
    """Turn swapped or recomputed blocks back to kept, last block first, while the whole step still fits.

    The MIP's budget was tightened by the whole step's excess, uniformly over the blocks, so it may move
    more than the memory model needs; a hidden swap is free in its objective, yet it still takes link
    bandwidth (a GPU) or memory bandwidth (a CPU). The result is re-scored by the MIP's cost model.
    """
    policies = list(sol.policies)
    for i in reversed(range(len(policies))):
        if policies[i].keep_fraction >= 1.0:
            continue
        trial = list(policies)
        trial[i] = ActivationPolicy(layer=policies[i].layer, swap_tier=policies[i].swap_tier)
        opts = _options(
            early=early,
            chunk=chunk,
            offload_optimizer=offload_optimizer,
            policies=trial,
            optimizer_impl=optimizer_impl,
        )
        m = estimate_memory(model, workload, layout, opts)
        if m.total <= budget:
            policies, mem = trial, m
    if policies == list(sol.policies):
        return sol, mem
    return _rescored(sol, policies, costs, swap, "+keep"), mem


def _rescored(
    sol: ActivationSolution,
    policies: Sequence[ActivationPolicy],
    costs: Sequence[LayerCost],
    swap: ActivationBudget,
    suffix: str,
) -> ActivationSolution:
    """`sol` with other policies, its time and bytes re-scored by the MIP's cost model."""
    fractions = [
        [getattr(p, f) for p in policies] for f in ("keep_fraction", "swap_fraction", "recompute_fraction")
    ]
    cost = evaluate_fractions(costs, swap, *fractions)
    return dataclasses.replace(
        sol,
        policies=tuple(policies),
        strategy=sol.strategy + suffix,
        objective_s=float(cost.objective_s),
        recompute_s=float(cost.recompute_s),
        exposed_transfer_s=float(cost.exposed_transfer_s),
        device_bytes=int(math.ceil(float(cost.device_bytes))),
        tier_bytes=int(math.ceil(float(cost.tier_bytes))),
    )


def _settings(time_limit_s: float):
    from planner.mip.activations import ActivationSettings

    return ActivationSettings(mip=MipSettings(time_limit_s=time_limit_s))


def plan_for_budget(
    model: ModelSpec,
    cluster: ClusterSpec,
    workload: Workload,
    *,
    budget_bytes: int,
    dp: int = 1,
    optimizer_offload: bool = False,
    optimizer_impl: str = "fused",
    time_limit_s: float = 10.0,
    allow_smaller_micro_batch: bool = True,
) -> BudgetPlan:
    """The fastest plan this module knows whose predicted per-device peak is within `budget_bytes`."""
    tried: list[str] = []
    micro_batches = [workload.micro_batch]
    if allow_smaller_micro_batch:
        micro_batches += [m for m in range(workload.micro_batch - 1, 0, -1) if workload.micro_batch % m == 0]
    best_miss: tuple[int, str] | None = None
    for mb in micro_batches:
        ga = workload.global_batch // (mb * dp)
        if ga < 1 or ga * mb * dp != workload.global_batch:
            continue
        layout = Layout(dp=dp, micro_batch=mb, grad_accum=ga)
        early = swap_out_early(model, cluster, workload, layout)
        # name, loss chunk tokens (0: standard loss), activation MIP, optimizer offload
        stages: list[tuple[str, tuple[int, ...], bool, bool]] = [
            ("keep", (0,), False, False),
            ("chunked_loss", LOSS_CHUNK_TOKENS[:1], False, False),
            ("activations", LOSS_CHUNK_TOKENS, True, False),
        ]
        if optimizer_offload:
            stages.append(("activations+optimizer_offload", LOSS_CHUNK_TOKENS, True, True))
        # activation plans with and without optimizer offload: the faster predicted step wins (offloading the
        # optimizer may cost less time than the recompute it saves), the first on a tie
        fitting: list[tuple[float, int, BudgetPlan]] = []
        for name, chunks, acts, off in stages:
            label = f"{name} (micro-batch {mb})"
            tried.append(label)
            found: list[tuple[float, int, ActivationSolution | None, MemoryBreakdown]] = []
            for chunk in chunks:
                if acts:
                    sol, mem = _solve(
                        model,
                        cluster,
                        workload,
                        layout,
                        budget_bytes,
                        chunk=chunk,
                        offload_optimizer=off,
                        optimizer_impl=optimizer_impl,
                        early=early,
                        time_limit_s=time_limit_s,
                    )
                    if sol is not None:
                        found.append((sol.objective_s, -chunk, sol, mem))
                else:
                    sol = None
                    opts = _options(
                        early=early,
                        chunk=chunk,
                        offload_optimizer=off,
                        policies=(),
                        optimizer_impl=optimizer_impl,
                    )
                    mem = estimate_memory(model, workload, layout, opts)
                    if mem.total <= budget_bytes:
                        found.append((0.0, -chunk, None, mem))
                miss = mem.total - budget_bytes
                if best_miss is None or miss < best_miss[0]:
                    best_miss = (miss, label)
            if found:
                # the least added time (recompute + exposed transfer); among equals the largest chunk
                _, neg_chunk, sol, mem = min(found, key=lambda f: (round(f[0], 6), f[1]))
                plan = _make_plan(
                    model,
                    cluster,
                    workload,
                    layout,
                    mem,
                    sol,
                    chunk=-neg_chunk,
                    offload_optimizer=off,
                    optimizer_impl=optimizer_impl,
                    early=early,
                    budget=budget_bytes,
                )
                if not acts:  # nothing moved and nothing recomputed: no later stage is faster
                    return BudgetPlan(plan=plan, memory=mem, steps=tuple(tried))
                fitting.append(
                    (plan.predicted.step_time_s, len(fitting), BudgetPlan(plan=plan, memory=mem, steps=()))
                )
        if fitting:
            best = min(fitting, key=lambda f: (f[0], f[1]))[2]
            return dataclasses.replace(best, steps=tuple(tried))
    if best_miss is None:
        raise InfeasibleError(
            f"global_batch({workload.global_batch}) is not a multiple of dp({dp}) x any micro-batch <= "
            f"{workload.micro_batch}",
            need_bytes=0,
            have_bytes=budget_bytes,
        )
    alternatives = [
        f"a budget of at least {math.ceil((budget_bytes + best_miss[0]) / 2**20)} MiB ({best_miss[1]})"
    ]
    if not optimizer_offload:
        alternatives.append("optimizer-state offload (not available in this runtime)")
    raise InfeasibleError(
        f"no plan fits {budget_bytes / 2**20:.0f} MiB per device: the closest ({best_miss[1]}) needs "
        f"{best_miss[0] / 2**20:.0f} MiB more",
        need_bytes=budget_bytes + best_miss[0],
        have_bytes=budget_bytes,
        alternatives=alternatives,
    )


def _make_plan(
    model: ModelSpec,
    cluster: ClusterSpec,
    workload: Workload,
    layout: Layout,
    mem: MemoryBreakdown,
    sol: ActivationSolution | None,
    *,
    chunk: int,
    offload_optimizer: bool,
    optimizer_impl: str,
    early: bool,
    budget: int,
) -> Plan:
    policies = sol.policies if sol is not None else ()
    opts = _options(
        early=early,
        chunk=chunk,
        offload_optimizer=offload_optimizer,
        policies=policies,
        optimizer_impl=optimizer_impl,
    )
    swap_s = sol.exposed_transfer_s * layout.grad_accum if sol is not None else 0.0
    t = estimate_step_time(model, cluster, workload, layout, opts, swap_exposed_s=swap_s)
    tiers: list[TierPlan] = []
    swapped = mem.host_bytes.get("dram", 0)
    if offload_optimizer or any(p.swap_fraction > 0 for p in policies):
        # one cap per tier: each store (activation swap, optimizer state) is held to it
        block = block_saved_bytes(model, workload, micro_batch=layout.micro_batch)
        need = max(
            int(swapped * TIER_SLACK) + 2 * block,
            OPTIMIZER_STATE_BYTES * model.params if offload_optimizer else 0,
        )
        tiers.append(TierPlan(kind="dram", capacity_bytes=need + (16 << 20)))
    peak = mem.total
    solvers = (
        (sol.report(),)
        if sol is not None
        else (SolverReport(stage="activations", strategy="keep_all", status="optimal"),)
    )
    return Plan(
        model=model,
        cluster=cluster,
        workload=workload.replace(micro_batch=layout.micro_batch),
        layout=dataclasses.replace(
            layout,
            rank_to_device=tuple(cluster.device_name(r) for r in range(layout.world_size))
            if layout.world_size <= cluster.world_size
            else (),
        ),
        activations=tuple(policies),
        optimizer=OptimizerPlan(
            kind=workload.optimizer.kind,
            offload=offload_optimizer,
            tier="dram" if offload_optimizer else "device",
        ),
        loss=LossPlan(kind="chunked", chunk_size=chunk) if chunk else LossPlan(),
        tiers=tuple(tiers),
        predicted=Predicted(
            bytes_by_tier=mem.by_tier(),
            bytes_by_category=mem.by_category(),
            peak_bytes=peak,
            step_time_s=t.step_s,
            time_breakdown=t.breakdown(),
            tflops_per_device=t.tflops_per_device,
            mfu=t.mfu,
            hfu=t.hfu,
            solvers=solvers,
        ),
        notes=(
            f"memtier launch/bench budget plan: {budget} bytes per device ({mem.peak_phase} is the peak phase)",
        ),
    )
