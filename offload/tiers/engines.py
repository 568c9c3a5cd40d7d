"""I/O engines of the NVMe tier: blocking, whole-buffer transfers between an aligned staging buffer and a file.

- ``AioEngine``: DeepSpeed's async I/O op (``deepspeed.ops.op_builder.AsyncIOBuilder``, libaio underneath;
  ZeRO-Infinity, Rajbhandari et al. 2021, Sec. 6.3). Each request is split into ``block_bytes`` pieces kept
  ``queue_depth`` deep in the kernel. Compiled on first use (~1-4 min, cached in ~/.cache/torch_extensions);
  ``python -m offload.tiers.engines build`` builds it ahead of time.
- ``PosixEngine``: ``os.pwrite``/``os.preadv`` (the GIL is released during the call), with O_DIRECT when the file
  system allows. Used when libaio or the op is unavailable, or the file system refuses O_DIRECT.

The NVMe store runs these blocking calls on its own worker threads; that is where the asynchrony comes from.

# NOTE: DeepSpeed's op does not check the per-request result of libaio completions (``io_event.res`` in
# ``deepspeed_aio_common.cpp``) and only returns -1 when ``open`` fails. The store compensates: space is reserved
# with ``posix_fallocate`` before a write (ENOSPC surfaces there, synchronously), file sizes are checked before
# a read (no short read), and the optional per-block CRC32 catches silent EIO/corruption.
"""

from __future__ import annotations

import abc
import errno
import os
import resource
import sys
import threading
from typing import Any, ClassVar

import torch

from offload.deepspeed_ops import DeepSpeedOp
from offload.tiers.errors import TierCorruptionError, TierIOError, TierUnavailableError, io_error
from offload.tiers.preflight import DIRECT_IO_ALIGNMENT

__all__ = ["AioEngine", "IOEngine", "PosixEngine", "aio_status", "aligned_empty"]


def aligned_empty(
    nbytes: int, *, alignment: int = DIRECT_IO_ALIGNMENT, pin_memory: bool = False
) -> torch.Tensor:
    """A 1-D uint8 tensor of ``nbytes`` whose data pointer is a multiple of ``alignment`` (over-allocates)."""
    raw = torch.empty(nbytes + alignment, dtype=torch.uint8, pin_memory=pin_memory)
    shift = (-raw.data_ptr()) % alignment
    return raw[shift : shift + nbytes]


class IOEngine(abc.ABC):
    """Moves whole aligned buffers to and from files. ``write``/``read`` block; the store calls them from its
    worker threads, concurrently, on disjoint ranges."""

    name: ClassVar[str]

    def __init__(self, *, direct: bool) -> None:
        self.direct = direct

    def allocate_staging(self, nbytes: int) -> torch.Tensor:
        """Aligned host memory usable as an I/O buffer by this engine (pinned when CUDA is present)."""
        return aligned_empty(nbytes, pin_memory=torch.cuda.is_available())

    def release_staging(self, buffer: torch.Tensor) -> None:  # noqa: B027 - optional hook
        """Give staging memory back (default: garbage collected)."""

    @abc.abstractmethod
    def write(self, path: str, buffer: torch.Tensor, file_offset: int) -> None:
        """Write all of ``buffer`` at ``file_offset`` of the existing file ``path``; raises ``TierIOError``."""

    @abc.abstractmethod
    def read(self, path: str, buffer: torch.Tensor, file_offset: int) -> None:
        """Fill all of ``buffer`` from ``file_offset``; raises ``TierIOError`` (never returns a short read)."""

    def read_pageable(self, path: str, buffer: torch.Tensor, file_offset: int) -> None:
        """:meth:`read` into ordinary (pageable, aligned) memory that the engine did not allocate."""
        self.read(path, buffer, file_offset)

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


def _memoryview(buffer: torch.Tensor) -> memoryview:
    return buffer.numpy().data.cast("B")


class PosixEngine(IOEngine):
    """``pwrite``/``preadv`` on a descriptor opened per request (O_DIRECT when ``direct``); the GIL is released
    during each call, so the store's worker threads keep several requests in flight."""

    name: ClassVar[str] = "posix"

    def _open(self, path: str, flags: int, nbytes: int) -> int:
        try:
            return os.open(path, flags | os.O_CLOEXEC | (os.O_DIRECT if self.direct else 0))
        except OSError as exc:
            raise io_error("open", path, nbytes, exc) from exc

    def write(self, path: str, buffer: torch.Tensor, file_offset: int) -> None:
        view = _memoryview(buffer)
        total = len(view)
        fd = self._open(path, os.O_WRONLY, total)
        done = 0
        try:
            while done < total:
                n = os.pwrite(fd, view[done:], file_offset + done)
                if n <= 0:  # a zero-byte write makes no progress: the device is full or gone
                    raise io_error(
                        "write", path, total, errno.EIO, f"pwrite wrote 0 bytes at {file_offset + done}"
                    )
                done += n
        except TierIOError:
            raise
        except OSError as exc:
            raise io_error("write", path, total, exc, f"at file offset {file_offset + done}") from exc
        finally:
            os.close(fd)

    def read(self, path: str, buffer: torch.Tensor, file_offset: int) -> None:
        view = _memoryview(buffer)
        total = len(view)
        fd = self._open(path, os.O_RDONLY, total)
        done = 0
        try:
            while done < total:
                n = os.preadv(fd, [view[done:]], file_offset + done)
                if n == 0:
                    raise TierCorruptionError(
                        "read",
                        path,
                        total,
                        errno.EIO,
                        f"short read: end of file after {done} of {total} bytes at offset {file_offset}",
                    )
                done += n
        except TierIOError:
            raise
        except OSError as exc:
            raise io_error("read", path, total, exc, f"at file offset {file_offset + done}") from exc
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------------------------- DeepSpeed aio

_AIO = DeepSpeedOp(
    "AsyncIOBuilder",
    "async_io",
    not_built_hint="python -m offload.tiers.engines build",
    incompatible_hint=" (libaio-dev missing?)",
    installed_key="async_io",
    precheck=lambda: None if sys.platform.startswith("linux") else "libaio is Linux-only",
)
_aio_primed = False


def _memlock_ok(nbytes: int) -> tuple[bool, str]:
    """DeepSpeed page-locks its buffers with mlock (and returns NULL when that fails): check the limit first."""
    if os.geteuid() == 0:
        return True, ""
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY or soft >= nbytes:
        return True, ""
    return False, f"RLIMIT_MEMLOCK ({soft} bytes) < {nbytes} bytes of page-locked buffers (raise `ulimit -l`)"


def aio_status(*, build: bool = True) -> tuple[bool, str]:
    """(usable, reason if not) for DeepSpeed's async I/O op; loads it (compiling if ``build``) on first call."""
    return _AIO.status(build=build)


class AioEngine(IOEngine):
    """DeepSpeed's async I/O op. One ``aio_handle`` per worker thread: a handle serialises its requests (it waits
    for all of its pending operations), so per-thread handles let the store keep several requests in flight.

    ``block_bytes``/``queue_depth`` default to DeepSpeed's ``aio`` config defaults (block_size 1 MiB,
    queue_depth 8; ``deepspeed/runtime/swap_tensor/constants.py``, ``AIO_*_DEFAULT``).
    """

    name: ClassVar[str] = "aio"

    def __init__(self, *, block_bytes: int = 1 << 20, queue_depth: int = 8, build: bool = True) -> None:
        super().__init__(direct=True)  # the op always opens files with O_DIRECT
        ok, why = aio_status(build=build)
        if not ok:
            raise TierUnavailableError("DeepSpeed async I/O", why)
        self._module = _AIO.module
        self.block_bytes = block_bytes
        self.queue_depth = queue_depth
        self._local = threading.local()
        self._handles: list[Any] = []
        self._handles_lock = threading.Lock()
        self._locked: list[torch.Tensor] = []
        self._alloc_handle = self._new_handle()
        self._pageable = PosixEngine(direct=True)

    def _new_handle(self) -> Any:
        # aio_handle(block_size, queue_depth, single_submit, overlap_events, intra_op_parallelism)
        handle = self._module.aio_handle(self.block_bytes, self.queue_depth, False, True, 1)
        with self._handles_lock:
            self._handles.append(handle)
        return handle

    def _handle(self) -> Any:
        handle = getattr(self._local, "handle", None)
        if handle is None:
            handle = self._local.handle = self._new_handle()
        return handle

    def prime(self, directory: str) -> None:
        """Make the op's one-time write warning happen now, on the calling thread, before any worker writes.

        # NOTE: the op's ``pwrite`` bindings log an SSD-endurance warning inside ``std::call_once`` while they
        # hold the GIL, and the logging releases and re-takes the GIL. When two threads make their first write at
        # the same time, one waits in ``call_once`` holding the GIL while the other waits for the GIL inside it:
        # a deadlock (seen with two writer threads). One write from a single thread takes the flag out of play.
        """
        global _aio_primed
        with _AIO.lock:
            if _aio_primed:
                return
            path = os.path.join(directory, ".aio-prime")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.close(fd)
            try:
                self._handle().sync_pwrite(aligned_empty(DIRECT_IO_ALIGNMENT).zero_(), path, 0)
            finally:
                os.unlink(path)
            _aio_primed = True

    def allocate_staging(self, nbytes: int) -> torch.Tensor:
        if torch.cuda.is_available():
            return super().allocate_staging(nbytes)  # cudaHostAlloc memory is page-locked: no bounce copy
        ok, why = _memlock_ok(nbytes)
        if not ok:
            raise TierUnavailableError("DeepSpeed async I/O staging", why)
        # Page-locked through DeepSpeed's own manager, so the op uses it directly instead of a bounce buffer.
        buffer = self._alloc_handle.new_cpu_locked_tensor(nbytes, torch.empty(0, dtype=torch.uint8))
        self._locked.append(buffer)
        return buffer

    def release_staging(self, buffer: torch.Tensor) -> None:
        for i, locked in enumerate(self._locked):
            if locked.data_ptr() == buffer.data_ptr():
                self._alloc_handle.free_cpu_locked_tensor(locked)
                del self._locked[i]
                return

    def write(self, path: str, buffer: torch.Tensor, file_offset: int) -> None:
        # The op opens the file by name (O_DIRECT) per request and releases the GIL while it waits.
        ret = self._handle().sync_pwrite(buffer, path, file_offset)
        if ret < 0:
            raise io_error("write", path, buffer.numel(), errno.EIO, "DeepSpeed aio sync_pwrite returned -1")

    def read_pageable(self, path: str, buffer: torch.Tensor, file_offset: int) -> None:
        # NOTE: the op bounces every buffer it has not page-locked itself through a freshly mlock-ed copy
        # (cpu_op_desc_t), i.e. one extra memcpy per request on the reading thread; a pread with O_DIRECT into the
        # caller's aligned memory moves the same bytes with no copy (the copy halved read bandwidth on a loaded
        # 2-core machine). So pageable destinations are read that way, and the op serves page-locked buffers:
        # the staging pool, and CUDA-pinned memory.
        self._pageable.read(path, buffer, file_offset)

    def read(self, path: str, buffer: torch.Tensor, file_offset: int) -> None:
        ret = self._handle().sync_pread(buffer, path, file_offset)
        if ret < 0:
            raise io_error("read", path, buffer.numel(), errno.EIO, "DeepSpeed aio sync_pread returned -1")

    def close(self) -> None:
        for buffer in self._locked:
            self._alloc_handle.free_cpu_locked_tensor(buffer)
        self._locked.clear()
        with self._handles_lock:
            self._handles.clear()  # handles join their threads when garbage collected


def _main(argv: list[str]) -> int:
    if argv[:1] != ["build"]:
        print("usage: python -m offload.tiers.engines build", file=sys.stderr)
        return 2
    ok, why = aio_status(build=True)
    print("DeepSpeed async_io op: " + ("ready" if ok else f"unavailable: {why}"))
    return 0  # a machine without libaio is not an error: the NVMe tier falls back to the posix engine


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
