"""Typed errors of the tier stores.

Every error names what failed in fields a caller can act on (path, bytes, errno), and none of the checks that
raise them rely on ``assert``: they hold under ``python -O``.

Hierarchy::

    TierError
    ├── TierValueError (ValueError)        a setting or argument is invalid; names the field
    ├── TierPathError (ValueError)         preflight: a tier path is missing, not writable or too small
    ├── TierUnavailableError               the tier kind or I/O engine does not exist on this machine
    ├── TierCapacityError                  the store's hard cap (from the plan) would be exceeded
    │   └── TierFragmentationError         enough free bytes, but no contiguous block
    ├── InvalidHandleError (ValueError)    freed, foreign or unknown handle; bad ``out``
    ├── TierClosedError                    the store was closed
    └── TierIOError (OSError)              an I/O call failed during a step: ENOSPC, EIO, EROFS, ...
        ├── TierNoSpaceError               ENOSPC
        └── TierCorruptionError            truncated file or CRC32 mismatch: data would be garbage
"""

from __future__ import annotations

import errno as errno_codes
import os

__all__ = [
    "InvalidHandleError",
    "TierCapacityError",
    "TierClosedError",
    "TierCorruptionError",
    "TierError",
    "TierFragmentationError",
    "TierIOError",
    "TierNoSpaceError",
    "TierPathError",
    "TierValueError",
    "TierUnavailableError",
]


class TierError(Exception):
    """Base class of every error raised by ``offload.tiers``."""


class TierValueError(TierError, ValueError):
    """A tier setting or argument is invalid. ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class TierPathError(TierError, ValueError):
    """A tier path failed the preflight (missing, not a directory, read-only, too little free space).

    The launcher maps it to exit code 2 (bad input). ``bytes`` is the space the run needs, ``errno`` the
    error number that describes the failure (ENOENT, ENOTDIR, EROFS, EACCES, ENOSPC, ...).
    """

    def __init__(self, path: str | os.PathLike[str], need_bytes: int, err: int, reason: str) -> None:
        self.path = os.fspath(path)
        self.bytes = int(need_bytes)
        self.errno = int(err)
        self.reason = reason
        name = errno_codes.errorcode.get(self.errno, str(self.errno))
        super().__init__(f"tier path {self.path!r} (need {self.bytes} bytes): {reason} [{name}]")


class TierUnavailableError(TierError):
    """A tier kind or I/O engine is not present on this machine; ``reason`` says why."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(f"{what} is unavailable: {reason}")
        self.what = what
        self.reason = reason


class TierCapacityError(TierError):
    """Storing ``requested_bytes`` more would exceed the store's hard cap. Raised before any allocation."""

    def __init__(
        self, tier: str, requested_bytes: int, used_bytes: int, capacity_bytes: int, *, message: str = ""
    ) -> None:
        self.tier = tier
        self.requested_bytes = int(requested_bytes)
        self.used_bytes = int(used_bytes)
        self.capacity_bytes = int(capacity_bytes)
        super().__init__(
            message
            or (
                f"{tier} tier: need {self.requested_bytes} bytes but used({self.used_bytes}) + "
                f"need({self.requested_bytes}) = {self.used_bytes + self.requested_bytes} > "
                f"capacity({self.capacity_bytes})"
            )
        )


class TierFragmentationError(TierCapacityError):
    """The arena has enough free bytes in total but no free block large enough."""

    def __init__(
        self, tier: str, requested_bytes: int, used_bytes: int, capacity_bytes: int, largest_free_bytes: int
    ) -> None:
        self.largest_free_bytes = int(largest_free_bytes)
        super().__init__(
            tier,
            requested_bytes,
            used_bytes,
            capacity_bytes,
            message=(
                f"{tier} tier: need a contiguous block of {requested_bytes} bytes; "
                f"capacity({capacity_bytes}) - used({used_bytes}) = {capacity_bytes - used_bytes} bytes are "
                f"free but the largest free block is {largest_free_bytes} bytes"
            ),
        )


class InvalidHandleError(TierError, ValueError):
    """A handle that was freed, belongs to another store, or an ``out`` tensor that does not match it."""


class TierClosedError(TierError):
    """The store was closed; no further operations are possible."""


class TierIOError(TierError, OSError):
    """An I/O call of a tier failed. ``path``, ``bytes`` (the transfer size) and ``errno`` name the failure.

    ``op`` is "write", "read", "allocate", "open" or "verify".
    """

    def __init__(
        self, op: str, path: str | os.PathLike[str], nbytes: int, err: int, detail: str = ""
    ) -> None:
        path_str = os.fspath(path)
        strerror = os.strerror(err) if err else "unknown error"
        name = errno_codes.errorcode.get(err, str(err))
        msg = f"{op} of {int(nbytes)} bytes on {path_str!r} failed: {strerror} [{name}]"
        if detail:
            msg += f"; {detail}"
        OSError.__init__(self, err, msg, path_str)
        self.op = op
        self.path = path_str
        self.bytes = int(nbytes)
        self.detail = detail

    def __str__(self) -> str:  # OSError's default str repeats the filename; the message already holds it
        return str(self.strerror)

    def __reduce__(self):  # picklable across processes, like OSError
        return (type(self), (self.op, self.path, self.bytes, self.errno, self.detail))


class TierNoSpaceError(TierIOError):
    """ENOSPC: the file system under an NVMe tier is full."""


class TierCorruptionError(TierIOError):
    """A swap file is shorter than written or a block's CRC32 does not match: raised instead of garbage."""


def io_error(
    op: str, path: str | os.PathLike[str], nbytes: int, exc: OSError | int, detail: str = ""
) -> TierIOError:
    """Map an ``OSError`` (or a bare errno) to the typed error; ENOSPC becomes :class:`TierNoSpaceError`."""
    err = exc if isinstance(exc, int) else (exc.errno or errno_codes.EIO)
    cls = TierNoSpaceError if err == errno_codes.ENOSPC else TierIOError
    return cls(op, path, nbytes, err, detail)
