"""Working buffers of the lanes: pooled flat host buffers (staging, gradients) and the device lane's cache."""

from __future__ import annotations

import threading

import torch

__all__ = ["BufferPool", "DeviceBufferCache", "flat_base"]


class BufferPool:
    """``count`` flat fp32 host buffers of ``numel`` elements (pinned with CUDA), handed out and returned."""

    def __init__(self, count: int, numel: int, *, pin: bool) -> None:
        self.numel = numel
        self._pin = pin
        self._free: list[torch.Tensor] = []
        self._created = 0
        self._count = count
        self._cond = threading.Condition()

    def _new(self) -> torch.Tensor:
        return torch.empty(self.numel, dtype=torch.float32, pin_memory=self._pin)

    def acquire(self) -> torch.Tensor:
        with self._cond:
            while not self._free and self._created >= self._count:
                self._cond.wait()
            if self._free:
                return self._free.pop()
            self._created += 1
        return self._new()  # allocated lazily, outside the lock

    def try_acquire(self) -> torch.Tensor | None:
        with self._cond:
            if self._free:
                return self._free.pop()
            if self._created >= self._count:
                return None
            self._created += 1
        return self._new()

    def release(self, buf: torch.Tensor) -> None:
        with self._cond:
            self._free.append(buf)
            self._cond.notify()

    def clear(self) -> None:
        """Drop the idle buffers (the memory goes back); buffers in use come back later as usual."""
        with self._cond:
            self._created -= len(self._free)
            self._free.clear()


def flat_base(t: torch.Tensor) -> torch.Tensor:
    """The pool buffer a [3, n] view was carved from (views share its storage; pools hand out whole buffers)."""
    base = t._base if t._base is not None else t
    return base


class DeviceBufferCache:
    """The device lane's working buffers by purpose, cached for the rest of one step (``clear`` at its end)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[str, torch.Tensor] = {}
        self.nbytes = 0  # device memory the cache holds (the scheduler may lend it again)

    def get(self, key: str, numel: int) -> torch.Tensor:
        """A device working buffer of at least ``numel`` fp32 elements, cached for the rest of this step."""
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            if buf is not None:
                self.nbytes -= buf.numel() * 4
            buf = torch.empty(numel, dtype=torch.float32, device=self.device)
            self._buffers[key] = buf
            self.nbytes += numel * 4
        return buf[:numel]

    def clear(self) -> None:
        # the device lane's buffers are freed each step: device memory is lent only during the update
        self._buffers.clear()
        self.nbytes = 0
