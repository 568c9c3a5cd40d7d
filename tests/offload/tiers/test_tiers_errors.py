"""Typed errors: preflight (missing, not a directory, read-only, too small), ENOSPC mid-run, ``python -O``."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from tiers_testlib import same_bytes

from offload.tiers import (
    NvmeTier,
    TierCapacityError,
    TierNoSpaceError,
    TierPathError,
    TierValueError,
    preflight,
)

REPO = Path(__file__).resolve().parents[3]


def test_preflight_accepts_a_good_path(tmp_path: Path) -> None:
    report = preflight(tmp_path, 1 << 20)
    assert report.free_bytes >= 1 << 20 and report.path == str(tmp_path)
    assert os.listdir(tmp_path) == []  # the probes clean up after themselves


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(TierPathError) as info:
        preflight(missing, 123)
    e = info.value
    assert isinstance(e, ValueError)  # the launcher maps ValueError subclasses to exit code 2
    assert (e.path, e.bytes, e.errno) == (str(missing), 123, errno.ENOENT)
    assert str(missing) in str(e) and "123 bytes" in str(e) and "ENOENT" in str(e)
    with pytest.raises(TierPathError):
        NvmeTier(path=missing)


def test_not_a_directory(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(TierPathError) as info:
        preflight(f, 0)
    assert info.value.errno == errno.ENOTDIR


def test_read_only_path(tmpfs) -> None:  # type: ignore[no-untyped-def]
    ro = tmpfs(1 << 20, read_only=True)
    with pytest.raises(TierPathError) as info:
        preflight(ro, 4096)
    assert info.value.errno == errno.EROFS and info.value.path == str(ro)
    with pytest.raises(TierPathError):
        NvmeTier(path=ro, capacity_bytes=4096)


def test_read_only_by_permission(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions; the read-only mount test covers this case")
    d = tmp_path / "ro"
    d.mkdir(mode=0o500)
    with pytest.raises(TierPathError) as info:
        preflight(d, 0)
    assert info.value.errno == errno.EACCES


def test_too_little_free_space(tmpfs) -> None:  # type: ignore[no-untyped-def]
    small = tmpfs(1 << 20)
    with pytest.raises(TierPathError) as info:
        preflight(small, 2 << 20)
    assert info.value.errno == errno.ENOSPC and info.value.bytes == 2 << 20
    assert "free space(1048576) < need(2097152)" in str(info.value)
    with pytest.raises(TierValueError, match="need_bytes"):
        preflight(small, -1)


def test_full_disk_mid_run_raises_a_typed_error(tmpfs, io_engine: str) -> None:  # type: ignore[no-untyped-def]
    """The file system fills up after the preflight (someone else wrote to it): put raises TierNoSpaceError
    naming the path, the bytes and ENOSPC; the failed tensor leaves nothing readable; earlier data survives."""
    mnt = tmpfs(8 << 20)
    settings: dict[str, Any] = {"capacity_bytes": 6 << 20, "io_engine": io_engine, "chunk_bytes": 256 << 10}
    with NvmeTier(path=mnt, build_aio=False, **settings) as store:
        first = torch.randn(250_000)  # ~1 MB
        h1 = store.put(first)
        store.synchronize()
        filler = mnt / "filler"
        with open(filler, "wb") as f:
            f.write(b"\0" * (6 << 20))
        stored = []
        with pytest.raises(TierNoSpaceError) as info:
            for _ in range(4):
                stored.append(store.put(torch.randn(250_000)))
                store.synchronize()
        e = info.value
        assert e.errno == errno.ENOSPC and e.bytes == 1_003_520
        assert os.path.dirname(e.path) == store.run_dir and "No space left" in str(e) and e.path in str(e)
        # The failed put returned no handle and removed its file: nothing half-written exists or is readable.
        assert not os.path.exists(e.path)
        assert store.used_bytes == 1_003_520 * (1 + len(stored))
        assert len(os.listdir(store.run_dir)) == 2 + len(stored)  # .lock and the complete tensors
        assert same_bytes(store.get(h1), first)
        filler.unlink()
        h3 = store.put(first)  # space is back: the store goes on
        assert same_bytes(store.get(h3), first)


def test_capacity_error_names_the_arithmetic(tmp_path: Path) -> None:
    expected = r"used\(0\) \+ need\(12288\) = 12288 > capacity\(8192\)"
    with (
        NvmeTier(path=tmp_path, capacity_bytes=8192, io_engine="posix") as store,
        pytest.raises(TierCapacityError, match=expected),
    ):
        store.put(torch.zeros(3000))


def test_checks_hold_under_python_O(tmp_path: Path) -> None:
    """The same failures raise the same typed errors with assertions compiled out."""
    script = textwrap.dedent(
        f"""
        import errno, os, sys, torch
        assert False, "never raised under -O"
        from offload.tiers import NvmeTier, HostTier, TierPathError, TierCapacityError, TierCorruptionError
        try:
            NvmeTier(path={str(tmp_path / "missing")!r})
        except TierPathError as e:
            assert_ok = e.errno == errno.ENOENT
        else:
            sys.exit("no TierPathError")
        with HostTier(capacity_bytes=4096) as h:
            try:
                h.put(torch.zeros(2000))
            except TierCapacityError:
                pass
            else:
                sys.exit("no TierCapacityError")
        with NvmeTier(path={str(tmp_path)!r}, io_engine="posix") as s:
            k = s.put(torch.ones(10_000))
            s.synchronize()
            os.truncate(s.file_path(k), 100)
            try:
                s.get(k)
            except TierCorruptionError:
                pass
            else:
                sys.exit("short read returned as data")
        print("OK" if assert_ok else "BAD")
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-O", "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("OK")
