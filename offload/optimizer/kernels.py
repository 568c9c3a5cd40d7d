"""AdamW update kernels of the offloaded optimizer: torch's fused AdamW and DeepSpeed's CPU Adam.

Both update lists of flat fp32 tensors in place. The kernel of the CPU side is the faster of the two measured
on this machine (``select_cpu_kernel("auto")``); the device side always runs torch's fused kernel on the
device (CUDA's ``_fused_adamw_``, or the CPU one when the "device" is the CPU).

- ``torch_fused``: ``torch._fused_adamw_`` -- the kernel behind ``torch.optim.AdamW(fused=True)``. Applied to
  the same tensors (one call per parameter tensor) it gives bit-identical results to that optimizer.
- ``deepspeed``: ``deepspeed.ops.adam.DeepSpeedCPUAdam``'s op (Ren et al. 2021, ZeRO-Offload, Sec. 5.1: a
  SIMD CPU Adam). Its op compiles on first use (~100 s); ``select_cpu_kernel("auto")`` only considers it when a
  build is already cached, so nothing here ever compiles implicitly. Its arithmetic differs from torch's in
  the last bits (fp32 bias corrections), so it is close to, never bit-identical with, ``torch.optim.AdamW``.

Both release the GIL while they run, so an update on a worker thread overlaps the autograd thread.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import torch

from offload.deepspeed_ops import DeepSpeedOp
from planner.errors import SpecError

__all__ = [
    "CPU_KERNELS",
    "AdamWHyper",
    "AdamWTensors",
    "DeepSpeedCpuAdam",
    "TorchFusedAdamW",
    "UpdateKernel",
    "deepspeed_cpu_adam_prebuilt",
    "deepspeed_cpu_adam_status",
    "kernel_throughput",
    "kernel_throughputs",
    "make_kernel",
    "select_cpu_kernel",
]

logger = logging.getLogger("memtier.offload.optimizer")

KernelName = Literal["torch_fused", "deepspeed"]
CPU_KERNELS: tuple[str, ...] = ("torch_fused", "deepspeed")


class KernelError(SpecError):
    """An update kernel that cannot be used here (the message names the setting)."""


@dataclass(frozen=True, kw_only=True)
class AdamWHyper:
    """The hyper-parameters of one parameter group at the moment its subgroup is updated."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float

    @classmethod
    def from_group(cls, group: dict[str, Any]) -> AdamWHyper:
        lr = group["lr"]
        beta1, beta2 = group["betas"]
        return cls(
            lr=float(lr),  # a tensor lr (torch allows it) is read as its value
            beta1=float(beta1),
            beta2=float(beta2),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
        )


@dataclass(frozen=True, kw_only=True)
class AdamWTensors:
    """The operands of one AdamW step: lists of fp32 tensors, the ``i``-th of each list the same shape.

    ``params`` are updated in place (the parameters themselves, or fp32 master weights), as are the moments;
    ``steps[i]`` is tensor ``i``'s (already incremented) step count, a Python number: counting in Python keeps
    torch ops out from between DeepSpeed's kernels (see ``DeepSpeedCpuAdam``), and torch's kernel gets them
    as the float32 0-dim tensors torch's AdamW counts in (exact below 2**24 steps).
    """

    params: Sequence[torch.Tensor]
    grads: Sequence[torch.Tensor]
    exp_avgs: Sequence[torch.Tensor]
    exp_avg_sqs: Sequence[torch.Tensor]
    steps: Sequence[float]


class UpdateKernel(Protocol):
    """One AdamW step on ``AdamWTensors``, in place."""

    name: ClassVar[str]

    def __call__(self, t: AdamWTensors, hyper: AdamWHyper) -> None: ...


class TorchFusedAdamW:
    """``torch._fused_adamw_``: the same kernel, and the same per-tensor arithmetic, as AdamW(fused=True)."""

    name: ClassVar[str] = "torch_fused"

    def __call__(self, t: AdamWTensors, hyper: AdamWHyper) -> None:
        if not t.params:
            return
        # one tensor of the counts, on the parameters' device (one copy on CUDA), viewed per parameter
        steps = torch.tensor(list(t.steps), dtype=torch.float32, device=t.params[0].device).unbind()
        torch._fused_adamw_(
            list(t.params),
            list(t.grads),
            list(t.exp_avgs),
            list(t.exp_avg_sqs),
            [],  # max_exp_avg_sqs: no AMSGrad
            list(steps),
            lr=hyper.lr,
            beta1=hyper.beta1,
            beta2=hyper.beta2,
            weight_decay=hyper.weight_decay,
            eps=hyper.eps,
            amsgrad=False,
            maximize=False,
        )


# ---- DeepSpeed CPU Adam ------------------------------------------------------------------------------------

_CPU_ADAM = DeepSpeedOp("CPUAdamBuilder", "cpu_adam", not_built_hint="it compiles on first use, ~100 s")
# DeepSpeedCPUAdam numbers its optimizers from 0 in a class counter; ours start far above so both can coexist
_ds_ids = itertools.count(1 << 20)


def deepspeed_cpu_adam_prebuilt() -> bool:
    """Whether DeepSpeed's cpu_adam op is built and cached (loading it then takes seconds, not minutes)."""
    return _CPU_ADAM.prebuilt()


def deepspeed_cpu_adam_status(*, build: bool = False) -> tuple[bool, str]:
    """(usable, reason if not) for DeepSpeed's cpu_adam op; loads it (compiling only if ``build``)."""
    return _CPU_ADAM.status(build=build)


class DeepSpeedCpuAdam:
    """DeepSpeed's SIMD CPU Adam in AdamW mode, one op instance (``opt_id``) per kernel object."""

    name: ClassVar[str] = "deepspeed"

    def __init__(self, *, build: bool = False) -> None:
        ok, why = deepspeed_cpu_adam_status(build=build)
        if not ok:
            raise KernelError(why, field="cpu_kernel")
        self._op = _CPU_ADAM.module
        self.opt_id = next(_ds_ids)
        # create_adam(id, lr, beta1, beta2, eps, weight_decay, adamw_mode, should_log); every adam_update call
        # passes the current hyper-parameters again, so these are placeholders
        self._op.create_adam(self.opt_id, 1e-3, 0.9, 0.999, 1e-8, 0.0, True, False)

    def __call__(self, t: AdamWTensors, hyper: AdamWHyper) -> None:
        # NOTE: nothing runs between the kernels but the calls themselves (as in DeepSpeedCPUAdam.step): a torch
        # op right after one of DeepSpeed's OpenMP kernels waits ~20-150 us here, hence Python step counts
        for p, g, m, v, count in zip(t.params, t.grads, t.exp_avgs, t.exp_avg_sqs, t.steps):
            # adam_update(id, step, lr, beta1, beta2, eps, weight_decay, bias_correction, param, grad, m, v)
            self._op.adam_update(
                self.opt_id,
                int(count),
                hyper.lr,
                hyper.beta1,
                hyper.beta2,
                hyper.eps,
                hyper.weight_decay,
                True,
                p,
                g,
                m,
                v,
            )

    def close(self) -> None:
        if self._op is not None:
            self._op.destroy_adam(self.opt_id)
            self._op = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def make_kernel(name: str, *, build: bool = False) -> UpdateKernel:
    if name == "torch_fused":
        return TorchFusedAdamW()
    if name == "deepspeed":
        return DeepSpeedCpuAdam(build=build)
    raise KernelError(f"unknown kernel {name!r}; choices: auto, {', '.join(CPU_KERNELS)}", field="cpu_kernel")


# ---- measurement --------------------------------------------------------------------------------------------


def kernel_throughputs(
    kernels: Sequence[UpdateKernel], *, numel: int = 1 << 23, repeats: int = 5
) -> dict[str, float]:
    """Parameters per second of each kernel on one flat fp32 CPU tensor of ``numel`` elements.

    Best of ``repeats`` runs each, the kernels taking turns (round-robin), so a load spike from other
    processes slows every kernel alike instead of deciding the comparison.
    """
    gen = torch.Generator().manual_seed(0)
    data = {}
    for k in kernels:
        p = torch.randn(numel, generator=gen)
        g = torch.randn(numel, generator=gen).mul_(1e-2)
        data[k.name] = (p, g, torch.zeros(numel), torch.zeros(numel), [0.0])
    hyper = AdamWHyper(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    best = {k.name: float("inf") for k in kernels}
    for i in range(repeats + 1):
        for k in kernels:
            p, g, m, v, step = data[k.name]
            step[0] += 1
            t0 = time.perf_counter()
            k(AdamWTensors(params=[p], grads=[g], exp_avgs=[m], exp_avg_sqs=[v], steps=step), hyper)
            dt = time.perf_counter() - t0
            if i:  # the first run warms caches and page tables
                best[k.name] = min(best[k.name], dt)
    return {name: numel / dt for name, dt in best.items()}


def kernel_throughput(kernel: UpdateKernel, *, numel: int = 1 << 22, repeats: int = 3) -> float:
    """Parameters per second of one kernel (see ``kernel_throughputs``)."""
    return kernel_throughputs([kernel], numel=numel, repeats=repeats)[kernel.name]


_selected: dict[str, str] = {}


def select_cpu_kernel(choice: str = "auto", *, build: bool = False) -> str:
    """The CPU kernel to use: ``choice`` itself, or for "auto" the faster of those usable here (measured once
    per process; DeepSpeed's only when its op is already built, or ``build``)."""
    if choice != "auto":
        if choice not in CPU_KERNELS:
            raise KernelError(
                f"unknown kernel {choice!r}; choices: auto, {', '.join(CPU_KERNELS)}", field="cpu_kernel"
            )
        return choice
    key = f"auto:{build}:{torch.get_num_threads()}"
    if key not in _selected:
        kernels: list[UpdateKernel] = [TorchFusedAdamW()]
        ds = DeepSpeedCpuAdam(build=build) if deepspeed_cpu_adam_status(build=build)[0] else None
        if ds is not None:
            kernels.append(ds)
        try:
            # best of 9 (~0.3 s, once per process and thread count); while the two are within 5% of each
            # other, up to two more rounds (best over all): a load spike from another process during one
            # kernel's turns can flip a close choice (seen here: a 4% lead lost once in a best-of-9)
            rates = kernel_throughputs(kernels, repeats=9)
            for _ in range(2):
                if len(rates) < 2 or max(rates.values()) >= 1.05 * min(rates.values()):
                    break
                again = kernel_throughputs(kernels, repeats=9)
                rates = {name: max(rate, again[name]) for name, rate in rates.items()}
        finally:
            if ds is not None:
                ds.close()
        # the faster one; a tie goes to torch's (bit-identical to AdamW(fused=True))
        _selected[key] = max(rates, key=lambda k: (rates[k], k == "torch_fused"))
        logger.info("CPU AdamW kernels measured here (params/s): %s -> %s", rates, _selected[key])
    return _selected[key]
