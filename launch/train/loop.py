"""The training loop: resume, step, check, log, checkpoint, report.

`run(args, build_model=..., build_optimizer=..., make_data=...)` is the whole trainer; a script supplies
the model, the optimizer and the data, and everything else comes from the plan (`launch.train.config`).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.distributed as dist

from launch import heartbeat
from launch.train import checkpoint, signals
from launch.train.apply import Trainable, apply_plan, lora_model
from launch.train.config import Settings, resolve_settings
from launch.train.distributed import Dist, init_distributed
from launch.train.engines import Engine, make_engine
from launch.train.metrics import (
    MemoryProbe,
    Progress,
    StepObserver,
    StepRates,
    chunked_loss_calls,
    compiled_blocks,
    fmt_bytes,
    optimizer_tier_bytes,
    peak_flops_per_device,
    process_memory,
    step_line,
    swap_stats,
    tiers_text,
    timing_summary,
    write_json_atomic,
)
from launch.train.parallel import parallel_layout
from planner.flops import hardware_flops_per_step, model_flops_per_step
from planner.model import ModelSpec

OnStep = Callable[[int, dict[str, Any]], None]


class Data(Protocol):
    def batch(self, first_sequence: int, count: int) -> torch.Tensor:
        """`count` consecutive sequences from sequence `first_sequence` on (counted over all ranks)."""
        ...


def _rates(settings: Settings, d: Dist, dp: int) -> StepRates:
    spec, seq = settings.spec, settings.seq_len
    tokens = settings.micro_batch * settings.grad_accum * dp * seq
    recomputed = float(sum(a.recompute_fraction for a in settings.plan.activations)) if settings.plan else 0.0
    return StepRates(
        tokens_per_step=tokens,
        model_flops=model_flops_per_step(spec, tokens, seq),
        hw_flops=hardware_flops_per_step(spec, tokens, seq, recomputed_layers=recomputed),
        peak=peak_flops_per_device(settings),
        devices=d.world if d.device.type == "cuda" else d.nodes,  # CPU ranks of a node share one CPU
    )


class Loop:
    def __init__(
        self, args: argparse.Namespace, d: Dist, settings: Settings, data: Data, engine: Engine, handle: Any
    ) -> None:
        self.args, self.d, self.s, self.data, self.engine, self.handle = (
            args,
            d,
            settings,
            data,
            engine,
            handle,
        )
        self.rates = _rates(settings, d, engine.dp_size)
        self.pos = checkpoint.Position()
        self.step_times: list[float] = []
        self.cpu_times: list[float] = []  # CPU seconds of this process (all its threads) per timed step
        self.losses: list[tuple[int, float]] = []
        self.memory: dict[str, int] = {}
        self.progress = Progress(total=args.steps)
        self.observer = StepObserver(engine.model, handle)
        plan = settings.plan
        # updates that run in backward, before the loss is known: layer-wise steps, and an offloaded
        # optimizer without clipping
        self.updates_in_backward = bool(
            plan and (plan.optimizer.layerwise or (plan.optimizer.offload and not settings.max_grad_norm))
        )

    # ---- one step
    def _micro_batches(self, probe: MemoryProbe | None) -> torch.Tensor:
        s, d = self.s, self.d
        loss_sum = torch.zeros((), device=d.device)
        dp_rank, dp = self.engine.dp_rank, self.engine.dp_size
        # micro-batch `micro` of data-parallel rank r: the sequences from (micro * dp + r) * micro_batch on; the
        # ranks of one dp rank's tp/pp group read the same ones. Read before the memory probe starts: the batch
        # is a copy, but reading it touches the corpus's storage, which MemTracker would count as the step's
        firsts = [self.pos.data_position + (m * dp + dp_rank) * s.micro_batch for m in range(s.grad_accum)]
        batches = [self.data.batch(f, s.micro_batch).to(d.device) for f in firsts]
        with probe.track() if probe is not None else contextlib.nullcontext():
            if self.engine.whole_batch:
                loss_sum += self.engine.batch_step(torch.cat(batches)) * s.grad_accum
            for micro, x in enumerate(batches if not self.engine.whole_batch else []):
                if probe is not None and micro:
                    probe.next_micro_batch()
                loss_sum += self.engine.micro_step(x, last=micro == s.grad_accum - 1)
            mean = self._mean_loss(loss_sum / s.grad_accum)
            self._check_loss(mean)
            self.engine.step()
        return mean

    def _mean_loss(self, loss: torch.Tensor) -> torch.Tensor:
        if self.d.world > 1:
            dist.all_reduce(loss)
            loss /= self.d.world
        return loss

    def _check_loss(self, loss: torch.Tensor) -> None:
        """Before the update: a non-finite loss stops the run with the step named and the parameters as they
        were (every rank sees the same all-reduced loss, so every rank stops)."""
        value = float(loss)
        if not math.isfinite(value):
            state = (
                "this plan updates parameters in backward (layer-wise or offloaded without clipping), so some may have changed"
                if self.updates_in_backward
                else "the parameters were not updated"
            )
            raise FloatingPointError(f"loss is {value} at step {self.pos.step + 1}; {state}")

    def one_step(self) -> tuple[float, float, float, bool]:
        """(loss, seconds, CPU seconds, whether memory was tracked) of the next step."""
        args, d = self.args, self.d
        self.observer.attn_calls.clear()
        track = args.track_memory and self.pos.step == args.steps - 1
        probe = MemoryProbe(self.engine.model, self.engine.optimizer, d.device) if track else None
        t0, c0 = time.perf_counter(), time.process_time()
        mean = self._micro_batches(probe)
        if d.device.type == "cuda":
            torch.cuda.synchronize(d.device)
        dt, cpu_dt = time.perf_counter() - t0, time.process_time() - c0
        if probe is not None:
            self.memory = probe.result()
        global_batch = self.s.micro_batch * self.s.grad_accum * self.engine.dp_size
        self.pos = checkpoint.Position(self.pos.step + 1, self.pos.data_position + global_batch)
        return float(mean), dt, cpu_dt, track

    # ---- around the steps
    def announce(self) -> None:
        s, d, plan = self.s, self.d, self.s.plan
        sharded = s.engine == "deepspeed" or getattr(self.engine, "par", None) is not None
        if plan is not None and plan.layout.zero_stage and plan.layout.dp > 1 and not sharded:
            print(
                f"[train] warning: the plan's ZeRO stage {plan.layout.zero_stage} is carried out by "
                "the deepspeed engine only; this engine keeps a full replica per rank",
                file=sys.stderr,
            )
        print(
            f"[train] {s.spec.name}: {s.spec.params / 1e6:.1f}M params, {d.world} rank(s) x micro-batch "
            f"{s.micro_batch} x accum {s.grad_accum} x seq {s.seq_len} = {self.rates.tokens_per_step} "
            f"tokens/step, {s.optimizer}, engine {s.engine}"
            + (f", plan {s.plan_path}" if s.plan_path else ""),
            file=sys.stderr,
        )

    def log(self, loss: float, dt: float, track: bool) -> None:
        step, total = self.pos.step, self.args.steps
        mem = f" | device peak {fmt_bytes(self.memory['device_peak_bytes'])}" if track and self.memory else ""
        tiers = tiers_text(self.observer.tiers_peak, self.engine.optimizer)
        self.progress.show(step_line(step, total, loss, dt, self.rates, tiers, mem), final=step == total)

    def save(self) -> None:
        meta = {
            "seed": self.args.seed,
            "model": self.s.spec.name,
            "plan_sha256": checkpoint.plan_digest(self.s.plan_path),
            "engine": self.s.engine,
        }
        checkpoint.save_checkpoint(self.engine, self.d, self.args.ckpt_dir, self.pos, meta)

    def run(self, on_step: OnStep | None) -> int:
        args, d = self.args, self.d
        if args.ckpt_dir:
            self.pos = checkpoint.resume(
                self.engine, d, args.ckpt_dir, fresh=args.no_resume, convert=args.convert_checkpoint
            )
        first_step = self.pos.step
        if d.main:
            self.announce()
        while self.pos.step < args.steps:
            if args.step_gate:
                signals.wait_for_gate(args.step_gate, self.pos.step + 1)
            loss, dt, cpu_dt, track = self.one_step()
            step = self.pos.step
            self.losses.append((step, loss))
            if not track and step - first_step > args.warmup_steps:
                self.step_times.append(dt)
                self.cpu_times.append(cpu_dt)
            if d.main and (step % args.log_every == 0 or step == args.steps):
                self.log(loss, dt, track)
            if args.ckpt_dir and ((args.ckpt_every and step % args.ckpt_every == 0) or step == args.steps):
                self.save()
            if args.step_gate and d.main:
                signals.signal_gate(args.step_gate, step, {"step_s": dt, "cpu_s": cpu_dt, "tracked": track})
            if on_step is not None:
                on_step(step, {"rank": d.rank, "world": d.world, "loss": loss, "ckpt_dir": args.ckpt_dir})
        self.observer.remove()
        self.finish()
        return 0

    def finish(self) -> None:
        args, d = self.args, self.d
        if args.save_final_params:
            os.makedirs(args.save_final_params, exist_ok=True)
            params = self.engine.final_params()
            checkpoint.save_file(params, os.path.join(args.save_final_params, f"params-rank{d.rank}.pt"))
        if d.main and args.metrics_out:
            write_json_atomic(args.metrics_out, self.summary())

    def summary(self) -> dict[str, Any]:
        s, spec = self.s, self.s.spec
        recomputed = float(sum(a.recompute_fraction for a in s.plan.activations)) if s.plan else 0.0
        return {
            "model": spec.name,
            "params": spec.params,
            "world_size": self.d.world,
            "engine": s.engine,
            "optimizer": s.optimizer,
            "dtype": s.dtype,
            "seq_len": s.seq_len,
            "micro_batch": s.micro_batch,
            "grad_accum": s.grad_accum,
            "tokens_per_step": self.rates.tokens_per_step,
            "steps": self.pos.step,
            **timing_summary(self.step_times, self.cpu_times, self.rates),
            "recomputed_layers": recomputed,
            "attention_calls_last_step": [self.observer.attn_calls.get(i, 0) for i in range(spec.num_layers)],
            "memory": self.memory,
            "process_memory": process_memory(),
            "tier_peak_bytes": self.observer.tiers_peak,
            "optimizer_tier_bytes": optimizer_tier_bytes(self.engine.optimizer),
            "swap": swap_stats(self.handle),
            "chunked_loss_calls": chunked_loss_calls(self.handle, self.engine),
            "compiled_blocks": compiled_blocks(self.handle),
            "losses": self.losses,
            "plan": s.plan_path,
        }


BuildModel = Callable[[ModelSpec, int], torch.nn.Module]
BuildOptimizer = Callable[[torch.nn.Module, Settings, float], Any]
MakeData = Callable[[Settings], Data]


def _train(
    args: argparse.Namespace, d: Dist, build_model: BuildModel, build_optimizer: BuildOptimizer,
    make_data: MakeData, on_step: OnStep | None,
) -> int:  # fmt: skip
    settings = resolve_settings(args)
    data = make_data(settings)
    model = lora_model(build_model(settings.spec, args.seed).to(d.device), settings)
    par = parallel_layout(model, settings, d, args)
    trained: torch.nn.Module = par.modules if par is not None else model  # a pipeline rank: its chunks
    if settings.plan is not None and settings.plan.workload.lora:
        trained = Trainable(model)  # the adapters: no optimizer state for the frozen weights
    shards = None
    if par is not None and settings.plan is not None and settings.plan.optimizer.offload:
        from launch.train.shards import ShardProxies

        # the offloaded optimizer updates plain tensors: the shards' storage (launch.train.shards)
        trained = shards = ShardProxies(list(par.modules.parameters()))
    applied = apply_plan(model, build_optimizer(trained, settings, args.lr), settings, shards=shards)
    try:
        engine = make_engine(
            model, applied.optimizer, d, settings, lr=args.lr, ds_config_path=args.ds_config, par=par
        )
        return Loop(args, d, settings, data, engine, applied.handle).run(on_step)
    finally:
        applied.remove()


def run(
    args: argparse.Namespace,
    *,
    build_model: BuildModel,
    build_optimizer: BuildOptimizer,
    make_data: MakeData,
    on_step: OnStep | None = None,
) -> int:
    """Train under the plan in `args.plan` (or the flags): the whole trainer, for any causal LM whose forward
    takes `input_ids` and `labels` and returns `.loss` (Hugging Face's convention)."""
    previous_sigterm = signal.signal(signal.SIGTERM, signals.on_sigterm)
    remove_watchdog = signals.install_stop_watchdog(signals.STOP_GRACE_S)
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or (os.cpu_count() or 1)
    torch.set_num_threads(max(1, threads))
    d = init_distributed()
    stop_heartbeat = heartbeat.start(d.rank)  # `memtier launch` kills a rank whose heartbeat stops
    try:
        return _train(args, d, build_model, build_optimizer, make_data, on_step)
    finally:
        stop_heartbeat()
        signal.signal(signal.SIGTERM, previous_sigterm)
        remove_watchdog()
        if d.world > 1 and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
