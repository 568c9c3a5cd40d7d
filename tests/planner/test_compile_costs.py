"""A compiled plan (`Workload.compile`) is costed with the device's probed compile factors: the blocks save
`compile_saved_ratio` of their eager bytes (never below their input) and take `compile_time_ratio` of their
time; a backend the device was not probed for is costed as eager, and the plan says which it was."""

from __future__ import annotations

import dataclasses

import pytest

from launch.train.layouts import refusals
from planner.budget import plan_for_budget
from planner.errors import SpecError
from planner.estimate import estimate
from planner.memory import block_input_bytes, block_saved_bytes
from planner.plan import Layout, Plan
from planner.planning import fixed_plan
from planner.presets import MODEL_PRESETS
from planner.strategies import layer_costs
from planner.workload import Workload
from tests.integration.helpers import cpu_cluster

MODEL = MODEL_PRESETS["llama-20m"]
EAGER = Workload(global_batch=4, micro_batch=4, seq_len=256, dtype="fp32")
COMPILED = EAGER.replace(compile="inductor")


def probed(saved: float = 0.5, time: float = 0.6, backend: str = "inductor"):
    c = cpu_cluster(1)
    dev = dataclasses.replace(
        c.device, compile_backend=backend, compile_saved_ratio=saved, compile_time_ratio=time
    )
    return dataclasses.replace(c, device=dev)


def test_layer_costs_scale_by_the_probed_factors_and_keep_the_input():
    layout = Layout(micro_batch=4)
    eager = layer_costs(MODEL, probed(), EAGER, layout, [0])[0]
    comp = layer_costs(MODEL, probed(), COMPILED, layout, [0])[0]
    assert comp.act_bytes == pytest.approx(0.5 * eager.act_bytes, rel=1e-6)
    assert comp.fwd_time_s == pytest.approx(0.6 * eager.fwd_time_s, rel=1e-9)
    assert comp.recompute_time_s == pytest.approx(0.6 * eager.recompute_time_s, rel=1e-9)
    inp = block_input_bytes(MODEL, EAGER, micro_batch=4)
    assert block_saved_bytes(MODEL, EAGER, micro_batch=4, compile_saved_ratio=1e-3) == inp


def test_the_whole_step_estimate_uses_them_and_an_unprobed_backend_is_eager():
    layout = Layout(micro_batch=4)
    eager = estimate(MODEL, probed(), EAGER, layout)
    comp = estimate(MODEL, probed(), COMPILED, layout)
    unprobed = estimate(MODEL, probed(backend="aot_eager"), COMPILED, layout)
    assert comp.memory.activations < eager.memory.activations
    assert comp.time.step_s < eager.time.step_s
    assert unprobed.memory.activations == eager.memory.activations
    assert unprobed.time.step_s == eager.time.step_s


def test_a_compiled_plan_fits_a_budget_the_eager_one_must_swap_for_and_says_on_what():
    cluster = probed(saved=0.4)
    keep_all = estimate(MODEL, cluster, EAGER, Layout(micro_batch=4)).memory.total
    budget = int(0.8 * keep_all)
    eager, comp = (
        plan_for_budget(MODEL, cluster, w, budget_bytes=budget, allow_smaller_micro_batch=False).plan
        for w in (EAGER, COMPILED)
    )
    assert any(a.kind != "keep" for a in eager.activations)
    assert all(a.kind == "keep" for a in comp.activations)  # the compiled blocks save little enough
    assert comp.predicted.peak_bytes <= budget and comp.predicted.step_time_s < eager.predicted.step_time_s
    assert any("saved bytes x0.40" in n for n in comp.notes)
    again = Plan.from_dict(comp.to_dict())
    assert again.workload.compile == "inductor" and again.cluster.device.compile_saved_ratio == 0.4
    unprobed = fixed_plan(MODEL, cpu_cluster(1), COMPILED)
    assert any("costed as eager" in n and "memtier probe --compile inductor" in n for n in unprobed.notes)


def test_a_partitioner_budget_needs_compile_and_a_share():
    with pytest.raises(SpecError, match="needs compile") as err:
        EAGER.replace(compile_memory_budget=0.5)
    assert err.value.field == "compile_memory_budget"
    with pytest.raises(SpecError, match="share in"):
        COMPILED.replace(compile_memory_budget=1.5)


def test_the_trainer_refuses_compiled_blocks_beside_tp_pp_or_another_engine():
    plan = fixed_plan(MODEL, cpu_cluster(4), COMPILED.replace(global_batch=8, micro_batch=2))
    assert refusals(plan) == []
    for layout in (
        Layout(dp=2, tp=2, micro_batch=2, sequence_parallel=True),
        Layout(dp=4, micro_batch=2, engine="deepspeed"),
    ):
        fields = [f for f, _ in refusals(plan.replace(layout=layout))]
        assert "workload.compile" in fields


def test_cli_plan_compile_flags(capsys, tmp_path):
    import json

    from launch.cli import main

    argv = [
        "plan",
        "--model",
        "tiny-llama",
        "--cluster",
        "dgx-a100-8x80g",
        "--seq",
        "128",
        "--out",
        str(tmp_path),
    ]
    assert main([*argv, "--compile", "--compile-memory-budget", "0.5"]) == 0
    workload = json.loads((tmp_path / "plan.json").read_text())["workload"]
    assert workload["compile"] == "inductor" and workload["compile_memory_budget"] == 0.5
    capsys.readouterr()
    assert main([*argv, "--compile-memory-budget", "0.5"]) == 2
    assert "--compile-memory-budget" in capsys.readouterr().err
    assert main([*argv, "--compile", "aot_eager", "--compile-memory-budget", "2"]) == 2
    assert "share in [0, 1]" in capsys.readouterr().err


def test_memtier_plan_picks_the_partitioner_budget_among_the_probed_ones(capsys, tmp_path):
    """`memtier plan --compile` without `--compile-memory-budget` plans at each partitioner budget the probe
    measured and keeps the fastest plan that fits: with room, the highest (the least recompute); under a
    budget where the highest must swap, a lower one whose blocks save less, when that is faster. The plan
    carries the budget it chose, and says so; a budget given on the command line is kept as given."""
    import json

    from launch.cli import main
    from planner.cluster import CompileAtBudget, cluster_to_yaml
    from planner.planning import make_plan
    from planner.search import SearchSpace

    rows = (
        CompileAtBudget(budget=1.0, saved_ratio=0.8, time_ratio=0.6),
        CompileAtBudget(budget=0.6, saved_ratio=0.45, time_ratio=0.605),
        CompileAtBudget(budget=0.2, saved_ratio=0.2, time_ratio=0.7),
    )
    cluster = probed(saved=0.8, time=0.6)
    cluster = dataclasses.replace(cluster, device=dataclasses.replace(cluster.device, compile_budgets=rows))
    path = tmp_path / "cluster.yaml"
    path.write_text(cluster_to_yaml(cluster))
    argv = ["plan", "--model", "llama-20m", "--cluster", str(path), "--global-batch", "4", "--micro-batch", "4",
            "--seq", "256", "--compile", "--time-limit", "5"]  # fmt: skip

    def planned(budget: str, *extra: str) -> dict:
        out = tmp_path / f"plan-{budget}{'-'.join(extra)}"
        assert main([*argv, "--budget", budget, *extra, "--out", str(out)]) == 0, capsys.readouterr().err
        return json.loads((out / "plan.json").read_text())

    roomy, tight = planned("600MiB"), planned("260MiB")
    assert roomy["workload"]["compile_memory_budget"] == 1.0
    assert tight["workload"]["compile_memory_budget"] == 0.6
    assert any("partitioner budget 0.6" in n and "1, 0.6, 0.2" in n for n in tight["notes"])
    # the choice is the fastest of the plans at each probed budget
    chosen = {
        b: make_plan(MODEL, cluster, COMPILED.replace(compile_memory_budget=b), budget=260 << 20,
                     space=SearchSpace(micro_batch=4), time_limit_s=5).chosen
        for b in (1.0, 0.6, 0.2)
    }  # fmt: skip
    assert chosen[1.0].added_time_s > 0  # the premise: at 1.0 the plan must swap (or offload) to fit
    steps = {b: c.step_s for b, c in chosen.items()}
    assert min(steps, key=steps.get) == 0.6 and tight["predicted"]["step_time_s"] == pytest.approx(steps[0.6])
    given = planned("260MiB", "--compile-memory-budget", "0.2")
    assert given["workload"]["compile_memory_budget"] == 0.2
    assert not any("among the budgets" in n for n in given["notes"])
