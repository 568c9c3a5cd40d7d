"""`memtier bench --calibrate`: the device efficiency measured on the baseline, written to the cluster YAML
(atomically), with the step-time prediction error of every strategy before and after."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from planner.cluster import ClusterSpec
from planner.plan import Plan


def calibrate(
    cluster: ClusterSpec, rows: Sequence[dict[str, Any]], plans: dict[str, Plan | None], peak: float
) -> tuple[ClusterSpec, dict[str, Any]]:
    """A cluster whose device efficiency is the one measured on the baseline, and the errors before/after.

    efficiency = the baseline's hardware FLOPs / (peak x the measured step time less the predicted optimizer
    step), i.e. what the step-time model's compute term must use to reproduce the measured compute.
    """
    from planner.planning import memory_options
    from planner.steptime import estimate_step_time

    base = next((r for r in rows if r["strategy"] == "pytorch" and r.get("status") == "ok"), None)
    base_plan = plans.get("pytorch")
    if base is None or base_plan is None:
        raise RuntimeError("calibration needs a successful pytorch baseline")
    other = base_plan.predicted.time_breakdown.get("optimizer", 0.0) + base_plan.predicted.time_breakdown.get(
        "swap", 0.0
    )
    compute_s = max(1e-9, base["step_s"] - other)
    hflops = base["achieved_tflops"] * 1e12 * base["step_s"]  # model FLOPs of the step (no recompute)
    # the probe's GEMM figure may have been measured under load: the best seen in this run replaces it
    eff = min(1.0, max(0.01, hflops / (peak * compute_s)))
    new = dataclasses.replace(
        cluster,
        device=dataclasses.replace(
            cluster.device, efficiency=eff, peak_flops={**cluster.device.peak_flops, "fp32": peak}
        ),
    )
    errors: dict[str, Any] = {}
    for r in rows:
        plan = plans.get(r["strategy"])
        if plan is None or r.get("status") != "ok":
            continue
        opts = dataclasses.replace(
            memory_options(plan), optimizer_impl="fused", loss_chunk_tokens=plan.loss.chunk_size
        )
        before = estimate_step_time(plan.model, cluster, plan.workload, plan.layout, opts).step_s
        after = estimate_step_time(plan.model, new, plan.workload, plan.layout, opts).step_s
        errors[r["strategy"]] = {
            "measured_s": r["step_s"],
            "predicted_before_s": before,
            "predicted_after_s": after,
            "error_before": before / r["step_s"] - 1,
            "error_after": after / r["step_s"] - 1,
        }
    return new, {"efficiency_before": cluster.device.efficiency, "efficiency_after": eff, "errors": errors}


def cluster_path(arg: str) -> str:
    if arg == "local":
        from launch.measure.probe import CACHE_PATH

        return CACHE_PATH
    return arg


def write_calibration(
    cluster: ClusterSpec,
    cluster_arg: str,
    rows: Sequence[dict[str, Any]],
    plans: dict[str, Plan | None],
    peak: float,
) -> dict[str, Any]:
    """Calibrate on `rows` and write the measured efficiency and fp32 `peak` into the cluster YAML that
    `cluster_arg` names (its other fields as they are on disk); the calibration record, with where it went."""
    from planner.cluster import cluster_to_yaml, load_cluster
    from planner.schema import atomic_write_text

    new_cluster, cal = calibrate(cluster, rows, plans, peak)
    cal["peak_flops_fp32_before"] = cluster.device.flops("fp32")
    cal["peak_flops_fp32_after"] = peak
    path = cluster_path(cluster_arg)
    original = load_cluster(path) if os.path.exists(path) else cluster
    written = dataclasses.replace(
        original,
        device=dataclasses.replace(
            original.device,
            efficiency=new_cluster.device.efficiency,
            peak_flops={**original.device.peak_flops, "fp32": peak},
        ),
    )
    atomic_write_text(path, cluster_to_yaml(written))
    cal["written"] = path
    return cal
