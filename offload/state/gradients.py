"""Gradients out of the device as autograd accumulates them, into their tier in chunks.

A post-accumulate hook per parameter takes its gradient, adds what earlier micro-batches left for it (read back
from the tier: autograd's accumulation, old + new, in that order), computes the parameter's 2-norm for clipping
(on the whole tensor, as `clip_grad_norm_` does), copies it into the host chunk buffers its elements fall in and
frees it. A chunk is written to the tier by a writer thread once every trainable element in it has arrived (the
rest at the end of backward). The buffers are a fixed pool (MemAscend: sized to the transfer, allocated once);
when every buffer holds an incomplete chunk, the oldest is written as it is and read back when needed again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from offload.state.groups import Group, ParamSlot
from offload.state.residency import StateResidency

__all__ = ["GradientSink"]

POOL_CHUNKS = 8  # host chunk buffers (planner.model_state.GRAD_POOL_CHUNKS mirrors it)


@dataclass(eq=False)
class _Piece:
    chunk: int
    start: int  # in the chunk
    end: int
    param_start: int  # in the parameter
    param_end: int


@dataclass(eq=False)
class _Open:
    buf: torch.Tensor  # the chunk's elements
    whole: torch.Tensor  # the pool buffer it is a view of
    filled: int = 0
    loading: bool = False  # a read of the partial sum into `buf` was started (`prefetch`), not yet waited for


class GradientSink:
    """The gradient traffic of every group (see the module docstring)."""

    def __init__(self, groups: Sequence[Group], residency: StateResidency, device: torch.device) -> None:
        self.groups = list(groups)
        self.res = residency
        self.device = device
        self.dtype = residency.dtype("grads")
        c = residency.chunk_numel
        self._free = [torch.empty(c, dtype=self.dtype) for _ in range(POOL_CHUNKS)]
        self._cv = threading.Condition()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="memtier-state-grad")
        self._pieces: dict[int, list[_Piece]] = {}  # id(slot) -> its pieces
        self._need: dict[tuple[int, int], int] = {}  # (group, chunk) -> trainable elements in it
        for g in self.groups:
            chunks = residency.chunks(g)
            for s in g.trainable:
                self._pieces[id(s)] = _pieces_of(s, chunks)
                for p in self._pieces[id(s)]:
                    key = (g.index, p.chunk)
                    self._need[key] = self._need.get(key, 0) + p.end - p.start
        self._open: OrderedDict[tuple[int, int], _Open] = OrderedDict()
        self._written: set[tuple[int, int]] = set()  # chunks written during this backward
        self._writes: list[Future[Any]] = []
        self._pending: dict[tuple[int, int], Future[Any]] = {}  # the last write of each chunk
        self.touched: set[int] = set()  # groups with a gradient in this backward
        self.fresh: dict[int, bool] = {g.index: True for g in self.groups}  # no earlier micro-batch this step
        self.has_grad: set[int] = set()  # ParamSlot.order of parameters with a gradient this step
        self.norms: dict[int, torch.Tensor] = {}  # ParamSlot.order -> 2-norm of its accumulated gradient
        self.error: BaseException | None = None

    def hook(self, g: Group, s: ParamSlot) -> Callable[[torch.Tensor], None]:
        def on_grad(p: torch.Tensor) -> None:
            grad = p.grad
            if grad is None:
                return
            self._take(g, s, grad)
            p.grad = None

        return on_grad

    @torch.no_grad()
    def _take(self, g: Group, s: ParamSlot, grad: torch.Tensor) -> None:
        new = grad.detach().reshape(-1)
        if new.device.type != "cpu" or new.dtype != self.dtype:
            new = new.to("cpu", self.dtype)
        pieces = self._pieces[id(s)]
        if self.fresh[g.index]:
            total = new
        else:
            total = torch.empty(s.numel, dtype=self.dtype)
            for pc in pieces:
                total[pc.param_start : pc.param_end].copy_(self._chunk(g, pc.chunk).buf[pc.start : pc.end])
            total.add_(new)  # earlier micro-batches + this one, as autograd's accumulation adds
        self.norms[s.order] = torch._foreach_norm([total.view(s.shape)], 2.0)[0]  # type: ignore[attr-defined]
        self.has_grad.add(s.order)
        self.touched.add(g.index)
        for pc in pieces:
            key = (g.index, pc.chunk)
            ch = self._chunk(g, pc.chunk)
            ch.buf[pc.start : pc.end].copy_(total[pc.param_start : pc.param_end])
            ch.filled += pc.end - pc.start
            if ch.filled >= self._need[key]:
                self._flush(key)

    def prefetch(self, g: Group) -> None:
        """Start reading back the partial sums of ``g``'s chunks (a micro-batch after the first), into free
        buffers, while the block's backward computes; as many as the pool has free (never waits)."""
        if self.fresh[g.index] or self.res.tier(g, "grads") == "device":
            return
        for k in range(len(self.res.chunks(g))):
            key = (g.index, k)
            pending = self._pending.get(key)
            if key in self._open or key in self._written or (pending is not None and not pending.done()):
                continue
            with self._cv:
                if not self._free:
                    return
                whole = self._free.pop()
            a, b = self.res.chunks(g)[k]
            ch = self._open[key] = _Open(buf=whole[: b - a], whole=whole, loading=True)
            self.res.prefetch_chunk(g, "grads", k, ch.buf)

    def _chunk(self, g: Group, k: int) -> _Open:
        key = (g.index, k)
        ch = self._open.get(key)
        if ch is not None:
            if ch.loading:
                self.res.read_chunk(g, "grads", k, ch.buf)  # Ordering: waits for the read prefetch() started
                ch.loading = False
            return ch
        whole = self._take_buffer()
        a, b = self.res.chunks(g)[k]
        buf = whole[: b - a]
        if not self.fresh[g.index] or key in self._written:
            pending = self._pending.get(key)
            if pending is not None:
                pending.result()  # Ordering: its last write is stored before it is read back
            self.res.read_chunk(g, "grads", k, buf)  # what earlier micro-batches (or an early write) left
        else:
            buf.zero_()  # elements without a gradient stay zero (they are never read: no update without one)
        ch = self._open[key] = _Open(buf=buf, whole=whole)
        return ch

    def _take_buffer(self) -> torch.Tensor:
        with self._cv:
            if not self._free and self._open:
                # every buffer holds an incomplete chunk: write the oldest as it is (read back when needed)
                self._flush(next(iter(self._open)))
            while not self._free:
                self._cv.wait()
            return self._free.pop()

    def _flush(self, key: tuple[int, int]) -> None:
        ch = self._open.pop(key)
        if ch.filled == 0:  # untouched (a prefetch not used yet, or a fresh chunk): the tier already holds it
            if ch.loading:
                self.res.read_chunk(self.groups[key[0]], "grads", key[1], ch.buf)  # the read lands first
            with self._cv:
                self._free.append(ch.whole)
                self._cv.notify()
            return
        self._written.add(key)
        fut = self._writer.submit(self._write, key, ch)
        self._writes.append(fut)
        self._pending[key] = fut

    def _write(self, key: tuple[int, int], ch: _Open) -> None:
        try:
            self.res.write_chunk(self.groups[key[0]], "grads", key[1], ch.buf)
        except BaseException as exc:  # noqa: BLE001 - surfaced on the compute thread
            self.error = exc
        finally:
            with self._cv:
                self._free.append(ch.whole)
                self._cv.notify()

    def end_backward(self) -> None:
        """Write the chunks still open; the next backward of this step adds to what this one left."""
        for key in list(self._open):
            self._flush(key)
        for gi in self.touched:
            self.fresh[gi] = False
        self.touched = set()
        self._written = set()

    def wait(self) -> None:
        for f in self._writes:
            f.result()
        self._writes.clear()
        self._pending.clear()
        if self.error is not None:
            err, self.error = self.error, None
            raise RuntimeError(f"memtier: a gradient write to its tier failed: {err}") from err

    def new_step(self) -> None:
        self.fresh = dict.fromkeys(self.fresh, True)
        self.has_grad = set()
        self.norms = {}

    def close(self) -> None:
        self._writer.shutdown(wait=True)


def _pieces_of(s: ParamSlot, chunks: Sequence[tuple[int, int]]) -> list[_Piece]:
    out = []
    lo, hi = s.offset, s.offset + s.numel
    for k, (a, b) in enumerate(chunks):
        if b <= lo or a >= hi:
            continue
        x, y = max(a, lo), min(b, hi)
        out.append(_Piece(chunk=k, start=x - a, end=y - a, param_start=x - lo, param_end=y - lo))
    return out
