"""`memtier bench --calibrate`'s efficiency fit: it reproduces the measured step through the step-time model
itself, so a roofline device (whose `efficiency` is a GEMM efficiency) is not charged its memory-bound kernels
twice."""

from __future__ import annotations

import dataclasses

import pytest

from launch.measure.calibrate import _predicted_s, calibrate, fit_efficiency
from launch.measure.strategies import fixed_plan
from planner.presets import MODEL_PRESETS, resolve_cluster
from planner.workload import Workload
from tests.integration.helpers import cpu_cluster

WORKLOAD = Workload(global_batch=8, micro_batch=8, seq_len=2048, dtype="bf16")


def _one_device(name: str):
    cluster = resolve_cluster(name)
    return dataclasses.replace(cluster, nodes=1, devices_per_node=1)


@pytest.mark.parametrize("cluster", [_one_device("dgx-h100-8"), cpu_cluster(1)], ids=["roofline", "probed"])
def test_fit_recovers_the_efficiency_a_measured_step_was_made_at(cluster):
    workload = (
        WORKLOAD if cluster.device.roofline else dataclasses.replace(WORKLOAD, seq_len=256, dtype="fp32")
    )
    model = MODEL_PRESETS["llama-300m" if cluster.device.roofline else "llama-34m"]
    plan = fixed_plan("pytorch", model, cluster, workload)
    peak = cluster.device.flops("fp32")
    truth = dataclasses.replace(cluster, device=dataclasses.replace(cluster.device, efficiency=0.31))
    measured = _predicted_s(plan, truth)
    eff, how = fit_efficiency(plan, cluster, measured, peak)
    assert how == "fit" and eff == pytest.approx(0.31, rel=1e-3)


def test_roofline_calibration_reproduces_the_baseline_step():
    cluster = _one_device("dgx-h100-8")
    plan = fixed_plan("pytorch", MODEL_PRESETS["llama-300m"], cluster, WORKLOAD)
    measured = 1.25 * _predicted_s(plan, cluster)
    row = {"strategy": "pytorch", "status": "ok", "step_s": measured, "achieved_tflops": 1.0}
    new, record = calibrate(cluster, [row], {"pytorch": plan}, cluster.device.flops("fp32"))
    assert record["efficiency_means"].startswith("GEMM")
    assert abs(record["errors"]["pytorch"]["error_after"]) < 1e-3
    assert new.device.efficiency < cluster.device.efficiency  # slower than predicted: a lower GEMM efficiency


def test_a_step_faster_than_peak_clamps_and_says_so():
    cluster = cpu_cluster(1)
    workload = dataclasses.replace(WORKLOAD, seq_len=256, dtype="fp32")
    plan = fixed_plan("pytorch", MODEL_PRESETS["llama-34m"], cluster, workload)
    eff, how = fit_efficiency(plan, cluster, 1e-6, cluster.device.flops("fp32"))
    assert eff == 1.0 and how.startswith("clamped at 1.0")
