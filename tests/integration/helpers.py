"""Shared pieces of the multi-process tests: a small plan, the launcher command, process bookkeeping."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

import psutil

from planner.cluster import ClusterSpec, CpuSpec, DeviceSpec, Link, Links, TierSpec
from planner.plan import ActivationPolicy, Layout, LossPlan, OptimizerPlan, Plan, TierPlan
from planner.presets import MODEL_PRESETS
from planner.workload import Workload

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "examples", "train_lm.py")
SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts")


def cpu_cluster(ranks: int) -> ClusterSpec:
    dev = DeviceSpec(
        kind="cpu", memory=8 << 30, peak_flops={"fp32": 5e10}, efficiency=0.5, host_link=Link(bandwidth=5e9)
    )
    return ClusterSpec(
        name="test-cpu",
        devices_per_node=ranks,
        device=dev,
        links=Links(intra_node=Link(bandwidth=5e9), inter_node=Link(bandwidth=1e9)),
        host=(TierSpec(kind="dram", capacity=8 << 30, read_bandwidth=5e9, write_bandwidth=5e9),),
        cpu=CpuSpec(cores=2, peak_flops=5e10, adam_params_per_s=2e8),
    )


def small_plan(
    path: str,
    *,
    ranks: int = 2,
    seq: int = 64,
    micro_batch: int = 2,
    activations: tuple[ActivationPolicy, ...] = (),
    chunked_loss: bool = False,
    swap_tier: str = "dram",
    swap_path: str | None = None,
    optimizer_offload: bool = False,
    zero_stage: int = 0,
    engine: str = "torch",
    tp: int = 1,
    pp: int = 1,
    grad_accum: int = 1,
    virtual_stages: int = 1,
    num_layers: int = 2,
    sequence_parallel: bool = False,
) -> Plan:
    """tiny-llama (2 blocks, or `num_layers`) on a CPU 'cluster' of `ranks` devices, data parallel over the
    ranks that `tp` and `pp` leave (even pipeline split); written to `path`."""
    model = MODEL_PRESETS["tiny-llama"]
    if num_layers != model.num_layers:
        model = dataclasses.replace(model, name=f"tiny-llama-{num_layers}l", num_layers=num_layers)
    dp = ranks // (tp * pp)
    workload = Workload(
        global_batch=micro_batch * grad_accum * dp, micro_batch=micro_batch, seq_len=seq, dtype="fp32"
    )
    activations = tuple(
        dataclasses.replace(a, swap_tier=swap_tier) if a.swap_fraction else a for a in activations
    )
    tiers = []
    if any(a.swap_fraction > 0 for a in activations) or optimizer_offload:
        if swap_tier == "nvme":
            tiers.append(TierPlan(kind="nvme", capacity_bytes=64 << 20, path=swap_path, direct_io=False))
        else:
            tiers.append(TierPlan(kind="dram", capacity_bytes=64 << 20))
    plan = Plan(
        model=model,
        cluster=cpu_cluster(ranks),
        workload=workload,
        layout=Layout(
            dp=dp,
            tp=tp,
            pp=pp,
            grad_accum=grad_accum,
            virtual_stages=virtual_stages,
            sequence_parallel=sequence_parallel,
            stage_layers=(num_layers // pp,) * pp if pp > 1 else (),
            zero_stage=zero_stage,
            engine=engine,
            micro_batch=micro_batch,
            rank_to_device=tuple(f"n0:d{i}" for i in range(ranks)),
        ),
        activations=activations,
        optimizer=OptimizerPlan(
            kind="adamw", offload=optimizer_offload, tier="dram" if optimizer_offload else "device"
        ),
        loss=LossPlan(kind="chunked", chunk_size=32) if chunked_loss else LossPlan(),
        tiers=tuple(tiers),
    )
    plan.save(path)
    return plan


def memtier(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def start_memtier(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "launch.cli", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def descendants(pid: int) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                out.add(pid)
        except psutil.NoSuchProcess:
            continue
    return out


def wait_gone(pids: set[int], timeout: float = 10.0) -> set[int]:
    deadline = time.monotonic() + timeout
    left = alive(pids)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = alive(left)
    return left
