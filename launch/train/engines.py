"""One training step over the engine the plan names: plain PyTorch (DDP; tp / pp / FSDP2 through
`launch.train.parallel`), Accelerate, or DeepSpeed.

Each engine splits a step the same way: `micro_step` runs forward and backward of one micro-batch (no
update), `step` updates. The loop checks the loss between the two, so a non-finite loss stops the run before
the parameters change.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import torch

from launch.train.checkpoint import check_model_state, check_optimizer_state, refuse_mismatches, save_file
from launch.train.config import Settings, TrainConfigError
from launch.train.distributed import Dist, GradientAverager


class Engine:
    """One training step and the state to checkpoint, over a plain, DeepSpeed or Accelerate setup."""

    name = "torch"

    def __init__(
        self, model: torch.nn.Module, optimizer: Any, d: Dist, grad_accum: int, *, max_grad_norm: float = 0.0
    ) -> None:
        self.model = model  # the unwrapped HF model
        self.optimizer = optimizer
        self.d = d
        self.grad_accum = grad_accum
        self.runner: Any = model
        self.dp_rank, self.dp_size = d.rank, d.world  # which share of the global batch this rank reads
        self.whole_batch = False  # True: `batch_step` runs all micro-batches at once (a pipeline schedule)
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

    def batch_step(self, x: torch.Tensor) -> torch.Tensor:
        """Forward and backward of all of this rank's micro-batches (stacked) at once; their mean loss."""
        raise NotImplementedError

    def step(self) -> None:
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def streamed(self) -> Any:
        """The streamed model state (`offload.state.StreamHandle`) when the plan streams it, else None."""
        return getattr(self.optimizer, "stream_handle", None)

    def final_params(self) -> dict[str, torch.Tensor]:
        """The parameters to save at the end (`--save-final-params`), whole tensors."""
        if self.streamed is not None:
            return self.streamed.state_dict()
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def save(self, tmp: str) -> None:
        if self.streamed is not None:  # every tier's state, group by group (never the whole model in memory)
            self.streamed.save(os.path.join(tmp, "state"))
            return
        if self.d.main:
            save_file(self.model.state_dict(), os.path.join(tmp, "model.pt"))
            save_file(self.optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))

    def load(self, path: str, *, convert: bool = False) -> None:
        """Model and optimizer state, checked against the live ones first: a dtype or shape that differs is
        refused (named), unless `convert`."""
        if self.streamed is not None:
            self.streamed.load(os.path.join(path, "state"))
            return
        model_sd = torch.load(os.path.join(path, "model.pt"), map_location=self.d.device)
        opt_sd = torch.load(
            os.path.join(path, "optimizer.pt"), map_location=self.d.device, weights_only=False
        )
        problems = check_model_state(model_sd, self.model, convert=convert)
        problems += check_optimizer_state(opt_sd, self.optimizer, convert=convert)
        refuse_mismatches(problems, path)
        self.model.load_state_dict(model_sd)
        self.optimizer.load_state_dict(opt_sd)


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
        reduced_in_hooks: bool = False,
    ) -> None:
        super().__init__(model, optimizer, d, grad_accum, max_grad_norm=max_grad_norm)
        self.averager = GradientAverager(model, d.world) if d.world > 1 and hook_allreduce else None
        if d.world > 1 and self.averager is None and not reduced_in_hooks:
            from torch.nn.parallel import DistributedDataParallel

            # DDP broadcasts rank 0's parameters at construction and averages gradients in backward.
            self.runner = DistributedDataParallel(
                model, device_ids=[d.device.index] if d.device.type == "cuda" else None
            )


class ParallelEngine(Engine):
    """The plan's tp / pp / FSDP2 layout on torch's engine (`launch.train.parallel`): the model was
    parallelized before the optimizer was built; gradients are averaged over the dp dim (FSDP2 in backward,
    else after the last micro-batch) and clipped by the global norm over every rank."""

    def __init__(self, par: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # Engine's: model, optimizer, d, grad_accum, max_grad_norm=
        self.par = par
        self.dp_rank, self.dp_size = par.dp_rank, par.dp
        self.whole_batch = par.schedule is not None

    def batch_step(self, x: torch.Tensor) -> torch.Tensor:
        from launch.train.parallel import pipeline_step

        return pipeline_step(self.par, x)

    def step(self) -> None:
        from torch.distributed.tensor.experimental import implicit_replication

        from launch.train.parallel import average_gradients, clip_gradients

        average_gradients(self.par)
        if self.max_grad_norm:
            clip_gradients(self.par, self.max_grad_norm)
        # NOTE: replicated parameters (embeddings, norms) stay plain tensors beside the DTensor shards of the
        # tp-split projections; one fused optimizer call over both treats the plain ones as replicated
        with implicit_replication():
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def final_params(self) -> dict[str, torch.Tensor]:
        from launch.train.parallel import full_state

        return full_state(self.par, self.model)

    def save(self, tmp: str) -> None:
        raise TrainConfigError(
            "checkpoints of tp / pp / FSDP2 layouts are not written yet; run without --ckpt-dir",
            field="--ckpt-dir",
        )

    def load(self, path: str, *, convert: bool = False) -> None:
        self.save(path)


class AccelerateEngine(Engine):
    name = "accelerate"

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
    name = "deepspeed"

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
        # DeepSpeed wants step() after every micro-batch and updates at the accumulation boundary: the last
        # micro-batch's step() is `step` below, after the loop has checked the loss
        if not last:
            self.runner.step()
        return loss.detach()

    def step(self) -> None:
        self.runner.step()

    def save(self, tmp: str) -> None:
        self.runner.save_checkpoint(tmp, tag="engine")

    def load(self, path: str, *, convert: bool = False) -> None:
        # DeepSpeed checks its own checkpoint's partitioning and dtypes (it refuses a mismatched ZeRO layout)
        self.runner.load_checkpoint(path, tag="engine")


def deepspeed_config(path: str | None, settings: Settings, world: int) -> dict[str, Any]:
    """The DeepSpeed config: the file `memtier launch` wrote from planner.emit (MEMTIER_DS_CONFIG), or, with a
    plan and no file, planner.emit.ds_config(plan) itself. A file that disagrees with the plan is refused."""
    if path:
        if not os.path.isfile(path):
            raise TrainConfigError("file not found", field="--ds-config", source=path)
        with open(path) as fh:
            try:
                cfg = json.load(fh)
            except json.JSONDecodeError as exc:
                raise TrainConfigError(f"malformed JSON: {exc}", field="--ds-config", source=path) from None
    elif settings.plan is not None:
        from planner.emit import ds_config

        cfg = ds_config(settings.plan)
    else:
        raise TrainConfigError(
            "--engine deepspeed needs a plan (`memtier plan --engine deepspeed`, then `memtier launch --plan`) "
            "or a DeepSpeed config",
            field="--ds-config",
        )
    expected = {
        "train_micro_batch_size_per_gpu": settings.micro_batch,
        "gradient_accumulation_steps": settings.grad_accum,
        "gradient_clipping": settings.max_grad_norm,
    }
    if settings.plan is None:  # a hand-written config: the run's own settings fill in what it leaves out
        for key, value in expected.items():
            cfg.setdefault(key, value)
    for key, value in expected.items():
        if cfg.get(key) != value:
            raise TrainConfigError(
                f"{key}={cfg.get(key)!r} but the run has {value!r}; the config must agree with the plan",
                field=f"--ds-config: {key}",
                source=path,
            )
    cfg.setdefault("train_batch_size", settings.micro_batch * settings.grad_accum * world)
    return cfg


def make_engine(
    model: torch.nn.Module,
    optimizer: Any,
    d: Dist,
    settings: Settings,
    *,
    lr: float,
    ds_config_path: str | None,
    par: Any = None,
) -> Engine:
    """The engine the settings name (the plan's `layout.engine`); `par`: the layout `parallelize` applied."""
    ga, clip = settings.grad_accum, settings.max_grad_norm
    if settings.engine == "deepspeed":
        cfg = deepspeed_config(ds_config_path, settings, d.world)
        return DeepSpeedEngine(model, optimizer, d, ga, config=cfg, lr=lr)
    if settings.engine == "accelerate":
        return AccelerateEngine(model, optimizer, d, ga, max_grad_norm=clip)
    if par is not None:
        return ParallelEngine(par, model, optimizer, d, ga, max_grad_norm=clip)
    plan = settings.plan
    offloaded = plan is not None and plan.optimizer.offload
    # layer-wise updates: optim.LayerwiseStepper averages each gradient in its own hook (no DDP around it)
    reduced = plan is not None and plan.optimizer.layerwise and not offloaded
    return TorchEngine(
        model, optimizer, d, ga, max_grad_norm=clip, hook_allreduce=offloaded, reduced_in_hooks=reduced
    )
