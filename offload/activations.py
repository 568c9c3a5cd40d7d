"""Activation swap and recompute, per transformer block, on an unmodified model.

A plan gives every transformer block an `ActivationPolicy`. The runtime realises it as follows (the
planner's memory model is written to these semantics):

recompute (`recompute_fraction` == 1)
    The block's forward runs under a non-reentrant `torch.utils.checkpoint` with the RNG state preserved
    (dropout masks are redrawn identically in backward). Only its inputs stay on the device. A fractional
    `recompute_fraction` is rejected (`PolicyError` naming the layer): recompute is realised per block.
swap (`swap_fraction` = s > 0, the rest kept)
    The block's forward runs inside `torch.autograd.graph.saved_tensors_hooks`. Every saved activation
    with a token dimension has its first `swap_tokens(s, n)` = floor(s*n + 0.5) of its n tokens copied to
    the tier and the rest kept as a fresh compact copy (a kept slice that is a view would pin the whole
    original storage and save nothing). The token dimension is a dim whose size equals the block's
    sequence length (read from the block input; the dim after batch is preferred), or else one of size
    batch*seq (the (batch*seq, hidden) views a Linear saves; their leading rows are swapped). A saved
    tensor without one (or whose strides overlap, e.g. an expanded tensor) is swapped whole if s >= 0.5
    and kept otherwise. In backward, unpacking any tensor of block l fetches all of block l's swapped
    tensors and prefetches those of the swapped block before it (one layer ahead).
keep
    Nothing is installed.

Parameters, buffers, casts/views of parameters (autocast's bf16 weight copy) and leaf tensors that
require grad are never swapped (a Linear saves its weight, sometimes as a transposed view: the storage is
compared, not the tensor). One storage saved by several ops of a block (x feeding the q, k and v
projections) is packed once and shared on unpack. Unpacked tensors have exactly the original size,
stride and dtype, and their storage offset modulo `ALIGN_BYTES` (so kernels see the same alignment and
take the same path: gradients are bit-identical).

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
import functools
import inspect
import math
import queue
import threading
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from planner.errors import SpecError
from planner.plan import ActivationPolicy

__all__ = [
    "ALIGN_BYTES",
    "BlockPolicy",
    "BlockProfile",
    "PolicyError",
    "SwapEngine",
    "SwapStats",
    "install_block_hooks",
    "predict_activation_peak_bytes",
    "profile_block",
    "profile_blocks",
    "swap_tokens",
]

# Storage offsets are preserved modulo this many bytes on unpack: CUDA's caching allocator aligns blocks to
# 512 bytes and CPU allocations to 64, so a kernel sees the same pointer alignment as without hooks.
ALIGN_BYTES = 512
_EPS = 1e-9
# kwargs a block writes a KV cache through: a recomputed block would write it twice (HF drops them too).
# transformers 5.25 renamed the decoder layers' `past_key_values` to `cache` (the old name is still accepted
# and renamed by `deprecate_kwarg` until 5.40); both are dropped.
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")

Mode = Literal["keep", "swap", "recompute"]


class PolicyError(SpecError):
    """An activation policy the runtime cannot carry out (the message names the layer and field)."""


# ---------------------------------------------------------------------------------------------- policies
@dataclass(frozen=True, kw_only=True)
class BlockPolicy:
    """The runtime form of one block's `ActivationPolicy`: one mode, and the swap share and tier."""

    layer: int
    mode: Mode = "keep"
    swap_fraction: float = 0.0  # share of each saved tensor's tokens sent to the tier (mode "swap")
    swap_tier: str = "dram"  # plan tier name: "dram", "cxl", "nvme"
    prefetch: bool = True  # fetched during the next swapped block's backward (ActivationPolicy.prefetch)

    @classmethod
    def from_plan(cls, policy: ActivationPolicy, *, index: int | None = None) -> BlockPolicy:
        where = f"activations[{index}]" if index is not None else f"activations[layer={policy.layer}]"
        r = policy.recompute_fraction
        if _EPS < r < 1 - _EPS:
            raise PolicyError(
                f"layer {policy.layer}: recompute_fraction={r} is fractional; the runtime recomputes whole "
                "blocks (0 or 1). Re-plan with a per-block recompute decision.",
                field=f"{where}.recompute_fraction",
            )
        if r >= 1 - _EPS:
            return cls(layer=policy.layer, mode="recompute")
        # NOTE: swap_tier "device" keeps the data where it is, i.e. it is the same as keep.
        if policy.swap_fraction > _EPS and policy.swap_tier != "device":
            return cls(
                layer=policy.layer,
                mode="swap",
                swap_fraction=float(policy.swap_fraction),
                swap_tier=policy.swap_tier,
                prefetch=policy.prefetch,
            )
        return cls(layer=policy.layer, mode="keep")


def swap_tokens(swap_fraction: float, seq_len: int) -> int:
    """Tokens of a saved tensor sent to the tier: floor(s*seq + 0.5) (round half up, deterministic)."""
    return min(seq_len, max(0, math.floor(swap_fraction * seq_len + 0.5)))


# ---------------------------------------------------------------------------------------------- layout
def _extent(size: Sequence[int], stride: Sequence[int]) -> int:
    """Elements of storage a (size, stride) view spans from its first element (0 if empty)."""
    if any(s == 0 for s in size):
        return 0
    return 1 + sum((s - 1) * st for s, st in zip(size, stride))


def _non_overlapping(size: Sequence[int], stride: Sequence[int]) -> bool:
    """True when no two elements of the view share memory (sufficient test: sorted-stride nesting)."""
    dims = sorted((st, s) for s, st in zip(size, stride) if s > 1)
    span = 1  # elements covered by the dims already visited
    for st, s in dims:
        if st < span:
            return False
        span = st * (s - 1) + span
    return True


def _offset_mod(t: torch.Tensor) -> int:
    per = max(1, ALIGN_BYTES // t.element_size())
    return int(t.storage_offset()) % per


def _empty_with_layout(
    size: torch.Size, stride: tuple[int, ...], offset: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A fresh tensor with exactly (size, stride) at storage offset `offset` (storage of the needed extent)."""
    storage = torch.empty(offset + _extent(size, stride), dtype=dtype, device=device)
    return storage.as_strided(size, stride, offset)


def _token_dim(shape: Sequence[int], tokens: tuple[int, int] | None, prefer: int) -> int | None:
    """The dim of a saved tensor along which its tokens lie, or None.

    `tokens` is (seq_len, flat_tokens) of the block input. A dim of size seq_len, preferring `prefer` (the
    dim after batch), then the first one after dim 0; else a dim of size flat_tokens = batch * seq_len (the
    (batch*seq, hidden) views a Linear saves), whose leading rows are then the tokens swapped.
    """
    if tokens is None:
        return None
    seq_len, flat_tokens = tokens
    dims = [d for d, n in enumerate(shape) if n == seq_len]
    if dims:
        if prefer in dims:
            return prefer
        later = [d for d in dims if d > 0]
        return later[0] if later else dims[0]
    if flat_tokens > seq_len:
        flat = [d for d, n in enumerate(shape) if n == flat_tokens]
        return flat[0] if flat else None
    return None


def _block_tokens(args: tuple[Any, ...], kwargs: Mapping[str, Any], seq_dim: int) -> tuple[int, int] | None:
    """(seq_len, flat_tokens) of a block call, from its hidden-state input (first tensor argument)."""
    x = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if x is None:
        x = kwargs.get("hidden_states")
    if not isinstance(x, torch.Tensor):
        x = next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
    if x is None or x.dim() <= seq_dim:
        return None
    return int(x.shape[seq_dim]), math.prod(int(n) for n in x.shape[: seq_dim + 1])


def _storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


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


def _swappable(t: torch.Tensor, param_ptrs: frozenset[int]) -> bool:
    if type(t) is not torch.Tensor and not isinstance(t, nn.Parameter):
        return False  # tensor subclasses (DTensor, fake tensors): left to their own machinery
    if isinstance(t, nn.Parameter) or t.layout != torch.strided or t.is_quantized:
        return False
    if t.device.type not in ("cpu", "cuda") or t.numel() == 0:
        return False
    if t.is_leaf and t.requires_grad:
        return False  # a user leaf (held by the caller anyway: swapping would free nothing)
    if t.untyped_storage().data_ptr() in param_ptrs:
        return False
    return not _cast_of_parameter(t, param_ptrs)


# Autograd nodes of casts and views: a tensor reached from a parameter through these only is that
# parameter in another dtype or layout (autocast's bf16 weight copy, a transposed weight).
_CAST_OR_VIEW_NODES = frozenset(
    {
        "ToCopyBackward0",
        "TBackward0",
        "ViewBackward0",
        "TransposeBackward0",
        "PermuteBackward0",
        "ExpandBackward0",
        "AliasBackward0",
        "UnsafeViewBackward0",
    }
)


def _cast_of_parameter(t: torch.Tensor, param_ptrs: frozenset[int], max_hops: int = 4) -> bool:
    """True for a cast/view of a parameter: treated as the parameter (never swapped; the planner's
    activation formulas do not count it, and swapping it would move weight bytes every step)."""
    node = t.grad_fn
    for _ in range(max_hops):
        if node is None:
            return False
        name = type(node).__name__
        if name == "AccumulateGrad":
            variable = getattr(node, "variable", None)  # AccumulateGrad holds the leaf it accumulates into
            return variable is not None and variable.untyped_storage().data_ptr() in param_ptrs
        if name not in _CAST_OR_VIEW_NODES or not node.next_functions:
            return False
        node = node.next_functions[0][0]
    return False


# ---------------------------------------------------------------------------------------------- hooks
class BlockHooks:
    """The hooks installed on one block; `remove()` restores the block's own `forward` and drops the hooks."""

    _MISSING = object()

    def __init__(
        self,
        block: nn.Module,
        *,
        wrapped: Callable[..., Any] | None = None,
        original: Any = _MISSING,
        handles: Sequence[Any] = (),
    ) -> None:
        self.block = block
        self._wrapped = wrapped  # our instance-level forward, or None when only module hooks are installed
        self._original = original  # the instance attribute `forward` before us, or _MISSING
        self._handles = list(handles)
        self.removed = False

    def remove(self) -> None:
        if self.removed:
            return
        self.removed = True
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._wrapped is None:
            return
        current = self.block.__dict__.get("forward", self._MISSING)
        if current is not self._wrapped:
            warnings.warn(
                f"memtier: forward of {type(self.block).__name__} was replaced after offload.apply(); "
                "leaving the replacement in place",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        if self._original is self._MISSING:
            del self.block.__dict__["forward"]
        else:
            self.block.__dict__["forward"] = self._original


def install_block_hooks(
    block: nn.Module,
    policy: BlockPolicy,
    *,
    engine: SwapEngine | None = None,
    seq_dim: int = 1,
    param_ptrs: Callable[[], frozenset[int]] | None = None,
) -> BlockHooks:
    """Carry out `policy` on `block`; `remove()` on the result undoes it.

    Recompute and swap wrap the block's `forward` (an instance attribute). With an `engine`, every block,
    kept ones included, also gets the back-pressure hooks (`SwapEngine.enter_block` / `exit_block`), so
    the sources of earlier swapped blocks are released during later blocks whatever their policy.
    `param_ptrs` returns the storage pointers never to swap (the model's parameters and buffers); by
    default the block's own.
    """
    if policy.mode == "swap" and engine is None:
        raise PolicyError(f"layer {policy.layer}: swapping needs a SwapEngine", field="engine")
    handles = []
    if engine is not None:
        eng_ = engine
        # Ordering: the pre-hook runs before the block's forward (and our wrapper), the post-hook after it,
        # also when it raises (always_call).
        handles.append(block.register_forward_pre_hook(lambda _m, _a: eng_.enter_block()))
        handles.append(block.register_forward_hook(lambda _m, _a, _o: eng_.exit_block(), always_call=True))
    if policy.mode == "keep":
        return BlockHooks(block, handles=handles)
    original = block.__dict__.get("forward", BlockHooks._MISSING)
    forward = block.forward  # the bound method (or an earlier instance-level wrapper)

    def own_ptrs() -> frozenset[int]:
        return frozenset(p.untyped_storage().data_ptr() for p in [*block.parameters(), *block.buffers()])

    ptrs_fn = param_ptrs or own_ptrs

    try:
        signature: inspect.Signature | None = inspect.signature(forward)
    except (TypeError, ValueError):
        signature = None
    cache_params = [n for n in _CACHE_KWARGS if signature is not None and n in signature.parameters]
    warned = False

    def without_cache(
        args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The call's arguments with any KV cache dropped (as HF gradient checkpointing does).

        NOTE: in training a block that is not kept does not write a KV cache. A recomputed block would write
        it a second time in backward; a swapped block's cache would hold its keys and values on the device,
        undoing that part of the swap (measured: ~10% of a Llama block's saved bytes stayed). Training
        outputs do not depend on the cache.
        """
        nonlocal warned
        if signature is None or not (cache_params or kwargs.get("use_cache")):
            return args, kwargs
        bound = signature.bind_partial(*args, **kwargs)
        dropped = [n for n in cache_params if bound.arguments.get(n) is not None]
        if not dropped:
            return args, kwargs
        for n in dropped:
            bound.arguments[n] = None
        if "use_cache" in bound.arguments:
            bound.arguments["use_cache"] = False
        if not warned:
            warned = True
            warnings.warn(
                f"memtier: block {policy.layer} is {'recomputed' if policy.mode == 'recompute' else 'swapped'}"
                f"; not writing its KV cache ({', '.join(dropped)} ignored)",
                RuntimeWarning,
                stacklevel=3,
            )
        return tuple(bound.args), dict(bound.kwargs)

    if policy.mode == "recompute":

        @functools.wraps(forward)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            args, kwargs = without_cache(args, kwargs)
            # Non-reentrant checkpoint: the block's graph is kept with placeholders for its saved tensors,
            # which are recomputed (with the forward's RNG state restored) when backward first needs one.
            return torch.utils.checkpoint.checkpoint(
                forward, *args, use_reentrant=False, preserve_rng_state=True, **kwargs
            )

    else:
        if engine is None:  # narrowed above
            raise PolicyError("engine", field="engine")
        eng = engine

        @functools.wraps(forward)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            args, kwargs = without_cache(args, kwargs)
            tokens = _block_tokens(args, kwargs, seq_dim)
            ptrs = ptrs_fn()
            record = eng.new_record(policy.layer, prefetch=policy.prefetch)

            def pack(t: torch.Tensor) -> Any:
                return eng.pack(t, record, policy, tokens, seq_dim, ptrs)

            try:
                with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
                    return forward(*args, **kwargs)
            finally:
                record.dedupe = None  # the block's forward is over: no more packs into this record

    block.__dict__["forward"] = wrapped
    return BlockHooks(block, wrapped=wrapped, original=original, handles=handles)


def _unpack(packed: Any) -> torch.Tensor:
    if isinstance(packed, _Kept):
        return packed.unpack()
    return packed.engine.unpack(packed)


# ---------------------------------------------------------------------------------------------- profiling
@dataclass(frozen=True, kw_only=True)
class BlockProfile:
    """Measured memory of one block's forward and backward (keep-all), for checking cost models.

    All sizes in bytes. `saved_bytes` counts the distinct storages of the saved non-parameter tensors (what
    a kept block holds between forward and backward, its input included). `saved_tensors` lists the
    distinct saved tensors (by view) as (bytes, tokens along their token dim, 0 if none): what swap splits.
    Transients come from dispatch-mode tracking (torch MemTracker): the peak of live tensors above the live
    bytes when the phase starts.
    """

    seq_len: int
    input_bytes: int  # the hidden-state input: what a recomputed block keeps
    output_bytes: int
    param_bytes: int
    saved_bytes: int
    saved_tensors: tuple[tuple[int, int], ...]
    num_saved: int  # saved-tensor packs, parameters included
    forward_peak_bytes: int  # peak during forward above the live bytes before it
    backward_transient_bytes: int  # peak during backward above the live bytes before it

    @property
    def token_saved_bytes(self) -> int:
        """Bytes of the saved tensors that have a token dim (split token-wise by swap)."""
        return sum(b for b, n in self.saved_tensors if n)

    @property
    def other_saved_bytes(self) -> int:
        """Bytes of the saved tensors without a token dim (swapped whole from s >= 0.5)."""
        return sum(b for b, n in self.saved_tensors if not n)

    def _split(self, policy: BlockPolicy) -> tuple[int, int]:
        """(bytes swapped, bytes kept) of the saved tensors under a swap policy (runtime semantics)."""
        s = policy.swap_fraction
        out = kept = 0
        for nbytes, n in self.saved_tensors:
            if n:
                k = swap_tokens(s, n)
                if k == 0:
                    kept += nbytes
                else:
                    out += nbytes * k // n
                    kept += nbytes - nbytes * k // n
            elif s >= 0.5:
                out += nbytes
            else:
                kept += nbytes
        return out, kept

    def swap_bytes(self, policy: BlockPolicy) -> int:
        """Bytes this block sends to its tier under `policy`."""
        return self._split(policy)[0] if policy.mode == "swap" else 0

    def resident_bytes(self, policy: BlockPolicy) -> int:
        """Bytes this block holds on the device between its forward and its backward under `policy`."""
        if policy.mode == "keep":
            return self.saved_bytes
        if policy.mode == "recompute":
            return self.input_bytes
        return self._split(policy)[1]


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tensors(obj: Any) -> list[torch.Tensor]:
    flat, _ = torch.utils._pytree.tree_flatten(obj)
    return [x for x in flat if isinstance(x, torch.Tensor)]


def _total(snapshot: Mapping[Any, Mapping[str, int]]) -> int:
    return sum(dev.get("Total", 0) for dev in snapshot.values())


def _saved_summary(
    saved: Sequence[torch.Tensor], tokens: tuple[int, int], seq_dim: int
) -> tuple[int, tuple[tuple[int, int], ...]]:
    """(bytes of the distinct storages, (bytes, tokens) per distinct view) of the saved tensors."""
    distinct: dict[tuple[Any, ...], torch.Tensor] = {}
    for t in saved:
        distinct.setdefault(_storage_key(t), t)
    storages: dict[tuple[Any, int], int] = {}
    views = []
    for t in distinct.values():
        st = t.untyped_storage()
        storages[(t.device, st.data_ptr())] = st.nbytes()
        if not _non_overlapping(t.shape, t.stride()):
            views.append((_extent(t.shape, t.stride()) * t.element_size(), 0))
            continue
        dim = _token_dim(t.shape, tokens, seq_dim)
        views.append((_tensor_bytes(t), int(t.shape[dim]) if dim is not None else 0))
    return sum(storages.values()), tuple(views)


def profile_block(
    block: nn.Module,
    example_input: torch.Tensor | tuple[Any, ...],
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    seq_dim: int = 1,
) -> BlockProfile:
    """Run `block` forward and backward once (keep-all) on `example_input` and measure its memory.

    `example_input` is the hidden state (or a tuple of positional arguments). Floating tensors among them
    become non-leaf tensors that require grad, as inside a model. The parameters' `.grad` are restored.
    """
    from torch.distributed._tools.mem_tracker import MemTracker

    raw_args = example_input if isinstance(example_input, tuple) else (example_input,)
    leaves = [
        a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else None
        for a in raw_args
    ]
    args = tuple(leaf.clone() if leaf is not None else a for leaf, a in zip(leaves, raw_args))
    kwargs = dict(example_kwargs or {})
    tokens = _block_tokens(args, kwargs, seq_dim)
    if tokens is None:
        raise PolicyError(
            "profile_block needs a tensor input with a sequence dimension", field="example_input"
        )
    grads_before = {p: p.grad for p in block.parameters()}
    ptrs = frozenset(p.untyped_storage().data_ptr() for p in [*block.parameters(), *block.buffers()])
    saved: list[torch.Tensor] = []
    num_saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal num_saved
        num_saved += 1
        if _swappable(t, ptrs):
            saved.append(t)
        return t

    try:
        fwd_tracker = MemTracker()
        fwd_tracker.track_external(block, *_tensors(args), *_tensors(kwargs))
        with fwd_tracker:
            before = _total(fwd_tracker.get_tracker_snapshot("current"))
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = block(*args, **kwargs)
        forward_peak = _total(fwd_tracker.get_tracker_snapshot("peak")) - before
        saved_bytes, views = _saved_summary(saved, tokens, seq_dim)
        x = next(a for a in args if isinstance(a, torch.Tensor))
        input_bytes = _tensor_bytes(x)
        outs = [o for o in _tensors(out) if o.requires_grad]
        output_bytes = sum(_tensor_bytes(o) for o in _tensors(out))
        grads = [torch.randn_like(o) for o in outs]
        bwd_tracker = MemTracker()
        bwd_tracker.track_external(block, *_tensors(args), *_tensors(kwargs), *outs, *grads, *saved)
        saved.clear()  # from here only the graph holds the saved tensors: they are freed as backward runs
        del out
        with bwd_tracker:
            before = _total(bwd_tracker.get_tracker_snapshot("current"))
            torch.autograd.backward(outs, grads)
        backward_transient = _total(bwd_tracker.get_tracker_snapshot("peak")) - before
        return BlockProfile(
            seq_len=tokens[0],
            input_bytes=input_bytes,
            output_bytes=output_bytes,
            param_bytes=sum(_tensor_bytes(p) for p in block.parameters()),
            saved_bytes=saved_bytes,
            saved_tensors=views,
            num_saved=num_saved,
            forward_peak_bytes=forward_peak,
            backward_transient_bytes=backward_transient,
        )
    finally:
        for p, g in grads_before.items():
            p.grad = g


def profile_blocks(
    model: nn.Module, *args: Any, blocks: Iterable[nn.Module] | None = None, seq_dim: int = 1, **kwargs: Any
) -> list[BlockProfile]:
    """Profile every transformer block of `model` on the inputs it receives in `model(*args, **kwargs)`."""
    from offload.blocks import find_blocks

    found = find_blocks(model, blocks=blocks)
    captured: list[tuple[tuple[Any, ...], dict[str, Any]] | None] = [None] * len(found)
    handles = []

    def capture(i: int) -> Callable[..., None]:
        def hook(_mod: nn.Module, a: tuple[Any, ...], kw: dict[str, Any]) -> None:
            if captured[i] is None:
                detach = functools.partial(
                    torch.utils._pytree.tree_map_only, torch.Tensor, lambda t: t.detach()
                )
                captured[i] = (detach(a), detach(kw))

        return hook

    try:
        for i, b in enumerate(found):
            handles.append(b.register_forward_pre_hook(capture(i), with_kwargs=True))
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    profiles = []
    for i, b in enumerate(found):
        call = captured[i]
        if call is None:
            raise PolicyError(f"block {i} was not called by the model's forward", field="blocks")
        profiles.append(profile_block(b, call[0], example_kwargs=call[1], seq_dim=seq_dim))
    return profiles


def predict_activation_peak_bytes(
    profiles: Sequence[BlockProfile], policies: Sequence[BlockPolicy], *, head_bytes: int = 0
) -> int:
    """Peak activation bytes of a training step under `policies`, from measured block profiles.

    The largest of: the end of forward (every block's resident bytes plus `head_bytes`, the activations of
    the layers outside the blocks), and the backward of each block l, when blocks before l still hold their
    resident bytes, block l's saved tensors are all materialised (kept, fetched or recomputed), the
    gradient of its output is live, its backward transient is reached, and the swapped share of the
    previous swapped block is being prefetched (unless its policy says not to prefetch).
    """
    if len(profiles) != len(policies):
        raise PolicyError(f"{len(profiles)} profiles but {len(policies)} policies", field="policies")
    resident = [p.resident_bytes(pol) for p, pol in zip(profiles, policies)]
    swapped = [i for i, pol in enumerate(policies) if pol.mode == "swap"]
    peak = sum(resident) + head_bytes
    below = 0  # resident bytes of the blocks before l
    for l, (p, res) in enumerate(zip(profiles, resident)):
        at_l = below + p.saved_bytes + p.output_bytes + p.backward_transient_bytes
        # The closest swapped block j < l is prefetched when the first swapped block at or after l starts its
        # backward, and stays fetched until j's own backward: it is live during l's backward if one exists.
        before = [j for j in swapped if j < l]
        if before and any(j >= l for j in swapped) and policies[before[-1]].prefetch:
            at_l += profiles[before[-1]].swap_bytes(policies[before[-1]])
        peak = max(peak, at_l)
        below += res
    return peak
