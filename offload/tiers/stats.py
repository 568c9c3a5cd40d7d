"""Transfer statistics of a tier store: bytes moved, busy time, achieved bandwidth, time callers waited."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator
from typing import Literal

__all__ = ["StatsRecorder", "TierStats"]

Direction = Literal["write", "read"]

GB = 1e9  # bandwidths are reported in decimal GB/s, like dd and fio


@dataclasses.dataclass(frozen=True, kw_only=True)
class TierStats:
    """A snapshot of a store's counters.

    ``write_seconds`` / ``read_seconds`` are wall-clock seconds during which at least one transfer in that
    direction was in flight (the union of the transfer intervals, so concurrent chunks are not counted twice);
    the achieved bandwidth is bytes over those seconds. ``wait_seconds`` is the time callers were blocked inside
    the store (``get`` waiting for data, ``put`` waiting for a free staging buffer, ``synchronize``).
    """

    bytes_written: int = 0
    bytes_read: int = 0
    write_seconds: float = 0.0
    read_seconds: float = 0.0
    wait_seconds: float = 0.0
    puts: int = 0
    gets: int = 0
    frees: int = 0

    @property
    def write_gbps(self) -> float:
        """Achieved write bandwidth in GB/s (0.0 before any write)."""
        return self.bytes_written / self.write_seconds / GB if self.write_seconds > 0 else 0.0

    @property
    def read_gbps(self) -> float:
        """Achieved read bandwidth in GB/s (0.0 before any read)."""
        return self.bytes_read / self.read_seconds / GB if self.read_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, float | int]:
        out: dict[str, float | int] = dataclasses.asdict(self)
        out["write_gbps"] = self.write_gbps
        out["read_gbps"] = self.read_gbps
        return out


class StatsRecorder:
    """Thread-safe accumulator behind ``TierStore.stats``; I/O worker threads and callers both report here."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes = {"write": 0, "read": 0}
        self._busy = {"write": 0.0, "read": 0.0}
        self._inflight = {"write": 0, "read": 0}
        self._since = {"write": 0.0, "read": 0.0}
        self._wait = 0.0
        self._counts = {"puts": 0, "gets": 0, "frees": 0}

    def begin(self, direction: Direction) -> None:
        with self._lock:
            if self._inflight[direction] == 0:
                self._since[direction] = time.perf_counter()
            self._inflight[direction] += 1

    def end(self, direction: Direction, nbytes: int) -> None:
        """Close one transfer opened by :meth:`begin`; ``nbytes`` counts only if it succeeded (pass 0 else)."""
        with self._lock:
            self._inflight[direction] -= 1
            self._bytes[direction] += nbytes
            if self._inflight[direction] == 0:
                self._busy[direction] += time.perf_counter() - self._since[direction]

    @contextlib.contextmanager
    def transfer(self, direction: Direction, nbytes: int) -> Iterator[None]:
        self.begin(direction)
        ok = False
        try:
            yield
            ok = True
        finally:
            self.end(direction, nbytes if ok else 0)

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            with self._lock:
                self._wait += elapsed

    def count(self, what: Literal["puts", "gets", "frees"]) -> None:
        with self._lock:
            self._counts[what] += 1

    def snapshot(self) -> TierStats:
        now = time.perf_counter()
        with self._lock:
            busy = dict(self._busy)
            for direction in ("write", "read"):
                if self._inflight[direction] > 0:  # include the interval still open
                    busy[direction] += now - self._since[direction]
            return TierStats(
                bytes_written=self._bytes["write"],
                bytes_read=self._bytes["read"],
                write_seconds=busy["write"],
                read_seconds=busy["read"],
                wait_seconds=self._wait,
                puts=self._counts["puts"],
                gets=self._counts["gets"],
                frees=self._counts["frees"],
            )
