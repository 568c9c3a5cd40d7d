"""Communication cost: alpha-beta model per collective over the links a group really uses.

Logical ranks are laid out tp-innermost, then cp, dp, pp (Megatron-LM's order); a
rank-to-device map places them on physical devices. A ring collective is as fast as
its slowest edge (ring order = the group's ranks in order, closed), so one degraded
link slows the whole group: that is why the rank mapping matters (Pipette, Yim et
al. 2024).

Costs (Thakur et al. 2005; Chan et al. 2007), n ranks, B bytes, edge bandwidth bw,
latency alpha:
  ring all-reduce      2 (n-1)/n * B/bw + 2 (n-1) alpha
  tree all-reduce      2 B/bw + 2 ceil(log2 n) alpha   (double binary tree, NCCL)
  all-gather / reduce-scatter   (n-1)/n * B/bw + (n-1) alpha
  point-to-point       B/bw + alpha
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from planner.cluster import ClusterSpec
from planner.plan import Layout


@dataclass(frozen=True)
class GroupLink:
    """The slowest edge a ring over a group uses."""

    bandwidth: float  # bytes/s
    latency: float  # seconds


def logical_rank(layout: Layout, *, tp: int, cp: int, dp: int, pp: int) -> int:
    return ((pp * layout.dp + dp) * layout.cp + cp) * layout.tp + tp


def groups(layout: Layout) -> dict[str, list[list[int]]]:
    """Logical ranks of every tp, cp, dp and pp group: for each dimension, one group per combination of the
    other three coordinates (outer loops in pp, dp, cp, tp order, as before), its members along the dimension."""
    import itertools

    sizes = {"tp": layout.tp, "cp": layout.cp, "dp": layout.dp, "pp": layout.pp}
    outer = ("pp", "dp", "cp", "tp")
    out: dict[str, list[list[int]]] = {}
    for dim in ("tp", "cp", "dp", "pp"):
        others = [o for o in outer if o != dim]
        out[dim] = [
            [logical_rank(layout, **dict(zip(others, coords)), **{dim: i}) for i in range(sizes[dim])]
            for coords in itertools.product(*(range(sizes[o]) for o in others))
        ]
    return out


def ring_link(devices: Sequence[int], bw: np.ndarray, lat: np.ndarray, *, closed: bool = True) -> GroupLink:
    """Slowest edge of the ring (or chain, `closed=False`) through `devices` in order."""
    n = len(devices)
    if n < 2:
        return GroupLink(bandwidth=math.inf, latency=0.0)
    idx = np.asarray(devices)
    nxt = np.roll(idx, -1) if closed else idx[1:]
    src = idx if closed else idx[:-1]
    return GroupLink(bandwidth=float(bw[src, nxt].min()), latency=float(lat[src, nxt].max()))


def allreduce_time(nbytes: float, n: int, link: GroupLink) -> float:
    if n < 2 or nbytes <= 0:
        return 0.0
    ring = 2 * (n - 1) / n * nbytes / link.bandwidth + 2 * (n - 1) * link.latency
    tree = 2 * nbytes / link.bandwidth + 2 * math.ceil(math.log2(n)) * link.latency
    return min(ring, tree)


def allgather_time(nbytes: float, n: int, link: GroupLink) -> float:
    """All-gather (or reduce-scatter) of a `nbytes` result."""
    if n < 2 or nbytes <= 0:
        return 0.0
    return (n - 1) / n * nbytes / link.bandwidth + (n - 1) * link.latency


def p2p_time(nbytes: float, link: GroupLink) -> float:
    if nbytes <= 0 or math.isinf(link.bandwidth):
        return 0.0
    return nbytes / link.bandwidth + link.latency


def device_map(layout: Layout, cluster: ClusterSpec) -> list[int]:
    """Logical rank -> global device index, from the layout's rank_to_device or in order."""
    if not layout.rank_to_device:
        return list(range(layout.world_size))
    out = []
    for name in layout.rank_to_device:
        node, dev = name.split(":")
        out.append(int(node[1:]) * cluster.devices_per_node + int(dev[1:]))
    return out


def worst_group_links(
    layout: Layout, cluster: ClusterSpec, mapping: Sequence[int] | None = None
) -> dict[str, GroupLink]:
    """For each kind of group, the slowest ring edge over all groups of that kind."""
    mapping = list(mapping) if mapping is not None else device_map(layout, cluster)
    bw, lat = cluster.bandwidth_matrix(), cluster.latency_matrix()
    out = {}
    for kind, gs in groups(layout).items():
        links = [ring_link([mapping[r] for r in g], bw, lat, closed=kind != "pp") for g in gs]
        out[kind] = min(links, key=lambda x: x.bandwidth) if links else GroupLink(math.inf, 0.0)
    return out
