"""Preflight of an NVMe tier path, run before training starts: exists, is a writable directory, has the free
space the plan needs; and whether the file system accepts aligned direct I/O (O_DIRECT).

``preflight`` raises ``TierPathError`` (a ``ValueError``) naming the path, the bytes and the errno; the launcher
maps it to exit code 2 (bad input).
"""

from __future__ import annotations

import dataclasses
import errno
import mmap
import os
import secrets
from pathlib import Path

from offload.tiers.errors import TierPathError, TierValueError

__all__ = ["DIRECT_IO_ALIGNMENT", "PreflightReport", "preflight", "probe_direct_io"]

# Buffer address, file offset and length of O_DIRECT transfers are multiples of this. 4096 covers NVMe drives
# formatted with 4 KiB logical blocks as well as 512-byte ones (open(2), "O_DIRECT" notes).
DIRECT_IO_ALIGNMENT = 4096


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreflightReport:
    path: str
    need_bytes: int
    free_bytes: int
    direct_io: bool  # the file system accepts O_DIRECT on this path


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize  # space available to unprivileged users, like df's "Avail"


def probe_direct_io(directory: str | os.PathLike[str]) -> bool:
    """Write and read back one aligned block with O_DIRECT in ``directory``; False if the file system refuses."""
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = Path(directory) / f".memtier-odirect-{os.getpid()}-{secrets.token_hex(4)}"
    buf = mmap.mmap(-1, DIRECT_IO_ALIGNMENT)  # anonymous mappings are page-aligned, as O_DIRECT requires
    try:
        buf.write(b"\xa5" * DIRECT_IO_ALIGNMENT)
        try:
            fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_DIRECT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # the file system does not support O_DIRECT
                return False
            raise
        try:
            if os.pwrite(fd, buf, 0) != DIRECT_IO_ALIGNMENT:
                return False
            back = mmap.mmap(-1, DIRECT_IO_ALIGNMENT)
            try:
                return os.preadv(fd, [back], 0) == DIRECT_IO_ALIGNMENT and back[:] == buf[:]
            finally:
                back.close()
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return False
            raise
        finally:
            os.close(fd)
    finally:
        buf.close()
        try:
            os.unlink(probe)
        except FileNotFoundError:
            pass


def preflight(path: str | os.PathLike[str], need_bytes: int) -> PreflightReport:
    """Check an NVMe tier path before training: raises :class:`TierPathError` on the first failed check."""
    if not isinstance(need_bytes, int) or need_bytes < 0:
        raise TierValueError("need_bytes", f"must be a non-negative int, got {need_bytes!r}")
    p = Path(path)
    if not p.exists():
        raise TierPathError(p, need_bytes, errno.ENOENT, "does not exist")
    if not p.is_dir():
        raise TierPathError(p, need_bytes, errno.ENOTDIR, "is not a directory")
    # Writable: really create, write and remove a file (os.access misses read-only mounts and ACLs).
    probe = p / f".memtier-preflight-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"\0" * DIRECT_IO_ALIGNMENT)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise TierPathError(p, need_bytes, exc.errno or errno.EIO, f"not writable: {exc.strerror}") from exc
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass
    free = _free_bytes(p)
    if free < need_bytes:
        raise TierPathError(
            p,
            need_bytes,
            errno.ENOSPC,
            f"free space({free}) < need({need_bytes}) by {need_bytes - free} bytes",
        )
    try:
        direct = probe_direct_io(p)
    except OSError as exc:
        raise TierPathError(p, need_bytes, exc.errno or errno.EIO, f"direct-I/O probe failed: {exc}") from exc
    return PreflightReport(path=str(p), need_bytes=need_bytes, free_bytes=free, direct_io=direct)
