"""The GPU check's dry run: the same control flow as on a GPU, on this CPU with tiny sizes, so the script
cannot rot between the times a GPU is at hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.integration
def test_dry_run_writes_every_section(tmp_path):
    out, disk = tmp_path / "out", tmp_path / "disk"
    disk.mkdir()
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--dry-run", "--out", str(out),
         "--disk", str(disk), "--budget-s", "400"],
        capture_output=True, text=True, timeout=500, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["dry_run"] is True and result["environment"]["torch"]
    sections = result["sections"]
    assert set(sections) == {"cuda_tests", "bandwidth", "activations", "optimizer_offload", "ssd_offload"}
    assert (
        sections["cuda_tests"]["status"] == "ok" and sections["cuda_tests"].get("skipped", 0) >= 4
    )  # no CUDA
    bw = sections["bandwidth"]
    assert bw["memtier_host_tier"]["exact"] and bw["memtier_nvme_tier"]["exact"]
    assert bw["plain"]["pageable_h2d_GBps"] > 0 and bw["memtier_host_tier"]["h2d_GBps"] > 0
    rows = sections["activations"]["rows"]
    assert {"pytorch", "recompute_all", "torch_selective", "memtier@100", "memtier@50", "memtier@25"} <= set(
        rows
    )
    assert rows["pytorch"]["speed_vs_pytorch"] == 1.0
    assert rows["recompute_all"]["peak_bytes"] < rows["pytorch"]["peak_bytes"]
    assert rows["memtier@100"]["predicted_peak_bytes"] > 0 and rows["memtier@100"]["fits"]
    assert "memtier_offload" in sections["optimizer_offload"]["rows"]
    assert sections["optimizer_offload"]["rows"]["memtier_offload"]["step_s"] > 0
    ssd = sections["ssd_offload"][
        "rows"
    ]  # the state streamed from the NVMe tier trains as the resident model
    assert ssd["memtier_ssd"]["bytes_by_tier"].get("nvme", 0) > 0 and ssd["memtier_ssd"]["step_s"] > 0
    assert ssd["memtier_ssd"]["max_loss_diff"] < 1e-4 and len(ssd["memtier_ssd"]["losses"]) >= 2
    assert (out / "gpu_check.png").stat().st_size > 0
    assert "[gpu_check] wrote" in proc.stderr


def test_refuses_without_cuda_unless_dry_run():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the real check")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--dry-run" in proc.stderr
