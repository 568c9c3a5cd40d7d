"""DeepSpeed's C++ ops (cpu_adam, async_io), loaded once per process and only compiled when asked.

`DeepSpeedOp(builder).status(build=...)` answers (usable, reason if not) and loads the op on the first
success; a failure to import or build is remembered, "not built yet" is not (a later call with build=True
may compile it: about 100 s once, cached by torch's extension builder after).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

# How long to wait for another process's build of the same op before giving up with the lock named. A cold
# build of cpu_adam or async_io takes ~100-240 s on a 2-core machine; override with MEMTIER_OP_BUILD_WAIT_S.
BUILD_WAIT_S = 900.0


class BuildLockError(RuntimeError):
    """torch's extension builder would wait forever on a lock file: stale, or held past the wait limit."""


def lock_holders(path: str) -> list[int]:
    """PIDs of processes that have ``path`` open (torch's `FileBaton` keeps its lock file open while building).

    Linux only (reads /proc/*/fd, which shows the caller's own processes, or all of them to root).
    """
    target = os.path.realpath(path)
    holders: list[int] = []
    try:
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return holders
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            for fd in os.listdir(fd_dir):
                try:
                    if os.readlink(os.path.join(fd_dir, fd)) == target:
                        holders.append(pid)
                        break
                except OSError:
                    continue
        except OSError:
            continue
    return holders


def wait_for_build_lock(
    build_dir: str, label: str, *, wait_s: float | None = None, poll_s: float = 0.5
) -> None:
    """Return once ``build_dir/lock`` is gone; raise `BuildLockError` naming it if it is stale or outlives
    ``wait_s``.

    torch's JIT builder (`torch.utils.file_baton.FileBaton`) creates ``lock`` with O_EXCL, builds, then
    removes it; every other process polls for it to vanish, with no time limit. A build killed in between
    leaves the file and every later load sleeps forever, silently. A lock that no live process has open is
    stale and is reported at once; a held one is waited for up to ``wait_s``.
    """
    lock = os.path.join(build_dir, "lock")
    if wait_s is None:
        wait_s = float(os.environ.get("MEMTIER_OP_BUILD_WAIT_S", BUILD_WAIT_S))
    deadline = time.monotonic() + wait_s
    while os.path.exists(lock):
        holders = lock_holders(lock)
        if not holders:
            # the builder closes its fd just before it removes the file: look again before calling it stale
            time.sleep(poll_s)
            holders = lock_holders(lock)
        if not holders and os.path.exists(lock):
            raise BuildLockError(
                f"DeepSpeed's {label} op: the build lock {lock} is stale (no process holds it: an earlier build "
                f"was interrupted); remove it (rm {lock}) and run again"
            )
        if time.monotonic() >= deadline:
            raise BuildLockError(
                f"DeepSpeed's {label} op: another build (pid {', '.join(map(str, holders))}) has held {lock} for "
                f"over {wait_s:.0f} s; wait for it, or stop it and remove the lock (rm {lock})"
            )
        time.sleep(poll_s)


class DeepSpeedOp:
    def __init__(
        self,
        builder: str,
        label: str,
        *,
        not_built_hint: str,
        incompatible_hint: str = "",
        installed_key: str | None = None,
        precheck: Callable[[], str | None] | None = None,
    ) -> None:
        self.builder = builder  # class name in deepspeed.ops.op_builder
        self.label = label  # e.g. "cpu_adam", for messages
        self.not_built_hint = not_built_hint
        self.incompatible_hint = incompatible_hint
        self.installed_key = (
            installed_key  # deepspeed.git_version_info.installed_ops key (ahead-of-time build)
        )
        self.precheck = precheck  # a platform check: the reason it cannot work here, or None
        self.lock = threading.Lock()
        self.module: Any = None
        self.failure: str | None = None

    def _builder(self) -> Any:
        import deepspeed.ops.op_builder as builders

        return getattr(builders, self.builder)()

    def build_dir(self) -> str | None:
        """Where torch's extension builder keeps this op (``$TORCH_EXTENSIONS_DIR/<name>``), or None."""
        try:
            from torch.utils.cpp_extension import _get_build_directory

            return str(_get_build_directory(self._builder().name, verbose=False))
        except Exception:  # noqa: BLE001 - best effort
            return None

    def prebuilt(self) -> bool:
        """Whether the op is installed or already JIT-compiled (loading it then takes seconds, not minutes)."""
        if self.installed_key is not None:
            try:
                from deepspeed.git_version_info import installed_ops  # type: ignore[import-not-found]

                if installed_ops.get(self.installed_key):
                    return True
            except Exception:  # noqa: BLE001 - best effort
                pass
        build_dir = self.build_dir()
        if build_dir is None:
            return False
        return os.path.exists(os.path.join(build_dir, f"{os.path.basename(build_dir)}.so"))

    def status(self, *, build: bool) -> tuple[bool, str]:
        """(usable, reason if not); loads the op (compiling it only if ``build``)."""
        with self.lock:
            if self.module is not None:
                return True, ""
            if self.failure is not None:
                return False, self.failure
            if self.precheck is not None:
                reason = self.precheck()
                if reason:
                    return False, reason
            try:
                builder = self._builder()
            except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
                self.failure = f"deepspeed is not importable: {exc}"
                return False, self.failure
            if not builder.is_compatible(verbose=False):
                self.failure = f"DeepSpeed's {self.label} op is not compatible here{self.incompatible_hint}"
                return False, self.failure
            if not build and not self.prebuilt():
                # not cached as a failure: a later call with build=True may compile it
                return False, f"DeepSpeed's {self.label} op is not built yet ({self.not_built_hint})"
            build_dir = self.build_dir()
            if build_dir is not None:
                try:
                    wait_for_build_lock(build_dir, self.label)
                except BuildLockError as exc:
                    # not cached as a failure: once the lock is removed a later call may load the op
                    return False, str(exc)
            try:
                self.module = builder.load(verbose=False)
            except BaseException as exc:  # noqa: BLE001 - compiler errors surface as many exception types
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    # a stop (Ctrl-C, or the SIGTERM handler's SystemExit) is not "this op failed"
                    raise
                self.failure = f"building DeepSpeed's {self.label} op failed: {type(exc).__name__}: {exc}"
                return False, self.failure
            return True, ""
