"""The planner's fixed-layout mode (`planner.budget.plan_for_budget`, behind `memtier launch --auto` and
`memtier bench`): plans shed memory in order as the budget falls, and build through the one Plan builder."""

from __future__ import annotations

import pytest

from planner.budget import plan_for_budget
from planner.errors import InfeasibleError
from planner.memory import MemoryOptions, estimate_memory
from planner.plan import SCHEMA_VERSION, Layout, Plan
from planner.planning import memory_options, tier_capacity_bytes
from planner.presets import MODEL_PRESETS
from planner.workload import Workload
from tests.integration.helpers import cpu_cluster

LLAMA34 = MODEL_PRESETS["llama-34m"]
WORKLOAD = Workload(global_batch=4, micro_batch=4, seq_len=512, dtype="fp32")


def _baseline_peak() -> int:
    opts = MemoryOptions(optimizer_impl="fused")
    return estimate_memory(LLAMA34, WORKLOAD, Layout(micro_batch=4), opts).total


def test_budget_plans_shed_memory_in_order():
    cluster = cpu_cluster(1)
    base = _baseline_peak()
    full = plan_for_budget(LLAMA34, cluster, WORKLOAD, budget_bytes=base)
    assert full.plan.predicted.peak_bytes <= base and not full.plan.activations
    resident = plan_for_budget(LLAMA34, cluster, WORKLOAD, budget_bytes=base // 2)
    assert resident.plan.predicted.peak_bytes <= base // 2 and not resident.plan.optimizer.offload
    half = plan_for_budget(LLAMA34, cluster, WORKLOAD, budget_bytes=base // 2, optimizer_offload=True)
    assert half.plan.predicted.peak_bytes <= base // 2
    # a DRAM copy costs far less than recomputing a block here: with the optimizer state off the device
    # (faster than recomputing, so preferred) the plan swaps rather than recomputes
    assert half.plan.optimizer.offload
    assert half.plan.predicted.step_time_s < resident.plan.predicted.step_time_s
    assert sum(a.swap_fraction for a in half.plan.activations) > sum(
        a.recompute_fraction for a in half.plan.activations
    )
    assert half.plan.tier("dram") is not None and half.plan.loss.kind == "chunked"
    with pytest.raises(InfeasibleError) as err:
        plan_for_budget(LLAMA34, cluster, WORKLOAD, budget_bytes=base // 4)
    assert err.value.need_bytes > err.value.have_bytes == base // 4
    quarter = plan_for_budget(LLAMA34, cluster, WORKLOAD, budget_bytes=base // 4, optimizer_offload=True)
    assert quarter.plan.optimizer.offload and quarter.plan.predicted.peak_bytes <= base // 4


def test_cpu_budget_plans_keep_the_micro_batch_and_price_the_copies():
    """Issue #9: at 25 % the plan keeps micro-batch 4 (accumulation would keep every gradient on the device);
    on a CPU device a swap is a memcpy on the computing cores, so its copy time is in the predicted step."""
    cluster = cpu_cluster(1)
    assert cluster.device.kind == "cpu"
    base = _baseline_peak()
    half = plan_for_budget(LLAMA34, cluster, WORKLOAD, budget_bytes=base // 2, optimizer_offload=True).plan
    swapped = sum(a.swap_fraction for a in half.activations)
    assert swapped > 0 and half.predicted.time_breakdown["swap"] > 0
    assert half.predicted.bytes_by_tier["dram"] > 0  # the swapped bytes and the optimizer state
    quarter = plan_for_budget(LLAMA34, cluster, WORKLOAD, budget_bytes=base // 4, optimizer_offload=True)
    assert quarter.plan.layout.micro_batch == 4 and quarter.plan.layout.grad_accum == 1
    assert quarter.plan.predicted.peak_bytes == quarter.memory.total <= base // 4
    # the memory model's step phases, the backward sweep included, are what the plan was checked against
    assert quarter.memory.detail["phase_block_backward"] <= base // 4


def test_budget_plans_are_built_like_searched_ones(tmp_path):
    """One builder: the same tier margins, runtime settings and solver reports as `memtier plan`'s plans,
    the plan re-costs to its own prediction, and it round-trips through plan.json."""
    cluster = cpu_cluster(1)
    result = plan_for_budget(
        LLAMA34, cluster, WORKLOAD.replace(max_grad_norm=0.5), budget_bytes=_baseline_peak() // 2,
        optimizer_offload=True, engine="accelerate",
    )  # fmt: skip
    plan = result.plan
    per_device = plan.predicted.bytes_by_tier["dram"] // cluster.devices_per_node
    assert plan.tier("dram").capacity_bytes == tier_capacity_bytes(per_device)  # type: ignore[union-attr]
    assert (plan.optimizer.schedule, plan.optimizer.cpu_kernel) == ("cpu", "torch_fused")
    assert plan.optimizer.max_grad_norm == 0.5 and plan.layout.engine == "accelerate"
    assert [r.problem for r in plan.predicted.solvers] == ["layout", "optimizer", "activations"]
    assert result.steps[-1] == "activations+optimizer_offload (micro-batch 4)"
    opts = memory_options(plan)
    again = estimate_memory(LLAMA34, plan.workload, plan.layout, MemoryOptions(
        policies=opts.policies, loss_chunk_tokens=opts.loss_chunk_tokens, offload=opts.offload,
        optimizer_impl="fused", swap_out_early=opts.swap_out_early,
    ))  # fmt: skip
    assert again.total == plan.predicted.peak_bytes
    plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded == plan and loaded.schema_version == SCHEMA_VERSION


def test_budget_mode_names_what_would_fit():
    with pytest.raises(InfeasibleError) as err:
        plan_for_budget(LLAMA34, cpu_cluster(1), WORKLOAD, budget_bytes=1 << 20, optimizer_offload=True)
    assert "no plan fits 1 MiB per device" in str(err.value) and err.value.need_bytes > 1 << 20
    with pytest.raises(InfeasibleError, match=r"global_batch\(4\) is not a multiple of dp\(3\)"):
        plan_for_budget(LLAMA34, cpu_cluster(1), WORKLOAD, budget_bytes=1 << 30, dp=3)
