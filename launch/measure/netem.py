"""An emulated multi-node cluster on one Linux machine: network namespaces joined by shaped veth links.

Each "node" is a network namespace holding one stable address on a local interface (`mt0`,
10.77.<id>.<k+1>/32). Every pair of nodes has its own veth pair (`p<j>` in node i, `p<i>` in node j)
and a host route to the peer's address over it, so traffic between two nodes crosses only their own
link. Each end of a link is shaped with `tc`: a token bucket (`tbf`) at the link's rate, under a
`netem` delay when the link has one; both directions get the same shape.

Processes run in node k with `ip netns exec <name> ...` (`EmulatedCluster.command(k, argv)`) and the
environment of `EmulatedCluster.env(k)`: GLOO_SOCKET_IFNAME=mt0 (gloo binds the node address),
PET_LOCAL_ADDR (torchrun's `--local-addr`: the address the rank-0 agent advertises as MASTER_ADDR) and
PET_RDZV_CONF=is_host=... (node 0 hosts the c10d rendezvous store at its node address).

Cleanup: the veths live inside the namespaces (none is ever in the host's namespace), so deleting a
namespace removes its links and qdiscs. `emulated_cluster()` deletes them on every way out of the
`with` block, an atexit hook catches an interpreter exit in between, and `remove_stale()` deletes the
namespaces of a process that died without either (names carry the creator's pid).

    sudo python -m launch.measure.netem --nodes 3 --rate 400 --slow 0,1:100 -- \\
        python -m launch.cli probe --links --nnodes {nodes} --node-rank {node} --rdzv-endpoint {rdzv} \\
        --out cluster.yaml      # one command per node, run at once; {node} {nodes} {rdzv} filled in
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

PREFIX = "memtier-"  # namespace names: memtier-<pid>-<id>-n<k>
IFACE = "mt0"  # the interface holding a node's address (one end of a veth pair inside the node)
_LIVE: dict[str, EmulatedCluster] = {}  # clusters of this process not yet removed (for the atexit hook)


class NetemUnavailable(RuntimeError):
    """Namespaces, veths or tc cannot be used here (not root, no `ip`/`tc`, a kernel without them)."""


@dataclass(frozen=True, kw_only=True)
class LinkShape:
    rate_mbit: float  # tbf rate, megabits/s (10^6), each direction
    delay_ms: float = 0.0  # netem one-way delay, milliseconds

    @property
    def bytes_per_s(self) -> float:
        return self.rate_mbit * 1e6 / 8


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise NetemUnavailable(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def available() -> str | None:
    """None when an emulated cluster can be built here, else why not (for a test's skip reason)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    name = f"{PREFIX}{os.getpid()}-probe"
    proc = _run(["ip", "netns", "add", name], check=False)
    if proc.returncode != 0:
        return f"cannot create a network namespace: {proc.stderr.strip()}"
    _run(["ip", "netns", "del", name], check=False)
    return None


def namespaces() -> list[str]:
    """Every namespace this module made that still exists (any process)."""
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


def remove_stale() -> list[str]:
    """Delete the namespaces of processes that are gone (a SIGKILLed test); returns their names."""
    removed = []
    for name in namespaces():
        pid = name[len(PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            _run(["ip", "netns", "del", name], check=False)
            removed.append(name)
    return removed


def tc_commands(dev: str, shape: LinkShape) -> list[list[str]]:
    """The `tc` commands that shape one veth end (egress)."""
    # tbf's bucket must hold at least one timer tick of tokens (rate / HZ, HZ >= 100) or the rate is not
    # reached; 2 ticks at HZ=100 and at least 64 KiB. `latency` bounds the queue (tc-tbf(8)).
    burst = max(64 << 10, int(shape.bytes_per_s / 100 * 2))
    tbf = ["tbf", "rate", f"{shape.rate_mbit}mbit", "burst", str(burst), "latency", "200ms"]
    if shape.delay_ms <= 0:
        return [["tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", *tbf]]
    return [
        ["tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem", "delay", f"{shape.delay_ms}ms"],
        ["tc", "qdisc", "add", "dev", dev, "parent", "1:", "handle", "10:", *tbf],
    ]


class EmulatedCluster:
    """N namespaces, a full mesh of shaped veth links; `shapes[i][j]` is the link between nodes i and j."""

    def __init__(self, shapes: Sequence[Sequence[LinkShape | None]], *, tag: str = "0") -> None:
        n = len(shapes)
        if n < 2 or any(len(row) != n for row in shapes):
            raise ValueError(f"shapes must be an N x N matrix with N >= 2, got {n} rows")
        self.shapes = [list(row) for row in shapes]
        self.nodes = n
        self.subnet = 77
        self.names = [f"{PREFIX}{os.getpid()}-{tag}-n{k}" for k in range(n)]
        self.created: list[str] = []

    def address(self, k: int) -> str:
        return f"10.{self.subnet}.0.{k + 1}"

    def shape(self, i: int, j: int) -> LinkShape:
        s = self.shapes[i][j] or self.shapes[j][i]
        if s is None:
            raise ValueError(f"no shape for the link n{i}-n{j}")
        return s

    def up(self) -> None:
        for k, name in enumerate(self.names):
            _run(["ip", "netns", "add", name])
            self.created.append(name)
            ns = ["ip", "-n", name]
            _run([*ns, "link", "set", "lo", "up"])
            # a veth pair with both ends in the node stands in for a dummy interface (the `dummy` module
            # is not in every kernel): the node address lives on one end, the other end is only kept up
            _run([*ns, "link", "add", IFACE, "type", "veth", "peer", "name", f"{IFACE}p"])
            _run([*ns, "addr", "add", f"{self.address(k)}/32", "dev", IFACE])
            _run([*ns, "link", "set", f"{IFACE}p", "up"])
            _run([*ns, "link", "set", IFACE, "up"])
        for i in range(self.nodes):
            for j in range(i + 1, self.nodes):
                self._link(i, j)

    def _link(self, i: int, j: int) -> None:
        a, b = self.names[i], self.names[j]
        # created inside node i with its peer moved straight into node j: never in the host's namespace
        _run(["ip", "-n", a, "link", "add", f"p{j}", "type", "veth", "peer", "name", f"p{i}", "netns", b])
        for ns, dev, peer in ((a, f"p{j}", j), (b, f"p{i}", i)):
            me = i if ns == a else j
            _run(["ip", "-n", ns, "link", "set", dev, "up"])
            # no address on the veth: the peer's node address is routed over it, answered by ARP from the
            # node address on the dummy interface (arp_ignore=0 answers for any local address)
            _run(
                ["ip", "-n", ns, "route", "add", f"{self.address(peer)}/32", "dev", dev]
                + ["src", self.address(me)]
            )
            for cmd in tc_commands(dev, self.shape(i, j)):
                _run(["ip", "netns", "exec", ns, *cmd])

    def down(self) -> None:
        for name in reversed(self.created):
            _run(["ip", "netns", "del", name], check=False)
        self.created.clear()

    def env(self, k: int, *, rdzv_node: int = 0, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment of a torchrun launched in node k (the rendezvous store hosted by `rdzv_node`)."""
        env = dict(os.environ if base is None else base)
        env["GLOO_SOCKET_IFNAME"] = IFACE
        env["PET_LOCAL_ADDR"] = self.address(k)
        env["PET_RDZV_CONF"] = f"is_host={'1' if k == rdzv_node else '0'}"
        env["MASTER_ADDR"] = self.address(rdzv_node)
        return env

    def command(self, k: int, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.names[k], *argv]

    def rdzv_endpoint(self, port: int, *, rdzv_node: int = 0) -> str:
        return f"{self.address(rdzv_node)}:{port}"

    def run_all(
        self,
        argv: Callable[[int], Sequence[str]],
        *,
        timeout_s: float | None = None,
        capture: bool = True,
        cwd: str | None = None,
        rdzv_node: int = 0,
    ) -> list[subprocess.CompletedProcess[str]]:
        """Run `argv(k)` in every node k at once; wait for all (kill all past `timeout_s`)."""
        out = subprocess.PIPE if capture else None
        procs = [
            subprocess.Popen(
                self.command(k, argv(k)),
                env=self.env(k, rdzv_node=rdzv_node),
                stdout=out,
                stderr=out,
                text=True,
                cwd=cwd,
            )
            for k in range(self.nodes)
        ]
        results = []
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            for proc in procs:
                left = None if deadline is None else max(0.1, deadline - time.monotonic())
                try:
                    stdout, stderr = proc.communicate(timeout=left)
                except subprocess.TimeoutExpired:
                    _stop(procs)
                    stdout, stderr = proc.communicate()
                results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
        finally:
            _stop(procs)  # an interrupted wait: no process outlives the cluster
        return results


def _stop(procs: Sequence[subprocess.Popen[str]], grace_s: float = 15.0) -> None:
    """SIGTERM (a `memtier` launcher then stops its torchrun agent and ranks), SIGKILL after `grace_s`."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        p.terminate()
    deadline = time.monotonic() + grace_s
    for p in live:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _cleanup_all() -> None:
    for cluster in list(_LIVE.values()):
        cluster.down()
    _LIVE.clear()


@contextlib.contextmanager
def emulated_cluster(
    shapes: Sequence[Sequence[LinkShape | None]], *, tag: str = "0"
) -> Iterator[EmulatedCluster]:
    """Build the cluster, yield it, remove it on every way out (exception, KeyboardInterrupt, exit)."""
    reason = available()
    if reason is not None:
        raise NetemUnavailable(reason)
    remove_stale()
    cluster = EmulatedCluster(shapes, tag=tag)
    key = ",".join(cluster.names)
    if not _LIVE:
        atexit.register(_cleanup_all)
    _LIVE[key] = cluster
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down()
        _LIVE.pop(key, None)


def uniform_shapes(nodes: int, rate_mbit: float, delay_ms: float = 0.0) -> list[list[LinkShape | None]]:
    return [
        [None if i == j else LinkShape(rate_mbit=rate_mbit, delay_ms=delay_ms) for j in range(nodes)]
        for i in range(nodes)
    ]


def with_link(
    shapes: list[list[LinkShape | None]], i: int, j: int, shape: LinkShape
) -> list[list[LinkShape | None]]:
    out = [list(row) for row in shapes]
    out[i][j] = out[j][i] = shape
    return out


def _parse_slow(text: str) -> tuple[int, int, float]:
    pair, _, rate = text.partition(":")
    a, _, b = pair.partition(",")
    try:
        return int(a), int(b), float(rate)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I,J:MBIT, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Build a cluster, run one command in every node at once (`{node}`, `{nodes}`, `{rdzv}` substituted)."""
    p = argparse.ArgumentParser(prog="python -m launch.measure.netem", description=main.__doc__)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--rate", type=float, default=400.0, help="mbit/s of every link")
    p.add_argument("--delay", type=float, default=0.0, help="ms one-way delay of every link")
    p.add_argument("--slow", type=_parse_slow, action="append", default=[], help="I,J:MBIT one link's rate")
    p.add_argument("--port", type=int, default=29555, help="rendezvous port on node 0")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    shapes = uniform_shapes(args.nodes, args.rate, args.delay)
    for i, j, rate in args.slow:
        shapes = with_link(shapes, i, j, LinkShape(rate_mbit=rate, delay_ms=args.delay))
    # SIGTERM unwinds the `with` like Ctrl-C does, so the namespaces are removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with emulated_cluster(shapes) as cluster:
        if not cmd:
            print("nodes: " + ", ".join(f"{n} ({cluster.address(k)})" for k, n in enumerate(cluster.names)))
            return 0
        port = args.port
        results = cluster.run_all(
            lambda k: [a.format(node=k, nodes=cluster.nodes, rdzv=cluster.rdzv_endpoint(port)) for a in cmd],
            capture=False,
        )
        return max(r.returncode for r in results)


if __name__ == "__main__":
    sys.exit(main())
