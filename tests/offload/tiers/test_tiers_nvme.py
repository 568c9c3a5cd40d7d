"""NVMe tier on real files, through both I/O paths (DeepSpeed aio and the pread/pwrite thread pool)."""

from __future__ import annotations

import errno
import gc
import os
import stat
from pathlib import Path

import psutil
import pytest
import torch
from tiers_testlib import DTYPES, ODD_NUMELS, fds_on_deleted_files, open_fds_under, random_tensor, same_bytes

from offload.tiers import (
    InvalidHandleError,
    NvmeTier,
    TierCapacityError,
    TierCorruptionError,
    TierIOError,
    TierUnavailableError,
    TierValueError,
)
from offload.tiers.engines import PosixEngine
from offload.tiers.errors import io_error

CHUNK = 64 << 10  # small chunks so modest tensors span several I/O requests


def nvme(path: Path, engine: str, **kw: object) -> NvmeTier:
    settings: dict[str, object] = {"chunk_bytes": CHUNK, "staging_slots": 2, "build_aio": False}
    settings.update(kw)
    return NvmeTier(path=path, io_engine=engine, **settings)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_is_byte_exact(tmp_path: Path, io_engine: str, dtype: torch.dtype) -> None:
    with nvme(tmp_path, io_engine, checksum=True) as store:
        assert store.io_engine == io_engine
        tensors = [random_tensor(n, dtype, seed=i) for i, n in enumerate(ODD_NUMELS)]
        handles = [store.put(t) for t in tensors]  # several in flight at once: 2 staging slots, many chunks
        for t, h in reversed(list(zip(tensors, handles))):
            assert same_bytes(store.get(h), t)
            out = torch.empty_like(t)
            assert store.get(h, out=out) is out and same_bytes(out, t)
            store.prefetch(h)
            assert same_bytes(store.get(h), t)
            into = torch.zeros_like(t)
            store.prefetch(h, out=into)  # straight into the caller's buffer
            assert store.get(h, out=into) is into and same_bytes(into, t)
            store.prefetch(h, out=into)
            out.zero_()
            assert same_bytes(store.get(h, out=out), t)  # a different `out`: still the right bytes
        for h in handles:
            store.free(h)
        assert store.used_bytes == 0 and os.listdir(store.run_dir) == [".lock"]


def test_buffered_io_round_trip(tmp_path: Path) -> None:
    """direct_io=False: the path for file systems without O_DIRECT (and the only one where aio cannot run)."""
    with nvme(tmp_path, "posix", direct_io=False, checksum=True) as store:
        assert not store.direct_io
        for i, dtype in enumerate(DTYPES):
            t = random_tensor(70_001, dtype, seed=i)
            h = store.put(t)
            assert same_bytes(store.get(h), t)
            out = torch.empty_like(t)
            assert same_bytes(store.get(h, out=out), t)
    with pytest.raises(TierUnavailableError, match="O_DIRECT"):
        nvme(tmp_path, "aio", direct_io=False)
    with nvme(tmp_path, "auto", direct_io=False) as store:
        assert store.io_engine == "posix" and "O_DIRECT" in store.engine_fallback_reason


def test_views_and_noncontiguous(tmp_path: Path, io_engine: str) -> None:
    base = torch.randn(300, 257, generator=torch.Generator().manual_seed(1))
    sources = {
        "transpose": base.t(),
        "strided": base[:, ::3],
        "slice": base[11:200, 5:250],
        "expanded": base[0:1].expand(40, 257),
        "bf16 view": base.to(torch.bfloat16)[::2, 1::2],
    }
    with nvme(tmp_path, io_engine) as store:
        for name, src in sources.items():
            h = store.put(src)
            got = store.get(h)
            assert got.is_contiguous() and torch.equal(got, src), name
            out = torch.empty(src.shape[::-1], dtype=src.dtype).transpose(0, 1)  # non-contiguous out
            assert torch.equal(store.get(h, out=out), src), name
            unaligned = torch.empty(src.numel() + 1, dtype=src.dtype)[1:].view(src.shape)  # misaligned out
            assert torch.equal(store.get(h, out=unaligned), src), name


def test_source_may_be_mutated_after_put(tmp_path: Path, io_engine: str) -> None:
    with nvme(tmp_path, io_engine) as store:
        t = torch.arange(200_000, dtype=torch.float32)
        h = store.put(t)
        t.fill_(-1)  # the writes may still be running: they use the staging copy, not `t`
        assert torch.equal(store.get(h), torch.arange(200_000, dtype=torch.float32))


def test_zero_size_and_scalar(tmp_path: Path) -> None:
    with nvme(tmp_path, "posix") as store:
        e = store.put(torch.empty(3, 0))
        s = store.put(torch.tensor(-2, dtype=torch.int8))
        assert store.get(e).shape == (3, 0)
        assert store.get(s).item() == -2 and store.get(s).shape == ()


def test_run_dir_and_files_are_private(tmp_path: Path) -> None:
    old = os.umask(0)  # even with a permissive umask
    try:
        with nvme(tmp_path, "posix") as store:
            h = store.put(torch.ones(1000))
            store.synchronize()
            assert stat.S_IMODE(os.stat(store.run_dir).st_mode) == 0o700
            assert stat.S_IMODE(os.stat(store.file_path(h)).st_mode) == 0o600
            assert Path(store.run_dir).parent == tmp_path
            assert Path(store.file_path(h)).parent == Path(store.run_dir)
    finally:
        os.umask(old)


def test_cap_is_enforced_before_any_file(tmp_path: Path) -> None:
    with nvme(tmp_path, "posix", capacity_bytes=64 << 10) as store:
        h = store.put(torch.zeros(10_000))  # 40 000 bytes -> 40 960 on disk
        with pytest.raises(TierCapacityError) as info:
            store.put(torch.zeros(10_000))
        assert info.value.used_bytes == 40_960 and info.value.capacity_bytes == 64 << 10
        assert len(os.listdir(store.run_dir)) == 2 and store.used_bytes == 40_960  # .lock and the first file
        store.free(h)
        store.put(torch.zeros(10_000))


@pytest.mark.parametrize("checksum", [False, True], ids=["plain", "crc"])
def test_truncated_file_raises_instead_of_returning_data(
    tmp_path: Path, io_engine: str, checksum: bool
) -> None:
    with nvme(tmp_path, io_engine, checksum=checksum) as store:
        t = random_tensor(100_003, torch.float32)
        h = store.put(t)
        store.synchronize()
        path = store.file_path(h)
        os.truncate(path, 150_000)  # mid-chunk, unaligned
        with pytest.raises(TierCorruptionError) as info:
            store.get(h)
        assert info.value.path == path and info.value.errno == errno.EIO and "truncated" in str(info.value)
        store.prefetch(h)
        with pytest.raises(TierCorruptionError):
            store.get(h, out=torch.empty_like(t))


def test_corrupted_block_fails_the_crc(tmp_path: Path, io_engine: str) -> None:
    with nvme(tmp_path, io_engine, checksum=True) as store:
        t = random_tensor(100_003, torch.bfloat16)
        h = store.put(t)
        store.synchronize()
        with open(store.file_path(h), "r+b") as f:  # flip one byte inside the third chunk
            f.seek(2 * CHUNK + 123)
            byte = f.read(1)
            f.seek(2 * CHUNK + 123)
            f.write(bytes([byte[0] ^ 0xFF]))
        with pytest.raises(TierCorruptionError, match="CRC32 mismatch in block 2"):
            store.get(h)
        with pytest.raises(TierCorruptionError, match="CRC32"):
            store.get(h, out=torch.empty_like(t))


class FailingWrites(PosixEngine):
    """Fault injection: the disk answers EIO to the ``fail_at``-th write request (no other way to get EIO)."""

    def __init__(self, inner: PosixEngine, fail_at: int) -> None:
        super().__init__(direct=inner.direct)
        self.calls = 0
        self.fail_at = fail_at

    def write(self, path: str, buffer: torch.Tensor, file_offset: int) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise io_error("write", path, buffer.numel(), errno.EIO, f"at file offset {file_offset}")
        super().write(path, buffer, file_offset)


def test_background_write_error_surfaces_within_the_step(tmp_path: Path) -> None:
    with nvme(tmp_path, "posix", io_threads=1) as store:
        store._engine = FailingWrites(store._engine, fail_at=3)  # type: ignore[arg-type]
        good = store.put(torch.ones(CHUNK // 4))  # write 1
        bad = store.put(torch.arange(3 * CHUNK // 4, dtype=torch.float32))  # writes 2..4: #3 fails
        with pytest.raises(TierIOError) as info:
            store.synchronize()  # the step's end: the deferred error is raised here
        assert info.value.errno == errno.EIO and info.value.path == store.file_path(bad)
        assert not os.path.exists(store.file_path(bad))  # nothing half-written stays on disk
        with pytest.raises(TierIOError):
            store.get(bad)  # nothing half-written is ever returned
        with pytest.raises(TierIOError):
            store.get(bad, out=torch.empty(3 * CHUNK // 4))
        assert torch.equal(store.get(good), torch.ones(CHUNK // 4))
        store.free(bad)
        store.synchronize()  # the error was reported once; the store goes on
        assert torch.equal(store.get(store.put(torch.full((10,), 7.0))), torch.full((10,), 7.0))


def test_free_while_writes_are_in_flight(tmp_path: Path, io_engine: str) -> None:
    with nvme(tmp_path, io_engine) as store:
        for _ in range(4):
            h = store.put(torch.randn(300_000))
            store.free(h)  # waits for its writes, then removes the file
        assert os.listdir(store.run_dir) == [".lock"] and store.used_bytes == 0
        with pytest.raises(InvalidHandleError):
            store.get(h)


def test_files_removed_on_exception(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), nvme(tmp_path, "posix") as store:
        store.put(torch.ones(100_000))
        run_dir = store.run_dir
        raise RuntimeError("boom")
    assert not os.path.exists(run_dir) and os.listdir(tmp_path) == []


def test_stats(tmp_path: Path, io_engine: str) -> None:
    with nvme(tmp_path, io_engine) as store:
        h = store.put(torch.ones(100_000))
        store.get(h)
        s = store.stats
        assert s.bytes_written == 400_000 and s.bytes_read == 400_000 and s.puts == 1 and s.gets == 1
        assert s.write_seconds > 0 and s.read_seconds > 0 and s.read_gbps > 0


def test_settings_are_validated(tmp_path: Path) -> None:
    for field, value in [
        ("chunk_bytes", 1000),
        ("staging_slots", 0),
        ("io_threads", 0),
        ("io_engine", "spdk"),
    ]:
        with pytest.raises(TierValueError, match=field):
            NvmeTier(path=tmp_path, **{field: value})  # type: ignore[arg-type]


def test_thousand_cycles_leak_nothing(tmp_path: Path, io_engine: str, tmpfs) -> None:  # type: ignore[no-untyped-def]
    """1,000 put/get/free cycles: no descriptors on deleted files, resident memory flat, disk space back."""
    root = tmpfs(64 << 20) if os.geteuid() == 0 else tmp_path
    free_before = os.statvfs(root).f_bfree
    proc = psutil.Process()
    with nvme(root, io_engine, checksum=True) as store:
        src = random_tensor(100_000, torch.int8)
        out = torch.empty_like(src)
        for i in range(50):  # warm-up: staging, thread pools, allocator caches
            store.free(store.put(src[: 1 + i]))
        gc.collect()
        rss_before = proc.memory_info().rss
        for i in range(1000):
            n = 1 + (i * 7919) % src.numel()
            h = store.put(src[:n])
            got = store.get(h) if i % 2 else store.get(h, out=out[:n])
            if not torch.equal(got, src[:n]):
                raise AssertionError(f"cycle {i}: data mismatch")
            store.free(h)
        del got
        gc.collect()
        growth = proc.memory_info().rss - rss_before
        assert growth < 16 << 20, f"resident memory grew by {growth} bytes"
        assert fds_on_deleted_files(root) == []
        assert [p for p in open_fds_under(store.run_dir) if not p.endswith(".lock")] == []
        assert os.listdir(store.run_dir) == [".lock"]
        if root != tmp_path:  # a private tmpfs: nobody else writes there, so the count is exact
            assert os.statvfs(root).f_bfree == free_before - 1  # the lock file's one block
    assert os.listdir(root) == []
    if root != tmp_path:
        assert os.statvfs(root).f_bfree == free_before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_trip(tmp_path: Path, io_engine: str) -> None:
    with nvme(tmp_path, io_engine) as store:
        t = torch.randn(100_001, device="cuda")
        h = store.put(t)
        t.zero_()
        got = store.get(h)
        assert got.device.type == "cuda" and torch.equal(got, store.get(h, out=torch.empty_like(got)))


# ---------------------------------------------------------------------------------------- stale build lock
_STALE_LOCK_SCRIPT = """
import sys
from offload.tiers import NvmeTier, TierUnavailableError
try:
    NvmeTier(path=sys.argv[1], io_engine="aio", build_aio=True)
except TierUnavailableError as exc:
    print(exc)
    raise SystemExit(0)
raise SystemExit("the NVMe tier started although the op could not load")
"""


@pytest.mark.parametrize("held", [False, True], ids=["stale", "held-past-the-wait"])
def test_build_lock_is_named_not_waited_on_forever(tmp_path: Path, held: bool) -> None:
    """An interrupted JIT build leaves `<build dir>/lock`; torch's builder polls it with no time limit. The tier
    names the lock (stale: at once; held by a live process: after MEMTIER_OP_BUILD_WAIT_S) instead of hanging."""
    import subprocess
    import sys
    import time

    from offload.tiers.engines import _AIO

    ext = tmp_path / "torch_extensions"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext), "MEMTIER_OP_BUILD_WAIT_S": "3"}
    # the op's build directory under this TORCH_EXTENSIONS_DIR, as torch computes it
    build_dir = Path(
        subprocess.run(
            [sys.executable, "-c", "from offload.tiers.engines import _AIO; print(_AIO.build_dir())"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()[-1]  # DeepSpeed logs to stdout first
    )
    assert build_dir.is_relative_to(ext), build_dir
    build_dir.mkdir(parents=True, exist_ok=True)
    lock = build_dir / "lock"
    holder = None
    if held:  # a live "builder": a process with the lock file open
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"import os, time; fd = os.open({str(lock)!r}, os.O_CREAT); time.sleep(120)",
            ]
        )
        for _ in range(100):
            if lock.exists():
                break
            time.sleep(0.05)
    else:
        lock.touch()
    (tmp_path / "disk").mkdir()
    try:
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-c", _STALE_LOCK_SCRIPT, str(tmp_path / "disk")],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        elapsed = time.monotonic() - started
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert str(lock) in proc.stdout and f"rm {lock}" in proc.stdout
    assert ("stale" in proc.stdout) != held and ("pid" in proc.stdout) == held
    assert elapsed < 100  # bounded: not the builder's endless wait
    assert lock.exists()  # named, not removed behind the user's back
    assert _AIO.label == "async_io"


def test_checksums_are_on_by_default(tmp_path: Path) -> None:
    """A flipped bit in a swap file is an error, not data, without anyone asking for checksums: the store's
    default and the plan's (TierPlan.checksum) are on; off is an explicit choice."""
    from planner.plan import TierPlan

    assert TierPlan(kind="nvme", capacity_bytes=1 << 20).checksum
    with NvmeTier(path=tmp_path, chunk_bytes=CHUNK, staging_slots=2, build_aio=False) as store:
        t = random_tensor(3 * CHUNK // 4, torch.float32)
        h = store.put(t)
        store.synchronize()
        with open(store.file_path(h), "r+b") as f:
            f.seek(1000)
            byte = f.read(1)
            f.seek(1000)
            f.write(bytes([byte[0] ^ 0x01]))  # one bit
        with pytest.raises(TierCorruptionError, match="CRC32"):
            store.get(h)
