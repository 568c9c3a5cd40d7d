"""What does memtier's runtime add on top of torch.compile when its plan is the compiler's own?

At a budget where memtier's best plan keeps every block at one partitioner budget (the 75% row of
`benchmarks/activations.py`: the saved set the partitioner alone picks), "memtier + compile" and "compile
with activation_memory_budget" run the same graphs; what can differ is memtier's runtime around them
(`offload.apply`: the compiled-block wrapper, its config contexts, the hooks). One process, one model, the
three configurations stepped in alternating rounds (each round: re-install, 1 warm-up step, `--steps` timed
steps), so load drifting on a shared machine hits all three:

- ``memtier``: `offload.apply` of a keep-all plan whose workload carries the compile setting;
- ``compile``: every block's forward under `torch.compile` with the budget patched
  (`benchmarks.activations_torch.compiled_blocks`, the activations benchmark's ``compile_budget``);
- ``eager``: no compile, no offload.

Reported: per configuration the median and fastest step, and per round the ratio memtier / compile
(median of the round's steps), with their median and min–max.

    .venv/bin/python benchmarks/compile_overhead.py            # llama-20m 2x256, inductor, budget 0.6958
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
from typing import Any

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import torch  # noqa: E402

from benchmarks.activations import RESULTS, parse_args  # noqa: E402
from benchmarks.activations_trainer import bench_plan, prepared, progress  # noqa: E402
from launch.measure.record import savefig, write_json  # noqa: E402

CONFIGS = ("memtier", "compile", "eager")


def run(budget: float, rounds: int, steps: int, backend: str) -> dict[str, Any]:
    import offload
    from benchmarks.activations_compile import compiled_plan
    from benchmarks.activations_torch import compiled_blocks
    from offload.activations import CompileOptions
    from planner.plan import ActivationPolicy

    cfg = parse_args(["--out", os.path.join(RESULTS, "compile_overhead")])
    spec, tr, _loss = prepared(cfg)
    plan = compiled_plan(
        bench_plan(spec, cfg, tuple(ActivationPolicy(layer=i) for i in range(len(tr.blocks)))),
        CompileOptions(backend=backend, activation_memory_budget=budget),
    )

    def installed(name: str) -> Any:
        torch._dynamo.reset()  # each configuration compiles its own graphs
        if name == "memtier":
            return offload.apply(tr.model, None, plan)
        if name == "compile":
            return compiled_blocks(list(tr.blocks), backend=backend, budget=budget)
        return contextlib.nullcontext()

    times: dict[str, list[list[float]]] = {c: [] for c in CONFIGS}
    for r in range(rounds):
        order = CONFIGS if r % 2 == 0 else CONFIGS[::-1]
        for name in order:
            with installed(name):
                tr.step()  # warm-up (compiles)
                times[name].append([tr.step() for _ in range(steps)])
            progress(f"round {r + 1}/{rounds} {name}: {statistics.median(times[name][-1]):.3f} s/step")
    torch._dynamo.reset()
    ratios = [
        statistics.median(m) / statistics.median(c)
        for m, c in zip(times["memtier"], times["compile"], strict=True)
    ]
    flat = {c: [t for rnd in v for t in rnd] for c, v in times.items()}
    return {
        "question": "memtier's runtime on compiled blocks vs torch.compile alone, same partitioner budget, keep-all",
        "config": {
            "model": spec.name,
            "batch": cfg.batch,
            "seq_len": cfg.seq_len,
            "threads": cfg.threads,
            "backend": backend,
            "partitioner_budget": budget,
            "rounds": rounds,
            "steps_per_round": steps,
            "loss": f"chunked({cfg.loss_chunk})",
        },  # fmt: skip
        "step_times_s": times,
        "median_s": {c: statistics.median(v) for c, v in flat.items()},
        "fastest_s": {c: min(v) for c, v in flat.items()},
        "memtier_over_compile_per_round": ratios,
        "memtier_over_compile": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
    }


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rounds in result["step_times_s"].items():
        ax.plot(range(1, len(rounds) + 1), [statistics.median(r) for r in rounds], marker="o", label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("median step (s)")
    c = result["config"]
    ax.set_title(
        f"{c['model']} {c['batch']}x{c['seq_len']}, {c['backend']} at budget {c['partitioner_budget']}"
    )
    ax.legend()
    fig.tight_layout()
    savefig(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=0.6958, help="the partitioner's activation_memory_budget")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per configuration per round")
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--out", default=os.path.join(RESULTS, "compile_overhead"))
    args = ap.parse_args(argv)
    result = run(args.budget, args.rounds, args.steps, args.backend)
    write_json(args.out + ".json", result)
    plot(result, args.out + ".png")
    r = result["memtier_over_compile"]
    progress(
        f"memtier / compile per round: median {r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f}); wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
