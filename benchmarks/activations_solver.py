"""How long does the swap/recompute MIP take at 8..80 layers, and how much does it save?

For Llama-like models (identical blocks, flash attention) at a long sequence, per-layer
costs come from textbook formulas (below); the device budget and the DRAM tier are
fractions of the keep-everything activation bytes, so every size is equally tight. For
each layer count and solver the MIP is timed against the greedy and recompute-all
baselines run on the same instance, and the added step time of each plan is compared.

    .venv/bin/python benchmarks/activations_solver.py            # 8..80 layers, CBC and HiGHS
    .venv/bin/python benchmarks/activations_solver.py --quick    # 8 and 16 layers

Writes benchmarks/results/activations_solver.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from importlib import metadata

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from planner.mip.activations import (  # noqa: E402
    GRANULARITIES,
    ActivationBudget,
    ActivationSettings,
    LayerCost,
    greedy,
    keep_all,
    recompute_all,
    solve_mip,
)
from planner.mip.common import SOLVERS, MipSettings  # noqa: E402

# name -> (hidden size, attention heads); the block is Llama's (flash attention, bf16)
MODELS: dict[str, tuple[int, int]] = {
    "llama-7b": (4096, 32),
    "llama-13b": (5120, 40),
    "llama-70b": (8192, 64),
}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def layer_costs(
    model: str, layers: int, seq_len: int, *, peak_flops: float, mfu: float, jitter: float
) -> list[LayerCost]:
    hidden, _heads = MODELS[model]
    s, b, h = seq_len, 1, hidden
    # activation bytes per layer, Korthikanti et al. 2022, s*b*h*(34 + 5*a*s/h), without the
    # a*s/h score terms (flash attention keeps no s x s matrices): 34*s*b*h
    act = 34 * s * b * h
    # a recomputed block keeps its bf16 input: 2*s*b*h
    inp = 2 * s * b * h
    # forward FLOPs per layer, Narayanan et al. 2021 (one layer's forward share of
    # 96*B*s*l*h^2*(1 + s/6h + V/16lh)): 24*b*s*h^2 + 4*b*s^2*h; backward = 2x
    fwd = (24 * b * s * h * h + 4 * b * s * s * h) / (peak_flops * mfu)
    out = []
    for i in range(layers):
        # optional deterministic per-layer variation (e.g. uneven pipeline stages, MoE layers)
        f = 1.0 + jitter * (((i * 7919) % 13) / 12.0 - 0.5)
        out.append(
            LayerCost(
                layer=i,
                act_bytes=int(act * f),
                input_bytes=inp,
                fwd_time_s=fwd * f,
                bwd_time_s=2 * fwd * f,
                recompute_time_s=fwd * f,
            )
        )
    return out


def machine() -> dict[str, object]:
    info: dict[str, object] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    try:
        import psutil

        info["memory_bytes"] = psutil.virtual_memory().total
        info["load_average"] = os.getloadavg()
    except (ImportError, OSError):
        pass
    for pkg in ("torch", "pulp", "highspy", "numpy"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = None
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="llama-70b")
    p.add_argument("--layers", type=int, nargs="+", default=[8, 16, 32, 48, 64, 80])
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--solvers", nargs="+", choices=SOLVERS, default=list(SOLVERS))
    p.add_argument("--granularity", choices=GRANULARITIES, default="layer")
    p.add_argument("--time-limit", type=float, default=5.0, help="MIP time limit, seconds")
    p.add_argument("--gap", type=float, default=1e-3, help="relative MIP gap (of the added step time)")
    p.add_argument("--device-frac", type=float, default=0.3, help="device budget / keep-all activation bytes")
    p.add_argument(
        "--tier-frac", type=float, default=0.45, help="DRAM tier capacity / keep-all activation bytes"
    )
    p.add_argument("--tier-gbps", type=float, default=25.0, help="device<->tier GB/s each way (PCIe 4.0 x16)")
    p.add_argument("--peak-tflops", type=float, default=312.0, help="A100 bf16")
    p.add_argument("--mfu", type=float, default=0.5)
    p.add_argument(
        "--jitters",
        type=float,
        nargs="+",
        default=[0.0, 0.3],
        help="per-layer cost variation: 0 = identical blocks (a dense LLM), 0.3 = +-15%% (uneven layers)",
    )
    p.add_argument("--quick", action="store_true", help="8 and 16 layers, 2 s limit")
    p.add_argument("--out", default=os.path.join(RESULTS, "activations_solver"))
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.time_limit = [8, 16], 2.0

    rows = []
    for jitter, layers in ((j, n) for j in args.jitters for n in args.layers):
        costs = layer_costs(
            args.model, layers, args.seq_len, peak_flops=args.peak_tflops * 1e12, mfu=args.mfu, jitter=jitter
        )
        total = sum(c.act_bytes for c in costs)
        budget = ActivationBudget(
            device_bytes=int(args.device_frac * total),
            tier_capacity_bytes=int(args.tier_frac * total),
            tier_write_bps=args.tier_gbps * 1e9,
            tier_read_bps=args.tier_gbps * 1e9,
        )
        base = {f.__name__: f(costs, budget) for f in (keep_all, recompute_all, greedy)}
        for solver in args.solvers:
            settings = ActivationSettings(
                recompute_granularity=args.granularity,
                mip=MipSettings(time_limit_s=args.time_limit, gap_rel=args.gap, solver=solver),
            )
            t0 = time.perf_counter()
            mip = solve_mip(costs, budget, settings)
            wall = time.perf_counter() - t0
            row = {
                "jitter": jitter,
                "layers": layers,
                "solver": solver,
                "status": mip.status,
                "gap": mip.gap,
                "mip_seconds": wall,
                "greedy_seconds": base["greedy"].seconds,
                "objective_s": mip.objective_s,
                "greedy_objective_s": base["greedy"].objective_s,
                "recompute_all_objective_s": base["recompute_all"].objective_s,
                "keep_all_fits": base["keep_all"].fits,
                "mip_over_greedy": mip.objective_s / base["greedy"].objective_s
                if base["greedy"].objective_s
                else 1.0,
                "mip_over_recompute_all": (
                    mip.objective_s / base["recompute_all"].objective_s
                    if base["recompute_all"].objective_s
                    else 1.0
                ),
                "device_bytes": mip.device_bytes,
                "tier_bytes": mip.tier_bytes,
                "base_compute_s": sum(c.fwd_time_s + c.bwd_time_s for c in costs),
                "recomputed_layers": sum(1 for pol in mip.policies if pol.recompute_fraction > 0.5),
            }
            rows.append(row)
            gap = f"{row['gap']:.2%}" if row["gap"] is not None else "n/a"
            print(
                f"[jitter {jitter:.1f}, {layers:3d} layers, {solver:5s}] {row['mip_seconds']:6.2f} s  {row['status']:10s} gap {gap:>7s}  "
                f"added {row['objective_s']:.3f} s = {row['mip_over_greedy']:.3f} x greedy, "
                f"{row['mip_over_recompute_all']:.3f} x recompute-all",
                flush=True,
            )

    result = {
        "question": "swap/recompute MIP solve time and plan quality vs layers",
        "config": vars(args),
        "machine": machine(),
        "rows": rows,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    _plot(rows, args.out + ".png", args.time_limit)
    for jitter in args.jitters:
        for solver in args.solvers:
            big = [
                r
                for r in rows
                if (r["solver"], r["jitter"], r["layers"]) == (solver, jitter, max(args.layers))
            ]
            if big:
                r = big[0]
                verdict = "within" if r["mip_seconds"] <= 10.0 else "OVER"
                print(
                    f"{solver}, jitter {jitter}: {r['layers']} layers solved in {r['mip_seconds']:.2f} s ({verdict} 10 s), "
                    f"status {r['status']}, {r['mip_seconds'] / args.time_limit:.2f} x its time limit, "
                    f"plan {r['mip_over_greedy']:.3f} x greedy's added time"
                )
    print("wrote", args.out + ".json", "and", args.out + ".png")
    return 0


def _plot(rows: list[dict], path: str, time_limit: float) -> None:  # type: ignore[type-arg]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_q) = plt.subplots(1, 2, figsize=(12, 4.5))
    for jitter in sorted({r["jitter"] for r in rows}):
        style = "-" if jitter == 0 else "--"
        for solver in sorted({r["solver"] for r in rows}):
            rs = [r for r in rows if r["solver"] == solver and r["jitter"] == jitter]
            x = [r["layers"] for r in rs]
            label = f"{solver}, jitter {jitter}"
            ax_t.plot(x, [r["mip_seconds"] for r in rs], "o" + style, label=f"MIP ({label})")
            ax_q.plot(x, [r["mip_over_greedy"] for r in rs], "o" + style, label=f"MIP / greedy ({label})")
        rs = [r for r in rows if r["solver"] == rows[0]["solver"] and r["jitter"] == jitter]
        ax_q.plot(
            [r["layers"] for r in rs],
            [r["mip_over_recompute_all"] for r in rs],
            "s" + style,
            label=f"MIP / recompute-all (jitter {jitter})",
        )
        ax_t.plot(
            [r["layers"] for r in rs],
            [r["greedy_seconds"] for r in rs],
            "^:",
            label=f"greedy (jitter {jitter})",
        )
    ax_t.axhline(10.0, color="red", lw=0.8, label="10 s target")
    ax_t.axhline(time_limit, color="gray", lw=0.8, ls="--", label="MIP time limit")
    ax_t.set(xlabel="layers", ylabel="seconds", title="solve time", yscale="log")
    ax_q.set(xlabel="layers", ylabel="added step time ratio", title="plan quality (lower is better)")
    ax_t.legend(fontsize=7)
    ax_q.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
