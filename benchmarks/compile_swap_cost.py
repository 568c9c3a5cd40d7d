"""What does a swap cost on compiled blocks on this machine, per tier, against the partitioner's recompute?

The activation MIP prices a swapped byte at the tier's measured write and read rates, hidden behind nothing on
a CPU (`planner.mip.activations.transfer_overlap`: no copy engine). This measures it, in one process,
configurations taking turns (each round: install, 2 warm-up steps, `--steps` timed steps; the order flips
every round):

- ``keep``: every block compiled at partitioner budget 1.0, nothing swapped (`offload.apply`);
- ``swap_<tier>``: the same with the first `--blocks` blocks' saved sets swapped whole to the tier;
- ``partitioner``: every block compiled with `activation_memory_budget=--partitioner` (no memtier).

Reported per configuration: the median step, forward and backward, the bytes swapped per step and the
activation peak (measured once); and per swap configuration the added seconds per swapped MiB.

    .venv/bin/python benchmarks/compile_swap_cost.py          # llama-20m 2x256, inductor, 2 blocks, 0.41
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))


from benchmarks.activations import RESULTS, parse_args  # noqa: E402
from benchmarks.activations_trainer import alternating_rounds, bench_plan, prepared, progress  # noqa: E402
from launch.measure.record import savefig, write_json  # noqa: E402


def _configs(
    tr: Any, spec: Any, cfg: Any, *, blocks: int, tiers: list[str], partitioner: float
) -> dict[str, Any]:
    """name -> a callable installing that configuration (a context manager with or without swap stats)."""
    import offload
    from benchmarks.activations_compile import compiled_plan
    from benchmarks.activations_torch import compiled_blocks
    from offload.activations import CompileOptions
    from planner.plan import ActivationPolicy, TierPlan

    n = len(tr.blocks)

    def plan(tier: str | None) -> Any:
        k = blocks if tier else 0
        acts = tuple(
            ActivationPolicy(layer=i, keep_fraction=0.0, swap_fraction=1.0, swap_tier=tier)
            if i < k
            else ActivationPolicy(layer=i)
            for i in range(n)
        )
        stores = (
            (TierPlan(kind=tier, capacity_bytes=1 << 30, path=cfg.swap_dir if tier == "nvme" else None),)
            if tier
            else ()
        )
        return compiled_plan(
            bench_plan(spec, cfg, acts, stores),
            CompileOptions(backend=cfg.compile_backend, activation_memory_budget=1.0),
        )

    out: dict[str, Any] = {"keep": lambda: offload.apply(tr.model, None, plan(None))}
    for t in tiers:
        out[f"swap_{t}"] = lambda t=t: offload.apply(tr.model, None, plan(t))
    out["partitioner"] = lambda: compiled_blocks(
        list(tr.blocks), backend=cfg.compile_backend, budget=partitioner
    )
    return out


def run(*, blocks: int, tiers: list[str], partitioner: float, rounds: int, steps: int) -> dict[str, Any]:
    cfg = parse_args(["--compile-backend", "inductor"])
    os.makedirs(cfg.swap_dir, exist_ok=True)
    spec, tr, _loss = prepared(cfg)
    configs = _configs(tr, spec, cfg, blocks=blocks, tiers=tiers, partitioner=partitioner)
    names = list(configs)
    rounds_of, peaks = alternating_rounds(tr, configs, rounds=rounds, steps=steps, warmup=2)
    per = {
        c: {k: [statistics.median(getattr(r, attr)) for r in rs] for k, attr in
            (("step", "times_s"), ("fwd", "fwd_s"), ("bwd", "bwd_s"))}
        for c, rs in rounds_of.items()
    }  # fmt: skip
    # per step, from the last round
    swapped = {c: rs[-1].bytes_swapped // steps for c, rs in rounds_of.items()}
    median = {c: {k: statistics.median(v) for k, v in d.items()} for c, d in per.items()}
    keep = median["keep"]["step"]
    return {
        "question": "the cost of swapping compiled blocks' saved sets per tier, against the partitioner's recompute",
        "config": {
            "model": spec.name,
            "batch": cfg.batch,
            "seq_len": cfg.seq_len,
            "threads": cfg.threads,
            "backend": cfg.compile_backend,
            "swapped_blocks": blocks,
            "partitioner_budget": partitioner,
            "rounds": rounds,
            "steps_per_round": steps,
            "swap_dir": cfg.swap_dir,
        },  # fmt: skip
        "per_round_s": per,
        "median_s": median,
        "bytes_swapped_per_step": swapped,
        "act_peak_bytes": peaks,
        "added_s": {c: median[c]["step"] - keep for c in names if c != "keep"},
        "added_s_per_mib_swapped": {
            c: (median[c]["step"] - keep) / (swapped[c] / 2**20) for c in names if swapped.get(c)
        },
        "added_s_per_mib_freed": {
            c: (median[c]["step"] - keep) / ((peaks["keep"] - peaks[c]) / 2**20)
            for c in names
            if c != "keep" and peaks["keep"] > peaks[c]
        },
    }


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med, peaks = result["median_s"], result["act_peak_bytes"]
    names = list(med)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(names, [med[n]["fwd"] for n in names], label="forward")
    ax.bar(names, [med[n]["bwd"] for n in names], bottom=[med[n]["fwd"] for n in names], label="backward")
    for i, n in enumerate(names):
        ax.text(i, med[n]["step"], f"{peaks[n] / 2**20:.0f} MiB", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("median seconds per step (label: activation peak)")
    c = result["config"]
    ax.set_title(f"{c['model']} {c['batch']}x{c['seq_len']}, {c['backend']}: swap {c['swapped_blocks']} blocks "
                 f"vs partitioner {c['partitioner_budget']}", fontsize=9)  # fmt: skip
    ax.legend()
    fig.tight_layout()
    savefig(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=2, help="blocks whose saved sets are swapped whole")
    ap.add_argument("--tiers", nargs="+", default=["nvme", "dram"], choices=["nvme", "dram"])
    ap.add_argument(
        "--partitioner",
        type=float,
        default=0.4145,
        help="the partitioner's activation_memory_budget (default: the one benchmarks/activations.py gave it at "
        "the 50%% budget, its compile_budget_fraction)",
    )
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(RESULTS, "compile_swap_cost"))
    args = ap.parse_args(argv)
    result = run(blocks=args.blocks, tiers=args.tiers, partitioner=args.partitioner, rounds=args.rounds,
                 steps=args.steps)  # fmt: skip
    write_json(args.out + ".json", result)
    plot(result, args.out + ".png")
    for c, s in result["added_s"].items():
        mib = result["bytes_swapped_per_step"].get(c, 0) / 2**20
        freed = (result["act_peak_bytes"]["keep"] - result["act_peak_bytes"][c]) / 2**20
        progress(f"{c}: +{1e3 * s:.0f} ms/step, {mib:.1f} MiB swapped/step, {freed:.1f} MiB of peak freed")
    progress(f"wrote {args.out}.json/.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
