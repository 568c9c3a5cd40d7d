"""`memtier plan`: search layouts for a model, cluster and batch; write plan.json and launchable configs."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from launch.estimate import workload_from_args
from launch.specs import cluster_from_arg, model_from_arg
from planner.emit import write_outputs
from planner.errors import SpecError
from planner.planning import make_plan
from planner.search import Candidate, SearchSpace
from planner.units import UnitError, fmt_bytes, parse_bytes


def _budget(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        value = parse_bytes(text)
    except UnitError as e:
        raise SpecError(str(e), field="--budget") from None
    if value <= 0:
        raise SpecError(f"must be positive, got {text!r}", field="--budget")
    return value


def _row(c: Candidate) -> dict[str, Any]:
    t = c.time
    return {
        "layout": c.describe(),
        "dp": c.layout.dp,
        "tp": c.layout.tp,
        "pp": c.layout.pp,
        "cp": c.layout.cp,
        "micro_batch": c.layout.micro_batch,
        "grad_accum": c.layout.grad_accum,
        "zero_stage": c.layout.zero_stage,
        "stage_layers": list(c.layout.stage_layers),
        "activations": c.activations.strategy,
        "optimizer": c.optimizer.strategy,
        "step_s": t.step_s,
        "tflops_per_device": t.tflops_per_device,
        "mfu": t.mfu,
        "peak_bytes": c.peak_bytes,
        "bottleneck": t.bottleneck,
        "breakdown_s": t.breakdown(),
        "mapping_gain": c.mapping.gain if c.mapping else None,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = model_from_arg(args.model)
    cluster = cluster_from_arg(args.cluster, args.nodes)
    default_dtype = "fp32" if cluster.device.kind == "cpu" else "bf16"
    # without --global-batch: one sequence (or micro-batch) per device
    if args.global_batch is None:
        args = argparse.Namespace(
            **{**vars(args), "global_batch": cluster.world_size * (args.micro_batch or 1)}
        )
    workload = workload_from_args(args, model, 1, default_dtype)
    if args.time_limit <= 0:
        raise SpecError(f"must be positive, got {args.time_limit}", field="--time-limit")
    dp_only = getattr(args, "data_parallel_only", False)
    space = SearchSpace(
        micro_batch=args.micro_batch,
        virtual_stages=tuple(args.interleave),
        data_parallel_only=dp_only,
        # ZeRO partitioning runs on the DeepSpeed engine only
        zero_stages=(0, 1, 2, 3) if not dp_only or args.engine == "deepspeed" else (0,),
    )
    result = make_plan(
        model,
        cluster,
        workload,
        budget=_budget(args.budget),
        space=space,
        seed=args.seed,
        time_limit_s=args.time_limit,
        engine=args.engine,
    )
    plan = result.plan
    if getattr(args, "no_checksum", False):
        plan = plan.replace(tiers=tuple(dataclasses.replace(t, checksum=False) for t in plan.tiers))
    search = result.search
    out: dict[str, Any] = {
        "model": model.name,
        "cluster": cluster.name,
        "world_size": cluster.world_size,
        "global_batch": workload.global_batch,
        "seq_len": workload.seq_len,
        "budget_bytes": search.budget_bytes,
        "top": [_row(c) for c in search.top(args.top)],
        "chosen": _row(result.chosen),
        "why": list(result.why),
        "search": {
            "shapes": search.shapes,
            "configurations": search.configurations,
            "pruned_by_states": search.pruned_by_states,
            "timed": search.timed,
            "seconds": search.seconds,
        },
        "plan": plan.to_dict(),
    }
    if args.out:
        out["outputs"] = write_outputs(plan, args.out)
    return out


def render(r: dict[str, Any]) -> str:
    width = max([len("layout")] + [len(row["layout"]) for row in r["top"]])
    lines = [
        f"memtier plan: {r['model']} on {r['cluster']} ({r['world_size']} devices),"
        f" global batch {r['global_batch']} x seq {r['seq_len']}, budget {fmt_bytes(r['budget_bytes'])} per device",
        "",
        f"{'#':>2}  {'layout':<{width}} {'step s':>8} {'TFLOP/s':>8} {'MFU':>6} {'peak/dev':>10}  bottleneck",
    ]
    for i, row in enumerate(r["top"], 1):
        lines.append(
            f"{i:>2}  {row['layout']:<{width}} {row['step_s']:>8.3f} {row['tflops_per_device']:>8.1f}"
            f" {100 * row['mfu']:>5.1f}% {fmt_bytes(row['peak_bytes']):>10}  {row['bottleneck']}"
        )
    lines += ["", "why #1:"]
    lines += [f"  - {w}" for w in r["why"]]
    if "outputs" in r:
        lines += ["", "wrote:"]
        lines += [f"  {p}" for p in r["outputs"].values()]
    return "\n".join(lines)
