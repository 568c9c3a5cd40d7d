"""The report of `memtier bench`: one row per strategy (MFU, HFU, peaks, ratios to the baseline, prediction
errors), the table, the plot and the calibration summary."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from launch.measure.strategies import BUDGETS, plan_summary
from planner.plan import Plan

MFU_CAP = 1.0


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
            mem["device_peak_bytes_as_tracked"] = mem.get(
                "device_peak_bytes"
            )  # before the move, for the record
            if "device_peak_bytes" in mem:
                mem["device_peak_bytes"] -= offloaded_opt
            mem["device_opt_bytes"] = 0
        times = r.get("step_times_s") or []
        row.update(
            tokens_per_s=r["tokens_per_s"],
            step_s=step,
            timed_steps=len(times),
            # this strategy's own steady state: (max - min) / median of its timed steps
            step_spread=(max(times) - min(times)) / statistics.median(times) if times else None,
            cpu_s=r.get("cpu_time_s"),
            step_times_s=r.get("step_times_s"),
            achieved_tflops=mflops / step / 1e12,
            # MFU counts model FLOPs only, HFU adds recompute (Korthikanti et al. 2022, Appendix A)
            mfu=min(MFU_CAP, mfu),
            hfu=min(MFU_CAP, hfu),
            mfu_capped=mfu > MFU_CAP or hfu > MFU_CAP,
            device_peak_bytes=mem.get("device_peak_bytes"),
            # the process's real memory (RSS high-water mark): on a CPU the device pool is bookkeeping
            process_peak_rss_bytes=r.get("process_memory", {}).get("peak_rss_bytes"),
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
            if pairs:  # the spread: min and max of the per-round ratios
                row["ratio_min"], row["ratio_max"] = min(pairs), max(pairs)
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


def _spread(r: dict[str, Any]) -> str:
    if r.get("ratio_min") is None:
        return "-"
    return f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}"


def render(rows: Sequence[dict[str, Any]]) -> str:
    head = (
        f"{'strategy':<14} {'tok/s':>8} {'x pytorch':>9} {'cpu x':>6} {'MFU':>6} {'HFU':>6} {'peak MiB':>9} {'x peak':>7} "
        f"{'dram MiB':>9} {'pred step':>10} {'err':>6} {'pred MiB':>9} {'err':>6} {'ratio min-max':>13}  plan"
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
            f"{_mib(r.get('predicted_peak_bytes')):>9} {_pct(r.get('peak_error')):>6} "
            f"{_spread(r):>13}  "
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

    from launch.measure.record import savefig

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


# issue 21: on a quiet machine the plain-PyTorch baseline's timed steps stay within this of their median
SPREAD_TARGET = 0.05


def _around_median(values: Sequence[float]) -> tuple[float, float]:
    """(lowest, highest) of `values` relative to their median, as signed shares (-0.04, +0.06)."""
    med = statistics.median(values)
    return min(values) / med - 1, max(values) / med - 1


def steadiness(rows: Sequence[dict[str, Any]], gemm_timed: Sequence[float]) -> dict[str, Any]:
    """Whether the baseline's timed steps met the ±SPREAD_TARGET spread, and whether this machine could:
    the GEMM peak measured between the timed rounds (nothing else of the bench running) moves with the
    machine's own speed, so where it swings by more than the target the steps cannot be steadier."""
    base = next((r for r in rows if r.get("strategy") == "pytorch" and r.get("step_times_s")), None)
    out: dict[str, Any] = {"target": SPREAD_TARGET}
    if base is not None:
        low, high = _around_median(base["step_times_s"])
        out.update(baseline_low=low, baseline_high=high, baseline_met=max(-low, high) <= SPREAD_TARGET)
    if gemm_timed:
        low, high = _around_median(gemm_timed)
        out.update(gemm_low=low, gemm_high=high, machine_steady=max(-low, high) <= SPREAD_TARGET)
    return out


def steadiness_line(st: dict[str, Any]) -> str:
    """One line for the log: the baseline's spread and the machine's, against the target."""
    if "baseline_low" not in st:
        return "no baseline steps to judge the spread by"
    line = (
        f"baseline steps {100 * st['baseline_low']:+.0f}% / {100 * st['baseline_high']:+.0f}% around their median "
        f"(target ±{100 * st['target']:.0f}%: {'met' if st['baseline_met'] else 'not met'})"
    )
    if "gemm_low" in st:
        line += (
            f"; the GEMM peak between timed rounds {100 * st['gemm_low']:+.0f}% / {100 * st['gemm_high']:+.0f}%"
            + ("" if st["machine_steady"] else ": this machine's own speed swings more than the target")
        )
    return line
