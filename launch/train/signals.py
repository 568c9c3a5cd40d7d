"""Stopping cleanly (SIGTERM from torchrun) and the step gate benchmarks use to interleave runs."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

STOP_GRACE_S = 5.0  # seconds a stopped rank may take to unwind before it exits regardless


class StopRequested(SystemExit):
    pass


def on_sigterm(signum: int, frame: Any) -> None:
    # NOTE: torchrun stops workers with SIGTERM; turning it into an exception runs every `finally` (the
    # offload handle closes its tiers and deletes swap files, a checkpoint in progress is discarded).
    raise StopRequested(128 + signum)


def install_stop_watchdog(grace_s: float) -> Callable[[], None]:
    """Exit `grace_s` seconds after SIGTERM/SIGINT if the main thread has not unwound by then.

    NOTE: a Python signal handler runs only when the main thread is back in the interpreter; a rank blocked in
    a C++ call (a collective whose peer died, a rendezvous) would not react to torchrun's SIGTERM until its
    SIGKILL. The wakeup fd is written by the C-level handler at once, so this thread can give the main thread
    `grace_s` to unwind (its `finally` blocks close the tiers and delete swap files) and end the process
    otherwise. Swap directories of a process ended this way are removed by the launcher afterwards (the
    kernel releases their locks when the process dies). Returns the undo (restores the previous wakeup fd).
    """
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = signal.set_wakeup_fd(write_fd)

    def watch() -> None:
        while True:
            data = os.read(read_fd, 1)
            if not data:  # the undo closed the pipe
                os.close(read_fd)
                return
            if data[0] in (signal.SIGTERM, signal.SIGINT):
                time.sleep(grace_s)
                os._exit(128 + data[0])

    threading.Thread(target=watch, name="memtier-stop-watchdog", daemon=True).start()

    def undo() -> None:
        signal.set_wakeup_fd(previous)
        os.close(write_fd)

    return undo


def wait_for_gate(gate_dir: str, step: int, poll_s: float = 0.01) -> None:
    """Block until the file go-<step> exists in `gate_dir` (the benchmark's turn to run this step)."""
    path = os.path.join(gate_dir, f"go-{step}")
    while not os.path.exists(path):
        time.sleep(poll_s)


def signal_gate(gate_dir: str, step: int, info: dict[str, Any]) -> None:
    """Write done-<step> (atomically) with the step's timings."""
    path = os.path.join(gate_dir, f"done-{step}")
    with open(path + ".tmp", "w") as fh:
        json.dump(info, fh)
    os.replace(path + ".tmp", path)
