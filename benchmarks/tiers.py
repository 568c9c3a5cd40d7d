"""Tier-store bandwidth: does the NVMe tier sustain >= 85% of `dd` with direct I/O on the same path, and what
does the host arena cost against a plain ``copy_``?

NVMe: for each transfer size S, ``dd`` writes N blocks of S bytes with ``oflag=direct`` from a random source
file in /dev/shm and reads them back with ``iflag=direct``; the tier stores N tensors of S bytes from the same
random bytes (``put`` x N, then ``synchronize``) and reads them back into a ring of reused aligned buffers
(``prefetch(h, out=buf)`` ``--prefetch-depth`` tensors ahead, then ``get(h, out=buf)``), for each I/O engine.
Every measurement is repeated with the methods interleaved; the medians of the GB/s and of the per-repeat
tier/dd ratios are reported, so disk noise (other jobs on the machine) hits all methods alike.

Host: ``put`` (copy into the arena) and ``get(out=...)`` (copy out) against ``dst.copy_(src)`` of the same size.

    python -m benchmarks.tiers --quick            # about a minute
    python -m benchmarks.tiers --path /mnt/nvme   # the drive the plan's NVMe tier uses
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from offload.tiers import HostTier, NvmeTier, aio_status
from offload.tiers.engines import aligned_empty

MiB = 1 << 20
GB = 1e9
RESULTS = Path(__file__).resolve().parent / "results"
ENGINES = ("aio", "posix")  # registry of NVMe I/O engines measured
TARGET_RATIO = 0.85  # issue 6: sustained tier bandwidth >= 85% of dd with direct I/O


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    path: str
    sizes_mib: tuple[int, ...]
    total_mib: int
    repeats: int
    engines: tuple[str, ...]
    chunk_mib: int
    staging_slots: int
    io_threads: int
    checksum: bool
    prefetch_depth: int
    host_sizes_mib: tuple[int, ...]
    host_mib: int
    threads: int
    quick: bool


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--path", default=str(RESULTS / "tmp"), help="directory on the drive to measure")
    p.add_argument("--sizes-mib", type=int, nargs="+", default=None, help="transfer sizes (MiB)")
    p.add_argument("--total-mib", type=int, default=None, help="bytes per measurement (MiB)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    p.add_argument("--chunk-mib", type=int, default=4, help="NVMe tier chunk_bytes (MiB)")
    p.add_argument("--staging-slots", type=int, default=8)
    p.add_argument("--io-threads", type=int, default=4)
    p.add_argument(
        "--no-checksum", action="store_true", help="the per-chunk CRC32 off (memtier's default is on)"
    )
    p.add_argument(
        "--prefetch-depth", type=int, default=2, help="tensors prefetched ahead while reading back"
    )
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (for copy_ and the arena)")
    p.add_argument("--quick", action="store_true", help="fewer sizes and bytes: about a minute")
    a = p.parse_args(argv)
    quick = a.quick
    return Config(
        path=a.path,
        sizes_mib=tuple(a.sizes_mib or ((1, 8, 64) if quick else (1, 4, 16, 64))),
        total_mib=a.total_mib or (384 if quick else 1024),
        repeats=a.repeats or (3 if quick else 5),
        engines=tuple(a.engines),
        chunk_mib=a.chunk_mib,
        staging_slots=a.staging_slots,
        io_threads=a.io_threads,
        checksum=not a.no_checksum,
        prefetch_depth=max(1, a.prefetch_depth),
        host_sizes_mib=(1, 16, 64) if quick else (1, 4, 16, 64, 256),
        host_mib=256 if quick else 1024,
        threads=a.threads,
        quick=quick,
    )


# ------------------------------------------------------------------------------------------------------ dd


def _dd_seconds(stderr: str) -> float:
    # GNU dd: "536870912 bytes (537 MB, 512 MiB) copied, 0.63996 s, 839 MB/s"
    m = re.search(r"copied, ([0-9.]+) s", stderr)
    if m is None:
        raise RuntimeError(f"cannot parse dd output: {stderr!r}")
    return float(m.group(1))


def dd_write(src: Path, dst: Path, size: int, count: int) -> float:
    proc = subprocess.run(
        ["dd", f"if={src}", f"of={dst}", f"bs={size}", f"count={count}", "oflag=direct"],
        capture_output=True,
        text=True,
        check=True,
    )
    return size * count / _dd_seconds(proc.stderr) / GB


def dd_read(src: Path, size: int, count: int) -> float:
    proc = subprocess.run(
        ["dd", f"if={src}", "of=/dev/null", f"bs={size}", f"count={count}", "iflag=direct"],
        capture_output=True,
        text=True,
        check=True,
    )
    return size * count / _dd_seconds(proc.stderr) / GB


# ------------------------------------------------------------------------------------------------------ tier


def tier_round(
    cfg: Config, engine: str, source: torch.Tensor, size: int, count: int, *, checksum: bool | None = None
) -> tuple[float, float, dict]:
    """(write GB/s, read GB/s, stats) of one put-all / get-all round through an NVMe tier."""
    with NvmeTier(
        path=cfg.path,
        capacity_bytes=size * count + 16 * MiB,
        chunk_bytes=cfg.chunk_mib * MiB,
        staging_slots=cfg.staging_slots,
        io_engine=engine,  # type: ignore[arg-type]
        io_threads=cfg.io_threads,
        checksum=cfg.checksum if checksum is None else checksum,
        build_aio=False,
    ) as store:
        if store.io_engine != engine:
            raise RuntimeError(f"asked for {engine}, got {store.io_engine}")
        blocks = [source[i * size : (i + 1) * size] for i in range(count)]
        start = time.perf_counter()
        handles = [store.put(b) for b in blocks]
        store.synchronize()
        write_gbps = size * count / (time.perf_counter() - start) / GB

        depth = cfg.prefetch_depth
        ring = [aligned_empty(size) for _ in range(depth + 1)]  # reused, like dd's buffer
        start = time.perf_counter()
        for i in range(min(depth, count)):
            store.prefetch(handles[i], out=ring[i % len(ring)])
        for i, h in enumerate(handles):
            if i + depth < count:  # `depth` tensors ahead: their reads run while this one is consumed
                store.prefetch(handles[i + depth], out=ring[(i + depth) % len(ring)])
            store.get(h, out=ring[i % len(ring)])
        read_gbps = size * count / (time.perf_counter() - start) / GB
        if not torch.equal(ring[(count - 1) % len(ring)], blocks[-1]):
            raise RuntimeError("read-back mismatch")
        return write_gbps, read_gbps, store.stats.to_dict()


# ------------------------------------------------------------------------------------------------------ host


def host_round(size: int, nbytes: int, repeats: int) -> dict[str, float]:
    """Median GB/s of plain ``copy_``, arena ``put`` and arena ``get(out=)``, interleaved per repeat."""
    iters = max(4, nbytes // size)
    src = torch.randint(0, 256, (size,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    samples: dict[str, list[float]] = {
        "copy_gbps": [],
        "put_gbps": [],
        "get_gbps": [],
        "put_ratio": [],
        "get_ratio": [],
    }
    with HostTier(capacity_bytes=size + MiB, prefault=True) as store:
        store.free(store.put(src))  # warm
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(iters):
                dst.copy_(src)
            copy_s = time.perf_counter() - start
            put_s = get_s = 0.0
            for _ in range(iters):
                t0 = time.perf_counter()
                h = store.put(src)
                t1 = time.perf_counter()
                store.get(h, out=dst)
                t2 = time.perf_counter()
                store.free(h)
                put_s += t1 - t0
                get_s += t2 - t1
            for key, seconds in (("copy_gbps", copy_s), ("put_gbps", put_s), ("get_gbps", get_s)):
                samples[key].append(size * iters / seconds / GB)
            samples["put_ratio"].append(copy_s / put_s)
            samples["get_ratio"].append(copy_s / get_s)
        if not torch.equal(dst, src):
            raise RuntimeError("host tier mismatch")
    return {key: statistics.median(values) for key, values in samples.items()}


# ------------------------------------------------------------------------------------------------------ main


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "deepspeed": _version("deepspeed"),
        "cuda": torch.cuda.is_available(),
    }


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001
        return None


def _filesystem(path: str) -> dict[str, str]:
    best = ("", "", "")
    real = os.path.realpath(path)
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best[1]):
                best = (dev, mnt, fstype)
    return {"device": best[0], "mount": best[1], "fstype": best[2]}


def checksum_overhead(cfg: Config, engines: list[str], source: torch.Tensor) -> list[dict[str, Any]]:
    """What the per-chunk CRC32 (on by default) costs: the same rounds with it on and off, alternating so
    both see the same disk conditions; the median of the per-pair ratios (on / off throughput)."""
    out = []
    for engine in engines:
        for size_mib in (max(cfg.sizes_mib),):
            size = size_mib * MiB
            count = source.numel() // size
            pairs = []
            for _ in range(cfg.repeats):
                on = tier_round(cfg, engine, source, size, count, checksum=True)
                off = tier_round(cfg, engine, source, size, count, checksum=False)
                pairs.append((on[0] / off[0], on[1] / off[1]))
            row = {
                "engine": engine,
                "size_mib": size_mib,
                "write_ratio": statistics.median(p[0] for p in pairs),
                "read_ratio": statistics.median(p[1] for p in pairs),
                "pairs": pairs,
            }
            out.append(row)
            print(
                f"[tiers] CRC32 on vs off, {engine} {size_mib} MiB: write {row['write_ratio']:.3f}x, "
                f"read {row['read_ratio']:.3f}x",
                flush=True,
            )
    return out


def run(cfg: Config) -> dict[str, Any]:
    torch.set_num_threads(cfg.threads)
    Path(cfg.path).mkdir(parents=True, exist_ok=True)
    engines = []
    for engine in cfg.engines:
        ok, why = aio_status(build=True) if engine == "aio" else (True, "")
        if ok:
            engines.append(engine)
        else:
            print(f"[tiers] skipping engine {engine}: {why}", flush=True)
    total = cfg.total_mib * MiB
    source = torch.randint(0, 256, (total,), dtype=torch.uint8)
    shm = Path(
        tempfile.mkdtemp(prefix="memtier-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    )
    src_file = shm / "source.bin"
    source.numpy().tofile(src_file)  # dd writes the same random bytes the tier writes
    dd_file = Path(cfg.path) / f"dd-{os.getpid()}.bin"
    rows: list[dict[str, Any]] = []
    try:
        for size_mib in cfg.sizes_mib:
            size = size_mib * MiB
            count = total // size
            for rep in range(cfg.repeats):
                row: dict[str, Any] = {"size_mib": size_mib, "repeat": rep}
                row["dd_write_gbps"] = dd_write(src_file, dd_file, size, count)
                row["dd_read_gbps"] = dd_read(dd_file, size, count)
                dd_file.unlink()
                for engine in engines:
                    w, r, stats = tier_round(cfg, engine, source, size, count)
                    row[f"{engine}_write_gbps"] = w
                    row[f"{engine}_read_gbps"] = r
                    row[f"{engine}_stats"] = stats
                rows.append(row)
                print(
                    f"[tiers] {size_mib:>4} MiB rep {rep}: dd w/r {row['dd_write_gbps']:.2f}/{row['dd_read_gbps']:.2f}"
                    + "".join(
                        f"  {e} w/r {row[f'{e}_write_gbps']:.2f}/{row[f'{e}_read_gbps']:.2f}" for e in engines
                    )
                    + " GB/s",
                    flush=True,
                )
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        dd_file.unlink(missing_ok=True)

    summary: list[dict[str, Any]] = []
    for size_mib in cfg.sizes_mib:
        sel = [r for r in rows if r["size_mib"] == size_mib]
        entry: dict[str, Any] = {"size_mib": size_mib}
        for key in ["dd_write_gbps", "dd_read_gbps"] + [
            f"{e}_{d}_gbps" for e in engines for d in ("write", "read")
        ]:
            entry[key] = statistics.median(r[key] for r in sel)
        for e in engines:
            for d in ("write", "read"):
                # per-repeat ratio (same disk conditions), then the median
                entry[f"{e}_{d}_ratio"] = statistics.median(
                    r[f"{e}_{d}_gbps"] / r[f"dd_{d}_gbps"] for r in sel
                )
        summary.append(entry)

    host = []
    for size_mib in cfg.host_sizes_mib:
        h: dict[str, Any] = host_round(size_mib * MiB, cfg.host_mib * MiB, cfg.repeats)
        h["size_mib"] = size_mib
        host.append(h)
        print(
            f"[tiers] host {size_mib:>4} MiB: copy_ {h['copy_gbps']:.2f}  put {h['put_gbps']:.2f}  "
            f"get {h['get_gbps']:.2f} GB/s (put/get vs copy_: {h['put_ratio']:.2f}/{h['get_ratio']:.2f})",
            flush=True,
        )

    crc = checksum_overhead(cfg, engines, source)
    verdict = {
        e: {d: all(s[f"{e}_{d}_ratio"] >= TARGET_RATIO for s in summary) for d in ("write", "read")}
        for e in engines
    }
    return {
        "benchmark": "tiers",
        "question": "NVMe tier sustained bandwidth vs dd (direct I/O, same path); host arena vs copy_",
        "config": dataclasses.asdict(cfg),
        "machine": machine(),
        "filesystem": _filesystem(cfg.path),
        "engines": engines,
        "target_ratio": TARGET_RATIO,
        "nvme": summary,
        "nvme_rows": rows,
        "host": host,
        "checksum_overhead": crc,
        "meets_target": verdict,
    }


def plot(result: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 4.8))
    summary = result["nvme"]
    engines = result["engines"]
    sizes = [s["size_mib"] for s in summary]
    xs = list(range(len(sizes)))
    series = [("dd", "dd (direct)")] + [(e, f"tier: {e}") for e in engines]
    width = 0.8 / (2 * len(series))
    for i, (key, label) in enumerate(series):
        for j, d in enumerate(("write", "read")):
            off = (2 * i + j - len(series) + 0.5) * width
            ax1.bar(
                [x + off for x in xs],
                [s[f"{key}_{d}_gbps"] for s in summary],
                width,
                label=f"{label} {d}",
                hatch="" if d == "write" else "//",
                color=f"C{i}",
                alpha=1.0 if d == "write" else 0.6,
            )
    ax1.set_xticks(xs, [f"{s} MiB" for s in sizes])
    ax1.set_ylabel("GB/s (median of repeats)")
    fs = result["filesystem"]
    ax1.set_title(f"NVMe tier vs dd, {fs['device']} ({fs['fstype']})")
    ax1.legend(fontsize=7, ncol=2)

    for i, e in enumerate(engines):
        for d, marker in (("write", "o"), ("read", "s")):
            ax2.plot(xs, [s[f"{e}_{d}_ratio"] for s in summary], marker=marker, color=f"C{i + 1}", label=f"{e} {d}",
                     linestyle="-" if d == "write" else "--")  # fmt: skip
    ax2.axhline(TARGET_RATIO, color="k", linewidth=1, linestyle=":", label=f"target {TARGET_RATIO}")
    ax2.set_xticks(xs, [f"{s} MiB" for s in sizes])
    ax2.set_ylabel("tier / dd (median of per-repeat ratios)")
    ax2.set_title("NVMe tier bandwidth relative to dd")
    ax2.legend(fontsize=8)

    host = result["host"]
    hs = [h["size_mib"] for h in host]
    for key, label in (
        ("copy_gbps", "plain copy_"),
        ("put_gbps", "arena put"),
        ("get_gbps", "arena get(out=)"),
    ):
        ax3.plot(hs, [h[key] for h in host], marker="o", label=label)
    ax3.set_xscale("log", base=2)
    ax3.set_xlabel("tensor size (MiB)")
    ax3.set_ylabel("GB/s (median)")
    ax3.set_title(f"host arena copy bandwidth ({result['config']['threads']} torch thread(s))")
    ax3.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    result = run(cfg)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "tiers_quick" if cfg.quick else "tiers"
    json_path = RESULTS / f"{stem}.json"
    json_path.write_text(json.dumps(result, indent=2))
    plot(result, RESULTS / f"{stem}.png")
    print(f"[tiers] wrote {json_path} and {stem}.png; meets target: {result['meets_target']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
