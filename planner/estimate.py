"""One estimate of a layout: validated, then costed by the memory and time models."""

from __future__ import annotations

from dataclasses import dataclass, replace

from planner.cluster import ClusterSpec
from planner.errors import LayoutError
from planner.lora import check_lora
from planner.memory import MemoryBreakdown, MemoryOptions, estimate_memory
from planner.model import ModelSpec
from planner.plan import Layout
from planner.steptime import StepTime, estimate_step_time
from planner.workload import Workload


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    memory: MemoryBreakdown
    time: StepTime
    budget_bytes: int

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.budget_bytes


def validate_layout(model: ModelSpec, cluster: ClusterSpec, workload: Workload, layout: Layout) -> None:
    """Hard constraints; the error prints the arithmetic that failed."""
    check_lora(model, workload)
    world = cluster.world_size
    if layout.world_size != world:
        raise LayoutError(
            f"tp({layout.tp}) * pp({layout.pp}) * dp({layout.dp}) * cp({layout.cp}) = {layout.world_size}"
            f" != world_size({world})",
            field="layout",
        )
    if model.num_heads % layout.tp:
        raise LayoutError(
            f"num_heads({model.num_heads}) % tp({layout.tp}) = {model.num_heads % layout.tp} != 0", field="tp"
        )
    kv = model.num_kv_heads
    if kv % layout.tp and layout.tp % kv:
        raise LayoutError(f"num_kv_heads({kv}) and tp({layout.tp}) do not divide one another", field="tp")
    if layout.pp > model.num_layers:
        raise LayoutError(f"pp({layout.pp}) > num_layers({model.num_layers})", field="pp")
    if layout.stage_layers and sum(layout.stage_layers) != model.num_layers:
        raise LayoutError(
            f"sum(stage_layers) = {sum(layout.stage_layers)} != num_layers({model.num_layers})",
            field="stage_layers",
        )
    if workload.seq_len % layout.cp:
        raise LayoutError(
            f"seq_len({workload.seq_len}) % cp({layout.cp}) = {workload.seq_len % layout.cp} != 0", field="cp"
        )
    per = layout.micro_batch * layout.dp
    if workload.global_batch % per:
        raise LayoutError(
            f"global_batch({workload.global_batch}) % (micro_batch({layout.micro_batch}) * dp({layout.dp}))"
            f" = {workload.global_batch % per} != 0",
            field="global_batch",
        )
    if layout.grad_accum * per != workload.global_batch:
        raise LayoutError(
            f"micro_batch({layout.micro_batch}) * dp({layout.dp}) * grad_accum({layout.grad_accum})"
            f" = {layout.grad_accum * per} != global_batch({workload.global_batch})",
            field="grad_accum",
        )


def budget_bytes(cluster: ClusterSpec, workload: Workload, budget: int | None = None) -> int:
    cap = cluster.device.memory if budget is None else budget
    return int(cap * (1.0 - workload.headroom))


def estimate(
    model: ModelSpec,
    cluster: ClusterSpec,
    workload: Workload,
    layout: Layout,
    options: MemoryOptions | None = None,
    *,
    budget: int | None = None,
    mapping: list[int] | None = None,
    check: bool = True,
) -> Estimate:
    if check:
        validate_layout(model, cluster, workload, layout)
    # the kernels this device runs decide what the ops save, whatever the caller's options assumed
    options = replace(options or MemoryOptions(), **cluster.device.kernel_options(workload))
    mem = estimate_memory(model, workload, layout, options)
    t = estimate_step_time(model, cluster, workload, layout, options, mapping=mapping)
    return Estimate(layout=layout, memory=mem, time=t, budget_bytes=budget_bytes(cluster, workload, budget))
