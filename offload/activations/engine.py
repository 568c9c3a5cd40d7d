"""The swap engine: packs a block's saved tensors, puts the swapped share to tier stores, fetches it back.

Asynchrony and ordering (CPU: a worker thread; CUDA: a side stream and events). The ordering guarantees
are stated where they are established; in short:

- A swapped tensor's source storage stays referenced by the main thread until its copy to the tier has
  completed (CPU: the worker sets `put_done` after `TierStore.put` returned, and the tier contract says the
  bytes are in the tier then; CUDA: `record_stream` on the side stream, which the caching allocator
  honours). The main thread drops it (so it is freed there) when it next looks: before and after every
  block's forward (module hooks on every block, kept ones included), after the model's forward, and at
  every pack and unpack.
- Back-pressure: after block l's forward the main thread waits for the copies submitted before block l
  started, so block l-1's copies overlap block l's compute and at most about two blocks of sources are
  alive. After the model's forward it waits for all of them (`SwapEngine.drain`).
- Unpack waits for its tensor's fetch (`fetch_done`; on CUDA the consuming stream also waits on the fetch
  event). The worker is FIFO, so a fetch always runs after the put of the same tensor, and a free after
  both.
- Buffers that receive fetched data are allocated by the thread that unpacks (the device's memory), the
  tier's own memory by the worker or at construction: on CPU, dispatch-mode memory tracking (MemTracker,
  which is thread-local) then sees exactly the device side. The worker holds only weak references to
  entries, so device tensors are never freed on it.

The autograd contract says saved tensors are not mutated; PyTorch does not check versions of tensors
packed by hooks. We check: a kept tensor whose version changed, or a swapped one whose version changed
before its copy completed, raises at unpack like autograd would without hooks.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import weakref
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from offload.activations.layout import (
    _empty_with_layout,
    _extent,
    _non_overlapping,
    _offset_mod,
    _storage_key,
    _swappable,
    _token_dim,
    cast_of_parameter,
    local_tensor,
)
from offload.activations.policy import BlockPolicy, PolicyError, swap_tokens

__all__ = ["SwapEngine", "SwapStats"]


# ---------------------------------------------------------------------------------------------- entries
class _Slot:
    """The state shared between a saved entry and the worker's jobs; holds no tensors.

    Jobs hold a slot and a *weak* reference to the entry, so the worker never drops the last reference to
    a device tensor (frees happen in the main thread, where memory tracking sees them).
    """

    __slots__ = (
        "tier",
        "handle",
        "put_done",
        "fetch_done",
        "error",
        "version_ok",
        "put_event",
        "fetch_event",
        "freed",
    )

    def __init__(self, tier: Any) -> None:
        self.tier = tier
        self.handle: Any = None  # the tier Handle; set by the put, cleared by the fetch or free
        self.put_done = threading.Event()
        self.fetch_done: threading.Event | None = None
        self.error: BaseException | None = None
        self.version_ok = True
        self.put_event: Any = None  # CUDA: the side-stream event after the device-to-host copy
        self.fetch_event: Any = None  # CUDA: the side-stream event after the host-to-device copy
        self.freed = False


class _Kept:
    """A saved tensor kept as is; unpack checks that it was not modified in place (like autograd)."""

    __slots__ = ("tensor", "version", "layer")

    def __init__(self, tensor: torch.Tensor, layer: int) -> None:
        self.tensor = tensor
        self.version = tensor._version
        self.layer = layer

    def unpack(self) -> torch.Tensor:
        if self.tensor._version != self.version:
            raise RuntimeError(_modified_message(self.layer, self.tensor, self.version))
        return self.tensor


class _Sharded:
    """A saved DTensor (tensor parallelism, FSDP2) packed by its local shard: the shard is swapped or kept
    like any saved tensor, and unpack wraps it again with the same spec (mesh, placements, global shape)."""

    __slots__ = ("inner", "spec")

    def __init__(self, inner: Any, spec: Any) -> None:
        self.inner = inner  # the local shard's _Saved or _Kept
        self.spec = spec

    def unpack(self) -> torch.Tensor:
        inner = self.inner
        local = inner.engine.unpack(inner) if isinstance(inner, _Saved) else inner.unpack()
        from torch.distributed.tensor import DTensor

        return DTensor(local, self.spec, requires_grad=False)  # type: ignore[call-arg]


def _shard_tokens(
    t: torch.Tensor, local: torch.Tensor, tokens: tuple[int, int] | None
) -> tuple[int, int] | None:
    """The (seq_len, flat_tokens) of a DTensor's local shard: split by tokens under sequence parallelism
    (a dim of the global seq_len that the shard holds fewer of), else the block's."""
    if tokens is None or local.dim() != t.dim():
        return tokens
    seq_len, flat = tokens
    for whole, part in zip(t.shape, local.shape):
        if whole == seq_len and part != seq_len:
            return part, flat * part // seq_len
    return tokens


def _modified_message(layer: int, t: torch.Tensor | None, version: int) -> str:
    shape = f" of shape {tuple(t.shape)}" if t is not None else ""
    return (
        f"one of the variables needed for gradient computation (saved by block {layer}{shape}, version "
        f"{version} when saved) has been modified by an inplace operation"
    )


class _Saved:
    """One swapped saved tensor: its layout, the kept tail and the tier handle (via the slot)."""

    __slots__ = (
        "engine",
        "record",
        "slot",
        "size",
        "stride",
        "offset",
        "dtype",
        "device",
        "seq_dim",
        "split",
        "whole_extent",
        "contiguous",
        "fetch_shape",
        "source",
        "source_ref",
        "kept",
        "kept_view",
        "fetch_buf",
        "materialized",
        "version",
        "nbytes",
        "__weakref__",
    )

    def __init__(self, engine: SwapEngine, record: _BlockRecord, t: torch.Tensor) -> None:
        self.engine = engine
        self.record = record
        self.slot: _Slot | None = None
        self.size = t.shape
        self.stride = t.stride()
        self.offset = _offset_mod(t)
        self.dtype = t.dtype
        self.device = t.device
        self.seq_dim: int | None = None
        self.split = 0  # tokens swapped along seq_dim; 0: the whole tensor is swapped
        self.whole_extent = False  # overlapping strides: the storage extent is swapped as a flat tensor
        self.contiguous = t.is_contiguous()
        self.fetch_shape: tuple[int, ...] = tuple(t.shape)
        self.source: torch.Tensor | None = None  # what the put reads; the main thread drops it after the put
        self.source_ref = StorageWeakRef(t.untyped_storage())  # dedupe: is the saved storage still alive?
        self.kept: torch.Tensor | None = None  # compact copy of the tokens not swapped
        # CPU: the tokens not swapped, still a view of the saved storage until the put has read it (reap)
        self.kept_view: torch.Tensor | None = None
        self.fetch_buf: torch.Tensor | None = None
        self.materialized: torch.Tensor | None = None
        self.version = t._version
        self.nbytes = 0  # bytes sent to the tier

    def __del__(self) -> None:
        # Released without having been fetched (a graph freed before backward, or retain_graph never used):
        # free the tier space. FIFO: the free runs after the put that set the handle.
        slot = self.slot
        if slot is not None and not slot.freed:
            with contextlib.suppress(Exception):
                self.engine._submit_free(slot)


class _BlockRecord:
    """The swapped tensors of one block call, linked to the previous swapped block call (for prefetch)."""

    __slots__ = (
        "layer",
        "prefetch",
        "prev",
        "entries",
        "dedupe",
        "fetch_started",
        "backward_started",
        "__weakref__",
    )

    def __init__(
        self, layer: int, prev: weakref.ReferenceType[_BlockRecord] | None, *, prefetch: bool = True
    ) -> None:
        self.layer = layer
        self.prefetch = prefetch  # fetched ahead by the next swapped block's backward
        self.prev = prev  # weak: a record never keeps an earlier block's tensors alive
        self.entries: list[weakref.ReferenceType[_Saved]] = []
        self.dedupe: dict[tuple[Any, ...], _Saved] | None = {}  # during the block's forward only
        self.fetch_started = False  # its tensors are being brought back (prefetched, or its backward began)
        self.backward_started = False  # one of its tensors was unpacked


# ---------------------------------------------------------------------------------------------- engine
@dataclass(frozen=True, kw_only=True)
class SwapStats:
    """Counters of a swap engine (since it was created)."""

    tensors_swapped: int = 0
    tensors_kept: int = 0  # saved tensors left as they are (parameters, below-threshold, no-seq with s < 0.5)
    dedupe_hits: int = 0
    bytes_swapped: int = 0  # bytes written to tiers
    bytes_fetched: int = 0  # bytes read back
    prefetches: int = 0  # records fetched ahead of their backward
    shards_packed: int = 0  # saved DTensors (tensor parallelism, FSDP2) packed by their local shard


class SwapEngine:
    """Moves saved activations between the device and tier stores, asynchronously.

    One per `offload.apply` handle. `tiers` maps plan tier names ("dram", "cxl", "nvme") to `TierStore`s;
    the engine does not own them (the apply handle closes them).
    """

    def __init__(self, tiers: Mapping[str, Any]) -> None:
        self.tiers = dict(tiers)
        self.closed = False
        self._counts = {
            "tensors_swapped": 0,
            "tensors_kept": 0,
            "dedupe_hits": 0,
            "bytes_swapped": 0,
            "bytes_fetched": 0,
            "prefetches": 0,
            "shards_packed": 0,
        }
        # Entries whose put may still be running, in submission order (main-thread only).
        self._pending: deque[_Saved] = deque()
        self._last_record: weakref.ReferenceType[_BlockRecord] | None = None
        self._barriers: list[_Saved | None] = []  # per block call in progress: see enter_block
        self._jobs: queue.SimpleQueue[tuple[str, _Slot, weakref.ReferenceType[_Saved] | None] | None] = (
            queue.SimpleQueue()
        )
        self._streams: dict[torch.device, Any] = {}
        self._worker = threading.Thread(target=self._run, name="memtier-swap", daemon=True)
        self._worker.start()

    # ---- stats / lifecycle
    @property
    def stats(self) -> SwapStats:
        return SwapStats(**self._counts)

    def synchronize(self, *, raise_errors: bool = True) -> None:
        """Wait for every submitted copy, then release the sources (main thread)."""
        done = threading.Event()
        self._jobs.put(("mark", _MarkSlot(done), None))  # FIFO: runs after everything submitted before
        done.wait()
        self.reap(raise_errors=raise_errors)

    def close(self) -> None:
        if self.closed:
            return
        self.synchronize(raise_errors=False)  # errors of a failed step were raised in that step
        self.closed = True
        self._jobs.put(None)
        self._worker.join()
        self._pending.clear()

    # ---- the worker (CPU copies; on CUDA it issues the fetches on the side stream)
    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            kind, slot, ref = job
            job = None  # noqa: F841 - drop the tuple: only the slot and a weak reference are held below
            try:
                if kind == "put":
                    self._do_put(slot, ref)
                elif kind == "fetch":
                    self._do_fetch(slot, ref)
                elif kind == "free":
                    self._do_free(slot)
                elif kind == "mark":
                    slot.put_done.set()
            except BaseException as exc:  # noqa: BLE001 - surfaced to the main thread at reap/unpack
                slot.error = exc
                slot.put_done.set()
                if slot.fetch_done is not None:
                    slot.fetch_done.set()
            ref = None

    def _do_put(self, slot: _Slot, ref: weakref.ReferenceType[_Saved] | None) -> None:
        entry = ref() if ref is not None else None
        src = entry.source if entry is not None else None
        version = entry.version if entry is not None else 0
        del entry  # the main thread holds the entry (pending queue) until put_done is set
        try:
            if src is not None:
                slot.handle = slot.tier.put(src)
                # The copy is complete (TierStore contract for CPU sources): a version change up to now means
                # the tensor was modified in place before the tier had its bytes.
                slot.version_ok = src._version == version
        finally:
            del src  # not the last reference: the entry's `source` is dropped by the main thread at reap
            slot.put_done.set()

    def _do_fetch(self, slot: _Slot, ref: weakref.ReferenceType[_Saved] | None) -> None:
        entry = ref() if ref is not None else None
        buf = entry.fetch_buf if entry is not None else None
        del entry
        try:
            if slot.error is not None:
                return  # the put failed: unpack raises its error
            if slot.handle is None:
                raise RuntimeError("the tensor was never written to the tier")
            if buf is not None:
                if buf.is_cuda:
                    stream = self._side_stream(buf.device)
                    # Ordering: the buffer was allocated on the consumer's stream, which recorded
                    # `fetch_event` (alloc) right after; the side stream waits for it before writing.
                    stream.wait_event(slot.fetch_event)
                    with torch.cuda.device(buf.device), torch.cuda.stream(stream):
                        slot.tier.get(slot.handle, out=buf)  # H2D on the side stream (tier contract)
                        done = torch.cuda.Event()
                        done.record(stream)
                    slot.fetch_event = done  # the consumer's stream waits on this before reading `buf`
                else:
                    slot.tier.get(slot.handle, out=buf)  # blocks until the bytes are in `buf`
                self._counts["bytes_fetched"] += buf.numel() * buf.element_size()
            if slot.handle is not None:
                # The data is on the device now (unpack caches it for every node that saved it): free the tier.
                slot.tier.free(slot.handle)
                slot.handle = None
                slot.freed = True
        finally:
            del buf  # the entry (main thread) owns the buffer
            if slot.fetch_done is not None:
                slot.fetch_done.set()

    def _do_free(self, slot: _Slot) -> None:
        if slot.handle is not None and not slot.freed:
            slot.tier.free(slot.handle)
        slot.handle = None
        slot.freed = True

    def _submit_free(self, slot: _Slot) -> None:
        if not self.closed:
            self._jobs.put(("free", slot, None))

    def _side_stream(self, device: torch.device) -> Any:
        stream = self._streams.get(device)
        if stream is None:
            stream = torch.cuda.Stream(device=device)
            self._streams[device] = stream
        return stream

    # ---- main-thread side
    def reap(self, *, raise_errors: bool = True) -> None:
        """Drop the sources of completed puts (main thread: frees happen where memory tracking sees them).

        Raises the first error of the puts reaped (each is reported once; unpack of such a tensor raises
        again).
        """
        pending = self._pending
        first: tuple[_Saved, BaseException] | None = None
        while pending:
            entry = pending[0]
            slot = entry.slot
            if slot is None or not slot.put_done.is_set():
                break
            pending.popleft()
            entry.source = None
            if entry.kept_view is not None:
                if entry.kept_view._version != entry.version:
                    slot.version_ok = False  # modified in place before the copy: unpack raises
                with torch.no_grad():
                    entry.kept = entry.kept_view.clone(memory_format=torch.contiguous_format)
                entry.kept_view = None  # the last reference to the saved storage: it is freed here
            if slot.error is not None and first is None:
                first = (entry, slot.error)
        if first is not None and raise_errors:
            entry, err = first
            raise RuntimeError(
                f"memtier: swapping out a tensor of block {entry.record.layer} failed: {err}"
            ) from err

    def wait_until(self, entry: _Saved | None) -> None:
        """Wait for the put of `entry` and everything submitted before it (FIFO), then reap."""
        if entry is not None and entry.slot is not None:
            entry.slot.put_done.wait()
        self.reap()

    def last_pending(self) -> _Saved | None:
        return self._pending[-1] if self._pending else None

    def enter_block(self) -> None:
        """Before a block's forward: remember the last copy submitted so far (by the blocks before it)."""
        self._barriers.append(self.last_pending())
        self.reap()

    def exit_block(self) -> None:
        """After a block's forward. Back-pressure: the copies of the earlier blocks, which overlapped this
        block's compute, must be done before the next block starts; their sources are released here, in the
        main thread. So about two blocks of sources are alive at most."""
        barrier = self._barriers.pop() if self._barriers else None
        self.wait_until(barrier)

    def drain(self) -> None:
        """After the model's forward: wait for every copy submitted and release the sources, so the
        activations of the last swapped block are not held through the rest of the step."""
        self.wait_until(self.last_pending())

    def new_record(self, layer: int, *, prefetch: bool = True) -> _BlockRecord:
        record = _BlockRecord(layer, self._last_record, prefetch=prefetch)
        self._last_record = weakref.ref(record)
        return record

    def pack(
        self,
        t: torch.Tensor,
        record: _BlockRecord,
        policy: BlockPolicy,
        tokens: tuple[int, int] | None,
        seq_dim: int,
        param_ptrs: frozenset[int],
    ) -> Any:
        if self.closed:
            raise RuntimeError(
                "memtier: the offload handle was removed; saved tensors can no longer be swapped"
            )
        self.reap()
        local = local_tensor(t)
        if local is not None:
            # A DTensor: its local shard is what occupies memory. A parameter (or a cast or view of one,
            # which autograd sees at the DTensor level) is kept; anything else goes by its shard.
            if (t.is_leaf and t.requires_grad) or cast_of_parameter(t, param_ptrs):
                self._counts["tensors_kept"] += 1
                return _Kept(t, policy.layer)
            self._counts["shards_packed"] += 1
            shard_tokens = _shard_tokens(t, local, tokens)
            return _Sharded(self.pack(local, record, policy, shard_tokens, seq_dim, param_ptrs), t._spec)  # type: ignore[attr-defined]
        if not _swappable(t, param_ptrs):
            self._counts["tensors_kept"] += 1
            return _Kept(t, policy.layer)
        key = _storage_key(t)
        dedupe = record.dedupe if record.dedupe is not None else {}
        hit = dedupe.get(key)
        if hit is not None and not hit.source_ref.expired():
            # Same live storage, same view: the same data (saved tensors are not mutated). Share the entry.
            self._counts["dedupe_hits"] += 1
            return hit

        entry = _Saved(self, record, t)
        s = policy.swap_fraction
        overlapping = not _non_overlapping(t.shape, t.stride())
        dim = None if overlapping else _token_dim(t.shape, tokens, seq_dim)
        data = t.detach()
        if dim is None:
            if s < 0.5:  # no sequence dim: kept whole below one half, swapped whole from one half
                self._counts["tensors_kept"] += 1
                return _Kept(t, policy.layer)
            if overlapping:
                entry.whole_extent = True
                extent = _extent(t.shape, t.stride())
                entry.fetch_shape = (extent,)
                entry.source = data.as_strided((extent,), (1,), t.storage_offset())
            else:
                entry.source = data
        else:
            total = t.shape[dim]
            k = swap_tokens(s, total)
            if k == 0:
                self._counts["tensors_kept"] += 1
                return _Kept(t, policy.layer)
            entry.source = data if k == total else data.narrow(dim, 0, k)
            if k < total:
                entry.seq_dim, entry.split = dim, k
                fetch_shape = list(t.shape)
                fetch_shape[dim] = k
                entry.fetch_shape = tuple(fetch_shape)
                kept = data.narrow(dim, k, total - k)
                if data.is_cuda:
                    with torch.no_grad():
                        # A fresh compact copy: the caching allocator frees the original storage once the
                        # side stream's copy of the swapped part has run (record_stream in _submit_put).
                        entry.kept = kept.clone(memory_format=torch.contiguous_format)
                else:
                    # NOTE: the compact copy is deferred to reap: the original storage stays alive until the
                    # worker's put has read it anyway, and a copy made now would sit beside it for the whole
                    # put (the kept share twice). Made once the put is done, it exists alone but for the
                    # moment of the copy.
                    entry.kept_view = kept
        src = entry.source
        entry.nbytes = src.numel() * src.element_size()
        tier = self.tiers.get(policy.swap_tier)
        if tier is None:
            raise PolicyError(
                f"layer {policy.layer}: no {policy.swap_tier!r} tier was configured", field="tiers"
            )
        slot = _Slot(tier)
        entry.slot = slot
        self._submit_put(entry, slot)
        dedupe[key] = entry
        record.entries.append(weakref.ref(entry))
        self._counts["tensors_swapped"] += 1
        self._counts["bytes_swapped"] += entry.nbytes
        return entry

    def _submit_put(self, entry: _Saved, slot: _Slot) -> None:
        src = entry.source
        if src is not None and src.is_cuda:
            device = src.device
            current = torch.cuda.current_stream(device)
            stream = self._side_stream(device)
            # Ordering: the side stream waits for the current stream, so the device-to-host copy reads the
            # tensor after the kernels that produced it. record_stream tells the caching allocator that the
            # source is in use on the side stream: when the main thread drops it, its memory is not reused
            # before the copy has run. The put itself enqueues the copy (tier contract: caller's current
            # stream) and returns without waiting.
            stream.wait_stream(current)
            src.record_stream(stream)
            with torch.cuda.device(device), torch.cuda.stream(stream):
                slot.handle = slot.tier.put(src)
                slot.put_event = torch.cuda.Event()
                slot.put_event.record(stream)
            entry.source = None
            slot.put_done.set()
            return
        # CPU: the worker copies; the entry keeps `source` alive until the main thread sees put_done (reap).
        self._pending.append(entry)
        self._jobs.put(("put", slot, weakref.ref(entry)))

    def start_fetch(self, record: _BlockRecord) -> None:
        """Start bringing back every swapped tensor of `record` (allocating its buffers in this thread)."""
        if record.fetch_started:
            return
        record.fetch_started = True
        for ref in record.entries:
            entry = ref()
            if entry is not None:
                self._fetch(entry)

    def _fetch(self, entry: _Saved) -> None:
        slot = entry.slot
        if slot is None or slot.fetch_done is not None or entry.materialized is not None:
            return
        slot.fetch_done = threading.Event()
        entry.fetch_buf = torch.empty(entry.fetch_shape, dtype=entry.dtype, device=entry.device)
        if entry.device.type == "cuda":
            # Ordering: the buffer belongs to this (consumer) stream; the side stream waits for this event
            # before writing it, and this stream waits for the fetch event before reading it (unpack).
            alloc = torch.cuda.Event()
            alloc.record(torch.cuda.current_stream(entry.device))
            slot.fetch_event = alloc
        self._jobs.put(("fetch", slot, weakref.ref(entry)))

    def unpack(self, entry: _Saved) -> torch.Tensor:
        if entry.materialized is not None:
            return entry.materialized
        if self.closed:
            raise RuntimeError(
                "memtier: the offload handle was removed before backward; the swapped saved "
                f"tensors of block {entry.record.layer} are gone"
            )
        record = entry.record
        if not record.backward_started:
            # First tensor of this block in backward: fetch the whole block (unless prefetched) and prefetch
            # the swapped block before it (the next one backward will need).
            record.backward_started = True
            self.start_fetch(record)
            prev = record.prev() if record.prev is not None else None
            if prev is not None and prev.prefetch and not prev.fetch_started:
                self._counts["prefetches"] += 1
                self.start_fetch(prev)
        self._fetch(entry)  # an entry shared from another record, or one added after the fetch started
        slot = entry.slot
        if slot is None or slot.fetch_done is None:
            raise RuntimeError("memtier: internal error: a swapped tensor has no fetch")
        slot.fetch_done.wait()
        if slot.error is not None:
            err = slot.error
            raise RuntimeError(
                f"memtier: fetching a swapped tensor of block {record.layer} failed: {err}"
            ) from err
        if not slot.version_ok:
            raise RuntimeError(_modified_message(record.layer, None, entry.version))
        if entry.fetch_buf is not None and entry.fetch_buf.is_cuda:
            # Ordering: reads of the buffer on this stream start after the side stream's copy into it.
            torch.cuda.current_stream(entry.device).wait_event(slot.fetch_event)
        out = self._assemble(entry)
        entry.materialized = out
        entry.fetch_buf = None
        entry.kept = None
        entry.kept_view = None
        self.reap()
        return out

    def _assemble(self, entry: _Saved) -> torch.Tensor:
        fetched = entry.fetch_buf
        if fetched is None:
            raise RuntimeError("memtier: internal error: a swapped tensor was not fetched")
        size, stride, offset = entry.size, entry.stride, entry.offset
        if entry.whole_extent:
            if offset == 0:
                return fetched.as_strided(size, stride, 0)
            storage = torch.empty(offset + fetched.numel(), dtype=entry.dtype, device=entry.device)
            storage[offset:].copy_(fetched)
            return storage.as_strided(size, stride, offset)
        kept = entry.kept if entry.kept is not None else entry.kept_view
        if kept is None and entry.contiguous and offset == 0:
            return fetched.as_strided(size, stride, 0)  # compact == the original layout: no copy
        out = _empty_with_layout(size, stride, offset, entry.dtype, entry.device)
        if kept is None:
            out.copy_(fetched)
        else:
            dim = entry.seq_dim if entry.seq_dim is not None else 0
            k = entry.split
            out.narrow(dim, 0, k).copy_(fetched)
            out.narrow(dim, k, size[dim] - k).copy_(kept)
        return out


class _MarkSlot(_Slot):
    """A slot whose `put_done` is an event the caller waits on (synchronize)."""

    def __init__(self, done: threading.Event) -> None:
        super().__init__(None)
        self.put_done = done
