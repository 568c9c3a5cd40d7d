"""The two lanes that update subgroups: the CPU lane and the device lane, a worker thread and a stream each.

A CPU update of a subgroup starts as soon as its gradients are complete, handed to the CPU lane (a worker
thread) and overlapping the rest of backward; on a CPU device the gradients are read in place. A device update
copies the state in, runs the device kernel and copies it back (the device lane, another worker thread).
Updates left for ``step()`` run on the thread that called it (``InlineJob``), which would otherwise only wait
for the CPU lane.

CUDA: the device lane runs on its own stream, the CPU lane's copies on another; every hand-off between the
backward stream, the lanes and the host is ordered by an event, commented where it happens. On CPU those are
no-ops and the same code runs.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from offload.optimizer.buffers import BufferPool, DeviceBufferCache
from offload.optimizer.iteration import Iteration
from offload.optimizer.kernels import AdamWHyper, TorchFusedAdamW, UpdateKernel
from offload.optimizer.layout import (
    MASTER,
    Slot,
    SubgroupLayout,
    advance_steps,
    row_views,
    rows,
    update_tensors,
)
from offload.optimizer.params import active_params, host_fp32, scatter_params
from offload.optimizer.records import Job
from offload.optimizer.residency import StateResidency
from offload.optimizer.schedule import Phase, Side
from offload.optimizer.scheduler import subgroup_work
from offload.optimizer.settings import OffloadSettings

__all__ = ["InlineJob", "Lanes", "Streams"]


class Streams:
    """The lanes' CUDA streams; on CPU every method is a no-op and the same code runs."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.cpu_lane = torch.cuda.Stream(device) if self.cuda else None  # gradient D2H, parameter H2D
        self.device_lane = torch.cuda.Stream(device) if self.cuda else None  # state H2D/D2H, device kernels

    def use(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext()

    def record(self) -> Any:
        """An event on the current stream (None on CPU)."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def wait(self, event: Any) -> None:
        """The current stream waits for ``event`` (nothing on CPU)."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    @staticmethod
    def host_wait(event: Any) -> None:
        """The calling thread waits for ``event`` (nothing on CPU)."""
        if event is not None:
            event.synchronize()

    def synchronize(self) -> None:
        if self.cuda:
            assert self.cpu_lane is not None and self.device_lane is not None
            self.cpu_lane.synchronize()
            self.device_lane.synchronize()


@dataclass(frozen=True, kw_only=True)
class InlineJob:
    """A CPU-side job that step()'s own thread runs (see ``OffloadedAdamW._finish``)."""

    index: int
    hyper: AdamWHyper


class Lanes:
    """The CPU and device lanes: one worker thread each (jobs of a lane run in submission order).

    ``settings`` may be replaced between steps (the optimizer's ``settings`` setter); ``free_device_bytes`` is
    the optimizer's probe, read again when a device job starts (it falls back to the CPU when memory is gone).
    """

    def __init__(
        self,
        *,
        params: Sequence[nn.Parameter],
        states: StateResidency,
        streams: Streams,
        settings: OffloadSettings,
        cpu_kernel: UpdateKernel,
        max_numel: int,
        free_device_bytes: Callable[[Phase], int],
        lock: threading.RLock,
    ) -> None:
        self.settings = settings
        self.cpu_kernel = cpu_kernel
        self.device_kernel: UpdateKernel = TorchFusedAdamW()
        self.device = streams.device
        self.cache = DeviceBufferCache(streams.device)  # the device lane's working buffers, this step only
        self.grad_pool = BufferPool(2, max_numel, pin=streams.cuda)
        self._params = params
        self._states = states
        self._streams = streams
        self._free_device_bytes = free_device_bytes
        self._lock = lock  # the optimizer's: the iteration's jobs and pending subgroups
        self._cpu = ThreadPoolExecutor(1, thread_name_prefix="memtier-opt-cpu")
        self._device = ThreadPoolExecutor(1, thread_name_prefix="memtier-opt-device")
        self._threads = threading.local()  # the OpenMP team size each lane thread has set (see run_job)

    def submit(self, it: Iteration, s: int, side: Side, hyper: AdamWHyper, threads: int) -> None:
        """Hand subgroup ``s`` to the lane of ``side`` (called with the optimizer's lock held)."""
        lane = self._device if side == "device" else self._cpu
        fut: Future[None] = lane.submit(self.run_job, it, s, side, hyper, threads)
        it.futures.append(fut)
        if lane is self._cpu:
            it.cpu_lane_futures.append(fut)

    def run_job(
        self, it: Iteration, s: int, side: Side, hyper: AdamWHyper, threads: int | None = None
    ) -> None:
        if threads is not None and getattr(self._threads, "count", None) != threads:
            # NOTE: OpenMP's team size is per calling thread: a lane thread starts with OpenMP's default (every
            # core, or OMP_NUM_THREADS), not with the training thread's torch.set_num_threads, and DeepSpeed's
            # kernel parallelises with it. The lane adopts the count of the thread that handed it the job.
            torch.set_num_threads(threads)
            self._threads.count = threads
        slot = self._states.slots[s]
        job = Job(index=s, side=side, numel=slot.layout.numel, tier=slot.tier, staged=slot.staged)
        job.start = it.now()
        if slot.tier == "device":
            job.side = "device"  # resident state updates where it lives
        with torch.no_grad():
            if job.side == "device" and slot.tier != "device":
                need = subgroup_work(slot, self._params, self.device, 0.0).device_bytes
                if need > self._free_device_bytes("step" if it.in_step else "backward"):
                    job.side, job.fallback = "cpu", True
            if job.side == "cpu":
                self._cpu_update(it, slot, hyper, job)
            else:
                self._device_update(it, slot, hyper, job)
        job.end = it.now()
        with self._lock:
            it.jobs.append(job)

    def release_grads(self, lay: SubgroupLayout, active: Sequence[int], stream: Any) -> None:
        # NOTE: a consumed gradient is dropped (``.grad = None``) as ZeRO-Offload does, so device memory is
        # freed during backward; after step() every .grad is None (``free_grads=False`` keeps them).
        if not self.settings.free_grads:
            return
        for k in active:
            p = self._params[lay.params[k]]
            if stream is not None and p.grad is not None:
                # Ordering: the allocator must not hand this memory to the backward stream before the lane's
                # stream has read it.
                p.grad.record_stream(stream)
            p.grad = None

    # ---- the CPU lane -----------------------------------------------------------------------------------------

    def _host_grads(
        self, it: Iteration, lay: SubgroupLayout, active: Sequence[int], job: Job
    ) -> tuple[list[torch.Tensor], torch.Tensor | None, bool]:
        """1. The gradients on the host, fp32: used where they are when they already are (CPU device, fp32),
        else copied (device to host, or upcast) into a buffer of the gradient pool. Returns them, that buffer
        (the caller releases it) and whether any gradient is used in place."""
        streams = self._streams
        gflat: torch.Tensor | None = None  # a host gradient buffer, taken only when a gradient is copied
        in_place_grads = False
        grads = []
        try:
            with streams.use(streams.cpu_lane):
                # Ordering: the copies below read the gradients after backward produced them.
                streams.wait(it.grad_events.get(lay.index, it.step_event))
                for k in active:
                    p = self._params[lay.params[k]]
                    g = p.grad
                    assert g is not None
                    if host_fp32(g):
                        # NOTE: clipping then scales .grad in place, as clip_grad_norm_ does
                        grads.append(g)
                        in_place_grads = True
                        continue
                    job.grad_bytes += g.numel() * g.element_size()  # bytes moved: the meter's d2h rate
                    if gflat is None:
                        gflat = self.grad_pool.acquire()
                    off, n = lay.offsets[k], lay.numels[k]
                    dst = gflat[off : off + n].view_as(p)
                    dst.copy_(g, non_blocking=True)  # pinned destination on CUDA: an asynchronous D2H copy
                    grads.append(dst)
                # Ordering: the CPU reads the host copies only after the D2H copies have landed.
                streams.host_wait(streams.record())
                if not in_place_grads:
                    self.release_grads(lay, active, streams.cpu_lane)
        except BaseException:
            if gflat is not None:
                self.grad_pool.release(gflat)
            raise
        return grads, gflat, in_place_grads

    def _cpu_update(self, it: Iteration, slot: Slot, hyper: AdamWHyper, job: Job) -> None:
        lay = slot.layout
        with self._lock:
            if lay.index in it.cpu_pending:
                it.cpu_pending.remove(lay.index)
        self._states.prefetch_ahead(it.cpu_pending)
        active = active_params(self._params, lay)
        if not active:
            return
        staged: torch.Tensor | None = None  # a staging buffer this job holds (returned on any failure)
        gflat: torch.Tensor | None = None
        try:
            t = time.perf_counter()
            grads, gflat, in_place_grads = self._host_grads(it, lay, active, job)
            job.grads_s = time.perf_counter() - t

            # 2. state: in place in the tier (a view of the arena), or in a staging buffer (prefetched for NVMe)
            t = time.perf_counter()
            if slot.staged or slot.store is None:
                state = staged = self._states.take_state_buffer(slot)
                stored = row_views(slot, state)
            else:
                state, stored = self._states.in_place_rows(slot)
            job.state_in_s = time.perf_counter() - t
            job.state_bytes = state.numel() * 4

            self._cpu_kernel(it, slot, hyper, job, active, grads, stored)
            if in_place_grads:
                self.release_grads(lay, active, None)
            self._params_from_host(slot, job, active, state)
        except BaseException:
            if staged is not None:
                self._states.release_staging(staged)
            raise
        finally:
            if gflat is not None:
                self.grad_pool.release(gflat)

        # 6. write back behind (staged), nothing to do in place
        if staged is not None:
            self._states.write_behind(slot, staged, job)

    def _cpu_kernel(
        self,
        it: Iteration,
        slot: Slot,
        hyper: AdamWHyper,
        job: Job,
        active: Sequence[int],
        grads: list[torch.Tensor],
        stored: tuple[list[torch.Tensor], ...],
    ) -> None:
        """3. clip, 4. update."""
        t = time.perf_counter()
        if it.coef_cpu is not None:
            torch._foreach_mul_(grads, it.coef_cpu)  # as clip_grad_norm_ does
        steps = advance_steps(slot, active)
        params = [self._params[slot.layout.params[k]] for k in active]
        self.cpu_kernel(update_tensors(slot, stored, active, params, grads, steps), hyper)
        job.kernel_s = time.perf_counter() - t

    def _params_from_host(self, slot: Slot, job: Job, active: Sequence[int], state: torch.Tensor) -> None:
        """5. parameters <- master weights (nothing to do when the parameters are the master weights)."""
        t = time.perf_counter()
        if not slot.master_is_param:
            streams = self._streams
            with streams.use(streams.cpu_lane):
                job.param_bytes = scatter_params(self._params, slot.layout, state[MASTER], active)
                # Ordering: the H2D copies read `state`; it is not reused or written back before they land.
                streams.host_wait(streams.record())
        job.params_s = time.perf_counter() - t

    # ---- the device lane --------------------------------------------------------------------------------------

    def _device_grads(self, lay: SubgroupLayout, active: Sequence[int]) -> list[torch.Tensor]:
        """1. The gradients on the device: used in place when fp32, else upcast into a device buffer."""
        grads = []
        upcast = None
        for k in active:
            p = self._params[lay.params[k]]
            g = p.grad
            assert g is not None
            if g.dtype != torch.float32:
                if upcast is None:
                    upcast = self.cache.get("grads", lay.numel)
                off, n = lay.offsets[k], lay.numels[k]
                g = upcast[off : off + n].view_as(p).copy_(g)
            grads.append(g)
        return grads

    def _device_update(self, it: Iteration, slot: Slot, hyper: AdamWHyper, job: Job) -> None:
        lay = slot.layout
        active = active_params(self._params, lay)
        if not active:
            return
        params = [self._params[lay.params[k]] for k in active]
        streams = self._streams
        with streams.use(streams.device_lane):
            # Ordering: everything below runs on the device lane's stream, after backward produced the grads.
            streams.wait(it.grad_events.get(lay.index, it.step_event))
            t = time.perf_counter()
            grads = self._device_grads(lay, active)
            job.grads_s = time.perf_counter() - t

            # 2. state onto the device
            t = time.perf_counter()
            if slot.tier == "device":
                assert slot.resident is not None
                state = slot.resident
            else:
                state = rows(self.cache.get("state", slot.rows * lay.numel), lay.numel, slot.rows)
                self._states.read_stored(slot, state)
                job.state_bytes = state.numel() * 4
            job.state_in_s = time.perf_counter() - t

            # 3. clip, 4. update
            t = time.perf_counter()
            if it.coef is not None:
                torch._foreach_mul_(grads, it.coef.to(self.device))  # in place on .grad, as clip_grad_norm_
            steps = advance_steps(slot, active)
            stored = row_views(slot, state)
            self.device_kernel(update_tensors(slot, stored, active, params, grads, steps), hyper)
            if streams.cuda:
                streams.host_wait(streams.record())  # for the timing only: the kernel has run
            job.kernel_s = time.perf_counter() - t

            # 5. parameters <- master weights (device to device)
            t = time.perf_counter()
            if not slot.master_is_param:
                job.param_bytes = scatter_params(self._params, lay, state[MASTER], active)
            job.params_s = time.perf_counter() - t

            # 6. state back to its tier
            t = time.perf_counter()
            if slot.tier != "device":
                # put() enqueues the D2H copy on this (the lane's) stream: later work on the stream that
                # reuses the buffer is ordered after it (the TierStore contract)
                self._states.write_stored(slot, state)
                streams.host_wait(streams.record())
            job.state_out_s = time.perf_counter() - t
            self.release_grads(lay, active, streams.device_lane)

    # ---- teardown ---------------------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the lane threads once their jobs have run."""
        for lane in (self._cpu, self._device):
            lane.shutdown(wait=True)

    def close(self) -> None:
        """Drop the gradient buffers and close the CPU kernel (after ``shutdown``)."""
        self.grad_pool.clear()
        kernel_close = getattr(self.cpu_kernel, "close", None)
        if callable(kernel_close):
            kernel_close()
