"""One system's training run for `benchmarks.ssd_offload` (one process per system, started inside a memory cgroup).

``python -m benchmarks.ssd_offload_runner --system {torch,deepspeed,memtier} --config <json or path> [--plan p]``

Builds the same Llama (``transformers.LlamaForCausalLM`` from a `LlamaConfig` made here, fp32, seed 0), feeds
it the same fixed-seed synthetic token stream, trains ``warmup`` + ``steps`` optimizer steps of ``grad_accum``
micro-batches each (global-norm clipping 1.0) and prints progress lines, then one line
``SSD_OFFLOAD_RESULT {json}``: per-step losses and times, tokens/s (median over the timed steps, with min/max),
peak RSS (``VmHWM``) and RSS at the end. ``--prepare`` builds DeepSpeed's C++ ops (cpu_adam, async_io) once,
outside the cap, so the capped run only loads them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

SYSTEMS = ("torch", "deepspeed", "memtier")
RESULT_PREFIX = "SSD_OFFLOAD_RESULT "

# The models: ~374M parameters (16 B/param of fp32 training state: ~6.0 GB) and a ~17M smoke-test model.
MODELS: dict[str, dict[str, int]] = {
    "llama-374m": dict(hidden_size=1024, num_hidden_layers=24, intermediate_size=2816, num_attention_heads=16,
                       num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048),
    "llama-17m": dict(hidden_size=384, num_hidden_layers=6, intermediate_size=1024, num_attention_heads=6,
                      num_key_value_heads=6, vocab_size=8192, max_position_embeddings=1024),
}  # fmt: skip


def param_count(model: dict[str, int]) -> int:
    """Parameters of an untied Llama: embedding + head (2*V*h), per layer q/k/v/o (h*(2h + 2*kv_h)), the
    gated MLP (3*h*f) and two RMSNorms (2h), plus the final norm (h)."""
    h, f, v, n = (
        model["hidden_size"],
        model["intermediate_size"],
        model["vocab_size"],
        model["num_hidden_layers"],
    )
    kv = h * model["num_key_value_heads"] // model["num_attention_heads"]
    per_layer = h * (2 * h + 2 * kv) + 3 * h * f + 2 * h
    return 2 * v * h + n * per_layer + h


def log(system: str, msg: str) -> None:
    print(f"[{system} {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def memory_status() -> dict[str, int]:
    """VmHWM (peak RSS) and VmRSS of this process, bytes, from /proc/self/status."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


# ---- model and data ------------------------------------------------------------------------------------------


def build_model(cfg: dict[str, Any], *, meta: bool = False) -> Any:
    """The Llama, fp32, initialised from ``cfg["seed"]``; ``meta``: parameters on the meta device (no memory),
    buffers real, for a runtime that reads the weights from a file group by group."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs: dict[str, Any] = dict(MODELS[cfg["model"]])
    config = LlamaConfig(**kwargs, tie_word_embeddings=False, attention_dropout=0.0)
    config._attn_implementation = "sdpa"
    torch.manual_seed(cfg["seed"])
    if meta:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            model = LlamaForCausalLM(config)
    else:
        model = LlamaForCausalLM(config)
    model.float()
    model.train()
    return model


def save_weights(cfg: dict[str, Any], path: str) -> None:
    """The initial weights (same seed as every system) as safetensors, for memtier's meta-device start."""
    from safetensors.torch import save_file

    model = build_model(cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


def forward_backward(model: Any, micro: list[Any]) -> float:
    """Forward and backward of each micro-batch (losses scaled by the accumulation); their summed loss."""
    total = 0.0
    for ids in micro:
        loss = model(input_ids=ids, labels=ids).loss / len(micro)
        loss.backward()
        total += float(loss.detach())
    return total


def token_stream(cfg: dict[str, Any]) -> Callable[[int], Any]:
    """Micro-batch k of a fixed-seed synthetic stream: a pool of 4 random sequences, cycled (so the loss falls
    as the model memorises them, and every system sees the same tokens)."""
    import torch

    vocab = MODELS[cfg["model"]]["vocab_size"]
    g = torch.Generator().manual_seed(cfg["seed"])
    pool = torch.randint(0, vocab, (4, cfg["micro_batch"], cfg["seq"]), generator=g)
    return lambda k: pool[k % len(pool)]


# ---- the training loop, shared ---------------------------------------------------------------------------------


def train(system: str, cfg: dict[str, Any], step: Callable[[list[Any]], float]) -> dict[str, Any]:
    """Run warm-up + timed steps; ``step(micro_batches)`` does one optimizer step and returns the mean loss."""
    batch = token_stream(cfg)
    accum, total = cfg["grad_accum"], cfg["warmup"] + cfg["steps"]
    tokens_per_step = accum * cfg["micro_batch"] * cfg["seq"]
    losses: list[float] = []
    times: list[float] = []
    for it in range(total):
        micro = [batch(it * accum + j) for j in range(accum)]
        t0 = time.perf_counter()
        losses.append(step(micro))
        times.append(time.perf_counter() - t0)
        mem = memory_status()
        phase = "warm-up" if it < cfg["warmup"] else "timed"
        log(system, f"step {it + 1}/{total} ({phase}) loss {losses[-1]:.4f} {times[-1]:.2f} s "
                    f"rss {mem.get('VmRSS', 0) / 2**20:.0f} MiB")  # fmt: skip
    timed = times[cfg["warmup"] :]
    tps = [tokens_per_step / t for t in timed]
    return {
        "losses": losses,
        "step_s": times,
        "step_s_median": statistics.median(timed),
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": statistics.median(tps),
        "tokens_per_s_min": min(tps),
        "tokens_per_s_max": max(tps),
    }


# ---- the systems ---------------------------------------------------------------------------------------------


def run_torch(cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Plain PyTorch: everything resident, ``torch.optim.AdamW(fused=True)``."""
    import torch

    model = build_model(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"], fused=True)

    def step(micro: list[Any]) -> float:
        total = forward_backward(model, micro)
        torch.nn.utils.clip_grad_norm_(params, cfg["clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    return train("torch", cfg, step)


def deepspeed_config(cfg: dict[str, Any], nvme_dir: str) -> dict[str, Any]:
    """ZeRO-3 with parameters and optimizer state on NVMe (ZeRO-Infinity), fp32, DeepSpeedCPUAdam.

    Tuned so DeepSpeed holds as little as it can (each departure from its defaults lowers its footprint):
    ``buffer_size`` the largest parameter (the embedding, V*h; default 1e8 elements x 5 buffers = 2 GB fp32);
    ``buffer_count`` 8 (``ds_buffer_count``; 5 ran out: every swapped-in parameter holds a whole buffer);
    ``max_in_cpu`` 0 (default 1e9 keeps every parameter in CPU memory, not on NVMe); ``sub_group_size`` 1e7
    (default 1e9: the whole fp32 state swapped in at once); ``stage3_max_reuse_distance`` 0 and
    ``stage3_max_live_parameters`` 6e6 (else swapped-in parameters stay live and the buffers run out). The
    fp32 gradient partition (one flat buffer of the model's size) stays in memory: DeepSpeed has no knob for
    it. The aio block size / queue depth are DeepSpeed's defaults."""
    m = MODELS[cfg["model"]]
    largest = max(m["vocab_size"] * m["hidden_size"], m["hidden_size"] * m["intermediate_size"])
    return {
        "train_micro_batch_size_per_gpu": cfg["micro_batch"],
        "gradient_accumulation_steps": cfg["grad_accum"],
        "gradient_clipping": cfg["clip"],
        "optimizer": {"type": "AdamW", "params": {"lr": cfg["lr"], "weight_decay": cfg["weight_decay"],
                                                  "betas": [0.9, 0.999], "eps": 1e-8}},
        "zero_optimization": {
            "stage": 3,
            "offload_param": {"device": "nvme", "nvme_path": nvme_dir, "pin_memory": False,
                              "buffer_count": int(cfg.get("ds_buffer_count", 8)), "buffer_size": int(largest),
                              "max_in_cpu": 0},
            "offload_optimizer": {"device": "nvme", "nvme_path": nvme_dir, "pin_memory": False},
            "sub_group_size": int(cfg.get("ds_sub_group_size", 1e7)),
            "reduce_bucket_size": int(cfg.get("ds_bucket_size", 1e7)),
            "stage3_prefetch_bucket_size": int(cfg.get("ds_prefetch_size", 5e6)),
            # each parameter swapped in holds one whole buffer until released: few live, none kept for reuse
            "stage3_max_live_parameters": int(cfg.get("ds_max_live", 6e6)),
            "stage3_max_reuse_distance": 0,
            "stage3_param_persistence_threshold": int(1e5),  # DeepSpeed's default: norms stay resident
        },
        "aio": {"block_size": 1048576, "queue_depth": 8, "single_submit": False, "overlap_events": True},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }  # fmt: skip


def _deepspeed_init() -> Any:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29517"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")  # fmt: skip
    import deepspeed
    import deepspeed.ops

    # NOTE: DeepSpeed's CPU comm backend would compile a shared-memory op; one process needs only gloo
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    return deepspeed


def run_deepspeed(cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """DeepSpeed ZeRO-Infinity. The model is built first, then handed to ``deepspeed.initialize``
    (``deepspeed.zero.Init`` fails under torch 2.13 with a dynamo TypeError)."""
    deepspeed = _deepspeed_init()
    model = build_model(cfg)
    ds_cfg = deepspeed_config(cfg, args.nvme_dir)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_cfg)
    log(
        "deepspeed",
        f"initialised (ZeRO-3, NVMe at {args.nvme_dir}) rss {memory_status().get('VmRSS', 0) >> 20} MiB",
    )

    def step(micro: list[Any]) -> float:
        total = 0.0
        for ids in micro:
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)  # scales by 1/grad_accum itself
            engine.step()  # steps the optimizer at the accumulation boundary only
            total += float(loss.detach()) / len(micro)
        return total

    out = train("deepspeed", cfg, step)
    out["deepspeed_config"] = ds_cfg
    return out


def run_memtier(cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """memtier with parameters, gradients and optimizer state streamed from NVMe per block (`offload.state`).

    Written against the announced API: ``handle = offload.apply(model, optimizer, plan)`` with
    ``plan.model_state.stream`` on; backward per micro-batch, then ``handle.optimizer.step()`` / ``zero_grad()``.
    Clipping is the plan's (``plan.optimizer.max_grad_norm``)."""
    import torch

    import offload
    from planner.plan import Plan

    if not args.plan:
        raise SystemExit("memtier needs --plan (a plan.json with model_state.stream on)")
    plan = Plan.load(args.plan)
    if not plan.model_state.stream:
        raise SystemExit(f"{args.plan}: model_state.stream is off; this benchmark measures streamed state")
    # with --weights the model starts on the meta device and memtier reads each group from the file: a model
    # built whole would need its full fp32 size in memory first
    model = build_model(cfg, meta=args.weights is not None)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    handle = offload.apply(model, opt, plan, weights=args.weights)
    log("memtier", f"applied the plan (streamed state) rss {memory_status().get('VmRSS', 0) >> 20} MiB")

    def step(micro: list[Any]) -> float:
        total = forward_backward(model, micro)
        handle.optimizer.step()
        handle.optimizer.zero_grad()
        return total

    # NOTE: no handle.remove(): it gathers every parameter back into the model, the whole fp32 model in memory
    # at once, which is what the cap forbids; the process exits and the harness deletes the swap files
    out = train("memtier", cfg, step)
    out["predicted"] = {
        "host_peak_bytes": plan.predicted.host_peak_bytes,
        "step_time_s": plan.predicted.step_time_s,
    }
    return out


RUNNERS: dict[str, Callable[[dict[str, Any], argparse.Namespace], dict[str, Any]]] = {
    "torch": run_torch,
    "deepspeed": run_deepspeed,
    "memtier": run_memtier,
}


def prepare() -> dict[str, Any]:
    """Build (or load) DeepSpeed's cpu_adam and async_io ops, uncapped; minutes the first time, cached after."""
    from torch.utils.cpp_extension import _get_build_directory

    from offload.deepspeed_ops import lock_holders
    from offload.optimizer.kernels import deepspeed_cpu_adam_status
    from offload.tiers.engines import aio_status

    out: dict[str, Any] = {}
    for op in ("cpu_adam", "async_io"):
        # a lock file no process holds is left by a killed build; torch would wait on it forever
        lock = os.path.join(str(_get_build_directory(op, verbose=False)), "lock")
        if os.path.exists(lock) and not lock_holders(lock):
            time.sleep(1.0)
            if os.path.exists(lock) and not lock_holders(lock):
                log("prepare", f"removing stale build lock {lock} (no process holds it)")
                os.remove(lock)
    for name, status in (("cpu_adam", deepspeed_cpu_adam_status), ("async_io", aio_status)):
        t0 = time.perf_counter()
        ok, why = status(build=True)
        out[name] = {"ok": ok, "reason": why, "seconds": round(time.perf_counter() - t0, 1)}
        log("prepare", f"{name}: {'ready' if ok else why} ({out[name]['seconds']} s)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system", choices=SYSTEMS)
    p.add_argument("--config", help="run settings: a JSON object, or a path to one")
    p.add_argument("--plan", help="memtier: plan.json with model_state.stream on")
    p.add_argument("--nvme-dir", default="/tmp/memtier-ssd-offload", help="swap files (deepspeed, memtier)")
    p.add_argument("--weights", help="memtier: safetensors file of the initial weights (meta-device start)")
    p.add_argument(
        "--save-weights", metavar="PATH", help="write the initial weights of --config to PATH, exit"
    )
    p.add_argument("--prepare", action="store_true", help="build DeepSpeed's ops and exit")
    args = p.parse_args(argv)
    if args.prepare:
        print(RESULT_PREFIX + json.dumps({"prepare": prepare()}), flush=True)
        return 0
    if not args.config or not (args.system or args.save_weights):
        p.error("--config and --system (or --save-weights) are required, or --prepare")
    text = args.config
    if os.path.exists(text):
        with open(text) as f:
            text = f.read()
    cfg = json.loads(text)
    if args.save_weights:
        save_weights(cfg, args.save_weights)
        return 0
    import torch

    torch.set_num_threads(cfg["threads"])
    os.makedirs(args.nvme_dir, exist_ok=True)
    log(args.system, f"start: model {cfg['model']} ({param_count(MODELS[cfg['model']]) / 1e6:.0f}M params)")
    out = RUNNERS[args.system](cfg, args)
    out.update(system=args.system, memory=memory_status())
    print(RESULT_PREFIX + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
