"""Loss without logits: what do the chunked linear cross-entropy paths save in memory and cost in time
against the standard HF loss (lm_head -> logits.float() -> cross_entropy) and against Cut Cross-Entropy?

One HF causal LM (random init, a config where vocabulary x tokens dominates) runs a training step
(forward + backward) with each method, side by side in one run:

- ``standard``: the unmodified model, ``model(ids, labels=labels).loss.backward()``;
- ``chunked-<mode>@<C>``: the same call with ``offload.loss.install_chunked_loss(model, chunk_size=C,
  mode=mode)`` (modes: ``recompute`` keeps only the log-sum-exp and recomputes logits in backward;
  ``precompute`` forms the gradients in forward);
- ``cce-torch_compile`` / ``cce-cce``: the ``cut-cross-entropy`` package (Wijmans et al. 2024) on the base
  model's hidden states, with each of its implementations; where one cannot run here the JSON says why.

Step times are the median over rounds in which every method runs once, in a rotating order, so that noise
from other processes hits all methods alike; ratios are against ``standard`` in the same run. Peak memory is
the peak of torch.distributed._tools.mem_tracker.MemTracker over one step, next to the prediction of
offload.loss.standard_loss_peak_bytes / chunked_loss_peak_bytes.

    python -m benchmarks.loss --quick            # ~2 minutes on 2 threads
    python -m benchmarks.loss                    # chunk-size sweep, more rounds
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launch.measure.record import savefig, write_json
from offload.loss import (
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_MODE,
    MODES,
    chunked_loss_peak_bytes,
    install_chunked_loss,
    logits_bytes,
    standard_loss_peak_bytes,
)

MiB = 1 << 20
RESULTS = Path(__file__).resolve().parent / "results"
TIME_GOAL = 1.05  # issue 10: chunked step time <= 1.05 x the standard loss's
CCE_IMPLS = ("torch_compile", "cce")  # cut_cross_entropy.LinearCrossEntropyImpl names


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    arch: str  # "llama" | "qwen2"
    vocab: int
    hidden: int
    layers: int
    ffn: int
    heads: int
    kv_heads: int
    tied: bool


# Registry of models measured (random init, built from config objects).
MODELS: dict[str, ModelConfig] = {
    # the LM head dominates: what the chunked loss is for, and the hardest case for its time
    "llama-head-heavy": ModelConfig(
        arch="llama", vocab=32000, hidden=256, layers=2, ffn=688, heads=4, kv_heads=2, tied=False
    ),
    "qwen2-head-heavy-tied": ModelConfig(
        arch="qwen2", vocab=32000, hidden=256, layers=2, ffn=688, heads=4, kv_heads=2, tied=True
    ),
    # a body with more weight next to the same head
    "llama-balanced": ModelConfig(
        arch="llama", vocab=32000, hidden=512, layers=6, ffn=1376, heads=8, kv_heads=4, tied=False
    ),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_model(cfg: ModelConfig, dtype: torch.dtype) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=cfg.vocab,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.ffn,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        tie_word_embeddings=cfg.tied,
        use_cache=False,
    )
    model = (
        LlamaForCausalLM(LlamaConfig(**common))
        if cfg.arch == "llama"
        else Qwen2ForCausalLM(Qwen2Config(**common))
    )
    return model.to(dtype).train()


# --------------------------------------------------------------------------------------------------------
# Methods: each is (prepare, step, undo); step runs forward + backward and returns the loss.
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Method:
    name: str
    kind: str  # "standard" | "chunked" | "cce"
    chunk_size: int | None = None
    mode: str | None = None
    impl: str | None = None
    install: Callable[[nn.Module], Any] | None = None
    status: str = "ok"
    times_s: list[float] = dataclasses.field(default_factory=list)
    cpu_times_s: list[float] = dataclasses.field(default_factory=list)
    result: dict[str, Any] = dataclasses.field(default_factory=dict)


def hf_step(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    out = model(ids, labels=labels)
    out.loss.backward()
    return out.loss.detach()


def make_cce_step(impl: str) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    from cut_cross_entropy import linear_cross_entropy as cce_linear_cross_entropy

    def step(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = model.model(ids).last_hidden_state
        loss = cce_linear_cross_entropy(hidden, model.lm_head.weight, labels, shift=True, impl=impl)
        loss.backward()
        return loss.detach()

    return step


def cce_status() -> tuple[str | None, str]:
    """The installed cut-cross-entropy version, or None and why it cannot be imported."""
    try:
        version = importlib.metadata.version("cut-cross-entropy")
    except importlib.metadata.PackageNotFoundError:
        version = None
    try:
        import cut_cross_entropy
    except Exception as exc:  # the package imports triton at import time on Linux
        return (
            version,
            f"import failed (pip install cut-cross-entropy; it pulls triton): {type(exc).__name__}: {exc}",
        )
    return version, f"ok ({Path(cut_cross_entropy.__file__).parent})"


# What each cut-cross-entropy implementation is, recorded beside its numbers.
CCE_NOTES = {
    "cce": "the paper's Triton kernels (blockwise logits in on-chip memory); need a GPU driver",
    "torch_compile": "cut-cross-entropy's fallback: drops ignored tokens, then F.cross_entropy on the full "
    "N_valid x V logits under torch.compile (inductor, CPU here); MemTracker cannot trace compiled code, so "
    "only its RSS rise is measured",
}


def run_step(
    method: Method, model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, step: Callable
) -> tuple[float, float, float]:
    """One step: (wall seconds, process CPU seconds, loss). CPU time is the steadier measure when other
    processes share the cores (it does not count time the step waited for a core)."""
    handle = method.install(model) if method.install else None
    try:
        model.zero_grad(set_to_none=True)
        c0, t0 = time.process_time(), time.perf_counter()
        loss = step(model, ids, labels)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        if handle is not None:
            handle.remove()
    return elapsed, cpu, float(loss)


def peak_bytes(
    method: Method, model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, step: Callable
) -> int:
    from torch.distributed._tools.mem_tracker import MemTracker

    model.zero_grad(set_to_none=True)
    handle = method.install(model) if method.install else None
    try:
        tracker = MemTracker()
        tracker.track_external(model, ids, labels)
        with tracker:
            step(model, ids, labels)
    finally:
        if handle is not None:
            handle.remove()
    model.zero_grad(set_to_none=True)
    return int(tracker.get_tracker_snapshot("peak")[ids.device]["Total"])


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def rss_peak_delta_bytes(
    method: Method, model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, step: Callable
) -> int:
    """Rise of the process's peak resident set during one step (Linux: VmHWM reset via clear_refs).

    A second, allocator-level view that also sees what MemTracker cannot (compiled code); it includes
    allocator caching effects, so it is a check on, not a replacement for, MemTracker's numbers.
    """
    import gc

    model.zero_grad(set_to_none=True)
    handle = method.install(model) if method.install else None
    try:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _proc_status_bytes("VmRSS")
        step(model, ids, labels)
        peak = _proc_status_bytes("VmHWM")
    finally:
        if handle is not None:
            handle.remove()
    model.zero_grad(set_to_none=True)
    return peak - base


def grad_digest(model: nn.Module) -> list[float]:
    return [float(p.grad.double().norm()) if p.grad is not None else 0.0 for p in model.parameters()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="llama-head-heavy")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--modes", choices=MODES, nargs="+", default=list(MODES))
    parser.add_argument("--cce-impls", choices=CCE_IMPLS, nargs="*", default=list(CCE_IMPLS))
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (every method once per round)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="fewer chunk sizes and rounds")
    parser.add_argument(
        "--out", default=None, help="JSON path (PNG beside it); default benchmarks/results/loss[_quick]"
    )
    parser.add_argument("--replot", metavar="JSON", help="only redraw the PNG of an earlier run's JSON")
    args = parser.parse_args(argv)
    if args.quick and not args.replot:
        args.chunk_sizes = [512, DEFAULT_CHUNK_TOKENS, 2048]
        args.rounds = 3
        args.seq = min(args.seq, 1024)
    return args


def make_methods(args: argparse.Namespace) -> tuple[list[Method], str | None, str]:
    """The standard loss, every chunked (mode, chunk size) and every CCE implementation (with why one cannot
    run); then the installed cut-cross-entropy version and its import status."""
    methods = [Method(name="standard", kind="standard")]
    for mode in args.modes:
        for c in args.chunk_sizes:
            methods.append(
                Method(
                    name=f"chunked-{mode}@{c}",
                    kind="chunked",
                    chunk_size=c,
                    mode=mode,
                    install=lambda m, c=c, mode=mode: install_chunked_loss(m, chunk_size=c, mode=mode),
                )
            )
    cce_version, cce_import = cce_status()
    for impl in args.cce_impls:
        m = Method(name=f"cce-{impl}", kind="cce", impl=impl)
        m.result["note"] = CCE_NOTES[impl]
        if not cce_import.startswith("ok"):
            m.status = cce_import if cce_version is None else f"cut-cross-entropy {cce_version}: {cce_import}"
        methods.append(m)
    return methods, cce_version, cce_import


def warm_up(
    methods: list[Method], model: nn.Module, ids: torch.Tensor, labels: torch.Tensor
) -> dict[str, Callable]:
    """One step per method (and CCE's torch.compile), its loss and gradients checked against the standard
    loss's; a method that fails here is recorded, not run. The step function of each method that runs."""
    steps: dict[str, Callable] = {}
    standard_loss = None
    standard_grads: list[float] = []
    for m in methods:
        if m.status != "ok":
            print(f"[loss] skip {m.name}: {m.status}", flush=True)
            continue
        try:
            step = make_cce_step(m.impl) if m.kind == "cce" else hf_step
            t0 = time.perf_counter()
            _, _, loss = run_step(m, model, ids, labels, step)
            m.result["warmup_s"] = time.perf_counter() - t0
            m.result["loss"] = loss
            digest = grad_digest(model)
            if m.kind == "standard":
                standard_loss, standard_grads = loss, digest
            m.result["loss_abs_diff"] = abs(loss - standard_loss) if standard_loss is not None else None
            m.result["grad_norm_max_rel_diff"] = max(
                abs(a - b) / max(abs(b), 1e-30) for a, b in zip(digest, standard_grads)
            )
            steps[m.name] = step
            print(f"[loss] warm-up {m.name}: loss {loss:.6f} in {m.result['warmup_s']:.2f} s", flush=True)
        except Exception as exc:
            m.status = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            m.result["traceback_tail"] = traceback.format_exc().splitlines()[-3:]
            print(f"[loss] {m.name} cannot run: {m.status}", flush=True)
    return steps


def time_rounds(
    runnable: list[Method],
    rounds: int,
    model: nn.Module,
    ids: torch.Tensor,
    labels: torch.Tensor,
    steps: dict[str, Callable],
) -> None:
    """Every method once per round, in an order that rotates every round (noise hits all alike)."""
    for r in range(rounds):
        k = r % len(runnable)
        for m in runnable[k:] + runnable[:k]:  # rotate the order every round
            elapsed, cpu, _ = run_step(m, model, ids, labels, steps[m.name])
            m.times_s.append(elapsed)
            m.cpu_times_s.append(cpu)
        line = ", ".join(f"{m.name} {m.times_s[-1]:.2f}" for m in runnable)
        print(f"[loss] round {r + 1}/{rounds}: {line}", flush=True)


def measure_peaks(
    runnable: list[Method],
    model: nn.Module,
    ids: torch.Tensor,
    labels: torch.Tensor,
    steps: dict[str, Callable],
) -> None:
    """Each method's RSS rise and MemTracker peak over one step (an error is recorded beside a None)."""
    for m in runnable:
        # RSS first: a failed MemTracker run (compiled code under a dispatch mode) can leave torch.compile's
        # caches unusable for the rest of the process
        try:
            m.result["rss_peak_delta_bytes"] = rss_peak_delta_bytes(m, model, ids, labels, steps[m.name])
        except Exception as exc:
            m.result["rss_peak_delta_bytes"] = None
            m.result["rss_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        try:
            m.result["peak_bytes"] = peak_bytes(m, model, ids, labels, steps[m.name])
        except Exception as exc:
            m.result["peak_bytes"] = None
            m.result["peak_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        print(
            f"[loss] peak {m.name}: MemTracker {m.result['peak_bytes']}, "
            f"RSS rise {m.result['rss_peak_delta_bytes']}",
            flush=True,
        )


def compare(
    standard: Method, runnable: list[Method], cfg: ModelConfig, tokens: int, dtype_bytes: int, std_pred: int
) -> None:
    """Ratios against the standard loss (time, CPU time, peak) and, for a chunked loss, the measured peak drop
    against offload.loss's predicted drop."""
    base_time = statistics.median(standard.times_s)
    base_peak = standard.result["peak_bytes"]
    for m in runnable:
        m.result["median_s"] = statistics.median(m.times_s)
        m.result["min_s"] = min(m.times_s)
        m.result["time_ratio"] = m.result["median_s"] / base_time
        # per-round ratios against the standard step of the same round: robust to drifting load
        m.result["time_ratio_paired_median"] = statistics.median(
            a / b for a, b in zip(m.times_s, standard.times_s)
        )
        m.result["cpu_time_ratio_paired_median"] = statistics.median(
            a / b for a, b in zip(m.cpu_times_s, standard.cpu_times_s)
        )
        m.result["cpu_time_ratio_of_minima"] = min(m.cpu_times_s) / min(standard.cpu_times_s)
        if m.result.get("peak_bytes") and base_peak:
            m.result["peak_ratio"] = m.result["peak_bytes"] / base_peak
            m.result["peak_drop_bytes"] = base_peak - m.result["peak_bytes"]
        if m.kind == "chunked":
            pred = chunked_loss_peak_bytes(
                tokens=tokens,
                vocab=cfg.vocab,
                dtype_bytes=dtype_bytes,
                chunk_size=m.chunk_size,
                hidden=cfg.hidden,
            )
            m.result["predicted_drop_bytes"] = std_pred - pred
            if m.result.get("peak_drop_bytes") is not None:
                m.result["drop_vs_predicted"] = m.result["peak_drop_bytes"] / (std_pred - pred)


def choose_chunk_sizes(runnable: list[Method], modes: list[str]) -> dict[str, int | None]:
    """The default chunk size: the smallest whose paired CPU-time ratio is within 3% of the best chunk's."""
    chosen: dict[str, int | None] = {}
    for mode in modes:
        cands = [m for m in runnable if m.kind == "chunked" and m.mode == mode]
        if cands:
            best = min(m.result["cpu_time_ratio_paired_median"] for m in cands)
            ok = [m for m in cands if m.result["cpu_time_ratio_paired_median"] <= best * 1.03]
            chosen[mode] = min(m.chunk_size for m in ok)
    return chosen


def print_summary(runnable: list[Method]) -> None:
    for m in runnable:
        print(
            f"[loss] {m.name:28s} wall x{m.result['time_ratio_paired_median']:.3f} "
            f"cpu x{m.result['cpu_time_ratio_paired_median']:.3f}  "
            f"peak {m.result['peak_bytes'] / MiB if m.result.get('peak_bytes') else float('nan'):8.1f} MiB"
            + (
                f"  drop/predicted {m.result['drop_vs_predicted']:.3f}"
                if "drop_vs_predicted" in m.result
                else ""
            ),
            flush=True,
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.replot:
        payload = json.loads(Path(args.replot).read_text())
        plot(payload, Path(args.replot).with_suffix(".png"))
        return payload
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = MODELS[args.model]
    dtype = DTYPES[args.dtype]
    out_json = Path(args.out) if args.out else RESULTS / ("loss_quick.json" if args.quick else "loss.json")

    model = build_model(cfg, dtype)
    ids = torch.randint(0, cfg.vocab, (args.batch, args.seq))
    labels = ids.clone()
    labels[:, : args.seq // 8] = -100  # a masked prompt, as in instruction tuning
    tokens = args.batch * args.seq

    methods, cce_version, cce_import = make_methods(args)
    steps = warm_up(methods, model, ids, labels)
    runnable = [m for m in methods if m.status == "ok"]
    time_rounds(runnable, args.rounds, model, ids, labels, steps)
    measure_peaks(runnable, model, ids, labels, steps)
    dtype_bytes = torch.finfo(dtype).bits // 8
    std_pred = standard_loss_peak_bytes(tokens=tokens, vocab=cfg.vocab, dtype_bytes=dtype_bytes)
    compare(methods[0], runnable, cfg, tokens, dtype_bytes, std_pred)

    payload = {
        "question": "chunked linear cross-entropy vs the standard loss and Cut Cross-Entropy: peak, time",
        "config": {**vars(args), "model_config": dataclasses.asdict(cfg), "tokens": tokens},
        "versions": {
            "transformers": importlib.metadata.version("transformers"),
            "cut_cross_entropy": cce_version,
            "cut_cross_entropy_import": cce_import,
            "python": sys.version.split()[0],
        },
        "logits_bytes_fp32": logits_bytes(tokens, cfg.vocab, 4),
        "predicted_standard_loss_peak_bytes": std_pred,
        "time_goal_ratio": TIME_GOAL,
        "chosen_chunk_size": choose_chunk_sizes(runnable, args.modes),
        "default_chunk_size_in_code": DEFAULT_CHUNK_TOKENS,
        "default_mode_in_code": DEFAULT_MODE,
        "methods": [
            {
                "name": m.name,
                "kind": m.kind,
                "chunk_size": m.chunk_size,
                "mode": m.mode,
                "impl": m.impl,
                "status": m.status,
                "times_s": m.times_s,
                "cpu_times_s": m.cpu_times_s,
                **m.result,
            }
            for m in methods
        ],
    }
    write_json(str(out_json), payload)
    plot(payload, out_json.with_suffix(".png"))
    print(f"[loss] wrote {out_json} and {out_json.with_suffix('.png')}", flush=True)
    print_summary(runnable)
    return payload


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [m for m in payload["methods"] if m["status"] == "ok"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 6))
    names = [m["name"] for m in rows]
    colors = [
        "tab:gray" if m["kind"] == "standard" else "tab:blue" if m["kind"] == "chunked" else "tab:orange"
        for m in rows
    ]
    peaks = [(m.get("peak_bytes") or math.nan) / MiB for m in rows]
    rss = [(m.get("rss_peak_delta_bytes") or math.nan) / MiB for m in rows]
    ypos = list(range(len(rows)))
    axes[0].barh([y - 0.2 for y in ypos], peaks, height=0.4, color=colors, label="MemTracker peak")
    axes[0].barh(
        [y + 0.2 for y in ypos],
        rss,
        height=0.4,
        color=colors,
        alpha=0.45,
        hatch="//",
        label="RSS rise during the step",
    )
    axes[0].set_yticks(ypos, names)
    axes[0].set_xlabel("memory of one training step (MiB)")
    axes[0].legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8)
    axes[0].invert_yaxis()
    wall = [m["time_ratio_paired_median"] for m in rows]
    cpu = [m["cpu_time_ratio_paired_median"] for m in rows]
    axes[1].barh([y - 0.2 for y in ypos], wall, height=0.4, color=colors, label="wall time")
    axes[1].barh(
        [y + 0.2 for y in ypos], cpu, height=0.4, color=colors, alpha=0.45, hatch="//", label="CPU time"
    )
    axes[1].set_yticks(ypos, names)
    axes[1].axvline(1.0, color="k", lw=0.8)
    axes[1].axvline(payload["time_goal_ratio"], color="r", ls="--", lw=0.8, label="goal 1.05x")
    axes[1].set_xlabel("step time / standard (median of per-round ratios)")
    axes[1].invert_yaxis()
    axes[1].legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8)
    for mode, marker in (("recompute", "o"), ("precompute", "s")):
        pts = sorted(
            (m["chunk_size"], m["time_ratio_paired_median"], m["cpu_time_ratio_paired_median"])
            for m in rows
            if m["mode"] == mode
        )
        if pts:
            xs = [p[0] for p in pts]
            axes[2].plot(xs, [p[1] for p in pts], marker=marker, label=f"{mode}: wall")
            axes[2].plot(xs, [p[2] for p in pts], marker=marker, ls=":", label=f"{mode}: CPU")
    axes[2].axhline(1.0, color="k", lw=0.8)
    axes[2].axhline(payload["time_goal_ratio"], color="r", ls="--", lw=0.8)
    axes[2].set_xscale("log", base=2)
    axes[2].set_xlabel("chunk size (tokens)")
    axes[2].set_ylabel("step time / standard")
    axes[2].legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8)
    cfg = payload["config"]
    no_cce = [m for m in payload["methods"] if m["kind"] == "cce" and m["status"] != "ok"]
    note = "; ".join(f"{m['name']}: {m['status'][:70]}" for m in no_cce)
    fig.suptitle(
        f"{cfg['model']} {cfg['dtype']}, vocab {cfg['model_config']['vocab']}, {cfg['tokens']} tokens, "
        f"{cfg['threads']} threads" + (f"\n{note}" if note else ""),
        fontsize=10,
    )
    fig.tight_layout()
    savefig(fig, str(path))
    plt.close(fig)


if __name__ == "__main__":
    main()
