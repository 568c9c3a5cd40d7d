"""ClusterSpec: nodes x devices, per-link bandwidths, and the host tiers of each node.

Links are heterogeneous: each pair of devices resolves to a bandwidth and latency
through (1) a per-device-pair override, (2) a per-node-pair override, (3) the
default of its topology level (same node or across nodes). A degraded NIC or a
slow uplink between racks is an override, not a new level.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from planner.errors import SpecError

if TYPE_CHECKING:
    from planner.workload import Workload

MAX_NODES = 100_000
_POS = {"positive": True}
TierKind = Literal["dram", "cxl", "nvme"]


@dataclass(frozen=True, kw_only=True)
class Link:
    bandwidth: float = field(metadata={"unit": "bandwidth", "positive": True})  # bytes/s, one direction
    latency: float = field(default=5e-6, metadata={"unit": "time", "min": 0})  # seconds


@dataclass(frozen=True, kw_only=True)
class LinkOverride:
    """`between: [n0, n3]` (every link between two nodes) or `[n0:d1, n1:d7]` (one device pair)."""

    between: tuple[str, ...]
    bandwidth: float = field(metadata={"unit": "bandwidth", "positive": True})
    latency: float | None = field(default=None, metadata={"unit": "time", "min": 0})

    def __post_init__(self) -> None:
        if len(self.between) != 2:
            raise ValueError(f"between needs two endpoints, got {len(self.between)}")
        for end in self.between:
            if not _ENDPOINT.match(end):
                raise ValueError(f"endpoint {end!r} is not 'nN' or 'nN:dM'")


_ENDPOINT = re.compile(r"^n(\d+)(?::d(\d+))?$")


@dataclass(frozen=True, kw_only=True)
class Links:
    intra_node: Link
    inter_node: Link
    overrides: tuple[LinkOverride, ...] = ()


@dataclass(frozen=True, kw_only=True)
class CompileAtBudget:
    """What compile changes in the probe's reference block at one partitioner budget (compiled / eager)."""

    budget: float = field(metadata={"min": 0, "max": 1.0})  # AOTAutograd's `activation_memory_budget`
    saved_ratio: float = field(metadata={"positive": True, "max": 4.0})
    time_ratio: float = field(metadata={"positive": True, "max": 4.0})


@dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    kind: str
    memory: int = field(metadata={"unit": "bytes", "positive": True})  # bytes per device
    peak_flops: dict[str, float] = field(metadata={"unit": "flops", "positive": True})  # per dtype
    # achieved / peak for dense transformer work; `memtier bench --calibrate` measures it
    efficiency: float = field(default=0.5, metadata={"positive": True, "max": 1.0})
    host_link: Link = field(default_factory=lambda: Link(bandwidth=25e9, latency=10e-6))  # host <-> device
    # device memory bandwidth (HBM, or DRAM for a CPU): bounds element-wise work such as the
    # loss over the logits and the optimizer update
    memory_bandwidth: float = field(default=1.5e12, metadata={"unit": "bandwidth", "positive": True})
    # seconds per transformer block per micro-batch (forward + backward) that the FLOPs do not explain:
    # operator dispatch and small-kernel launches, the alpha of an alpha-beta compute model. The probe fits
    # it together with the efficiency from blocks of several sizes; negligible next to large GEMMs.
    block_overhead: float = field(default=0.0, metadata={"unit": "time", "min": 0})
    # cost a block as its kernels (`planner.kernels`): the GEMMs at `efficiency` (then a GEMM efficiency),
    # the attention core, and the memory-bound operators at `memory_bandwidth`. Off where `efficiency` was
    # fitted on whole blocks (the probe), which already holds the norms, activations and attention.
    roofline: bool = False
    # achieved / peak of a fused (flash) attention kernel's forward + backward, with `roofline`; 0: `efficiency`
    attention_efficiency: float = field(default=0.0, metadata={"min": 0, "max": 1.0})
    # what `torch.compile` with `compile_backend` changes in a block, measured by `memtier probe --compile` on a
    # reference Llama block (compiled / eager, at torch's own partitioner budget): its saved-for-backward bytes
    # (the partitioner recomputes cheap pointwise ops and fusion drops intermediates) and its forward + backward
    # time. "" (not probed): a compiled plan is costed as eager, an upper bound on the saved bytes.
    compile_backend: str = ""
    compile_saved_ratio: float = field(default=1.0, metadata={"positive": True, "max": 4.0})
    compile_time_ratio: float = field(default=1.0, metadata={"positive": True, "max": 4.0})
    # the same, probed at several partitioner budgets: the planner picks one where the plan leaves it open
    compile_budgets: tuple[CompileAtBudget, ...] = ()

    def _probed_row(self, budget: float | None) -> CompileAtBudget | None:
        return next(
            (r for r in self.compile_budgets if budget is not None and abs(r.budget - budget) < 1e-6), None
        )

    def compile_factors(self, backend: str, budget: float | None = None) -> tuple[float, float]:
        """(saved-bytes ratio, time ratio) of blocks compiled with `backend` at partitioner `budget`: as probed
        at that budget, else at torch's own; (1, 1) when eager or not probed for that backend."""
        if not backend or backend != self.compile_backend:
            return 1.0, 1.0
        row = self._probed_row(budget)
        return (
            (row.saved_ratio, row.time_ratio) if row else (self.compile_saved_ratio, self.compile_time_ratio)
        )

    def partitioner_budgets(self, backend: str) -> tuple[float, ...]:
        """The partitioner budgets probed for `backend`, highest first (none when not probed for it)."""
        if not backend or backend != self.compile_backend:
            return ()
        return tuple(sorted((r.budget for r in self.compile_budgets), reverse=True))

    def kernel_options(self, workload: Workload) -> dict[str, Any]:
        """The MemoryOptions fields that follow from the device rather than the plan (the one place they are
        derived): the ops take torch's CPU kernels on a CPU device, and blocks compiled as `workload` says
        (backend, partitioner budget) keep the probed share of eager's saved bytes (`compile_factors`)."""
        saved = self.compile_factors(workload.compile, workload.compile_memory_budget)[0]
        return {"cpu_kernels": self.kind == "cpu", "compile_saved_ratio": saved}

    def compile_note(self, backend: str, budget: float | None) -> str:
        """What a plan with blocks compiled by `backend` (at partitioner `budget`) is costed on ("" eager)."""
        if not backend:
            return ""
        at = f" at partitioner budget {budget}" if budget is not None else ""
        if backend != self.compile_backend:
            return (
                f"blocks compiled with {backend}{at}: costed as eager (the device was not probed for {backend}: "
                f"`memtier probe --compile {backend}`), an upper bound on the saved bytes"
            )
        saved, time = self.compile_factors(backend, budget)
        probed = "" if budget is None or self._probed_row(budget) else " (probed at torch's own budget)"
        return f"blocks compiled with {backend}{at}: saved bytes x{saved:.2f}, block time x{time:.2f} of eager, as probed{probed}"

    def flops(self, dtype: str) -> float:
        if dtype in self.peak_flops:
            return self.peak_flops[dtype]
        if dtype == "fp32" and "tf32" in self.peak_flops:
            return self.peak_flops["tf32"]
        raise SpecError(
            f"no peak FLOP/s for dtype {dtype!r}; known: {', '.join(self.peak_flops)}",
            field="device.peak_flops",
        )


@dataclass(frozen=True, kw_only=True)
class TierSpec:
    kind: TierKind
    capacity: int = field(metadata={"unit": "bytes", "positive": True})  # bytes per node
    read_bandwidth: float = field(metadata={"unit": "bandwidth", "positive": True})
    write_bandwidth: float = field(metadata={"unit": "bandwidth", "positive": True})
    latency: float = field(default=1e-6, metadata={"unit": "time", "min": 0})
    path: str | None = None  # nvme: a directory for swap files
    numa_node: int | None = None  # cxl: the CPU-less NUMA node of the expander

    def __post_init__(self) -> None:
        if self.path is not None and not str(self.path).strip():
            raise SpecError("an empty path; give the directory for swap files, or leave it out", field="path")


@dataclass(frozen=True, kw_only=True)
class CpuSpec:
    cores: int = field(default=32, metadata=_POS)
    peak_flops: float = field(default=2e12, metadata={"unit": "flops", "positive": True})  # fp32 GEMM
    adam_params_per_s: float = field(default=1.0e9, metadata=_POS)  # fused CPU AdamW update rate
    # host memory one training process holds before any model state: the interpreter, torch and the model
    # library (and a CUDA context where there is a GPU); `memtier probe` measures it, presets leave it 0
    process_memory: int = field(default=0, metadata={"unit": "bytes", "min": 0})


@dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    name: str
    # the largest machines built have ~1e5 accelerators; a bigger count is a typo, not a cluster
    nodes: int = field(default=1, metadata={"positive": True, "max": MAX_NODES})
    devices_per_node: int = field(metadata=_POS)
    device: DeviceSpec
    links: Links
    host: tuple[TierSpec, ...] = ()
    cpu: CpuSpec = field(default_factory=CpuSpec)

    def __post_init__(self) -> None:
        for i, o in enumerate(self.links.overrides):
            for end in o.between:
                node, dev = _parse(end)
                if node >= self.nodes:
                    raise ValueError(f"links.overrides[{i}]: node n{node} >= nodes({self.nodes})")
                if dev is not None and dev >= self.devices_per_node:
                    raise ValueError(
                        f"links.overrides[{i}]: device d{dev} >= devices_per_node({self.devices_per_node})"
                    )

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    def tier(self, kind: str) -> TierSpec | None:
        return next((t for t in self.host if t.kind == kind), None)

    def device_name(self, rank: int) -> str:
        return f"n{rank // self.devices_per_node}:d{rank % self.devices_per_node}"

    def with_nodes(self, nodes: int) -> ClusterSpec:
        """The same fabric with `nodes` nodes; overrides naming nodes beyond it are dropped."""
        if not 1 <= nodes <= MAX_NODES:
            raise SpecError(f"must be between 1 and {MAX_NODES}, got {nodes}", field="--nodes")
        kept = tuple(o for o in self.links.overrides if all(_parse(e)[0] < nodes for e in o.between))
        return dataclasses.replace(
            self,
            name=f"{self.name}" if nodes == self.nodes else f"{self.name}x{nodes}n",
            nodes=nodes,
            links=dataclasses.replace(self.links, overrides=kept),
        )

    # ---- link resolution ------------------------------------------------------------
    def link(self, a: int, b: int) -> Link:
        """The link between global device ranks a and b (a != b)."""
        na, nb = a // self.devices_per_node, b // self.devices_per_node
        da, db = a % self.devices_per_node, b % self.devices_per_node
        base = self.links.intra_node if na == nb else self.links.inter_node
        node_hit: LinkOverride | None = None
        for o in self.links.overrides:
            (n1, d1), (n2, d2) = (_parse(e) for e in o.between)
            if d1 is not None and d2 is not None:
                if {(n1, d1), (n2, d2)} == {(na, da), (nb, db)}:
                    return Link(
                        bandwidth=o.bandwidth, latency=o.latency if o.latency is not None else base.latency
                    )
            elif {n1, n2} == {na, nb} and (n1 != n2 or na == nb):
                node_hit = o
        if node_hit is not None:
            lat = node_hit.latency if node_hit.latency is not None else base.latency
            return Link(bandwidth=node_hit.bandwidth, latency=lat)
        return base

    @cached_property
    def _matrices(self) -> tuple[np.ndarray, np.ndarray]:
        n, d = self.world_size, self.devices_per_node
        node = np.arange(n) // d
        same = node[:, None] == node[None, :]
        bw = np.where(same, self.links.intra_node.bandwidth, self.links.inter_node.bandwidth).astype(float)
        lat = np.where(same, self.links.intra_node.latency, self.links.inter_node.latency).astype(float)
        node_over = [o for o in self.links.overrides if all(_parse(e)[1] is None for e in o.between)]
        pair_over = [o for o in self.links.overrides if all(_parse(e)[1] is not None for e in o.between)]
        for o in node_over:
            (n1, _), (n2, _) = (_parse(e) for e in o.between)
            mask = ((node[:, None] == n1) & (node[None, :] == n2)) | (
                (node[:, None] == n2) & (node[None, :] == n1)
            )
            bw[mask] = o.bandwidth
            if o.latency is not None:
                lat[mask] = o.latency
        for o in pair_over:
            (n1, d1), (n2, d2) = (_parse(e) for e in o.between)
            i, j = n1 * d + (d1 or 0), n2 * d + (d2 or 0)
            bw[i, j] = bw[j, i] = o.bandwidth
            if o.latency is not None:
                lat[i, j] = lat[j, i] = o.latency
        np.fill_diagonal(bw, np.inf)
        np.fill_diagonal(lat, 0.0)
        return bw, lat

    def bandwidth_matrix(self) -> np.ndarray:
        """bytes/s between every pair of global device ranks (inf on the diagonal)."""
        return self._matrices[0]

    def latency_matrix(self) -> np.ndarray:
        return self._matrices[1]

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "nodes": self.nodes,
            "devices_per_node": self.devices_per_node,
            "world_size": self.world_size,
            "device": self.device.kind,
            "device_memory_bytes": self.device.memory,
            "peak_flops": dict(self.device.peak_flops),
            "intra_node_bandwidth": self.links.intra_node.bandwidth,
            "inter_node_bandwidth": self.links.inter_node.bandwidth,
            "link_overrides": len(self.links.overrides),
            "host_tiers": [
                {
                    "kind": t.kind,
                    "capacity_bytes": t.capacity,
                    "read_bw": t.read_bandwidth,
                    "write_bw": t.write_bandwidth,
                }
                for t in self.host
            ],
        }


def _parse(endpoint: str) -> tuple[int, int | None]:
    m = _ENDPOINT.match(endpoint)
    if m is None:
        raise SpecError(f"bad endpoint {endpoint!r}", field="links.overrides.between")
    return int(m.group(1)), (int(m.group(2)) if m.group(2) is not None else None)


def load_cluster(path: str | os.PathLike[str]) -> ClusterSpec:
    from planner.schema import build, load_mapping

    p = os.fspath(path)
    return build(ClusterSpec, load_mapping(p), source=p)


def cluster_to_yaml(cluster: ClusterSpec) -> str:
    import yaml

    from planner.schema import to_plain

    return yaml.safe_dump(to_plain(cluster), sort_keys=False)
