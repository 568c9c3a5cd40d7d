"""The one interface of every tier store (host DRAM arena, CXL memory, NVMe files).

Contract shared by all tiers
----------------------------
``put(t) -> Handle``
    Captures ``t`` and returns. *When the caller may reuse the source*:

    - CPU source: as soon as ``put`` returns. The bytes have been copied into the tier's own memory
      (the arena, or a staging buffer whose disk write continues in the background).
    - CUDA source: the device-to-host copy is enqueued on the caller's *current stream*. Work enqueued later on
      that same stream may overwrite or free the source (stream order guarantees the copy reads it first);
      work on another stream must first wait on the current stream, as with any PyTorch tensor.

    A non-contiguous source (a view, a transpose, an expanded tensor) is first made contiguous with one
    transient copy of its size. The data is stored detached: autograd history is not kept.
``get(h, out=None) -> Tensor``
    Blocks until the data is there. Without ``out``, returns a new contiguous tensor with the handle's
    shape and dtype on the source's device; with ``out`` (same shape and dtype, any device, any strides), fills
    it and returns it. The handle stays valid: ``get`` may be called again until ``free``.
``prefetch(h, out=None)``
    Starts bringing the data closer (an asynchronous read for NVMe) so that a later ``get`` is fast. With
    ``out``, the data lands in ``out`` itself (no extra copy); the caller must leave ``out`` alone until
    ``get(h, out=out)`` returns it. A hint: memory tiers do nothing.
``free(h)``
    Releases the space. Waits for transfers of ``h`` still in flight first.
``synchronize()`` / ``wait_all()``
    Waits for every transfer in flight and raises the first deferred I/O error.
``close()`` / context manager
    Frees everything, releases the memory / removes the files. Idempotent.

Errors of background transfers are raised by the next call on the store (``put``, ``get``, ``prefetch``,
``synchronize``), and at the latest by ``get`` of the affected handle, so they surface within the training
step where they happened; a failed handle never returns data.

Thread safety: every public method may be called from any thread (autograd runs backward hooks on its own
threads); bookkeeping is serialised by a per-store lock.
"""

from __future__ import annotations

import abc
import ctypes
import dataclasses
import itertools
import threading
from typing import Any, ClassVar, TypeVar

import torch

from offload.tiers.errors import InvalidHandleError, TierClosedError, TierError, TierValueError
from offload.tiers.stats import StatsRecorder, TierStats

__all__ = ["Handle", "TierStore", "as_byte_view", "byte_view_of", "check_out", "copy_bytes", "typed_view"]

_store_ids = itertools.count(1)
_Store = TypeVar("_Store", bound="TierStore")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Handle:
    """What ``put`` returns: an immutable record of the stored tensor; the store keeps the mutable state."""

    store_id: int
    key: int
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    nbytes: int
    tier: str

    @property
    def numel(self) -> int:
        return self.shape.numel()


def as_byte_view(t: torch.Tensor) -> torch.Tensor:
    """A flat, contiguous ``uint8`` view of ``t``'s data (one transient copy if ``t`` is not contiguous)."""
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if not t.is_contiguous():
        # NOTE: a transient copy of the tensor's size; the alternative (strided chunked copies) is not worth it
        # for the activations and optimizer states stored here, which are contiguous in practice.
        t = t.contiguous()
    return byte_view_of(t)


def byte_view_of(t: torch.Tensor) -> torch.Tensor:
    """``uint8`` view of a contiguous tensor's bytes (no copy)."""
    flat = t.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy one contiguous CPU byte buffer into another of the same size with a single ``memmove``.

    Used on the I/O worker threads: the call is single-threaded and releases the GIL, whereas ``copy_`` would
    start torch's intra-op thread team from every worker and oversubscribe the cores.
    """
    if dst.numel() != src.numel():
        raise TierValueError("dst", f"size {dst.numel()} != source size {src.numel()}")
    if (
        dst.dtype == src.dtype == torch.uint8
        and dst.device.type == src.device.type == "cpu"
        and dst.is_contiguous()
        and src.is_contiguous()
    ):
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), dst.numel())
    else:
        dst.copy_(src)


def typed_view(byte_buf: torch.Tensor, handle: Handle) -> torch.Tensor:
    """View ``nbytes`` of a uint8 buffer as the handle's dtype and shape (the offset must be element-aligned)."""
    return byte_buf[: handle.nbytes].view(handle.dtype).view(handle.shape)


def check_out(handle: Handle, out: torch.Tensor | None) -> None:
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise InvalidHandleError(f"out: expected a torch.Tensor, got {type(out).__name__}")
    if out.shape != handle.shape or out.dtype != handle.dtype:
        raise InvalidHandleError(
            f"out: shape/dtype {tuple(out.shape)}/{out.dtype} do not match the stored "
            f"{tuple(handle.shape)}/{handle.dtype}"
        )
    if out.device.type not in ("cpu", "cuda"):
        raise InvalidHandleError(f"out: device {out.device} is not supported (cpu or cuda)")


class TierStore(abc.ABC):
    """Base class of the tier stores; subclasses implement the ``_put``/``_get``/... hooks."""

    kind: ClassVar[str] = "abstract"

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._entries: dict[int, Any] = {}
        self._keys = itertools.count()
        self._store_id = next(_store_ids)
        self._closed = False
        self._stats = StatsRecorder()
        self._deferred: list[TierError] = []

    # ---------------------------------------------------------------- availability
    @classmethod
    @abc.abstractmethod
    def availability(cls) -> tuple[bool, str]:
        """(present on this machine, reason if not)."""

    @classmethod
    def available(cls) -> bool:
        return cls.availability()[0]

    # ---------------------------------------------------------------- accounting
    @property
    @abc.abstractmethod
    def capacity_bytes(self) -> int:
        """Hard cap of the store in bytes."""

    @property
    @abc.abstractmethod
    def used_bytes(self) -> int:
        """Bytes held by live handles, including alignment padding."""

    @property
    def stats(self) -> TierStats:
        return self._stats.snapshot()

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._entries)

    # ---------------------------------------------------------------- public API
    def put(self, tensor: torch.Tensor) -> Handle:
        self._check_open()
        if not isinstance(tensor, torch.Tensor):
            raise TierValueError("tensor", f"expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.layout != torch.strided:
            raise TierValueError("tensor", f"layout {tensor.layout} is not supported (strided only)")
        if tensor.device.type not in ("cpu", "cuda"):
            raise TierValueError("tensor", f"device {tensor.device} is not supported (cpu or cuda)")
        if tensor.is_quantized:
            raise TierValueError("tensor", "quantized tensors are not supported")
        self._raise_deferred()
        handle = Handle(
            store_id=self._store_id,
            key=next(self._keys),
            shape=tensor.shape,
            dtype=tensor.dtype,
            device=tensor.device,
            nbytes=tensor.numel() * tensor.element_size(),
            tier=self.kind,
        )
        entry = self._put(handle, tensor)
        with self._lock:
            self._entries[handle.key] = entry
        self._stats.count("puts")
        return handle

    def get(self, handle: Handle, out: torch.Tensor | None = None) -> torch.Tensor:
        entry = self._entry(handle)
        check_out(handle, out)
        self._raise_deferred()
        result = self._get(handle, entry, out)
        self._stats.count("gets")
        return result

    def prefetch(self, handle: Handle, out: torch.Tensor | None = None) -> None:
        entry = self._entry(handle)
        check_out(handle, out)
        self._raise_deferred()
        self._prefetch(handle, entry, out)

    def free(self, handle: Handle) -> None:
        self._check_handle(handle)
        with self._lock:
            entry = self._entries.pop(handle.key, None)
        if entry is None:
            raise InvalidHandleError(f"handle {handle.key} of {self.kind} tier was already freed")
        self._release(entry)
        self._stats.count("frees")

    def synchronize(self) -> None:
        self._check_open()
        with self._stats.waiting():
            self._synchronize()
        self._raise_deferred()

    def wait_all(self) -> None:
        """Alias of :meth:`synchronize`."""
        self.synchronize()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            entries = list(self._entries.items())
            self._entries.clear()
        try:
            for _key, entry in entries:
                self._release_on_close(entry)
        finally:
            self._close()

    def __enter__(self: _Store) -> _Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- hooks for subclasses
    @abc.abstractmethod
    def _put(self, handle: Handle, tensor: torch.Tensor) -> Any:
        """Capture ``tensor``; return the entry (the store's mutable state of this handle)."""

    @abc.abstractmethod
    def _get(self, handle: Handle, entry: Any, out: torch.Tensor | None) -> torch.Tensor: ...

    def _prefetch(self, handle: Handle, entry: Any, out: torch.Tensor | None) -> None:  # noqa: B027 - optional hook
        """Default: nothing to do (memory tiers are already close)."""

    @abc.abstractmethod
    def _release(self, entry: Any) -> None:
        """Release one entry's space (after waiting for its transfers in flight)."""

    def _synchronize(self) -> None:  # noqa: B027 - optional hook
        """Default: nothing in flight."""

    def _release_on_close(self, entry: Any) -> None:
        """Release one live entry while closing; errors are swallowed (the store is going away)."""
        try:
            self._release(entry)
        except Exception:  # noqa: BLE001 - best effort on close
            pass

    @abc.abstractmethod
    def _close(self) -> None:
        """Release the store's memory / files."""

    # ---------------------------------------------------------------- helpers
    def _check_open(self) -> None:
        if self._closed:
            raise TierClosedError(f"{self.kind} tier store is closed")

    def _check_handle(self, handle: Handle) -> None:
        self._check_open()
        if not isinstance(handle, Handle):
            raise InvalidHandleError(f"handle: expected a Handle, got {type(handle).__name__}")
        if handle.store_id != self._store_id:
            raise InvalidHandleError(
                f"handle {handle.key} belongs to another store ({handle.tier} #{handle.store_id}), "
                f"not this {self.kind} store #{self._store_id}"
            )

    def _entry(self, handle: Handle) -> Any:
        self._check_handle(handle)
        with self._lock:
            entry = self._entries.get(handle.key)
        if entry is None:
            raise InvalidHandleError(f"handle {handle.key} of {self.kind} tier was freed")
        return entry

    def _defer(self, error: TierError) -> None:
        """Record an error of a background transfer; the next call on the store raises it."""
        with self._lock:
            self._deferred.append(error)

    def _raise_deferred(self) -> None:
        with self._lock:
            if not self._deferred:
                return
            first = self._deferred[0]
            self._deferred.clear()
        raise first
