"""`memtier launch` failure handling with real torchrun processes (gloo on CPU).

A rank that dies stops the job: the launcher exits non-zero within 30 s naming the rank, leaves no process
behind and no half-written checkpoint; SIGINT/SIGTERM stop every rank and remove the swap files.
(`--max-restarts` is tested in test_launch.py, against the reference run there.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

import pytest
import torch

from planner.plan import ActivationPolicy
from tests.integration.helpers import (
    SCRIPTS,
    descendants,
    small_plan,
    start_memtier,
    wait_gone,
)

pytestmark = pytest.mark.integration

FAULT = os.path.join(SCRIPTS, "train_fault.py")
POLICIES = (
    ActivationPolicy(layer=0, keep_fraction=0.0, swap_fraction=1.0),
    ActivationPolicy(layer=1, keep_fraction=0.0, recompute_fraction=1.0),
)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


def _finish_within(proc, seconds: float) -> str:
    """The launcher's output once it exited; fails (after killing it and its job) if it takes longer."""
    try:
        return proc.communicate(timeout=seconds)[0]
    except subprocess.TimeoutExpired:
        for pid in descendants(proc.pid) | {proc.pid}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"the launcher did not exit within {seconds} s") from None


def _launch_fault(plan, *script_args: str, env: dict[str, str], launcher: tuple[str, ...] = ()):
    """`memtier launch --nproc 2 [launcher flags] --plan PLAN train_fault.py SCRIPT_ARGS`, started."""
    return start_memtier(
        "launch", "--nproc", "2", *launcher, "--plan", str(plan), FAULT, *script_args, env=env
    )


def _until_fault(proc, mark) -> set[int]:
    """The job's processes seen until the faulty rank wrote `mark` (fails if it never does)."""
    seen: set[int] = set()
    deadline = time.monotonic() + 120
    while not mark.exists() and proc.poll() is None and time.monotonic() < deadline:
        seen |= descendants(proc.pid)
        time.sleep(0.1)
    assert mark.exists(), "rank 1 never reached the fault"
    return seen


def _pids(pid_dir) -> set[int]:
    return {int(p.read_text()) for p in pid_dir.iterdir()}


def _complete_only(ckpt_dir) -> list[str]:
    """The checkpoint directory's entries; fails if any is not a complete checkpoint."""
    names = sorted(os.listdir(ckpt_dir))
    for n in names:
        assert n.startswith("step-"), f"unexpected entry {n} in {ckpt_dir}: {names}"
        files = set(os.listdir(ckpt_dir / n))
        assert {"meta.json", "model.pt", "optimizer.pt", "rng-rank0.pt", "rng-rank1.pt"} <= files, (n, files)
        torch.load(ckpt_dir / n / "model.pt")  # readable, not truncated
    return names


def test_dead_rank_stops_the_job(tmp_path):
    """Rank 1 dies in the middle of step 2's checkpoint (after writing its own file), as a crash would."""
    where = "save"
    plan = tmp_path / "plan.json"
    small_plan(str(plan), activations=POLICIES, chunked_loss=True)
    pid_dir, ckpt, mark = tmp_path / "pids", tmp_path / "ckpt", tmp_path / "died"
    pid_dir.mkdir()
    env = _env(
        FAULT_RANK="1",
        FAULT_STEP="2",
        FAULT_CODE="7",
        FAULT_WHERE=where,
        FAULT_MARK=str(mark),
        PID_DIR=str(pid_dir),
    )
    proc = _launch_fault(plan, "--steps", "50", "--ckpt-dir", str(ckpt), "--ckpt-every", "1", env=env)
    seen = _until_fault(proc, mark)
    # the launcher must exit within 30 s of the rank's death
    out = _finish_within(proc, 30)
    assert proc.returncode == 1, out
    assert "rank 1 (local rank 1" in out and "exited with code 7" in out, out[-2000:]
    # no process of the job is left
    assert not wait_gone(seen | _pids(pid_dir), timeout=5)
    # only complete checkpoints: step 1; step 2's was being written and is gone
    assert _complete_only(ckpt) == ["step-0000001"]


def test_stopped_rank_is_named_and_the_job_ends(tmp_path):
    """Rank 1 stops itself (SIGSTOP) after step 2 while rank 0 waits for it in a collective: the launcher sees
    rank 1's heartbeat go stale, names it, kills it, and the job ends within the timeout plus a margin."""
    plan = tmp_path / "plan.json"
    small_plan(str(plan))
    pid_dir, mark = tmp_path / "pids", tmp_path / "stopped"
    pid_dir.mkdir()
    env = _env(FAULT_RANK="1", FAULT_STEP="2", FAULT_WHERE="stop", FAULT_MARK=str(mark), PID_DIR=str(pid_dir))
    proc = _launch_fault(plan, "--steps", "50", env=env, launcher=("--heartbeat-timeout", "5"))
    seen = _until_fault(proc, mark)
    out = _finish_within(proc, 60)  # 5 s of silence, then torchrun's own teardown
    assert proc.returncode == 1, out
    assert "rank 1 (pid" in out and "sent no heartbeat" in out, out[-2000:]
    assert not wait_gone(seen | _pids(pid_dir), timeout=15)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_all_ranks_and_removes_swap_files(tmp_path, sig):
    swap = tmp_path / "swap"
    swap.mkdir()
    plan = tmp_path / "plan.json"
    small_plan(str(plan), activations=POLICIES, swap_tier="nvme", swap_path=str(swap))
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    proc = _launch_fault(plan, "--steps", "100000", "--log-every", "1", env=_env(PID_DIR=str(pid_dir)))
    seen: set[int] = set()
    lines = []
    for line in proc.stdout:  # the progress lines: training is under way once step 2 is logged
        lines.append(line)
        seen |= descendants(proc.pid)
        if line.startswith("step 2/"):
            break
    assert any(n.startswith("memtier-run-") for n in os.listdir(swap)), "no swap directory while training"
    seen |= descendants(proc.pid)
    proc.send_signal(sig)
    out = _finish_within(proc, 30)
    assert proc.returncode == 128 + sig, "".join(lines) + out
    assert f"stopped by {signal.Signals(sig).name}" in out
    assert not wait_gone(seen | _pids(pid_dir), timeout=5)
    assert not [n for n in os.listdir(swap) if n.startswith(("memtier-run-", ".memtier-new-"))]
