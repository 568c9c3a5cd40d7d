"""Run a command under a hard memory cap: a cgroup v1 memory controller child group, created and removed here.

`run_capped(cmd, limit_bytes=...)` makes ``<our memory cgroup>/memtier-bench-<pid>-<n>`` (nested under the
group this process is in, so any limit above us still holds), sets ``memory.limit_in_bytes`` and, where the
kernel accounts swap, ``memory.memsw.limit_in_bytes`` to the same value (swap cannot hide usage), starts the
command inside it, waits, reads the group's counters and removes the group, also on Ctrl-C or an exception.

What the numbers mean (cgroup v1, Documentation/admin-guide/cgroup-v1/memory.rst): the group is charged for
anonymous memory *and* the page cache of every file its processes touch (the interpreter's shared libraries,
torch's .so files, swap files read or written without O_DIRECT). Under the limit the kernel reclaims clean
cache before it OOM-kills, so ``max_usage_bytes`` can sit near the cap even when the process's own memory is
far below it. We therefore also sample ``memory.stat`` (``total_rss``: anonymous memory, ``total_cache``) while
the command runs, and the command itself should report its peak RSS (``VmHWM``); the three together say what
the process needed and what the cache took. The reverse also happens: a page is charged to the group that
first brought it into the cache, so shared libraries another process already loaded count in the child's RSS
but not in its group (``VmHWM`` a little above ``max_usage_bytes``, ~0.1 GiB for torch + transformers).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

MEMORY_ROOT = "/sys/fs/cgroup/memory"
_SEQ = itertools.count()


class CgroupUnavailable(RuntimeError):
    """No cgroup v1 memory controller we may use here; the message is the skip reason."""


def unavailable_reason(root: str = MEMORY_ROOT) -> str | None:
    """Why a capped run is impossible here (a sentence), or None when it is possible."""
    if not os.path.exists(os.path.join(root, "memory.limit_in_bytes")):
        return f"no cgroup v1 memory controller mounted at {root} (cgroup v2 only, or not Linux)"
    if os.geteuid() != 0:
        return f"creating a memory cgroup under {root} needs root (euid {os.geteuid()})"
    parent = own_cgroup_dir(root)
    if not os.access(parent, os.W_OK):
        return f"cannot create a child group in {parent}: not writable"
    return None


def own_cgroup_dir(root: str = MEMORY_ROOT) -> str:
    """The memory cgroup directory this process is in (from /proc/self/cgroup), or ``root``."""
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if "memory" in controllers.split(","):
                    candidate = os.path.join(root, path.lstrip("/"))
                    if os.path.isdir(candidate):
                        return candidate
    except OSError:
        pass
    return root


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _read_keyed(path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[1].lstrip("-").isdigit():
                    out[parts[0]] = int(parts[1])
    except OSError:
        pass
    return out


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class MemoryCgroup:
    """One child memory cgroup with a hard limit; `close()` kills what is left in it and removes it."""

    def __init__(self, limit_bytes: int, *, root: str = MEMORY_ROOT, parent: str | None = None) -> None:
        reason = unavailable_reason(root)
        if reason:
            raise CgroupUnavailable(reason)
        if limit_bytes <= 0:
            raise ValueError(f"limit_bytes must be > 0, got {limit_bytes}")
        self.parent = parent or own_cgroup_dir(root)
        self.path = os.path.join(self.parent, f"memtier-bench-{os.getpid()}-{next(_SEQ)}")
        self.limit_bytes = int(limit_bytes)
        os.mkdir(self.path)
        try:
            _write(self._f("memory.limit_in_bytes"), str(self.limit_bytes))
            # the limit the kernel applied (rounded down to a page)
            self.limit_bytes = _read_int(self._f("memory.limit_in_bytes")) or self.limit_bytes
            self.memsw = os.path.exists(self._f("memory.memsw.limit_in_bytes"))
            if self.memsw:
                # memory + swap: with swap on the host, a group could otherwise page out and look small
                _write(self._f("memory.memsw.limit_in_bytes"), str(self.limit_bytes))
        except BaseException:
            self.close()
            raise

    def _f(self, name: str) -> str:
        return os.path.join(self.path, name)

    def add(self, pid: int) -> None:
        _write(self._f("cgroup.procs"), str(pid))

    def pids(self) -> list[int]:
        try:
            with open(self._f("cgroup.procs")) as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return []

    def usage(self) -> tuple[int, int, int]:
        """(usage_in_bytes, total_rss, total_cache) now."""
        stat = _read_keyed(self._f("memory.stat"))
        return (
            _read_int(self._f("memory.usage_in_bytes")) or 0,
            stat.get("total_rss", stat.get("rss", 0)),
            stat.get("total_cache", stat.get("cache", 0)),
        )

    def counters(self) -> dict[str, Any]:
        oom = _read_keyed(self._f("memory.oom_control"))
        return {
            "max_usage_bytes": _read_int(self._f("memory.max_usage_in_bytes")),
            "memsw_max_usage_bytes": _read_int(self._f("memory.memsw.max_usage_in_bytes"))
            if self.memsw
            else None,
            "failcnt": _read_int(self._f("memory.failcnt")),
            "oom_kill": oom.get("oom_kill"),  # kernels >= 4.13; None before
            "under_oom": oom.get("under_oom"),
        }

    def close(self) -> None:
        """Kill any process left in the group (ours: the command and its descendants), then remove it."""
        if not os.path.isdir(self.path):
            return
        for _ in range(50):
            left = self.pids()
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        for pid in self.pids():  # unkillable stragglers: move them to the parent so rmdir can succeed
            with contextlib.suppress(OSError):
                _write(os.path.join(self.parent, "cgroup.procs"), str(pid))
        for _ in range(100):
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.05)  # EBUSY while the last task is still exiting
        os.rmdir(self.path)

    def __enter__(self) -> MemoryCgroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(kw_only=True)
class CappedResult:
    """What a capped command did and how much memory its group was charged for."""

    cmd: list[str]
    limit_bytes: int
    returncode: int
    oom_killed: bool  # SIGKILLed with the group at its limit (oom_kill count, or failcnt and SIGKILL)
    wall_s: float
    max_usage_bytes: int | None  # cgroup peak: anonymous memory + page cache (+ kernel memory)
    memsw_max_usage_bytes: int | None
    failcnt: int | None  # times the group hit its limit (reclaim ran); > 0 is normal with page cache
    oom_kill: int | None
    peak_rss_sampled_bytes: int  # peak of memory.stat total_rss, sampled every `sample_s`
    peak_cache_sampled_bytes: int
    timed_out: bool = False
    cgroup: str = ""
    output_tail: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sampler(group: MemoryCgroup, stop: threading.Event, peaks: list[int], sample_s: float) -> None:
    while not stop.wait(sample_s):
        _, rss, cache = group.usage()
        peaks[0] = max(peaks[0], rss)
        peaks[1] = max(peaks[1], cache)


def run_capped(
    cmd: Sequence[str],
    *,
    limit_bytes: int,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    timeout_s: float | None = None,
    on_line: Callable[[str], None] | None = None,
    sample_s: float = 0.1,
    tail_lines: int = 40,
) -> CappedResult:
    """Run ``cmd`` in a fresh memory cgroup capped at ``limit_bytes``; stdout and stderr are merged and passed
    line by line to ``on_line``. Raises `CgroupUnavailable` (the skip reason) where no cgroup can be made."""
    tail: list[str] = []
    peaks = [0, 0]
    timed_out = False
    with MemoryCgroup(limit_bytes) as group:
        procs_file = group._f("cgroup.procs")

        # runs in the child between fork and exec: everything the command allocates is charged to the group
        def enter_group() -> None:
            with open(procs_file, "w") as f:
                f.write(str(os.getpid()))

        stop = threading.Event()
        sampler = threading.Thread(target=_sampler, args=(group, stop, peaks, sample_s), daemon=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            list(cmd),
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            preexec_fn=enter_group,  # noqa: PLW1509 - no threads touch the child before exec
            start_new_session=True,  # its own process group: Ctrl-C here does not reach it twice
        )
        sampler.start()
        killer: threading.Timer | None = None
        try:
            if timeout_s is not None:

                def expire() -> None:
                    nonlocal timed_out
                    timed_out = True
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)

                killer = threading.Timer(timeout_s, expire)
                killer.daemon = True
                killer.start()
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                del tail[:-tail_lines]
                if on_line is not None:
                    on_line(line)
            returncode = proc.wait()
        finally:
            if killer is not None:
                killer.cancel()
            if proc.poll() is None:  # interrupted: stop the command before the group goes
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            stop.set()
            sampler.join()
        wall_s = time.perf_counter() - t0
        counters = group.counters()
    oom_kill = counters["oom_kill"]
    killed = returncode == -signal.SIGKILL and not timed_out
    oom = killed and (bool(oom_kill) if oom_kill is not None else bool(counters["failcnt"]))
    return CappedResult(
        cmd=list(cmd),
        limit_bytes=group.limit_bytes,
        returncode=returncode,
        oom_killed=oom,
        wall_s=wall_s,
        max_usage_bytes=counters["max_usage_bytes"],
        memsw_max_usage_bytes=counters["memsw_max_usage_bytes"],
        failcnt=counters["failcnt"],
        oom_kill=oom_kill,
        peak_rss_sampled_bytes=peaks[0],
        peak_cache_sampled_bytes=peaks[1],
        timed_out=timed_out,
        cgroup=group.path,
        output_tail=tail,
    )


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C for the duration, so `run_capped`'s cleanup runs on either."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
