"""Can memtier train a model whose training state is several times the host memory it may use?

Side by side in one run, each system in its own process inside the same hard memory cap (a cgroup v1 memory
limit, `benchmarks.cgroup`), on the same Llama (``llama-374m``: ~374M parameters, 16 B/param of fp32 training
state = ~6.0 GB; ``--quick``: ``llama-17m``), the same synthetic tokens, the same thread count:

   torch      plain PyTorch, ``torch.optim.AdamW(fused=True)``: everything resident (expected: OOM-killed)
   deepspeed  DeepSpeed ZeRO-3 with ``offload_param`` and ``offload_optimizer`` on NVMe (ZeRO-Infinity)
   memtier    parameters, gradients and optimizer state streamed from NVMe per block (``offload.state``),
              from a plan with ``model_state.stream`` on (``--plan``, or `memtier_plan` for each cap); the
              model starts on the meta device and reads its initial weights group by group from a
              safetensors file written outside the cap

Every system starts from the same weights (seed 0), so the losses agree step by step. What happens outside
the cap: DeepSpeed's C++ ops are built (``--prepare``) and memtier's initial weights are written. DeepSpeed
builds the whole fp32 model before ``deepspeed.initialize`` (``deepspeed.zero.Init`` fails under torch 2.13),
so its floor includes the model's full size once; its ZeRO-3 settings are in
`benchmarks.ssd_offload_runner.deepspeed_config`.

For each: tokens/s (median of the timed steps, min/max), step times, losses, the cgroup's peak charge
(``memory.max_usage_in_bytes``: anonymous memory *and* page cache of every file touched) and the process's own
peak RSS (``VmHWM``), OOM kills recorded, not hidden. For memtier, the plan's predicted peak host memory and
step time against the measured ones. ``--find-min-cap`` bisects, per system, the smallest cap it trains in.

Targets (issue): memtier peak system memory <= 0.45x DeepSpeed's, tokens/s >= 1.5x DeepSpeed's, predicted
peak host memory within +-10% and step time within +-25% of measured.

Results: ``benchmarks/results/ssd_offload[_quick].json`` and ``.png``. Needs root and the cgroup v1 memory
controller; run from the repository root: ``python -m benchmarks.ssd_offload --quick``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.cgroup import CgroupUnavailable, run_capped, sigterm_as_interrupt, unavailable_reason
from benchmarks.ssd_offload_runner import MODELS, RESULT_PREFIX, SYSTEMS, param_count
from launch.run import MMAP_THRESHOLD_BYTES

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
GiB, MiB = 1 << 30, 1 << 20
# what the interpreter with torch + transformers (+ deepspeed) holds before any model: 354-376 MB measured
# what `memtier launch` sets for a streamed plan (launch.run.worker_env): a fixed glibc mmap threshold from the
# process's start, so freed activations and gradient copies go back to the system
MEMTIER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES)}
STATE_BYTES_PER_PARAM = 16  # fp32 weights + gradients + AdamW's two moments (ZeRO paper, Sec. 3.1, K=12 + 4)
TARGETS = {"peak_vs_deepspeed_max": 0.45, "tokens_per_s_vs_deepspeed_min": 1.5, "host_peak_rel_err": 0.10,
           "step_time_rel_err": 0.25}  # fmt: skip


def log(msg: str) -> None:
    print(f"[ssd_offload {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_bytes(text: str) -> int:
    """'2GiB', '1.5G', '512MiB', '1e9' -> bytes (binary units for K/M/G with or without 'i')."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?B?)\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GiB, 512MiB)")
    scale = {"": 1, "K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def fmt_gib(n: int | float | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f} GiB"


# ---- the memtier plan: the planner's job ------------------------------------------------------------------------


def capped_cluster(cap_bytes: int, nvme_dir: str, efficiency: float | None = None) -> Any:
    """This machine as the planner sees it inside the cap: the probed cluster (`launch.measure.probe`, probed at
    the start of this run) whose DRAM -- which is also the CPU "device's" memory -- is the cap, and whose NVMe
    tier is `nvme_dir`; with `efficiency` (the calibration, `calibrate_compute`) the device's compute rate is
    the one measured on this model, every per-block cost included."""
    import dataclasses

    from launch.measure.probe import local_cluster

    local = local_cluster()
    host = []
    for t in local.host:
        if t.kind == "dram":
            host.append(dataclasses.replace(t, capacity=cap_bytes))
        elif t.kind == "nvme":
            host.append(dataclasses.replace(t, path=nvme_dir))
    device = dataclasses.replace(local.device, memory=cap_bytes)
    if efficiency is not None:
        device = dataclasses.replace(device, efficiency=efficiency, block_overhead=0.0)
    return dataclasses.replace(local, device=device, host=tuple(host))


def memtier_plan(
    config: dict[str, Any], cap_bytes: int, nvme_dir: str, efficiency: float | None = None
) -> Any:
    """memtier's plan for this run, as `memtier plan` makes it: the planner's streamed search
    (`planner.planning.streamed_plan`) on the capped cluster; on a CPU device it fits the device's bytes, the
    DRAM-resident state, the staging pool and the process (probed) into the one memory the cap limits, and
    prefers DRAM over NVMe where the cap leaves room."""
    from transformers import LlamaConfig

    from planner.errors import InfeasibleError
    from planner.model import from_hf_config
    from planner.planning import streamed_plan
    from planner.workload import Workload

    kwargs: dict[str, Any] = dict(MODELS[config["model"]])
    hf = LlamaConfig(**kwargs, tie_word_embeddings=False).to_dict()
    spec = from_hf_config(hf, name=config["model"])
    workload = Workload(
        global_batch=config["micro_batch"] * config["grad_accum"], micro_batch=config["micro_batch"],
        seq_len=config["seq"], dtype="fp32", max_grad_norm=config["clip"],
    )  # fmt: skip
    try:
        return streamed_plan(
            spec, capped_cluster(cap_bytes, nvme_dir, efficiency), workload, micro_batch=config["micro_batch"]
        )
    except InfeasibleError as exc:
        raise NotImplementedError(
            f"memtier's planner finds no streamed plan within {fmt_gib(cap_bytes)}: {exc}"
        ) from exc


# ---- one system, one cap ----------------------------------------------------------------------------------------


def memtier_args(cfg: dict[str, Any], cap: int, args: argparse.Namespace, nvme_dir: str) -> list[str]:
    """The runner's memtier arguments: ``--plan`` (given, or `memtier_plan` for this cap, saved in ``nvme_dir``)
    and ``--weights`` (the initial weights file written outside the cap, if any)."""
    plan_path = args.plan
    if not plan_path:
        plan = memtier_plan(cfg, cap, nvme_dir, getattr(args, "efficiency", None))
        plan_path = os.path.join(nvme_dir, "plan.json")
        plan.save(plan_path)
    out = ["--plan", plan_path]
    if args.memtier_weights:
        out += ["--weights", args.memtier_weights]
    return out


def run_system(system: str, cfg: dict[str, Any], cap: int, args: argparse.Namespace) -> dict:
    """One capped run of one system: the runner's result (if it printed one) and the cgroup's counters."""
    nvme_dir = tempfile.mkdtemp(prefix=f"{system}-", dir=args.nvme_dir)
    cmd = [sys.executable, "-m", "benchmarks.ssd_offload_runner", "--system", system, "--config",
           json.dumps(cfg), "--nvme-dir", nvme_dir]  # fmt: skip
    if system == "memtier":
        try:
            cmd += memtier_args(cfg, cap, args, nvme_dir)
        except Exception as exc:  # noqa: BLE001 - no plan (not written, or infeasible) is a result
            shutil.rmtree(nvme_dir, ignore_errors=True)
            log(f"memtier: not run: {type(exc).__name__}: {exc}")
            return {"system": system, "limit_bytes": cap, "status": f"not run: {type(exc).__name__}: {exc}"}
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(cfg["threads"])}
    if system == "memtier":
        env.update(MEMTIER_ENV)
    result: dict[str, Any] = {}
    progress = [""]

    def on_line(line: str) -> None:
        if line.startswith(RESULT_PREFIX):
            result.update(json.loads(line[len(RESULT_PREFIX) :]))
        elif line.startswith(f"[{system} "):
            progress[0] = line  # the last one says how far a killed run got
            print("   " + line, flush=True)

    log(f"{system}: cap {fmt_gib(cap)}, {cfg['warmup']}+{cfg['steps']} steps")
    # the machine may be shared: the load average before and after says whether timings were contended
    load_before = os.getloadavg()
    try:
        capped = run_capped(
            cmd, limit_bytes=cap, env=env, cwd=str(ROOT), timeout_s=args.timeout, on_line=on_line
        )
    finally:
        shutil.rmtree(nvme_dir, ignore_errors=True)
    row: dict[str, Any] = {"system": system, **capped.to_dict(), **result}
    row["last_progress"] = progress[0]
    row["loadavg_1m_before_after"] = [load_before[0], os.getloadavg()[0]]
    row.pop("cmd")
    if capped.oom_killed:
        row["status"] = "oom-killed"
    elif capped.timed_out:
        row["status"] = f"timed out after {args.timeout} s"
    elif capped.returncode != 0 or not result:
        row["status"] = f"failed (exit {capped.returncode})"
    else:
        row["status"] = "ok"
        row.pop("output_tail")
    hwm = row.get("memory", {}).get("VmHWM")
    log(f"{system}: {row['status']}; cgroup max {fmt_gib(capped.max_usage_bytes)}, VmHWM {fmt_gib(hwm)}, "
        f"tokens/s {row.get('tokens_per_s', 0):.1f}")  # fmt: skip
    return row


def find_min_cap(system: str, cfg: dict[str, Any], args: argparse.Namespace, known: tuple[int, bool]) -> dict:
    """Bisect the smallest cap (to ``--min-cap-resolution``) that ``system`` trains ``cfg`` in; every trial kept.
    ``known``: (cap, whether the full run fit in it), which narrows the bracket."""
    lo, hi = args.min_cap_lo, args.min_cap_hi  # lo: assumed to fail, hi: assumed to fit (checked)
    if known[1]:
        hi = min(hi, known[0])
    else:
        lo = max(lo, known[0])
    trials: list[dict[str, Any]] = []

    def fits(cap: int) -> bool:
        row = run_system(system, cfg, cap, args)
        keys = ("limit_bytes", "status", "max_usage_bytes", "peak_rss_sampled_bytes", "peak_cache_sampled_bytes",
                "tokens_per_s", "last_progress")  # fmt: skip
        trials.append({k: row.get(k) for k in keys} | {"VmHWM": row.get("memory", {}).get("VmHWM")})
        if row["status"].startswith("failed"):
            trials[-1]["output_tail"] = row.get("output_tail", [])[-6:]
        return row["status"] == "ok"

    if not fits(hi):
        return {
            "min_cap_bytes": None,
            "note": f"did not fit the largest cap tried ({fmt_gib(hi)})",
            "trials": trials,
        }
    while hi - lo > args.min_cap_resolution:
        mid = (lo + hi) // 2 // MiB * MiB
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return {"min_cap_bytes": hi, "resolution_bytes": args.min_cap_resolution, "trials": trials}


# ---- the comparison ---------------------------------------------------------------------------------------------


def compare(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """memtier against DeepSpeed and against its own plan's predictions; None where either side did not run."""
    mt, ds = rows.get("memtier", {}), rows.get("deepspeed", {})
    out: dict[str, Any] = {"targets": TARGETS}
    ok_mt, ok_ds = mt.get("status") == "ok", ds.get("status") == "ok"
    if ok_mt and ok_ds:
        out["peak_cgroup_vs_deepspeed"] = mt["max_usage_bytes"] / ds["max_usage_bytes"]
        out["peak_rss_vs_deepspeed"] = mt["memory"]["VmHWM"] / ds["memory"]["VmHWM"]
        out["tokens_per_s_vs_deepspeed"] = mt["tokens_per_s"] / ds["tokens_per_s"]
        out["meets_peak_target"] = out["peak_cgroup_vs_deepspeed"] <= TARGETS["peak_vs_deepspeed_max"]
        out["meets_tokens_target"] = (
            out["tokens_per_s_vs_deepspeed"] >= TARGETS["tokens_per_s_vs_deepspeed_min"]
        )
    if ok_mt and mt.get("predicted"):
        pred = mt["predicted"]
        measured_peak = {"cgroup_max_usage": mt["max_usage_bytes"], "VmHWM": mt["memory"]["VmHWM"]}
        # the prediction includes the process itself (probed at the start of this run: CpuSpec.process_memory)
        out["host_peak_rel_err"] = {k: pred["host_peak_bytes"] / v - 1 for k, v in measured_peak.items() if v}
        out["step_time_rel_err"] = pred["step_time_s"] / mt["step_s_median"] - 1
        out["meets_prediction_targets"] = (
            abs(out["host_peak_rel_err"].get("VmHWM", 1e9)) <= TARGETS["host_peak_rel_err"]
            and abs(out["step_time_rel_err"]) <= TARGETS["step_time_rel_err"]
        )
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["systems"]
    names = list(rows)
    cap = report["cap_bytes"] / GiB
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    tps = [rows[n].get("tokens_per_s", 0.0) if rows[n].get("status") == "ok" else 0.0 for n in names]
    ax_t.bar(names, tps, color="tab:blue")
    for i, n in enumerate(names):
        if rows[n].get("status") != "ok":
            ax_t.text(i, 0, rows[n].get("status", "")[:24].replace(" ", "\n", 1), ha="center", va="bottom",
                      color="tab:red", fontsize=8)  # fmt: skip
    ax_t.set_ylabel("tokens/s (median of timed steps)")
    ax_t.set_title("throughput")
    x = range(len(names))
    peak = [(rows[n].get("max_usage_bytes") or 0) / GiB for n in names]
    hwm = [rows[n].get("memory", {}).get("VmHWM", 0) / GiB for n in names]
    ax_m.bar([i - 0.2 for i in x], peak, width=0.4, label="cgroup max usage (incl. page cache)")
    ax_m.bar([i + 0.2 for i in x], hwm, width=0.4, label="process peak RSS (VmHWM)")
    ax_m.axhline(cap, color="tab:red", ls="--", label=f"cap {cap:.2f} GiB")
    ax_m.axhline(report["training_state_bytes"] / GiB, color="gray", ls=":", label="fp32 training state")
    for i, n in enumerate(names):
        if rows[n].get("status") == "oom-killed":
            ax_m.text(i, cap, "OOM", ha="center", va="bottom", color="tab:red", fontweight="bold")
    ax_m.set_xticks(list(x), names)
    ax_m.set_ylabel("GiB")
    ax_m.set_title("peak memory")
    ax_m.legend(fontsize=7)
    fig.suptitle(f"{report['config']['model']} under a {cap:.2f} GiB cap "
                 f"(state / cap = {report['state_to_cap_ratio']:.1f}x)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- driver -----------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    versions = {}
    for mod in ("torch", "transformers", "deepspeed"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001 - a missing baseline is recorded, not fatal
            versions[mod] = f"unavailable: {exc}"
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "versions": versions}  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="llama-17m, 2+2 steps, a 1.5 GiB cap: a harness smoke test"
    )
    p.add_argument("--model", choices=sorted(MODELS), default=None)
    p.add_argument(
        "--cap", type=parse_bytes, default=None, help="default: a third of the fp32 training state"
    )
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--plan", default=None, help="memtier's plan.json (model_state.stream on)")
    p.add_argument(
        "--nvme-dir", default=None, help="swap files go in a fresh directory under it (removed after)"
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per capped run")
    p.add_argument("--find-min-cap", action="store_true", help="bisect the smallest cap per system")
    p.add_argument("--min-cap-lo", type=parse_bytes, default=parse_bytes("512MiB"))
    p.add_argument("--min-cap-hi", type=parse_bytes, default=None, help="default: training state + 2 GiB")
    p.add_argument("--min-cap-resolution", type=parse_bytes, default=parse_bytes("256MiB"))
    p.add_argument("--out", default=None)
    p.add_argument("--no-probe", action="store_true", help="use the cached probe of this machine")
    p.add_argument(
        "--no-calibrate", action="store_true", help="plan with the probe's efficiency (no torch run)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = args.model or ("llama-17m" if args.quick else "llama-374m")
    params = param_count(MODELS[model])
    state = params * STATE_BYTES_PER_PARAM
    # quick: the interpreter + torch alone take ~0.5 GiB, so a third of a 17M model's state cannot be the cap
    cap = args.cap or (int(1.5 * GiB) if args.quick else max(state // 3 // (64 * MiB), 1) * 64 * MiB)
    cfg = {"model": model, "seq": args.seq, "micro_batch": args.micro_batch, "grad_accum": args.accum,
           "warmup": args.warmup if args.warmup is not None else 2,
           "steps": args.steps if args.steps is not None else (2 if args.quick else 6),
           "lr": 1e-4, "weight_decay": 0.0, "clip": 1.0, "seed": 0, "threads": args.threads}  # fmt: skip
    out = Path(args.out or RESULTS / f"ssd_offload{'_quick' if args.quick else ''}.json")
    reason = unavailable_reason()
    if reason:
        log(f"skipped: {reason}")
        return 2
    base_nvme = args.nvme_dir or tempfile.gettempdir()
    os.makedirs(base_nvme, exist_ok=True)
    args.nvme_dir = tempfile.mkdtemp(prefix="memtier-ssd-offload-", dir=base_nvme)
    args.min_cap_hi = args.min_cap_hi or state + 2 * GiB
    log(f"{model}: {params / 1e6:.0f}M params, fp32 training state {fmt_gib(state)}, cap {fmt_gib(cap)} "
        f"({state / cap:.2f}x below the state)")  # fmt: skip
    probe = probe_machine(args)
    report: dict[str, Any] = {
        "question": "train a model whose fp32 training state is several times the memory cap",
        "probe": probe,
        "config": cfg, "params": params, "training_state_bytes": state, "cap_bytes": cap,
        "state_to_cap_ratio": state / cap, "machine": machine(), "systems": {}, "min_cap": {},
    }  # fmt: skip
    try:
        with sigterm_as_interrupt():
            run_all(args, cfg, cap, report)
    except CgroupUnavailable as exc:
        log(f"skipped: {exc}")
        return 2
    finally:
        shutil.rmtree(args.nvme_dir, ignore_errors=True)
    report["comparison"] = compare(report["systems"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))
    summarize(report)
    log(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def probe_machine(args: argparse.Namespace) -> dict[str, Any]:
    """Probe this machine now (quick): the figures memtier's plan is made from are those of this run."""
    from launch.measure.probe import local_cluster

    log("probing this machine (memtier's predictions use these figures)")
    c = local_cluster(refresh=not args.no_probe)
    nvme = c.tier("nvme")
    return {
        "gemm_fp32_flops": c.device.peak_flops.get("fp32"), "block_efficiency": c.device.efficiency,
        "block_overhead_s": c.device.block_overhead, "adam_params_per_s": c.cpu.adam_params_per_s,
        "process_memory_bytes": c.cpu.process_memory,
        "nvme_read_bps": nvme.read_bandwidth if nvme else None, "nvme_write_bps": nvme.write_bandwidth if nvme else None,
    }  # fmt: skip


def calibrate_compute(args: argparse.Namespace, cfg: dict[str, Any], report: dict[str, Any]) -> None:
    """The device's compute efficiency on this model, as `memtier bench --calibrate` measures it: one plain-PyTorch
    run without a cap (1+2 steps); efficiency = its model FLOPs / (the probed fp32 GEMM peak x its step time less
    the CPU AdamW update). memtier's plan is made with it: the prediction is checked on the streaming, not on the
    probe's guess of this model's GEMM shapes."""
    from launch.measure.probe import local_cluster
    from planner.flops import model_flops_per_step
    from planner.model import from_hf_config

    short = {**cfg, "warmup": 1, "steps": 2}
    row = run_system("torch", short, int(report["machine"]["mem_total_bytes"]), args)
    if row["status"] != "ok":
        report["calibration"] = {"status": row["status"]}
        return
    from transformers import LlamaConfig

    spec = from_hf_config(
        LlamaConfig(**MODELS[cfg["model"]], tie_word_embeddings=False).to_dict(), name=cfg["model"]
    )
    local = local_cluster()
    step = row["step_s_median"]
    tokens = cfg["micro_batch"] * cfg["grad_accum"] * cfg["seq"]
    flops = model_flops_per_step(spec, tokens, cfg["seq"])
    compute = max(1e-9, step - spec.params / local.cpu.adam_params_per_s)
    args.efficiency = min(1.0, flops / (local.device.peak_flops["fp32"] * compute))
    report["calibration"] = {
        "status": "ok", "step_s": step, "tokens_per_s": row["tokens_per_s"], "model_flops": flops,
        "efficiency": args.efficiency, "probe_efficiency": local.device.efficiency,
        "peak_rss_bytes": row.get("memory", {}).get("VmHWM"),
    }  # fmt: skip
    log(f"calibration: plain PyTorch uncapped {row['tokens_per_s']:.1f} tokens/s -> device efficiency "
        f"{args.efficiency:.3f} (the probe's block figure: {local.device.efficiency:.3f})")  # fmt: skip


def run_all(args: argparse.Namespace, cfg: dict[str, Any], cap: int, report: dict[str, Any]) -> None:
    args.memtier_weights = None
    args.efficiency = None
    if "memtier" in args.systems and not args.no_calibrate:
        calibrate_compute(args, cfg, report)
    for system in args.systems:
        if system == "deepspeed":
            prep = prepare_deepspeed()
            report["deepspeed_prepare"] = prep
            if not all(v.get("ok") for v in prep.values()):
                report["systems"][system] = {"system": system, "status": f"not run: ops not ready: {prep}"}
                continue
        if system == "memtier":
            args.memtier_weights = prepare_memtier_weights(cfg, args.nvme_dir)
        report["systems"][system] = run_system(system, cfg, cap, args)
        if args.find_min_cap and not report["systems"][system]["status"].startswith("not run"):
            short = {**cfg, "warmup": 1, "steps": 1}
            known = (cap, report["systems"][system]["status"] == "ok")
            report["min_cap"][system] = find_min_cap(system, short, args, known)
            log(f"{system}: smallest cap {fmt_gib(report['min_cap'][system].get('min_cap_bytes'))}")


def prepare_memtier_weights(cfg: dict[str, Any], nvme_dir: str) -> str | None:
    """The initial weights as safetensors, written outside the cap (memtier starts from a meta-device model and
    reads each group from this file; building the fp32 model whole would need its full size in memory)."""
    import subprocess

    path = os.path.join(nvme_dir, "weights.safetensors")
    log("memtier: writing the initial weights outside the cap")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.ssd_offload_runner", "--config", json.dumps(cfg),
                           "--save-weights", path], cwd=str(ROOT), capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})  # fmt: skip
    if proc.returncode != 0:
        log(f"memtier: could not write the weights ({proc.stderr[-500:]}); it builds the model whole")
        return None
    return path


def prepare_deepspeed() -> dict[str, Any]:
    """Build DeepSpeed's ops uncapped (minutes the first time) so the capped run only loads them."""
    import subprocess

    log("deepspeed: preparing its C++ ops (cpu_adam, async_io) outside the cap")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.ssd_offload_runner", "--prepare"], cwd=str(ROOT),
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})  # fmt: skip
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return dict(json.loads(line[len(RESULT_PREFIX) :])["prepare"])
    return {"prepare": {"ok": False, "reason": (proc.stderr or proc.stdout)[-2000:]}}


def summarize(report: dict[str, Any]) -> None:
    log(f"cap {fmt_gib(report['cap_bytes'])}, training state {fmt_gib(report['training_state_bytes'])} "
        f"({report['state_to_cap_ratio']:.2f}x)")  # fmt: skip
    for name, r in report["systems"].items():
        steps = r.get("step_s") or []
        med = (
            statistics.median(steps[report["config"]["warmup"] :])
            if len(steps) > report["config"]["warmup"]
            else 0
        )
        log(f"  {name:9s} {r.get('status', '?'):24s} cgroup max {fmt_gib(r.get('max_usage_bytes'))}  "
            f"VmHWM {fmt_gib(r.get('memory', {}).get('VmHWM'))}  tokens/s {r.get('tokens_per_s', 0):8.1f}  "
            f"step {med:.2f} s")  # fmt: skip
    for name, m in report["min_cap"].items():
        log(f"  smallest cap {name}: {fmt_gib(m.get('min_cap_bytes'))}")
    log(f"  comparison: {json.dumps(report.get('comparison', {}), default=str)}")


if __name__ == "__main__":
    sys.exit(main())
