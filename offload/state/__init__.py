"""Model state off the device: parameters, gradients and optimizer state streamed from their tiers.

`install_streaming(model, optimizer, plan, blocks)` (called by `offload.apply` when `plan.model_state.stream`)
moves every group's state (`offload.state.groups`) into the tiers the plan names (`offload.state.residency`),
releases the device copies of streamed parameters, installs the streaming hooks (`offload.state.stream`) and
returns a `StreamHandle` whose `optimizer` (`offload.state.optimizer.StreamedAdamW`) the loop steps.
`StreamHandle.save(dir)` / `load(dir)` checkpoint every tier's state group by group (never the whole model in
memory at once); `state_dict()` gathers the current parameters; `remove()` puts them back on the model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from offload.state.groups import Group, StateError, build_groups
from offload.state.optimizer import StreamedAdamW, check_optimizer
from offload.state.residency import StateResidency
from offload.state.stream import ParamStreamer
from offload.state.weights import SafetensorsReader, materialize_meta
from planner.plan import Plan

__all__ = ["StateError", "StreamHandle", "install_streaming"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_CHECKPOINT_VERSION = 1


def _check_plan(plan: Plan, optimizer: Any) -> None:
    lay = plan.layout
    if lay.world_size != 1 or lay.zero_stage:
        raise StateError(
            f"streamed model state runs in one process without ZeRO; the plan has {lay.describe()}",
            field="layout",
        )
    if plan.optimizer.offload:
        raise StateError(
            "the plan streams model state and also offloads the optimizer the other way; use one",
            field="optimizer.offload",
        )
    for name in ("layerwise", "state_bits"):
        if getattr(plan.optimizer, name):
            raise StateError(
                f"optimizer.{name} is not supported with streamed model state", field=f"optimizer.{name}"
            )
    if optimizer is None:
        raise StateError(
            "streamed model state needs the model's optimizer (AdamW), got None", field="optimizer"
        )
    check_optimizer(optimizer)


class StreamHandle:
    def __init__(
        self, model: nn.Module, groups: Sequence[Group], residency: StateResidency, streamer: ParamStreamer,
        optimizer: StreamedAdamW,
    ) -> None:  # fmt: skip
        self.model = model
        self.groups = list(groups)
        self.residency = residency
        self.streamer = streamer
        self.optimizer = optimizer
        optimizer.stream_handle = self  # what the trainer checkpoints through
        self.removed = False

    def _weights(self, g: Group) -> torch.Tensor:
        kind = self.optimizer.weight_kind
        out = torch.empty(g.numel, dtype=self.residency.dtype(kind))
        return self.residency.read(g, kind, out)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The current parameters by name (the fp32 master where there is one), read group by group."""
        out: dict[str, torch.Tensor] = {}
        for g in self.groups:
            flat = self._weights(g)
            for s in g.slots:
                out[s.name] = s.view(flat).clone()
        return out

    def save(self, path: str | os.PathLike[str]) -> None:
        """Every tier's state, one file per group, into directory ``path`` (replaced whole, atomically)."""
        self.streamer.wait_gradients()
        final = os.fspath(path)
        parent = os.path.dirname(os.path.abspath(final))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".memtier-state-", dir=parent)
        try:
            for g in self.groups:
                entry: dict[str, Any] = {"numel": g.numel}
                for kind in self.residency.dtypes:
                    if kind != "grads" and self.residency.has(g, kind):
                        buf = torch.empty(g.numel, dtype=self.residency.dtype(kind))
                        entry[kind] = self.residency.read(g, kind, buf)
                entry["steps"] = {s.name: self.optimizer.steps.get(s.order, 0) for s in g.slots}
                torch.save(entry, os.path.join(tmp, f"{g.name}.pt"))
                del entry
            meta = {"version": _CHECKPOINT_VERSION, "groups": [[g.name, g.numel] for g in self.groups]}
            with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
                json.dump(meta, f)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def load(self, path: str | os.PathLike[str]) -> None:
        """Restore what `save` wrote (the same model and plan groups), group by group."""
        src = os.fspath(path)
        with open(os.path.join(src, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        have = [[g.name, g.numel] for g in self.groups]
        if meta.get("version") != _CHECKPOINT_VERSION or meta.get("groups") != have:
            raise StateError(
                f"{src}: the checkpoint's groups do not match this model's ({len(have)} groups)",
                field="checkpoint",
            )
        self.streamer.release_all(rest=True)
        for g in self.groups:
            entry = torch.load(os.path.join(src, f"{g.name}.pt"), weights_only=True)
            for kind in self.residency.dtypes:
                if kind in entry:
                    self.residency.write(g, kind, entry[kind].to(self.residency.dtype(kind)))
            for s in g.slots:
                n = int(entry["steps"].get(s.name, 0))
                if n:
                    self.optimizer.steps[s.order] = n
                else:
                    self.optimizer.steps.pop(s.order, None)
        self.streamer.new_step()

    def remove(self, *, materialize: bool = True) -> None:
        """Unhook; with ``materialize`` the model's parameters hold their current values again (on the device)."""
        if self.removed:
            return
        self.removed = True
        try:
            self.streamer.wait_gradients()
            if materialize:
                device = self.streamer.device
                for g in self.groups:
                    flat = torch.empty(g.numel, dtype=self.residency.dtype("params"))
                    self.residency.read(g, "params", flat)
                    flat = flat.to(device)
                    for s in g.slots:
                        s.param.data = s.view(flat)
        finally:
            self.streamer.remove()
            self.optimizer.close()
            self.residency.close()


# glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 64 << 10


def tame_host_allocator() -> bool:
    """Make glibc return freed large blocks to the system at once (MemAscend: fragmentation and peak spikes of
    the host allocator). By default glibc raises its mmap threshold after each large free (up to 32 MiB), so
    later activations and gradient copies of that size come from the heap and stay in RSS after they are freed.
    Measured on the 374M benchmark model (benchmarks/ssd_offload.py, VmHWM over two steps): 2219 MiB by default,
    1470 MiB with the threshold fixed at 64 KiB from the process's start (`MALLOC_MMAP_THRESHOLD_=65536`, which
    `memtier launch` sets for streamed plans), 1862 MiB when it is only fixed here, once the process runs (what
    a script calling `offload.apply` itself gets). Returns whether it was set (False off glibc)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


def install_streaming(
    model: nn.Module,
    optimizer: Any,
    plan: Plan,
    blocks: Sequence[nn.Module],
    *,
    swap_blocks: frozenset[int] = frozenset(),
    weights: str | os.PathLike[str] | None = None,
) -> StreamHandle:
    """Move the model's state into the plan's tiers and stream it (see the package docstring).

    ``weights``: a safetensors file the parameters are read from, group by group (`offload.state.weights`); the
    model may then be built on the meta device (its parameters are replaced, in the optimizer too).
    """
    _check_plan(plan, optimizer)
    tame_host_allocator()
    ms = plan.model_state
    groups = build_groups(model, blocks, ms)
    params = [s.param for g in groups for s in g.slots]
    real = [p.device for p in params if not p.is_meta]
    device = real[0] if real else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pdt = _DTYPES[plan.workload.dtype]
    master = plan.workload.mixed_precision
    wdt = torch.float32 if master else pdt
    for d in real:
        if d != device:
            raise StateError(f"parameters on {d} and {device}: streaming needs one device", field="model")
    if len(real) < len(params) and weights is None:
        raise StateError(
            "the model's parameters are on the meta device: give the weights to read them from (weights=PATH)",
            field="weights",
        )
    dtypes = {"params": pdt, "grads": wdt, "exp_avg": wdt, "exp_avg_sq": wdt}
    if master:
        dtypes["master"] = torch.float32
    planned = {g.name: g for g in ms.groups}
    residency = StateResidency(groups, planned, dtypes, plan.tiers, device, chunk_numel=ms.chunk_numel)
    try:
        streamer = ParamStreamer(
            groups, residency, device=device, prefetch_depth=ms.prefetch_depth, io_threads=ms.io_threads,
            swap_blocks=swap_blocks,
        )  # fmt: skip
        if len(real) < len(params):
            materialize_meta(model, optimizer, groups, device, pdt)
        reader = SafetensorsReader(weights) if weights is not None else None
        try:
            _move_in(groups, residency, optimizer, streamer, master=master, reader=reader)
        finally:
            if reader is not None:
                reader.close()
        opt = StreamedAdamW(
            optimizer, groups, residency, streamer, max_grad_norm=plan.optimizer.max_grad_norm, master=master
        )
        streamer.install(model)
    except BaseException:
        residency.close()
        raise
    return StreamHandle(model, groups, residency, streamer, opt)


@torch.no_grad()
def _move_in(
    groups: Sequence[Group],
    residency: StateResidency,
    optimizer: Any,
    streamer: ParamStreamer,
    *,
    master: bool,
    reader: SafetensorsReader | None = None,
) -> None:
    """Each group's parameters into its tiers; the device copies of streamed groups released."""
    if any(optimizer.state.values()):
        raise StateError(
            "the optimizer already has state: stream a fresh optimizer and resume with StreamHandle.load",
            field="optimizer",
        )
    for g in groups:
        flat = torch.empty(g.numel, dtype=torch.float32 if master else residency.dtype("params"))
        for s in g.slots:
            if reader is not None:
                reader.read_into(s.name, s.view(flat))
            else:
                s.view(flat).copy_(s.param.detach())
        residency.write(g, "params", flat.to(residency.dtype("params")))
        if master:
            residency.write(g, "master", flat)
        del flat
    # only once every group is stored: a failure above leaves the model's parameters as they were
    for g in groups:
        resident = residency.resident(g, "params")
        for s in g.slots:
            if resident is not None:
                s.param.data = s.view(resident)
            else:
                s.param.data = torch.empty(0, dtype=residency.dtype("params"), device=streamer.device)
