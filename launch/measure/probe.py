"""`memtier probe`: measure this machine and describe it as a ClusterSpec.

Measures cores and DRAM (psutil), achieved GEMM FLOP/s per dtype, memory copy
bandwidth, CPU AdamW update rate, disk read/write bandwidth at a path (direct I/O
where the filesystem allows), NUMA nodes (a CPU-less node is how CXL memory
appears) and GPUs when present.
"""

from __future__ import annotations

import dataclasses
import glob
import mmap
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

from planner.cluster import ClusterSpec, CpuSpec, DeviceSpec, Link, Links, TierSpec
from planner.errors import SpecError

CACHE_PATH = os.path.join(os.path.expanduser("~"), ".cache", "memtier", "local.yaml")


@dataclass(frozen=True)
class ProbeResult:
    cores: int
    dram_bytes: int
    gemm_flops: dict[str, float]
    block_efficiency: float
    block_overhead_s: float
    copy_bandwidth: float
    adam_params_per_s: float
    disk_path: str
    disk_free_bytes: int
    disk_write_bandwidth: float
    disk_read_bandwidth: float
    disk_direct_io: bool
    numa_nodes: tuple[dict[str, Any], ...]
    gpus: tuple[dict[str, Any], ...]
    seconds: float
    process_memory_bytes: int = 0  # RSS of a fresh process that imported torch, transformers and memtier
    transparent_huge_pages: str = "unavailable"  # the kernel's THP mode (see transparent_huge_pages())
    compile: Any = None  # launch.measure.compile_probe.CompileFactors (`memtier probe --compile`)


def _log(msg: str) -> None:
    print(f"[probe] {msg}", file=sys.stderr, flush=True)


def _best_time(fn: Callable[[], None], reps: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_gemm(dtype: str, n: int, reps: int) -> float:
    import torch

    tdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    a = torch.randn(n, n).to(tdt)
    b = torch.randn(n, n).to(tdt)
    t = _best_time(lambda: torch.mm(a, b), reps)
    return 2.0 * n**3 / t  # a GEMM of n x n by n x n is 2n^3 FLOPs


def measure_copy(nbytes: int, reps: int) -> float:
    import torch

    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    t = _best_time(lambda: dst.copy_(src), reps)
    return nbytes / t


def measure_adam(numel: int, reps: int) -> float:
    import torch

    p = torch.nn.Parameter(torch.randn(numel))
    p.grad = torch.randn(numel)
    opt = torch.optim.AdamW([p], lr=1e-3, fused=True)
    t = _best_time(opt.step, reps)
    return numel / t


# (batch, sequence) of the blocks the probe times: small to large, so the fit separates the per-block
# fixed cost from the per-FLOP rate
BLOCK_SHAPES = ((1, 256), (1, 512), (4, 512))


def llama_block(h: int, batch: int, seq: int) -> tuple[Callable[[Any], Any], Any, float, tuple[Any, ...]]:
    """A Llama-shaped block written as transformers' eager Llama layer runs it (RMSNorm in four element-wise
    ops, separate q/k/v projections, rotary embedding with rotate-half, causal SDPA, gated SiLU MLP): its
    forward (hidden states in, out; the weights are closed over and require grad), an input that requires grad,
    its training FLOPs as planner.flops counts them (3 x forward), and its weights."""
    import torch
    import torch.nn.functional as F

    f, heads = int(h * 8 / 3) // 64 * 64, max(1, h // 64)
    dh = h // heads
    g = torch.Generator().manual_seed(0)
    shapes = {
        "q": (h, h),
        "k": (h, h),
        "v": (h, h),
        "o": (h, h),
        "gate": (f, h),
        "up": (f, h),
        "down": (h, f),
    }
    w = {k: (torch.randn(*shape, generator=g) * 0.02).requires_grad_() for k, shape in shapes.items()}
    n1, n2 = torch.ones(h, requires_grad=True), torch.ones(h, requires_grad=True)
    x = torch.randn(batch, seq, h, generator=g, requires_grad=True)
    angle = torch.outer(torch.arange(seq, dtype=torch.float32), 1e-4 ** (torch.arange(0, dh, 2) / dh))
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)

    def norm(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6))

    def rope(t: torch.Tensor) -> torch.Tensor:
        half = torch.cat((-t[..., dh // 2 :], t[..., : dh // 2]), dim=-1)
        return t * cos + half * sin

    def heads_of(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, seq, heads, dh).transpose(1, 2)

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = norm(x, n1)
        q, k, v = (heads_of(F.linear(y, w[n])) for n in "qkv")
        a = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
        x2 = x + F.linear(a.transpose(1, 2).reshape(batch, seq, h), w["o"])
        y2 = norm(x2, n2)
        return x2 + F.linear(F.silu(F.linear(y2, w["gate"])) * F.linear(y2, w["up"]), w["down"])

    n_tok = batch * seq
    # planner.flops.layer_forward_flops for this shape: matmuls + QK^T and AV
    fwd = 2.0 * n_tok * (4 * h * h + 3 * h * f) + 4.0 * n_tok * seq * h
    return forward, x, 3 * fwd, (*w.values(), n1, n2)


def _block_step(h: int, batch: int, seq: int) -> tuple[Callable[[], None], float]:
    """One forward + backward of `llama_block`, and its FLOPs."""
    forward, x, flops, _ = llama_block(h, batch, seq)
    return lambda: forward(x).sum().backward(), flops


def fit_block_cost(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares fit of t = flops / rate + overhead to (flops, seconds) points: (rate, overhead).

    A negative intercept (noise) is dropped and the rate refitted through the origin."""
    n = len(points)
    mx = sum(f for f, _ in points) / n
    my = sum(t for _, t in points) / n
    sxx = sum((f - mx) ** 2 for f, _ in points)
    slope = sum((f - mx) * (t - my) for f, t in points) / sxx if sxx > 0 else 0.0
    overhead = my - slope * mx
    if slope <= 0 or overhead < 0:
        slope, overhead = sum(f * t for f, t in points) / sum(f * f for f, _ in points), 0.0
    return 1.0 / slope, overhead


def measure_block_cost(gemm_fp32: float, *, hidden: int, reps: int) -> tuple[float, float]:
    """(efficiency, seconds of fixed cost per block) of a dense transformer block's forward + backward here.

    The block mixes the GEMMs with what the GEMM peak does not see (norms, rotary, attention, SiLU,
    residual adds) and with a fixed per-operator cost that dominates small blocks; timing it at
    BLOCK_SHAPES separates the two (fit_block_cost)."""
    points = []
    for batch, seq in BLOCK_SHAPES:
        step, flops = _block_step(hidden, batch, seq)
        points.append((flops, _best_time(step, reps)))
    rate, overhead = fit_block_cost(points)
    return min(1.0, rate / gemm_fp32), overhead


def measure_disk(path: str, nbytes: int) -> tuple[float, float, bool]:
    """Sequential write then read bandwidth of one file at `path` (bytes/s), and whether O_DIRECT worked."""
    block = 1 << 20
    nbytes = max(block, nbytes // block * block)
    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT requires
    buf.write(os.urandom(block))
    fd_, name = tempfile.mkstemp(prefix=".memtier-probe-", dir=path)
    os.close(fd_)
    direct = hasattr(os, "O_DIRECT")
    try:
        try:
            fd = os.open(name, os.O_WRONLY | (os.O_DIRECT if direct else 0))
        except OSError:
            direct = False
            fd = os.open(name, os.O_WRONLY)
        t0 = time.perf_counter()
        try:
            for off in range(0, nbytes, block):
                os.pwrite(fd, buf, off)
        except OSError:
            # a filesystem that accepts the flag but refuses the I/O (tmpfs): buffered instead
            os.close(fd)
            direct = False
            fd = os.open(name, os.O_WRONLY)
            t0 = time.perf_counter()
            for off in range(0, nbytes, block):
                os.pwrite(fd, buf, off)
        os.fsync(fd)
        write_s = time.perf_counter() - t0
        os.close(fd)
        if not direct:
            # drop the page cache for this file so the read is not a memory copy
            fd = os.open(name, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        fd = os.open(name, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        t0 = time.perf_counter()
        for off in range(0, nbytes, block):
            os.preadv(fd, [buf], off)
        read_s = time.perf_counter() - t0
        os.close(fd)
    finally:
        os.unlink(name)
        buf.close()
    return nbytes / write_s, nbytes / read_s, direct


_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def transparent_huge_pages(path: str = _THP_MODE) -> str:
    """The kernel's transparent-huge-page mode: "always", "madvise", "never", or "unavailable".

    memtier's host and CXL arenas and a CPU device's parameters ask for huge pages (MADV_HUGEPAGE): they get
    them under "always" or "madvise", not under "never". The file marks the active mode in brackets.
    """
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return "unavailable"
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else "unavailable"


def numa_nodes() -> tuple[dict[str, Any], ...]:
    nodes = []
    for d in sorted(glob.glob("/sys/devices/system/node/node[0-9]*")):
        node_id = int(os.path.basename(d)[4:])
        try:
            with open(os.path.join(d, "cpulist")) as fh:
                cpus = fh.read().strip()
            with open(os.path.join(d, "meminfo")) as fh:
                total_kb = next(int(line.split()[-2]) for line in fh if "MemTotal" in line)
        except (OSError, StopIteration, ValueError):
            continue
        nodes.append({"node": node_id, "cpus": cpus, "memory_bytes": total_kb * 1024, "cpu_less": cpus == ""})
    return tuple(nodes)


def gpus() -> tuple[dict[str, Any], ...]:
    import torch

    if not torch.cuda.is_available():
        return ()
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": props.name, "memory_bytes": props.total_memory})
    return tuple(out)


def probe(*, disk: str | None = None, quick: bool = False) -> ProbeResult:
    import torch

    t_start = time.perf_counter()
    disk = disk or tempfile.gettempdir()
    if not os.path.isdir(disk):
        raise SpecError("not a directory", field="--disk", source=disk)
    if not os.access(disk, os.W_OK):
        raise SpecError("directory is not writable", field="--disk", source=disk)
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    dram = psutil.virtual_memory().total
    _log(
        f"{cores} cores, {dram / 2**30:.1f} GiB DRAM, torch {torch.__version__} with {torch.get_num_threads()} threads"
    )
    n, reps = (1024, 6) if quick else (2048, 8)
    # a few hundred ms of GEMMs first: a core that was idle runs its first ones at a lower clock
    warm_until = time.perf_counter() + 0.3
    a = torch.randn(n, n)
    while time.perf_counter() < warm_until:
        torch.mm(a, a)
    gemm: dict[str, float] = {}
    for dt in ("fp32", "bf16"):
        gemm[dt] = measure_gemm(dt, n, reps)
        _log(f"GEMM {dt} {n}x{n}: {gemm[dt] / 1e9:.1f} GFLOP/s")
    copy_bw = measure_copy((128 if quick else 512) << 20, reps)
    _log(f"memory copy: {copy_bw / 1e9:.1f} GB/s")
    efficiency, overhead = measure_block_cost(gemm["fp32"], hidden=512, reps=reps)
    _log(
        f"transformer block fwd+bwd: {100 * efficiency:.0f}% of the fp32 GEMM peak "
        f"+ {1e3 * overhead:.2f} ms fixed per block"
    )
    adam = measure_adam((4 if quick else 16) << 20, reps)
    _log(f"fused AdamW on CPU: {adam / 1e9:.2f} G params/s")
    free = shutil.disk_usage(disk).free
    wbw, rbw, direct = measure_disk(disk, (128 if quick else 1024) << 20)
    _log(
        f"disk at {disk}: write {wbw / 1e9:.2f} GB/s, read {rbw / 1e9:.2f} GB/s ({'direct' if direct else 'buffered'} I/O)"
    )
    nodes = numa_nodes()
    cxl = [nd for nd in nodes if nd["cpu_less"]]
    _log(f"NUMA nodes: {len(nodes)}, CPU-less (CXL): {len(cxl)}")
    gpu = gpus()
    _log(f"GPUs: {len(gpu)}" + "".join(f"\n[probe]   {g['index']}: {g['name']}" for g in gpu))
    process = measure_process_memory()
    _log(f"a training process before its model: {process / 2**20:.0f} MiB RSS (torch, transformers, memtier)")
    thp = transparent_huge_pages()
    _log(
        f"transparent huge pages: {thp}"
        + (
            " (memtier's arenas ask for them)"
            if thp in ("always", "madvise")
            else f" (memtier's arenas use 4 KiB pages; 'echo madvise > {_THP_MODE}' as root enables them)"
        )
    )
    return ProbeResult(
        cores=cores,
        dram_bytes=dram,
        gemm_flops=gemm,
        block_efficiency=efficiency,
        block_overhead_s=overhead,
        copy_bandwidth=copy_bw,
        adam_params_per_s=adam,
        disk_path=os.path.abspath(disk),
        disk_free_bytes=free,
        disk_write_bandwidth=wbw,
        disk_read_bandwidth=rbw,
        disk_direct_io=direct,
        numa_nodes=nodes,
        gpus=gpu,
        seconds=time.perf_counter() - t_start,
        process_memory_bytes=process,
        transparent_huge_pages=thp,
    )


_PROCESS_PROBE = (
    "import torch, transformers.modeling_utils, offload.state, planner, launch.train\n"
    "print(next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmRSS:')))"
)


def measure_process_memory() -> int:
    """RSS of a fresh Python process once it has imported what a training process imports -- torch,
    transformers' modeling code, memtier's runtime and trainer -- (0 if it fails)."""
    import subprocess
    import sys

    try:
        out = subprocess.run(
            [sys.executable, "-c", _PROCESS_PROBE], capture_output=True, text=True, timeout=120, check=True
        )
        return int(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return 0


def to_cluster(res: ProbeResult) -> ClusterSpec:
    host = [
        TierSpec(
            kind="dram",
            capacity=res.dram_bytes,
            read_bandwidth=res.copy_bandwidth,
            write_bandwidth=res.copy_bandwidth,
            latency=1e-7,
        ),
        TierSpec(
            kind="nvme",
            capacity=res.disk_free_bytes,
            read_bandwidth=res.disk_read_bandwidth,
            write_bandwidth=res.disk_write_bandwidth,
            latency=1e-4,
            path=res.disk_path,  # the tier makes its private run directory under it
        ),
    ]
    for nd in res.numa_nodes:
        if nd["cpu_less"]:
            host.append(
                TierSpec(
                    kind="cxl",
                    capacity=nd["memory_bytes"],
                    read_bandwidth=res.copy_bandwidth / 2,
                    write_bandwidth=res.copy_bandwidth / 2,
                    latency=3e-7,
                    numa_node=nd["node"],
                )
            )
    if res.gpus:
        dev = DeviceSpec(
            kind=str(res.gpus[0]["name"]),
            memory=int(res.gpus[0]["memory_bytes"]),
            peak_flops=dict(res.gemm_flops),
            efficiency=0.5,
        )
        per_node = len(res.gpus)
    else:
        # no accelerator: the device is the CPU; its pool is the live tensors of the step
        dev = DeviceSpec(
            kind="cpu",
            memory=res.dram_bytes,
            peak_flops=dict(res.gemm_flops),
            efficiency=round(res.block_efficiency, 4),
            block_overhead=res.block_overhead_s,
            host_link=Link(bandwidth=res.copy_bandwidth, latency=1e-7),
            memory_bandwidth=res.copy_bandwidth,
        )
        per_node = 1
    if res.compile is not None and not res.gpus:  # (measured on the CPU: it describes a CPU device only)
        dev = dataclasses.replace(
            dev,
            compile_backend=res.compile.backend,
            compile_saved_ratio=round(res.compile.saved_ratio, 4),
            compile_time_ratio=round(res.compile.time_ratio, 4),
            compile_budgets=res.compile.at_budgets,
        )
    return ClusterSpec(
        name="local",
        nodes=1,
        devices_per_node=per_node,
        device=dev,
        links=Links(
            intra_node=Link(bandwidth=res.copy_bandwidth, latency=1e-6),
            inter_node=Link(bandwidth=1.25e9, latency=5e-5),
        ),
        host=tuple(host),
        cpu=CpuSpec(
            cores=res.cores,
            peak_flops=res.gemm_flops["fp32"],
            adam_params_per_s=res.adam_params_per_s,
            process_memory=res.process_memory_bytes,
        ),
    )


def local_cluster(*, refresh: bool = False) -> ClusterSpec:
    """This machine: the cached probe result, or a quick probe written to the cache."""
    from planner.cluster import cluster_to_yaml, load_cluster
    from planner.schema import atomic_write_text

    if not refresh and os.path.exists(CACHE_PATH):
        try:
            return load_cluster(CACHE_PATH)
        except SpecError:
            pass  # a stale cache from an older memtier: probe again
    cluster = to_cluster(probe(quick=True))
    atomic_write_text(CACHE_PATH, cluster_to_yaml(cluster))
    return cluster


def with_efficiency(cluster: ClusterSpec, efficiency: float) -> ClusterSpec:
    return dataclasses.replace(cluster, device=dataclasses.replace(cluster.device, efficiency=efficiency))
