"""`memtier bench --calibrate`: the device efficiency measured on the baseline, written to the cluster YAML
(atomically), with the step-time prediction error of every strategy before and after."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

from planner.cluster import ClusterSpec
from planner.memory import MemoryOptions
from planner.plan import Plan


def _step_options(plan: Plan) -> MemoryOptions:
    """The memory options `plan` stands for, as the bench's runs carry them out."""
    from planner.planning import memory_options

    return dataclasses.replace(
        memory_options(plan), optimizer_impl="fused", loss_chunk_tokens=plan.loss.chunk_size
    )


def _predicted_s(plan: Plan, cluster: ClusterSpec, options: MemoryOptions | None = None) -> float:
    """The step-time model's seconds for `plan` on `cluster` (`options`: `_step_options(plan)`, built once by
    callers that predict the same plan many times)."""
    from planner.steptime import estimate_step_time

    opts = options or _step_options(plan)
    return estimate_step_time(plan.model, cluster, plan.workload, plan.layout, opts).step_s


def _with_efficiency(cluster: ClusterSpec, efficiency: float, peak: float) -> ClusterSpec:
    device = dataclasses.replace(
        cluster.device, efficiency=efficiency, peak_flops={**cluster.device.peak_flops, "fp32": peak}
    )
    return dataclasses.replace(cluster, device=device)


# the efficiency is searched in [EFF_MIN, 1] (bisection on its logarithm) until the predicted step is within
# FIT_REL of the measured one; a step the model cannot reach there ends at the nearer bound, said in the record
EFF_MIN, FIT_REL, FIT_STEPS = 0.005, 1e-4, 60


def fit_efficiency(plan: Plan, cluster: ClusterSpec, measured_s: float, peak: float) -> tuple[float, str]:
    """The device efficiency at which the step-time model predicts `measured_s` for `plan` (fp32 `peak`), and
    how the fit ended ("fit", or which bound it was clamped to).

    Fitted through the model itself, so it means what the device's `efficiency` means there: a whole-block
    efficiency for a probed device, a GEMM efficiency for a `roofline` device (whose memory-bound kernels,
    attention core, optimizer step and communication the model adds on its own; dividing the step's FLOPs by
    its time would count those twice). The predicted step falls as the efficiency rises (only the compute
    terms depend on it), so the bisection converges.
    """
    opts = _step_options(plan)

    def predicted(efficiency: float) -> float:
        return _predicted_s(plan, _with_efficiency(cluster, efficiency, peak), opts)

    lo, hi = math.log(EFF_MIN), 0.0
    if predicted(1.0) > measured_s:
        return 1.0, "clamped at 1.0: the model predicts a slower step than measured even at peak"
    if predicted(EFF_MIN) < measured_s:
        return (
            EFF_MIN,
            f"clamped at {EFF_MIN}: the measured step is slower than the model gives at that efficiency",
        )
    mid = 0.5 * (lo + hi)
    for _ in range(FIT_STEPS):
        mid = 0.5 * (lo + hi)
        step_s = predicted(math.exp(mid))
        if abs(step_s / measured_s - 1) <= FIT_REL:
            break
        lo, hi = (mid, hi) if step_s > measured_s else (lo, mid)
    return math.exp(mid), "fit"


def calibrate(
    cluster: ClusterSpec, rows: Sequence[dict[str, Any]], plans: dict[str, Plan | None], peak: float
) -> tuple[ClusterSpec, dict[str, Any]]:
    """A cluster whose device efficiency reproduces the baseline's measured step, and the errors before/after.

    The fp32 peak becomes `peak` (the best GEMM seen in this run: the probe's figure may have been measured
    under load); the efficiency is then fitted so that the step-time model predicts the plain-PyTorch
    baseline's measured step (`fit_efficiency`).
    """
    base = next((r for r in rows if r["strategy"] == "pytorch" and r.get("status") == "ok"), None)
    base_plan = plans.get("pytorch")
    if base is None or base_plan is None:
        raise RuntimeError("calibration needs a successful pytorch baseline")
    eff, fit = fit_efficiency(base_plan, cluster, float(base["step_s"]), peak)
    new = _with_efficiency(cluster, eff, peak)
    errors: dict[str, Any] = {}
    for r in rows:
        plan = plans.get(r["strategy"])
        if plan is None or r.get("status") != "ok":
            continue
        opts = _step_options(plan)
        before, after = _predicted_s(plan, cluster, opts), _predicted_s(plan, new, opts)
        errors[r["strategy"]] = {
            "measured_s": r["step_s"],
            "predicted_before_s": before,
            "predicted_after_s": after,
            "error_before": before / r["step_s"] - 1,
            "error_after": after / r["step_s"] - 1,
        }
    record = {
        "efficiency_before": cluster.device.efficiency,
        "efficiency_after": eff,
        "efficiency_fit": fit,
        "efficiency_means": "GEMM efficiency (roofline device)"
        if cluster.device.roofline
        else "whole-block efficiency",
        "errors": errors,
    }
    return new, record


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
