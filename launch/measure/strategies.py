"""What `memtier bench` runs: its strategies, its config, and the Plan each strategy trains with.

A baseline strategy stands for a fixed plan (so the same script, peak and predictions serve all); a
``memtier@F`` strategy is a plan for a device budget of F % of the baseline's predicted peak.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from planner.cluster import ClusterSpec
from planner.model import ModelSpec
from planner.plan import ActivationPolicy, Layout, OptimizerPlan, Plan, TierPlan
from planner.workload import Workload

BUDGETS = (1.0, 0.5, 0.25)
# share of a budget the plan leaves unused for the memory model's error (measured within ~1 % on llama-34m)
PLAN_MARGIN = 0.02


@dataclass(frozen=True, kw_only=True)
class Strategy:
    name: str
    engine: str  # train_lm --engine
    describe: str


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy(name="pytorch", engine="torch", describe="plain PyTorch, everything kept"),
        Strategy(name="accelerate", engine="accelerate", describe="accelerate.Accelerator().prepare"),
        Strategy(
            name="deepspeed",
            engine="deepspeed",
            describe="DeepSpeed ZeRO-2, CPU optimizer offload, every block checkpointed",
        ),
        Strategy(name="recompute_all", engine="torch", describe="PyTorch, every block recomputed"),
        *(
            Strategy(
                name=f"memtier@{int(f * 100)}", engine="torch", describe=f"memtier plan at {int(f * 100)} %"
            )
            for f in BUDGETS
        ),
    )
}


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    model: str = "llama-34m"
    seq: int = 512
    micro_batch: int = 4
    steps: int = 2  # timed steps (after `warmup`, before the one tracked step)
    warmup: int = 1
    strategies: tuple[str, ...] = tuple(STRATEGIES)
    out: str = "benchmarks/results/bench"
    cluster: str = "local"
    calibrate: bool = False
    quick: bool = False
    threads: int = 0  # torch threads per run (0: all cores)
    timeout_s: float = 1800.0


def fixed_plan(name: str, model: ModelSpec, cluster: ClusterSpec, workload: Workload) -> Plan:
    """The plan a baseline strategy stands for (so the same script, peak and predictions serve all); built by
    the planner's one builder, with train_lm's AdamW (torch's fused kernel) in the predictions."""
    from planner.planning import fixed_plan as build

    layout = Layout(dp=1, micro_batch=workload.micro_batch, rank_to_device=("n0:d0",))
    recompute = tuple(
        ActivationPolicy(layer=i, keep_fraction=0.0, recompute_fraction=1.0) for i in range(model.num_layers)
    )
    if name in ("pytorch", "accelerate"):
        return build(model, cluster, workload, layout=layout)
    if name == "recompute_all":
        return build(model, cluster, workload, layout=layout, activations=recompute)
    if name == "deepspeed":
        return build(
            model,
            cluster,
            workload,
            layout=dataclasses.replace(layout, zero_stage=2),
            activations=recompute,
            optimizer=OptimizerPlan(kind="adamw", offload=True, tier="dram"),
            tiers=(TierPlan(kind="dram", capacity_bytes=16 * model.params + (64 << 20)),),
        )
    raise ValueError(f"strategy: {name!r} has no fixed plan")


def budget_plan(model: ModelSpec, cluster: ClusterSpec, workload: Workload, budget_bytes: int) -> Plan:
    """memtier's plan for a device budget of `budget_bytes` (the one place `memtier bench` asks the planner)."""
    from planner.budget import plan_for_budget

    return plan_for_budget(
        model, cluster, workload, budget_bytes=budget_bytes, optimizer_offload=True, optimizer_impl="fused"
    ).plan


def plan_summary(plan: Plan) -> dict[str, Any]:
    kinds: dict[str, int] = {}
    for a in plan.activations:
        kinds[a.kind] = kinds.get(a.kind, 0) + 1
    return {
        "activations": kinds or {"keep": plan.model.num_layers},
        "swap_fractions": [round(a.swap_fraction, 3) for a in plan.activations],
        "loss": plan.loss.kind + (f"({plan.loss.chunk_size})" if plan.loss.chunk_size else ""),
        "optimizer_offload": plan.optimizer.offload,
        "micro_batch": plan.layout.micro_batch,
        "grad_accum": plan.layout.grad_accum,
        "zero_stage": plan.layout.zero_stage,
    }
