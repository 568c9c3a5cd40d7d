"""Run directories: removed on normal exit, uncaught exceptions and SIGTERM; leftovers of killed runs reaped at
the next start; directories of live runs never touched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from offload.tiers import NvmeTier
from offload.tiers.rundir import LOCK_NAME, RUN_PREFIX, RunDirectory, reap_dead_runs

REPO = Path(__file__).resolve().parents[3]

CHILD = textwrap.dedent(
    """
    import sys, time, torch
    from offload.tiers import NvmeTier
    mode, root = sys.argv[1], sys.argv[2]
    store = NvmeTier(path=root, io_engine="posix")
    store.put(torch.ones(100_000))
    store.synchronize()
    print(store.run_dir, flush=True)
    if mode == "exit":
        sys.exit(0)  # never closed: the atexit hook removes the directory
    if mode == "raise":
        raise RuntimeError("uncaught")
    time.sleep(120)  # until SIGTERM / SIGKILL
    """
)


def test_cleanup_on_every_way_out(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    modes = ("exit", "raise", "term", "kill")
    roots = {m: tmp_path / m for m in modes}
    children = {}
    for mode in modes:  # started together: their imports overlap
        roots[mode].mkdir()
        children[mode] = subprocess.Popen(
            [sys.executable, "-c", CHILD, mode, str(roots[mode])],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
    run_dirs = {}
    for mode, child in children.items():
        assert child.stdout is not None
        line = child.stdout.readline().strip()
        assert line, child.stderr.read() if child.stderr else ""
        run_dirs[mode] = Path(line)
        assert run_dirs[mode].parent == roots[mode]

    # A live run is never reaped, even by another process starting under the same path.
    with NvmeTier(path=roots["term"], io_engine="posix") as other:
        assert run_dirs["term"].exists() and other.run_dir != str(run_dirs["term"])

    children["term"].send_signal(signal.SIGTERM)
    children["kill"].send_signal(signal.SIGKILL)
    codes = {mode: child.wait(timeout=60) for mode, child in children.items()}
    assert codes == {"exit": 0, "raise": 1, "term": -signal.SIGTERM, "kill": -signal.SIGKILL}
    for mode in ("exit", "raise", "term"):
        assert not run_dirs[mode].exists(), mode
        assert os.listdir(roots[mode]) == [], mode

    # SIGKILL runs nothing: the leftover stays until the next run under the path reaps it.
    assert (run_dirs["kill"] / "0000000000.swap").exists()
    with NvmeTier(path=roots["kill"], io_engine="posix") as store:
        assert store._run.reaped == [run_dirs["kill"]]
        assert not run_dirs["kill"].exists()


def test_dead_leftovers_are_reaped_and_others_kept(tmp_path: Path) -> None:
    dead = tmp_path / f"{RUN_PREFIX}otherhost-123-deadbeef"
    dead.mkdir()
    (dead / LOCK_NAME).write_text("pid=123\n")
    (dead / "0000000001.swap").write_bytes(b"x" * 4096)
    half_created_old = tmp_path / f".memtier-new-{RUN_PREFIX}h-1-00"
    half_created_old.mkdir()
    old = time.time() - 3600
    os.utime(half_created_old, (old, old))
    half_created_new = tmp_path / f".memtier-new-{RUN_PREFIX}h-2-00"  # may be a run being created right now
    half_created_new.mkdir()
    unrelated = tmp_path / "checkpoints"
    unrelated.mkdir()

    live = RunDirectory(tmp_path)
    try:
        assert sorted(live.reaped) == sorted([dead, half_created_old])
        assert not dead.exists() and not half_created_old.exists()
        assert half_created_new.exists() and unrelated.exists()
        # A second directory in the same process does not reap the first: flock locks are per open file.
        second = RunDirectory(tmp_path)
        assert live.path.exists() and second.reaped == []
        second.close()
        assert reap_dead_runs(tmp_path) == [] and live.path.exists()
    finally:
        live.close()
    assert not live.path.exists()
    live.close()  # idempotent
