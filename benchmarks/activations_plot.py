"""benchmarks/activations.py's plot: step-time ratio and measured peak over budget, per strategy and budget."""

from __future__ import annotations

from typing import Any

from benchmarks.activations_trainer import STRATEGIES
from launch.measure.record import savefig

# no red among them: red crosses mark a budget exceeded
COLORS = {
    "no_offload": "tab:gray",
    "memtier": "tab:orange",
    "memtier_compile": "tab:olive",
    "recompute_all": "tab:green",
    "sac_milp": "tab:blue",
    "compile_budget": "tab:purple",
    "compile_nobudget": "tab:brown",
}


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [s for s in ("no_offload", *STRATEGIES) if any(r["strategy"] == s for r in rows)]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    failed = []
    for name in names:
        rs = sorted((r for r in rows if r["strategy"] == name), key=lambda r: r["budget_fraction"])
        ok = [r for r in rs if r["status"] == "ok"]
        failed += [f"{name}@{r['budget_fraction']:.0%}: {r['status']}" for r in rs if r["status"] != "ok"]
        if not ok:
            continue
        color = COLORS[name]
        xs = [100 * r["budget_fraction"] for r in ok]
        ax.plot(xs, [r["step_ratio"] for r in ok], "-", color=color, label=name)
        ax2.plot(xs, [r["peak_over_budget"] for r in ok], "-", color=color, label=name)
        for r, x in zip(ok, xs):
            for a, y in ((ax, r["step_ratio"]), (ax2, r["peak_over_budget"])):
                if r["fits"]:
                    a.plot([x], [y], "o", color=color)
                else:  # open marker in the strategy's colour, crossed in red
                    a.plot([x], [y], "o", mfc="none", mec=color, ms=9)
                    a.plot([x], [y], "x", color="red", ms=6)
        if name in ("memtier", "memtier_compile"):
            ax.plot(
                xs,
                [r["predicted_step_ratio"] for r in ok],
                ":",
                color=color,
                label=f"{name} (planner's prediction)",
            )
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("activation budget (% of the no-offload activation peak)")
    ax.set_ylabel("step time / no-offload step time")
    ax.set_title("cost of the budget (crossed: measured peak exceeds the budget)", fontsize=10)
    ax.legend(fontsize=7, ncols=2)
    ax2.axhline(1.0, color="red", lw=0.8, ls="--")
    ax2.set_xlabel("activation budget (% of the no-offload activation peak)")
    ax2.set_ylabel("measured activation peak / budget")
    ax2.set_title("does it fit? (<= 1)", fontsize=10)
    cfg, nvme, model = result["config"], result["nvme"], result["model"]
    fig.suptitle(
        f"{model['name']} x{model['num_layers']}, {cfg['batch']}x{cfg['seq_len']} tokens, swap to NVMe (tier "
        f"{nvme['tier_write_bps'] / 1e9:.2f}/{nvme['tier_read_bps'] / 1e9:.2f} GB/s w/r), "
        f"compile: {cfg['compile_backend']}",
        fontsize=10,
    )
    if failed:
        fig.text(0.01, 0.01, "not run: " + "; ".join(failed), fontsize=7, color="red")
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    savefig(fig, path)
    plt.close(fig)
