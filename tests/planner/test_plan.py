import dataclasses
import json

import pytest

from planner.errors import SpecError
from planner.plan import (
    SCHEMA_VERSION,
    ActivationPolicy,
    Layout,
    LossPlan,
    Plan,
    Predicted,
    SolverReport,
    TierPlan,
)
from planner.presets import MODEL_PRESETS, resolve_cluster
from planner.workload import OptimizerSpec, Workload


def _plan() -> Plan:
    return Plan(
        model=MODEL_PRESETS["llama3-8b"],
        cluster=resolve_cluster("hetero-a100-32"),
        workload=Workload(global_batch=64, micro_batch=2, seq_len=4096, optimizer=OptimizerSpec(kind="galore", rank=64)),
        layout=Layout(dp=4, tp=8, micro_batch=2, grad_accum=8, zero_stage=1, stage_layers=(32,),
                      rank_to_device=tuple(f"n{i // 8}:d{i % 8}" for i in range(32))),
        activations=(ActivationPolicy(layer=0, keep_fraction=0.25, swap_fraction=0.75),
                     ActivationPolicy(layer=1, keep_fraction=0.0, recompute_fraction=1.0)),
        loss=LossPlan(kind="chunked", chunk_size=1024),
        tiers=(TierPlan(kind="nvme", capacity_bytes=1 << 30, path="/tmp/x", checksum=True),),
        predicted=Predicted(bytes_by_tier={"device": 123}, step_time_s=1.5, mfu=0.4,
                            solvers=(SolverReport(problem="activations", strategy="mip", status="optimal"),)),
    )  # fmt: skip


def test_round_trip(tmp_path):
    plan = _plan()
    path = tmp_path / "plan.json"
    plan.save(path)
    again = Plan.load(path)
    assert again == plan
    assert json.loads(path.read_text())["schema_version"] == "1.7"
    assert not list(tmp_path.glob(".tmp-*"))  # nothing half-written left behind


def test_plan_is_frozen():
    with pytest.raises(AttributeError):
        _plan().layout = Layout()  # type: ignore[misc]


def test_unknown_major_version_refused(tmp_path):
    data = _plan().to_dict()
    data["schema_version"] = "2.0"
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SpecError, match=r"plan schema 2.0 is not supported"):
        Plan.load(path)


def test_minor_version_accepted():
    data = _plan().to_dict()
    data["schema_version"] = "1.99"  # a newer minor of the same major
    assert Plan.from_dict(data).layout.tp == 8


def test_a_newer_plans_unknown_field_says_the_plan_is_newer():
    """A plan from a newer memtier (schema 1.99) with a field this one does not know: the error names the field
    and says the file is newer, not merely that the key is unknown."""
    data = _plan().to_dict()
    data["schema_version"] = "1.99"
    data["workload"]["some_future_field"] = 1
    with pytest.raises(SpecError, match=r"newer than this memtier's") as err:
        Plan.from_dict(data)
    assert err.value.field == "workload.some_future_field" and "unknown key" in err.value.message
    data["schema_version"] = SCHEMA_VERSION  # the same schema: just an unknown key
    with pytest.raises(SpecError) as err:
        Plan.from_dict(data)
    assert "newer" not in err.value.message


def test_fractions_must_sum_to_one():
    with pytest.raises(ValueError, match=r"!= 1"):
        ActivationPolicy(layer=3, keep_fraction=0.5, swap_fraction=0.6)


def test_unknown_plan_key(tmp_path):
    data = _plan().to_dict()
    data["layout"]["zero"] = 3
    with pytest.raises(SpecError, match=r"layout\.zero: unknown key"):
        Plan.from_dict(data, source="p.json")


def test_runtime_decisions_round_trip_and_default_for_older_plans(tmp_path):
    """Schema 1.1: the engine, the optimizer's CPU kernel, update schedule and clipping are in the plan; a
    1.0 plan.json (without them, its solver reports keyed "stage") loads with what the runtime did then."""
    plan = _plan().replace(layout=Layout(dp=4, tp=8, engine="deepspeed"))
    plan = plan.replace(
        optimizer=dataclasses.replace(plan.optimizer, cpu_kernel="deepspeed", max_grad_norm=0.0)
    )
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again == plan and again.layout.engine == "deepspeed"
    assert (again.optimizer.cpu_kernel, again.optimizer.max_grad_norm) == ("deepspeed", 0.0)
    old = _plan().to_dict()
    old["schema_version"] = "1.0"
    del old["layout"]["engine"]
    for key in ("cpu_kernel", "schedule", "max_grad_norm"):
        del old["optimizer"][key]
    old["predicted"]["solvers"] = [{"stage": "activations", "strategy": "mip", "status": "optimal"}]
    loaded = Plan.from_dict(old)
    assert loaded.layout.engine == "torch" and loaded.optimizer.max_grad_norm == 1.0
    assert (loaded.optimizer.cpu_kernel, loaded.optimizer.schedule) == ("torch_fused", "cpu")
    assert loaded.predicted.solvers[0].problem == "activations"
    old["optimizer"]["subgroups"] = [{"index": 0, "numel": 10, "tier": "dram", "update_side": "device"}]
    assert Plan.from_dict(old).optimizer.schedule == "plan"  # the planned sides, as the runtime read them


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        (
            "layout",
            "engine",
            "megatron",
            r"layout\.engine: expected one of 'torch', 'deepspeed', 'accelerate'",
        ),
        (
            "optimizer",
            "cpu_kernel",
            "auto",
            r"optimizer\.cpu_kernel: expected one of 'torch_fused', 'deepspeed'",
        ),
        ("optimizer", "schedule", "auto", r"optimizer\.schedule: expected one of 'plan', 'cpu', 'device'"),
        ("optimizer", "max_grad_norm", -1.0, r"optimizer\.max_grad_norm: must be >= 0"),
        ("optimizer", "kind", "lion", r"optimizer\.kind: expected one of 'adamw'"),
    ],
)
def test_bad_runtime_decisions_name_the_field(section, key, value, message):
    data = _plan().to_dict()
    data[section][key] = value
    with pytest.raises(SpecError, match=message):
        Plan.from_dict(data, source="p.json")


def test_solver_status_is_typed():
    data = _plan().to_dict()
    data["predicted"]["solvers"][0]["status"] = "done"
    with pytest.raises(SpecError, match=r"predicted\.solvers\[0\]\.status: expected one of 'optimal'"):
        Plan.from_dict(data)
