"""How close are the cost models to published large-scale runs? Predicted vs published throughput per GPU.

Each row is a published layout (model shape, tp, pp, dp, cp, global batch, GPUs) with the
throughput the paper reports. The planner costs that exact layout on the matching
cluster preset (A100-80GB DGX nodes for Megatron-LM, H100 DGX nodes for Llama 3),
choosing only what the paper does not state (the micro-batch, and for Llama 3 the
activation policy) as the fastest that fits. Like is compared with like:

  narayanan2021   "achieved teraFLOP/s per GPU" counts FLOPs with eq. 3 of Narayanan et al.
                  2021, which includes the recompute forward (all runs used full activation
                  recomputation): predicted = eq. 3 FLOPs / predicted step time / GPUs.
  korthikanti2022 MFU and HFU (selective recompute + sequence parallelism, data-parallel size
                  one), as in the Megatron-LM README table: predicted MFU and HFU.
  llama3_2024     BF16 MFU (Llama 3 paper, Table 4): predicted MFU.

With `--search`, the planner's own choice for the same model, cluster and batch is added
(its predicted model TFLOP/s against the published layout's, both predicted; the search
may drop the recompute the papers used when memory allows, which is most of its gain).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.measure.record import savefig, write_json  # noqa: E402
from planner.cluster import ClusterSpec  # noqa: E402
from planner.estimate import budget_bytes, validate_layout  # noqa: E402
from planner.mapping import LinkEvaluator, default_mapping  # noqa: E402
from planner.memory import MemoryOptions, estimate_memory  # noqa: E402
from planner.model import ModelSpec  # noqa: E402
from planner.plan import Layout  # noqa: E402
from planner.planning import make_plan  # noqa: E402
from planner.presets import resolve_cluster  # noqa: E402
from planner.search import SearchSpace, micro_batches, stage_splits  # noqa: E402
from planner.steptime import DP_OVERLAP, estimate_step_time  # noqa: E402
from planner.strategies import ACTIVATION_BASELINES, StrategyInput  # noqa: E402
from planner.workload import Workload  # noqa: E402

_GPT: dict[str, Any] = {
    "family": "gpt", "position": "learned", "gated_mlp": False, "activation": "gelu", "norm": "layernorm",
    "tied_embeddings": True, "qkv_bias": True, "attn_out_bias": True, "mlp_bias": True,
    "vocab_size": 51200, "max_position_embeddings": 2048,
    # Megatron-LM's defaults (--attention-dropout 0.1 --hidden-dropout 0.1), which these GPT-3 runs kept
    "attn_dropout": 0.1, "hidden_dropout": 0.1,
}  # fmt: skip


def gpt(name: str, heads: int, hidden: int, layers: int) -> ModelSpec:
    return ModelSpec(name=name, num_layers=layers, hidden_size=hidden, num_heads=heads, ffn_hidden_size=4 * hidden,
                     **_GPT)  # fmt: skip


LLAMA3_405B = ModelSpec(
    name="llama3-405b", family="llama", num_layers=126, hidden_size=16384, num_heads=128, num_kv_heads=8,
    ffn_hidden_size=53248, vocab_size=128256, max_position_embeddings=131072,
)  # fmt: skip

# Llama 3, Sec. 3.3.2: one block fewer on the first and the last of the 16 stages (126 = 7 + 14 x 8 + 7), the
# embedding and the output layer taking their place: 8 slots per stage, which the interleaved schedule's
# model chunks divide. (It trained 8K sequences without activation checkpointing; the activation policy here
# is the memory model's fewest recompute that fits, which is none where the model agrees.)
LLAMA3_STAGES = (7,) + (8,) * 14 + (7,)

# (source, model, tp, pp, cp, GPUs, global batch, seq, published metric value, metric, recompute, zero)
# Narayanan et al. 2021 (SC'21), Table 1: vocab 51200, seq 2048, 80-GB A100s on Selene, fp16.
# Korthikanti et al. 2022 (MLSys'23), model configurations and the Megatron-LM README MFU/HFU table.
# Dubey et al. 2024 (The Llama 3 Herd of Models), Table 4: 405B on H100s, BF16 MFU.
ROWS: list[dict[str, Any]] = [
    *[
        {"source": "narayanan2021", "model": gpt(f"gpt-{p}b", a, h, l), "tp": t, "pp": pp, "cp": 1, "gpus": g,
         "batch": b, "seq": 2048, "published": f, "metric": "eq3_tflops", "recompute": "full", "zero": 0}
        for p, a, h, l, t, pp, g, b, f in [
            (1.7, 24, 2304, 24, 1, 1, 32, 512, 137),
            (3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
            (7.5, 32, 4096, 36, 4, 1, 128, 512, 142),
            (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
            (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138),
            (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
            (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148),
            (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
            (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163),
            (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163),
        ]
    ],
    *[
        {"source": "korthikanti2022", "model": gpt(name, a, h, l), "tp": 8, "pp": pp, "cp": 1, "gpus": g,
         "batch": b, "seq": 2048, "published": mfu, "published_hfu": hfu, "metric": "mfu",
         "recompute": "selective", "zero": 0}
        for name, a, h, l, pp, g, b, mfu, hfu in [
            ("gpt-22b", 64, 6144, 48, 1, 8, 4, 0.415, 0.437),
            ("gpt-175b", 96, 12288, 96, 8, 64, 64, 0.514, 0.528),
            ("gpt-530b", 128, 20480, 105, 35, 280, 280, 0.560, 0.570),
            ("gpt-1t", 160, 25600, 128, 64, 512, 512, 0.563, 0.570),
        ]
    ],
    *[
        {"source": "llama3_2024", "model": LLAMA3_405B, "tp": 8, "pp": 16, "cp": cp, "gpus": g, "batch": b,
         "seq": s, "published": mfu, "metric": "mfu", "recompute": "auto", "zero": 1,
         "stage_layers": LLAMA3_STAGES, "stage_slots": 8}
        for cp, g, b, s, mfu in [
            (1, 8192, 2048, 8192, 0.43),
            (1, 16384, 2048, 8192, 0.41),
            (16, 16384, 128, 131072, 0.38),
        ]
    ],
]  # fmt: skip


# model chunks per device tried for the interleaved 1F1B schedule (Narayanan et al. 2021, Sec. 2.2.2)
INTERLEAVE = (1, 2, 3, 4, 6, 8)


def eq3_flops(model: ModelSpec, batch: int, seq: int) -> float:
    """Narayanan et al. 2021, eq. 3 (with recompute): 96 B s l h^2 (1 + s/(6h) + V/(16 l h))."""
    b, s, ell, h, v = batch, seq, model.num_layers, model.hidden_size, model.vocab_size
    return 96.0 * b * s * ell * h * h * (1 + s / (6 * h) + v / (16 * ell * h))


def cluster_for(row: dict[str, Any]) -> ClusterSpec:
    preset = "dgx-h100-8" if row["source"] == "llama3_2024" else "dgx-a100-8x80g"
    return resolve_cluster(preset, nodes=row["gpus"] // 8)


def workload_for(row: dict[str, Any]) -> Workload:
    # Megatron-LM in 2021 and 2022 ran the attention unfused (QK^T, fused scale-mask-softmax, dropout,
    # context GEMM; the s x s scores go through memory: planner.kernels); Korthikanti et al.'s selective
    # recompute drops those s x s activations and recomputes them (the memory model's "selective").
    # Llama 3 ran a fused (flash) attention kernel.
    return Workload(
        global_batch=row["batch"],
        seq_len=row["seq"],
        dtype="bf16" if row["source"] == "llama3_2024" else "fp16",
        flash_attention=row["source"] == "llama3_2024",
    )


def dp_overlap_for(row: dict[str, Any]) -> float:
    # Megatron-LM as of both papers all-reduced the gradients after the last micro-batch's backward
    # (megatron/training.py: train_step, `allreduce_gradients` after forward_backward_func; overlapping
    # came with --overlap-grad-reduce in 2023); Llama 3's FSDP overlaps it with backward (the default)
    return 0.0 if row["source"] in ("narayanan2021", "korthikanti2022") else DP_OVERLAP


def cost_row(row: dict[str, Any]) -> dict[str, Any]:
    model: ModelSpec = row["model"]
    cluster = cluster_for(row)
    tp, pp, cp = row["tp"], row["pp"], row["cp"]
    dp = row["gpus"] // (tp * pp * cp)
    w = workload_for(row)
    links = LinkEvaluator(Layout(dp=dp, tp=tp, pp=pp, cp=cp), cluster).links(
        default_mapping(cluster.world_size)
    )
    budget = budget_bytes(cluster, w)
    best: tuple[float, Layout, MemoryOptions, Any] | None = None
    fits_any = False
    split = row.get("stage_layers") or (stage_splits(model, w, pp)[-1][1] if model.num_layers % pp else ())
    per_stage = (row["stage_slots"],) if "stage_slots" in row else split or (model.num_layers // pp,)
    # the interleaved schedule these runs could use (Megatron-LM): chunks dividing every stage's blocks
    chunks = [v for v in INTERLEAVE if v == 1 or (pp > 1 and all(n % v == 0 for n in per_stage))]
    for mb, v in itertools.product(micro_batches(w, dp, SearchSpace()), chunks):
        layout = Layout(
            dp=dp,
            tp=tp,
            pp=pp,
            cp=cp,
            micro_batch=mb,
            grad_accum=row["batch"] // (dp * mb),
            zero_stage=row["zero"],
            sequence_parallel=tp > 1,
            stage_layers=split,
            virtual_stages=v,
            vocab_parallel=True,
        )  # fmt: skip
        if v > 1 and layout.grad_accum % pp:
            continue  # Megatron's interleaving needs the micro-batches to be a multiple of the stages
        validate_layout(model, cluster, w, layout)
        if row["recompute"] == "auto":
            inp = StrategyInput(model=model, cluster=cluster, workload=w, layout=layout, budget_bytes=budget)
            options = None
            for stage in ACTIVATION_BASELINES:
                if stage.applies(inp):
                    res = stage.solve(inp)
                    if res.fits:
                        options = res.options
                        break
            if options is None:
                continue
        else:
            options = MemoryOptions(recompute=row["recompute"])
            if estimate_memory(model, w, layout, options).total > budget:
                continue
        fits_any = True
        t = estimate_step_time(
            model, cluster, w, layout, options, links=links, dp_overlap=dp_overlap_for(row)
        )
        if best is None or t.step_s < best[0]:
            best = (t.step_s, layout, options, t)
    out: dict[str, Any] = {
        "source": row["source"], "model": model.name, "params_b": model.params / 1e9, "gpus": row["gpus"],
        "layout": f"tp{tp} pp{pp} cp{cp} dp{dp}", "global_batch": row["batch"], "seq": row["seq"],
        "metric": row["metric"], "published": row["published"], "fits": fits_any,
    }  # fmt: skip
    if "published_hfu" in row:
        out["published_hfu"] = row["published_hfu"]
    if best is None:
        # report the leanest micro-batch's memory so a miss is visible
        layout = Layout(dp=dp, tp=tp, pp=pp, cp=cp, micro_batch=1, grad_accum=row["batch"] // dp,
                        zero_stage=row["zero"], sequence_parallel=tp > 1, stage_layers=split,
                        vocab_parallel=True)  # fmt: skip
        mem = estimate_memory(model, w, layout, MemoryOptions(recompute="full")).total
        out.update(predicted=None, ratio=None, peak_bytes=mem, budget_bytes=budget)
        return out
    step, layout, options, t = best
    peak = cluster.device.flops(w.dtype)
    if row["metric"] == "eq3_tflops":
        predicted = eq3_flops(model, row["batch"], row["seq"]) / step / row["gpus"] / 1e12
    else:
        predicted = t.mfu
    out.update(
        micro_batch=layout.micro_batch, virtual_stages=layout.virtual_stages,
        recompute=options.recompute if not options.policies else "block",
        predicted=predicted, ratio=predicted / row["published"], step_s=step,
        predicted_model_tflops=t.tflops_per_device, predicted_hfu=t.hfu, bottleneck=t.bottleneck,
        breakdown_s=t.breakdown(), peak_bytes=estimate_memory(model, w, layout, options).total, budget_bytes=budget,
        published_tflops=row["published"] if row["metric"] == "eq3_tflops" else row["published"] * peak / 1e12,
        predicted_tflops=predicted if row["metric"] == "eq3_tflops" else predicted * peak / 1e12,
    )  # fmt: skip
    return out


def search_row(row: dict[str, Any], seed: int) -> dict[str, Any]:
    model: ModelSpec = row["model"]
    cluster, w = cluster_for(row), workload_for(row)
    t0 = time.perf_counter()
    res = make_plan(model, cluster, w, seed=seed, mapping_top=1)
    return {"searched_layout": res.chosen.describe(), "searched_model_tflops": res.chosen.time.tflops_per_device,
            "search_seconds": time.perf_counter() - t0}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", nargs="+", choices=sorted({r["source"] for r in ROWS}),
                    default=sorted({r["source"] for r in ROWS}))  # fmt: skip
    ap.add_argument("--search", action="store_true", help="also run the planner's search (Megatron rows)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="the first rows of each source only, no search")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = args.out or os.path.join(
        "benchmarks", "results", "published_layouts" + ("_quick" if args.quick else "")
    )
    rows = [r for r in ROWS if r["source"] in args.sources]
    if args.quick:
        rows = [r for i, r in enumerate(rows) if i == 0 or rows[i - 1]["source"] != r["source"]]
        args.search = False
    results = []
    for i, row in enumerate(rows, 1):
        res = cost_row(row)
        if args.search and row["source"] != "llama3_2024" and res["predicted"] is not None:
            res.update(search_row(row, args.seed))
        results.append(res)
        pred = "does not fit" if res["predicted"] is None else f"{res['predicted']:.3f} (x{res['ratio']:.2f})"
        print(f"[{i}/{len(rows)}] {res['source']} {res['model']} {res['layout']} on {res['gpus']} GPUs:"
              f" published {res['metric']} {res['published']}, predicted {pred}"
              + (f"; searched {res['searched_layout']}" if "searched_layout" in res else ""), flush=True)  # fmt: skip
    ratios = [r["ratio"] for r in results if r["ratio"] is not None]
    summary = {
        "rows": len(results),
        "fit_per_memory_model": sum(r["fits"] for r in results),
        "ratio_min": min(ratios) if ratios else None,
        "ratio_max": max(ratios) if ratios else None,
        "ratio_mean": sum(ratios) / len(ratios) if ratios else None,
        "within_15pct": sum(abs(x - 1) <= 0.15 for x in ratios),
    }
    print(f"predicted / published: mean {summary['ratio_mean']:.3f}, range {summary['ratio_min']:.3f}.."
          f"{summary['ratio_max']:.3f}; within ±15%: {summary['within_15pct']}/{len(ratios)};"
          f" published layouts that fit the memory model: {summary['fit_per_memory_model']}/{len(results)}")  # fmt: skip
    write_json(out + ".json", {
        "config": {**vars(args), "rows": [{k: (v.name if isinstance(v, ModelSpec) else v) for k, v in r.items()}
                                          for r in rows]},
        "notes": [
            "narayanan2021: metric is eq. 3 FLOPs (with the recompute forward) per second per GPU; all runs used "
            "full activation recomputation; micro-batch and interleaving (model chunks per device, INTERLEAVE, "
            "where Megatron's constraints allow) chosen by the model (fastest that fits), as the paper tuned them.",
            "korthikanti2022: MFU/HFU from the Megatron-LM README table (data-parallel size one); selective "
            "recompute and sequence parallelism.",
            "llama3_2024: BF16 MFU; activation policy chosen by the planner (fewest recompute that fits), ZeRO-1. "
            "The paper cites PaLM (Chowdhery et al.) for MFU, whose model FLOPs count attention over the full s x s "
            "(as torchtitan's get_num_flop_per_token does): planner.flops counts it so.",
            "compute: the presets' roofline (planner.kernels): GEMMs at one GEMM efficiency per device (A100 0.65, "
            "H100 0.6), a fused causal attention kernel at half its counted FLOPs and FlashAttention-2's published "
            "efficiency, its backward 2.5x its forward (it recomputes the scores; Dao 2023, Sec. 4.1), the "
            "memory-bound operators (norms, GeLU, dropout, residual adds, unfused s x s scores) at "
            "HBM bandwidth; Megatron-LM's gradient all-reduce after the last backward (no overlap).",
            "llama3_2024: stages 7 + 14 x 8 + 7 blocks (Sec. 3.3.2), interleaved chunks dividing the 8 slots.",
        ],
        "summary": summary,
        "results": results,
    })  # fmt: skip

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in results if r["predicted"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    x = range(len(done))
    labels = [f"{r['model']}\n{r['gpus']} GPUs" for r in done]
    axes[0].bar([i - 0.2 for i in x], [r["published_tflops"] for r in done], width=0.4, label="published")
    axes[0].bar([i + 0.2 for i in x], [r["predicted_tflops"] for r in done], width=0.4, label="predicted")
    axes[0].set_xticks(list(x), labels, rotation=70, fontsize=7)
    axes[0].set_ylabel("TFLOP/s per GPU (each source's own count)")
    axes[0].legend()
    colors = {"narayanan2021": "tab:blue", "korthikanti2022": "tab:orange", "llama3_2024": "tab:green"}
    axes[1].bar(list(x), [r["ratio"] for r in done], color=[colors[r["source"]] for r in done])
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].axhspan(0.85, 1.15, color="grey", alpha=0.15)
    axes[1].set_xticks(list(x), labels, rotation=70, fontsize=7)
    axes[1].set_ylabel("predicted / published")
    axes[1].set_title("blue: Narayanan 2021, orange: Korthikanti 2022, green: Llama 3")
    fig.tight_layout()
    savefig(fig, out + ".png")
    print(f"wrote {out}.json and .png")


if __name__ == "__main__":
    main()
