"""The training processes of `memtier bench`: one per strategy, each under `memtier launch` (torchrun, one
rank) running examples/train_lm.py, stepped by the benchmark one step at a time through a gate directory."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from launch.measure.strategies import BenchConfig, Strategy
from planner.plan import Plan

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "examples", "train_lm.py")


@dataclass
class Job:
    """One strategy's training process (under `memtier launch`), stepped by the benchmark through a gate."""

    name: str
    plan: Plan
    workdir: str
    gate: str
    metrics: str
    log_path: str
    thread: threading.Thread | None = None
    pgid: int | None = None
    result: Any = None  # launch.run.LaunchResult when the process has ended
    steps: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


def start_job(strategy: Strategy, plan: Plan, cfg: BenchConfig, workdir: str) -> Job:
    """Write the plan (and DeepSpeed config), start training in the background; it waits at the gate."""
    from launch.run import LaunchSpec, deepspeed_config, launch

    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    gate = os.path.join(workdir, "gate")
    os.makedirs(gate)
    # no clipping anywhere: an offloaded optimizer may then update during backward (ZeRO-Offload's
    # behaviour), and every strategy does the same arithmetic; the engine is the strategy's. Both are plan
    # decisions (the trainer refuses flags that would override them).
    plan = plan.replace(
        layout=dataclasses.replace(plan.layout, engine=strategy.engine),
        optimizer=dataclasses.replace(plan.optimizer, max_grad_norm=0.0),
    )
    plan_path = os.path.join(workdir, "plan.json")
    plan.save(plan_path)
    ds_path = None
    if strategy.engine == "deepspeed":
        ds_path = deepspeed_config(plan, plan_path=plan_path, out_dir=workdir)  # planner.emit's ds_config
    job = Job(
        name=strategy.name,
        plan=plan,
        workdir=workdir,
        gate=gate,
        metrics=os.path.join(workdir, "metrics.json"),
        log_path=os.path.join(workdir, "train.log"),
    )
    args = [
        "--steps", str(cfg.warmup + cfg.steps + 1),
        "--warmup-steps", str(cfg.warmup),
        "--track-memory",
        "--metrics-out", job.metrics,
        "--step-gate", gate,
    ]  # fmt: skip
    if cfg.threads:
        args += ["--threads", str(cfg.threads)]
    spec = LaunchSpec(
        script=TRAIN,
        script_args=tuple(args),
        plan_path=plan_path,
        nproc=1,
        engine=strategy.engine,
        ds_config=ds_path,
    )

    def target() -> None:
        def on_start(pid: int) -> None:
            job.pgid = pid

        job.result = launch(spec, plan, log_path=job.log_path, handle_signals=False, on_start=on_start)

    job.thread = threading.Thread(target=target, name=f"bench-{strategy.name}", daemon=True)
    job.thread.start()
    return job


def step_job(job: Job, step: int, timeout_s: float) -> dict[str, Any] | None:
    """Let `job` run step `step` alone and wait for it; None if its process ended instead."""
    with open(os.path.join(job.gate, f"go-{step}"), "w"):
        pass
    done = os.path.join(job.gate, f"done-{step}")
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(done):
        if not job.running or time.monotonic() > deadline:
            return None
        time.sleep(0.02)
    with open(done) as fh:
        info = json.load(fh)
    job.steps.append(info)
    return info


def stop_jobs(jobs: Sequence[Job]) -> None:
    """Stop every job still running (SIGTERM to its process group, then SIGKILL)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for job in jobs:
            if job.running and job.pgid is not None:
                try:
                    os.killpg(job.pgid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + 15
        while any(j.running for j in jobs) and time.monotonic() < deadline:
            time.sleep(0.1)


def finish_job(job: Job) -> dict[str, Any]:
    if job.thread is not None:
        job.thread.join()
    if job.result is None or job.result.exit_code != 0 or not os.path.exists(job.metrics):
        message = job.result.message if job.result is not None else "did not finish"
        return {"status": "failed", "message": message, "log_tail": _tail(job.log_path)}
    with open(job.metrics) as fh:
        m = json.load(fh)
    m["status"] = "ok"
    return m


def _tail(path: str, lines: int = 25) -> str:
    try:
        with open(path, errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])
    except OSError:
        return ""
