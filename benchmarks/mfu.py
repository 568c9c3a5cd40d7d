"""MFU side by side: how fast does memtier train at a fraction of the baseline's memory, against the usual ways
of saving memory, and how well did the planner predict it?

Every strategy trains the same HF Llama (examples/train_lm.py: random init, byte-level text that ships with
memtier, AdamW, clipping at 1.0) for the same steps, each in its own process started by `memtier launch`
(torchrun, one rank), so each is measured the way a user runs it:

- ``pytorch``: plain PyTorch, everything kept (the baseline);
- ``accelerate``: the same under ``accelerate.Accelerator().prepare``;
- ``deepspeed``: DeepSpeed ZeRO-2 with CPU optimizer offload (DeepSpeed's CPU Adam) and every block
  checkpointed (installed in code; DeepSpeed's JSON alone checkpoints nothing), gloo on CPU;
- ``recompute_all``: PyTorch with every block recomputed (activation checkpointing);
- ``memtier@F``: a memtier plan for a device budget of F % of the baseline's measured peak
  (launch.budget.plan_for_budget: chunked loss, activation swap/recompute from the activation MIP,
  optimizer-state offload when needed).

Definitions (one place: planner.flops). Model FLOPs per step = 3 x forward FLOPs of the model (matmuls
counted exactly, attention scores included); MFU = model FLOPs / step time / peak; HFU adds the recomputed
forwards (Korthikanti et al. 2022, Appendix A). The peak is the GEMM FLOP/s `memtier probe` measured (the
higher of the cluster's figure and a GEMM measured at the start of this run), so neither can pass 100 %
unless a model runs faster than the best GEMM; such a figure would be capped and flagged.

All runs start together and then take turns, one step at a time in an order that rotates every round, so
load from other processes falls on every strategy alike; the speed ratio against the baseline is the median
over rounds of the two step times of the same round. Measured per strategy: median wall-clock step time
(tokens/s) and process CPU seconds per step over the timed rounds, and one extra step under torch's MemTracker for the peak of live tensors by category (on CPU the
"device" is the memory of the step's live tensors; what the plan moved to the DRAM tier is reported per
tier). Next to it: the planner's predicted step time and peak. `--calibrate` writes the measured model
efficiency into the cluster YAML (atomically) and reports the step-time prediction error before and after.

    memtier bench --quick                 # a few minutes on 2 cores (DeepSpeed's CPU Adam builds once, ~100 s)
    python -m benchmarks.mfu --model llama-34m --steps 6
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from planner.cluster import ClusterSpec
from planner.errors import InfeasibleError
from planner.estimate import estimate
from planner.memory import MemoryOptions, Offload
from planner.model import ModelSpec
from planner.plan import ActivationPolicy, Layout, OptimizerPlan, Plan, Predicted, TierPlan
from planner.presets import MODEL_PRESETS
from planner.workload import Workload

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "examples", "train_lm.py")
BUDGETS = (1.0, 0.5, 0.25)
# share of a budget the plan leaves unused for the memory model's error (measured within ~1 % on llama-34m)
PLAN_MARGIN = 0.02
MFU_CAP = 1.0


@dataclass(frozen=True, kw_only=True)
class Strategy:
    name: str
    engine: str  # train_lm --engine
    describe: str


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy(name="pytorch", engine="torch", describe="plain PyTorch, everything kept"),
        Strategy(name="accelerate", engine="accelerate", describe="accelerate.Accelerator().prepare"),
        Strategy(
            name="deepspeed",
            engine="deepspeed",
            describe="DeepSpeed ZeRO-2, CPU optimizer offload, every block checkpointed",
        ),
        Strategy(name="recompute_all", engine="torch", describe="PyTorch, every block recomputed"),
        *(
            Strategy(
                name=f"memtier@{int(f * 100)}", engine="torch", describe=f"memtier plan at {int(f * 100)} %"
            )
            for f in BUDGETS
        ),
    )
}


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    model: str = "llama-34m"
    seq: int = 512
    micro_batch: int = 4
    steps: int = 2  # timed steps (after `warmup`, before the one tracked step)
    warmup: int = 1
    strategies: tuple[str, ...] = tuple(STRATEGIES)
    out: str = "benchmarks/results/bench"
    cluster: str = "local"
    calibrate: bool = False
    quick: bool = False
    threads: int = 0  # torch threads per run (0: all cores)
    timeout_s: float = 1800.0


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- plans
def _workload(cfg: BenchConfig) -> Workload:
    return Workload(global_batch=cfg.micro_batch, micro_batch=cfg.micro_batch, seq_len=cfg.seq, dtype="fp32")


def _predicted(
    model: ModelSpec, cluster: ClusterSpec, workload: Workload, layout: Layout, options: MemoryOptions
) -> Predicted:
    est = estimate(model, cluster, workload, layout, options, check=False)
    return Predicted(
        bytes_by_tier=est.memory.by_tier(),
        bytes_by_category=est.memory.by_category(),
        peak_bytes=est.memory.total,
        step_time_s=est.time.step_s,
        time_breakdown=est.time.breakdown(),
        tflops_per_device=est.time.tflops_per_device,
        mfu=est.time.mfu,
        hfu=est.time.hfu,
    )


def _options(**kw: Any) -> MemoryOptions:
    return MemoryOptions(optimizer_impl="fused", **kw)  # train_lm's AdamW is torch's fused kernel


def fixed_plan(name: str, model: ModelSpec, cluster: ClusterSpec, workload: Workload) -> Plan:
    """The plan a baseline strategy stands for (so the same script, peak and predictions serve all)."""
    layout = Layout(dp=1, micro_batch=workload.micro_batch, rank_to_device=("n0:d0",))
    recompute = tuple(
        ActivationPolicy(layer=i, keep_fraction=0.0, recompute_fraction=1.0) for i in range(model.num_layers)
    )
    if name in ("pytorch", "accelerate"):
        opts = _options()
        plan = Plan(model=model, cluster=cluster, workload=workload, layout=layout)
    elif name == "recompute_all":
        opts = _options(policies=recompute)
        plan = Plan(model=model, cluster=cluster, workload=workload, layout=layout, activations=recompute)
    elif name == "deepspeed":
        opts = _options(policies=recompute, offload=Offload(optimizer=True, tier="dram"))
        plan = Plan(
            model=model,
            cluster=cluster,
            workload=workload,
            layout=dataclasses.replace(layout, zero_stage=2),
            activations=recompute,
            optimizer=OptimizerPlan(kind="adamw", offload=True, tier="dram"),
            tiers=(TierPlan(kind="dram", capacity_bytes=16 * model.params + (64 << 20)),),
        )
    else:
        raise ValueError(f"strategy: {name!r} has no fixed plan")
    return plan.replace(predicted=_predicted(model, cluster, workload, plan.layout, opts))


def budget_plan(model: ModelSpec, cluster: ClusterSpec, workload: Workload, budget_bytes: int) -> Plan:
    from launch.budget import plan_for_budget

    return plan_for_budget(
        model, cluster, workload, budget_bytes=budget_bytes, optimizer_offload=True, optimizer_impl="fused"
    ).plan


# ------------------------------------------------------------------------------------------- runs
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
    plan_path = os.path.join(workdir, "plan.json")
    plan.save(plan_path)
    ds_path = None
    if strategy.engine == "deepspeed":
        try:
            from planner.emit import write_outputs

            ds_path = write_outputs(plan, workdir)["ds_config.json"]
        except ImportError:
            ds_path = deepspeed_config(plan, plan_path=plan_path, out_dir=workdir)
        # DeepSpeed's default buckets (5e8 elements, 2 GB in fp32) dwarf a small model; one bucket the size of
        # the model's gradients is DeepSpeed's documented tuning and what a user would set
        with open(ds_path) as fh:
            ds_cfg = json.load(fh)
        zero = ds_cfg.setdefault("zero_optimization", {})
        zero["reduce_bucket_size"] = zero["allgather_bucket_size"] = plan.model.params
        with open(ds_path, "w") as fh:
            json.dump(ds_cfg, fh, indent=2)
    job = Job(
        name=strategy.name,
        plan=plan,
        workdir=workdir,
        gate=gate,
        metrics=os.path.join(workdir, "metrics.json"),
        log_path=os.path.join(workdir, "train.log"),
    )
    args = [
        "--engine", strategy.engine,
        "--steps", str(cfg.warmup + cfg.steps + 1),
        "--warmup-steps", str(cfg.warmup),
        "--track-memory",
        "--metrics-out", job.metrics,
        "--step-gate", gate,
        # no clipping anywhere: an offloaded optimizer may then update during backward (ZeRO-Offload's
        # behaviour), and every strategy does the same arithmetic
        "--max-grad-norm", "0",
    ]  # fmt: skip
    if cfg.threads:
        args += ["--threads", str(cfg.threads)]
    spec = LaunchSpec(
        script=TRAIN,
        script_args=tuple(args),
        plan_path=plan_path,
        nproc=1,
        engine="deepspeed" if strategy.engine == "deepspeed" else "torch",
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


def measure_gemm_now() -> float:
    """fp32 GEMM FLOP/s of this machine now (launch.probe's measurement: best of 3 at n = 1024)."""
    from launch.probe import measure_gemm

    return measure_gemm("fp32", 1024, 3)


def measured_peak_flops(cluster: ClusterSpec) -> tuple[float, float]:
    """(peak used for MFU, GEMM FLOP/s measured now): the higher of the cluster's fp32 figure and now."""
    now = measure_gemm_now()
    return max(cluster.device.flops("fp32"), now), now


# ------------------------------------------------------------------------------------------- report
def summarize(
    results: dict[str, dict[str, Any]], plans: dict[str, Plan | None], peak: float
) -> list[dict[str, Any]]:
    base = results.get("pytorch", {})
    base_tps = base.get("tokens_per_s") if base.get("status") == "ok" else None
    base_peak = base.get("memory", {}).get("device_peak_bytes") if base.get("status") == "ok" else None
    rows = []
    for name, r in results.items():
        plan = plans.get(name)
        row: dict[str, Any] = {"strategy": name, "status": r.get("status")}
        if plan is not None:
            row["predicted_step_s"] = plan.predicted.step_time_s
            row["predicted_peak_bytes"] = plan.predicted.peak_bytes
            row["plan"] = plan_summary(plan)
        if r.get("status") != "ok":
            row["message"] = r.get("message", "")
            rows.append(row)
            continue
        step = r["step_time_s"]
        mflops, hflops = r["model_flops_per_step"], r["hardware_flops_per_step"]
        mfu, hfu = mflops / step / peak, hflops / step / peak
        mem = dict(r.get("memory", {}))
        offloaded_opt = 0
        if r.get("engine") == "deepspeed" and plan is not None and plan.optimizer.offload:
            # DeepSpeed keeps its offloaded fp32 partition and CPU Adam moments in CPU tensors, which MemTracker
            # (tracking the optimizer) counts with the step's tensors; on a CPU-only machine that is the same
            # memory, so they are moved to the DRAM tier here, as memtier's offloaded state is
            offloaded_opt = int(mem.get("device_opt_bytes", 0))
            if "device_peak_bytes" in mem:
                mem["device_peak_bytes"] -= offloaded_opt
            mem["device_opt_bytes"] = 0
        row.update(
            tokens_per_s=r["tokens_per_s"],
            step_s=step,
            cpu_s=r.get("cpu_time_s"),
            step_times_s=r.get("step_times_s"),
            achieved_tflops=mflops / step / 1e12,
            # MFU counts model FLOPs only, HFU adds recompute (Korthikanti et al. 2022, Appendix A)
            mfu=min(MFU_CAP, mfu),
            hfu=min(MFU_CAP, hfu),
            mfu_capped=mfu > MFU_CAP or hfu > MFU_CAP,
            device_peak_bytes=mem.get("device_peak_bytes"),
            device_by_category={k: v for k, v in mem.items() if k != "device_peak_bytes"},
            dram_activation_bytes=r.get("tier_peak_bytes", {}).get("dram", 0),
            optimizer_tier_bytes=r.get("optimizer_tier_bytes")
            or ({"dram": offloaded_opt} if offloaded_opt else {}),
            swapped_bytes=r.get("swap", {}).get("bytes_swapped", 0),
            final_loss=r["losses"][-1][1] if r.get("losses") else None,
        )
        if base_tps:
            row["tokens_per_s_vs_pytorch_unpaired"] = r["tokens_per_s"] / base_tps
            # paired: in each round the baseline and this strategy ran back to back; the median of the
            # per-round ratios cancels load that drifts between rounds
            pairs = [b / t for b, t in zip(base.get("step_times_s", []), r.get("step_times_s", [])) if t > 0]
            row["round_ratios"] = pairs
            row["tokens_per_s_vs_pytorch"] = (
                statistics.median(pairs) if pairs else r["tokens_per_s"] / base_tps
            )
            if r.get("cpu_time_s") and base.get("cpu_time_s"):
                row["cpu_s_vs_pytorch"] = r["cpu_time_s"] / base["cpu_time_s"]
        if base_peak and mem.get("device_peak_bytes"):
            row["peak_vs_pytorch"] = mem["device_peak_bytes"] / base_peak
        if plan is not None:
            row["step_error"] = plan.predicted.step_time_s / step - 1
            if mem.get("device_peak_bytes"):
                row["peak_error"] = plan.predicted.peak_bytes / mem["device_peak_bytes"] - 1
        rows.append(row)
    return rows


def plan_summary(plan: Plan) -> dict[str, Any]:
    kinds: dict[str, int] = {}
    for a in plan.activations:
        kinds[a.kind] = kinds.get(a.kind, 0) + 1
    return {
        "activations": kinds or {"keep": plan.model.num_layers},
        "swap_fractions": [round(a.swap_fraction, 3) for a in plan.activations],
        "loss": plan.loss.kind + (f"({plan.loss.chunk_size})" if plan.loss.chunk_size else ""),
        "optimizer_offload": plan.optimizer.offload,
        "micro_batch": plan.layout.micro_batch,
        "grad_accum": plan.layout.grad_accum,
        "zero_stage": plan.layout.zero_stage,
    }


def render(rows: Sequence[dict[str, Any]]) -> str:
    head = (
        f"{'strategy':<14} {'tok/s':>8} {'x pytorch':>9} {'cpu x':>6} {'MFU':>6} {'HFU':>6} {'peak MiB':>9} {'x peak':>7} "
        f"{'dram MiB':>9} {'pred step':>10} {'err':>6} {'pred MiB':>9} {'err':>6}  plan"
    )
    out = [head, "-" * len(head)]
    for r in rows:
        if r.get("status") != "ok":
            out.append(f"{r['strategy']:<14} {r.get('status')}: {r.get('message', '')}")
            continue
        dram = (r.get("dram_activation_bytes") or 0) + sum((r.get("optimizer_tier_bytes") or {}).values())
        p = r.get("plan", {})
        out.append(
            f"{r['strategy']:<14} {r['tokens_per_s']:>8.0f} {r.get('tokens_per_s_vs_pytorch', float('nan')):>9.2f} "
            f"{1 / r['cpu_s_vs_pytorch'] if r.get('cpu_s_vs_pytorch') else float('nan'):>6.2f} "
            f"{100 * r['mfu']:>5.1f}% {100 * r['hfu']:>5.1f}% {_mib(r.get('device_peak_bytes')):>9} "
            f"{r.get('peak_vs_pytorch', float('nan')):>7.2f} {_mib(dram):>9} "
            f"{r.get('predicted_step_s', float('nan')):>9.2f}s {_pct(r.get('step_error')):>6} "
            f"{_mib(r.get('predicted_peak_bytes')):>9} {_pct(r.get('peak_error')):>6}  "
            f"{p.get('activations', '')} loss={p.get('loss', '')} opt_offload={p.get('optimizer_offload', '')}"
        )
    return "\n".join(out)


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def _pct(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:+.0f}%"


def plot(rows: Sequence[dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.common import savefig

    ok = [r for r in rows if r.get("status") == "ok"]
    names = [r["strategy"] for r in ok]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    ax = axes[0]
    ax.bar(names, [r.get("tokens_per_s_vs_pytorch", 0) for r in ok], color="tab:blue")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(0.97, color="tab:red", ls="--", lw=0.8, label="0.97x")
    ax.set_ylabel("tokens/s vs plain PyTorch")
    ax.legend(loc="lower left")
    ax = axes[1]
    ax.bar(names, [r.get("peak_vs_pytorch", 0) for r in ok], color="tab:green", label="measured")
    for f in BUDGETS:
        ax.axhline(f, color="tab:gray", ls=":", lw=0.8)
    ax.set_ylabel("device peak vs plain PyTorch")
    ax = axes[2]
    x = range(len(ok))
    ax.bar([i - 0.2 for i in x], [r["step_s"] for r in ok], width=0.4, label="measured")
    ax.bar([i + 0.2 for i in x], [r.get("predicted_step_s", 0) for r in ok], width=0.4, label="predicted")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names)
    ax.set_ylabel("step time (s)")
    ax.legend()
    for a in axes:
        a.tick_params(axis="x", rotation=40)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    savefig(fig, path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- calibration
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
        from launch.probe import CACHE_PATH

        return CACHE_PATH
    return arg


# ------------------------------------------------------------------------------------------- main
def run(cfg: BenchConfig, *, progress: Callable[[str], None] = log) -> dict[str, Any]:
    from launch.specs import cluster_from_arg
    from planner.cluster import cluster_to_yaml
    from planner.schema import atomic_write_text

    started = time.perf_counter()
    if cfg.model not in MODEL_PRESETS:
        raise ValueError(f"model: unknown preset {cfg.model!r}")
    unknown = [s for s in cfg.strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"strategies: unknown {unknown}; known: {list(STRATEGIES)}")
    model = MODEL_PRESETS[cfg.model]
    cluster = cluster_from_arg(cfg.cluster)
    cluster = dataclasses.replace(cluster, devices_per_node=1, nodes=1)
    workload = _workload(cfg)
    peak, gemm_now = measured_peak_flops(cluster)
    gemm_seen = [gemm_now]
    progress(
        f"{model.name} ({model.params / 1e6:.1f}M params), batch {cfg.micro_batch} x {cfg.seq} fp32, "
        f"{cfg.warmup}+{cfg.steps}+1 steps per strategy; peak {peak / 1e9:.1f} GFLOP/s "
        f"(cluster {cluster.device.flops('fp32') / 1e9:.1f}, measured now {gemm_now / 1e9:.1f}); "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    out_dir = cfg.out
    os.makedirs(out_dir, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    plans: dict[str, Plan | None] = {}
    names = ["pytorch", *[s for s in cfg.strategies if s != "pytorch"]]
    # Every plan is made up front: a memtier budget is a share of the baseline's peak as the planner predicts
    # it (checked against the measured baseline peak in the report; the two agree within ~1 % here).
    base_predicted = fixed_plan("pytorch", model, cluster, workload).predicted.peak_bytes
    for name in names:
        if name.startswith("memtier@"):
            fraction = int(name.split("@")[1]) / 100
            try:
                try:
                    plans[name] = budget_plan(
                        model, cluster, workload, int(fraction * base_predicted * (1 - PLAN_MARGIN))
                    )
                except InfeasibleError:  # no room for the margin: plan to the budget itself
                    plans[name] = budget_plan(model, cluster, workload, int(fraction * base_predicted))
            except InfeasibleError as exc:
                plans[name] = None
                results[name] = {"status": "infeasible", "message": str(exc)}
                progress(f"{name}: no plan fits: {exc}")
        else:
            plans[name] = fixed_plan(name, model, cluster, workload)
    runnable = [n for n in names if plans.get(n) is not None]
    # All runs start together and then take turns: step k of every run, in an order that rotates with k, one
    # run at a time, so load from other processes on the machine falls on all strategies alike.
    jobs: dict[str, Job] = {}
    total = cfg.warmup + cfg.steps + 1
    # plans, logs and gates of the runs: a scratch directory (failed runs' log tails go into the JSON)
    runs_dir = tempfile.mkdtemp(prefix="memtier-bench-")
    try:
        for name in runnable:
            plan = plans[name]
            if plan is None:
                continue
            progress(f"{name}: {STRATEGIES[name].describe}; plan {plan_summary(plan)}")
            jobs[name] = start_job(STRATEGIES[name], plan, cfg, os.path.join(runs_dir, name))
        for step in range(1, total + 1):
            k = (step - 1) % len(runnable)
            order = runnable[k:] + runnable[:k]
            kind = "warm-up" if step <= cfg.warmup else "memory-tracked" if step == total else "timed"
            for name in order:
                job = jobs[name]
                if not job.running:
                    continue
                info = step_job(job, step, cfg.timeout_s)
                if info is None:
                    progress(f"{name}: stopped before step {step}")
                    continue
                progress(f"step {step}/{total} ({kind}) {name}: {info['step_s']:.2f} s")
            # the GEMM peak, measured again between rounds (while every run waits): load from other
            # processes lowers any one measurement, and the MFU denominator is the best one seen
            gemm_seen.append(measure_gemm_now())
    finally:
        stop_jobs([j for j in jobs.values() if j.running and j.steps and len(j.steps) < total])
    for name, job in jobs.items():
        r = finish_job(job)
        results[name] = r
        plan = plans[name]
        if r["status"] != "ok" or plan is None:
            progress(f"{name}: {r['status']}: {r.get('message', '')}\n{r.get('log_tail', '')}")
    shutil.rmtree(runs_dir, ignore_errors=True)
    base_measured = results.get("pytorch", {}).get("memory", {}).get("device_peak_bytes")
    results = {n: results[n] for n in names if n in results}
    peak = max(peak, *gemm_seen)
    rows = summarize(results, plans, peak)
    for row in rows:
        if row["status"] == "ok" and row.get("predicted_step_s") is not None:
            # the device figures of the table (offloaded optimizer state counted in its tier)
            progress(
                f"{row['strategy']}: {row['tokens_per_s']:.0f} tokens/s, step {row['step_s']:.2f} s (predicted "
                f"{row['predicted_step_s']:.2f} s), device peak {(row['device_peak_bytes'] or 0) / 2**20:.0f} MiB"
                f" (predicted {row['predicted_peak_bytes'] / 2**20:.0f} MiB)"
            )
    payload: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "model": model.summary(),
        "cluster": cluster.summary(),
        "peak_flops": peak,
        "gemm_flops_measured": gemm_seen,
        "flops_definition": "planner.flops.model_flops_per_step (3 x forward, exact matmul count); MFU counts "
        "model FLOPs only, HFU adds recompute (Korthikanti et al. 2022, Appendix A)",
        "baseline_peak_bytes": base_measured,
        "rows": rows,
        "load_average_end": os.getloadavg(),
        "seconds": time.perf_counter() - started,
    }
    if cfg.calibrate:
        new_cluster, cal = calibrate(cluster, rows, plans, peak)
        cal["peak_flops_fp32_before"] = cluster.device.flops("fp32")
        cal["peak_flops_fp32_after"] = peak
        path = cluster_path(cfg.cluster)
        from planner.cluster import load_cluster

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
        payload["calibration"] = cal
        progress(
            f"calibrated: device efficiency {cal['efficiency_before']:.3f} -> {cal['efficiency_after']:.3f}, "
            f"written to {path}"
        )
    from benchmarks.common import write_json

    write_json(os.path.join(out_dir, "mfu.json"), payload)
    title = (
        f"{model.name}, batch {cfg.micro_batch}x{cfg.seq} fp32, {os.cpu_count()} CPU threads; "
        f"peak {peak / 1e9:.0f} GFLOP/s"
    )
    plot(rows, os.path.join(out_dir, "mfu.png"), title)
    payload["table"] = render(rows)
    return payload


def render_calibration(cal: dict[str, Any]) -> str:
    lines = [
        f"calibration: fp32 peak {cal.get('peak_flops_fp32_before', 0) / 1e9:.1f} -> "
        f"{cal.get('peak_flops_fp32_after', 0) / 1e9:.1f} GFLOP/s, device efficiency {cal['efficiency_before']:.3f} "
        f"-> {cal['efficiency_after']:.3f} (written to {cal.get('written')}); step-time prediction error:",
        f"{'strategy':<14} {'measured':>9} {'before':>9} {'err':>6} {'after':>9} {'err':>6}",
    ]
    for name, e in cal["errors"].items():
        lines.append(
            f"{name:<14} {e['measured_s']:>8.2f}s {e['predicted_before_s']:>8.2f}s {_pct(e['error_before']):>6} "
            f"{e['predicted_after_s']:>8.2f}s {_pct(e['error_after']):>6}"
        )
    return "\n".join(lines)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    quick = bool(getattr(args, "quick", False))
    steps = args.steps if getattr(args, "steps", None) else (3 if quick else 6)
    strategies = tuple(args.strategies) if getattr(args, "strategies", None) else tuple(STRATEGIES)
    return BenchConfig(
        model=args.model,
        seq=args.seq,
        micro_batch=args.micro_batch,
        steps=steps,
        strategies=strategies,
        out=args.out,
        cluster=args.cluster,
        calibrate=args.calibrate,
        quick=quick,
        threads=getattr(args, "threads", 0) or 0,
    )


def add_arguments(p: argparse.ArgumentParser, *, with_common: bool = True) -> None:
    if with_common:
        p.add_argument("--quick", action="store_true", help="3 timed rounds (a few minutes)")
        p.add_argument("--out", default="benchmarks/results/bench")
        p.add_argument(
            "--calibrate", action="store_true", help="write the measured efficiency to the cluster YAML"
        )
        p.add_argument("--cluster", default="local")
    p.add_argument("--model", default="llama-34m", choices=sorted(MODEL_PRESETS))
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument(
        "--steps", type=int, default=0, help="timed rounds: steps per strategy (default 3 quick, 6 full)"
    )
    p.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=None)
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (default: all cores)")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    payload = run(config_from_args(args))
    print(payload["table"])
    if "calibration" in payload:
        print(render_calibration(payload["calibration"]))
    print(f"wrote {os.path.join(args.out, 'mfu.json')} and mfu.png ({payload['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
