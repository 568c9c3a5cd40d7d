"""Fixtures of the tier-store tests: I/O engines, small tmpfs mounts (root only), a common dtype/size matrix."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from tiers_testlib import aio_skip_reason


@pytest.fixture(autouse=True)
def one_intra_op_thread() -> Iterator[None]:
    """These tests are about bytes, not copy speed: one intra-op thread keeps torch's OpenMP team from spinning
    against the I/O threads (and against other jobs) on a 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["posix", "aio"])
def io_engine(request: pytest.FixtureRequest) -> str:
    """Both NVMe I/O paths; the aio one skips with the reason when DeepSpeed's op cannot be used here."""
    if request.param == "aio":
        reason = aio_skip_reason()
        if reason is not None:
            pytest.skip(f"DeepSpeed async I/O unavailable: {reason}")
    return request.param


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Factory: mount a tmpfs of ``size_bytes`` (optionally read-only) under tmp_path. Needs root; skips else."""
    mounted: list[Path] = []

    def mount(size_bytes: int, *, read_only: bool = False, name: str = "mnt") -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        target = tmp_path / name
        target.mkdir()
        opts = f"size={size_bytes},mode=0755" + (",ro" if read_only else "")
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(target)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount tmpfs here: {proc.stderr.strip()}")
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        with contextlib.suppress(Exception):
            subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)
