"""The emitted accelerate.yaml launches: `accelerate launch --config_file` starts one process group."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import yaml

from planner.emit import write_outputs
from tests.integration.helpers import ROOT, SCRIPTS, small_plan

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_emitted_accelerate_yaml_runs_two_cpu_ranks_as_one_group(tmp_path):
    plan = small_plan(str(tmp_path / "plan.json"), ranks=2)  # a CPU cluster of 2 devices
    paths = write_outputs(plan, tmp_path / "out")
    with open(paths["accelerate.yaml"], encoding="utf-8") as fh:
        cfg = yaml.safe_load(fh)
    assert "mixed_precision" not in cfg  # accelerate refuses it next to a deepspeed_config_file
    cfg["main_process_port"] = _free_port()  # (tests run side by side)
    with open(paths["accelerate.yaml"], "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg, fh)
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run(
        [accelerate, "launch", "--config_file", paths["accelerate.yaml"], "--num_processes", "2",
         os.path.join(SCRIPTS, "world_size.py")],
        capture_output=True, text=True, timeout=240, env=env, cwd=str(tmp_path), check=False,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count("of world_size 2 (MULTI_CPU, gloo)") == 2, out[-4000:]
