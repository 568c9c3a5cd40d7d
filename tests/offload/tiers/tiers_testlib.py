"""Helpers shared by the tier-store tests (a uniquely named module: importable as `tiers_testlib`)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from offload.tiers.engines import aio_status

# Sizes in elements chosen to miss every block multiple: 1, a prime, just over 4 KiB / a chunk for 1-byte types.
ODD_NUMELS = (1, 7, 4097, 70_001)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8)


def random_tensor(numel: int, dtype: torch.dtype, *, seed: int = 0) -> torch.Tensor:
    """Random bit patterns (NaNs and infinities included): byte-exactness, not value-equality, is the claim."""
    g = torch.Generator().manual_seed(seed)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    return raw.view(dtype)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (NaN payloads included) plus shape and dtype."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


def aio_skip_reason() -> str | None:
    """None if DeepSpeed's aio op is usable; else why. Builds it only with MEMTIER_BUILD_AIO=1 (takes minutes);
    `make setup` / `python -m offload.tiers.engines build` builds it ahead of the tests."""
    ok, why = aio_status(build=os.environ.get("MEMTIER_BUILD_AIO") == "1")
    return None if ok else why


def fds_on_deleted_files(under: str | Path) -> list[str]:
    """Open file descriptors of this process that point at deleted files below ``under``."""
    prefix = str(under)
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(prefix) and target.endswith("(deleted)"):
                out.append(target)
    return out


def open_fds_under(under: str | Path) -> list[str]:
    prefix = str(under)
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(prefix):
                out.append(target)
    return out
