"""`memtier probe --links`: measure every link of a job and write them into the cluster YAML.

Runs as a torchrun job, one rank per device (`--nproc-per-node` on one machine; across machines the usual
`--nnodes/--node-rank/--rdzv-endpoint`), NCCL on GPUs and gloo on CPUs. Every rank takes part in:

1. latency and bandwidth of every pair of ranks *alone* (mpiGraph, LLNL, measures each pair in turn the
   same way): latency = half the median round trip of a 4-byte ping-pong; bandwidth = bytes / seconds of
   `reps` messages of `message_bytes` one way, each answered by a 4-byte ack, both directions, averaged.
   Alpha-beta model (Hockney 1994): t(m) = alpha + m / beta, so with m >> alpha * beta the message time
   measures 1 / beta.
2. the same bandwidth for every pair *in parallel rounds* of a round-robin pairing (the circle method:
   every rank is in one pair per round, all pairs of a round at once), so links that share an uplink or
   a NIC show the bandwidth they get when the whole job talks, as a collective's ring does.
3. all-reduce bandwidth per group size (the first g ranks, g = 2, 4, ... and the world): nccl-tests'
   algbw = bytes / seconds and busbw = algbw * 2(g-1)/g (nccl-tests doc/PERFORMANCE.md, ring all-reduce).

Rank 0 writes the cluster YAML that `memtier plan` reads (`planner.cluster`): the base cluster's devices
and host tiers, `nodes` and `devices_per_node` of the job, intra/inter-node defaults (the median measured
pair), one override per node pair with its measured bandwidth and latency (the whole matrix, so
`ClusterSpec.bandwidth_matrix` is the measured one), and a device-pair override where a device pair
differs from its node pair by more than `--tolerance`. Beside it: `<out>.links.json` (every number) and
the heatmap `<out>.links.png`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import socket
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

if __name__ == "__main__":  # run by torchrun as a plain script from a source checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from planner.cluster import ClusterSpec, Link, LinkOverride, Links

LATENCY_ITERS = 20  # ping-pong round trips per pair (the median is kept)
ACK_ELEMS = 1  # the 4-byte message that closes a timed send


@dataclass(frozen=True, kw_only=True)
class LinkMeasurement:
    """What the job measured; square matrices over global ranks (0 on the diagonal)."""

    world_size: int
    devices_per_node: int
    backend: str
    message_bytes: int
    reps: int
    alone_bandwidth: list[list[float]]  # bytes/s one way, each pair measured by itself
    parallel_bandwidth: list[list[float]]  # bytes/s one way, all pairs of a round-robin round at once
    latency: list[list[float]]  # seconds, one way (half the round trip)
    allreduce: list[dict[str, float]]  # per group size: ranks, bytes, seconds, algbw, busbw
    seconds: float
    # per rank: host name and torchrun's --local-addr; torchrun's c10d rendezvous numbers the nodes in the
    # order of these addresses, not by --node-rank, so this is what names "nK" in the YAML
    hosts: list[list[str]] = dataclasses.field(default_factory=list)

    @property
    def nodes(self) -> int:
        return self.world_size // self.devices_per_node

    def link_bandwidth(self) -> list[list[float]]:
        """The bandwidth a link is given: what it sustains while every rank talks (the parallel rounds)."""
        return self.parallel_bandwidth

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------- schedules
def round_robin_rounds(world: int) -> list[list[tuple[int, int]]]:
    """Every pair of ranks exactly once, each rank in at most one pair per round (circle method)."""
    ranks: list[int | None] = list(range(world)) + ([None] if world % 2 else [])
    n = len(ranks)
    rounds = []
    for _ in range(n - 1):
        pairs = []
        for k in range(n // 2):
            a, b = ranks[k], ranks[n - 1 - k]
            if a is not None and b is not None:
                pairs.append((min(a, b), max(a, b)))
        rounds.append(sorted(pairs))
        ranks = [ranks[0], ranks[-1], *ranks[1:-1]]  # rotate all but the first
    return rounds


def allreduce_group_sizes(world: int) -> list[int]:
    sizes = {world} if world >= 2 else set()
    g = 2
    while g < world:
        sizes.add(g)
        g *= 2
    return sorted(sizes)


def busbw(algbw: float, ranks: int) -> float:
    """nccl-tests' bus bandwidth of a ring all-reduce: algbw * 2(n-1)/n (doc/PERFORMANCE.md)."""
    return algbw * 2 * (ranks - 1) / ranks


# ------------------------------------------------------------------------------------------- in the ranks
class _Pairs:
    """Timed point-to-point exchanges between this rank and one peer (torch.distributed send/recv)."""

    def __init__(self, device: Any, message_bytes: int, reps: int) -> None:
        import torch

        self.torch = torch
        self.dist = torch.distributed
        self.device = device
        self.reps = reps
        self.buf = torch.zeros(max(1, message_bytes // 4), dtype=torch.float32, device=device)
        self.ack = torch.zeros(ACK_ELEMS, dtype=torch.float32, device=device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def _timed_sends(self, peer: int, reps: int) -> float:
        self._sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            self.dist.send(self.buf, peer)
            self.dist.recv(self.ack, peer)  # the peer holds the whole message: the send is complete
        self._sync()
        return time.perf_counter() - t0

    def _receives(self, peer: int, reps: int) -> None:
        for _ in range(reps):
            self.dist.recv(self.buf, peer)
            self._sync()
            self.dist.send(self.ack, peer)

    def bandwidth(self, me: int, peer: int) -> float:
        """bytes/s one way, the mean of both directions (lower rank sends first); both ranks call it."""
        measured = []
        for sender in (min(me, peer), max(me, peer)):
            if me == sender:
                self._timed_sends(peer, 1)  # warm-up: connection, TCP window, allocator
                measured.append(self.buf.numel() * 4 * self.reps / self._timed_sends(peer, self.reps))
            else:
                self._receives(peer, 1 + self.reps)
        return measured[0] if measured else 0.0

    def latency(self, me: int, peer: int) -> float:
        """Half the median round trip of a 4-byte ping-pong (seconds); returned by the lower rank."""
        rtts = []
        for _ in range(LATENCY_ITERS + 1):
            if me < peer:
                rtts.append(self._timed_sends_ack(peer))
            else:
                self.dist.recv(self.ack, peer)
                self._sync()
                self.dist.send(self.ack, peer)
        return statistics.median(rtts[1:]) / 2 if rtts else 0.0

    def _timed_sends_ack(self, peer: int) -> float:
        t0 = time.perf_counter()
        self.dist.send(self.ack, peer)
        self.dist.recv(self.ack, peer)
        self._sync()
        return time.perf_counter() - t0


def _pair_round(pairs: _Pairs, rank: int, round_pairs: Sequence[tuple[int, int]], out: Any) -> None:
    """Every pair of the round at once; each direction's sender writes its number into `out`."""
    for a, b in round_pairs:
        if rank in (a, b):
            peer = b if rank == a else a
            bw = pairs.bandwidth(rank, peer)
            if bw:
                out[rank, peer] = bw
    pairs.dist.barrier()


def measure(*, message_bytes: int, reps: int) -> LinkMeasurement:
    """Run in every rank of an initialised process group; every rank returns the whole measurement."""
    import torch
    import torch.distributed as dist

    t0 = time.perf_counter()
    world, rank = dist.get_world_size(), dist.get_rank()
    per = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if world % per:
        raise RuntimeError(f"world size {world} is not a multiple of the ranks per node ({per})")
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    pairs = _Pairs(device, message_bytes, reps)
    alone = torch.zeros(world, world, dtype=torch.float64)  # [sender, receiver]
    parallel = torch.zeros(world, world, dtype=torch.float64)
    lat = torch.zeros(world, world, dtype=torch.float64)
    dist.barrier()
    for a, b in [pair for rnd in round_robin_rounds(world) for pair in rnd]:
        if rank in (a, b):  # 1. each pair alone, in turn
            peer = b if rank == a else a
            latency = pairs.latency(rank, peer)
            if rank == a:
                lat[a, b] = lat[b, a] = latency
        _pair_round(pairs, rank, [(a, b)], alone)
    for rnd in round_robin_rounds(world):  # 2. parallel rounds
        if len(rnd) > 1:
            _pair_round(pairs, rank, rnd, parallel)
        elif rank in rnd[0]:
            parallel[rnd[0]] = alone[rnd[0]]
            parallel[rnd[0][::-1]] = alone[rnd[0][::-1]]
    reduced = []
    for t in (alone, parallel, lat):  # every rank filled in only its own entries
        on_dev = t.to(device)
        dist.all_reduce(on_dev)
        reduced.append(on_dev.cpu())
    alone, parallel, lat = reduced
    hosts: list[Any] = [None] * world
    dist.all_gather_object(hosts, [socket.gethostname(), os.environ.get("PET_LOCAL_ADDR", "")])
    symmetric = [((m + m.T) / 2).tolist() for m in (alone, parallel)]
    return LinkMeasurement(
        world_size=world,
        devices_per_node=per,
        backend=dist.get_backend(),
        message_bytes=pairs.buf.numel() * 4,
        reps=reps,
        alone_bandwidth=symmetric[0],
        parallel_bandwidth=symmetric[1],
        latency=lat.tolist(),
        allreduce=_allreduce(pairs, world, rank),
        seconds=time.perf_counter() - t0,
        hosts=hosts,
    )


def _allreduce(pairs: _Pairs, world: int, rank: int) -> list[dict[str, float]]:
    """3. all-reduce of `message_bytes` over the first g ranks, for each group size g."""
    dist = pairs.dist
    out = []
    for g in allreduce_group_sizes(world):
        group = dist.new_group(list(range(g)))  # collective: every rank creates every group
        seconds = math.inf
        if rank < g:
            for i in range(1 + pairs.reps):
                pairs._sync()
                t0 = time.perf_counter()
                dist.all_reduce(pairs.buf, group=group)
                pairs._sync()
                if i:  # the first is a warm-up
                    seconds = min(seconds, time.perf_counter() - t0)
        timed = pairs.torch.tensor(
            [seconds if rank < g else 0.0], dtype=pairs.torch.float64, device=pairs.device
        )
        dist.all_reduce(timed, op=dist.ReduceOp.MAX)  # the slowest member's time is the collective's
        seconds = float(timed.item())
        nbytes = pairs.buf.numel() * 4
        algbw = nbytes / seconds
        out.append(
            {"ranks": g, "bytes": nbytes, "seconds": seconds, "algbw": algbw, "busbw": busbw(algbw, g)}
        )
    return out


# ------------------------------------------------------------------------------------------- the cluster
def _median(values: Sequence[float], default: float) -> float:
    return statistics.median(values) if values else default


def to_cluster(base: ClusterSpec, m: LinkMeasurement, *, tolerance: float = 0.1) -> ClusterSpec:
    """`base` (devices, host tiers) with the job's shape and the measured links as defaults + overrides."""
    per, world = m.devices_per_node, m.world_size
    bw, lat = m.link_bandwidth(), m.latency
    node_pairs: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i in range(world):
        for j in range(i + 1, world):
            node_pairs.setdefault((i // per, j // per), []).append((i, j))

    def level(same: bool, default: Link) -> Link:
        ps = [p for (na, nb), ps in node_pairs.items() if (na == nb) == same for p in ps]
        return Link(
            bandwidth=_median([bw[i][j] for i, j in ps], default.bandwidth),
            latency=_median([lat[i][j] for i, j in ps], default.latency),
        )

    overrides = []
    for (na, nb), ps in sorted(node_pairs.items()):
        node_bw = statistics.median(bw[i][j] for i, j in ps)
        node_lat = statistics.median(lat[i][j] for i, j in ps)
        overrides.append(LinkOverride(between=(f"n{na}", f"n{nb}"), bandwidth=node_bw, latency=node_lat))
        for i, j in ps:
            if abs(bw[i][j] - node_bw) > tolerance * node_bw:
                overrides.append(
                    LinkOverride(
                        between=(f"n{na}:d{i % per}", f"n{nb}:d{j % per}"),
                        bandwidth=bw[i][j],
                        latency=lat[i][j],
                    )
                )
    links = Links(
        intra_node=level(True, base.links.intra_node),
        inter_node=level(False, base.links.inter_node),
        overrides=tuple(overrides),
    )
    return dataclasses.replace(base, nodes=m.nodes, devices_per_node=per, links=links)


def plot(m: LinkMeasurement, path: str) -> None:
    """Heatmap of the link bandwidth matrix (MB/s), one cell per rank pair, with the all-reduce busbw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    bw = np.array(m.link_bandwidth()) / 1e6
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    im = ax.imshow(np.where(bw > 0, bw, np.nan), cmap="viridis")
    names = [f"n{r // m.devices_per_node}:d{r % m.devices_per_node}" for r in range(m.world_size)]
    ax.set_xticks(range(m.world_size), names, rotation=45, ha="right")
    ax.set_yticks(range(m.world_size), names)
    if m.world_size <= 16:
        for i in range(m.world_size):
            for j in range(m.world_size):
                if i != j:
                    color = "k" if bw[i, j] > 0.6 * np.nanmax(bw) else "w"  # readable on viridis
                    ax.text(j, i, f"{bw[i, j]:.0f}", ha="center", va="center", color=color, fontsize=8)
    fig.colorbar(im, ax=ax, label="MB/s one way (parallel rounds)")
    ax.set_title(f"link bandwidth, {m.backend}, {m.message_bytes >> 20} MiB x {m.reps}")
    sizes = [a["ranks"] for a in m.allreduce]
    ax2.bar([str(s) for s in sizes], [a["busbw"] / 1e6 for a in m.allreduce])
    ax2.set_xlabel("ranks in the all-reduce (first g)")
    ax2.set_ylabel("busbw MB/s (nccl-tests)")
    ax2.set_title("all-reduce bus bandwidth")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def side_paths(out: str) -> tuple[str, str]:
    stem = out[: -len(".yaml")] if out.endswith(".yaml") else out
    return f"{stem}.links.json", f"{stem}.links.png"


def write(
    base: ClusterSpec, m: LinkMeasurement, out: str, *, tolerance: float, plot_path: str | None
) -> None:
    from planner.cluster import cluster_to_yaml
    from planner.schema import atomic_write_text

    cluster = to_cluster(base, m, tolerance=tolerance)
    json_path, png_path = side_paths(out)
    atomic_write_text(out, cluster_to_yaml(cluster))
    atomic_write_text(json_path, json.dumps({"measurement": m.to_dict(), "cluster": out}, indent=2))
    plot(m, plot_path or png_path)


# ------------------------------------------------------------------------------------------- entry points
def _worker(argv: Sequence[str]) -> int:
    """One rank under torchrun."""
    import datetime

    import torch
    import torch.distributed as dist

    from launch import heartbeat
    from launch.specs import cluster_from_arg

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--cluster", required=True)
    p.add_argument("--message-bytes", type=int, required=True)
    p.add_argument("--reps", type=int, required=True)
    p.add_argument("--tolerance", type=float, required=True)
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    rank = int(os.environ["RANK"])
    stop = heartbeat.start(rank)
    timeout = datetime.timedelta(seconds=float(os.environ.get("MEMTIER_COLLECTIVE_TIMEOUT_S", "600")))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    try:
        m = measure(message_bytes=args.message_bytes, reps=args.reps)
        if rank == 0:
            write(cluster_from_arg(args.cluster), m, args.out, tolerance=args.tolerance, plot_path=args.plot)
            print(
                f"[probe --links] {m.world_size} ranks in {m.seconds:.1f} s: wrote {args.out}",
                file=sys.stderr,
            )
        dist.barrier()
    finally:
        dist.destroy_process_group()
        stop()
    return 0


def run_cli(args: argparse.Namespace) -> int:
    """`memtier probe --links` (called by launch.cli): torchrun this module over the job."""
    from launch.run import LaunchSpec, launch
    from planner.schema import check_output_file
    from planner.units import parse_bytes

    out = args.out or "cluster.yaml"
    check_output_file(out, "--out")
    base = args.cluster or (out if os.path.exists(out) else "local")
    script_args = [
        "--out", os.path.abspath(out), "--cluster", base, "--reps", str(args.reps), "--tolerance", str(args.tolerance),
        "--message-bytes", str(int(parse_bytes(args.message_bytes))),
    ]  # fmt: skip
    if args.plot:
        script_args += ["--plot", os.path.abspath(args.plot)]
    spec = LaunchSpec(
        script=os.path.abspath(__file__),
        script_args=tuple(script_args),
        nproc=args.nproc_per_node,
        nnodes=args.nnodes,
        node_rank=args.node_rank if args.node_rank is not None else int(os.environ.get("NODE_RANK", "0")),
        rdzv_endpoint=args.rdzv_endpoint,
    )
    result = launch(spec)
    print(f"memtier probe --links: {result.message} ({result.seconds:.1f} s)", file=sys.stderr)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
