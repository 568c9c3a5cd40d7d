"""Parameters read from their tier shortly before each use, released after it; gradients moved out as they come.

The schedule (ZeRO-Infinity, Rajbhandari et al. 2021, Sec. 6; Fuyou, Liao et al. 2024, Sec. 4): a block's
parameters are read into one of `prefetch_depth + 1` device buffers before its forward (the next
`prefetch_depth` blocks are read ahead while it computes) and released after it, except the last block, which
backward needs next; in backward they are read again when the gradient reaches the block's output (the blocks
before it read ahead) and released when it reaches the block's input. "rest" (embedding, final norm, head) is
read at the model's first forward and held until the optimizer step. Gradients leave the device as autograd
accumulates them (a post-accumulate hook per parameter), gathered per group in a host buffer and written to the
group's gradient tier (added to what earlier micro-batches left there) by a writer thread.

Saved tensors that are views of a streamed buffer (the weight a matmul saves for backward) are not kept as
views: the buffer is reused by other blocks. A saved-tensor hook replaces them by a reference (group, size,
stride, offset) that backward resolves against the buffer the group occupies then (the same bytes: parameters
only change at the optimizer step).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from offload.state.gradients import GradientSink
from offload.state.groups import Group
from offload.state.residency import StateResidency

__all__ = ["ParamStreamer", "StreamStats"]


class StreamStats:
    def __init__(self) -> None:
        self.reads = 0  # group parameter reads
        self.read_bytes = 0
        self.prefetch_hits = 0  # reads that had started before they were needed
        self.waits_s = 0.0  # compute thread waiting for a read

    def as_dict(self) -> dict[str, float]:
        return dict(vars(self))


class _ParamRef:
    """A saved tensor that was a view of a streamed parameter buffer (resolved again at unpack)."""

    __slots__ = ("dtype", "group", "offset", "size", "streamer", "stride")

    def __init__(self, streamer: ParamStreamer, group: Group, t: torch.Tensor) -> None:
        self.streamer = streamer
        self.group = group
        self.size = t.size()
        self.stride = t.stride()
        self.offset = t.storage_offset()
        self.dtype = t.dtype

    def unpack(self) -> torch.Tensor:
        buf = self.streamer.buffer_of(self.group)
        return buf.as_strided(self.size, self.stride, self.offset)


def _unpack(packed: Any) -> torch.Tensor:
    return packed.unpack() if isinstance(packed, _ParamRef) else packed


def _first_grad_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj if obj.requires_grad else None
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for x in obj:
            t = _first_grad_tensor(x)
            if t is not None:
                return t
    return None


class ParamStreamer:
    """The parameter and gradient traffic of every streamed group (see the module docstring)."""

    def __init__(
        self,
        groups: Sequence[Group],
        residency: StateResidency,
        *,
        device: torch.device,
        prefetch_depth: int,
        io_threads: int,
        swap_blocks: frozenset[int] = frozenset(),
    ) -> None:
        self.groups = list(groups)
        self.rest, self.blocks = self.groups[0], self.groups[1:]
        self.res = residency
        self.device = device
        self.depth = prefetch_depth
        self.dtype = residency.dtype("params")
        self.grad_dtype = residency.dtype("grads")
        self.swap_blocks = swap_blocks  # blocks whose saved tensors the activation engine packs (it asks us)
        self.stats = StreamStats()
        self.streamed = {g.index for g in self.groups if residency.tier(g, "params") != "device"}
        block_max = max((g.numel for g in self.blocks if g.index in self.streamed), default=0)
        self.pool = [torch.empty(block_max, dtype=self.dtype, device=device) for _ in range(self.depth + 1)]
        if block_max == 0:
            self.pool = []
        self._slot_ptr = {b.untyped_storage().data_ptr(): k for k, b in enumerate(self.pool)}
        self._slot_group: list[Group | None] = [None] * len(self.pool)
        self._free = list(range(len(self.pool)))
        self._rest_buf: torch.Tensor | None = None
        self._where: dict[int, torch.Tensor] = {}  # group index -> its (loaded or loading) buffer
        self._bound: set[int] = set()  # groups whose parameters point into their buffer
        self._loading: dict[int, Future[Any]] = {}
        self._reader = ThreadPoolExecutor(max(1, io_threads), thread_name_prefix="memtier-state-read")
        self._cursor: tuple[int, int] = (0, 1)  # (group index, direction) of the last use
        self._in_backward = False
        self._saved_ctx: list[Any] = []
        self._handles: list[Any] = []
        self.grads = GradientSink(self.groups, residency, device)

    # ---- setup -------------------------------------------------------------------------------------------------
    def install(self, model: nn.Module) -> None:
        """Hooks on the model and its blocks, and the gradient hooks of every trainable parameter."""
        self._handles.append(model.register_forward_pre_hook(lambda _m, _a: self.ensure(self.rest)))
        for g in self.blocks:
            assert g.module is not None
            self._handles.append(g.module.register_forward_pre_hook(self._pre_hook(g), with_kwargs=True))
            self._handles.append(
                g.module.register_forward_hook(self._post_hook(g), with_kwargs=True, always_call=True)
            )
        for g in self.groups:
            for s in g.trainable:
                self._handles.append(s.param.register_post_accumulate_grad_hook(self.grads.hook(g, s)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._reader.shutdown(wait=True)
        self.grads.close()

    # ---- loading and releasing ----------------------------------------------------------------------------------
    def _buffer_for(self, g: Group) -> torch.Tensor:
        if g.index not in self.streamed:
            raise RuntimeError(f"memtier: internal error: group {g.name} is resident")
        if g is self.rest:
            if self._rest_buf is None:
                self._rest_buf = torch.empty(g.numel, dtype=self.dtype, device=self.device)
            return self._rest_buf
        if not self._free:
            raise RuntimeError(
                f"memtier: no free parameter buffer for {g.name}: {len(self.pool)} buffers, loaded: "
                f"{sorted(self._where)}"
            )
        k = self._free.pop(0)
        self._slot_group[k] = g
        return self.pool[k][: g.numel]

    def _start(self, g: Group) -> None:
        buf = self._buffer_for(g)
        self._where[g.index] = buf
        self.stats.reads += 1
        self.stats.read_bytes += g.numel * self.dtype.itemsize
        self._loading[g.index] = self._reader.submit(self.res.read, g, "params", buf)

    def ensure(self, g: Group) -> None:
        """``g``'s parameters on the device and bound (blocks until its read is done)."""
        if g.index not in self.streamed or g.index in self._bound:
            return
        if g.index in self._loading:
            self.stats.prefetch_hits += 1
        else:
            self._start(g)
        t0 = time.perf_counter()
        self._loading.pop(g.index).result()
        self.stats.waits_s += time.perf_counter() - t0
        buf = self._where[g.index]
        for s in g.slots:
            s.param.data = s.view(buf)
        self._bound.add(g.index)

    def release(self, g: Group) -> None:
        if g.index not in self.streamed or g.index not in self._where:
            return
        fut = self._loading.pop(g.index, None)
        if fut is not None:
            fut.result()
        for s in g.slots:
            s.param.data = torch.empty(0, dtype=self.dtype, device=self.device)
        self._bound.discard(g.index)
        del self._where[g.index]
        if g is not self.rest:
            k = next(k for k, sg in enumerate(self._slot_group) if sg is g)
            self._slot_group[k] = None
            self._free.append(k)

    def release_all(self, *, rest: bool) -> None:
        for g in self.blocks:
            self.release(g)
        if rest:
            self.release(self.rest)

    def _top_up(self) -> None:
        """Read ahead the next `prefetch_depth` blocks in the current direction, as buffers allow."""
        index, step = self._cursor
        for k in range(1, self.depth + 1):
            j = index + k * step
            if not 1 <= j <= len(self.blocks):
                return
            g = self.groups[j]
            if g.index in self._where or g.index not in self.streamed:
                continue
            if not self._free:
                return
            self._start(g)

    def buffer_of(self, g: Group) -> torch.Tensor:
        """The whole buffer (as a storage-sized 1-D tensor) group ``g`` occupies now, loading it if needed."""
        self.ensure(g)
        buf = self._where[g.index]
        return (
            buf if g is self.rest else self.pool[next(k for k, sg in enumerate(self._slot_group) if sg is g)]
        )

    # ---- saved tensors -----------------------------------------------------------------------------------------
    def param_ref(self, t: torch.Tensor) -> _ParamRef | None:
        """A reference for a saved tensor that views a pooled parameter buffer, else None."""
        if not self.pool or not isinstance(t, torch.Tensor) or t.device != self.device:
            return None
        try:
            k = self._slot_ptr.get(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
            return None
        if k is None:
            return None
        g = self._slot_group[k]
        return None if g is None else _ParamRef(self, g, t)

    def _pack(self, t: torch.Tensor) -> Any:
        ref = self.param_ref(t)
        return t if ref is None else ref

    # ---- module hooks -----------------------------------------------------------------------------------------
    def _pre_hook(self, g: Group) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self.grads.error is not None:
                self.grads.wait()  # raises the failed write
            self.ensure(g)
            self._cursor = (g.index, 1)
            self._top_up()
            if torch.is_grad_enabled():
                x = _first_grad_tensor((args, kwargs))
                if x is not None:
                    x.register_hook(lambda _grad: self._backward_exit(g))
                if g.index - 1 not in self.swap_blocks and self.pool:
                    ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
                    ctx.__enter__()
                    self._saved_ctx.append(ctx)

        return hook

    def _post_hook(self, g: Group) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: Any, _kwargs: Any, output: Any) -> None:
            grad = torch.is_grad_enabled()
            if grad and g.index - 1 not in self.swap_blocks and self.pool and self._saved_ctx:
                self._saved_ctx.pop().__exit__(None, None, None)
            out = _first_grad_tensor(output) if grad else None
            if out is not None:
                out.register_hook(lambda _grad: self._backward_enter(g))
            if out is not None and g is self.blocks[-1]:
                return  # backward needs it first
            self.release(g)
            self._top_up()

        return hook

    def _backward_enter(self, g: Group) -> None:
        if not self._in_backward:
            self._in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)
        self.ensure(g)
        self.grads.prefetch(g)  # its gradients' partial sums, read back while its backward computes
        self._cursor = (g.index, -1)
        self._top_up()

    def _backward_exit(self, g: Group) -> None:
        self.release(g)
        self._top_up()

    def _backward_done(self) -> None:
        self._in_backward = False
        self.release_all(rest=False)
        self.grads.end_backward()

    def wait_gradients(self) -> None:
        """Every gradient written to its tier (what the optimizer step reads)."""
        self.grads.wait()

    def new_step(self) -> None:
        """After the optimizer step: the next backward starts new accumulations; loaded parameters are stale."""
        self.grads.new_step()
        self.release_all(rest=True)
