"""Does the cost model predict this machine? Peak memory (goal ±10%) and step time (goal ±25%).

Real training steps of HF models (random init) on CPU, fp32, AdamW, with and without
full recompute, across batch sizes and sequence lengths: the peak of live tensors
(MemTracker) and the median step time, beside the planner's predictions. The time
model's peak and efficiency come from the probe, run first in the same process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.measure.probe import probe, to_cluster  # noqa: E402
from launch.measure.record import savefig, write_json  # noqa: E402
from planner.estimate import estimate  # noqa: E402
from planner.memory import MemoryOptions  # noqa: E402
from planner.model import ModelSpec  # noqa: E402
from planner.plan import Layout  # noqa: E402
from planner.presets import MODEL_PRESETS  # noqa: E402
from planner.workload import Workload  # noqa: E402

GPT2_20M = ModelSpec(name="gpt2-20m", family="gpt2", num_layers=6, hidden_size=384, num_heads=6, ffn_hidden_size=1536,
                     vocab_size=8192, max_position_embeddings=1024, position="learned", gated_mlp=False,
                     activation="gelu_new", norm="layernorm", tied_embeddings=True, qkv_bias=True,
                     attn_out_bias=True, mlp_bias=True)  # fmt: skip
MODELS = {
    "llama-20m": MODEL_PRESETS["llama-20m"],
    "gpt2-20m": GPT2_20M,
    "tiny-llama": MODEL_PRESETS["tiny-llama"],
}


def measure(spec: ModelSpec, b: int, s: int, recompute: str, steps: int) -> tuple[int, float]:
    from tests.helpers import hf_model, measure_step_peak

    model = hf_model(spec)
    if recompute == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # torch's fused CPU AdamW: the update the probe times and memtier's runtime uses (the default on
    # CPU is the per-tensor loop, several times slower on small tensors)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, spec.vocab_size, (b, s))
    peak = measure_step_peak(model, opt, ids)["Total"]
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return peak, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["llama-20m", "gpt2-20m"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--seqs", nargs="+", type=int, default=[256, 512])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny-llama only, 2 steps")
    ap.add_argument("--out", default="benchmarks/results/cost_model")
    args = ap.parse_args()
    if args.quick:
        args.models, args.steps = ["tiny-llama"], 2
    torch.set_num_threads(os.cpu_count() or 1)
    cluster = to_cluster(probe(quick=True))
    rows = []
    cases = [
        (m, b, s, rc) for m in args.models for b in args.batches for s in args.seqs for rc in ("none", "full")
    ]
    for i, (name, b, s, rc) in enumerate(cases, 1):
        spec = MODELS[name]
        peak, step_s = measure(spec, b, s, rc, args.steps)
        w = Workload(global_batch=b, micro_batch=b, seq_len=s, dtype="fp32")
        est = estimate(
            spec,
            cluster,
            w,
            Layout(micro_batch=b),
            MemoryOptions(recompute=rc, optimizer_impl="fused"),
        )
        row = {
            "model": name, "batch": b, "seq": s, "recompute": rc,
            "measured_peak_bytes": peak, "predicted_peak_bytes": est.memory.total,
            "memory_ratio": est.memory.total / peak,
            "measured_step_s": step_s, "predicted_step_s": est.time.step_s,
            "time_ratio": est.time.step_s / step_s,
        }  # fmt: skip
        rows.append(row)
        print(f"[{i}/{len(cases)}] {name} b{b} s{s} {rc:4s}: memory pred/meas {row['memory_ratio']:.3f},"
              f" time pred/meas {row['time_ratio']:.3f}", flush=True)  # fmt: skip
    mem_ok = sum(abs(r["memory_ratio"] - 1) <= 0.10 for r in rows)
    time_ok = sum(abs(r["time_ratio"] - 1) <= 0.25 for r in rows)
    summary = {"cases": len(rows), "memory_within_10pct": mem_ok, "time_within_25pct": time_ok,
               "gemm_fp32_flops": cluster.device.peak_flops["fp32"], "efficiency": cluster.device.efficiency,
               "block_overhead_s": cluster.device.block_overhead}  # fmt: skip
    print(f"memory within ±10%: {mem_ok}/{len(rows)}; time within ±25%: {time_ok}/{len(rows)}")
    write_json(args.out + ".json", {"config": vars(args), "summary": summary, "rows": rows})

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, key, band, unit in ((axes[0], "peak_bytes", 0.10, 2**20), (axes[1], "step_s", 0.25, 1.0)):
        meas = [r[f"measured_{key}"] / unit for r in rows]
        pred = [r[f"predicted_{key}"] / unit for r in rows]
        colors = ["tab:blue" if r["recompute"] == "none" else "tab:orange" for r in rows]
        ax.scatter(meas, pred, c=colors)
        hi = max(meas + pred) * 1.1
        ax.plot([0, hi], [0, hi], "k-", lw=0.8)
        ax.plot([0, hi], [0, hi * (1 + band)], "k--", lw=0.5)
        ax.plot([0, hi], [0, hi * (1 - band)], "k--", lw=0.5)
        ax.set_xlabel("measured " + ("MiB" if unit > 1 else "s"))
        ax.set_ylabel("predicted")
        ax.set_title(
            f"{'peak memory' if unit > 1 else 'step time'} (±{int(band * 100)}%; orange = recompute)"
        )
    fig.tight_layout()
    savefig(fig, args.out + ".png")
    print(f"wrote {args.out}.json and .png")


if __name__ == "__main__":
    main()
