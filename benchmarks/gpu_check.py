"""The GPU check: one script that shows on a real accelerator what this project's CPU machines cannot.

    python benchmarks/gpu_check.py                 # on a CUDA machine, <= 8 min on one H100
    python benchmarks/gpu_check.py --dry-run       # the same control flow on CPU with tiny sizes (in the tests)

Sections, in order, each written to the JSON as soon as it ends (so a run stopped by its time budget
leaves what it measured):

1. ``cuda_tests``: the CUDA-only tests (``pytest -m gpu``): swap with streams, pinned round trips, the
   interleaved update.
2. ``bandwidth``: host<->device copies of one size through memtier's host tier (its arena: pinned on CUDA)
   against a plain copy from pageable and from pinned memory; and NVMe->device through the NVMe tier.
3. ``activations``: a ~1B-parameter Llama (bf16 on CUDA) at activation budgets of 100/50/25% of its
   no-offload peak: memtier's plan for each budget against plain PyTorch, recompute-all and torch's
   selective checkpointing (save the matmuls, recompute the rest; torchtitan's "op" policy), all in this
   run; measured peak (``torch.cuda.max_memory_allocated``) against the plan's prediction.
4. ``optimizer_offload``: memtier's interleaved optimizer offload against DeepSpeed ZeRO-Offload (CPU Adam)
   on the same model: tokens/s and device peak (DeepSpeed only where it is importable and its CPU Adam
   op is built or can be built within the time left).
5. ``ssd_offload``: the model state streamed from the NVMe tier per block (`offload.state`) against the
   same model resident: a streamed plan for a device budget of a quarter of the resident peak; step time,
   device peak and losses, against the plan's predictions.

Measured: step times (median of the timed steps after warm-up), device peaks. Predicted: the plan's peak
and step time. Everything is a ratio against a baseline measured in the same run. On a bare GPU machine the
packages it needs beyond torch/transformers come from wheels carried with the tree
(``make gpu-wheels`` here, then ``benchmarks/gpu_check.sh`` there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from launch.measure.record import savefig  # noqa: E402
from planner.model import ModelSpec  # noqa: E402

OUT_DIR = os.path.join(ROOT, "benchmarks", "results", "gpu")
GPU_TEST_FILES = (
    "tests/offload/test_activations.py",
    "tests/offload/test_optimizer_offload.py",
    "tests/offload/tiers/test_tiers_memory.py",
    "tests/offload/tiers/test_tiers_nvme.py",
)
BUDGETS = (1.0, 0.5, 0.25)
SECTIONS = ("cuda_tests", "bandwidth", "activations", "optimizer_offload", "ssd_offload")
# ~1.1B parameters, Llama-2 shapes scaled down (hidden 2048, 16 blocks, GQA 16/8 heads)
LLAMA_1B = ModelSpec(
    name="llama-1b", num_layers=16, hidden_size=2048, num_heads=16, num_kv_heads=8, ffn_hidden_size=5632,
    vocab_size=32000, max_position_embeddings=4096,
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Config:
    dry_run: bool
    budget_s: float
    out_dir: str
    spec: ModelSpec
    dtype: torch.dtype
    micro_batch: int
    seq: int
    steps: int  # timed steps after one warm-up
    copy_bytes: int
    disk: str | None
    # ssd_offload: the streamed run's device budget, a share of the resident run's measured peak (the dry run's
    # tiny model needs more: one streamed block's buffers are a larger share of its peak)
    ssd_device_share: float


def config(args: argparse.Namespace) -> Config:
    from planner.presets import MODEL_PRESETS

    if args.dry_run:
        return Config(
            dry_run=True, budget_s=args.budget_s, out_dir=args.out, spec=MODEL_PRESETS["tiny-llama"],
            dtype=torch.float32, micro_batch=2, seq=64, steps=1, copy_bytes=4 << 20, disk=args.disk,
            ssd_device_share=0.6,
        )  # fmt: skip
    return Config(
        dry_run=False, budget_s=args.budget_s, out_dir=args.out, spec=LLAMA_1B, dtype=torch.bfloat16,
        micro_batch=4, seq=2048, steps=4, copy_bytes=1 << 30, disk=args.disk, ssd_device_share=0.25,
    )  # fmt: skip


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory, sm_count=props.multi_processor_count)
    for name in ("transformers", "deepspeed", "pulp"):
        try:
            env[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - recorded as absent
            env[name] = None
    with contextlib.suppress(Exception):
        env["commit"] = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    return env


class Budget:
    """The script's own time limit: a section starts only when its estimate fits in what is left."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


# ------------------------------------------------------------------------------------------- 1. tests
def cuda_tests(cfg: Config, budget: Budget) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *GPU_TEST_FILES]
    timeout = max(10.0, min(240.0, budget.left() - 60))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "timeout_s": timeout}
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {
        k: int(n) for n, k in _pairs(tail) if k in ("passed", "failed", "skipped", "error", "deselected")
    }
    return {"status": "ok" if proc.returncode in (0, 5) else "failed", "rc": proc.returncode, "summary": tail,
            **counts}  # fmt: skip


def _pairs(line: str) -> Iterator[tuple[str, str]]:
    words = line.replace(",", " ").split()
    for a, b in zip(words, words[1:]):
        if a.isdigit():
            yield a, b


# ------------------------------------------------------------------------------------------- 2. bandwidth
def _rate(nbytes: int, fn: Callable[[], None], reps: int = 3) -> float:
    """Median GB/s of `fn` (one copy of `nbytes`), after one warm-up."""
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def _copy_rates(nbytes: int, dev: torch.device) -> dict[str, float]:
    on_dev = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    out: dict[str, float] = {}
    kinds = [("pageable", False)] + ([("pinned", True)] if dev.type == "cuda" else [])
    for name, pin in kinds:
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        out[f"{name}_h2d_GBps"] = _rate(nbytes, lambda h=host: on_dev.copy_(h))
        out[f"{name}_d2h_GBps"] = _rate(nbytes, lambda h=host: h.copy_(on_dev))
    return out


def _tier_rates(store: Any, nbytes: int, dev: torch.device) -> dict[str, float]:
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    handles: list[Any] = []

    def put() -> None:
        while handles:
            store.free(handles.pop())
        handles.append(store.put(src))
        store.synchronize()

    def get() -> None:
        store.get(handles[-1], out=dst)

    out = {"d2h_GBps": _rate(nbytes, put), "h2d_GBps": _rate(nbytes, get)}
    out["exact"] = bool(torch.equal(src, dst))
    return out


def bandwidth(cfg: Config, budget: Budget) -> dict[str, Any]:
    from offload.tiers import HostTier, NvmeTier

    dev, n = device(), cfg.copy_bytes
    result: dict[str, Any] = {"bytes": n, "plain": _copy_rates(n, dev)}
    with HostTier(capacity_bytes=2 * n + (1 << 20)) as host:
        result["memtier_host_tier"] = {
            **_tier_rates(host, n, dev),
            "pinned": bool(getattr(host, "pinned", False)),
        }
    disk = cfg.disk or tempfile.gettempdir()
    if budget.left() > 60:
        with NvmeTier(path=disk, capacity_bytes=2 * n + (16 << 20)) as nvme:
            result["memtier_nvme_tier"] = {
                **_tier_rates(nvme, n, dev),
                "path": disk,
                "engine": nvme.io_engine,
            }
    return result


# ------------------------------------------------------------------------------------------- 3. activations
def build_model(spec: ModelSpec, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.ffn_hidden_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads or spec.num_heads, max_position_embeddings=spec.max_position_embeddings,
        use_cache=False,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device(), dtype=dtype)


@dataclass
class Measured:
    step_s: float
    peak_bytes: int
    losses: list[float] = field(default_factory=list)


def measure_steps(model: torch.nn.Module, optimizer: Any, ids: torch.Tensor, steps: int) -> Measured:
    """One warm-up step, `steps` timed ones, then one step whose device peak is measured (on CPU the tracker
    slows the step it watches, so it is not one of the timed ones)."""
    from launch.train.metrics import MemoryProbe

    losses: list[float] = []

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss))

    step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    probe = MemoryProbe(model, optimizer, ids.device)
    with probe.track():
        step()
        sync()
    return Measured(
        step_s=statistics.median(times), peak_bytes=probe.result()["device_peak_bytes"], losses=losses
    )


@contextlib.contextmanager
def selective_checkpointing(model: torch.nn.Module) -> Iterator[None]:
    """torch's selective activation checkpointing on every block: matmul outputs saved, the rest recomputed."""
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    save = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    blocks = list(model.model.layers)
    originals = [b.forward for b in blocks]
    for block, forward in zip(blocks, originals):

        def wrapped(*a: Any, _f: Any = forward, **kw: Any) -> Any:
            ctx = lambda: create_selective_checkpoint_contexts(policy)  # noqa: E731
            return checkpoint(_f, *a, use_reentrant=False, context_fn=ctx, **kw)

        block.forward = wrapped
    try:
        yield
    finally:
        for block, forward in zip(blocks, originals):
            block.forward = forward


def cluster_for_this_device(spec_memory: int) -> Any:
    """The cluster the plans are made for: this GPU on the dgx-h100-8 preset's links, or (dry run) a CPU."""
    import dataclasses

    from planner.cluster import ClusterSpec, CpuSpec, DeviceSpec, Link, Links, TierSpec
    from planner.presets import resolve_cluster

    if torch.cuda.is_available():
        base = resolve_cluster("dgx-h100-8", nodes=1)
        dev = dataclasses.replace(base.device, memory=spec_memory)
        return dataclasses.replace(base, devices_per_node=1, device=dev)
    dev = DeviceSpec(kind="cpu", memory=spec_memory, peak_flops={"fp32": 5e10}, efficiency=0.5,
                     host_link=Link(bandwidth=5e9))  # fmt: skip
    return ClusterSpec(
        name="dry-run-cpu", devices_per_node=1, device=dev,
        links=Links(intra_node=Link(bandwidth=5e9), inter_node=Link(bandwidth=1e9)),
        host=(TierSpec(kind="dram", capacity=8 << 30, read_bandwidth=5e9, write_bandwidth=5e9),),
        cpu=CpuSpec(cores=2, peak_flops=5e10, adam_params_per_s=2e8),
    )  # fmt: skip


def workload(cfg: Config) -> Any:
    from planner.workload import Workload

    dtype = "bf16" if cfg.dtype == torch.bfloat16 else "fp32"
    # the runs train bf16 weights with torch's AdamW on them: pure 16-bit (no fp32 master, 16-bit moments).
    # The first H100 run (2026-12-06) planned them as mixed precision and every prediction was 7.1 GB high.
    return Workload(
        global_batch=cfg.micro_batch,
        micro_batch=cfg.micro_batch,
        seq_len=cfg.seq,
        dtype=dtype,
        precision="pure",
    )


def this_cluster() -> Any:
    return cluster_for_this_device(
        torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 8 << 30
    )


def plan_at(cfg: Config, budget_bytes: int, *, optimizer_offload: bool = False) -> Any:
    """memtier's plan for this model, workload and device-memory budget (the planner's budget mode)."""
    from planner.budget import plan_for_budget

    return plan_for_budget(
        cfg.spec, this_cluster(), workload(cfg), budget_bytes=budget_bytes, optimizer_offload=optimizer_offload,
        optimizer_impl="fused",
    ).plan  # fmt: skip


def _run(cfg: Config, ids: torch.Tensor, setup: Callable[[torch.nn.Module, Any], Any]) -> Measured:
    """A fresh model and fused AdamW, `setup(model, optimizer)` (a context manager, or None), then the steps."""
    model = build_model(cfg.spec, cfg.dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ctx = setup(model, optimizer) or contextlib.nullcontext()
    with ctx as handle:
        opt = getattr(handle, "optimizer", None) or optimizer
        out = measure_steps(model, opt, ids, cfg.steps)
    del model, optimizer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def activations(cfg: Config, budget: Budget) -> dict[str, Any]:
    import offload
    from planner.plan import ActivationPolicy
    from planner.planning import fixed_plan

    ids = torch.randint(0, cfg.spec.vocab_size, (cfg.micro_batch, cfg.seq), device=device())
    rows: dict[str, Any] = {}
    base = _run(cfg, ids, lambda m, o: None)
    rows["pytorch"] = {"step_s": base.step_s, "peak_bytes": base.peak_bytes}
    recompute = tuple(
        ActivationPolicy(layer=i, keep_fraction=0.0, recompute_fraction=1.0)
        for i in range(cfg.spec.num_layers)
    )
    plan_all = fixed_plan(cfg.spec, this_cluster(), workload(cfg), activations=recompute)
    for name, setup in (
        ("recompute_all", lambda m, o: offload.apply(m, None, plan_all)),
        ("torch_selective", lambda m, o: selective_checkpointing(m)),
    ):
        r = _run(cfg, ids, setup)
        rows[name] = {"step_s": r.step_s, "peak_bytes": r.peak_bytes}
    for f in BUDGETS:
        if budget.left() < 30:
            rows[f"memtier@{int(100 * f)}"] = {"status": "skipped: out of time"}
            continue
        target = int(f * base.peak_bytes)
        try:
            plan = plan_at(cfg, target)
        except Exception as exc:  # noqa: BLE001 - an infeasible budget is a result
            rows[f"memtier@{int(100 * f)}"] = {"status": f"no plan: {exc}", "budget_bytes": target}
            continue
        r = _run(cfg, ids, lambda m, o, p=plan: offload.apply(m, None, p))
        rows[f"memtier@{int(100 * f)}"] = {
            "budget_bytes": target, "step_s": r.step_s, "peak_bytes": r.peak_bytes, "fits": r.peak_bytes <= target,
            "predicted_peak_bytes": plan.predicted.peak_bytes, "predicted_step_s": plan.predicted.step_time_s,
            "peak_error": r.peak_bytes / max(1, plan.predicted.peak_bytes) - 1,
        }  # fmt: skip
    for row in rows.values():
        if "step_s" in row:
            row["speed_vs_pytorch"] = base.step_s / row["step_s"]
            row["peak_vs_pytorch"] = row["peak_bytes"] / max(1, base.peak_bytes)
    tokens = cfg.micro_batch * cfg.seq
    return {"model": cfg.spec.name, "params": cfg.spec.params, "tokens_per_step": tokens, "rows": rows}


# ------------------------------------------------------------------------------------------- 4. optimizer
def _deepspeed_zero_offload(cfg: Config, ids: torch.Tensor) -> dict[str, Any]:
    try:
        import deepspeed
    except Exception as exc:  # noqa: BLE001 - recorded
        return {"status": f"not importable: {exc}"}
    if cfg.dry_run and not os.path.exists(os.path.join(_extensions_dir(), "cpu_adam", "cpu_adam.so")):
        return {
            "status": "skipped in the dry run: DeepSpeed's cpu_adam op is not built (a JIT build takes minutes)"
        }
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    ds_cfg = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": torch.cuda.is_available()}},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
        "bf16": {"enabled": cfg.dtype == torch.bfloat16},
    }  # fmt: skip
    model = build_model(cfg.spec, cfg.dtype)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_cfg)

    class _Steps:  # the engine steps itself
        def step(self) -> None:
            engine.step()

        def zero_grad(self, set_to_none: bool = True) -> None:
            pass

    r = measure_steps(_EngineModel(engine), _Steps(), ids, cfg.steps)
    return {"status": "ok", "step_s": r.step_s, "peak_bytes": r.peak_bytes}


class _EngineModel(torch.nn.Module):
    """A DeepSpeed engine behind the model interface `measure_steps` uses (its backward is the engine's)."""

    def __init__(self, engine: Any) -> None:
        super().__init__()
        self.engine = engine

    def forward(self, **kw: Any) -> Any:
        out = self.engine(**kw)
        loss = out.loss
        engine = self.engine

        class _Loss:
            def backward(self) -> None:
                engine.backward(loss)

            def __float__(self) -> float:
                return float(loss)

        out.loss = _Loss()
        return out


def _extensions_dir() -> str:
    from torch.utils.cpp_extension import get_default_build_root

    return os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()


def optimizer_offload(cfg: Config, budget: Budget) -> dict[str, Any]:
    import offload
    from planner.plan import OptimizerPlan, TierPlan

    ids = torch.randint(0, cfg.spec.vocab_size, (cfg.micro_batch, cfg.seq), device=device())
    base = _run(cfg, ids, lambda m, o: None)
    plan = plan_at(cfg, 1 << 50)
    state_bytes = 16 * cfg.spec.params + (64 << 20)
    plan = plan.replace(
        optimizer=OptimizerPlan(kind="adamw", offload=True, tier="dram"),
        tiers=(TierPlan(kind="dram", capacity_bytes=state_bytes),),
    )
    mem = _run(cfg, ids, lambda m, o: offload.apply(m, o, plan))
    rows: dict[str, Any] = {
        "pytorch": {"step_s": base.step_s, "peak_bytes": base.peak_bytes},
        "memtier_offload": {"step_s": mem.step_s, "peak_bytes": mem.peak_bytes},
    }
    rows["deepspeed_zero_offload"] = (
        _deepspeed_zero_offload(cfg, ids) if budget.left() > 120 else {"status": "skipped: out of time"}
    )
    for row in rows.values():
        if "step_s" in row:
            row["speed_vs_pytorch"] = base.step_s / row["step_s"]
    return {"rows": rows}


def nvme_cluster(cluster: Any, disk: str, probe_bytes: int) -> Any:
    """`cluster` with its host tiers replaced by one NVMe tier at `disk` (its write and read bandwidth measured
    here, 90% of the free space): the streamed state goes to the SSD, not to DRAM."""
    import dataclasses
    import shutil

    from launch.measure.probe import measure_disk
    from planner.cluster import TierSpec

    write_bps, read_bps, _direct = measure_disk(disk, probe_bytes)
    nvme = TierSpec(kind="nvme", capacity=int(0.9 * shutil.disk_usage(disk).free), read_bandwidth=read_bps,
                    write_bandwidth=write_bps, path=disk)  # fmt: skip
    return dataclasses.replace(cluster, host=(nvme,))


def ssd_offload(cfg: Config, budget: Budget) -> dict[str, Any]:
    """The model state (parameters, gradients, optimizer state) streamed from the NVMe tier per block
    (`offload.state`) on this device, against the same model resident: a streamed plan
    (`planner.planning.streamed_plan`, every group streamed) for a device budget of `Config.ssd_device_share` of
    the resident run's measured peak. Measured: step time, device peak, losses step by step; predicted: the plan's
    peak and step."""
    import dataclasses

    import offload
    from planner.errors import InfeasibleError
    from planner.planning import streamed_plan

    if cfg.disk is None:
        return {"status": "skipped: no --disk for the NVMe tier"}
    ids = torch.randint(0, cfg.spec.vocab_size, (cfg.micro_batch, cfg.seq), device=device())
    torch.manual_seed(0)
    base = _run(cfg, ids, lambda m, o: None)
    target = int(cfg.ssd_device_share * base.peak_bytes)
    cluster = nvme_cluster(this_cluster(), cfg.disk, cfg.copy_bytes)
    rows: dict[str, Any] = {
        "pytorch": {"step_s": base.step_s, "peak_bytes": base.peak_bytes, "losses": base.losses}
    }
    try:
        plan = streamed_plan(cfg.spec, cluster, workload(cfg), budget=target, micro_batch=cfg.micro_batch,
                             stream_all=True)  # fmt: skip
    except InfeasibleError as exc:
        rows["memtier_ssd"] = {"status": f"no plan: {exc}", "budget_bytes": target}
        return {"model": cfg.spec.name, "rows": rows}
    torch.manual_seed(0)
    # every streamed step moves the whole state through the SSD (seconds for 1B parameters): 2 timed steps
    r = _run(dataclasses.replace(cfg, steps=min(cfg.steps, 2)), ids, lambda m, o: offload.apply(m, o, plan))
    rows["memtier_ssd"] = {
        "budget_bytes": target, "step_s": r.step_s, "peak_bytes": r.peak_bytes, "fits": r.peak_bytes <= target,
        "predicted_peak_bytes": plan.predicted.peak_bytes, "predicted_step_s": plan.predicted.step_time_s,
        "peak_error": r.peak_bytes / max(1, plan.predicted.peak_bytes) - 1,
        "step_error": r.step_s / max(1e-9, plan.predicted.step_time_s) - 1,
        "speed_vs_pytorch": base.step_s / r.step_s, "peak_vs_pytorch": r.peak_bytes / max(1, base.peak_bytes),
        "losses": r.losses,
        "max_loss_diff": max((abs(a - b) for a, b in zip(r.losses, base.losses)), default=None),
        "bytes_by_tier": {t: n for t, n in plan.predicted.bytes_by_tier.items() if n},
    }  # fmt: skip
    return {"model": cfg.spec.name, "device_share": cfg.ssd_device_share, "rows": rows}


SECTION_FNS: dict[str, Callable[[Config, Budget], dict[str, Any]]] = {
    "cuda_tests": cuda_tests,
    "bandwidth": bandwidth,
    "activations": activations,
    "optimizer_offload": optimizer_offload,
    "ssd_offload": ssd_offload,
}
MIN_SECONDS = {
    "cuda_tests": 20,
    "bandwidth": 20,
    "activations": 90,
    "optimizer_offload": 60,
    "ssd_offload": 60,
}


# ------------------------------------------------------------------------------------------- report
def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    acts = result["sections"].get("activations", {}).get("rows", {})
    names = [n for n, r in acts.items() if "step_s" in r]
    axes[0].bar(names, [acts[n]["speed_vs_pytorch"] for n in names], color="tab:blue")
    axes[0].set_ylabel("speed vs plain PyTorch (x)")
    axes[0].set_title("activation strategies (same run)")
    axes[0].tick_params(axis="x", rotation=30)
    bw = result["sections"].get("bandwidth", {})
    labels, values = [], []
    for key, sub in (("plain", bw.get("plain", {})), ("memtier host", bw.get("memtier_host_tier", {})),
                     ("memtier nvme", bw.get("memtier_nvme_tier", {}))):  # fmt: skip
        for k, v in sub.items():
            if k.endswith("GBps"):
                labels.append(f"{key} {k.replace('_GBps', '')}")
                values.append(v)
    axes[1].barh(labels, values, color="tab:green")
    axes[1].set_xlabel("GB/s")
    axes[1].set_title(f"copies of {bw.get('bytes', 0) / 2**20:.0f} MiB")
    fig.suptitle(f"memtier GPU check ({result['environment'].get('gpu', 'CPU dry run')})")
    fig.tight_layout()
    savefig(fig, path)
    plt.close(fig)


def write(result: dict[str, Any], out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "gpu_check.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(result, fh, indent=2, default=str)
    os.replace(path + ".tmp", path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: the control flow only")
    p.add_argument("--budget-s", type=float, default=480.0, help="the script's own time limit (s)")
    p.add_argument("--out", default=OUT_DIR)
    p.add_argument("--disk", default=None, help="a directory on the local disk for the NVMe tier")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    cfg, budget = config(args), Budget(args.budget_s)
    result: dict[str, Any] = {"dry_run": cfg.dry_run, "environment": environment(), "sections": {}}
    for name in args.sections:
        if budget.left() < MIN_SECONDS[name]:
            result["sections"][name] = {"status": f"skipped: {budget.left():.0f} s left of the time budget"}
        else:
            t0 = time.monotonic()
            print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
            try:
                result["sections"][name] = SECTION_FNS[name](cfg, budget)
            except Exception as exc:  # noqa: BLE001 - one failed section must not lose the others
                result["sections"][name] = {"status": f"error: {type(exc).__name__}: {exc}"}
            result["sections"][name]["seconds"] = time.monotonic() - t0
        write(result, cfg.out_dir)  # partial results survive a stop
    plot(result, os.path.join(cfg.out_dir, "gpu_check.png"))
    print(f"[gpu_check] wrote {write(result, cfg.out_dir)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
