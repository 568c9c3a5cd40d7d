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
  (launch.measure.strategies.budget_plan: chunked loss, activation swap/recompute from the activation MIP,
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

The parts: strategies.py (what each strategy trains with), jobs.py (their processes), report.py (rows, table,
plot), calibrate.py (--calibrate); this module runs them side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from launch.measure.calibrate import write_calibration
from launch.measure.jobs import Job, finish_job, start_job, step_job, stop_jobs
from launch.measure.report import plot, render, steadiness, steadiness_line, summarize
from launch.measure.strategies import (
    PLAN_MARGIN,
    STRATEGIES,
    BenchConfig,
    budget_plan,
    fixed_plan,
    plan_summary,
)
from planner.cluster import ClusterSpec
from planner.errors import InfeasibleError
from planner.model import ModelSpec
from planner.plan import Plan
from planner.presets import MODEL_PRESETS
from planner.workload import Workload

Progress = Callable[[str], None]


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def measure_gemm_now() -> float:
    """fp32 GEMM FLOP/s of this machine now (launch.measure.probe's measurement: best of 3 at n = 1024)."""
    from launch.measure.probe import measure_gemm

    return measure_gemm("fp32", 1024, 3)


def measured_peak_flops(cluster: ClusterSpec) -> tuple[float, float]:
    """(peak used for MFU, GEMM FLOP/s measured now): the higher of the cluster's fp32 figure and now."""
    now = measure_gemm_now()
    return max(cluster.device.flops("fp32"), now), now


# ------------------------------------------------------------------------------------------- plans
def make_plans(
    names: Sequence[str], model: ModelSpec, cluster: ClusterSpec, workload: Workload, progress: Progress
) -> tuple[dict[str, Plan | None], dict[str, dict[str, Any]]]:
    """The plan of every strategy in `names` (None where no plan fits) and the results of those that cannot run.

    Every plan is made up front: a memtier budget is a share of the baseline's peak as the planner predicts
    it (checked against the measured baseline peak in the report; the two agree within ~1 % here).
    """
    plans: dict[str, Plan | None] = {}
    results: dict[str, dict[str, Any]] = {}
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
    return plans, results


# ------------------------------------------------------------------------------------------- runs
def run_interleaved(
    cfg: BenchConfig, plans: dict[str, Plan | None], runnable: Sequence[str], progress: Progress
) -> tuple[dict[str, dict[str, Any]], list[float]]:
    """Train every runnable strategy side by side; (results by strategy, GEMM FLOP/s measured between rounds).

    All runs start together and then take turns: step k of every run, in an order that rotates with k, one
    run at a time, so load from other processes on the machine falls on all strategies alike.
    """
    jobs: dict[str, Job] = {}
    total = cfg.warmup + cfg.steps + 1
    gemm_seen: list[float] = []
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
            order = [*runnable[k:], *runnable[:k]]
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
    results: dict[str, dict[str, Any]] = {}
    for name, job in jobs.items():
        r = finish_job(job)
        results[name] = r
        if r["status"] != "ok" or plans[name] is None:
            progress(f"{name}: {r['status']}: {r.get('message', '')}\n{r.get('log_tail', '')}")
    shutil.rmtree(runs_dir, ignore_errors=True)
    return results, gemm_seen


# ------------------------------------------------------------------------------------------- main
def run(cfg: BenchConfig, *, progress: Progress = log) -> dict[str, Any]:
    from launch.measure.record import write_json
    from launch.specs import cluster_from_arg

    started = time.perf_counter()
    if cfg.model not in MODEL_PRESETS:
        raise ValueError(f"model: unknown preset {cfg.model!r}")
    unknown = [s for s in cfg.strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"strategies: unknown {unknown}; known: {list(STRATEGIES)}")
    model = MODEL_PRESETS[cfg.model]
    cluster = cluster_from_arg(cfg.cluster)
    cluster = dataclasses.replace(cluster, devices_per_node=1, nodes=1)
    workload = Workload(
        global_batch=cfg.micro_batch, micro_batch=cfg.micro_batch, seq_len=cfg.seq, dtype="fp32"
    )
    peak, gemm_now = measured_peak_flops(cluster)
    progress(
        f"{model.name} ({model.params / 1e6:.1f}M params), batch {cfg.micro_batch} x {cfg.seq} fp32, "
        f"{cfg.warmup}+{cfg.steps}+1 steps per strategy; peak {peak / 1e9:.1f} GFLOP/s "
        f"(cluster {cluster.device.flops('fp32') / 1e9:.1f}, measured now {gemm_now / 1e9:.1f}); "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    out_dir = cfg.out
    os.makedirs(out_dir, exist_ok=True)
    names = ["pytorch", *[s for s in cfg.strategies if s != "pytorch"]]
    plans, results = make_plans(names, model, cluster, workload, progress)
    runnable = [n for n in names if plans.get(n) is not None]
    measured, gemm_rounds = run_interleaved(cfg, plans, runnable, progress)
    results.update(measured)
    gemm_seen = [gemm_now, *gemm_rounds]
    base_measured = results.get("pytorch", {}).get("memory", {}).get("device_peak_bytes")
    results = {n: results[n] for n in names if n in results}
    peak = max(peak, *gemm_seen)
    rows = summarize(results, plans, peak)
    _log_rows(rows, progress)
    # the GEMM measured after each timed round (gemm_rounds[i] follows step i + 1)
    steady = steadiness(rows, gemm_rounds[cfg.warmup : cfg.warmup + cfg.steps])
    progress(steadiness_line(steady))
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
        "steadiness": steady,
        "load_average_end": os.getloadavg(),
        "seconds": time.perf_counter() - started,
    }
    if cfg.calibrate:
        cal = write_calibration(cluster, cfg.cluster, rows, plans, peak)
        payload["calibration"] = cal
        progress(
            f"calibrated: device efficiency {cal['efficiency_before']:.3f} -> {cal['efficiency_after']:.3f}, "
            f"written to {cal['written']}"
        )
    write_json(os.path.join(out_dir, "mfu.json"), payload)
    title = (
        f"{model.name}, batch {cfg.micro_batch}x{cfg.seq} fp32, {os.cpu_count()} CPU threads; "
        f"peak {peak / 1e9:.0f} GFLOP/s"
    )
    plot(rows, os.path.join(out_dir, "mfu.png"), title)
    payload["table"] = render(rows)
    return payload


def _log_rows(rows: Sequence[dict[str, Any]], progress: Progress) -> None:
    for row in rows:
        if row["status"] == "ok" and row.get("predicted_step_s") is not None:
            # the device figures of the table (offloaded optimizer state counted in its tier)
            progress(
                f"{row['strategy']}: {row['tokens_per_s']:.0f} tokens/s, step {row['step_s']:.2f} s (predicted "
                f"{row['predicted_step_s']:.2f} s), device peak {(row['device_peak_bytes'] or 0) / 2**20:.0f} MiB"
                f" (predicted {row['predicted_peak_bytes'] / 2**20:.0f} MiB)"
            )


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    quick = bool(getattr(args, "quick", False))
    # >= 8 timed steady-state rounds by default (the spread of per-round ratios is reported); --quick is 3
    steps = args.steps if getattr(args, "steps", None) else (3 if quick else 8)
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
        warmup=1 if quick else 2,
        threads=getattr(args, "threads", 0) or 0,
    )


def add_arguments(p: argparse.ArgumentParser, *, with_common: bool = True) -> None:
    if with_common:
        p.add_argument(
            "--quick",
            action="store_true",
            help="3 timed rounds after 1 warm-up (a few minutes; a quick look)",
        )
        p.add_argument("--out", default="benchmarks/results/bench")
        p.add_argument(
            "--calibrate", action="store_true", help="write the measured efficiency to the cluster YAML"
        )
        p.add_argument("--cluster", default="local")
    p.add_argument("--model", default="llama-34m", choices=sorted(MODEL_PRESETS))
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument(
        "--steps", type=int, default=0, help="timed rounds: steps per strategy (default 3 quick, 8 full)"
    )
    p.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=None)
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (default: all cores)")
