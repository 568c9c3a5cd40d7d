"""The swap/recompute MIP joins `memtier plan` through the strategy interface."""

import pytest

from planner.memory import estimate_memory
from planner.planning import make_plan
from planner.presets import MODEL_PRESETS, resolve_cluster
from planner.strategies import ACTIVATION_BASELINES, ActivationMip
from planner.strategy import StrategyInput
from planner.units import GiB
from planner.workload import Workload

CLUSTER = resolve_cluster("rtx4090-nvme")
WORK = Workload(global_batch=8, micro_batch=1, seq_len=16384)
MODEL = MODEL_PRESETS["llama-300m"]


def test_plan_carries_mip_policies_and_beats_baselines():
    with_mip = make_plan(MODEL, CLUSTER, WORK, budget=10 * GiB)
    baselines = make_plan(MODEL, CLUSTER, WORK, budget=10 * GiB, activation_strategies=ACTIVATION_BASELINES)
    plan = with_mip.plan
    assert with_mip.chosen.activations.strategy == "swap_mip"
    assert len(plan.activations) == MODEL.num_layers
    assert any(a.swap_fraction > 0 for a in plan.activations)
    assert plan.predicted.step_time_s < baselines.plan.predicted.step_time_s
    assert any(r.problem == "activations" and r.strategy == "mip" for r in plan.predicted.solvers)
    # the policies it carries fit the budget per the memory model
    assert plan.predicted.peak_bytes <= int(10 * GiB * (1 - WORK.headroom))


@pytest.mark.parametrize("budget_gib", [8, 9, 10])
def test_strategy_fits_its_budget(budget_gib):
    from planner.memory import MemoryOptions, Offload
    from planner.plan import Layout

    layout = Layout(micro_batch=1, grad_accum=8, zero_stage=1)
    inp = StrategyInput(
        model=MODEL,
        cluster=CLUSTER,
        workload=WORK,
        layout=layout,
        budget_bytes=budget_gib * GiB,
        options=MemoryOptions(offload=Offload(optimizer=True)),
    )
    res = ActivationMip().solve(inp)
    assert res.fits
    mem = estimate_memory(MODEL, WORK, layout, res.options)
    assert mem.total <= budget_gib * GiB
    # less memory, more swapped or recomputed
    kept = sum(p.keep_fraction for p in res.options.policies)
    assert kept < MODEL.num_layers
