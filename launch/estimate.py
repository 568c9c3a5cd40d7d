"""`memtier estimate`: validate the specs and a layout, then report the cost models' breakdown."""

from __future__ import annotations

import argparse
import math
from typing import Any

from launch.specs import cluster_from_arg, model_from_arg
from planner.cluster import ClusterSpec
from planner.errors import LayoutError, SpecError
from planner.estimate import estimate
from planner.memory import MemoryOptions, Offload
from planner.model import ModelSpec
from planner.model_state import ElementBytes, StreamedState, plan_model_state, stream_refusal
from planner.plan import Layout
from planner.units import fmt_bytes, fmt_count, fmt_rate
from planner.workload import OptimizerSpec, StateBits, Workload, memory_modes

# --state-bits: "any" lets `memtier plan` search; a single estimate starts unquantized
_STATE_BITS: dict[str, StateBits] = {"0": 0, "8": 8, "4": 4, "any": 0}


def workload_from_args(args: argparse.Namespace, model: ModelSpec, dp: int, default_dtype: str) -> Workload:
    seq = args.seq or min(2048, model.max_position_embeddings)
    mb = args.micro_batch or 1
    clip = getattr(args, "max_grad_norm", 1.0)  # `memtier plan --max-grad-norm`; estimate has no such flag
    if not (math.isfinite(clip) and clip >= 0):
        raise SpecError(f"must be a finite number >= 0 (0: no clipping), got {clip}", field="--max-grad-norm")
    layerwise = getattr(args, "layerwise", "off") == "on"
    bits = getattr(args, "state_bits", "0")
    try:
        return Workload(
            global_batch=args.global_batch or mb * dp,
            micro_batch=mb,
            seq_len=seq,
            dtype=args.dtype or default_dtype,
            precision="pure" if getattr(args, "precision", "mixed") == "pure" else "mixed",
            layerwise=layerwise,
            optimizer=OptimizerSpec(kind=args.optimizer, rank=args.rank, state_bits=_STATE_BITS[bits]),
            flash_attention=not args.no_flash,
            max_grad_norm=0.0 if layerwise else clip,
            **_lora_from_args(args),
            **_compile_from_args(args),
        )
    except SpecError as e:  # the Workload checks its fields; name the flag that set one
        if e.field in _FLAG_OF:
            raise SpecError(e.message, field=_FLAG_OF[e.field]) from None
        raise


# Workload fields set by a command-line flag of another name
_FLAG_OF = {"compile_memory_budget": "--compile-memory-budget", "compile": "--compile"}


def _compile_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """`--compile` / `--compile-memory-budget` as Workload fields (none when the command has no such flags);
    the Workload checks them."""
    backend = getattr(args, "compile", "") or ""
    budget = getattr(args, "compile_memory_budget", None)
    return {"compile": backend, "compile_memory_budget": budget} if backend or budget is not None else {}


def _lora_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """`--lora-rank` / `--lora-targets` as Workload fields (none when the command has no such flags)."""
    rank = getattr(args, "lora_rank", 0) or 0
    if rank < 0:
        raise SpecError(f"must be >= 0 (0: full fine-tuning), got {rank}", field="--lora-rank")
    targets = tuple(t.strip() for t in getattr(args, "lora_targets", "q_proj,v_proj").split(",") if t.strip())
    return {"lora_rank": rank, "lora_targets": targets} if rank else {}


def modes_from_args(args: argparse.Namespace, workload: Workload, device_kind: str) -> tuple[Workload, ...]:
    """The memory modes the flags ask for (`any`: every one the device runs), most exact first."""
    prec = getattr(args, "precision", "mixed")
    lw = getattr(args, "layerwise", "off")
    bits = getattr(args, "state_bits", "0")
    return memory_modes(
        workload,
        precision=("mixed", "pure") if prec == "any" else (workload.precision,),
        layerwise=(False, True) if lw == "any" else (workload.layerwise,),
        state_bits=(0, 8, 4) if bits == "any" else (workload.optimizer.state_bits,),
        device_kind=device_kind,
    )


def layout_from_args(args: argparse.Namespace, cluster: ClusterSpec) -> Layout:
    tp, pp, cp = args.tp or 1, args.pp or 1, args.cp or 1
    dp = args.dp
    if dp is None:
        if cluster.world_size % (tp * pp * cp):
            raise LayoutError(
                f"world_size({cluster.world_size}) % (tp({tp}) * pp({pp}) * cp({cp})) = "
                f"{cluster.world_size % (tp * pp * cp)} != 0",
                field="layout",
            )
        dp = cluster.world_size // (tp * pp * cp)
    return Layout(tp=tp, pp=pp, cp=cp, dp=dp, zero_stage=args.zero, sequence_parallel=args.sequence_parallel)


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = model_from_arg(args.model)
    cluster = cluster_from_arg(args.cluster, args.nodes)
    layout = layout_from_args(args, cluster)
    default_dtype = "fp32" if cluster.device.kind == "cpu" else "bf16"
    workload = workload_from_args(args, model, layout.dp, default_dtype)
    mb = workload.micro_batch
    per = mb * layout.dp
    layout = Layout(
        **{**layout.__dict__, "micro_batch": mb, "grad_accum": max(1, workload.global_batch // per)}
    )
    offload = Offload(
        optimizer=args.offload != "none", params=args.offload == "optimizer+params", tier=args.offload_tier
    )
    options = MemoryOptions(recompute=args.recompute, offload=offload, loss_chunk_tokens=args.chunked_loss)
    est = estimate(model, cluster, workload, layout, options)
    mem, t = est.memory, est.time
    # the same layout under every memory mode (precision, state bits, layer-wise), as `memtier plan` searches
    every = argparse.Namespace(**{**vars(args), "precision": "any", "layerwise": "any", "state_bits": "any"})
    modes = []
    for w in modes_from_args(every, workload, cluster.device.kind):
        m = estimate(model, cluster, w, layout, options)
        modes.append({"mode": w.mode(), **m.memory.by_category(), "fits": m.fits, "step_s": m.time.step_s})
    return {
        "params": model.params,
        "model": model.summary(),
        "cluster": cluster.summary(),
        "workload": {
            "global_batch": workload.global_batch,
            "micro_batch": mb,
            "seq_len": workload.seq_len,
            "dtype": workload.dtype,
            "optimizer": workload.optimizer.kind,
            "mode": workload.mode(),
        },
        "layout": {**layout.__dict__, "describe": layout.describe(), "recompute": args.recompute},
        "memory": {
            "per_device": mem.by_category(),
            "per_tier": mem.by_tier(),
            "peak_phase": mem.peak_phase,
            "budget_bytes": est.budget_bytes,
            "fits": est.fits,
            "detail": mem.detail,
            "modes": modes,
        },
        "time": {
            "step_s": t.step_s,
            "breakdown_s": t.breakdown(),
            "bottleneck": t.bottleneck,
            "links": t.links,
        },
        "throughput": {
            "tflops_per_device": t.tflops_per_device,
            "tokens_per_s": workload.tokens_per_step / t.step_s,
        },
        "mfu": t.mfu,
        "hfu": t.hfu,
        **({"trace": trace_table(args.model, model, workload)} if getattr(args, "trace", False) else {}),
        **(
            {
                "model_state": streamed_state(
                    model, cluster, workload, layout, args.chunked_loss, est.budget_bytes
                )
            }
            if (args.offload == "optimizer+params" or not est.fits)
            and stream_refusal(cluster, workload) is None
            else {}
        ),
    }


def streamed_state(
    model: ModelSpec, cluster: ClusterSpec, workload: Workload, layout: Layout, chunk: int, budget: int
) -> dict[str, Any]:
    """The model state placed across the tiers and streamed per block (`planner.model_state`), at this
    micro-batch: per tier, device and host peaks, step time; or by how much it misses."""
    found = plan_model_state(
        model,
        cluster,
        workload,
        budget_bytes=budget,
        micro_batches=[layout.micro_batch],
        loss_chunk_tokens=chunk,
    )
    if not isinstance(found, StreamedState):
        return {
            "fits": False,
            "where": found.where,
            "need_bytes": found.need_bytes,
            "have_bytes": found.have_bytes,
        }
    eb = ElementBytes.of(workload)
    return {
        "fits": True,
        "level": found.level,
        "activations": found.activation_strategy,
        "state_bytes_by_tier": found.state.bytes_by_tier(
            param_bytes=eb.params, master=bool(eb.master), moment_bytes=eb.moments
        ),
        "state_by_kind": _by_kind(found, eb),
        "device_peak_bytes": found.memory.total,
        "host_peak_bytes": found.host_peak_bytes,
        "staging_bytes": found.state.staging_bytes,
        "step_s": found.time.step_s,
        "tflops_per_device": found.time.tflops_per_device,
        "breakdown_s": found.time_breakdown,
    }


def _by_kind(found: StreamedState, eb: ElementBytes) -> dict[str, dict[str, int]]:
    """Bytes of each kind of state per tier (the device's at full size, as the tiers hold them)."""
    out: dict[str, dict[str, int]] = {}
    for kind in ("params", "master", "grads", "moments"):
        if kind == "master" and not eb.master:
            continue
        per = eb.kind(kind)
        row: dict[str, int] = {}
        for g in found.state.groups:
            tier = g.tiers()[kind]
            row[tier] = row.get(tier, 0) + int(round(g.numel * per))
        out[kind] = row
    return out


def trace_table(ref: str, spec: ModelSpec, workload: Workload) -> dict[str, Any]:
    """Per-module parameters and saved-activation bytes of one micro-batch, traced on the meta device
    (planner.trace): the model's top-level modules and the children of its first repeated block."""
    import torch

    from launch.specs import build_module, is_factory, module_for_spec
    from planner.trace import trace_module

    module = build_module(ref) if is_factory(ref) else module_for_spec(spec)
    module.train()
    # mixed precision: the weights and activations in the workload's dtype (fp32 master copies are model
    # states, counted by the memory model)
    module.to({"bf16": torch.bfloat16, "fp16": torch.float16}.get(workload.dtype, torch.float32))
    ids = torch.zeros(workload.micro_batch, workload.seq_len, dtype=torch.long, device="meta")
    tr = trace_module(module, {"input_ids": ids, "labels": ids})
    # the first repeated block: the first module whose class recurs num_layers times
    kinds = [m.kind for m in tr.modules]
    block = next((m for m in tr.modules if kinds.count(m.kind) == spec.num_layers), None)
    shown = [m for m in tr.modules if m.name and m.name.count(".") <= 1 and m.kind != "ModuleList"]
    if block is not None:
        shown += [block, *tr.children_of(block.name)]
    rows = [
        {"module": m.name, "kind": m.kind, "params": m.params, "saved_bytes": m.saved_bytes, "calls": m.calls}
        for m in shown
    ]
    return {"params": tr.params, "saved_bytes": tr.saved_bytes, "saved_by_dtype": dict(tr.saved_by_dtype),
            "modules": rows}  # fmt: skip


def render(r: dict[str, Any]) -> str:
    m, c, w = r["model"], r["cluster"], r["workload"]
    lines = [
        f"model   {m['name']} ({m['family']}): {fmt_count(m['params'])} parameters ({m['params']:,} exact)",
        f"        {m['layers']} layers, hidden {m['hidden']}, heads {m['heads']} (kv {m['kv_heads']}, dim {m['head_dim']}),"
        f" ffn {m['ffn']}, vocab {m['vocab']}{', tied embeddings' if m['tied_embeddings'] else ''}",
        f"cluster {c['name']}: {c['nodes']} node(s) x {c['devices_per_node']} {c['device']}"
        f" ({fmt_bytes(c['device_memory_bytes'])} each), {c['world_size']} devices",
        f"        links: intra-node {fmt_rate(c['intra_node_bandwidth'])}, inter-node {fmt_rate(c['inter_node_bandwidth'])},"
        f" {c['link_overrides']} per-link override(s)",
    ]
    for t in c["host_tiers"]:
        lines.append(
            f"        host {t['kind']:5s} {fmt_bytes(t['capacity_bytes']):>10s}"
            f"  read {fmt_rate(t['read_bw'])}  write {fmt_rate(t['write_bw'])}"
        )
    lines.append(
        f"workload global batch {w['global_batch']} x seq {w['seq_len']}, micro-batch {w['micro_batch']},"
        f" {w['dtype']}, {w['optimizer']}; layout {r['layout']['describe']}, recompute {r['layout']['recompute']}"
    )
    mem = r["memory"]
    lines.append("")
    lines.append(f"memory per device (peak in {mem['peak_phase']}):")
    for k, v in mem["per_device"].items():
        lines.append(f"  {k:18s} {fmt_bytes(v):>12s}")
    for tier, v in mem["per_tier"].items():
        if tier != "device":
            lines.append(f"  offloaded to {tier:5s} {fmt_bytes(v):>12s}")
    verdict = "fits" if mem["fits"] else "DOES NOT FIT"
    lines.append(f"  budget             {fmt_bytes(mem['budget_bytes']):>12s}  ({verdict})")
    lines += ["", f"per memory mode ({w['optimizer']}, same layout):", _mode_header()]
    lines += [_mode_row(row) for row in mem["modes"]]
    t = r["time"]
    lines.append("")
    lines.append(f"step time {t['step_s']:.3f} s (bottleneck: {t['bottleneck']}):")
    for k, v in t["breakdown_s"].items():
        lines.append(f"  {k:22s} {v:10.4f} s")
    th = r["throughput"]
    lines.append(
        f"throughput {th['tflops_per_device']:.1f} TFLOP/s per device, {th['tokens_per_s']:,.0f} tokens/s,"
        f" MFU {100 * r['mfu']:.1f}%, HFU {100 * r['hfu']:.1f}%"
    )
    if "model_state" in r:
        lines += ["", *_model_state_lines(r["model_state"])]
    if "trace" in r:
        tr = r["trace"]
        lines.append("")
        lines.append(
            f"traced on the meta device (one micro-batch): {fmt_count(tr['params'])} parameters,"
            f" {fmt_bytes(tr['saved_bytes'])} saved for backward"
        )
        lines.append(f"  {'module':40s} {'kind':26s} {'params':>10s} {'saved':>12s}")
        for m in tr["modules"]:
            lines.append(
                f"  {m['module']:40s} {m['kind']:26s} {fmt_count(m['params']):>10s} {fmt_bytes(m['saved_bytes']):>12s}"
            )
    return "\n".join(lines)


def _model_state_lines(ms: dict[str, Any]) -> list[str]:
    if not ms["fits"]:
        return [
            f"model state streamed per block: does not fit the {ms['where']} ({fmt_bytes(ms['need_bytes'])}"
            f" needed, {fmt_bytes(ms['have_bytes'])} there)"
        ]
    lines = [
        f"model state streamed per block ({ms['level']}, activations {ms['activations']}):",
        f"  {'kind':10s}" + "".join(f" {t:>12s}" for t in ms["state_bytes_by_tier"]),
    ]
    for kind, row in ms["state_by_kind"].items():
        lines.append(
            f"  {kind:10s}" + "".join(f" {fmt_bytes(row.get(t, 0)):>12s}" for t in ms["state_bytes_by_tier"])
        )
    lines.append(
        f"  {'total':10s}" + "".join(f" {fmt_bytes(v):>12s}" for v in ms["state_bytes_by_tier"].values())
    )
    lines.append(
        f"  device peak {fmt_bytes(ms['device_peak_bytes'])}, host peak {fmt_bytes(ms['host_peak_bytes'])}"
        f" (staging {fmt_bytes(ms['staging_bytes'])}); step {ms['step_s']:.3f} s,"
        f" {ms['tflops_per_device']:.1f} TFLOP/s per device"
    )
    lines += [f"  {k:28s} {v:10.4f} s" for k, v in ms["breakdown_s"].items() if v]
    return lines


_MODE_COLS = ("parameters", "gradients", "optimizer_states", "activations", "buffers", "total")


def _mode_header() -> str:
    labels = ("params", "grads", "opt states", "acts", "buffers", "total")
    return f"  {'mode':38s}" + "".join(f" {c:>10s}" for c in labels) + "  fits"


def _mode_row(row: dict[str, Any]) -> str:
    cells = "".join(f" {fmt_bytes(row[c]):>10s}" for c in _MODE_COLS)
    return f"  {row['mode']:38s}{cells}  {'yes' if row['fits'] else 'no'}"


def plot(result: dict[str, Any], path: str) -> None:
    """The per-device memory breakdown as a stacked bar, beside the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from planner.schema import atomic_write_bytes

    cats = ["parameters", "gradients", "optimizer_states", "activations", "buffers"]
    per = result["memory"]["per_device"]
    fig, ax = plt.subplots(figsize=(5, 5))
    bottom = 0.0
    for cat in cats:
        gib = per[cat] / 2**30
        ax.bar([result["layout"]["describe"]], [gib], bottom=bottom, label=cat)
        bottom += gib
    ax.axhline(result["memory"]["budget_bytes"] / 2**30, color="k", linestyle="--", label="budget")
    ax.set_ylabel("GiB per device")
    ax.set_title(f"{result['model']['name']} on {result['cluster']['name']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
