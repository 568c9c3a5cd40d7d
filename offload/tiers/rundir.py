"""Private per-run directories for swap files, and their removal on every way out.

Layout: ``<path>/memtier-run-<host>-<pid>-<random>/`` (mode 0700) holding a ``.lock`` file that the owning
process keeps locked with ``fcntl.flock`` for the directory's whole life, and the swap files (mode 0600).

- Normal exit and exceptions: ``RunDirectory.close()`` (called by the store's ``close``/context manager), and an
  ``atexit`` hook for stores that were never closed.
- SIGTERM (torchrun stops workers with it): a handler removes every live run directory of this process, then
  chains to the previous handler or re-raises the signal with the default action.
- SIGKILL, power loss: nothing runs; the next run under the same path removes the leftover. A directory whose
  lock can be taken belongs to a dead process (the kernel drops flock locks when the holder dies); a directory
  whose lock is held belongs to a live run and is never touched.

Creation is race-free with respect to that rule: the directory is created under a temporary name, its lock is
taken, and only then is it renamed to the name reapers look at, so a reaper never sees an unlocked live run.
Locks are per open file description, so two stores in one process also protect each other. The path must be
node-local (flock is not reliable across NFS clients).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import os
import secrets
import shutil
import signal
import socket
import threading
import time
import weakref
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["LOCK_NAME", "RUN_PREFIX", "RunDirectory", "reap_dead_runs"]

RUN_PREFIX = "memtier-run-"
_NEW_PREFIX = ".memtier-new-"
LOCK_NAME = ".lock"
_STALE_NEW_SECONDS = 600.0  # a half-created directory older than this, with a free lock, is a leftover

_live: weakref.WeakSet[RunDirectory] = weakref.WeakSet()
_install_lock = threading.Lock()
_atexit_installed = False
_sigterm_installed = False
_previous_sigterm: Any = signal.SIG_DFL


def _lock_if_dead(lock_path: Path) -> tuple[bool, int | None]:
    """(the run is dead, descriptor holding its lock to close afterwards).

    A directory under its final name always had its lock file (creation takes the lock before the rename), so
    a missing lock file means a directory already being removed: dead too.
    """
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return True, None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False, None  # held by a live process
        raise
    return True, fd


def reap_dead_runs(root: str | os.PathLike[str]) -> list[Path]:
    """Remove run directories of dead processes under ``root``; returns what was removed."""
    root = Path(root)
    removed: list[Path] = []
    try:
        children = list(root.iterdir())
    except OSError:
        return removed
    uid = os.getuid()
    for child in children:
        name = child.name
        is_run = name.startswith(RUN_PREFIX)
        is_new = name.startswith(_NEW_PREFIX)
        if not (is_run or is_new):
            continue
        try:
            st = child.lstat()
        except FileNotFoundError:
            continue
        if not os.path.isdir(child) or child.is_symlink() or st.st_uid != uid:
            continue
        if is_new and time.time() - st.st_mtime < _STALE_NEW_SECONDS:
            continue  # may be a run being created right now
        dead, fd = _lock_if_dead(child / LOCK_NAME)
        if not dead:
            continue
        try:
            shutil.rmtree(child, ignore_errors=True)
            if not child.exists():
                removed.append(child)
        finally:
            if fd is not None:
                os.close(fd)
    return removed


class RunDirectory:
    """A private directory for one store's files, locked while this process lives."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        root = Path(root)
        self.root = root
        self.reaped = reap_dead_runs(root)
        name = f"{RUN_PREFIX}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        staging = root / f"{_NEW_PREFIX}{name}"
        os.mkdir(staging, 0o700)
        os.chmod(staging, 0o700)  # mkdir's mode is filtered by the umask
        try:
            self._lock_fd = os.open(
                staging / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
            )
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(
                self._lock_fd,
                f"pid={os.getpid()} host={socket.gethostname()} start={time.time():.0f}\n".encode(),
            )
            # Ordering: the lock is held before the directory gets the name reapers scan for.
            os.rename(staging, root / name)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.path = root / name
        self._owner_pid = os.getpid()
        self._closed = False
        self._close_lock = threading.Lock()
        _live.add(self)
        _install_cleanup_hooks()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Remove the directory and everything in it, then release the lock. Idempotent; a forked child that
        inherited the object does nothing (the directory belongs to the parent)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        _live.discard(self)
        if os.getpid() != self._owner_pid:
            return
        try:
            shutil.rmtree(self.path, ignore_errors=True)
        finally:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _cleanup_all() -> None:
    for run in list(_live):
        with contextlib.suppress(Exception):
            run.close()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    _cleanup_all()
    previous = _previous_sigterm
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_IGN:
        return
    else:  # SIG_DFL (or unknown): terminate as if we had not been here
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def _install_cleanup_hooks() -> None:
    """atexit once; the SIGTERM handler once, from the main thread (Python only allows it there)."""
    global _atexit_installed, _sigterm_installed, _previous_sigterm
    with _install_lock:
        if not _atexit_installed:
            atexit.register(_cleanup_all)
            _atexit_installed = True
        if _sigterm_installed or threading.current_thread() is not threading.main_thread():
            return
        current = signal.getsignal(signal.SIGTERM)
        if current is not _on_sigterm:
            _previous_sigterm = current
            signal.signal(signal.SIGTERM, _on_sigterm)
        _sigterm_installed = True
