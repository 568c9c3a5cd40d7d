"""`memtier bench`: FLOPs defined once (MFU <= 100 %) and a real (tiny) run with --calibrate (its budget plans:
tests/planner/test_budget.py)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from launch.measure.report import steadiness, steadiness_line, summarize
from launch.measure.strategies import fixed_plan
from planner.cluster import cluster_to_yaml, load_cluster
from planner.flops import hardware_flops_per_step, model_flops_per_step
from planner.presets import MODEL_PRESETS
from planner.workload import Workload
from tests.integration.helpers import ROOT, cpu_cluster

LLAMA34 = MODEL_PRESETS["llama-34m"]
WORKLOAD = Workload(global_batch=4, micro_batch=4, seq_len=512, dtype="fp32")


def test_mfu_and_hfu_come_from_planner_flops_and_never_pass_100_percent():
    plan = fixed_plan("recompute_all", LLAMA34, cpu_cluster(1), WORKLOAD)
    tokens = WORKLOAD.tokens_per_step
    model_f = model_flops_per_step(LLAMA34, tokens, 512)
    hw_f = hardware_flops_per_step(LLAMA34, tokens, 512, recomputed_layers=LLAMA34.num_layers)
    assert hw_f > model_f
    fake = {  # a train_lm metrics record whose step is impossibly fast for the peak
        "status": "ok", "tokens_per_s": 1e9, "step_time_s": 1e-6, "model_flops_per_step": model_f,
        "hardware_flops_per_step": hw_f, "memory": {"device_peak_bytes": 1}, "losses": [[1, 2.0]],
    }  # fmt: skip
    row = summarize({"recompute_all": fake}, {"recompute_all": plan}, peak=5e10)[0]
    assert row["mfu"] == 1.0 and row["hfu"] == 1.0 and row["mfu_capped"]
    slow = dict(fake, step_time_s=100.0)
    row = summarize({"recompute_all": slow}, {"recompute_all": plan}, peak=5e10)[0]
    assert row["mfu"] == pytest.approx(model_f / 100.0 / 5e10)
    assert (
        row["hfu"] == pytest.approx(hw_f / 100.0 / 5e10) and row["hfu"] > row["mfu"] and not row["mfu_capped"]
    )


@pytest.mark.integration
def test_quick_bench_writes_json_png_and_calibrates(tmp_path):
    cluster_yaml = tmp_path / "cluster.yaml"
    cluster_yaml.write_text(cluster_to_yaml(dataclasses.replace(cpu_cluster(1), name="bench-test")))
    before = load_cluster(cluster_yaml)
    out = subprocess.run(
        [sys.executable, "-m", "launch.cli", "bench", "--model", "tiny-llama", "--seq", "64", "--micro-batch", "2",
         "--steps", "2", "--strategies", "pytorch", "--cluster", str(cluster_yaml), "--out", str(tmp_path / "out"),
         "--calibrate"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "mfu.json").read_text())
    row = result["rows"][0]
    assert row["strategy"] == "pytorch" and row["status"] == "ok"
    assert row["tokens_per_s"] > 0 and 0 < row["mfu"] <= row["hfu"] <= 1
    assert row["device_peak_bytes"] > 0 and row["predicted_peak_bytes"] > 0
    assert (tmp_path / "out" / "mfu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cal = result["calibration"]
    after = load_cluster(cluster_yaml)
    assert after.device.efficiency == pytest.approx(cal["efficiency_after"])
    assert after.device.efficiency != before.device.efficiency
    # the fp32 peak becomes the best GEMM measured in the run (>= the file's), nothing else changes
    assert after.device.flops("fp32") == pytest.approx(result["peak_flops"])
    assert result["peak_flops"] >= before.device.flops("fp32")
    assert cal["peak_flops_fp32_after"] == pytest.approx(result["peak_flops"])
    assert dataclasses.replace(after, device=before.device) == before
    err = cal["errors"]["pytorch"]
    assert abs(err["error_after"]) < abs(err["error_before"])
    assert "pytorch" in out.stdout and "calibration" in out.stdout
    st = result["steadiness"]  # the two timed steps and the GEMMs after them, judged against ±5%
    assert st["target"] == 0.05 and "gemm_low" in st
    # the baseline's spread is the pytorch row's own (max - min) / median, split around the median
    assert st["baseline_high"] - st["baseline_low"] == pytest.approx(row["step_spread"])
    assert "baseline steps" in out.stderr


def test_steadiness_tells_a_noisy_machine_from_a_noisy_run():
    """The bench judges the baseline's spread against ±5%, and the GEMM peak measured between its timed rounds
    says whether the machine itself was steady enough for that."""
    rows = [{"strategy": "pytorch", "step_times_s": [2.0, 2.02, 1.98, 2.3]}]
    noisy_run = steadiness(rows, [300e9, 301e9, 299e9, 300e9])
    assert not noisy_run["baseline_met"] and noisy_run["machine_steady"]
    assert noisy_run["baseline_high"] == pytest.approx(2.3 / 2.01 - 1)
    noisy_machine = steadiness(rows, [250e9, 300e9, 340e9])
    assert not noisy_machine["machine_steady"]
    assert "swings more than the target" in steadiness_line(noisy_machine)
    steady = steadiness([{"strategy": "pytorch", "step_times_s": [2.0, 2.02, 1.98]}], [300e9, 302e9])
    assert steady["baseline_met"] and steady["machine_steady"] and "±5%: met)" in steadiness_line(steady)
    assert "no baseline" in steadiness_line(steadiness([], []))
