"""AdamW over state that lives in the tiers: each group read, updated on the CPU, written back.

The update is `torch._fused_adamw_` (`offload.optimizer.kernels.TorchFusedAdamW`), the kernel and per-element
arithmetic of `torch.optim.AdamW(fused=True)`, applied to the same values in the same order; clipping is
`torch.nn.utils.clip_grad_norm_`'s: per-parameter 2-norms (computed as each group's gradient is written),
stacked in `model.parameters()` order, `max_norm / (total + 1e-6)` clamped at 1. So parameters match the
unoffloaded run bit for bit (fp32, CPU).

Out of core (ZeRO-Infinity's "infinity offload engine"; Fuyou's pipelined CPU update): two host work sets;
the next group's weights, gradients and moments are read while the current one is updated, and the updated
state is written back by a writer thread while the next is updated. Clipping needs every gradient first, so the
update starts after backward (planner: "optimizer_exposed").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from offload.optimizer.kernels import AdamWHyper, AdamWTensors, TorchFusedAdamW
from offload.state.groups import Group, StateError
from offload.state.residency import StateResidency
from offload.state.stream import ParamStreamer

__all__ = ["StreamedAdamW", "check_optimizer"]


def check_optimizer(optimizer: Any) -> None:
    """The optimizer's update is one the streamed state can run (AdamW, no AMSGrad), else StateError."""
    ok = isinstance(optimizer, torch.optim.AdamW) or (
        type(optimizer) is torch.optim.Adam and optimizer.defaults.get("decoupled_weight_decay")
    )
    if not ok:
        raise StateError(
            f"streamed model state updates with AdamW; got {type(optimizer).__name__}", field="optimizer.kind"
        )
    for i, group in enumerate(optimizer.param_groups):
        for key in ("amsgrad", "maximize", "capturable", "differentiable"):
            if group.get(key):
                raise StateError(
                    f"param_groups[{i}].{key}=True is not supported with streamed model state",
                    field="optimizer.settings",
                )


class _WorkSet:
    """One chunk's operands on the host: weights (fp32 master or the parameters), gradients, moments, and the
    cast-down parameters when there is a master copy."""

    def __init__(
        self,
        numel: int,
        weight_dtype: torch.dtype,
        grad_dtype: torch.dtype,
        param_dtype: torch.dtype,
        master: bool,
    ) -> None:
        self.weights = torch.empty(numel, dtype=weight_dtype)
        self.grads = torch.empty(numel, dtype=grad_dtype)
        self.exp_avg = torch.empty(numel, dtype=weight_dtype)
        self.exp_avg_sq = torch.empty(numel, dtype=weight_dtype)
        self.params = torch.empty(numel, dtype=param_dtype) if master else None


class StreamedAdamW(torch.optim.Optimizer):
    """The optimizer the loop steps when the plan streams model state (shares the user's param_groups)."""

    def __init__(
        self,
        base: torch.optim.Optimizer,
        groups: Sequence[Group],
        residency: StateResidency,
        streamer: ParamStreamer,
        *,
        max_grad_norm: float,
        master: bool,
    ) -> None:
        check_optimizer(base)
        self.base = base
        super().__init__([p for g in base.param_groups for p in g["params"]], dict(base.defaults))
        self.param_groups = base.param_groups  # shared: LR schedulers keep driving it
        # optimizer.state stays empty: the state is in the tiers (`state_dict` of the StreamHandle has it)
        self.groups = list(groups)
        self.res = residency
        self.streamer = streamer
        self.max_grad_norm = max_grad_norm
        self.clips_gradients = True  # the trainer does not clip: step() does, where the gradients are
        self.master = master
        self.weight_kind = "master" if master else "params"
        self.steps: dict[int, int] = {}  # ParamSlot.order -> updates so far
        self._hyper_of = {id(p): gi for gi, g in enumerate(self.param_groups) for p in g["params"]}
        numel = min(residency.chunk_numel, max(g.numel for g in self.groups))
        wdt, gdt, pdt = residency.dtype(self.weight_kind), residency.dtype("grads"), residency.dtype("params")
        self._sets = [_WorkSet(numel, wdt, gdt, pdt, master) for _ in range(2)]
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="memtier-opt-read")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="memtier-opt-write")
        self._kernel = TorchFusedAdamW()
        self.last_grad_norm: float | None = None
        self.stream_handle: Any = None  # the StreamHandle that owns it (set by it)

    # ---- the step ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.streamer.wait_gradients()
        grads = self.streamer.grads
        coef = self._clip_coefficient(grads.norms)
        for (
            g
        ) in self.groups:  # each parameter with a gradient counts one more step, however many chunks it spans
            for s in g.trainable:
                if s.order in grads.has_grad:
                    self.steps[s.order] = self.steps.get(s.order, 0) + 1
        units = [
            (g, k, a, b)
            for g in self.groups
            if any(s.order in grads.has_grad for s in g.trainable)
            for k, (a, b) in enumerate(self.res.chunks(g))
        ]
        self._pipeline(units, coef)
        self.streamer.new_step()  # releases the loaded parameters: they are stale now
        return loss

    def _clip_coefficient(self, norms: dict[int, torch.Tensor]) -> torch.Tensor | None:
        """clip_grad_norm_'s coefficient: the norms stacked in model.parameters() order."""
        if not norms:
            return None
        total = torch.linalg.vector_norm(torch.stack([norms[k] for k in sorted(norms)]), 2.0)
        self.last_grad_norm = float(total)
        if not self.max_grad_norm:
            return None
        return torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)

    def _pipeline(self, units: Sequence[tuple[Group, int, int, int]], coef: torch.Tensor | None) -> None:
        """Read chunk i+1 while chunk i is updated; write chunk i while chunk i+1 is updated (two work sets)."""
        reads: list[Future[Any]] = []
        writes: list[Future[Any]] = []
        if units:
            reads.append(self._reader.submit(self._read, units[0], self._sets[0]))
        for i, unit in enumerate(units):
            ws = self._sets[i % 2]
            reads[i].result()
            if i + 1 < len(units):
                if i >= 1:
                    writes[i - 1].result()  # the other set is free again
                reads.append(self._reader.submit(self._read, units[i + 1], self._sets[(i + 1) % 2]))
            self._update(unit, ws, coef)
            writes.append(self._writer.submit(self._write, unit, ws))
        for f in writes:
            f.result()

    def _read(self, unit: tuple[Group, int, int, int], ws: _WorkSet) -> None:
        g, k, a, b = unit
        n = b - a
        self.res.read_chunk(g, self.weight_kind, k, ws.weights[:n])
        self.res.read_chunk(g, "grads", k, ws.grads[:n])
        for kind, buf in (("exp_avg", ws.exp_avg), ("exp_avg_sq", ws.exp_avg_sq)):
            if self.res.has_chunk(g, kind, k):
                self.res.read_chunk(g, kind, k, buf[:n])
            else:
                buf[:n].zero_()  # torch's AdamW starts its moments at zero

    def _update(self, unit: tuple[Group, int, int, int], ws: _WorkSet, coef: torch.Tensor | None) -> None:
        g, _k, a, b = unit
        has = self.streamer.grads.has_grad
        # the chunk's part of each parameter with a gradient: [x, y) in chunk coordinates
        parts = [
            (s, max(a, s.offset) - a, min(b, s.offset + s.numel) - a)
            for s in g.trainable
            if s.order in has and s.offset < b and s.offset + s.numel > a
        ]
        if coef is not None:
            for _s, x, y in parts:  # clip_grad_norm_ multiplies every gradient by the clamped coefficient
                ws.grads[x:y].mul_(coef)
        by_group: dict[int, list[tuple[Any, int, int]]] = {}
        for part in parts:
            by_group.setdefault(self._hyper_of[id(part[0].param)], []).append(part)
        for gi, members in by_group.items():
            # elementwise: the kernel on a flat slice does to each element what it does on the whole tensor
            tensors = AdamWTensors(
                params=[ws.weights[x:y] for _s, x, y in members],
                grads=[ws.grads[x:y] for _s, x, y in members],
                exp_avgs=[ws.exp_avg[x:y] for _s, x, y in members],
                exp_avg_sqs=[ws.exp_avg_sq[x:y] for _s, x, y in members],
                steps=[float(self.steps[s.order]) for s, _x, _y in members],
            )
            self._kernel(tensors, AdamWHyper.from_group(self.param_groups[gi]))
        if ws.params is not None:
            ws.params[: b - a].copy_(ws.weights[: b - a])  # the working copy in the training dtype

    def _write(self, unit: tuple[Group, int, int, int], ws: _WorkSet) -> None:
        g, k, a, b = unit
        n = b - a
        self.res.write_chunk(g, self.weight_kind, k, ws.weights[:n])
        if ws.params is not None:
            self.res.write_chunk(g, "params", k, ws.params[:n])
        self.res.write_chunk(g, "exp_avg", k, ws.exp_avg[:n])
        self.res.write_chunk(g, "exp_avg_sq", k, ws.exp_avg_sq[:n])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: gradients left the parameters in backward; the next step starts new accumulations."""

    def close(self) -> None:
        self._reader.shutdown(wait=True)
        self._writer.shutdown(wait=True)
