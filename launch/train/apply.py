"""Carrying out the plan on the built model and optimizer: `offload.apply`, with the plan's own settings."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from launch.train.config import Settings, TrainConfigError


@dataclass
class Applied:
    """What carrying out the plan installed: offload.apply's handle and the optimizer to step."""

    handle: Any = None  # offload.apply's handle (hooks, tiers, chunked loss)
    optimizer: Any = None  # the optimizer to step: the plan's offloaded one when it has one
    layerwise: Any = None  # optim.LayerwiseStepper when the plan steps each parameter in backward
    sharded: Any = None  # the offloaded optimizer over a tp / pp / FSDP2 rank's shards (launch.train.shards)

    def remove(self) -> None:
        if self.layerwise is not None:
            self.layerwise.remove()
        if self.sharded is not None:
            self.sharded.remove()  # its hooks and tier state
        if self.handle is not None:
            self.handle.remove()  # closes the tiers: swap files deleted


def lora_model(model: torch.nn.Module, settings: Settings) -> torch.nn.Module:
    """The plan's LoRA adapters on the built model (`plan.workload.lora_rank` on `lora_targets`, PEFT's
    LoraConfig with dropout 0, as `planner.lora` counts them): the base weights frozen; unchanged without."""
    plan = settings.plan
    if plan is None or not plan.workload.lora:
        return model
    try:
        import peft
    except ImportError:
        raise TrainConfigError(
            "the plan trains LoRA adapters, which needs peft: pip install peft",
            field="workload.lora_rank",
            source=settings.plan_path,
        ) from None
    w = plan.workload
    config = peft.LoraConfig(r=w.lora_rank, target_modules=list(w.lora_targets), lora_dropout=0.0)
    return peft.get_peft_model(model, config)


class Trainable(torch.nn.Module):
    """The parameters that train (LoRA: the adapters only), as one module for the optimizer builder: the
    same Parameter objects, so the optimizer (offloaded or not) holds state for these alone."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.trained = torch.nn.ParameterList([p for p in model.parameters() if p.requires_grad])


def apply_plan(model: torch.nn.Module, optimizer: Any, settings: Settings, *, shards: Any = None) -> Applied:
    """`offload.apply(model, optimizer, plan)` (nothing without a plan); every setting comes from the plan.

    `shards` (`launch.train.shards.ShardProxies`, a tp / pp / FSDP2 rank's shards, which `optimizer` was built
    over): an offloaded optimizer state is the shards' (`sharded_offload`).

    Under DeepSpeed the optimizer is DeepSpeed's: only the plan's activation and loss decisions are applied
    here, and an optimizer offload DeepSpeed cannot carry out (ZeRO-0) is refused, not dropped.
    """
    plan = settings.plan
    if plan is None:
        return Applied(optimizer=optimizer)
    import offload

    if settings.engine == "deepspeed":
        if plan.optimizer.offload and plan.layout.zero_stage == 0:
            raise TrainConfigError(
                "DeepSpeed offloads optimizer state only with ZeRO >= 1; re-plan with --engine torch or --zero 1",
                field="layout.engine",
                source=settings.plan_path,
            )
        plan = plan.replace(optimizer=dataclasses.replace(plan.optimizer, offload=False))
        return Applied(handle=offload.apply(model, None, plan), optimizer=optimizer)
    if shards is not None and plan.optimizer.offload:
        return sharded_offload(model, optimizer, settings, shards)
    offload_settings = None
    if plan.optimizer.offload:
        from offload.optimizer import OffloadSettings

        # The offloaded optimizer reads gradients in backward hooks (and clips there when asked): with several
        # ranks the TorchEngine averages them before those hooks run (GradientAverager), not DDP after.
        offload_settings = OffloadSettings(
            grad_accum=plan.layout.grad_accum,
            max_grad_norm=plan.optimizer.max_grad_norm or None,
            cpu_kernel=plan.optimizer.cpu_kernel,
            schedule=plan.optimizer.schedule,
        )
    else:
        optimizer = memory_modes(model, optimizer, settings)
    handle = offload.apply(model, optimizer, plan, optimizer_settings=offload_settings)
    if plan.optimizer.offload:
        handle.optimizer.clips_gradients = bool(plan.optimizer.max_grad_norm)
        # (an offloaded optimizer without clipping already steps each parameter in backward: layer-wise)
        return Applied(handle=handle, optimizer=handle.optimizer)
    stepper = None
    if plan.optimizer.layerwise:
        from optim import LayerwiseStepper

        # data-parallel ranks: the stepper averages each gradient over the world in its hook, before the
        # update (the engine then wraps no DDP: `launch.train.engines.make_engine`); ranks start from rank 0's
        stepper = LayerwiseStepper(
            optimizer,
            accumulation_steps=plan.layout.grad_accum,
            reduce_gradients=plan.layout.world_size > 1,
            model=model,
        )
    return Applied(handle=handle, optimizer=handle.optimizer, layerwise=stepper)


def sharded_offload(model: torch.nn.Module, optimizer: Any, settings: Settings, shards: Any) -> Applied:
    """The plan's activations and loss on `model`, its optimizer-state offload on the rank's shards: the
    offloaded AdamW over `shards` (plain tensors over the shards' storage), stepped after the engine averaged
    and clipped (`launch.train.shards`)."""
    import offload
    from launch.train.shards import ShardedOffload
    from offload.optimizer import offload_optimizer
    from offload.optimizer.settings import OffloadSettings

    plan = settings.plan
    assert plan is not None
    handle = offload.apply(
        model, None, plan.replace(optimizer=dataclasses.replace(plan.optimizer, offload=False))
    )
    # no clipping inside (it would see this rank's shards only); the proxies' storage is the shards', so it
    # must not move into a huge-page buffer of its own
    opts = OffloadSettings(
        cpu_kernel=plan.optimizer.cpu_kernel, schedule=plan.optimizer.schedule, huge_page_params=False
    )
    try:
        inner = offload_optimizer(shards, optimizer, plan, settings=opts)
    except BaseException:
        handle.remove()
        raise
    wrapped = ShardedOffload(shards, inner)
    return Applied(handle=handle, optimizer=wrapped, sharded=inner)


def memory_modes(model: torch.nn.Module, optimizer: Any, settings: Settings) -> Any:
    """The plan's memory modes on a device-resident optimizer: pure 16-bit parameters, low-bit moments,
    a per-parameter step for layer-wise updates (`planner.workload`); refused where they cannot run."""
    plan = settings.plan
    assert plan is not None
    opt_plan, where = plan.optimizer, settings.plan_path
    if opt_plan.layerwise and plan.layout.world_size > 1 and settings.engine != "torch":
        raise TrainConfigError(
            f"layer-wise updates on several ranks run on the torch engine (optim.LayerwiseStepper averages the"
            f" gradients in its hooks), not {settings.engine!r}",
            field="optimizer.layerwise",
            source=where,
        )
    if opt_plan.precision == "pure" and plan.workload.dtype != "fp32":
        # no fp32 master copy: the parameters (and so the moments torch creates like them) in 16 bits;
        # module.to keeps the Parameter objects, so the optimizer's references stay valid
        model.to({"bf16": torch.bfloat16, "fp16": torch.float16}[plan.workload.dtype])
    if opt_plan.state_bits:
        from optim.base import SubspaceAdamW
        from optim.errors import OptimizerConfigError
        from optim.per_param import PerParameterOptimizer, low_bit_adamw

        if opt_plan.kind != "adamw":
            if opt_plan.state_bits != 8 or not isinstance(optimizer, SubspaceAdamW):
                raise TrainConfigError(
                    f"{opt_plan.state_bits}-bit states run for AdamW (8 or 4 bits) and for optim's GaLore,"
                    f" Natural GaLore and FRUGAL (8 bits) in the trainer, not {type(optimizer).__name__}",
                    field="optimizer.state_bits",
                    source=where,
                )
            try:  # the same optimizer and groups, its moments in bitsandbytes' 8-bit format (optim.quantized)
                groups = [{**g, "state_bits": 8} for g in optimizer.param_groups]
                return type(optimizer)(groups)
            except OptimizerConfigError as e:
                raise TrainConfigError(str(e), field="optimizer.state_bits", source=where) from None

        keys = ("lr", "betas", "eps", "weight_decay")
        groups = [
            {"params": g["params"], **{k: g[k] for k in keys if k in g}} for g in optimizer.param_groups
        ]
        try:  # one AdamW per parameter: the whole-step and the layer-wise path alike
            return PerParameterOptimizer(groups, lambda g: low_bit_adamw(g, bits=opt_plan.state_bits))
        except OptimizerConfigError as e:
            raise TrainConfigError(str(e), field="optimizer.state_bits", source=where) from None
    if opt_plan.layerwise and not callable(getattr(optimizer, "step_param", None)):
        from optim.per_param import PerParameterOptimizer

        return PerParameterOptimizer.like(optimizer)
    return optimizer
