"""Liveness of the ranks of a job: each rank touches a file; the launcher kills a rank whose file goes stale.

A rank stopped by SIGSTOP, swapped out or wedged holding the GIL stops every thread, its heartbeat thread
too, while its peers wait in a collective that may never time out on its own: the launcher sees the stale
file, names the rank and SIGKILLs it, which torchrun sees as a failed worker (and restarts the group when
`--max-restarts` allows). A collective's own timeout (the process group's, MEMTIER_COLLECTIVE_TIMEOUT_S) is
the second line: a peer that is alive but never answers.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

HEARTBEAT_DIR_ENV = "MEMTIER_HEARTBEAT_DIR"
PERIOD_S = 1.0  # how often a rank touches its file


def start(rank: int, *, period_s: float = PERIOD_S) -> Callable[[], None]:
    """In a rank: touch `$MEMTIER_HEARTBEAT_DIR/rank-<rank>` (holding the pid) every `period_s`; returns the
    stop. Without the variable (not under `memtier launch`) nothing runs."""
    directory = os.environ.get(HEARTBEAT_DIR_ENV)
    if not directory or not os.path.isdir(directory):
        return lambda: None
    path = os.path.join(directory, f"rank-{rank}")
    with open(path + ".tmp", "w") as fh:
        fh.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(period_s):
            try:
                os.utime(path)
            except OSError:  # the launcher removed the directory: the job is ending
                return

    threading.Thread(target=beat, name="memtier-heartbeat", daemon=True).start()
    return stop.set


@dataclass(frozen=True)
class Stale:
    rank: int
    pid: int
    silent_s: float

    def describe(self) -> str:
        return f"rank {self.rank} (pid {self.pid}) sent no heartbeat for {self.silent_s:.0f} s and was killed"


def stale_ranks(directory: str, timeout_s: float, *, now: float | None = None) -> list[Stale]:
    """In the launcher: the ranks whose file is older than `timeout_s`."""
    now = time.time() if now is None else now
    out = []
    try:
        names = os.listdir(directory)
    except OSError:
        return out
    for name in sorted(names):
        if not name.startswith("rank-") or name.endswith(".tmp"):
            continue
        path = os.path.join(directory, name)
        try:
            age = now - os.stat(path).st_mtime
            with open(path) as fh:
                pid = int(fh.read().strip() or 0)
        except (OSError, ValueError):
            continue
        if age > timeout_s and pid > 0:
            out.append(Stale(rank=int(name[len("rank-") :]), pid=pid, silent_s=age))
    return out
