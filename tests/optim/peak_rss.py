"""One training step of a small Llama under a memory mode: its peak measured by MemTracker or as the resident
set size of a fresh process, and the planner's prediction (`planner.memory.estimate_memory`).

Run as ``python -m tests.optim.peak_rss KIND DTYPE LAYERWISE BITS``: prints the RSS peak of the second step
above the process's RSS before the model was built, after a warm-up run of the same model (Linux: VmHWM reset
through /proc/self/clear_refs), as JSON. `measure_rss` runs it with a fixed glibc mmap threshold.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch

from planner.memory import MemoryOptions, estimate_memory
from planner.plan import Layout
from planner.presets import MODEL_PRESETS
from planner.workload import OptimizerSpec, Workload

SPEC = dataclasses.replace(MODEL_PRESETS["llama-20m"], num_layers=2, hidden_size=256, num_heads=4,
                           num_kv_heads=4, ffn_hidden_size=704, vocab_size=8192)  # fmt: skip
BATCH, SEQ, RANK, DENSITY = 1, 32, 16, 0.25


def build_optimizer(kind: str, model: torch.nn.Module, *, layerwise: bool, bits: int = 0) -> Any:
    """The optimizer `kind` over `model` as the trainer builds it (lr 1e-4, the planner's defaults)."""
    from optim import FRUGAL, GaLoreAdamW, NaturalGaLoreAdamW, low_rank_param_groups
    from optim.per_param import PerParameterOptimizer, low_bit_adamw

    if kind == "adamw" and bits:
        params = [{"params": list(model.parameters()), "lr": 1e-4}]
        return PerParameterOptimizer(params, lambda g: low_bit_adamw(g, bits=bits))
    if kind == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        return PerParameterOptimizer.like(opt) if layerwise else opt
    if kind == "frugal":
        groups = low_rank_param_groups(model, switch_key="frugal", density=DENSITY)
        return FRUGAL(groups, lr=1e-4, state_bits=bits)
    groups = low_rank_param_groups(model, switch_key="galore", rank=RANK)
    make = NaturalGaLoreAdamW if kind == "natural_galore" else GaLoreAdamW
    return make(groups, lr=1e-4, state_bits=bits)


def _setup(
    kind: str, dtype: str, layerwise: bool, bits: int, spec: Any = SPEC
) -> tuple[Callable[[], None], Any, Any, Any]:
    from optim import LayerwiseStepper
    from tests.helpers import hf_model

    model = hf_model(spec)
    if dtype == "bf16":
        model.to(torch.bfloat16)  # pure bf16: no fp32 master, moments created like the parameters
    opt = build_optimizer(kind, model, layerwise=layerwise, bits=bits)
    stepper = LayerwiseStepper(opt) if layerwise else None
    ids = torch.randint(0, spec.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        model(ids, labels=ids).loss.backward()  # layer-wise: every parameter stepped in here
        if not layerwise:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step, model, opt, stepper


def measure_tracked(kind: str, dtype: str, layerwise: bool, bits: int = 0) -> int:
    """MemTracker's peak total bytes of one steady-state step (the optimizer state already exists)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from optim.per_param import PerParameterOptimizer

    step, model, opt, stepper = _setup(kind, dtype, layerwise, bits)
    inner = list(opt._inner.values()) if isinstance(opt, PerParameterOptimizer) else [opt]
    step()  # untracked: the optimizer state exists, as in steady state
    tracker = MemTracker()
    tracker.track_external(model, *inner)
    with tracker:
        step()
    if stepper is not None:
        stepper.remove()
    (snap,) = tracker.get_tracker_snapshot("peak").values()
    return int(next(v for k, v in snap.items() if str(k).split(".")[-1] == "Total"))


def predict(kind: str, dtype: str, layerwise: bool, bits: int = 0) -> int:
    """`estimate_memory` of the same step: pure precision, no clipping, torch's single-tensor AdamW (CPU)."""
    spec = OptimizerSpec(kind=kind, rank=RANK, density=DENSITY, state_bits=bits)  # type: ignore[arg-type]
    w = Workload(global_batch=BATCH, micro_batch=BATCH, seq_len=SEQ, dtype=dtype, precision="pure",  # type: ignore[arg-type]
                 layerwise=layerwise, max_grad_norm=0, optimizer=spec)  # fmt: skip
    options = MemoryOptions(optimizer_impl="single_tensor")
    return estimate_memory(SPEC, w, Layout(micro_batch=BATCH), options).total


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _rss_peak_here(kind: str, dtype: str, layerwise: bool, bits: int) -> int:
    import gc

    torch.set_num_threads(1)
    # Warm-up: one run of the same model first. The lazily imported modules (transformers' model classes,
    # bitsandbytes) and the kernels' first use at these shapes (code pages, oneDNN's JIT, thread scratch:
    # about 10 MiB more in bf16 after a warm-up on a smaller model) belong to the process, not to the step.
    warm = _setup(kind, dtype, layerwise, bits)
    warm[0]()
    warm[0]()
    if warm[3] is not None:
        warm[3].remove()
    del warm
    gc.collect()
    before = _status_kib("VmRSS")
    step, *_ = _setup(kind, dtype, layerwise, bits)
    step()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0, proc(5))
    step()
    return (_status_kib("VmHWM") - before) * 1024


def measure_rss(kind: str, dtype: str, layerwise: bool, bits: int = 0) -> int:
    """Peak RSS bytes of the same step in a fresh process, above its RSS before the model was built."""
    cmd = [sys.executable, "-m", "tests.optim.peak_rss", kind, dtype, str(int(layerwise)), str(bits)]
    # glibc's dynamic mmap threshold keeps freed tensors' memory in the heap, so the peak RSS of the same step
    # depended on the allocation order (101 and 120 MiB in two runs of layer-wise AdamW); with a fixed
    # threshold every tensor over 64 KiB is mapped and unmapped with its life, and RSS follows the live bytes.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300, env=env)
    return int(json.loads(out.stdout.strip().splitlines()[-1])["rss_peak_bytes"])


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore")
    k, d, lw, b = sys.argv[1], sys.argv[2], bool(int(sys.argv[3])), int(sys.argv[4])
    print(json.dumps({"rss_peak_bytes": _rss_peak_here(k, d, lw, b)}))
