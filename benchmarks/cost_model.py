"""Does the cost model predict this machine? Peak memory (goal ±10%) and step time (goal ±25%).

Real training steps of HF models (random init) on CPU, fp32, AdamW, with and without
full recompute, across batch sizes and sequence lengths: the peak of live tensors
(MemTracker) and the median step time, beside the planner's predictions. The time
model's peak and efficiency come from the probe, run first in the same process.

`--families` adds every supported family at its transformers config class's defaults (dropout on where
the family has it: GPT-2's 0.1; attention kernel, routing), scaled down (`tests.helpers.
DEFAULT_FAMILY_CONFIGS`), at three (batch, sequence) settings (`--settings`), the spec read from the
config as `memtier` reads a config.json; memory goal there: within ±10% and never under by more than 5%.
`--memory-only` skips the probe and the timing (step times need an otherwise idle machine).
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
from planner.cluster import ClusterSpec  # noqa: E402
from planner.estimate import estimate  # noqa: E402
from planner.memory import MemoryOptions, estimate_memory  # noqa: E402
from planner.model import ModelSpec, from_hf_config  # noqa: E402
from planner.plan import Layout  # noqa: E402
from planner.presets import MODEL_PRESETS  # noqa: E402
from planner.workload import Workload  # noqa: E402
from tests.helpers import DEFAULT_FAMILY_CONFIGS  # noqa: E402

GPT2_20M = ModelSpec(name="gpt2-20m", family="gpt2", num_layers=6, hidden_size=384, num_heads=6, ffn_hidden_size=1536,
                     vocab_size=8192, max_position_embeddings=1024, position="learned", gated_mlp=False,
                     activation="gelu_new", norm="layernorm", tied_embeddings=True, qkv_bias=True,
                     attn_out_bias=True, mlp_bias=True)  # fmt: skip
MODELS = {
    "llama-20m": MODEL_PRESETS["llama-20m"],
    "gpt2-20m": GPT2_20M,
    "tiny-llama": MODEL_PRESETS["tiny-llama"],
}


def measure(
    spec: ModelSpec, b: int, s: int, recompute: str, steps: int, family: str = ""
) -> tuple[int, float]:
    from tests.helpers import default_family_model, full_recompute, hf_model, measure_step_peak

    model = default_family_model(family)[1] if family else hf_model(spec)
    if recompute == "full":
        full_recompute(model)
    # torch's fused CPU AdamW: the update the probe times and memtier's runtime uses (the default on
    # CPU is the per-tensor loop, several times slower on small tensors)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, spec.vocab_size, (b, s))
    peak = measure_step_peak(model, opt, ids)["Total"]
    times = [float("nan")]  # (steps 0: not timed)
    for _ in range(steps):
        t0 = time.perf_counter()
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return peak, statistics.median(times[1:] or times)


def memory_summary(rows: list[dict]) -> dict:
    """The memory goal over `rows`: within ±10%, none under by more than 5%."""
    if not rows:
        return {}
    ratios = [r["memory_ratio"] for r in rows]
    under = [
        f"{r['model']} b{r['batch']} s{r['seq']} {r['recompute']}" for r in rows if r["memory_ratio"] < 0.95
    ]
    return {"cases": len(rows), "within_10pct": sum(abs(x - 1) <= 0.10 for x in ratios),
            "under_by_over_5pct": under, "ratio_min": min(ratios), "ratio_max": max(ratios)}  # fmt: skip


def run_case(name: str, b: int, s: int, rc: str, steps: int, cluster: ClusterSpec | None) -> dict:
    """One row: the measured peak (and with a `cluster` the median step time) beside the predictions."""
    family = name if name in DEFAULT_FAMILY_CONFIGS else ""
    spec = from_hf_config(DEFAULT_FAMILY_CONFIGS[name]().to_dict(), name=name) if family else MODELS[name]
    peak, step_s = measure(spec, b, s, rc, steps if cluster else 0, family)
    w = Workload(global_batch=b, micro_batch=b, seq_len=s, dtype="fp32")
    # (a CPU device: `estimate` sets cpu_kernels from the cluster; without one, set here)
    options = MemoryOptions(recompute=rc, optimizer_impl="fused", cpu_kernels=True)
    row = {"model": name, "default_config": bool(family), "batch": b, "seq": s, "recompute": rc,
           "measured_peak_bytes": peak}  # fmt: skip
    if cluster is None:
        predicted = estimate_memory(spec, w, Layout(micro_batch=b), options).total
        return {**row, "predicted_peak_bytes": predicted, "memory_ratio": predicted / peak}
    est = estimate(spec, cluster, w, Layout(micro_batch=b), options)
    return {**row, "predicted_peak_bytes": est.memory.total, "memory_ratio": est.memory.total / peak,
            "measured_step_s": step_s, "predicted_step_s": est.time.step_s,
            "time_ratio": est.time.step_s / step_s}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="*", choices=sorted(MODELS), default=["llama-20m", "gpt2-20m"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--seqs", nargs="+", type=int, default=[256, 512])
    ap.add_argument(
        "--families",
        nargs="*",
        choices=sorted(DEFAULT_FAMILY_CONFIGS),
        default=[],
        help="default-config runs of these families (see the module's docstring)",
    )
    ap.add_argument(
        "--settings",
        nargs="+",
        default=["1x128", "2x256", "4x512"],
        help="(batch)x(sequence) settings of the --families runs",
    )
    ap.add_argument(
        "--memory-only",
        action="store_true",
        help="peaks only: no probe, no step timing (timings need an otherwise idle machine)",
    )
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny-llama only, 2 steps")
    ap.add_argument("--out", default="benchmarks/results/cost_model")
    args = ap.parse_args()  # fmt: skip
    if args.quick:
        args.models, args.steps = ["tiny-llama"], 2
    torch.set_num_threads(os.cpu_count() or 1)
    cluster = None if args.memory_only else to_cluster(probe(quick=True))
    cases = [
        (m, b, s, rc) for m in args.models for b in args.batches for s in args.seqs for rc in ("none", "full")
    ]
    settings = [tuple(int(x) for x in st.split("x")) for st in args.settings]
    cases += [(f, b, s, rc) for f in args.families for b, s in settings for rc in ("none", "full")]
    rows = []
    for i, (name, b, s, rc) in enumerate(cases, 1):
        rows.append(row := run_case(name, b, s, rc, args.steps, cluster))
        timing = f", time pred/meas {row['time_ratio']:.3f}" if cluster else ""
        memory = f"memory pred/meas {row['memory_ratio']:.3f}"
        print(f"[{i}/{len(cases)}] {name} b{b} s{s} {rc:4s}: {memory}{timing}", flush=True)
    defaults = memory_summary([r for r in rows if r["default_config"]])
    summary: dict = {"cases": len(rows), "memory": memory_summary(rows), "memory_default_configs": defaults}
    if cluster is not None:
        # the step-time goal is on the 20M-parameter models; the default configs (~1M parameters, a few ms
        # of compute per block) time mostly per-op overhead the model does not claim (ratios in the rows)
        timed = [r for r in rows if not r["default_config"]]
        dev = cluster.device
        summary.update(time_within_25pct=sum(abs(r["time_ratio"] - 1) <= 0.25 for r in timed),
                       timed_cases=len(timed), gemm_fp32_flops=dev.peak_flops["fp32"],
                       efficiency=dev.efficiency, block_overhead_s=dev.block_overhead)  # fmt: skip
    print(f"summary: {summary}")
    write_json(args.out + ".json", {"config": vars(args), "summary": summary, "rows": rows})
    plot(rows, args.out + ".png")
    print(f"wrote {args.out}.json and .png")


def plot(rows: list[dict], path: str) -> None:
    """Predicted against measured: peak memory (±10%) and, where timed, step time (±25%)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("peak_bytes", 0.10, 2**20, "peak memory", "MiB")]
    if all("time_ratio" in r for r in rows):
        panels.append(("step_s", 0.25, 1.0, "step time", "s"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    for ax, (key, band, unit, title, label) in zip(axes[0], panels, strict=True):
        meas = [r[f"measured_{key}"] / unit for r in rows]
        pred = [r[f"predicted_{key}"] / unit for r in rows]
        colors = ["tab:blue" if r["recompute"] == "none" else "tab:orange" for r in rows]
        for marker, default in (("o", False), ("^", True)):  # triangles: the families' default configs
            pick = [i for i, r in enumerate(rows) if r["default_config"] == default]
            ax.scatter([meas[i] for i in pick], [pred[i] for i in pick], c=[colors[i] for i in pick],
                       marker=marker)  # fmt: skip
        hi = max(meas + pred) * 1.1
        ax.plot([0, hi], [0, hi], "k-", lw=0.8)
        ax.plot([0, hi], [0, hi * (1 + band)], "k--", lw=0.5)
        ax.plot([0, hi], [0, hi * (1 - band)], "k--", lw=0.5)
        ax.set_xlabel(f"measured {label}")
        ax.set_ylabel(f"predicted {label}")
        ax.set_title(f"{title} (±{int(band * 100)}%)")
    fig.suptitle("blue: no recompute, orange: full recompute; ▲ default configs", fontsize=9)
    fig.tight_layout()
    savefig(fig, path)


if __name__ == "__main__":
    main()
