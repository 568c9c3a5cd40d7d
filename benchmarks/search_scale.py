"""Does `memtier plan` answer on a 1024-GPU cluster within a minute on this 2-core machine, deterministically?

GPT-3 175B on 128 DGX A100 nodes (1024 GPUs), global batch 1536, sequence 2048: the full
planner (layout search with memory pruning, rank-mapping search on the best shapes,
Plan assembly) is timed `--repeats` times with one seed; every repeat must return the
same plan. As a baseline measured in the same run, an exhaustive evaluation with the
same cost models times every (shape, split, ZeRO, optimizer placement, micro-batch,
activation policy) without pruning; the pruned search must find its optimum (before
rank mapping) and the ratio of their times is reported. The target (60 s) is a ratio
too: planner seconds / 60.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.measure.record import savefig, write_json  # noqa: E402
from planner.estimate import budget_bytes  # noqa: E402
from planner.mapping import LinkEvaluator, default_mapping  # noqa: E402
from planner.plan import Layout  # noqa: E402
from planner.planning import make_plan  # noqa: E402
from planner.presets import MODEL_PRESETS, cluster_preset_names, resolve_cluster  # noqa: E402
from planner.search import SearchSpace, micro_batches, parallel_shapes, stage_splits, zero_choices  # noqa: E402
from planner.steptime import estimate_step_time  # noqa: E402
from planner.strategies import ACTIVATION_BASELINES, OPTIMIZER_BASELINES, StrategyInput  # noqa: E402
from planner.workload import Workload  # noqa: E402

TARGET_S = 60.0


def exhaustive(model, cluster, workload, budget: int, progress) -> tuple[float, str, int]:
    """Every combination timed, no pruning; returns (best step s, its description, combinations)."""
    space = SearchSpace()
    best: tuple[float, str] | None = None
    count = 0
    shapes = list(parallel_shapes(model, cluster, workload, space))
    for i, (dp, tp, pp, cp) in enumerate(shapes):
        if i % max(1, len(shapes) // 5) == 0:
            progress(f"  exhaustive: shape {i + 1}/{len(shapes)}")
        links = LinkEvaluator(Layout(dp=dp, tp=tp, pp=pp, cp=cp), cluster).links(
            default_mapping(cluster.world_size)
        )
        for _, split in stage_splits(model, workload, pp):
            for zero in zero_choices(space, pp=pp):
                for opt_stage in OPTIMIZER_BASELINES:
                    if zero > 0 and dp * cp == 1 and opt_stage.name == "resident":
                        continue
                    for mb in micro_batches(workload, dp, space):
                        layout = Layout(dp=dp, tp=tp, pp=pp, cp=cp, micro_batch=mb,
                                        grad_accum=workload.global_batch // (dp * mb), zero_stage=zero,
                                        sequence_parallel=tp > 1, stage_layers=split)  # fmt: skip
                        inp = StrategyInput(model=model, cluster=cluster, workload=workload, layout=layout,
                                            budget_bytes=budget, links=links)  # fmt: skip
                        if not opt_stage.applies(inp):
                            continue
                        opt = opt_stage.solve(inp)
                        for act_stage in ACTIVATION_BASELINES:
                            a_inp = dataclasses.replace(inp, options=opt.options)
                            if not act_stage.applies(a_inp):
                                continue
                            count += 1
                            act = act_stage.solve(a_inp)
                            if not (opt.fits and act.fits):
                                continue
                            t = estimate_step_time(
                                model, cluster, workload, layout, act.options, links=links
                            ).step_s
                            if best is None or t < best[0]:
                                best = (t, f"{layout.describe()} {act.strategy} opt:{opt.strategy}")
    assert best is not None
    return best[0], best[1], count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODEL_PRESETS), default="gpt3-175b")
    ap.add_argument("--cluster", choices=cluster_preset_names()[:-1], default="dgx-a100-8x80g")
    ap.add_argument("--nodes", type=int, default=128)
    ap.add_argument("--global-batch", type=int, default=1536)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-baseline", action="store_true", help="skip the exhaustive baseline")
    ap.add_argument("--quick", action="store_true", help="16 nodes (128 GPUs), one repeat")
    ap.add_argument(
        "--out", default=None, help="results prefix (default benchmarks/results/search_scale[_quick])"
    )
    args = ap.parse_args()
    if args.quick:
        args.nodes, args.repeats = 16, 1
    out = args.out or os.path.join("benchmarks", "results", "search_scale" + ("_quick" if args.quick else ""))

    def progress(msg: str) -> None:
        print(msg, flush=True)

    model = MODEL_PRESETS[args.model]
    cluster = resolve_cluster(args.cluster, nodes=args.nodes)
    w = Workload(global_batch=args.global_batch, seq_len=args.seq)
    print(
        f"{model.name} on {cluster.name}: {cluster.world_size} devices, batch {w.global_batch} x {w.seq_len}"
    )

    runs = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        res = make_plan(model, cluster, w, seed=args.seed, progress=progress)
        seconds = time.perf_counter() - t0
        s = res.search
        runs.append({
            "seconds": seconds, "search_seconds": s.seconds, "mapping_seconds": s.mapping_seconds,
            "layout": res.chosen.describe(), "rank_to_device_head": list(res.plan.layout.rank_to_device[:16]),
            "rank_to_device": res.plan.layout.rank_to_device, "step_s": res.plan.predicted.step_time_s,
            "tflops_per_device": res.plan.predicted.tflops_per_device, "mfu": res.plan.predicted.mfu,
            "shapes": s.shapes, "configurations": s.configurations, "pruned_by_states": s.pruned_by_states,
            "solved": s.solved, "timed": s.timed,
            "unmapped_best_s": min(c.mapping.default_step_s if c.mapping else c.step_s for c in s.ranked),
        })  # fmt: skip
        print(f"repeat {r + 1}: {seconds:.2f} s -> {res.chosen.describe()}, {res.plan.predicted.step_time_s:.3f} s/step,"
              f" {res.plan.predicted.tflops_per_device:.1f} TFLOP/s per GPU", flush=True)  # fmt: skip
    deterministic = all(
        (x["layout"], x["rank_to_device"], x["step_s"])
        == (runs[0]["layout"], runs[0]["rank_to_device"], runs[0]["step_s"])
        for x in runs
    )
    for x in runs:
        del x["rank_to_device"]
    worst = max(x["seconds"] for x in runs)
    summary = {
        "planner_seconds_max": worst,
        "target_seconds": TARGET_S,
        "ratio_to_target": worst / TARGET_S,
        "deterministic": deterministic,
    }
    ranked = res.search.ranked
    if not args.no_baseline:
        print("exhaustive baseline (no pruning, default rank order):", flush=True)
        t0 = time.perf_counter()
        best_s, best_desc, count = exhaustive(model, cluster, w, budget_bytes(cluster, w), progress)
        ex_seconds = time.perf_counter() - t0
        summary.update(
            exhaustive_seconds=ex_seconds,
            exhaustive_combinations=count,
            exhaustive_best_step_s=best_s,
            exhaustive_best=best_desc,
            pruned_search_matches_exhaustive=abs(runs[0]["unmapped_best_s"] - best_s) <= 1e-9 * best_s,
            # layout search alone (rank mapping excluded: the exhaustive baseline does none)
            speedup_over_exhaustive=ex_seconds / (runs[0]["search_seconds"] - runs[0]["mapping_seconds"]),
        )
        print(f"exhaustive: {count} combinations in {ex_seconds:.2f} s, best {best_desc} {best_s:.3f} s;"
              f" pruned layout search {runs[0]['search_seconds'] - runs[0]['mapping_seconds']:.2f} s (x{summary['speedup_over_exhaustive']:.1f})")  # fmt: skip
    print(f"planner {worst:.2f} s = {summary['ratio_to_target']:.3f} of the {TARGET_S:.0f} s target;"
          f" deterministic: {deterministic}")  # fmt: skip
    write_json(out + ".json", {
        "config": vars(args), "model": model.summary(), "cluster": cluster.summary(), "summary": summary,
        "runs": runs,
        "ranked": [{"layout": c.describe(), "step_s": c.step_s, "tflops_per_device": c.time.tflops_per_device,
                    "peak_bytes": c.peak_bytes, "bottleneck": c.time.bottleneck} for c in ranked],
    })  # fmt: skip

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    labels = ["search", "rank mapping"] + (
        ["exhaustive\n(baseline)"] if "exhaustive_seconds" in summary else []
    )
    vals = [runs[0]["search_seconds"] - runs[0]["mapping_seconds"], runs[0]["mapping_seconds"]]
    if "exhaustive_seconds" in summary:
        vals.append(summary["exhaustive_seconds"])
    axes[0].bar(labels, vals, color=["tab:blue", "tab:cyan", "tab:gray"][: len(vals)])
    axes[0].axhline(TARGET_S, color="r", ls="--", label=f"target {TARGET_S:.0f} s")
    axes[0].set_ylabel("seconds (2-core machine)")
    axes[0].set_title(f"{model.name}, {cluster.world_size} GPUs")
    axes[0].legend()
    gib = [c.peak_bytes / 2**30 for c in ranked]
    axes[1].scatter(
        gib, [c.time.tflops_per_device for c in ranked], c=[c.layout.pp for c in ranked], cmap="viridis"
    )
    for c in ranked[:3]:
        axes[1].annotate(c.layout.describe().split(" mb")[0], (c.peak_bytes / 2**30, c.time.tflops_per_device),
                         fontsize=7)  # fmt: skip
    axes[1].set_xlabel("peak GiB per GPU")
    axes[1].set_ylabel("predicted TFLOP/s per GPU")
    axes[1].set_title("best variant of each shape (colour: pp)")
    fig.tight_layout()
    savefig(fig, out + ".png")
    print(f"wrote {out}.json and .png")


if __name__ == "__main__":
    main()
