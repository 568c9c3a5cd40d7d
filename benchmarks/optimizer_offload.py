"""What does offloading the optimizer state cost per step, and how fast is memtier's CPU update?

Side by side in one run, on a Llama built from a planner preset (``llama-300m``; ``--quick``: ``llama-34m``),
fp32, the same data and thread count for every configuration:

1. step time (forward + backward of ``--accum`` micro-batches, then the optimizer step), each configuration
   in its own process (fresh memory, same settings):

   resident        ``torch.optim.AdamW(fused=True)``, state in device memory: the baseline
   memtier-device  memtier's optimizer with the state on the device (the runtime's no-offload path)
   memtier-host    state in the host-DRAM tier, interleaved CPU/device updates (the scheduler decides);
                   the CPU lane updates the state in place through the arena's ``view(handle)``
   memtier-nvme    state in the NVMe tier (files under ``--nvme-dir``), prefetched and written behind
   deepspeed       DeepSpeed ZeRO-2 with ``offload_optimizer: cpu`` (gloo, world size 1, DeepSpeedCPUAdam)

   On a CPU-only machine the "device" is the CPU, so "resident" is the best case and every offload adds
   copies; the ratios are what offload costs here, not what it saves on a GPU.

2. CPU-update throughput, parameters per second of ``step()`` + ``zero_grad()`` on the same fp32 parameters and
   gradients, the same thread count: torch's fused AdamW (``torch.optim.AdamW(fused=True)``), DeepSpeed's CPU
   Adam (``DeepSpeedCPUAdam``; its op is compiled on first use, ~100 s, skipped with a reason if that fails),
   and memtier's ``OffloadedAdamW`` with every update on the CPU lane and the state in the host tier (in
   place in the arena) or the NVMe tier (staged: read ahead, written behind), plus the kernel phase alone of
   the host run. memtier's path is all of what its optimizer does on a CPU device: its arena and (moved at
   construction) the parameters sit in transparent huge pages, the baselines' parameters where torch put them.
   Issue #7's target: memtier-host >= the faster of the two kernels.

Results: ``benchmarks/results/optimizer_offload[_quick].json`` and ``.png``; ratios are against the
baseline measured in the same run. Run from the repository root:
``python -m benchmarks.optimizer_offload --quick``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("resident", "deepspeed", "memtier-device", "memtier-host", "memtier-nvme")
KERNELS = ("torch_fused", "deepspeed", "memtier")
MODELS = ("llama-34m", "llama-300m", "llama-20m", "tiny-llama")


def log(msg: str) -> None:
    print(f"[optimizer_offload {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- worker: one configuration's training steps -----------------------------------------------------------------


def _build_model(name: str, seed: int):
    import torch
    import transformers

    from planner.model import to_hf_config_dict
    from planner.presets import MODEL_PRESETS

    spec = MODEL_PRESETS[name]
    d = to_hf_config_dict(spec)
    config = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.train()
    return spec, model


def _rss_peak_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _memtier_optimizer(args: argparse.Namespace, model: Any, hyper: dict[str, Any]) -> tuple[Any, str | None]:
    """memtier's OffloadedAdamW with its state in the configuration's tier; (optimizer, its NVMe directory)."""
    from offload.optimizer import OffloadedAdamW, OffloadSettings
    from planner.plan import OptimizerPlan, TierPlan

    tier = {
        "memtier-device": "device",
        "memtier-host": "dram",
        "memtier-nvme": "nvme",
    }[args.worker]
    tier_plans: tuple[TierPlan, ...] = ()
    nvme_dir = None
    if tier == "nvme":
        nvme_dir = tempfile.mkdtemp(prefix="memtier-opt-", dir=args.nvme_dir)
        tier_plans = (TierPlan(kind="nvme", capacity_bytes=0, path=nvme_dir),)
    opt = OffloadedAdamW(
        model.parameters(),
        placement=OptimizerPlan(offload=tier != "device", tier=tier, subgroup_size=args.subgroup_size),  # type: ignore[arg-type]
        tier_plans=tier_plans,
        settings=OffloadSettings(
            grad_accum=args.accum,
            max_grad_norm=args.clip,
            cpu_kernel=args.kernel,
            nvme_io_engine=args.io_engine,
        ),
        **hyper,
    )
    return opt, nvme_dir


def _deepspeed_engine(args: argparse.Namespace, model: Any, hyper: dict[str, Any]) -> tuple[Any, Any]:
    """DeepSpeed ZeRO-2 with CPU optimizer offload, one gloo rank; (engine, optimizer)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")  # fmt: skip
    import deepspeed
    import deepspeed.ops

    # NOTE: DeepSpeed's CPU comm backend would compile a shared-memory op; one process needs only gloo
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": args.accum,
        # buckets of 5e7 elements (DeepSpeed's default 5e8 would allocate 2 GB fp32 buffers each)
        "zero_optimization": {
            "stage": 2,
            "offload_optimizer": {"device": "cpu", "pin_memory": False},
            "reduce_bucket_size": int(5e7),
            "allgather_bucket_size": int(5e7),
            "contiguous_gradients": True,
        },
        "optimizer": {"type": "AdamW", "params": {**hyper, "betas": list(hyper["betas"])}},
        "gradient_clipping": args.clip or 0.0,
        "steps_per_print": 1 << 30,
    }
    engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine, opt


def _train_steps(
    args: argparse.Namespace, model: Any, data: list[Any], engine: Any, opt: Any
) -> dict[str, Any]:
    """Warm-up then measured steps (forward + backward of `args.accum` micro-batches, then the optimizer
    step); medians of the measured ones and every step's loss."""
    import torch

    fwd_bwd, step_s, update_s, losses = [], [], [], []
    k = 0
    for it in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        total = 0.0
        for micro in range(args.accum):
            ids = data[k]
            k += 1
            if engine is not None:
                loss = engine(input_ids=ids, labels=ids).loss
                engine.backward(loss)
                if micro < args.accum - 1:
                    engine.step()  # an accumulation boundary only on the last micro-batch
            else:
                loss = model(input_ids=ids, labels=ids).loss / args.accum
                loss.backward()
            total += float(loss.detach())
        if args.clip and args.worker == "resident":
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        t1 = time.perf_counter()
        if engine is not None:
            engine.step()
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if it >= args.warmup:
            fwd_bwd.append(t1 - t0)
            update_s.append(t2 - t1)
            step_s.append(t2 - t0)
        losses.append(total)
        log(
            f"{args.worker}: step {it + 1}/{args.warmup + args.steps} {t2 - t0:.2f} s (optimizer {t2 - t1:.2f} s)"
        )
    return {
        "step_s": statistics.median(step_s),
        "fwd_bwd_s": statistics.median(fwd_bwd),
        "optimizer_s": statistics.median(update_s),
        "step_s_all": step_s,
        "losses": losses,
    }


def _memtier_schedule(opt: Any, warmup: int) -> dict[str, Any]:
    """What memtier's scheduler decided and measured over the measured steps."""
    recs = list(opt.schedule_log)[warmup:]
    rates = opt.throughputs
    return {
        "schedule": [
            {
                "strategy": r.schedule.strategy,
                "phase": r.schedule.phase,
                "device_subgroups": len(r.schedule.device_subgroups),
                "subgroups": len(r.schedule.sides),
                "predicted_s": r.schedule.predicted_s,
                "measured_s": r.wall_s,
                "cpu_busy_s": r.busy_s("cpu"),
                "device_busy_s": r.busy_s("device"),
                "fallbacks": len(r.fallbacks),
            }
            for r in recs
        ],
        "measured_rates": {
            "cpu_params_per_s": rates.cpu_params_per_s,
            "device_params_per_s": rates.device_params_per_s,
            "h2d_bytes_per_s": rates.h2d_bytes_per_s,
            "d2h_bytes_per_s": rates.d2h_bytes_per_s,
            "read_bytes_per_s": dict(rates.read_bytes_per_s),
            "write_bytes_per_s": dict(rates.write_bytes_per_s),
        },
    }


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    spec, model = _build_model(args.model, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(args.seed + 1)
    data = [
        torch.randint(0, spec.vocab_size, (args.micro_batch, args.seq), generator=gen)
        for _ in range((args.warmup + args.steps) * args.accum)
    ]
    hyper: dict[str, Any] = {"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.01}
    info: dict[str, Any] = {"config": args.worker, "params": n_params}
    engine = None
    opt: Any = None
    nvme_dir = None
    if args.worker == "resident":
        opt = torch.optim.AdamW(model.parameters(), fused=True, **hyper)
    elif args.worker.startswith("memtier"):
        opt, nvme_dir = _memtier_optimizer(args, model, hyper)
        info["subgroups"] = len(opt.subgroups)
        info["cpu_kernel"] = opt.cpu_kernel_name
    elif args.worker == "deepspeed":
        engine, opt = _deepspeed_engine(args, model, hyper)
        info["optimizer"] = f"{type(opt).__name__}/{type(getattr(opt, 'optimizer', None)).__name__}"
    else:
        raise SystemExit(f"unknown config {args.worker!r}")

    info.update(_train_steps(args, model, data, engine, opt))
    info["peak_rss_bytes"] = _rss_peak_bytes()
    if args.worker.startswith("memtier"):
        info.update(_memtier_schedule(opt, args.warmup))
        opt.remove()
    if nvme_dir:
        shutil.rmtree(nvme_dir, ignore_errors=True)
    return info


# ---- worker: CPU-update throughput ------------------------------------------------------------------------------


def run_kernels(args: argparse.Namespace) -> dict[str, Any]:
    """Best-of-``repeats`` ``step()`` throughput of each optimizer, measured round-robin (load drifts hit all
    alike), every one on its own copy of the same parameters and gradients."""
    import torch

    from offload.optimizer import OffloadedAdamW, OffloadSettings
    from offload.optimizer.kernels import deepspeed_cpu_adam_status, select_cpu_kernel
    from planner.plan import OptimizerPlan, TierPlan

    torch.set_num_threads(args.threads)
    pieces = 4  # tensors of numel / 4: large enough that per-call overheads do not dominate
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(args.kernel_numel // pieces, generator=gen) for _ in range(pieces)]
    grads = [torch.randn(args.kernel_numel // pieces, generator=gen).mul_(1e-3) for _ in range(pieces)]
    total = sum(t.numel() for t in init)
    hyper: dict[str, Any] = {"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.01}
    out: dict[str, Any] = {"numel": total, "repeats": args.kernel_repeats, "tensors": pieces,
                           "threads": torch.get_num_threads()}  # fmt: skip

    def fresh() -> list[torch.nn.Parameter]:
        return [torch.nn.Parameter(t.clone()) for t in init]

    steppers: dict[str, tuple[Any, list[torch.nn.Parameter]]] = {}
    params = fresh()
    steppers["torch_fused"] = (torch.optim.AdamW(params, fused=True, **hyper), params)
    ok, why = deepspeed_cpu_adam_status(build=args.build_deepspeed)
    if ok:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        params = fresh()
        steppers["deepspeed"] = (DeepSpeedCPUAdam(params, adamw_mode=True, **hyper), params)
    else:
        out["deepspeed"] = None
        out["deepspeed_skipped"] = why
        log(f"DeepSpeed CPU Adam skipped: {why}")
    out["memtier_selected_kernel"] = select_cpu_kernel("auto", build=False)
    nvme_dir = tempfile.mkdtemp(prefix="memtier-opt-kernels-", dir=args.nvme_dir)
    memtier: dict[str, OffloadedAdamW] = {}
    for name, tier in (("memtier_host", "dram"), ("memtier_nvme", "nvme")):
        params = fresh()
        memtier[name] = OffloadedAdamW(
            params,
            placement=OptimizerPlan(
                offload=True, tier=tier, subgroup_size=args.kernel_subgroup_size or total
            ),  # type: ignore[arg-type]
            tier_plans=(TierPlan(kind="nvme", capacity_bytes=0, path=nvme_dir),),
            settings=OffloadSettings(schedule="cpu", cpu_kernel=args.kernel, nvme_io_engine=args.io_engine),
            **hyper,
        )
        steppers[name] = (memtier[name], params)
    out["memtier_subgroups"] = len(memtier["memtier_host"].subgroups)
    # memtier moves fp32 CPU parameters into huge pages (OffloadSettings.huge_page_params); the others keep theirs
    out["memtier_params_in_huge_pages"] = memtier["memtier_host"].params_in_huge_pages

    best = {name: float("inf") for name in steppers}
    # NVMe in a round of its own: its reads ahead for the next step would otherwise overlap the others' timing
    for group in ([name for name in steppers if name != "memtier_nvme"], ["memtier_nvme"]):
        for i in range(args.kernel_repeats + 1):
            for name in group:
                opt, ps = steppers[name]
                # NOTE: the same gradient tensors every time (no optimizer here writes them: no clipping), so
                # dropping a gradient never frees memory -- the allocator's free/munmap cost, which depends on
                # the heap's history, stays out of every optimizer's timing alike
                for p, g in zip(ps, grads):
                    p.grad = g
                t = time.perf_counter()
                opt.step()
                opt.zero_grad(set_to_none=True)  # timed for all: memtier's step() drops each consumed .grad
                if i:  # the first step allocates the state
                    best[name] = min(best[name], time.perf_counter() - t)
    for name, seconds in best.items():
        out[name] = total / seconds
    # the host run's phases (kernel alone: memtier's kernel as its CPU lane runs it), best of the same repeats
    for name, opt in memtier.items():
        recs = list(opt.schedule_log)[1:]
        out[f"{name}_parts_s"] = {
            part: min(sum(getattr(j, part) for j in r.jobs) for r in recs)
            for part in ("grads_s", "state_in_s", "kernel_s", "params_s", "state_out_s")
        }
        out[f"{name}_staged"] = any(j.staged for r in recs for j in r.jobs)
        opt.remove()
    out["memtier"] = total / out["memtier_host_parts_s"]["kernel_s"]
    shutil.rmtree(nvme_dir, ignore_errors=True)
    for name in ("torch_fused", "deepspeed", "memtier", "memtier_host", "memtier_nvme"):
        if out.get(name):
            log(f"{name}: {out[name] / 1e6:.1f} M params/s")
    for name in memtier:
        log(f"{name} phases (s): {out[f'{name}_parts_s']}")
    return out


# ---- parent --------------------------------------------------------------------------------------------------------


def _worker(args: argparse.Namespace, name: str, extra: list[str]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.optimizer_offload",
        "--worker",
        name,
        "--worker-out",
        out,
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    for attempt in range(args.retries + 1):
        proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, timeout=args.timeout)
        if proc.returncode != -9 or attempt == args.retries:
            break
        # SIGKILL: the kernel's OOM killer, on a machine whose memory other jobs share; try again later
        log(f"{name} was killed (out of memory?); retrying in 60 s")
        time.sleep(60)
    for line in proc.stdout.splitlines():
        if line.startswith("[optimizer_offload"):
            print("  " + line, flush=True)
    if proc.returncode != 0:
        log(f"{name} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        return {"config": name, "error": proc.stderr[-2000:], "returncode": proc.returncode}
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    result["wall_s"] = time.perf_counter() - t
    return result


def _plot(payload: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from launch.measure.record import savefig

    runs = [r for r in payload["configs"] if "step_s" in r]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
    ax = axes[0]
    names = [r["config"] for r in runs]
    fb = [r["fwd_bwd_s"] for r in runs]
    up = [r["optimizer_s"] for r in runs]
    ax.bar(names, fb, label="forward + backward")
    ax.bar(names, up, bottom=fb, label="optimizer step (exposed)")
    for i, r in enumerate(runs):
        ax.text(i, r["step_s"], f"{r['step_s'] / payload['baseline_step_s']:.2f}x", ha="center", va="bottom")
    ax.set_ylabel("seconds per step (median)")
    ax.set_title(f"{payload['config']['model']}: step time (ratio to resident)")
    ax.tick_params(axis="x", rotation=20)
    ax.legend()
    ax = axes[1]
    k = payload["kernels"]
    labels, values = [], []
    for name in ("torch_fused", "deepspeed", "memtier", "memtier_host", "memtier_nvme"):
        if k.get(name):
            labels.append({"memtier": f"memtier kernel\n({k['memtier_selected_kernel']})",
                           "memtier_host": "memtier step\n(host tier, in place)",
                           "memtier_nvme": "memtier step\n(NVMe tier, staged)"}.get(name, name))  # fmt: skip
            values.append(k[name] / 1e6)
    ax.bar(labels, values, color=["C0", "C1", "C2", "C3", "C4"][: len(values)])
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylabel("M parameters / s")
    ax.set_title(f"CPU AdamW step, {k['numel'] / 1e6:.0f}M fp32 parameters, {k['threads']} thread(s)")
    fig.tight_layout()
    savefig(fig, str(png))
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="llama-34m, 2 steps, smaller kernel tensors (~3-5 min)"
    )
    p.add_argument("--model", choices=MODELS, default=None, help="planner model preset (default llama-300m)")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--steps", type=int, default=None, help="measured steps per configuration")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument(
        "--clip", type=float, default=None, help="global-norm clipping (memtier then defers updates)"
    )
    p.add_argument("--subgroup-size", type=int, default=None, help="memtier subgroup elements")
    p.add_argument("--kernel", choices=("auto", "torch_fused", "deepspeed"), default="auto")
    p.add_argument("--io-engine", choices=("auto", "aio", "posix"), default="auto")
    p.add_argument("--nvme-dir", default="/var/tmp", help="directory on the drive for the NVMe tier")
    p.add_argument("--kernel-numel", type=int, default=None, help="parameters in the CPU-update measurement")
    p.add_argument("--kernel-repeats", type=int, default=16, help="timed steps per optimizer (best of)")
    p.add_argument(
        "--kernel-subgroup-size",
        type=int,
        default=0,
        help="memtier subgroup elements there (0: one subgroup of all the tensors: fewest kernel calls)",
    )
    p.add_argument("--build-deepspeed", action="store_true", help="compile DeepSpeed's cpu_adam op if needed")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads in every process (1: other jobs share the cores)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=29517)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument(
        "--retries", type=int, default=2, help="re-runs of a configuration killed by SIGKILL (OOM)"
    )
    p.add_argument("--out", default=None, help="JSON path (the PNG goes beside it)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.model = args.model or ("llama-34m" if args.quick else "llama-300m")
    args.steps = args.steps or (2 if args.quick else 4)
    args.subgroup_size = args.subgroup_size or ((1 << 22) if args.quick else (1 << 24))
    args.kernel_numel = args.kernel_numel or ((1 << 24) if args.quick else (1 << 25))
    return args


def _worker_args(args: argparse.Namespace) -> list[str]:
    """The options every worker process gets (the parent's settings, defaults resolved)."""
    common = [
        "--model", args.model, "--steps", str(args.steps), "--warmup", str(args.warmup), "--accum", str(args.accum),
        "--micro-batch", str(args.micro_batch), "--seq", str(args.seq), "--subgroup-size", str(args.subgroup_size),
        "--kernel", args.kernel, "--io-engine", args.io_engine, "--nvme-dir", args.nvme_dir, "--threads",
        str(args.threads), "--seed", str(args.seed), "--port", str(args.port), "--kernel-numel",
        str(args.kernel_numel), "--kernel-repeats", str(args.kernel_repeats),
        "--kernel-subgroup-size", str(args.kernel_subgroup_size),
    ]  # fmt: skip
    if args.clip:
        common += ["--clip", str(args.clip)]
    if args.build_deepspeed:
        common += ["--build-deepspeed"]
    return common


def _ratios(
    configs: list[dict[str, Any]], kernels: dict[str, Any]
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], float | None]:
    """(step-time ratios per configuration, CPU-update ratios, the resident baseline's step seconds)."""
    base = next((r for r in configs if r.get("config") == "resident" and "step_s" in r), None)
    base_step = base["step_s"] if base else None
    ratios = {
        r["config"]: {
            "step_vs_resident": r["step_s"] / base_step if base_step else None,
            "optimizer_s": r["optimizer_s"],
        }
        for r in configs
        if "step_s" in r
    }
    fastest_other = max(v for v in (kernels.get("torch_fused"), kernels.get("deepspeed")) if v)
    kernel_ratios = {
        "memtier_kernel_vs_fastest": kernels["memtier"] / fastest_other,
        "memtier_host_vs_fastest": kernels["memtier_host"] / fastest_other,
        "memtier_nvme_vs_fastest": kernels["memtier_nvme"] / fastest_other,
        "deepspeed_vs_torch_fused": (kernels["deepspeed"] / kernels["torch_fused"])
        if kernels.get("deepspeed")
        else None,
    }
    ds_step = next((r["step_s"] for r in configs if r.get("config") == "deepspeed" and "step_s" in r), None)
    if ds_step:
        for r in configs:
            if r.get("config", "").startswith("memtier") and "step_s" in r:
                ratios[r["config"]]["step_vs_deepspeed"] = r["step_s"] / ds_step
    return ratios, kernel_ratios, base_step


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = run_kernels(args) if args.worker == "kernels" else run_config(args)
        Path(args.worker_out).write_text(json.dumps(result))
        return 0

    common = _worker_args(args)
    t0 = time.perf_counter()
    log(f"CPU-update throughput on {args.kernel_numel / 1e6:.0f}M parameters")
    kernels = _worker(args, "kernels", common)
    configs = []
    for name in args.configs:
        log(
            f"{name}: {args.model}, {args.steps} steps of {args.accum} x {args.micro_batch} x {args.seq} tokens"
        )
        configs.append(_worker(args, name, common))
    ratios, kernel_ratios, base_step = _ratios(configs, kernels)
    payload = {
        "benchmark": "optimizer_offload",
        "question": "step time with optimizer state resident / host / NVMe / DeepSpeed ZeRO-2 CPU offload; "
        "CPU AdamW update throughput of torch fused, DeepSpeed CPU Adam and memtier",
        "config": {k: v for k, v in vars(args).items() if k not in ("worker", "worker_out")},
        "kernels": kernels,
        "kernel_ratios": kernel_ratios,
        "configs": configs,
        "ratios": ratios,
        "baseline_step_s": base_step,
        "seconds": time.perf_counter() - t0,
    }
    out = Path(args.out) if args.out else RESULTS / f"optimizer_offload{'_quick' if args.quick else ''}.json"
    from launch.measure.record import write_json

    write_json(str(out), payload)
    if base_step:
        _plot(payload, out.with_suffix(".png"))
    log(f"wrote {out} ({payload['seconds']:.0f} s)")
    for name, r in ratios.items():
        vs = f"x{r['step_vs_resident']:.2f} of resident" if r["step_vs_resident"] else "no resident baseline"
        log(
            f"  {name}: step {vs}, optimizer {r['optimizer_s']:.2f} s"
            + (f", x{r['step_vs_deepspeed']:.2f} of deepspeed" if "step_vs_deepspeed" in r else "")
        )
    log(f"  CPU update: {json.dumps({k: (round(v, 3) if v else v) for k, v in kernel_ratios.items()})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
