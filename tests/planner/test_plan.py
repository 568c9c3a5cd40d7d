import json

import pytest

from planner.errors import SpecError
from planner.plan import ActivationPolicy, Layout, LossPlan, Plan, Predicted, SolverReport, TierPlan
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
                            solvers=(SolverReport(stage="activations", strategy="mip", status="optimal"),)),
    )  # fmt: skip


def test_round_trip(tmp_path):
    plan = _plan()
    path = tmp_path / "plan.json"
    plan.save(path)
    again = Plan.load(path)
    assert again == plan
    assert json.loads(path.read_text())["schema_version"] == "1.0"
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
    data["schema_version"] = "1.7"
    assert Plan.from_dict(data).layout.tp == 8


def test_fractions_must_sum_to_one():
    with pytest.raises(ValueError, match=r"!= 1"):
        ActivationPolicy(layer=3, keep_fraction=0.5, swap_fraction=0.6)


def test_unknown_plan_key(tmp_path):
    data = _plan().to_dict()
    data["layout"]["zero"] = 3
    with pytest.raises(SpecError, match=r"layout\.zero: unknown key"):
        Plan.from_dict(data, source="p.json")
