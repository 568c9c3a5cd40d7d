"""make_plan: search the layouts, turn the winner into a Plan, or say why nothing fits.

The Plan records every decision (layout with its rank-to-device map and pipeline
split, per-layer activation policy with its buffer offsets, optimizer placement, tiers)
and what the cost models predict for it, with one SolverReport per problem solved (layout
search, optimizer placement, activation policy, rank mapping, buffer reuse). When no layout
fits, an InfeasibleError (exit 3) gives the smallest shortfall, with and without offload,
and the nearest configurations that would fit (more devices, a smaller
micro-batch, a shorter sequence, the device's whole memory).

`plan_from_candidate` is the one place a Plan is built: `make_plan` (`memtier plan`) calls it
for the searched winner, `planner.budget.plan_for_budget` (its fixed-layout mode, behind
`memtier launch --auto` and `memtier bench`) for the winner on one given layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from planner.cluster import ClusterSpec
from planner.errors import InfeasibleError, LayoutError
from planner.estimate import budget_bytes as usable_bytes
from planner.estimate import estimate
from planner.lifetimes import block_lifetimes
from planner.lora import check_lora
from planner.mapping import AnnealSettings
from planner.memory import FP32, MemoryBreakdown, MemoryOptions, Offload, model_states
from planner.memory import trainable_device_params as trained_params
from planner.mip.buffers import BufferSettings, offsets_by_role, solve_buffers
from planner.mip.common import MipSettings
from planner.model import ModelSpec
from planner.model_state import (
    FILL_FRACTION,
    ElementBytes,
    HostTiersShortError,
    StreamedState,
    host_shortfall_advice,
    plan_model_state,
    resident_state_bytes,
    stream_refusal,
)
from planner.plan import (
    ActivationPolicy,
    Engine,
    Layout,
    LossPlan,
    ModelStatePlan,
    OptimizerPlan,
    Plan,
    Predicted,
    SolverReport,
    TierPlan,
)
from planner.search import (
    Candidate,
    SearchResult,
    SearchSpace,
    Shortfall,
    least_memory,
    micro_batches,
    parallel_shapes,
    search,
)
from planner.steptime import StepTime, swap_out_early
from planner.strategies import ACTIVATION_STRATEGIES, OPTIMIZER_STRATEGIES
from planner.strategy import Strategy
from planner.units import GiB, fmt_bytes, fmt_rate
from planner.workload import Workload

# how far the "more devices" alternative looks: up to this many times the nodes
MAX_NODE_FACTOR = 64


@dataclass(frozen=True, kw_only=True)
class PlanResult:
    """A Plan and how it was reached (`make_plan` and its fixed-layout mode, `plan_for_budget`)."""

    plan: Plan
    chosen: Candidate
    search: SearchResult
    why: tuple[str, ...]  # why the chosen layout won, in sentences
    steps: tuple[str, ...] = ()  # fixed-layout mode: the strategies tried, in order, ending with the chosen

    @property
    def memory(self) -> MemoryBreakdown:
        """The memory model's breakdown of the plan's step (worst pipeline stage)."""
        return self.chosen.memory


def make_plan(
    model: ModelSpec,
    cluster: ClusterSpec,
    workload: Workload,
    *,
    budget: int | None = None,
    space: SearchSpace | None = None,
    optimizer_strategies: Sequence[Strategy] = OPTIMIZER_STRATEGIES,
    activation_strategies: Sequence[Strategy] = ACTIVATION_STRATEGIES,
    mapping_top: int = 4,
    seed: int = 0,
    time_limit_s: float = 10.0,
    anneal: AnnealSettings | None = None,
    progress: Callable[[str], None] | None = None,
    engine: Engine = "torch",
    stream: bool = True,
) -> PlanResult:
    """The fastest layout that fits `budget` (default: the device's memory, less the headroom).

    `engine` is what will run the plan (`Layout.engine`); it is recorded, the search is the same. When no
    layout fits, and `stream` is on, the optimizer may be offloaded (an "offload" strategy is among
    `optimizer_strategies`) and the runtime can stream (`planner.model_state.stream_refusal`), the model
    state is placed across the tiers and streamed per block (`streamed_result`).
    """
    space = space or SearchSpace()
    check_shapes(model, cluster, workload, space)
    have = usable_bytes(cluster, workload, budget)
    result = search(
        model,
        cluster,
        workload,
        budget_bytes=have,
        space=space,
        optimizer_strategies=optimizer_strategies,
        activation_strategies=activation_strategies,
        mapping_top=mapping_top,
        seed=seed,
        time_limit_s=time_limit_s,
        anneal=anneal,
        progress=progress,
    )
    if result.best is None:
        offloads = any(s.name == "offload" for s in optimizer_strategies)
        # (LoRA: planner.model_state streams every parameter's gradient and state; not for frozen weights)
        if stream and offloads and not workload.lora and stream_refusal(cluster, workload, engine) is None:
            # nothing keeps the model state on the device: place it across the tiers and stream it
            buffers = buffer_settings(time_limit_s=min(BUFFER_TIME_LIMIT_S, time_limit_s), seed=seed)
            try:
                streamed = streamed_result(
                    model, cluster, workload, budget=budget, space=space, engine=engine, buffers=buffers
                )
            except HostTiersShortError as short:
                device = infeasible_error(
                    model, cluster, workload, budget=budget, space=space,
                    optimizer_strategies=optimizer_strategies, activation_strategies=activation_strategies,
                )  # fmt: skip
                raise HostTiersShortError(
                    f"{short}. With the state on the device: {device}",
                    need_bytes=device.need_bytes, have_bytes=device.have_bytes,
                    host_need_bytes=short.host_need_bytes, host_have_bytes=short.host_have_bytes,
                    alternatives=(*short.alternatives, *device.alternatives),
                ) from None  # fmt: skip
            if streamed is not None:
                return dataclasses.replace(
                    streamed, search=dataclasses.replace(streamed.search, shapes=result.shapes,
                    configurations=result.configurations, pruned_by_states=result.pruned_by_states)
                )  # fmt: skip
        raise infeasible_error(
            model,
            cluster,
            workload,
            budget=budget,
            space=space,
            optimizer_strategies=optimizer_strategies,
            activation_strategies=activation_strategies,
        )
    chosen = result.best
    why = explain(chosen, result)
    buffers = buffer_settings(time_limit_s=min(BUFFER_TIME_LIMIT_S, time_limit_s), seed=seed)
    plan = plan_from_candidate(
        model, cluster, workload, chosen, result, notes=why, buffers=buffers, engine=engine
    )
    return PlanResult(plan=plan, chosen=chosen, search=result, why=why)


def check_shapes(model: ModelSpec, cluster: ClusterSpec, workload: Workload, space: SearchSpace) -> None:
    """Bad input (exit 2) when no parallel shape meets the hard constraints, whatever the memory."""
    check_lora(model, workload)
    if next(iter(parallel_shapes(model, cluster, workload, space)), None) is not None:
        return
    mb = space.micro_batch or 1
    raise LayoutError(
        f"no tp * cp * pp * dp = world_size({cluster.world_size}) with tp dividing num_heads({model.num_heads}),"
        f" pp <= num_layers({model.num_layers}) and micro_batch({mb}) * dp dividing"
        f" global_batch({workload.global_batch}); raise the global batch or use fewer devices",
        field="global_batch",
    )


# ---- candidate -> Plan ------------------------------------------------------------------


# A host tier's cap (TierPlan.capacity_bytes, which the runtime's stores are held to): what the memory model
# puts there per device (optimizer state and swapped activations together), +10%, + 64 MiB. Each store needs
# its planned bytes plus alignment (512 B per swapped tensor, 64 B per optimizer slot) and the tokens the
# runtime rounds up per tensor; the memory model's bytes were measured within +-4% of real steps
# (benchmarks/results/cost_model.json) and +-10% under swap and recompute (tests/offload/
# test_policy_peaks.py), which the 10% covers, and the 64 MiB covers alignment and small models. One set of
# margins for every plan: launch/budget.py's own (+25% of the swapped bytes, + 2 blocks, + 16 MiB; 12 B per
# parameter for an offloaded optimizer even in fp32, where memtier's runtime keeps 8) held room for blocks
# the tier never holds: a swapped share is freed from the tier in the job that fetches it back, so the
# arena is empty between steps.
TIER_MARGIN = 1.10
TIER_SLACK_BYTES = 64 << 20


def tier_capacity_bytes(used_bytes: int) -> int:
    """The cap of a host tier the plan puts `used_bytes` per device in (see TIER_MARGIN)."""
    return int(used_bytes * TIER_MARGIN) + TIER_SLACK_BYTES


def layer_policies(model: ModelSpec, options: MemoryOptions) -> tuple[ActivationPolicy, ...]:
    """One explicit policy per block: the strategy's per-layer policies, or its uniform choice."""
    if options.policies:
        given = {p.layer: p for p in options.policies}
        return tuple(given.get(i, ActivationPolicy(layer=i)) for i in range(model.num_layers))
    if options.recompute == "full":
        return tuple(
            ActivationPolicy(layer=i, keep_fraction=0.0, recompute_fraction=1.0)
            for i in range(model.num_layers)
        )
    return tuple(ActivationPolicy(layer=i) for i in range(model.num_layers))


# the buffer-reuse MIP in `memtier plan` (the layout search has already run): a short time limit,
# an arena within BUFFER_GAP_REL of the live-bytes lower bound is good enough, and a short local
# search (on Llama/GPT blocks 50 trials found what 300 did)
BUFFER_TIME_LIMIT_S = 0.25
BUFFER_GAP_REL = 0.02
BUFFER_SEARCH_ITERATIONS = 100


def buffer_settings(*, time_limit_s: float = BUFFER_TIME_LIMIT_S, seed: int = 0) -> BufferSettings:
    """What `memtier plan` solves the buffer MIP with: short, and the same answer on every run."""
    return BufferSettings(
        mip=MipSettings(time_limit_s=time_limit_s, gap_rel=BUFFER_GAP_REL),
        search_iterations=BUFFER_SEARCH_ITERATIONS,
        seed=seed,
        deterministic=True,
    )


def with_buffer_offsets(
    model: ModelSpec,
    workload: Workload,
    layout: Layout,
    policies: Sequence[ActivationPolicy],
    *,
    settings: BufferSettings,
) -> tuple[tuple[ActivationPolicy, ...], SolverReport]:
    """Every policy with the arena offsets of its block's saved tensors, and the solver's report.

    The block's tensors come from its shapes (`planner.lifetimes.block_lifetimes`) at the
    layout's micro-batch and tp/sp/cp split; every block runs the same request sequence, so
    one solve serves all layers (MEMO, Zhao et al. 2024). A swapped or recomputed block's
    saved tensors live for a sub-interval of the kept block's, so the same offsets hold.
    """
    trace = block_lifetimes(
        model,
        workload,
        micro_batch=layout.micro_batch,
        tp=layout.tp,
        sp=layout.sequence_parallel,
        cp=layout.cp,
    )
    solution = solve_buffers(trace.tensors, strategy="mip", settings=settings)
    align = settings.alignment_bytes
    offsets = offsets_by_role(trace.tensors, solution, "saved")
    sizes = tuple(-(-t.size_bytes // align) * align for t in trace.tensors if t.role == "saved")
    out = tuple(dataclasses.replace(p, buffer_offsets=offsets, buffer_bytes=sizes) for p in policies)
    return out, solution.report()


def memory_options(plan: Plan) -> MemoryOptions:
    """The MemoryOptions a Plan's decisions stand for (to re-cost a plan with the cost models)."""
    chunk = plan.loss.chunk_size if plan.loss.kind == "chunked" else 0
    if plan.model_state.stream:
        eb = ElementBytes.of(plan.workload)
        params, grads, _ = resident_state_bytes(plan.model_state.groups, eb, plan.model_state.prefetch_depth)
        streamed = (params, grads)
        return MemoryOptions.on(plan.cluster, plan.workload, policies=plan.activations, loss_chunk_tokens=chunk,
                                stream_state_bytes=streamed)  # fmt: skip
    offload = Offload()
    tier = plan.optimizer.tier
    if plan.optimizer.offload and tier != "device":
        offload = Offload(optimizer=True, tier=tier)
    swapped = [p for p in plan.activations if p.swap_fraction > 0]
    early = bool(swapped) and swap_out_early(
        plan.model, plan.cluster, plan.workload, plan.layout, swapped[0].swap_tier
    )
    return MemoryOptions.on(plan.cluster, plan.workload, offload=offload, policies=plan.activations,
                            loss_chunk_tokens=chunk, swap_out_early=early)  # fmt: skip


def optimizer_settings(workload: Workload) -> dict[str, Any]:
    opt = workload.optimizer
    settings: dict[str, Any] = {
        "lr": opt.lr,
        "betas": list(opt.betas),
        "eps": opt.eps,
        "weight_decay": opt.weight_decay,
    }
    if opt.low_rank:
        settings.update(rank=opt.rank, update_proj_gap=opt.update_proj_gap)
        if opt.kind == "frugal":
            settings["density"] = opt.density
    return settings


def host_tier_bytes(
    model: ModelSpec, cluster: ClusterSpec, workload: Workload, chosen: Candidate
) -> dict[str, int]:
    """Per device, the bytes the runtime keeps in each host tier under the candidate's decisions.

    The memory model's host bytes, and, for an optimizer offloaded from an accelerator with fp32
    parameters, their fp32 master copy: the memory model counts fp32 parameters as their own master
    weights, which holds where the device is the CPU that updates them (offload.optimizer keeps only the
    two moments there, 8 B per element), not across a host link (12 B per element, as ZeRO-Offload).
    """
    used = {kind: b for kind, b in chosen.memory.host_bytes.items() if b > 0}
    offload, layout = chosen.options.offload, chosen.layout
    if offload.optimizer and not workload.mixed_precision and cluster.device.kind != "cpu":
        psi = max(trained_params(model, workload, layout, s) for s in range(layout.pp))
        shard = layout.dp * layout.cp if layout.zero_stage >= 1 else 1
        used[offload.tier] = used.get(offload.tier, 0) + int(psi * FP32 / shard)
    return used


def optimizer_plan(workload: Workload, chosen: Candidate) -> OptimizerPlan:
    """The optimizer's kind, settings and placement, and what the runtime runs it with.

    The CPU kernel and the update schedule are fixed here, not measured by each rank: data-parallel ranks
    that picked differently would round differently and drift apart. The schedule follows the placement:
    the planned side of each subgroup when the placement decided them (interleaved offload), else the CPU.
    """
    offload = chosen.options.offload
    optimizer = OptimizerPlan(
        kind=workload.optimizer.kind,
        settings=optimizer_settings(workload),
        offload=offload.optimizer,
        tier=offload.tier if offload.optimizer else "device",
        max_grad_norm=workload.max_grad_norm,
        precision=workload.precision,
        layerwise=workload.layerwise,
        state_bits=workload.optimizer.state_bits,
    )
    placed = chosen.optimizer.optimizer_plan
    if placed is not None:
        # the strategy decided subgroups, their tiers and the expected device/CPU split
        kept = ("kind", "settings", "max_grad_norm", "precision", "layerwise", "state_bits")
        optimizer = dataclasses.replace(placed, **{k: getattr(optimizer, k) for k in kept})
    return optimizer


def plan_from_candidate(
    model: ModelSpec,
    cluster: ClusterSpec,
    workload: Workload,
    chosen: Candidate,
    result: SearchResult | None = None,
    *,
    notes: Sequence[str] = (),
    buffers: BufferSettings | None = None,
    engine: Engine = "torch",
) -> Plan:
    """The Plan of a candidate; with `buffers`, the buffer-reuse MIP's offsets per layer.

    Without buffer offsets to carry, a plan that keeps every block lists no per-layer policy (keep is
    every layer's default: `Plan.activation_policy`).
    """
    layout = dataclasses.replace(chosen.layout, engine=engine)
    if not layout.rank_to_device and layout.world_size <= cluster.world_size:
        layout = dataclasses.replace(
            layout, rank_to_device=tuple(cluster.device_name(r) for r in range(layout.world_size))
        )
    # one tier per host tier the plan uses, capped at what it puts there (per device) plus a
    # margin: the runtime pre-allocates host arenas to this cap
    tiers = tuple(
        TierPlan(
            kind=kind,  # type: ignore[arg-type]
            capacity_bytes=tier_capacity_bytes(used),
            path=spec.path,
            numa_node=spec.numa_node,
        )
        for kind, used in sorted(host_tier_bytes(model, cluster, workload, chosen).items())
        if (spec := cluster.tier(kind)) is not None
    )
    mem, t = chosen.memory, chosen.time
    per_node = {tier: b * cluster.devices_per_node for tier, b in mem.host_bytes.items()}
    solvers = []
    if result is not None:
        solvers.append(result.report)
    solvers += [chosen.optimizer.report, chosen.activations.report]
    if chosen.mapping is not None:
        solvers.append(chosen.mapping.report)
    activations = layer_policies(model, chosen.options)
    if buffers is not None:
        activations, report = with_buffer_offsets(model, workload, layout, activations, settings=buffers)
        solvers.append(report)
    elif all(p == ActivationPolicy(layer=p.layer) for p in activations):
        activations = ()
    optimizer = optimizer_plan(workload, chosen)
    if chosen.optimizer.optimizer_plan is not None:
        notes = (*notes, optimizer_note(optimizer, layout))
    loss = (
        LossPlan(kind="chunked", chunk_size=chosen.options.loss_chunk_tokens)
        if chosen.options.loss_chunk_tokens
        else LossPlan()
    )
    predicted = _predicted(mem, t, {"device": mem.total, **per_node}, tuple(solvers))
    return _assemble(model, cluster, workload, layout, activations, optimizer, loss, tiers, predicted, notes)


def _predicted(
    mem: MemoryBreakdown, t: StepTime, by_tier: dict[str, int], solvers: tuple[SolverReport, ...] = ()
) -> Predicted:
    return Predicted(
        bytes_by_tier=by_tier,
        bytes_by_category=mem.by_category(),
        peak_bytes=mem.total,
        step_time_s=t.step_s,
        time_breakdown=t.breakdown(),
        tflops_per_device=t.tflops_per_device,
        mfu=t.mfu,
        hfu=t.hfu,
        solvers=solvers,
    )


def _assemble(
    model: ModelSpec,
    cluster: ClusterSpec,
    workload: Workload,
    layout: Layout,
    activations: tuple[ActivationPolicy, ...],
    optimizer: OptimizerPlan,
    loss: LossPlan,
    tiers: tuple[TierPlan, ...],
    predicted: Predicted,
    notes: Sequence[str],
    model_state: ModelStatePlan | None = None,
) -> Plan:
    """The one place a Plan is put together (search mode, budget mode, streamed and fixed plans all end
    here)."""
    note = cluster.device.compile_note(workload.compile, workload.compile_memory_budget)
    notes = (*notes, note) if note and note not in notes else notes
    return Plan(
        model=model,
        cluster=cluster,
        workload=workload.replace(micro_batch=layout.micro_batch),
        layout=layout,
        activations=activations,
        optimizer=optimizer,
        loss=loss,
        tiers=tiers,
        model_state=model_state or ModelStatePlan(),
        predicted=predicted,
        notes=tuple(notes),
    )


def fixed_plan(
    model: ModelSpec,
    cluster: ClusterSpec,
    workload: Workload,
    *,
    layout: Layout | None = None,
    activations: tuple[ActivationPolicy, ...] = (),
    optimizer: OptimizerPlan | None = None,
    loss: LossPlan | None = None,
    tiers: tuple[TierPlan, ...] = (),
    optimizer_impl: Literal["foreach", "single_tensor", "fused"] = "fused",
    notes: Sequence[str] = (),
) -> Plan:
    """A Plan for decisions made elsewhere (a baseline strategy, a benchmark's competitor, a test), with the
    memory and step-time models' predictions for exactly those decisions: the same contract as a searched
    plan, so one trainer, one peak check and one report serve every strategy."""
    layout = layout or Layout(
        dp=1, micro_batch=workload.micro_batch, rank_to_device=(cluster.device_name(0),)
    )
    optimizer = optimizer or OptimizerPlan(kind=workload.optimizer.kind, max_grad_norm=workload.max_grad_norm)
    loss = loss or LossPlan()
    tier: Literal["dram", "cxl", "nvme"] = "dram" if optimizer.tier == "device" else optimizer.tier
    options = MemoryOptions(
        policies=activations,
        offload=Offload(optimizer=optimizer.offload, tier=tier),
        loss_chunk_tokens=loss.chunk_size if loss.kind == "chunked" else 0,
        optimizer_impl=optimizer_impl,
    )
    est = estimate(
        model, cluster, workload.replace(micro_batch=layout.micro_batch), layout, options, check=False
    )
    predicted = _predicted(est.memory, est.time, est.memory.by_tier())
    return _assemble(model, cluster, workload, layout, activations, optimizer, loss, tiers, predicted, notes)


def optimizer_note(optimizer: OptimizerPlan, layout: Layout) -> str:
    """What an interleaved optimizer plan asks of the runtime, in a sentence."""
    tiers = sorted({sg.tier for sg in optimizer.subgroups})
    on_device = sum(1 for sg in optimizer.subgroups if sg.update_side == "device")
    note = (
        f"optimizer: interleaved offload, {len(optimizer.subgroups)} subgroups of up to"
        f" {optimizer.subgroup_size} elements in {', '.join(tiers) or 'no tier'}; {on_device} updated on"
        f" the device ({100 * optimizer.device_update_fraction:.1f}% of the elements), the rest on the CPU."
    )
    if layout.zero_stage == 0:
        note += (
            " DeepSpeed cannot express this at ZeRO-0: ds_config.json keeps the optimizer state resident"
            " and memtier's runtime (offload.apply with plan.json) carries out the interleaving."
        )
    return note


# ---- why it won ------------------------------------------------------------------------


def _strategies(c: Candidate) -> str:
    s = f"activations {c.activations.strategy}, ZeRO-{c.layout.zero_stage}"
    if c.optimizer.strategy == "interleaved":
        return s + ", optimizer state in host tiers with interleaved CPU/device updates"
    return s + (", optimizer state offloaded to host" if c.optimizer.strategy == "offload" else "")


def explain(chosen: Candidate, result: SearchResult) -> tuple[str, ...]:
    """Why the chosen layout won: its numbers, what it saves against the runner-up, the mapping."""
    t = chosen.time
    lines = [
        f"{chosen.describe()}: {t.step_s:.3f} s per step, {t.tflops_per_device:.1f} TFLOP/s per device"
        f" (MFU {100 * t.mfu:.1f}%), peak {fmt_bytes(chosen.peak_bytes)} of {fmt_bytes(result.budget_bytes)}"
        f" ({_strategies(chosen)}); bottleneck {t.bottleneck}."
    ]
    if len(result.ranked) > 1:
        runner = result.ranked[1]
        ours, theirs = chosen.time.breakdown(), runner.time.breakdown()
        deltas = sorted(((theirs[k] - ours[k], k) for k in ours), reverse=True)
        saved = [f"{k} {ours[k]:.3f} s vs {theirs[k]:.3f} s" for d, k in deltas[:2] if d > 1e-9]
        pct = 100 * (runner.step_s / chosen.step_s - 1)
        lines.append(
            f"{pct:.1f}% faster than the runner-up {runner.describe()} ({runner.step_s:.3f} s)"
            + (": " + "; ".join(saved) if saved else "")
            + "."
        )
    else:
        lines.append("the only layout that fits.")
    links = ", ".join(f"{k} {fmt_rate(v)}" for k, v in t.links.items() if v != float("inf"))
    if chosen.mapping is not None:
        m = chosen.mapping
        if m.is_default:
            lines.append(
                f"rank mapping: the default order is the best of {m.evaluated} mappings scored"
                f" (slowest links: {links})."
            )
        else:
            lines.append(
                f"rank mapping: {100 * (m.gain - 1):.1f}% faster than the default order"
                f" ({m.default_step_s:.3f} s -> {m.step_s:.3f} s, {m.evaluated} mappings scored;"
                f" slowest links: {links})."
            )
    lines.append(
        f"searched {result.shapes} parallel shapes, {result.configurations} configurations"
        f" ({result.pruned_by_states} pruned by model-state memory before timing), {result.timed} timed"
        "."  # the search's wall time is in the command's output, not in the plan (same inputs, same file)
    )
    return tuple(lines)


# ---- nothing fits --------------------------------------------------------------------------


def _leanest(lean: dict[str, Shortfall]) -> Shortfall | None:
    return min(lean.values(), key=lambda s: s.need_bytes) if lean else None


def infeasible_error(
    model: ModelSpec,
    cluster: ClusterSpec,
    workload: Workload,
    *,
    budget: int | None,
    space: SearchSpace,
    optimizer_strategies: Sequence[Strategy] = OPTIMIZER_STRATEGIES,
    activation_strategies: Sequence[Strategy] = ACTIVATION_STRATEGIES,
) -> InfeasibleError:
    have = usable_bytes(cluster, workload, budget)
    kw: dict[str, Any] = {
        "optimizer_strategies": optimizer_strategies,
        "activation_strategies": activation_strategies,
    }
    lean = least_memory(model, cluster, workload, space=space, **kw)
    best = _leanest(lean)
    if best is None:
        check_shapes(model, cluster, workload, space)  # raises: no shape at all
        raise AssertionError("least_memory found nothing although a shape exists")
    plain = lean.get("resident")
    parts = []
    if plain is not None:
        parts.append(
            f"the leanest layout ({plain.describe}, ZeRO-{plain.layout.zero_stage}) needs"
            f" {fmt_bytes(plain.need_bytes)} per device, has {fmt_bytes(have)}"
        )
    off = lean.get("offload")
    if off is not None:
        parts.append(
            f"with ZeRO-{off.layout.zero_stage} + optimizer offload ({off.describe}) it needs"
            f" {fmt_bytes(off.need_bytes)}"
        )
    else:
        # every offload layout was left out because the host tiers cannot take the optimizer state:
        # say how much they would need at the finest sharding (ZeRO-3 over all devices)
        sharded = Layout(dp=cluster.world_size, zero_stage=3, micro_batch=1)
        per_node = model_states(model, workload, sharded).optimizer_states * cluster.devices_per_node
        dram = cluster.tier("dram")
        parts.append(
            f"optimizer offload needs {fmt_bytes(per_node)} of DRAM per node even with ZeRO-3 over"
            f" {cluster.world_size} devices, the node has {fmt_bytes(dram.capacity if dram else 0)}"
        )
    message = "no layout fits: " + "; ".join(parts)

    def fits(c: ClusterSpec, w: Workload, s: SearchSpace, b: int | None) -> Shortfall | None:
        found = _leanest(least_memory(model, c, w, space=s, **kw))
        return found if found is not None and found.need_bytes <= usable_bytes(c, w, b) else None

    alternatives = []
    if space.micro_batch is not None and space.micro_batch > 1:
        hit = fits(cluster, workload, dataclasses.replace(space, micro_batch=1), budget)
        if hit is not None:
            alternatives.append(
                f"--micro-batch 1: {hit.describe} needs {fmt_bytes(hit.need_bytes)} per device"
            )
    factor = 2
    while factor <= MAX_NODE_FACTOR:
        bigger = cluster.with_nodes(cluster.nodes * factor)
        hit = fits(bigger, workload, space, budget)
        if hit is not None:
            alternatives.append(
                f"more devices: {bigger.nodes} nodes ({bigger.world_size} devices) fit with {hit.describe}"
                f" at {fmt_bytes(hit.need_bytes)} per device"
            )
            break
        factor *= 2
    seq = workload.seq_len // 2
    while seq >= 128:
        hit = fits(cluster, workload.replace(seq_len=seq), space, budget)
        if hit is not None:
            alternatives.append(f"--seq {seq}: {hit.describe} needs {fmt_bytes(hit.need_bytes)} per device")
            break
        seq //= 2
    if budget is not None and budget < cluster.device.memory:
        hit = fits(cluster, workload, space, None)
        if hit is not None:
            alternatives.append(
                f"the device's whole memory ({fmt_bytes(cluster.device.memory)}) instead of --budget"
                f" {fmt_bytes(budget)}: {hit.describe} needs {fmt_bytes(hit.need_bytes)}"
            )
    if not alternatives:
        alternatives.append(
            f"a device with at least {fmt_bytes(best.need_bytes / (1 - workload.headroom) + GiB // 2)} of memory"
        )
    return InfeasibleError(message, need_bytes=best.need_bytes, have_bytes=have, alternatives=alternatives)


# ---- model state streamed from the host tiers ----------------------------------------------------


def streamed_result(
    model: ModelSpec,
    cluster: ClusterSpec,
    workload: Workload,
    *,
    budget: int | None = None,
    space: SearchSpace | None = None,
    engine: Engine = "torch",
    stream_all: bool = False,
    buffers: BufferSettings | None = None,
) -> PlanResult | None:
    """The plan that streams the model state from the host tiers (`planner.model_state`), or None where
    even streaming every group misses the device. The host tiers too small: InfeasibleError (exit 3) with
    the bytes missing and what would fit."""
    refusal = stream_refusal(cluster, workload, engine)
    refusal = refusal or ("model-state streaming trains every parameter, not LoRA" if workload.lora else None)
    if refusal is not None:
        raise LayoutError(refusal, field="model_state")
    space = space or SearchSpace()
    have = usable_bytes(cluster, workload, budget)
    found = plan_model_state(
        model,
        cluster,
        workload,
        budget_bytes=have,
        micro_batches=micro_batches(workload, 1, space),
        loss_chunk_tokens=space.loss_chunk_tokens,
        stream_all=stream_all,
    )
    if not isinstance(found, StreamedState):
        if found.where == "device":
            return None
        fits_pure = workload.mixed_precision and isinstance(
            plan_model_state(
                model,
                cluster,
                workload.replace(precision="pure"),
                budget_bytes=have,
                micro_batches=micro_batches(workload, 1, space),
                loss_chunk_tokens=space.loss_chunk_tokens,
            ),
            StreamedState,
        )
        message, alternatives = host_shortfall_advice(model, cluster, workload, found, fits_pure)
        raise HostTiersShortError(
            message, need_bytes=found.need_bytes, have_bytes=found.have_bytes, host_need_bytes=found.need_bytes,
            host_have_bytes=found.have_bytes, alternatives=alternatives,
        )  # fmt: skip
    return _streamed_plan_result(
        model, cluster, workload, found, engine=engine, budget_bytes=have, buffers=buffers
    )


def streamed_plan(
    model: ModelSpec,
    cluster: ClusterSpec,
    workload: Workload,
    *,
    budget: int | None = None,
    micro_batch: int | None = None,
    engine: Engine = "torch",
    stream_all: bool = False,
) -> Plan:
    """A Plan whose model state streams from the host tiers, within a device `budget` (default: the device's
    memory less the headroom): what a benchmark or a runtime test asks for directly. `stream_all` streams
    every group even where the model would fit. InfeasibleError where nothing fits."""
    space = SearchSpace(micro_batch=micro_batch)
    found = streamed_result(
        model, cluster, workload, budget=budget, space=space, engine=engine, stream_all=stream_all,
        buffers=buffer_settings(),
    )  # fmt: skip
    if found is None:
        raise InfeasibleError(
            "the device cannot hold one streamed block's buffers and the step's activations, even with"
            " every block recomputed",
            need_bytes=0,
            have_bytes=usable_bytes(cluster, workload, budget),
        )
    return found.plan


def _streamed_plan_result(
    model: ModelSpec,
    cluster: ClusterSpec,
    workload: Workload,
    s: StreamedState,
    *,
    engine: Engine,
    budget_bytes: int,
    buffers: BufferSettings | None = None,
) -> PlanResult:
    layout = dataclasses.replace(s.layout, engine=engine, rank_to_device=(cluster.device_name(0),))
    tiers = tuple(
        # capped at the tier's room: a 10% margin on a full drive would promise bytes it does not have
        TierPlan(kind=kind, capacity_bytes=min(tier_capacity_bytes(used), max(used, int(s.tier_room[kind] / FILL_FRACTION))),  # type: ignore[arg-type]
                 path=spec.path, numa_node=spec.numa_node)
        for kind, used in sorted(s.host_bytes.items()) if used > 0 and (spec := cluster.tier(kind)) is not None
    )  # fmt: skip
    # the optimizer's state moves with the model state (`Plan.model_state`): not offloaded "the other way"
    # (offload.state refuses a plan that does both)
    optimizer = OptimizerPlan(
        kind=workload.optimizer.kind,
        settings=optimizer_settings(workload),
        max_grad_norm=workload.max_grad_norm,
        precision=workload.precision,
    )
    chosen, search_result = s.candidate(layout, budget_bytes)
    report, state_report = search_result.report, chosen.optimizer.report
    activations = layer_policies(model, s.options)
    solvers: tuple[SolverReport, ...] = (report, state_report, chosen.activations.report)
    if buffers is not None:
        activations, buffer_report = with_buffer_offsets(
            model, workload, layout, activations, settings=buffers
        )
        solvers += (buffer_report,)
    elif all(p == ActivationPolicy(layer=p.layer) for p in activations):
        activations = ()
    by_tier = {"device": s.memory.total, **s.host_bytes}
    predicted = dataclasses.replace(
        _predicted(s.memory, s.time, by_tier, solvers),
        time_breakdown=dict(s.time_breakdown),
        host_peak_bytes=s.host_peak_bytes,
    )
    why = s.notes(budget_bytes)
    plan = _assemble(
        model, cluster, workload, layout, activations, optimizer, LossPlan(
            kind="chunked", chunk_size=s.options.loss_chunk_tokens) if s.options.loss_chunk_tokens else LossPlan(),
        tiers, predicted, why, model_state=s.state,
    )  # fmt: skip
    return PlanResult(plan=plan, chosen=chosen, search=search_result, why=why)
