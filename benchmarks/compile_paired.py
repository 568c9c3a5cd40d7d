"""memtier + compile against compile's own memory-budget partitioner, paired: the plans the activations bench
chose, stepped in alternating rounds in one process.

`benchmarks/activations.py` measures each strategy once, minutes apart, against the eager no-offload steps
measured right before it; on a machine whose speed drifts by ±5–10% that cannot tell two strategies within a
few percent apart. Here, per budget, the two plans of an activations result (`--from`) take turns on one
model (each round: install, 1 warm-up step that compiles, `--steps` timed steps; the order flips every
round), so load drifting on a shared machine hits both alike:

- ``memtier``: the ``memtier_compile`` row's plan (per block keep / swap a token share to the NVMe tier /
  recompute, on compiled blocks at the row's partitioner budget), through `offload.apply`;
- ``partitioner``: the ``compile_budget`` row's setting, every block's forward under `torch.compile` with
  `activation_memory_budget` patched (`benchmarks.activations_torch.compiled_blocks`).

Reported per budget: each configuration's median and fastest step and its activation peak (measured once,
against the budget), the per-round ratio memtier / partitioner (median of the round's steps) with its
median and min–max, and in how many rounds memtier was the faster.

    .venv/bin/python benchmarks/compile_paired.py     # activations.json's 25/50/75% plans, 12 rounds of 5 steps
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))


from benchmarks.activations import RESULTS, parse_args  # noqa: E402
from benchmarks.activations_trainer import alternating_rounds, bench_plan, prepared, progress  # noqa: E402
from launch.measure.record import savefig, write_json  # noqa: E402

CONFIGS = ("memtier", "partitioner")


def _row(rows: list[dict[str, Any]], strategy: str, frac: float, source: str) -> dict[str, Any]:
    for r in rows:
        if r["strategy"] == strategy and r["budget_fraction"] == frac:
            if r.get("status") != "ok":
                raise SystemExit(f"{source}: the {strategy} row at budget {frac} is {r.get('status')}")
            return r
    raise SystemExit(f"{source}: no {strategy} row at budget {frac} (rows: 'strategy', 'budget_fraction')")


def memtier_policies(row: dict[str, Any]) -> tuple[Any, ...]:
    """The activation policies of a ``memtier_compile`` row: its per-block modes (K keep, S swap, R recompute)
    and swap fractions, the swapped share to the NVMe tier."""
    from planner.plan import ActivationPolicy

    out = []
    for i, (mode, s) in enumerate(zip(row["modes"], row["swap_fractions"], strict=True)):
        if mode == "R":
            out.append(ActivationPolicy(layer=i, keep_fraction=0.0, recompute_fraction=1.0))
        elif mode == "S":
            out.append(ActivationPolicy(layer=i, keep_fraction=1.0 - s, swap_fraction=s, swap_tier="nvme"))
        else:
            out.append(ActivationPolicy(layer=i))
    return tuple(out)


def run(source: str, budgets: list[float], rounds: int, steps: int) -> dict[str, Any]:
    with open(source) as f:
        bench = json.load(f)
    c = bench["config"]
    cfg = parse_args(
        ["--model", c["model"], "--batch", str(c["batch"]), "--seq-len", str(c["seq_len"]),
         "--threads", str(c["threads"]), "--loss-chunk", str(c["loss_chunk"]), "--seed", str(c["seed"]),
         "--swap-dir", c["swap_dir"], "--loss", c["loss"]]
        + (["--layers", str(c["layers"])] if c["layers"] else [])
    )  # fmt: skip
    rows = [
        (_row(bench["rows"], "memtier_compile", f, source), _row(bench["rows"], "compile_budget", f, source))
        for f in budgets
    ]
    os.makedirs(cfg.swap_dir, exist_ok=True)
    spec, tr, _loss = prepared(cfg)
    pairs = [
        _pair(tr, cfg, spec, c["compile_backend"], mine, theirs, rounds=rounds, steps=steps)
        for mine, theirs in rows
    ]
    config = {**c, "paired_budgets": budgets, "rounds": rounds, "steps_per_round": steps}
    return {"source": source, "config": config, "pairs": pairs}


def _pair(
    tr: Any,
    cfg: Any,
    spec: Any,
    backend: str,
    mine: dict[str, Any],
    theirs: dict[str, Any],
    *,
    rounds: int,
    steps: int,
) -> dict[str, Any]:
    """One budget: memtier's plan (row `mine`) and the partitioner's (row `theirs`) in alternating rounds."""
    import offload
    from benchmarks.activations_compile import compiled_plan
    from benchmarks.activations_torch import compiled_blocks
    from offload.activations import CompileOptions
    from planner.plan import TierPlan

    frac = mine["budget_fraction"]
    tier = TierPlan(kind="nvme", capacity_bytes=4 << 30, path=cfg.swap_dir)
    plan = compiled_plan(
        bench_plan(spec, cfg, memtier_policies(mine), (tier,)),
        CompileOptions(backend=backend, activation_memory_budget=mine["partitioner_budget"]),
    )
    share = float(theirs["compile_budget_fraction"])

    installs = {
        "memtier": lambda: offload.apply(tr.model, None, plan),
        "partitioner": lambda: compiled_blocks(list(tr.blocks), backend=backend, budget=share),
    }
    rounds_of, peaks = alternating_rounds(
        tr, installs, rounds=rounds, steps=steps, warmup=1, label=f"{frac:.0%} "
    )
    times = {n: [r.times_s for r in rs] for n, rs in rounds_of.items()}
    ratios = [
        statistics.median(m) / statistics.median(p)
        for m, p in zip(times["memtier"], times["partitioner"], strict=True)
    ]
    flat = {n: [t for rnd in v for t in rnd] for n, v in times.items()}
    return {
        "budget_fraction": frac,
        "budget_bytes": mine["budget_bytes"],
        "memtier_plan": {"modes": mine["modes"], "swap_fractions": mine["swap_fractions"],
                         "partitioner_budget": mine["partitioner_budget"]},
        "partitioner_budget": share,
        "act_peak_bytes": peaks,
        "fits": {n: peaks[n] <= mine["budget_bytes"] for n in CONFIGS},
        "step_times_s": times,
        "median_s": {n: statistics.median(v) for n, v in flat.items()},
        "fastest_s": {n: min(v) for n, v in flat.items()},
        "memtier_over_partitioner_per_round": ratios,
        "memtier_over_partitioner": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
        "rounds_memtier_faster": sum(x < 1 for x in ratios),
    }  # fmt: skip


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = result["pairs"]
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4), squeeze=False)
    for ax, p in zip(axes[0], pairs, strict=True):
        for name, rounds in p["step_times_s"].items():
            mib = p["act_peak_bytes"][name] / 2**20
            ax.plot(
                range(1, len(rounds) + 1),
                [statistics.median(r) for r in rounds],
                marker="o",
                label=f"{name} ({mib:.0f} MiB)",
            )
        r = p["memtier_over_partitioner"]
        ax.set_title(
            f"{p['budget_fraction']:.0%} budget ({p['budget_bytes'] / 2**20:.0f} MiB): memtier/partitioner "
            f"{r['median']:.3f}",
            fontsize=9,
        )
        ax.set_xlabel("round")
        ax.set_ylabel("median step (s)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    savefig(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="source", default=os.path.join(RESULTS, "activations.json"),
                    help="an activations bench result with memtier_compile and compile_budget rows")  # fmt: skip
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration per round")
    ap.add_argument("--out", default=os.path.join(RESULTS, "compile_paired"))
    args = ap.parse_args(argv)
    result = run(args.source, args.budgets, args.rounds, args.steps)
    write_json(args.out + ".json", result)
    plot(result, args.out + ".png")
    for p in result["pairs"]:
        r = p["memtier_over_partitioner"]
        progress(
            f"{p['budget_fraction']:.0%}: memtier / partitioner per round median {r['median']:.3f} "
            f"({r['min']:.3f}-{r['max']:.3f}), memtier faster in {p['rounds_memtier_faster']} of "
            f"{len(p['memtier_over_partitioner_per_round'])} rounds; fits {p['fits']}"
        )
    progress(f"wrote {args.out}.json/.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
