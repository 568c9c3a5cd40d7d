"""`memtier plan`: search layouts for a model, cluster and batch; write plan.json and launchable configs."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

from launch.estimate import modes_from_args, workload_from_args
from launch.specs import cluster_from_arg, model_from_arg
from planner.emit import write_outputs
from planner.errors import InfeasibleError, SpecError
from planner.planning import PlanResult, make_plan
from planner.search import Candidate, SearchSpace
from planner.units import UnitError, fmt_bytes, parse_bytes
from planner.workload import Workload, partitioner_modes


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
        vocab_parallel=getattr(args, "vocab_parallel", False),
        data_parallel_only=dp_only,
        # ZeRO partitioning runs on the DeepSpeed engine only
        zero_stages=(0, 1, 2, 3) if not dp_only or args.engine == "deepspeed" else (0,),
    )
    budget = _budget(args.budget)
    result = _fastest_mode(
        [(w, s) for m in modes_from_args(args, workload, cluster.device.kind)
         for w in partitioner_modes(m, cluster.device.partitioner_budgets(m.compile))
         for s in _mode_spaces(w, space, cluster.world_size)],
        lambda w, s: make_plan(
            model, cluster, w, budget=budget, space=s, seed=args.seed,
            time_limit_s=args.time_limit, engine=args.engine,
        ),
    )  # fmt: skip
    plan, workload = result.plan, result.plan.workload
    probed = cluster.device.partitioner_budgets(workload.compile)
    if (
        probed and getattr(args, "compile_memory_budget", None) is None
    ):  # the planner chose the partitioner's budget
        plan = plan.replace(notes=(*plan.notes, _partitioner_note(workload, probed)))
    if getattr(args, "no_checksum", False):
        plan = plan.replace(tiers=tuple(dataclasses.replace(t, checksum=False) for t in plan.tiers))
    search = result.search
    out: dict[str, Any] = {
        "model": model.name,
        "cluster": cluster.name,
        "world_size": cluster.world_size,
        "global_batch": workload.global_batch,
        "seq_len": workload.seq_len,
        "mode": workload.mode(),
        "breakdown": result.memory.by_category(),
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


def _partitioner_note(workload: Workload, probed: tuple[float, ...]) -> str:
    return (
        f"partitioner budget {workload.compile_memory_budget:g} (compile's activation_memory_budget in every "
        f"block): the fastest plan that fits among the budgets `memtier probe --compile` measured, "
        f"{', '.join(f'{b:g}' for b in probed)}"
    )


def _mode_spaces(workload: Workload, space: SearchSpace, world: int) -> list[SearchSpace]:
    """The search space, and for layer-wise updates also the micro-batch without accumulation.

    The layout search stops growing the micro-batch at the first that misses (memory grows with it), but
    layer-wise updates free the gradients only without accumulation: one micro-batch of the whole
    per-device batch can fit where smaller ones, which keep every gradient, do not."""
    spaces = [space]
    whole = workload.global_batch // world
    if workload.layerwise and space.micro_batch is None and whole > 1 and workload.global_batch % world == 0:
        spaces.append(dataclasses.replace(space, micro_batch=whole))
    return spaces


def _fastest_mode(
    modes: list[tuple[Workload, SearchSpace]], plan_for: Callable[[Workload, SearchSpace], PlanResult]
) -> PlanResult:
    """The fastest plan over the memory modes (`planner.workload.memory_modes`) and, for a compiled plan that
    leaves it open, the probed partitioner budgets (`partitioner_modes`); a tie goes to the earlier, more exact
    mode (the higher budget). When no mode fits, the error names what each mode's leanest layout needs."""
    best: PlanResult | None = None
    misses: list[tuple[str, InfeasibleError]] = []
    settled: set[tuple[Workload, SearchSpace]] = set()
    for w, space in modes:
        # a plan at a higher partitioner budget that adds nothing (no swap, recompute or offload) is the
        # fastest of its mode: a lower budget's blocks take at least as long (the probe's time ratios are
        # monotone), so the lower budgets are not planned
        key = (w.replace(compile_memory_budget=None), space)
        if key in settled:
            continue
        try:
            r = plan_for(w, space)
        except InfeasibleError as e:
            misses.append((w.mode() + (f", micro-batch {space.micro_batch}" if space.micro_batch else ""), e))
            continue
        if w.compile_memory_budget is not None and r.chosen.added_time_s == 0:
            settled.add(key)
        if best is None or r.chosen.time.step_s < best.chosen.time.step_s:
            best = r
    if best is not None:
        return best
    lean = min(misses, key=lambda m: m[1].need_bytes)
    if len(misses) == 1:
        raise lean[1]
    per_mode = "; ".join(f"{mode}: {fmt_bytes(e.need_bytes)}" for mode, e in misses)
    raise InfeasibleError(
        f"no memory mode fits; leanest per mode: {per_mode}. The leanest, {lean[0]}: {lean[1]}",
        need_bytes=lean[1].need_bytes,
        have_bytes=lean[1].have_bytes,
        alternatives=lean[1].alternatives,
    )


def render(r: dict[str, Any]) -> str:
    width = max([len("layout")] + [len(row["layout"]) for row in r["top"]])
    lines = [
        f"memtier plan: {r['model']} on {r['cluster']} ({r['world_size']} devices),"
        f" global batch {r['global_batch']} x seq {r['seq_len']}, budget {fmt_bytes(r['budget_bytes'])} per device",
        f"memory mode: {r['mode']}; #1 per device: "
        + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in r["breakdown"].items()),
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
