"""Optimizer-state placement for interleaved offload (planner.optimizer_placement): structure and ratios."""

import dataclasses

import pytest

from planner.errors import SpecError
from planner.optimizer_placement import (
    STATE_BYTES_PER_ELEM,
    OptimizerInterleaved,
    PlacementSettings,
    place_optimizer,
    plan_placement,
    update_time_s,
)
from planner.plan import Layout
from planner.presets import MODEL_PRESETS, resolve_cluster
from planner.strategies import OptimizerOffload
from planner.strategy import StrategyInput
from planner.units import GiB
from planner.workload import OptimizerSpec, Workload

W = Workload(global_batch=8, seq_len=2048)
LAYOUT = Layout(micro_batch=1, grad_accum=8)


def test_subgroups_cover_the_parameters_and_fit_the_update_memory():
    model, cluster = MODEL_PRESETS["llama2-7b"], resolve_cluster("dgx-h100-8")
    pl = plan_placement(model, cluster, W, LAYOUT, int(cluster.device.memory * 0.95))
    plan = pl.plan
    assert pl.fits and plan.offload and plan.kind == "adamw"
    assert sum(sg.numel for sg in plan.subgroups) == model.params
    assert [sg.index for sg in plan.subgroups] == list(range(len(plan.subgroups)))
    assert all(sg.numel <= plan.subgroup_size for sg in plan.subgroups)
    assert len(plan.subgroups) >= 8  # enough to pipeline
    working = STATE_BYTES_PER_ELEM + 4  # bf16 workload: an fp32 gradient copy too
    assert plan.subgroup_size * working <= pl.update_free_bytes
    assert pl.host_bytes == {"dram": model.params * STATE_BYTES_PER_ELEM}


def test_fast_link_interleaves_and_beats_the_cpu_only_split():
    model, cluster = MODEL_PRESETS["llama2-7b"], resolve_cluster("dgx-h100-8")
    pl = plan_placement(model, cluster, W, LAYOUT, int(cluster.device.memory * 0.95))
    sides = [sg.update_side for sg in pl.plan.subgroups]
    assert 0 < pl.plan.device_update_fraction < 1
    assert pl.update_s < pl.cpu_only_s
    # interleaved: the subgroups of the rarer side are evenly spaced among the others (Bresenham)
    assert "cpu" in sides and "device" in sides
    rare = min(("cpu", "device"), key=sides.count)
    at = [i for i, s in enumerate(sides) if s == rare]
    gaps = [b - a for a, b in zip(at, at[1:])]
    assert not gaps or max(gaps) - min(gaps) <= 1
    # the fraction recorded is the share of elements on the device side
    dev = sum(sg.numel for sg in pl.plan.subgroups if sg.update_side == "device")
    assert pl.plan.device_update_fraction == pytest.approx(dev / model.params)


def test_no_free_device_memory_or_a_cpu_device_keeps_every_update_on_the_cpu():
    model, cluster = MODEL_PRESETS["llama2-7b"], resolve_cluster("dgx-h100-8")
    full = plan_placement(model, cluster, W, LAYOUT, int(cluster.device.memory * 0.95), update_free_bytes=0)
    assert full.plan.device_update_fraction == 0.0 and full.update_s == full.cpu_only_s
    cpu = dataclasses.replace(cluster, device=dataclasses.replace(cluster.device, kind="cpu"))
    pl = plan_placement(model, cpu, W, LAYOUT, int(cluster.device.memory * 0.95))
    assert pl.plan.device_update_fraction == 0.0  # both lanes are the same cores: interleaving buys nothing


def test_small_dram_spills_the_first_subgroups_to_nvme():
    model, cluster = MODEL_PRESETS["llama2-7b"], resolve_cluster("rtx4090-nvme")
    state = model.params * STATE_BYTES_PER_ELEM
    dram = dataclasses.replace(cluster.host[0], capacity=int(state * 0.5 / 0.9))  # half the state fits
    cluster = dataclasses.replace(cluster, host=(dram, cluster.host[1]))
    pl = plan_placement(model, cluster, W, LAYOUT, 200 * GiB)  # a budget the parameters fit, to test tiers
    tiers = [sg.tier for sg in pl.plan.subgroups]
    assert set(tiers) == {"dram", "nvme"}
    first_dram = tiers.index("dram")
    assert all(t == "nvme" for t in tiers[:first_dram]) and all(t == "dram" for t in tiers[first_dram:])
    assert pl.host_bytes["dram"] <= dram.capacity * 0.9 and sum(pl.host_bytes.values()) == state
    # NVMe traffic costs time: more than with everything in DRAM
    roomy = dataclasses.replace(
        cluster, host=(dataclasses.replace(dram, capacity=2 * state), cluster.host[1])
    )
    assert pl.update_s >= plan_placement(model, roomy, W, LAYOUT, 200 * GiB).update_s


def test_nothing_fits_is_reported_not_hidden():
    model, cluster = MODEL_PRESETS["llama2-70b"], resolve_cluster("rtx4090-nvme")
    tiny = tuple(dataclasses.replace(t, capacity=GiB) for t in cluster.host)
    pl = plan_placement(model, dataclasses.replace(cluster, host=tiny), W, LAYOUT, 10**15)
    assert not pl.fits and "does not fit the host tiers" in pl.reason


def test_update_time_model_terms():
    cluster = resolve_cluster("rtx4090-nvme")  # one device, adam 1.5e9/s, 25 GB/s link
    cpu_only = update_time_s(cluster, W, cpu_elems=10**9, device_elems=0, nvme_elems=0)
    assert cpu_only == pytest.approx(10**9 / 1.5e9)
    # the link carries 12 B/element of state each way for device-side updates
    dev_only = update_time_s(cluster, W, cpu_elems=0, device_elems=10**9, nvme_elems=0)
    assert dev_only == pytest.approx(max(10**9 * 12 / 25e9, 10**9 / (1008e9 / (3 * 2 + 24))))
    nvme = update_time_s(cluster, W, cpu_elems=10**9, device_elems=0, nvme_elems=10**9)
    assert nvme == pytest.approx(12e9 / 7e9 + 12e9 / 6e9)  # NVMe-bound


def test_strategy_applies_to_adamw_zero0_and_reports_the_saving():
    model, cluster = MODEL_PRESETS["llama2-7b"], resolve_cluster("dgx-h100-8")
    inp = StrategyInput(model=model, cluster=cluster, workload=W, layout=LAYOUT, budget_bytes=int(76 * GiB))
    strategy = OptimizerInterleaved()
    assert strategy.applies(inp)
    assert not strategy.applies(dataclasses.replace(inp, layout=dataclasses.replace(LAYOUT, zero_stage=1)))
    galore = W.replace(optimizer=OptimizerSpec(kind="galore"))
    assert not strategy.applies(dataclasses.replace(inp, workload=galore))
    res = strategy.solve(inp)
    assert res.kind == "optimizer" and res.strategy == "interleaved" and res.fits
    assert res.options.offload.optimizer and res.options.offload.tier == "dram"
    assert res.added_time_s < 0  # faster than the step-time model's CPU-only offload
    assert res.report.status == "feasible" and res.report.objective > 0
    # the same device bytes as the CPU-only offload baseline (ZeRO-1 there): parameters + gradients
    base = OptimizerOffload().solve(
        dataclasses.replace(inp, layout=dataclasses.replace(LAYOUT, zero_stage=1))
    )
    assert res.device_bytes == base.device_bytes


def test_bad_input_names_the_field():
    model, cluster = MODEL_PRESETS["tiny-llama"], resolve_cluster("rtx4090-nvme")
    with pytest.raises(SpecError) as info:
        place_optimizer(model, cluster, W.replace(optimizer=OptimizerSpec(kind="sgd")), LAYOUT, GiB)
    assert info.value.field == "workload.optimizer.kind"
    with pytest.raises(SpecError) as info:
        PlacementSettings(min_subgroup_elems=10, max_subgroup_elems=5)
    assert info.value.field == "min_subgroup_elems"


# ---- in the search (`memtier plan`) ---------------------------------------------------------------------------


def one_h100():  # type: ignore[no-untyped-def]
    return dataclasses.replace(resolve_cluster("dgx-h100-8"), devices_per_node=1)


def test_plan_picks_interleaved_when_faster_than_both_baselines_and_records_the_placement():
    from planner.errors import InfeasibleError
    from planner.planning import make_plan
    from planner.strategies import OPTIMIZER_BASELINES, OptimizerResident

    model, cluster = MODEL_PRESETS["llama2-7b"], one_h100()
    w = Workload(global_batch=8, seq_len=2048)
    result = make_plan(model, cluster, w)
    chosen, plan = result.chosen, result.plan
    assert chosen.optimizer.strategy == "interleaved" and chosen.fits
    # faster than the best plan of both baselines; the resident optimizer alone does not fit at all
    baselines = make_plan(model, cluster, w, optimizer_strategies=OPTIMIZER_BASELINES)
    assert baselines.chosen.optimizer.strategy == "offload"
    assert chosen.step_s < baselines.chosen.step_s
    with pytest.raises(InfeasibleError):
        make_plan(model, cluster, w, optimizer_strategies=(OptimizerResident(),))
    # the plan carries the strategy's placement: subgroup size, tier per subgroup, expected split
    opt = plan.optimizer
    assert opt.offload and opt.kind == "adamw" and opt.subgroup_size > 0
    assert sum(sg.numel for sg in opt.subgroups) == model.params
    assert all(sg.tier in ("dram", "cxl", "nvme") for sg in opt.subgroups)
    assert 0 < opt.device_update_fraction < 1
    dev = sum(sg.numel for sg in opt.subgroups if sg.update_side == "device")
    assert opt.device_update_fraction == pytest.approx(dev / model.params)
    assert opt.settings["lr"] == w.optimizer.lr
    # the runtime updates each subgroup on its planned side (not an "auto" choice per rank)
    assert opt.schedule == "plan" and opt.max_grad_norm == w.max_grad_norm
    assert any("interleaved" in n and "ZeRO-0" in n for n in plan.notes)
    # an honest breakdown: no negative term; the saving is inside "optimizer", which is the
    # placement's predicted update time, and the terms add up to the step
    parts = plan.predicted.time_breakdown
    assert min(parts.values()) >= 0 and parts["swap"] == 0
    assert parts["optimizer"] == pytest.approx(chosen.optimizer.report.objective)
    assert parts["optimizer"] < baselines.plan.predicted.time_breakdown["optimizer"]
    assert sum(parts.values()) == pytest.approx(plan.predicted.step_time_s)


def test_plan_does_not_pick_interleaved_when_a_baseline_is_faster():
    from planner.planning import make_plan

    model, cluster = MODEL_PRESETS["llama2-7b"], resolve_cluster("dgx-h100-8")
    w = Workload(global_batch=64, seq_len=2048)
    result = make_plan(model, cluster, w, mapping_top=0)
    # eight devices: ZeRO partitions the resident state, faster than any interleaved (ZeRO-0) plan
    assert result.chosen.optimizer.strategy == "resident"
    only = make_plan(model, cluster, w, mapping_top=0, optimizer_strategies=(OptimizerInterleaved(),))
    assert only.chosen.optimizer.strategy == "interleaved" and only.chosen.fits  # it was there to pick
    assert only.chosen.step_s > result.chosen.step_s
    assert not result.plan.optimizer.subgroups and not result.plan.optimizer.offload


def test_a_cpu_device_has_nothing_to_interleave():
    from planner.planning import make_plan
    from tests.planner.test_emit import cpu_cluster

    cluster = cpu_cluster()
    w = Workload(global_batch=4, seq_len=64, dtype="fp32")
    inp = StrategyInput(
        model=MODEL_PRESETS["tiny-llama"], cluster=cluster, workload=w, layout=LAYOUT, budget_bytes=GiB
    )
    assert not OptimizerInterleaved().applies(inp)
    # the update runs on the same CPU either way: the plan keeps the state resident (less to move)
    plan = make_plan(MODEL_PRESETS["tiny-llama"], cluster, w).plan
    assert not plan.optimizer.offload and not plan.optimizer.subgroups
