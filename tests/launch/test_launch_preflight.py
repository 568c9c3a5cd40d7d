"""A plan whose NVMe swap path is missing or read-only fails before any rank starts: exit 2."""

import dataclasses
import os
import subprocess

import pytest

from launch.cli import main
from planner.plan import Plan, TierPlan
from planner.presets import MODEL_PRESETS, resolve_cluster
from planner.workload import Workload


def _plan_file(tmp_path, nvme_path) -> str:
    plan = Plan(
        model=MODEL_PRESETS["tiny-llama"],
        cluster=resolve_cluster("rtx4090-nvme"),
        workload=Workload(global_batch=1, seq_len=32, dtype="fp32"),
        tiers=(TierPlan(kind="nvme", capacity_bytes=1 << 20, path=str(nvme_path)),),
    )
    plan = plan.replace(layout=dataclasses.replace(plan.layout, rank_to_device=("n0:d0",)))
    path = tmp_path / "plan.json"
    plan.save(path)
    return str(path)


def _script(tmp_path) -> str:
    script = tmp_path / "train.py"
    script.write_text("raise SystemExit('must not start')\n")
    return str(script)


def test_missing_swap_path_exits_2(capsys, tmp_path):
    missing = tmp_path / "no-such-dir"
    code = main(["launch", "--plan", _plan_file(tmp_path, missing), _script(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "tiers[0].path" in err and str(missing) in err and "does not exist" in err


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a read-only tmpfs needs root")
def test_read_only_swap_path_exits_2(capsys, tmp_path):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount tmpfs here")
    try:
        code = main(["launch", "--plan", _plan_file(tmp_path, mnt), _script(tmp_path)])
        err = capsys.readouterr().err
    finally:
        subprocess.run(["umount", str(mnt)])
    assert code == 2
    assert "tiers[0].path" in err and "not writable" in err
