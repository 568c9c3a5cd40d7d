"""What a training run reports: MFU/HFU against the device's GEMM peak, memory per tier, a progress line,
and the JSON summary benchmarks read."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from launch.train.config import Settings


def peak_flops_per_device(settings: Settings) -> float:
    """The GEMM peak the MFU is measured against: the plan's cluster, else this machine's probe cache.

    On a CPU the GEMM is also timed now and the larger figure taken: a peak probed while the machine was
    busy would put MFU above 100%.
    """
    from launch.measure.probe import CACHE_PATH, measure_gemm

    if settings.plan is not None:
        peak = settings.plan.cluster.device.flops(settings.dtype)
        if not torch.cuda.is_available():
            try:
                peak = max(peak, measure_gemm(settings.dtype, 1024, 5))
            except Exception:  # noqa: BLE001 - MFU is a report, never a reason to stop training
                pass
        return peak
    try:
        from planner.cluster import load_cluster

        if os.path.exists(CACHE_PATH):
            return load_cluster(CACHE_PATH).device.flops(settings.dtype)
        return measure_gemm(settings.dtype, 512, 3)
    except Exception:  # noqa: BLE001 - MFU is a report, never a reason to stop training
        return float("nan")


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass
class Progress:
    """Rank 0's progress display: a line per logged step (redrawn in place on a terminal)."""

    total: int
    stream: Any = sys.stderr
    start: float = field(default_factory=time.perf_counter)

    def show(self, text: str, *, final: bool = False) -> None:
        if self.stream.isatty():
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def mem_tracker() -> Any:
    """torch's MemTracker, also for models with frozen parameters (LoRA): its module hooks register a gradient
    hook on every parameter, which torch refuses on one that does not require grad; here only the trainable
    ones get it (the same bytes counted, the same categories)."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    class FrozenAwareMemTracker(MemTracker):
        def _track_module_params_and_buffers(self, module: Any, install_grad_hooks: bool = True) -> Any:
            out = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
            if install_grad_hooks:
                for param in module.parameters():
                    if param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:

                        def grad_hook(grad: torch.Tensor) -> None:
                            self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

                        self._param_to_grad_hook_handles[param] = (
                            param.register_hook(grad_hook),
                            param.register_post_accumulate_grad_hook(lambda p, h=grad_hook: h(p.grad)),
                        )
            return out

    return FrozenAwareMemTracker()


class MemoryProbe:
    """Peak memory per tier of one step: device (live tensors by category via torch's MemTracker on CPU,
    the CUDA allocator's peak on GPU) and the bytes in each host tier at the end of forward."""

    def __init__(self, model: torch.nn.Module, optimizer: Any, device: torch.device) -> None:
        self.device = device
        self.tracker = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            self.tracker = mem_tracker()
            opts = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else []
            self.tracker.track_external(model, *opts)

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        if self.tracker is None:
            yield
            return
        with self.tracker:
            yield

    def next_micro_batch(self) -> None:
        # MemTracker refuses a second forward of the same modules in one context unless the per-module stats
        # are cleared; the step's peak snapshot is kept
        if self.tracker is not None:
            self.tracker.reset_mod_stats()

    def result(self) -> dict[str, int]:
        if self.tracker is None:
            return {"device_peak_bytes": int(torch.cuda.max_memory_allocated(self.device))}
        snap = self.tracker.get_tracker_snapshot("peak")
        per_dev = snap.get(self.device, snap.get(torch.device("cpu"), {}))
        out = {"device_peak_bytes": int(per_dev.get("Total", 0))}
        for k, v in per_dev.items():
            name = getattr(k, "name", str(k))
            if name != "Total":
                out[f"device_{name.lower()}_bytes"] = int(v)
        return out


def tier_usage(handle: Any) -> dict[str, int]:
    """Bytes of swapped activations in each tier of offload.apply's handle."""
    if handle is None:
        return {}
    return {name: int(store.used_bytes) for name, store in getattr(handle, "tiers", {}).items()}


def optimizer_tier_bytes(optimizer: Any) -> dict[str, int]:
    """Bytes of an offloaded optimizer's state (fp32 master, two moments: 12 B/element) in each tier."""
    layouts, tiers = getattr(optimizer, "subgroups", None), getattr(optimizer, "subgroup_tiers", None)
    if layouts is None or tiers is None:
        return {}
    layouts = layouts() if callable(layouts) else layouts
    out: dict[str, int] = {}
    for layout, tier in zip(layouts, tiers):
        out[tier] = out.get(tier, 0) + 12 * int(layout.numel)
    return out


class StepObserver:
    """Forward hooks for what a step reports: the tiers' bytes when forward ends (every swapped block is out,
    none fetched back yet), and forward calls of each block's attention (2 where the block is recomputed:
    the check that the plan's checkpointing is really applied)."""

    def __init__(self, model: torch.nn.Module, handle: Any) -> None:
        self.handle = handle
        self.tiers_peak: dict[str, int] = {}
        self.attn_calls: dict[int, int] = {}
        self.hooks = [model.register_forward_hook(self._sample_tiers)]
        for i, block in enumerate(getattr(getattr(model, "model", None), "layers", [])):
            attn = getattr(block, "self_attn", None)
            if attn is not None:
                self.hooks.append(attn.register_forward_hook(self._counter(i)))

    def _sample_tiers(self, module: Any, inputs: Any, output: Any) -> None:
        for name, used in tier_usage(self.handle).items():
            self.tiers_peak[name] = max(self.tiers_peak.get(name, 0), used)

    def _counter(self, i: int) -> Any:
        def count(module: Any, inputs: Any, output: Any) -> None:
            self.attn_calls[i] = self.attn_calls.get(i, 0) + 1

        return count

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


@dataclass
class StepRates:
    """Model and hardware FLOPs of a step, and the peak they are measured against."""

    tokens_per_step: int
    model_flops: float
    hw_flops: float
    peak: float
    devices: int

    def mfu(self, dt: float) -> float:
        # never above 100%: a step faster than the peak means the peak was measured low (Appendix A of
        # Korthikanti et al. 2022 defines both against the hardware's peak)
        return min(1.0, self.model_flops / dt / (self.devices * self.peak))

    def hfu(self, dt: float) -> float:
        return min(1.0, self.hw_flops / dt / (self.devices * self.peak))


def step_line(
    step: int, total: int, loss: float, dt: float, rates: StepRates, tiers: str, mem_text: str
) -> str:
    return (
        f"step {step}/{total} | loss {loss:.4f} | {rates.tokens_per_step / dt:,.0f} tok/s | "
        f"MFU {100 * rates.mfu(dt):.1f}% HFU {100 * rates.hfu(dt):.1f}% | {dt:.2f} s/step{mem_text}"
        + (f" | tiers: {tiers}" if tiers else "")
        + f" | eta {(total - step) * dt:.0f} s"
    )


def tiers_text(tiers_peak: dict[str, int], optimizer: Any) -> str:
    opt_bytes = optimizer_tier_bytes(optimizer)
    return ", ".join(
        f"{k} {fmt_bytes(tiers_peak.get(k, 0))} activations + {fmt_bytes(opt_bytes.get(k, 0))} optimizer"
        for k in sorted(set(tiers_peak) | set(opt_bytes))
    )


def timing_summary(step_times: list[float], cpu_times: list[float], rates: StepRates) -> dict[str, Any]:
    timed = bool(step_times)
    med = statistics.median(step_times) if timed else float("nan")
    nan = float("nan")
    return {
        "timed_steps": len(step_times),
        "step_times_s": step_times,
        "step_time_s": med,
        "cpu_times_s": cpu_times,
        "cpu_time_s": statistics.median(cpu_times) if cpu_times else nan,
        "tokens_per_s": rates.tokens_per_step / med if timed else nan,
        "model_flops_per_step": rates.model_flops,
        "hardware_flops_per_step": rates.hw_flops,
        "achieved_flops": rates.model_flops / med / rates.devices if timed else nan,
        "peak_flops_per_device": rates.peak,
        # MFU counts model FLOPs only, HFU adds recompute (Korthikanti et al. 2022, Appendix A)
        "mfu": rates.mfu(med) if timed else nan,
        "hfu": rates.hfu(med) if timed else nan,
    }


def process_memory() -> dict[str, int]:
    """This process's real memory, beside the device-pool figures: on a CPU "device" the pool is MemTracker's
    count of live tensors, which leaves out the tiers' arenas, allocator slack and the runtime itself.
    `peak_rss_bytes` is the kernel's high-water mark (getrusage ru_maxrss, KiB on Linux)."""
    import resource

    import psutil

    rss = int(psutil.Process().memory_info().rss)
    # the kernel updates its high-water mark lazily: it can trail the current RSS by a few pages
    return {
        "peak_rss_bytes": max(rss, int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024),
        "rss_bytes": rss,
    }


def chunked_loss_calls(handle: Any, engine: Any) -> int:
    """Forwards whose loss the chunked loss computed: in the model's forward (offload.apply's handle), or in
    the last pipeline stage's loss function (launch.train.parallel.ChunkedHeadLoss)."""
    loss = getattr(handle, "loss", None)
    par = getattr(engine, "par", None)
    return int(getattr(loss, "calls", 0)) + int(getattr(getattr(par, "loss_fn", None), "calls", 0))


def compiled_blocks(handle: Any) -> dict[str, Any]:
    """A compiled plan's blocks: per block compiled and how, or eager and why (`OffloadHandle.compiled`), and
    the block calls run eagerly under a dispatch mode (the `--track-memory` step); empty for an eager plan."""
    compiler = getattr(handle, "compiler", None)
    if compiler is None:
        return {}
    return {"blocks": [dataclasses.asdict(b) for b in compiler.report()], "eager_calls": compiler.eager_calls}


def swap_stats(handle: Any) -> dict[str, Any]:
    return dataclasses.asdict(handle.stats) if handle is not None and hasattr(handle, "stats") else {}


def write_json_atomic(path: str, payload: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=2)
    os.replace(tmp, path)
