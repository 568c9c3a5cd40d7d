"""Train a small Llama on the text that ships with memtier, with a memtier plan applied.

The model is a Hugging Face `LlamaForCausalLM` built from a config (random init, nothing downloaded); the
tokenizer is byte-level (token = byte value, so any vocabulary >= 256 works); the data is
`examples/data/corpus.txt` read as consecutive windows, so the data position is a single integer.

Under `memtier launch` the plan's path arrives in the environment (MEMTIER_PLAN) and is read with one call,
`planner.load_plan(path)`; the model, sequence length, micro-batch, gradient accumulation and optimizer come
from it, and `offload.apply(model, optimizer, plan)` carries out its activation swap/recompute, chunked loss
and optimizer-state offload. Without a plan the script trains the `--model` preset plainly.

Engines (`--engine`, or MEMTIER_ENGINE from `memtier launch --engine`):
  torch       DistributedDataParallel over gloo (CPU) or NCCL (GPU) when more than one rank
  deepspeed   `deepspeed.initialize` with the emitted ds_config.json (MEMTIER_DS_CONFIG). DeepSpeed's
              "activation_checkpointing" JSON block configures its checkpointing module but checkpoints
              nothing by itself: the plan's per-block recompute is installed in code here, by offload.apply.
  accelerate  `accelerate.Accelerator().prepare(model, optimizer)`

Logged on rank 0: loss, tokens/s, MFU and HFU (model FLOPs from planner.flops; HFU adds the recomputed
forwards, Korthikanti et al. 2022, Appendix A) and memory per tier. Checkpoints are written to a temporary
directory and renamed into place, so a checkpoint directory never holds a half-written one; resuming
restores model, optimizer, every rank's RNG state and the data position, and continues bit-identically.

    python examples/train_lm.py --model tiny-llama --steps 20
    memtier launch --nproc 2 --plan out/plan.json examples/train_lm.py --steps 50 --ckpt-dir ckpt
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:  # run as a plain script from a source checkout
    sys.path.insert(0, _ROOT)

from planner import load_plan  # noqa: E402
from planner.errors import SpecError  # noqa: E402
from planner.flops import hardware_flops_per_step, model_flops_per_step  # noqa: E402
from planner.model import ModelSpec  # noqa: E402
from planner.plan import Plan  # noqa: E402
from planner.presets import MODEL_PRESETS  # noqa: E402

DEFAULT_DATA = os.path.join(_HERE, "data", "corpus.txt")
ENGINES = ("torch", "deepspeed", "accelerate")
OPTIMIZERS = ("adamw", "galore", "frugal")
CKPT_PREFIX = "step-"
CKPT_TMP_PREFIX = ".tmp-"
META = "meta.json"
STOP_GRACE_S = 5.0  # seconds a stopped rank may take to unwind before it exits regardless


class TrainConfigError(ValueError):
    """A bad setting of this script; `field` names the option (and `source` the file, when there is one)."""

    def __init__(self, message: str, *, field: str, source: str | None = None) -> None:
        self.field = field
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field}: {message}")


# ------------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a small Llama with a memtier plan applied.")
    p.add_argument(
        "--plan", default=os.environ.get("MEMTIER_PLAN"), help="plan.json (default: $MEMTIER_PLAN)"
    )
    p.add_argument("--model", default="llama-20m", choices=sorted(MODEL_PRESETS), help="without a plan")
    p.add_argument("--seq", type=int, default=None, help="sequence length (without a plan; default 256)")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per rank (without a plan; 4)")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step (without a plan; 1)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="default: the plan's, else adamw")
    p.add_argument("--rank", type=int, default=None, help="GaLore rank (default: the plan's, else 64)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="global-norm gradient clipping (0: off)")
    p.add_argument(
        "--steps", type=int, default=20, help="optimizer steps in total (a resume continues to it)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=ENGINES, default=os.environ.get("MEMTIER_ENGINE", "torch"))
    p.add_argument("--ds-config", default=os.environ.get("MEMTIER_DS_CONFIG"), help="DeepSpeed config JSON")
    p.add_argument("--data", default=DEFAULT_DATA, help="a UTF-8/ASCII text file")
    p.add_argument("--ckpt-dir", default=None, help="checkpoint directory (resumes from its latest)")
    p.add_argument("--ckpt-every", type=int, default=0, help="save every N steps (0: only at the end)")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in --ckpt-dir")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--warmup-steps", type=int, default=1, help="steps left out of tokens/s and MFU")
    p.add_argument(
        "--track-memory",
        action="store_true",
        help="measure the last step's peak live tensor bytes by category (torch MemTracker); slows that step",
    )
    p.add_argument("--metrics-out", default=None, help="write a JSON summary here (rank 0)")
    p.add_argument(
        "--save-final-params", default=None, help="directory: each rank saves its final parameters"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: $OMP_NUM_THREADS)")
    p.add_argument(
        "--step-gate",
        default=None,
        help="directory: wait for go-<step> before each step, write done-<step> after (benchmarks interleave "
        "several runs step by step this way)",
    )
    return p


# ------------------------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def nodes(self) -> int:
        return max(1, self.world // max(1, self.local_world))


def init_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)  # CUDA_VISIBLE_DEVICES carries the plan's device order
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, local_rank=local_rank, local_world=local_world, device=device)


# ------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True, kw_only=True)
class Settings:
    """What this run trains, resolved from the plan (when there is one) and the command line."""

    spec: ModelSpec
    seq_len: int
    micro_batch: int
    grad_accum: int
    optimizer: str
    optimizer_settings: dict[str, Any]
    dtype: str
    plan: Plan | None
    plan_path: str | None


def resolve_settings(args: argparse.Namespace) -> Settings:
    plan = None
    if args.plan:
        if not os.path.isfile(args.plan):
            raise TrainConfigError("file not found", field="--plan", source=args.plan)
        plan = load_plan(args.plan)
        for name in ("seq", "micro_batch", "grad_accum"):
            if getattr(args, name) is not None:
                raise TrainConfigError(
                    f"the plan decides this ({args.plan}); re-plan instead of overriding it",
                    field="--" + name.replace("_", "-"),
                )
        spec, wl, lay = plan.model, plan.workload, plan.layout
        seq, mb, ga, dtype = wl.seq_len, lay.micro_batch, lay.grad_accum, wl.dtype
        kind = args.optimizer or plan.optimizer.kind
        settings = dict(plan.optimizer.settings)
        settings.setdefault("rank", wl.optimizer.rank)
        settings.setdefault("density", wl.optimizer.density)
    else:
        spec = MODEL_PRESETS[args.model]
        seq, mb, ga, dtype = args.seq or 256, args.micro_batch or 4, args.grad_accum or 1, "fp32"
        kind = args.optimizer or "adamw"
        settings = {"rank": 64, "density": 0.25}
    if args.rank is not None:
        settings["rank"] = args.rank
    if kind not in OPTIMIZERS:
        raise TrainConfigError(
            f"{kind!r} is not one of {OPTIMIZERS}", field="optimizer.kind", source=args.plan
        )
    if spec.family not in ("llama", "mistral", "qwen2"):
        raise TrainConfigError(
            f"this example builds Llama-style models; got family {spec.family!r}", field="model.family"
        )
    if seq > spec.max_position_embeddings:
        raise TrainConfigError(
            f"seq_len({seq}) > max_position_embeddings({spec.max_position_embeddings})", field="seq_len"
        )
    for name, value in (("--steps", args.steps), ("--log-every", args.log_every)):
        if value < 1:
            raise TrainConfigError(f"must be >= 1, got {value}", field=name)
    return Settings(
        spec=spec,
        seq_len=seq,
        micro_batch=mb,
        grad_accum=ga,
        optimizer=kind,
        optimizer_settings=settings,
        dtype=dtype,
        plan=plan,
        plan_path=args.plan,
    )


# ------------------------------------------------------------------------------------------- model
def build_model(spec: ModelSpec, *, seed: int) -> torch.nn.Module:
    """An HF Llama with exactly `spec`'s shapes, randomly initialised (the same on every rank)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.ffn_hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tied_embeddings,
        attention_bias=spec.qkv_bias,
        mlp_bias=spec.mlp_bias,
        use_cache=False,
    )
    config._attn_implementation = "sdpa"  # the fused kernel the planner's memory model assumes (flash)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    if n != spec.params:
        raise TrainConfigError(f"built {n} parameters, the spec says {spec.params}", field="model")
    return model


def build_optimizer(model: torch.nn.Module, kind: str, settings: dict[str, Any], lr: float):
    if kind == "adamw":
        # the fused kernel: torch's fastest AdamW on CPU and GPU (on CPU the default is a per-tensor loop, ~4x
        # slower here); memtier's offloaded optimizer uses the same kernel, so plans compare like with like
        return torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    if kind == "galore":
        from optim import GaLoreAdamW, low_rank_param_groups

        groups = low_rank_param_groups(model, switch_key="galore", rank=int(settings.get("rank", 64)))
        return GaLoreAdamW(groups, lr=lr, update_proj_gap=int(settings.get("update_proj_gap", 200)))
    from optim import FRUGAL, low_rank_param_groups

    groups = low_rank_param_groups(model, switch_key="frugal", density=float(settings.get("density", 0.25)))
    return FRUGAL(groups, lr=lr, update_proj_gap=int(settings.get("update_proj_gap", 200)))


# ------------------------------------------------------------------------------------------- data
class ByteCorpus:
    """Byte-level tokens of a text file, cut into consecutive windows of seq_len bytes.

    Sequence i (counted over all ranks since the start of training) is the window at byte
    `(i * seq_len) mod (len - seq_len - 1)`: a step consumes `global_batch` consecutive sequences, rank r
    takes its micro-batch's slice, and the position to resume from is one integer.
    """

    def __init__(self, path: str, *, seq_len: int, vocab_size: int) -> None:
        if not os.path.isfile(path):
            raise TrainConfigError("file not found", field="--data", source=path)
        with open(path, "rb") as fh:
            raw = fh.read()
        if len(raw) < seq_len + 2:
            raise TrainConfigError(
                f"needs more than {seq_len + 1} bytes, has {len(raw)}", field="--data", source=path
            )
        if vocab_size < 256:
            raise TrainConfigError(
                f"byte tokens need vocab_size >= 256, got {vocab_size}", field="model.vocab_size"
            )
        self.tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
        self.seq_len = seq_len
        self.span = len(raw) - seq_len

    def batch(self, first_sequence: int, count: int) -> torch.Tensor:
        starts = [((first_sequence + j) * self.seq_len) % self.span for j in range(count)]
        return torch.stack([self.tokens[s : s + self.seq_len] for s in starts])


# ------------------------------------------------------------------------------------------- checkpoints
def complete_checkpoints(ckpt_dir: str) -> list[str]:
    """Checkpoint directories with their meta file (written last), oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    names = sorted(n for n in os.listdir(ckpt_dir) if n.startswith(CKPT_PREFIX))
    return [os.path.join(ckpt_dir, n) for n in names if os.path.isfile(os.path.join(ckpt_dir, n, META))]


def remove_partial_checkpoints(ckpt_dir: str) -> list[str]:
    """Delete temporary directories left by a save that never finished (a killed run)."""
    removed = []
    if os.path.isdir(ckpt_dir):
        for n in os.listdir(ckpt_dir):
            if n.startswith(CKPT_TMP_PREFIX):
                shutil.rmtree(os.path.join(ckpt_dir, n), ignore_errors=True)
                removed.append(n)
    return removed


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_file(obj: Any, path: str) -> None:
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


# ------------------------------------------------------------------------------------------- engines
class Engine:
    """One training step and the state to checkpoint, over a plain, DeepSpeed or Accelerate setup."""

    def __init__(
        self, model: torch.nn.Module, optimizer: Any, d: Dist, grad_accum: int, *, max_grad_norm: float = 0.0
    ) -> None:
        self.model = model  # the unwrapped HF model
        self.optimizer = optimizer
        self.d = d
        self.grad_accum = grad_accum
        self.runner: Any = model
        # an offloaded optimizer clips inside its step (it knows where the gradients are)
        self.max_grad_norm = 0.0 if getattr(optimizer, "clips_gradients", False) else max_grad_norm

    def micro_step(self, x: torch.Tensor, last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; HF shifts the labels (position t predicts byte t + 1)."""
        sync = (
            contextlib.nullcontext() if last or not hasattr(self.runner, "no_sync") else self.runner.no_sync()
        )
        with sync:
            loss = self.runner(input_ids=x, labels=x).loss
            (loss / self.grad_accum).backward()
        return loss.detach()

    def step(self) -> None:
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, tmp: str) -> None:
        if self.d.main:
            _save_file(self.model.state_dict(), os.path.join(tmp, "model.pt"))
            _save_file(self.optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))

    def load(self, path: str) -> None:
        self.model.load_state_dict(torch.load(os.path.join(path, "model.pt"), map_location=self.d.device))
        self.optimizer.load_state_dict(
            torch.load(os.path.join(path, "optimizer.pt"), map_location=self.d.device, weights_only=False)
        )


class GradientAverager:
    """Data parallelism for an optimizer that reads gradients in backward hooks (memtier's offloaded AdamW).

    DDP averages gradients after they were accumulated into `.grad`, i.e. after post-accumulate-grad hooks
    have seen the rank's own gradient. Here each parameter's incoming gradient is averaged over the ranks in a
    tensor hook, which runs before the gradient is accumulated, so every later hook sees the average. Ranks
    issue the all-reduces in the same (autograd) order; gloo's and NCCL's all-reduce give every rank the same
    bits, so the ranks' updates stay identical. Parameters start from rank 0's.
    """

    def __init__(self, model: torch.nn.Module, world: int) -> None:
        self.world = world
        with torch.no_grad():
            for p in model.parameters():
                dist.broadcast(p.data, src=0)
        self.handles = [p.register_hook(self._average) for p in model.parameters() if p.requires_grad]

    def _average(self, grad: torch.Tensor) -> torch.Tensor:
        out = grad.contiguous().clone()  # a hook must not modify its input in place
        dist.all_reduce(out)
        return out.div_(self.world)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class TorchEngine(Engine):
    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Any,
        d: Dist,
        grad_accum: int,
        *,
        max_grad_norm: float = 0.0,
        hook_allreduce: bool = False,
    ) -> None:
        super().__init__(model, optimizer, d, grad_accum, max_grad_norm=max_grad_norm)
        self.averager = GradientAverager(model, d.world) if d.world > 1 and hook_allreduce else None
        if d.world > 1 and self.averager is None:
            from torch.nn.parallel import DistributedDataParallel

            # DDP broadcasts rank 0's parameters at construction and averages gradients in backward.
            self.runner = DistributedDataParallel(
                model, device_ids=[d.device.index] if d.device.type == "cuda" else None
            )


class AccelerateEngine(Engine):
    def __init__(
        self, model: torch.nn.Module, optimizer: Any, d: Dist, grad_accum: int, *, max_grad_norm: float = 0.0
    ) -> None:
        from accelerate import Accelerator

        super().__init__(model, optimizer, d, grad_accum, max_grad_norm=max_grad_norm)
        self.accelerator = Accelerator(cpu=d.device.type == "cpu")
        self.runner, self.optimizer = self.accelerator.prepare(model, optimizer)

    def micro_step(self, x: torch.Tensor, last: bool) -> torch.Tensor:
        sync = contextlib.nullcontext() if last else self.accelerator.no_sync(self.runner)
        with sync:
            loss = self.runner(input_ids=x, labels=x).loss
            self.accelerator.backward(loss / self.grad_accum)
        return loss.detach()


class DeepSpeedEngine(Engine):
    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Any,
        d: Dist,
        grad_accum: int,
        *,
        config: dict[str, Any],
        lr: float,
    ) -> None:
        import deepspeed

        super().__init__(model, optimizer, d, grad_accum)
        deepspeed.init_distributed(dist_backend="nccl" if d.device.type == "cuda" else "gloo")
        opt = None if "optimizer" in config else optimizer
        if "optimizer" in config:
            config["optimizer"].setdefault("params", {})["lr"] = lr
        self.runner, self.optimizer, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=opt,
            config=config,
        )

    def micro_step(self, x: torch.Tensor, last: bool) -> torch.Tensor:
        loss = self.runner(input_ids=x, labels=x).loss
        self.runner.backward(loss)  # DeepSpeed scales by its gradient_accumulation_steps
        # DeepSpeed wants step() after every micro-batch; it updates at the accumulation boundary
        self.runner.step()
        return loss.detach()

    def step(self) -> None:
        pass

    def save(self, tmp: str) -> None:
        self.runner.save_checkpoint(tmp, tag="engine")

    def load(self, path: str) -> None:
        self.runner.load_checkpoint(path, tag="engine")


def deepspeed_config(path: str | None, *, micro_batch: int, grad_accum: int, world: int) -> dict[str, Any]:
    if not path:
        raise TrainConfigError(
            "--engine deepspeed needs a DeepSpeed config: `memtier launch --engine deepspeed --plan ...` passes "
            "the emitted ds_config.json in $MEMTIER_DS_CONFIG",
            field="--ds-config",
        )
    if not os.path.isfile(path):
        raise TrainConfigError("file not found", field="--ds-config", source=path)
    with open(path) as fh:
        try:
            cfg = json.load(fh)
        except json.JSONDecodeError as exc:
            raise TrainConfigError(f"malformed JSON: {exc}", field="--ds-config", source=path) from None
    # the batch comes from the plan: the config must agree with it
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = grad_accum
    cfg["train_batch_size"] = micro_batch * grad_accum * world
    return cfg


# ------------------------------------------------------------------------------------------- metrics
def peak_flops_per_device(settings: Settings) -> float:
    """The GEMM peak the MFU is measured against: the plan's cluster, else this machine's probe cache.

    On a CPU the GEMM is also timed now and the larger figure taken: a peak probed while the machine was
    busy would put MFU above 100%.
    """
    if settings.plan is not None:
        peak = settings.plan.cluster.device.flops(settings.dtype)
        if not torch.cuda.is_available():
            try:
                from launch.probe import measure_gemm

                peak = max(peak, measure_gemm(settings.dtype, 1024, 5))
            except Exception:  # noqa: BLE001 - MFU is a report, never a reason to stop training
                pass
        return peak
    try:
        from launch.probe import CACHE_PATH
        from planner.cluster import load_cluster

        if os.path.exists(CACHE_PATH):
            return load_cluster(CACHE_PATH).device.flops(settings.dtype)
        from launch.probe import measure_gemm

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


class MemoryProbe:
    """Peak memory per tier of one step: device (live tensors by category via torch's MemTracker on CPU,
    the CUDA allocator's peak on GPU) and the bytes in each host tier at the end of forward."""

    def __init__(self, model: torch.nn.Module, optimizer: Any, device: torch.device) -> None:
        self.device = device
        self.tracker = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            from torch.distributed._tools.mem_tracker import MemTracker

            self.tracker = MemTracker()
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


# ------------------------------------------------------------------------------------------- main
class StopRequested(SystemExit):
    pass


def _on_sigterm(signum: int, frame: Any) -> None:
    # NOTE: torchrun stops workers with SIGTERM; turning it into an exception runs every `finally` (the
    # offload handle closes its tiers and deletes swap files, a checkpoint in progress is discarded).
    raise StopRequested(128 + signum)


def install_stop_watchdog(grace_s: float) -> Callable[[], None]:
    """Exit `grace_s` seconds after SIGTERM/SIGINT if the main thread has not unwound by then.

    NOTE: a Python signal handler runs only when the main thread is back in the interpreter; a rank blocked in
    a C++ call (a collective whose peer died, a rendezvous) would not react to torchrun's SIGTERM until its
    SIGKILL. The wakeup fd is written by the C-level handler at once, so this thread can give the main thread
    `grace_s` to unwind (its `finally` blocks close the tiers and delete swap files) and end the process
    otherwise. Swap directories of a process ended this way are removed by the launcher afterwards (the
    kernel releases their locks when the process dies). Returns the undo (restores the previous wakeup fd).
    """
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = signal.set_wakeup_fd(write_fd)

    def watch() -> None:
        while True:
            data = os.read(read_fd, 1)
            if not data:  # the undo closed the pipe
                os.close(read_fd)
                return
            if data[0] in (signal.SIGTERM, signal.SIGINT):
                time.sleep(grace_s)
                os._exit(128 + data[0])

    threading.Thread(target=watch, name="memtier-stop-watchdog", daemon=True).start()

    def undo() -> None:
        signal.set_wakeup_fd(previous)
        os.close(write_fd)

    return undo


def wait_for_gate(gate_dir: str, step: int, poll_s: float = 0.01) -> None:
    """Block until the file go-<step> exists in `gate_dir` (the benchmark's turn to run this step)."""
    path = os.path.join(gate_dir, f"go-{step}")
    while not os.path.exists(path):
        time.sleep(poll_s)


def signal_gate(gate_dir: str, step: int, info: dict[str, Any]) -> None:
    """Write done-<step> (atomically) with the step's timings."""
    path = os.path.join(gate_dir, f"done-{step}")
    with open(path + ".tmp", "w") as fh:
        json.dump(info, fh)
    os.replace(path + ".tmp", path)


def plan_digest(path: str | None) -> str | None:
    if not path:
        return None
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()[:16]


@dataclass
class Applied:
    """What carrying out the plan installed: offload.apply's handle and the optimizer to step."""

    handle: Any = None  # offload.apply's handle (hooks, tiers, chunked loss)
    optimizer: Any = None  # the optimizer to step: the plan's offloaded one when it has one

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()  # closes the tiers: swap files deleted


def apply_plan(
    model: torch.nn.Module,
    optimizer: Any,
    settings: Settings,
    engine_name: str,
    *,
    max_grad_norm: float = 0.0,
) -> Applied:
    """`offload.apply(model, optimizer, plan)` (nothing without a plan).

    Under DeepSpeed the optimizer is DeepSpeed's (its ZeRO offload does the optimizer-state placement), so
    only the plan's activation and loss decisions are applied here.
    """
    plan = settings.plan
    if plan is None:
        return Applied(optimizer=optimizer)
    try:
        import offload
    except ImportError as exc:  # the runtime is built separately
        raise TrainConfigError(
            f"this memtier build has no offload runtime ({exc}); cannot carry out the plan", field="--plan"
        ) from None
    if engine_name == "deepspeed":
        plan = plan.replace(optimizer=dataclasses.replace(plan.optimizer, offload=False))
        return Applied(handle=offload.apply(model, None, plan), optimizer=optimizer)
    settings_offload = None
    if plan.optimizer.offload:
        from offload.optimizer import OffloadSettings

        # The offloaded optimizer reads gradients in backward hooks (and clips there when asked): with several
        # ranks the TorchEngine averages them before those hooks run (GradientAverager), not DDP after.
        settings_offload = OffloadSettings(
            grad_accum=plan.layout.grad_accum,
            max_grad_norm=max_grad_norm or None,
            # "auto" picks the faster kernel by measuring it in each process; the kernels round
            # differently, so ranks and resumed runs could differ. One fixed kernel keeps them identical.
            cpu_kernel=plan.optimizer.settings.get("cpu_kernel", "torch_fused"),
            # NOTE: the "auto" schedule picks CPU or device updates per rank from measured rates, and the
            # two kernels round differently: data-parallel ranks would drift apart bit by bit. The plan's
            # sides (or the CPU for all) are the same on every rank.
            schedule="plan" if plan.optimizer.subgroups else "cpu",
        )
    handle = offload.apply(model, optimizer, plan, optimizer_settings=settings_offload)
    if plan.optimizer.offload:
        handle.optimizer.clips_gradients = bool(max_grad_norm)
    return Applied(handle=handle, optimizer=handle.optimizer)


def main(
    argv: list[str] | None = None, *, on_step: Callable[[int, dict[str, Any]], None] | None = None
) -> int:
    args = build_parser().parse_args(argv)
    previous_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
    remove_watchdog = install_stop_watchdog(STOP_GRACE_S)
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or (os.cpu_count() or 1)
    torch.set_num_threads(max(1, threads))
    d = init_distributed()
    try:
        return _train(args, d, on_step)
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        remove_watchdog()
        if d.world > 1 and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def _train(args: argparse.Namespace, d: Dist, on_step: Any) -> int:
    settings = resolve_settings(args)
    spec, seq, mb, ga = settings.spec, settings.seq_len, settings.micro_batch, settings.grad_accum
    corpus = ByteCorpus(args.data, seq_len=seq, vocab_size=spec.vocab_size)
    model = build_model(spec, seed=args.seed).to(d.device)
    optimizer = build_optimizer(model, settings.optimizer, settings.optimizer_settings, args.lr)
    applied = apply_plan(model, optimizer, settings, args.engine, max_grad_norm=args.max_grad_norm)
    optimizer, handle = applied.optimizer, applied.handle
    try:
        if args.engine == "deepspeed":
            cfg = deepspeed_config(args.ds_config, micro_batch=mb, grad_accum=ga, world=d.world)
            cfg["gradient_clipping"] = args.max_grad_norm
            engine: Engine = DeepSpeedEngine(model, optimizer, d, ga, config=cfg, lr=args.lr)
        elif args.engine == "accelerate":
            engine = AccelerateEngine(model, optimizer, d, ga, max_grad_norm=args.max_grad_norm)
        else:
            engine = TorchEngine(
                model,
                optimizer,
                d,
                ga,
                max_grad_norm=args.max_grad_norm,
                hook_allreduce=settings.plan is not None and settings.plan.optimizer.offload,
            )
        return _loop(args, d, settings, corpus, engine, handle, on_step)
    finally:
        applied.remove()


def _loop(args, d: Dist, settings: Settings, corpus: ByteCorpus, engine: Engine, handle, on_step) -> int:
    spec, seq, mb, ga = settings.spec, settings.seq_len, settings.micro_batch, settings.grad_accum
    global_batch = mb * ga * d.world
    tokens_per_step = global_batch * seq
    step, data_position = 0, 0

    # ---- resume
    if args.ckpt_dir:
        if d.main:
            os.makedirs(args.ckpt_dir, exist_ok=True)
            removed = remove_partial_checkpoints(args.ckpt_dir)
            if removed:
                print(f"[train] removed unfinished checkpoint(s): {', '.join(removed)}", file=sys.stderr)
        barrier(d)
        found = [] if args.no_resume else complete_checkpoints(args.ckpt_dir)
        if found:
            path = found[-1]
            with open(os.path.join(path, META)) as fh:
                meta = json.load(fh)
            if meta["world_size"] != d.world:
                raise TrainConfigError(
                    f"checkpoint was written by {meta['world_size']} ranks, this run has {d.world}",
                    field="--ckpt-dir",
                    source=path,
                )
            engine.load(path)
            set_rng_state(torch.load(os.path.join(path, f"rng-rank{d.rank}.pt"), weights_only=False))
            step, data_position = int(meta["step"]), int(meta["data_position"])
            if d.main:
                print(
                    f"[train] resumed from {path}: step {step}, data position {data_position}",
                    file=sys.stderr,
                )

    def save_checkpoint() -> None:
        name = f"{CKPT_PREFIX}{step:07d}"
        final = os.path.join(args.ckpt_dir, name)
        tmp = os.path.join(args.ckpt_dir, f"{CKPT_TMP_PREFIX}{name}")
        if d.main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        barrier(d)  # the directory exists before any rank writes into it
        try:
            engine.save(tmp)
            _save_file(rng_state(), os.path.join(tmp, f"rng-rank{d.rank}.pt"))
            barrier(d)  # every rank's files are on disk before the meta file makes the checkpoint complete
            if d.main:
                meta = {
                    "step": step,
                    "data_position": data_position,
                    "world_size": d.world,
                    "seed": args.seed,
                    "model": spec.name,
                    "plan_sha256": plan_digest(settings.plan_path),
                    "engine": args.engine,
                    "time": time.time(),
                }
                with open(os.path.join(tmp, META), "w") as fh:
                    json.dump(meta, fh, indent=2)
                    fh.flush()
                    os.fsync(fh.fileno())
                _fsync_dir(tmp)
                if os.path.exists(final):
                    shutil.rmtree(final)
                os.rename(tmp, final)  # atomic: readers see no checkpoint or a complete one
                _fsync_dir(args.ckpt_dir)
            barrier(d)
        except BaseException:
            if d.main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    # ---- metrics
    peak = peak_flops_per_device(settings)
    devices = d.world if d.device.type == "cuda" else d.nodes  # CPU ranks of a node share one CPU
    recomputed = 0.0
    if settings.plan is not None:
        recomputed = float(sum(a.recompute_fraction for a in settings.plan.activations))
    model_flops = model_flops_per_step(spec, tokens_per_step, seq)
    hw_flops = hardware_flops_per_step(spec, tokens_per_step, seq, recomputed_layers=recomputed)
    step_times: list[float] = []
    cpu_times: list[float] = []  # CPU seconds of this process (all its threads) per timed step
    losses: list[tuple[int, float]] = []
    memory: dict[str, int] = {}
    tiers_peak: dict[str, int] = {}
    progress = Progress(total=args.steps)
    first_step = step
    if (
        settings.plan is not None
        and settings.plan.layout.zero_stage
        and settings.plan.layout.dp > 1  # one data-parallel rank: ZeRO partitions nothing
        and args.engine != "deepspeed"
        and d.main
    ):
        print(
            f"[train] warning: the plan's ZeRO stage {settings.plan.layout.zero_stage} is carried out by "
            "--engine deepspeed only; this engine keeps a full replica per rank",
            file=sys.stderr,
        )
    if d.main:
        print(
            f"[train] {spec.name}: {spec.params / 1e6:.1f}M params, {d.world} rank(s) x micro-batch {mb} x "
            f"accum {ga} x seq {seq} = {tokens_per_step} tokens/step, {settings.optimizer}, engine {args.engine}"
            + (f", plan {settings.plan_path}" if settings.plan_path else ""),
            file=sys.stderr,
        )

    # Tier bytes peak when forward ends (every swapped block is out, none fetched back yet): sampled by a
    # forward hook on the model, which runs after its forward returns and before backward starts.
    def sample_tiers(module: Any, inputs: Any, output: Any) -> None:
        for name, used in tier_usage(handle).items():
            tiers_peak[name] = max(tiers_peak.get(name, 0), used)

    hooks = [engine.model.register_forward_hook(sample_tiers)]
    # Forward calls of each block's attention in the last step: 2 where the block is recomputed (its forward
    # runs again in backward), 1 otherwise -- the check that the plan's checkpointing is really applied.
    attn_calls: dict[int, int] = {}
    for i, block in enumerate(getattr(getattr(engine.model, "model", None), "layers", [])):

        def count(module: Any, inputs: Any, output: Any, i: int = i) -> None:
            attn_calls[i] = attn_calls.get(i, 0) + 1

        hooks.append(block.self_attn.register_forward_hook(count))

    mem_probe = None
    while step < args.steps:
        if args.step_gate:
            wait_for_gate(args.step_gate, step + 1)
        attn_calls.clear()
        track = args.track_memory and step == args.steps - 1
        if track:
            mem_probe = MemoryProbe(engine.model, engine.optimizer, d.device)
        t0, c0 = time.perf_counter(), time.process_time()
        loss_sum = torch.zeros((), device=d.device)
        ctx = mem_probe.track() if track and mem_probe is not None else contextlib.nullcontext()
        with ctx:
            for micro in range(ga):
                if track and mem_probe is not None and micro:
                    mem_probe.next_micro_batch()
                first = data_position + (micro * d.world + d.rank) * mb
                x = corpus.batch(first, mb).to(d.device)
                loss = engine.micro_step(x, last=micro == ga - 1)
                loss_sum += loss
            engine.step()
        if d.device.type == "cuda":
            torch.cuda.synchronize(d.device)
        dt, cpu_dt = time.perf_counter() - t0, time.process_time() - c0
        step += 1
        data_position += global_batch
        mean_loss = loss_sum / ga
        if d.world > 1:
            dist.all_reduce(mean_loss)
            mean_loss /= d.world
        loss_value = float(mean_loss)
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at step {step}")
        losses.append((step, loss_value))
        if track and mem_probe is not None:
            memory = mem_probe.result()
        elif step - first_step > args.warmup_steps:
            step_times.append(dt)
            cpu_times.append(cpu_dt)
        if d.main and (step % args.log_every == 0 or step == args.steps):
            tok_s = tokens_per_step / dt
            # never above 100%: a step faster than the peak means the peak was measured low (Appendix A of
            # Korthikanti et al. 2022 defines both against the hardware's peak)
            mfu = min(1.0, model_flops / dt / (devices * peak))
            hfu = min(1.0, hw_flops / dt / (devices * peak))
            opt_bytes = optimizer_tier_bytes(engine.optimizer)
            tiers = ", ".join(
                f"{k} {fmt_bytes(tiers_peak.get(k, 0))} activations + {fmt_bytes(opt_bytes.get(k, 0))} optimizer"
                for k in sorted(set(tiers_peak) | set(opt_bytes))
            )
            mem_text = f" | device peak {fmt_bytes(memory['device_peak_bytes'])}" if track and memory else ""
            eta = (args.steps - step) * dt
            progress.show(
                f"step {step}/{args.steps} | loss {loss_value:.4f} | {tok_s:,.0f} tok/s | MFU {100 * mfu:.1f}% "
                f"HFU {100 * hfu:.1f}% | {dt:.2f} s/step{mem_text}"
                + (f" | tiers: {tiers}" if tiers else "")
                + f" | eta {eta:.0f} s",
                final=step == args.steps,
            )
        if args.ckpt_dir and ((args.ckpt_every and step % args.ckpt_every == 0) or step == args.steps):
            save_checkpoint()
        if args.step_gate and d.main:
            signal_gate(args.step_gate, step, {"step_s": dt, "cpu_s": cpu_dt, "tracked": track})
        if on_step is not None:
            on_step(step, {"rank": d.rank, "world": d.world, "loss": loss_value, "ckpt_dir": args.ckpt_dir})

    for h in hooks:
        h.remove()
    if args.save_final_params:
        os.makedirs(args.save_final_params, exist_ok=True)
        params = {k: v.detach().cpu().clone() for k, v in engine.model.state_dict().items()}
        _save_file(params, os.path.join(args.save_final_params, f"params-rank{d.rank}.pt"))

    if d.main and args.metrics_out:
        timed = step_times or []
        med = statistics.median(timed) if timed else float("nan")
        summary = {
            "model": spec.name,
            "params": spec.params,
            "world_size": d.world,
            "engine": args.engine,
            "optimizer": settings.optimizer,
            "dtype": settings.dtype,
            "seq_len": seq,
            "micro_batch": mb,
            "grad_accum": ga,
            "tokens_per_step": tokens_per_step,
            "steps": step,
            "timed_steps": len(timed),
            "step_times_s": timed,
            "step_time_s": med,
            "cpu_times_s": cpu_times,
            "cpu_time_s": statistics.median(cpu_times) if cpu_times else float("nan"),
            "tokens_per_s": tokens_per_step / med if timed else float("nan"),
            "model_flops_per_step": model_flops,
            "hardware_flops_per_step": hw_flops,
            "achieved_flops": model_flops / med / devices if timed else float("nan"),
            "peak_flops_per_device": peak,
            # MFU counts model FLOPs only, HFU adds recompute (Korthikanti et al. 2022, Appendix A)
            "mfu": min(1.0, model_flops / med / (devices * peak)) if timed else float("nan"),
            "hfu": min(1.0, hw_flops / med / (devices * peak)) if timed else float("nan"),
            "recomputed_layers": recomputed,
            "attention_calls_last_step": [attn_calls.get(i, 0) for i in range(spec.num_layers)],
            "memory": memory,
            "tier_peak_bytes": tiers_peak,
            "optimizer_tier_bytes": optimizer_tier_bytes(engine.optimizer),
            "swap": dataclasses.asdict(handle.stats)
            if handle is not None and hasattr(handle, "stats")
            else {},
            "losses": losses,
            "plan": settings.plan_path,
        }
        tmp = args.metrics_out + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(summary, fh, indent=2)
        os.replace(tmp, args.metrics_out)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (TrainConfigError, SpecError) as exc:
        print(f"train_lm: error: {exc}", file=sys.stderr)
        sys.exit(2)
