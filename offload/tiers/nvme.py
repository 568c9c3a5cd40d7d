"""NVMe tier: one file per stored tensor in a private per-run directory, asynchronous I/O through a bounded
pool of aligned staging buffers (ZeRO-Infinity, Rajbhandari et al. 2021; Fuyou, Liao et al. 2024).

Layout
------
``<path>/memtier-run-<host>-<pid>-<random>/<key>.swap`` (files 0600 in a 0700 directory; see ``rundir``). A
file holds the tensor's bytes padded with zeros to a multiple of 4096 (the O_DIRECT alignment); chunk ``i`` is
at ``i * chunk_bytes``. One file per tensor rather than one shared file: reserving space in a file that has
direct I/O in flight waits for all of it to drain (ext4's ``fallocate`` calls ``inode_dio_wait``), which would
stall every ``put`` behind the writes of the previous ones; separate inodes never wait on each other.

Data path
---------
``put``: the file is created and its blocks reserved first (``posix_fallocate``: ENOSPC is raised here,
synchronously, before any data is written), then the tensor is copied chunk by chunk into staging buffers on
the caller's thread and each chunk is written by a writer thread. ``put`` returns once the last chunk has been
copied, so the source may be reused immediately (CPU) while the writes continue. When all staging buffers are
busy, ``put`` waits for a write to finish (back-pressure: staging memory is bounded by
``staging_slots * chunk_bytes``, no system-memory spikes).

``get`` / ``prefetch``: reader threads read chunks straight into the destination when it is suitably aligned
(posix engine), or into a staging buffer and copy from there; a read of a handle first waits for that handle's
writes. With ``checksum=True`` every chunk's CRC32 is recorded at write time and verified at read time; a file
shorter than written raises before any read. A failed or corrupted transfer raises
``TierIOError``/``TierCorruptionError``; it never returns a short read as data.

``free`` waits for the handle's transfers in flight and unlinks its file: disk usage follows the live data.

Worker threads: one pool writes and another reads, so a read waiting for a staging buffer can never block the
writes that will free one (no deadlock); reads acquire staging buffers inside the worker, writes on the
caller's thread.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import os
import threading
import zlib
from collections.abc import Iterator, Sequence
from typing import ClassVar, Literal

import torch

from offload.tiers.arena import round_up
from offload.tiers.base import Handle, TierStore, as_byte_view, byte_view_of, copy_bytes, typed_view
from offload.tiers.engines import AioEngine, IOEngine, PosixEngine, aio_status, aligned_empty
from offload.tiers.errors import (
    TierCapacityError,
    TierCorruptionError,
    TierError,
    TierUnavailableError,
    TierValueError,
    io_error,
)
from offload.tiers.preflight import DIRECT_IO_ALIGNMENT, PreflightReport, preflight
from offload.tiers.rundir import RunDirectory

__all__ = ["NvmeSettings", "NvmeTier"]

ALIGN = DIRECT_IO_ALIGNMENT
EngineChoice = Literal["auto", "aio", "posix"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class NvmeSettings:
    """Settings of the NVMe tier (the plan's ``tiers.nvme`` entry)."""

    path: str  # directory on the NVMe drive; a private run directory is created inside
    capacity_bytes: int | None = None  # hard cap on bytes stored; None: the free space at start
    chunk_bytes: int = 4 << 20  # size of one I/O request and of one staging buffer (multiple of 4096)
    staging_slots: int = 8  # staging buffers: bounds the host memory of in-flight I/O to slots * chunk_bytes
    io_engine: EngineChoice = (
        "auto"  # "aio" (DeepSpeed async I/O), "posix" (thread pool), "auto" (aio if usable)
    )
    io_threads: int = 4  # writer threads and, separately, reader threads (they mostly wait on the disk)
    checksum: bool = True  # per-chunk CRC32, verified on read (off only when asked: a flipped bit is data)
    direct_io: bool | None = None  # None: O_DIRECT when the file system allows it
    aio_block_bytes: int = 1 << 20  # DeepSpeed aio block_size
    aio_queue_depth: int = 8  # DeepSpeed aio queue_depth
    build_aio: bool = True  # allow compiling DeepSpeed's op on first use

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise TierValueError("path", f"must be a non-empty path string, got {self.path!r}")
        if self.capacity_bytes is not None and (
            not isinstance(self.capacity_bytes, int) or self.capacity_bytes <= 0
        ):
            raise TierValueError(
                "capacity_bytes", f"must be a positive int or None, got {self.capacity_bytes!r}"
            )
        if self.chunk_bytes <= 0 or self.chunk_bytes % ALIGN:
            raise TierValueError(
                "chunk_bytes", f"must be a positive multiple of {ALIGN}, got {self.chunk_bytes}"
            )
        if self.staging_slots < 1:
            raise TierValueError("staging_slots", f"must be >= 1, got {self.staging_slots}")
        if self.io_threads < 1:
            raise TierValueError("io_threads", f"must be >= 1, got {self.io_threads}")
        if self.io_engine not in ("auto", "aio", "posix"):
            raise TierValueError("io_engine", f"must be 'auto', 'aio' or 'posix', got {self.io_engine!r}")
        if self.aio_block_bytes <= 0 or self.aio_block_bytes % ALIGN:
            raise TierValueError("aio_block_bytes", f"must be a positive multiple of {ALIGN}")
        if self.aio_queue_depth < 1:
            raise TierValueError("aio_queue_depth", f"must be >= 1, got {self.aio_queue_depth}")


def _chunks(nbytes: int, chunk_bytes: int) -> Iterator[tuple[int, int, int]]:
    """(index, offset, length) of each chunk of an ``nbytes`` payload."""
    for index, offset in enumerate(range(0, nbytes, chunk_bytes)):
        yield index, offset, min(chunk_bytes, nbytes - offset)


try:  # CRC-32C in hardware (SSE4.2 / ARMv8 CRC): ~22 GB/s here against zlib's CRC-32 at ~2.4 GB/s, which on
    # a CPU that also computes took seconds per step of streamed model state (benchmarks/ssd_offload.py)
    from crc32c import crc32c as _crc
except ImportError:  # pragma: no cover - the wheel is a dependency; zlib is the fallback
    _crc = zlib.crc32


def _crc32(buffer: torch.Tensor) -> int:
    """The chunk's checksum (CRC-32C where the crc32c package is there, else CRC-32); both release the GIL for
    large buffers. Checksums only live as long as the run's swap files, so the two never meet."""
    return int(_crc(buffer.numpy().data))


class _StagingPool:
    """``slots`` aligned buffers of ``slot_bytes``, carved out of one allocation made at start."""

    def __init__(self, engine: IOEngine, slots: int, slot_bytes: int) -> None:
        self._engine = engine
        self._buffer = engine.allocate_staging(slots * slot_bytes)
        self._slots = [self._buffer[i * slot_bytes : (i + 1) * slot_bytes] for i in range(slots)]
        self._free = list(range(slots))
        self._cond = threading.Condition()

    def acquire(self) -> int:
        with self._cond:
            while not self._free:
                self._cond.wait()
            return self._free.pop()

    def release(self, slot: int) -> None:
        with self._cond:
            self._free.append(slot)
            self._cond.notify()

    def slot(self, slot: int) -> torch.Tensor:
        return self._slots[slot]

    def close(self) -> None:
        self._slots.clear()
        self._engine.release_staging(self._buffer)


@dataclasses.dataclass
class _NvmeEntry:
    path: str
    nbytes: int  # payload
    file_bytes: int  # payload padded to ALIGN: the file's size
    crcs: list[int | None]  # per chunk, set by the writer when checksums are on
    writes: list[concurrent.futures.Future[None]] = dataclasses.field(default_factory=list)
    # (destination, its reads, whether the destination is the caller's `out`) of a prefetch not yet consumed
    prefetched: tuple[torch.Tensor, list[concurrent.futures.Future[None]], bool] | None = None
    error: TierError | None = None  # a write failed: the handle never returns data


class NvmeTier(TierStore):
    """Tensors in files on a local drive; the same contract as the memory tiers."""

    kind: ClassVar[str] = "nvme"

    def __init__(
        self,
        *,
        path: str | os.PathLike[str],
        capacity_bytes: int | None = None,
        chunk_bytes: int = 4 << 20,
        staging_slots: int = 8,
        io_engine: EngineChoice = "auto",
        io_threads: int = 4,
        checksum: bool = True,
        direct_io: bool | None = None,
        aio_block_bytes: int = 1 << 20,
        aio_queue_depth: int = 8,
        build_aio: bool = True,
    ) -> None:
        super().__init__()
        self.settings = NvmeSettings(
            path=os.fspath(path),
            capacity_bytes=capacity_bytes,
            chunk_bytes=chunk_bytes,
            staging_slots=staging_slots,
            io_engine=io_engine,
            io_threads=io_threads,
            checksum=checksum,
            direct_io=direct_io,
            aio_block_bytes=aio_block_bytes,
            aio_queue_depth=aio_queue_depth,
            build_aio=build_aio,
        )
        self.preflight_report: PreflightReport = preflight(self.settings.path, capacity_bytes or 0)
        self._capacity = capacity_bytes if capacity_bytes is not None else self.preflight_report.free_bytes
        self._used = 0
        self.engine_fallback_reason = ""
        self._engine, self._staging = self._make_engine()
        try:
            self._run = RunDirectory(self.settings.path)
        except OSError as exc:
            self._staging.close()
            self._engine.close()
            raise io_error("create run directory in", self.settings.path, 0, exc) from exc
        if isinstance(self._engine, AioEngine):
            try:
                self._engine.prime(
                    self._run.path.as_posix()
                )  # before any worker writes (see AioEngine.prime)
            except BaseException:
                self._staging.close()
                self._engine.close()
                self._run.close()
                raise
        # Ordering: the pools are created last, so a failure above leaves no thread behind.
        self._writers = concurrent.futures.ThreadPoolExecutor(
            io_threads, thread_name_prefix="memtier-nvme-write"
        )
        self._readers = concurrent.futures.ThreadPoolExecutor(
            io_threads, thread_name_prefix="memtier-nvme-read"
        )

    def _make_engine(self) -> tuple[IOEngine, _StagingPool]:
        s = self.settings
        if s.direct_io and not self.preflight_report.direct_io:
            raise TierUnavailableError("direct I/O", f"the file system at {s.path!r} refuses O_DIRECT")
        direct = self.preflight_report.direct_io if s.direct_io is None else s.direct_io
        slots, chunk = s.staging_slots, s.chunk_bytes
        if s.io_engine in ("aio", "auto"):
            why = f"DeepSpeed aio needs O_DIRECT, which is off or refused at {s.path!r}"
            if direct:
                ok, why = aio_status(build=s.build_aio)
                if ok:
                    engine: IOEngine | None = None
                    try:
                        engine = AioEngine(
                            block_bytes=s.aio_block_bytes, queue_depth=s.aio_queue_depth, build=False
                        )
                        return engine, _StagingPool(engine, slots, chunk)
                    except TierUnavailableError as exc:  # e.g. page-locking the staging buffers failed
                        if engine is not None:
                            engine.close()
                        why = exc.reason
            if s.io_engine == "aio":
                raise TierUnavailableError("io_engine='aio'", why)
            self.engine_fallback_reason = why
        engine = PosixEngine(direct=direct)
        return engine, _StagingPool(engine, slots, chunk)

    # ---------------------------------------------------------------- introspection
    @classmethod
    def availability(cls) -> tuple[bool, str]:
        return True, ""  # the posix engine needs nothing; the path is checked by preflight()

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used

    @property
    def io_engine(self) -> str:
        """The engine in use: "aio" or "posix"."""
        return self._engine.name

    @property
    def direct_io(self) -> bool:
        return self._engine.direct

    @property
    def run_dir(self) -> str:
        return str(self._run.path)

    def file_path(self, handle: Handle) -> str:
        """The file holding ``handle``'s bytes (for diagnostics and tests)."""
        return self._entry(handle).path

    # ---------------------------------------------------------------- put
    def _put(self, handle: Handle, tensor: torch.Tensor) -> _NvmeEntry:
        file_bytes = round_up(handle.nbytes, ALIGN)
        with self._lock:  # the cap is checked before anything is created or allocated
            if self._used + file_bytes > self._capacity:
                raise TierCapacityError(self.kind, file_bytes, self._used, self._capacity)
            self._used += file_bytes
        path = os.path.join(self._run.path, f"{handle.key:010d}.swap")
        n_chunks = len(range(0, handle.nbytes, self.settings.chunk_bytes))
        entry = _NvmeEntry(path=path, nbytes=handle.nbytes, file_bytes=file_bytes, crcs=[None] * n_chunks)
        try:
            self._create_file(entry)
            if handle.nbytes:
                self._submit_writes(entry, tensor)
        except BaseException:
            # Nothing half-written stays readable: wait for the chunks already submitted, then remove the file
            # (the handle was never returned).
            self._wait(entry.writes, raise_errors=False)
            self._remove(entry)
            raise
        return entry

    def _create_file(self, entry: _NvmeEntry) -> None:
        try:
            fd = os.open(entry.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise io_error("create", entry.path, entry.file_bytes, exc) from exc
        try:
            if entry.file_bytes:
                # Reserve every block now: ENOSPC surfaces here, in the caller's step, and the asynchronous
                # writes that follow cannot run out of space half-way (DeepSpeed's op would not report it).
                os.posix_fallocate(fd, 0, entry.file_bytes)
        except OSError as exc:
            raise io_error(
                "allocate", entry.path, entry.file_bytes, exc, f"reserving space in {self.run_dir}"
            ) from exc
        finally:
            os.close(fd)

    def _remove(self, entry: _NvmeEntry) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
        with self._lock:
            self._used -= entry.file_bytes

    def _submit_writes(self, entry: _NvmeEntry, tensor: torch.Tensor) -> None:
        src = as_byte_view(tensor)
        for index, offset, length in _chunks(entry.nbytes, self.settings.chunk_bytes):
            with self._stats.waiting():  # back-pressure: blocks only while every staging buffer is in flight
                slot_id = self._staging.acquire()
            try:
                slot = self._staging.slot(slot_id)
                event = None
                if src.is_cuda:
                    # Ordering: the D2H copy is enqueued on the caller's current stream after the kernels that
                    # produced the tensor; the writer thread waits on `event` before the disk reads the slot.
                    slot[:length].copy_(src[offset : offset + length], non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()
                else:
                    copy_bytes(slot[:length], src[offset : offset + length])
                io_bytes = round_up(length, ALIGN)
                if io_bytes > length:
                    slot[length:io_bytes].zero_()  # deterministic padding: the file never holds stale memory
                future = self._writers.submit(self._write_chunk, entry, index, slot_id, offset, length, event)
            except BaseException:
                self._staging.release(slot_id)
                raise
            entry.writes.append(future)

    def _write_chunk(
        self,
        entry: _NvmeEntry,
        index: int,
        slot_id: int,
        offset: int,
        length: int,
        event: torch.cuda.Event | None,
    ) -> None:
        slot = self._staging.slot(slot_id)
        try:
            if entry.error is not None:
                raise entry.error  # an earlier chunk failed: the handle is dead, skip the rest
            if event is not None:
                event.synchronize()
            if self.settings.checksum:
                entry.crcs[index] = _crc32(slot[:length])
            with self._stats.transfer("write", length):
                self._engine.write(entry.path, slot[: round_up(length, ALIGN)], offset)
        except BaseException as exc:
            error = (
                exc
                if isinstance(exc, TierError)
                else io_error("write", entry.path, length, errno.EIO, repr(exc))
            )
            self._fail(entry, error)
            raise error from (None if error is exc else exc)
        finally:
            # Ordering: the slot goes back to the pool only after the engine has finished with it.
            self._staging.release(slot_id)

    def _fail(self, entry: _NvmeEntry, error: TierError) -> None:
        """A write of ``entry`` failed: mark the handle dead (``get`` raises), remove its file so nothing
        half-written stays readable, and let the next call on the store raise the error."""
        with self._lock:
            first = entry.error is None
            if first:
                entry.error = error
        if first:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
            self._defer(error)

    # ---------------------------------------------------------------- get / prefetch
    def _get(self, handle: Handle, entry: _NvmeEntry, out: torch.Tensor | None) -> torch.Tensor:
        if entry.error is not None:
            raise entry.error
        if handle.nbytes == 0:
            return (
                out
                if out is not None
                else torch.empty(handle.shape, dtype=handle.dtype, device=handle.device)
            )
        with self._lock:
            prefetched, entry.prefetched = entry.prefetched, None
        if prefetched is not None:
            result, futures, callers = prefetched
            self._wait(futures)
            if result is out:  # prefetch(h, out=out) already filled it
                return out
            if callers and out is None:
                result = result.clone()  # get() without out returns a new tensor, not the caller's buffer
        elif out is not None and out.device.type == "cpu" and out.is_contiguous():
            self._wait(self._submit_reads(entry, byte_view_of(out), padded=False))
            return out
        else:
            buffer = aligned_empty(entry.file_bytes)
            self._wait(self._submit_reads(entry, buffer, padded=True))
            result = typed_view(buffer, handle)
        if out is not None:
            out.copy_(result)
            return out
        return result if handle.device.type == "cpu" else result.to(handle.device)

    def _prefetch(self, handle: Handle, entry: _NvmeEntry, out: torch.Tensor | None) -> None:
        if entry.error is not None or handle.nbytes == 0:
            return
        with self._lock:
            if entry.prefetched is not None:
                return
            if out is not None and out.device.type == "cpu" and out.is_contiguous():
                # The reads land in `out` itself; the caller leaves it alone until get(h, out=out).
                entry.prefetched = (out, self._submit_reads(entry, byte_view_of(out), padded=False), True)
            else:
                buffer = aligned_empty(entry.file_bytes)
                entry.prefetched = (
                    typed_view(buffer, handle),
                    self._submit_reads(entry, buffer, padded=True),
                    False,
                )

    def _submit_reads(
        self, entry: _NvmeEntry, dest: torch.Tensor, *, padded: bool
    ) -> list[concurrent.futures.Future[None]]:
        """Start reading ``entry`` into the uint8 buffer ``dest`` (``padded``: it has room up to file_bytes)."""
        engine = self._engine
        # Reading straight into `dest` saves a copy; with O_DIRECT it needs an aligned address (and room for the
        # padded length, or a chunk that is already a multiple of the alignment).
        can_direct = not engine.direct or dest.data_ptr() % ALIGN == 0
        futures = []
        for index, offset, length in _chunks(entry.nbytes, self.settings.chunk_bytes):
            io_bytes = round_up(length, ALIGN) if engine.direct else length
            direct = can_direct and (padded or io_bytes == length)
            futures.append(self._readers.submit(self._read_chunk, entry, index, offset, length, dest, direct))
        return futures

    def _read_chunk(
        self, entry: _NvmeEntry, index: int, offset: int, length: int, dest: torch.Tensor, direct: bool
    ) -> None:
        try:
            self._read_chunk_into(entry, index, offset, length, dest, direct)
        except TierError:
            raise
        except Exception as exc:  # e.g. a torch copy error: still a typed error naming the file
            raise io_error("read", entry.path, length, errno.EIO, repr(exc)) from exc

    def _read_chunk_into(
        self, entry: _NvmeEntry, index: int, offset: int, length: int, dest: torch.Tensor, direct: bool
    ) -> None:
        # Ordering: a read of a handle starts only after every write of that handle has completed.
        for future in entry.writes:
            future.result()
        if entry.error is not None:
            raise entry.error
        try:
            size = os.stat(entry.path).st_size
        except OSError as exc:
            raise TierCorruptionError(
                "read", entry.path, length, exc.errno or errno.EIO, "swap file is gone"
            ) from exc
        if size < entry.file_bytes:  # checked before reading: a short read is never returned as data
            raise TierCorruptionError(
                "read",
                entry.path,
                length,
                errno.EIO,
                f"truncated: file has {size} bytes, {entry.file_bytes} written",
            )
        io_bytes = round_up(length, ALIGN) if self._engine.direct else length
        if direct:
            with self._stats.transfer("read", length):
                self._engine.read_pageable(entry.path, dest[offset : offset + io_bytes], offset)
            self._verify(entry, index, offset, dest[offset : offset + length])
            return
        slot_id = self._staging.acquire()
        try:
            slot = self._staging.slot(slot_id)
            with self._stats.transfer("read", length):
                self._engine.read(entry.path, slot[:io_bytes], offset)
            self._verify(entry, index, offset, slot[:length])
            copy_bytes(dest[offset : offset + length], slot[:length])
        finally:
            self._staging.release(slot_id)

    def _verify(self, entry: _NvmeEntry, index: int, offset: int, data: torch.Tensor) -> None:
        expected = entry.crcs[index]
        if expected is None:
            return
        actual = _crc32(data)
        if actual != expected:
            raise TierCorruptionError(
                "verify",
                entry.path,
                data.numel(),
                errno.EIO,
                f"CRC32 mismatch in block {index} (file offset {offset}): wrote {expected:#010x}, read {actual:#010x}",
            )

    # ---------------------------------------------------------------- waiting, free, close
    def _wait(self, futures: Sequence[concurrent.futures.Future[None]], *, raise_errors: bool = True) -> None:
        """Wait for every future (all of them, even after a failure: they may still use the buffers), then raise
        the first error."""
        first: BaseException | None = None
        with self._stats.waiting():
            for future in futures:
                try:
                    future.result()
                except BaseException as exc:  # noqa: BLE001 - re-raised below
                    first = first or exc
        if first is not None and raise_errors:
            raise first

    def _release(self, entry: _NvmeEntry) -> None:
        with self._lock:
            prefetched, entry.prefetched = entry.prefetched, None
        # Ordering: the file goes only after every transfer that uses it (or its buffers) has finished.
        self._wait(entry.writes + (prefetched[1] if prefetched else []), raise_errors=False)
        self._remove(entry)

    def _synchronize(self) -> None:
        with self._lock:
            entries = list(self._entries.values())
        for entry in entries:
            prefetched = entry.prefetched
            self._wait(entry.writes + (prefetched[1] if prefetched else []), raise_errors=False)

    def _close(self) -> None:
        try:
            self._writers.shutdown(wait=True)
            self._readers.shutdown(wait=True)
            self._staging.close()
            self._engine.close()
        finally:
            self._run.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
