"""Rank-to-device assignment: which physical device runs each logical rank.

Logical ranks follow Megatron's order (tp innermost, then cp, dp, pp; `planner.comm`).
The default assignment puts logical rank r on global device r. On a cluster whose
links differ (an oversubscribed uplink between racks, one degraded NIC), a different
assignment can keep the heavy rings (tensor parallel, data parallel) on fast links
and let the pipeline boundaries, which move far fewer bytes, take the slow ones.
Pipette (Yim et al. 2024, DATE) searches this assignment with simulated annealing
over the per-link bandwidths the cluster really has; so does this module.

The search space is restricted to assignments a launcher can realise: the logical
ranks of node-sized block k (ranks k*D .. k*D+D-1, D = devices per node) run on one
physical node, in any order. torchrun numbers ranks node_rank * D + local_rank, so a
block maps to a node by that node's `--node-rank` and the order inside it by
CUDA_VISIBLE_DEVICES. Moves: swap two node blocks, or swap two devices inside one.

Every candidate is scored by the step-time model with the links the mapping gives
each group kind (the slowest ring edge, as `planner.comm.worst_group_links`, here
vectorised so an assignment of 1024 ranks costs tens of microseconds).
"""

from __future__ import annotations

import itertools
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from planner.cluster import ClusterSpec
from planner.comm import GroupLink
from planner.errors import SpecError
from planner.plan import Layout, SolverReport, SolverStatus

GROUP_KINDS = ("tp", "cp", "dp", "pp")


class MappingError(SpecError):
    """A mapping that is not a launchable permutation of the cluster's devices (names the field)."""


@dataclass(frozen=True, kw_only=True)
class AnnealSettings:
    """Simulated annealing schedule: geometric cooling from `t_start` to `t_end` (relative to the cost)."""

    iterations: int = field(default=600, metadata={"positive": True})  # proposals evaluated
    t_start: float = field(default=0.02, metadata={"positive": True})  # initial temperature / default cost
    t_end: float = field(default=1e-5, metadata={"positive": True})  # final temperature / default cost
    node_move_share: float = field(default=0.4, metadata={"min": 0.0, "max": 1.0})  # share of block swaps
    time_limit_s: float = field(default=10.0, metadata={"positive": True})  # wall-clock cap (safety)
    exhaustive_node_orders: int = field(
        default=720, metadata={"min": 0}
    )  # try all node orders up to this many

    def __post_init__(self) -> None:
        if not (isinstance(self.iterations, int) and self.iterations >= 0):
            raise MappingError(f"must be an integer >= 0, got {self.iterations!r}", field="iterations")
        if not (0 < self.t_end <= self.t_start):
            raise MappingError(f"need 0 < t_end({self.t_end}) <= t_start({self.t_start})", field="t_end")
        if not (0.0 <= self.node_move_share <= 1.0):
            raise MappingError(f"must be in [0, 1], got {self.node_move_share}", field="node_move_share")
        if not self.time_limit_s > 0:
            raise MappingError(f"must be > 0 seconds, got {self.time_limit_s}", field="time_limit_s")


@dataclass(frozen=True, kw_only=True)
class MappingResult:
    mapping: tuple[int, ...]  # logical rank -> global device index
    step_s: float  # predicted step time with this mapping
    default_step_s: float  # with the default order (rank r on device r)
    links: dict[str, GroupLink]  # slowest ring edge per group kind under `mapping`
    default_links: dict[str, GroupLink]
    evaluated: int  # distinct mappings scored
    report: SolverReport

    @property
    def gain(self) -> float:
        """default / searched step time (>= 1: the search never returns worse than the default)."""
        return self.default_step_s / self.step_s if self.step_s > 0 else 1.0

    @property
    def is_default(self) -> bool:
        return self.mapping == tuple(range(len(self.mapping)))


def group_ranks(layout: Layout) -> dict[str, np.ndarray]:
    """Logical ranks of every group, one row per group, in the order of `planner.comm.groups`."""
    T, C, D, P = layout.tp, layout.cp, layout.dp, layout.pp
    ranks = np.arange(layout.world_size).reshape(P, D, C, T)
    return {
        "tp": ranks.reshape(-1, T),
        "cp": ranks.transpose(0, 1, 3, 2).reshape(-1, C),
        "dp": ranks.transpose(0, 2, 3, 1).reshape(-1, D),
        "pp": ranks.transpose(1, 2, 3, 0).reshape(-1, P),
    }


_ENDPOINT = re.compile(r"^n(\d+)(?::d(\d+))?$")


class EdgeLinks:
    """Bandwidth and latency of any device pairs, resolved as `ClusterSpec.bandwidth_matrix` does.

    Without building the N x N matrices (2 GiB each for 16384 devices): the topology level
    (same node or not), then every node-pair override, then every device-pair override,
    later ones winning, and a device to itself infinitely fast.
    """

    def __init__(self, cluster: ClusterSpec) -> None:
        self.per = cluster.devices_per_node
        self.intra, self.inter = cluster.links.intra_node, cluster.links.inter_node
        self.node_over: list[tuple[int, int, float, float | None]] = []
        self.pair_over: list[tuple[int, int, float, float | None]] = []
        for o in cluster.links.overrides:
            ends = [_ENDPOINT.match(e) for e in o.between]
            if any(m is None for m in ends):
                raise MappingError(f"bad endpoint in {o.between}", field="links.overrides.between")
            (n1, d1), (n2, d2) = ((int(m.group(1)), m.group(2)) for m in ends if m is not None)
            if d1 is None and d2 is None:
                self.node_over.append((n1, n2, o.bandwidth, o.latency))
            elif d1 is not None and d2 is not None:
                i, j = n1 * self.per + int(d1), n2 * self.per + int(d2)
                self.pair_over.append((i, j, o.bandwidth, o.latency))

    def __call__(self, src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        na, nb = src // self.per, dst // self.per
        same = na == nb
        bw = np.where(same, self.intra.bandwidth, self.inter.bandwidth).astype(float)
        lat = np.where(same, self.intra.latency, self.inter.latency).astype(float)
        for n1, n2, b, latency in self.node_over:
            mask = ((na == n1) & (nb == n2)) | ((na == n2) & (nb == n1))
            bw[mask] = b
            if latency is not None:
                lat[mask] = latency
        for i, j, b, latency in self.pair_over:
            mask = ((src == i) & (dst == j)) | ((src == j) & (dst == i))
            bw[mask] = b
            if latency is not None:
                lat[mask] = latency
        self_edge = src == dst
        bw[self_edge] = math.inf
        lat[self_edge] = 0.0
        return bw, lat


class LinkEvaluator:
    """The slowest ring edge of each group kind for any mapping of one layout on one cluster.

    Equal, group by group, to `planner.comm.worst_group_links` (rings closed for tp/cp/dp,
    the pipeline an open chain): the bandwidth is the minimum over every edge of every
    group of the kind, the latency the largest edge latency of the first group attaining
    that minimum.
    """

    def __init__(self, layout: Layout, cluster: ClusterSpec) -> None:
        if layout.world_size != cluster.world_size:
            raise MappingError(
                f"layout world size {layout.world_size} != cluster world size {cluster.world_size}",
                field="layout",
            )
        self.layout = layout
        self.edge = EdgeLinks(cluster)
        self._edges: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for kind, g in group_ranks(layout).items():
            if g.shape[1] < 2:
                continue
            if kind == "pp":  # an open chain of point-to-point sends
                src, dst = g[:, :-1], g[:, 1:]
            else:  # a closed ring
                src, dst = g, np.roll(g, -1, axis=1)
            self._edges[kind] = (src, dst)

    def links(self, mapping: np.ndarray) -> dict[str, GroupLink]:
        out: dict[str, GroupLink] = {}
        for kind in GROUP_KINDS:
            edges = self._edges.get(kind)
            if edges is None:
                out[kind] = GroupLink(bandwidth=math.inf, latency=0.0)
                continue
            bw, lat = self.edge(mapping[edges[0]], mapping[edges[1]])
            per_group = bw.min(axis=1)  # per group: its slowest edge
            g = int(np.argmin(per_group))  # first group attaining the minimum
            out[kind] = GroupLink(bandwidth=float(per_group[g]), latency=float(lat[g].max()))
        return out


def default_mapping(world_size: int) -> np.ndarray:
    return np.arange(world_size, dtype=np.int64)


def check_launchable(mapping: np.ndarray | tuple[int, ...], cluster: ClusterSpec) -> None:
    """A permutation of the devices that keeps each node-sized block of logical ranks on one node."""
    m = np.asarray(mapping, dtype=np.int64)
    n = cluster.world_size
    if m.shape != (n,) or sorted(m.tolist()) != list(range(n)):
        raise MappingError(f"not a permutation of the {n} devices", field="rank_to_device")
    nodes = m.reshape(cluster.nodes, cluster.devices_per_node) // cluster.devices_per_node
    if (nodes != nodes[:, :1]).any():
        bad = int(np.nonzero((nodes != nodes[:, :1]).any(axis=1))[0][0])
        raise MappingError(
            f"logical ranks {bad * cluster.devices_per_node}..{(bad + 1) * cluster.devices_per_node - 1}"
            " span more than one node; torchrun cannot launch that",
            field="rank_to_device",
        )


def rank_to_device_names(mapping: np.ndarray | tuple[int, ...], cluster: ClusterSpec) -> tuple[str, ...]:
    return tuple(cluster.device_name(int(d)) for d in mapping)


def anneal_mapping(
    layout: Layout,
    cluster: ClusterSpec,
    cost: Callable[[dict[str, GroupLink]], float],
    *,
    seed: int = 0,
    settings: AnnealSettings | None = None,
) -> MappingResult:
    """Simulated annealing over launchable mappings; `cost(links)` is the predicted step time.

    Deterministic for a seed (unless the wall-clock cap stops it early: the report then
    says "time_limit"). Starts from the default order and returns it unless a mapping is
    strictly faster, so the result is never worse than the default.
    """
    settings = settings or AnnealSettings()
    t0 = time.perf_counter()
    evaluator = LinkEvaluator(layout, cluster)
    nodes, per = cluster.nodes, cluster.devices_per_node
    rng = np.random.default_rng(seed)
    cache: dict[bytes, float] = {}

    def score(state: np.ndarray) -> float:
        key = state.tobytes()
        hit = cache.get(key)
        if hit is None:
            hit = cost(evaluator.links(state.ravel()))
            cache[key] = hit
        return hit

    state = default_mapping(cluster.world_size).reshape(nodes, per)  # row k: devices of block k
    default_cost = cur_cost = score(state)
    best, best_cost = state.copy(), cur_cost
    if math.factorial(nodes) <= settings.exhaustive_node_orders:
        # few nodes: score every order of the node blocks first and anneal from the best
        for order in itertools.permutations(range(nodes)):
            cand = state[list(order)]
            c = score(cand)
            if c < best_cost * (1 - 1e-12):
                best, best_cost = cand.copy(), c
        state, cur_cost = best.copy(), best_cost
    status: SolverStatus = "feasible"
    can_node = nodes > 1
    can_local = per > 1
    iters = settings.iterations if (can_node or can_local) else 0
    scale = max(default_cost, 1e-12)
    for i in range(iters):
        if i % 32 == 0 and time.perf_counter() - t0 > settings.time_limit_s:
            status = "time_limit"
            break
        frac = i / max(1, iters - 1)
        temp = scale * settings.t_start * (settings.t_end / settings.t_start) ** frac
        cand = state.copy()
        if can_node and (not can_local or rng.random() < settings.node_move_share):
            a, b = rng.choice(nodes, size=2, replace=False)
            cand[[a, b]] = cand[[b, a]]  # swap two node blocks
        else:
            k = int(rng.integers(nodes))
            a, b = rng.choice(per, size=2, replace=False)
            cand[k, [a, b]] = cand[k, [b, a]]  # swap two devices inside one block
        c = score(cand)
        # Metropolis acceptance: always downhill, uphill with probability exp(-delta / T)
        if c <= cur_cost or rng.random() < math.exp(-(c - cur_cost) / temp):
            state, cur_cost = cand, c
            if c < best_cost * (1 - 1e-12):
                best, best_cost = cand.copy(), c
    mapping = best.ravel()
    return MappingResult(
        mapping=tuple(int(x) for x in mapping),
        step_s=best_cost,
        default_step_s=default_cost,
        links=evaluator.links(mapping),
        default_links=evaluator.links(default_mapping(cluster.world_size)),
        evaluated=len(cache),
        report=SolverReport(
            problem="mapping",
            strategy="anneal",
            status=status,
            objective=best_cost,
            gap=0.0,
            seconds=time.perf_counter() - t0,
        ),
    )
