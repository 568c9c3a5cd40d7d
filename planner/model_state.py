"""Model state across device, DRAM, CXL and NVMe, streamed per transformer block (`Plan.model_state`).

When no layout keeps the model state on the device (nor with the optimizer offloaded), the parameters,
the fp32 master copy, the gradients and the optimizer moments are placed per group ("rest", then
"block.0" ... "block.{L-1}") and per kind in the cheapest tier mix that fits (ZeRO-Infinity, Rajbhandari
et al. 2021, "ZeRO-Infinity: Breaking the GPU Memory Wall for Extreme Scale Deep Learning"; Fuyou, Liao
et al. 2024, "Adding NVMe SSDs to Enable and Accelerate 100B Model Fine-tuning on a Single GPU"):

  device    what stays: first the master copy and the moments leave (the optimizer runs out of core on
            the CPU), then the gradients, then the parameters of the last blocks, one block at a time,
            streamed into a pool of (prefetch_depth + 1) block buffers (`device_state_bytes`);
  host      off-device kinds fill DRAM up to its capacity less a reserve and the staging pool (MemAscend,
            Liao et al. 2025: the host's own working set is budgeted, not assumed free), then CXL, then
            NVMe; the most-touched kinds first (parameters are read twice per micro-batch, gradients
            written per micro-batch, master and moments once per step), groups in order, so a prefix of
            blocks keeps a kind in DRAM and the rest of that kind goes to NVMe.

The time model overlaps the streams that run at once, each bound by its link (Fuyou, Sec. 4: SSD->CPU,
CPU->GPU and compute pipelined): a group's parameter read hides behind the previous group's compute,
gradients go down as backward produces them, and the out-of-core optimizer runs after backward (global-norm
clipping needs every gradient) as read / CPU update / write pipelined over groups.

Streaming runs AdamW (fp32, mixed or pure 16-bit) on one device (dp = tp = pp = cp = 1, ZeRO-0): the
runtime (`offload.state`) refuses the rest (`stream_refusal`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from planner.cluster import ClusterSpec
from planner.errors import InfeasibleError
from planner.flops import head_forward_flops
from planner.memory import MemoryBreakdown, MemoryOptions
from planner.model import ModelSpec
from planner.optimizer_state import FP32, optimizer_state_bytes_per_param
from planner.plan import ActivationPolicy, Layout, ModelStatePlan, SolverReport, StateGroup, TierName
from planner.search import Candidate, SearchResult
from planner.steptime import StepTime, block_forward_s, estimate_step_time
from planner.strategies import block_policies
from planner.strategy import StrategyResult, peak_memory, strategy_report
from planner.units import fmt_bytes
from planner.workload import Workload

HostTier = Literal["dram", "cxl", "nvme"]
HOST_TIERS: tuple[HostTier, ...] = ("dram", "cxl", "nvme")  # cheapest (fastest) first
KINDS = ("params", "grads", "master", "moments")
# the orders host tiers fill in, each tried (the step-time model picks): the most-touched kind first (see
# the module docstring), or the optimizer's state first (read and written once per step, but all of it
# after backward, where nothing hides it: Fuyou keeps it off the SSD where it can), or the gradients first
KIND_ORDERS: tuple[tuple[str, ...], ...] = (
    KINDS,
    ("moments", "master", "grads", "params"),
    ("grads", "moments", "master", "params"),
)
PREFETCH_DEPTH = 1  # groups read ahead of the one computing
IO_THREADS = 2
# the NVMe store's staging: 8 slots of 4 MiB (direct I/O through pinned, aligned buffers)
NVME_STAGING_BYTES = 8 * (4 << 20)
# the runtime's chunking of host-side state (planner.plan.ModelStatePlan.chunk_numel) and its pool of gradient
# chunk buffers (offload/state/gradients.py: POOL_CHUNKS)
CHUNK_NUMEL = 1 << 22
GRAD_POOL_CHUNKS = 8
# DRAM kept for the OS, the framework and the page tables (MemAscend: budget the host's own needs)
HOST_RESERVE_FRACTION = 0.10
# a tier is filled to this share of what is left in it: room for alignment and file metadata
FILL_FRACTION = 0.99


def state_groups(model: ModelSpec) -> tuple[tuple[str, int], ...]:
    """(name, numel) of each streamed group: "rest" (embedding, final norm, head; a tied head once), then
    every block. The numels add up to `model.params` exactly."""
    rest = model.params - model.num_layers * model.layer_params
    return (("rest", rest), *((f"block.{i}", model.layer_params) for i in range(model.num_layers)))


def stream_refusal(cluster: ClusterSpec, workload: Workload, engine: str = "torch") -> str | None:
    """Why model-state streaming cannot run this (None: it can). The runtime refuses the same."""
    opt = workload.optimizer
    if opt.kind != "adamw" or opt.state_bits or workload.layerwise:
        return "model-state streaming runs AdamW with unquantized moments and whole-step updates only"
    if cluster.world_size != 1:
        return "model-state streaming runs on one device (dp = tp = pp = cp = 1) for now"
    if engine not in ("torch", "deepspeed"):
        return f"model-state streaming runs on the torch or deepspeed engine, not {engine!r}"
    return None


@dataclass(frozen=True, kw_only=True)
class ElementBytes:
    """Bytes per element of each kind of state (the ZeRO paper's accounting, Rajbhandari et al. 2020,
    Sec. 3.1): working parameters in the training dtype, the fp32 master copy (mixed precision only), the
    gradients as the host keeps them (fp32 with a master, else the training dtype) and the moments."""

    params: int
    master: int
    grads: int
    moments: float

    @classmethod
    def of(cls, workload: Workload) -> ElementBytes:
        master = FP32 if workload.mixed_precision else 0
        return cls(
            params=workload.dtype_bytes,
            master=master,
            grads=FP32 if master else workload.dtype_bytes,
            # AdamW's two moments: K less the master (planner/optimizer_state.py)
            moments=optimizer_state_bytes_per_param(workload) - master,
        )

    def kind(self, name: str) -> float:
        return float(getattr(self, name))

    @property
    def total(self) -> float:
        return self.params + self.master + self.grads + self.moments


@dataclass(frozen=True, kw_only=True)
class DeviceLevel:
    """What stays on the device: one rung of the ladder master+moments -> gradients -> parameters."""

    name: str
    grads_off: bool
    streamed: frozenset[str]  # groups whose parameters stream


def device_levels(model: ModelSpec) -> list[DeviceLevel]:
    """The ladder, cheapest first: optimizer state off, then gradients, then the last k blocks' parameters
    (k = 1..L), then the rest group's too (it buys nothing at the peak: its buffer is held all step)."""
    L = model.num_layers
    out = [
        DeviceLevel(name="master+moments off", grads_off=False, streamed=frozenset()),
        DeviceLevel(name="+gradients off", grads_off=True, streamed=frozenset()),
    ]
    for k in range(1, L + 1):
        blocks = frozenset(f"block.{i}" for i in range(L - k, L))
        out.append(DeviceLevel(name=f"+{k}/{L} blocks streamed", grads_off=True, streamed=blocks))
    out.append(DeviceLevel(name="everything streamed", grads_off=True, streamed=out[-1].streamed | {"rest"}))
    return out


def device_state_bytes(
    groups: Sequence[tuple[str, int]], level: DeviceLevel, eb: ElementBytes, depth: int = PREFETCH_DEPTH
) -> tuple[int, int]:
    """(parameter, gradient) bytes the state holds on the device at the peak under `level` (every rung keeps
    the master copy and the moments off the device): `resident_state_bytes` of its groups."""
    off: TierName = "dram"  # (which host tier does not matter on the device)
    placed = [
        StateGroup(
            name=name,
            numel=n,
            params=off if name in level.streamed else "device",
            master=off,
            grads=off if level.grads_off else "device",
            moments=off,
        )
        for name, n in groups
    ]
    params, grads, _ = resident_state_bytes(placed, eb, depth)
    return params, grads


def resident_state_bytes(
    groups: Sequence[StateGroup], eb: ElementBytes, depth: int = PREFETCH_DEPTH
) -> tuple[int, int, int]:
    """(parameter, gradient, optimizer-state) bytes a placement holds on the device at the peak.

    Resident groups' parameters in full; streamed blocks share a pool of (depth + 1) buffers of the largest
    block; a streamed "rest" has its own buffer from its first use in forward to the end of backward.
    Gradients: resident in the gradients' dtype, or (moved off as backward makes them) one group's at a time.
    Master and moments on the device: in full.
    """
    pb = eb.params
    params = sum(g.numel for g in groups if g.params == "device") * pb
    blocks = [g.numel for g in groups if g.name != "rest"]
    if any(g.params != "device" for g in groups if g.name != "rest"):
        params += (depth + 1) * max(blocks) * pb
    params += sum(g.numel for g in groups if g.name == "rest" and g.params != "device") * pb
    # resident gradients accumulate in the gradients' dtype (fp32 with a master copy, as offload.state keeps
    # them); moved ones leave as autograd makes them: at most one group's at a time, in the training dtype
    grads = sum(g.numel for g in groups if g.grads == "device") * eb.grads
    moved = [g.numel for g in groups if g.grads != "device"]
    if moved:
        grads += max(moved) * pb
    states = sum(
        g.numel * ((eb.master if g.master == "device" else 0) + (eb.moments if g.moments == "device" else 0))
        for g in groups
    )
    return int(params), int(grads), int(states)


def staging_bytes(groups: Sequence[tuple[str, int]], eb: ElementBytes, chunk_numel: int = CHUNK_NUMEL) -> int:
    """The host staging pool as `offload.state` allocates it, once (MemAscend: sized to the transfer, not to the
    largest tensor): the out-of-core update's two work sets of one chunk each (weights -- the fp32 master, or the
    parameters without one --, gradients, the moments, and the cast-down parameters with a master), the pool of
    gradient chunk buffers, and the NVMe store's staging slots."""
    c = min(chunk_numel, max(n for _, n in groups))
    weights = eb.master or eb.params
    update = 2 * c * (weights + eb.grads + eb.moments + (eb.params if eb.master else 0))
    return int(update + GRAD_POOL_CHUNKS * c * eb.grads + NVME_STAGING_BYTES)


def tier_room(
    cluster: ClusterSpec,
    staging: int,
    swapped: dict[str, int],
    reserve: float = HOST_RESERVE_FRACTION,
    *,
    device_bytes: int = 0,
) -> dict[str, int]:
    """Bytes of state each host tier can take (per node, one device): DRAM less its reserve, the staging
    pool, the process itself and swapped activations -- and, where the device is the CPU, the device's own
    bytes (one memory serves both); CXL and NVMe less swapped activations."""
    room: dict[str, int] = {}
    for kind in HOST_TIERS:
        spec = cluster.tier(kind)
        if spec is None:
            continue
        if kind == "dram":
            free = spec.capacity * (1 - reserve) - staging - cluster.cpu.process_memory
            if cluster.device.kind == "cpu":
                free -= device_bytes
        else:
            free = spec.capacity
        room[kind] = max(0, int((free - swapped.get(kind, 0)) * FILL_FRACTION))
    return room


def cpu_device_budget(cluster: ClusterSpec, budget_bytes: int, staging: int) -> int:
    """The device budget where the device is the CPU: what its DRAM leaves after the reserve, the staging pool
    and the process (device and host share one memory); elsewhere `budget_bytes`."""
    dram = cluster.tier("dram")
    if cluster.device.kind != "cpu" or dram is None:
        return budget_bytes
    shared = int(dram.capacity * (1 - HOST_RESERVE_FRACTION)) - staging - cluster.cpu.process_memory
    return max(0, min(budget_bytes, shared))


def place_groups(
    groups: Sequence[tuple[str, int]],
    level: DeviceLevel,
    eb: ElementBytes,
    room: dict[str, int],
    order: Sequence[str] = KINDS,
) -> tuple[tuple[StateGroup, ...], dict[str, int], int]:
    """(groups with a tier per kind, bytes used per tier, bytes that fit nowhere).

    Each (group, kind) off the device goes whole to the first host tier with room for it, kinds in
    `order`, groups in order. Without a master copy the working parameters are the master: `master`
    follows `params`.
    """
    tiers: dict[str, dict[str, TierName]] = {name: {} for name, _ in groups}
    used: dict[str, int] = {}
    short = 0
    for kind in order:
        per = eb.kind(kind)
        for name, n in groups:
            on_device = (
                (kind == "params" and name not in level.streamed)
                or (kind == "grads" and not level.grads_off)
                or per == 0
            )
            if on_device:
                tiers[name][kind] = "device"
                continue
            size = int(round(n * per))
            where: HostTier | None = next(
                (t for t in HOST_TIERS if t in room and used.get(t, 0) + size <= room[t]), None
            )
            if where is None:
                short += size
                where = "nvme"
            else:
                used[where] = used.get(where, 0) + size
            tiers[name][kind] = where
    out = []
    for name, n in groups:
        t = tiers[name]
        master = t["master"] if eb.master else t["params"]
        out.append(
            StateGroup(
                name=name, numel=n, params=t["params"], master=master, grads=t["grads"], moments=t["moments"]
            )
        )
    return tuple(out), used, short


# ---- time -------------------------------------------------------------------------------------


def _tier_s(cluster: ClusterSpec, traffic: dict[str, list[float]], *, skip_dram: bool = False) -> float:
    """Seconds the busiest host tier needs for its reads and writes (one drive serves both in turn)."""
    worst = 0.0
    for kind, (read, write) in traffic.items():
        spec = cluster.tier(kind)
        if spec is None or kind == "device" or (skip_dram and kind == "dram"):
            continue
        worst = max(worst, read / spec.read_bandwidth + write / spec.write_bandwidth)
    return worst


def _add(traffic: dict[str, list[float]], tier: str, read: float = 0.0, write: float = 0.0) -> None:
    t = traffic.setdefault(tier, [0.0, 0.0])
    t[0] += read
    t[1] += write


@dataclass(frozen=True, kw_only=True)
class StreamTime:
    """Exposed seconds per step of the streams the step-time model does not see (Fuyou, Sec. 4)."""

    forward_exposed_s: float  # parameter reads not hidden behind the previous group's forward
    backward_exposed_s: float  # parameter reads and gradient writes not hidden behind backward
    optimizer_s: float  # the out-of-core update: max(read, CPU update, write) + one group's fill

    def breakdown(self) -> dict[str, float]:
        return {
            "stream_forward_exposed": self.forward_exposed_s,
            "stream_backward_exposed": self.backward_exposed_s,
            "optimizer_out_of_core": self.optimizer_s,
        }


def cpu_copy_s(
    cluster: ClusterSpec, groups: Sequence[StateGroup], eb: ElementBytes, m: int
) -> tuple[float, float]:
    """(forward/backward, optimizer) seconds of copies where the device is the CPU: the cores that compute also
    move the bytes -- parameters from the staging slots into their buffer (read before forward and before
    backward), each gradient into the host accumulation with its 2-norm (and, after the first micro-batch,
    the partial sum read back and added), and the optimizer's operands into and out of its work sets
    (offload/state: every access is a copy). (0, 0) on an accelerator."""
    dev = cluster.device
    if dev.kind != "cpu":
        return 0.0, 0.0
    pb, gb = eb.params, eb.grads
    moved = 0.0
    for g in groups:
        if g.params != "device":
            moved += 2 * m * g.numel * pb
        moved += g.numel * gb * (2 * m + 2 * (m - 1))
    weights = eb.master or pb
    # weights read + written, gradients read, both moments read + written, the cast-down parameters written
    per = 2 * weights + gb + 2 * eb.moments + (pb if eb.master else 0)
    numel = sum(g.numel for g in groups)
    return moved / dev.memory_bandwidth, numel * per / dev.memory_bandwidth


def stream_time(
    model: ModelSpec,
    cluster: ClusterSpec,
    workload: Workload,
    layout: Layout,
    groups: Sequence[StateGroup],
    recomputed: frozenset[int],
    depth: int = PREFETCH_DEPTH,
) -> StreamTime:
    """Per step: the streams' exposed time and the out-of-core optimizer.

    Per micro-batch each streamed group's parameters are read from their tier and sent over the host link
    (pipelined in chunks through the staging pool: the slower hop bounds it) ahead of its forward and again
    ahead of its backward, hidden behind `depth` groups' compute (exposed = max(0, io - compute)); the first
    group of a pass has nothing to hide behind. Backward also sends each off-device gradient down and
    writes it to its tier (reading the partial sum back first from the second micro-batch on). The
    optimizer runs after backward, pipelined over groups: max(tier reads and writes, CPU update at
    `adam_params_per_s`, parameter uploads / gradient downloads) + one group's read and write (the fill).
    """
    eb = ElementBytes.of(workload)
    dev = cluster.device
    link = float("inf") if dev.kind == "cpu" else dev.host_link.bandwidth
    tokens = layout.micro_batch * workload.seq_len
    fwd = block_forward_s(model, cluster, workload, tokens=tokens)
    head = head_forward_flops(model, tokens) / (dev.flops(workload.dtype) * dev.efficiency)
    m = layout.grad_accum
    pb, gb = eb.params, eb.grads

    def read_io(g: StateGroup) -> float:
        if g.params == "device":
            return 0.0
        traffic: dict[str, list[float]] = {}
        _add(traffic, g.params, read=g.numel * pb)
        return max(g.numel * pb / link, _tier_s(cluster, traffic))

    def backward_io(g: StateGroup) -> float:
        traffic: dict[str, list[float]] = {}
        h2d = d2h = 0.0
        if g.params != "device":
            h2d = g.numel * pb / link
            _add(traffic, g.params, read=g.numel * pb)
        if g.grads != "device":
            d2h = g.numel * pb / link
            _add(traffic, g.grads, write=g.numel * gb)
        return max(h2d, d2h, _tier_s(cluster, traffic))

    def accumulate_read_s(g: StateGroup) -> float:
        """From the second micro-batch on, the gradient hook adds to the partial sum read back from the tier
        (offload/state/gradients.py); the read starts when the block's backward does, so the block's backward
        hides part of it -- counted as exposed here, as it shares the drive with the parameter reads."""
        if g.grads == "device":
            return 0.0
        traffic: dict[str, list[float]] = {}
        _add(traffic, g.grads, read=g.numel * gb)
        return _tier_s(cluster, traffic)

    blocks = [g for g in groups if g.name != "rest"]
    rest = next((g for g in groups if g.name == "rest"), None)
    # forward: rest (embedding) first, then the blocks; a group hides behind the previous group's forward
    forward = read_io(rest) if rest is not None else 0.0
    prev = 0.0  # the embedding's compute: negligible
    for g in blocks:
        forward += max(0.0, read_io(g) - depth * prev)
        prev = fwd
    # backward: the head's backward, then the blocks last to first; the rest group's buffer is still
    # there (held to the end of backward), its gradient goes down last with nothing to hide behind
    backward = 0.0
    prev = 2 * head
    for i in range(len(blocks) - 1, -1, -1):
        g = blocks[i]
        backward += max(0.0, backward_io(g) - depth * prev)
        prev = fwd * (3 if i in recomputed else 2)
    if rest is not None and rest.grads != "device":
        backward += backward_io(dataclasses.replace(rest, params="device"))
    accumulate = (m - 1) * sum(accumulate_read_s(g) for g in groups)

    # the out-of-core optimizer (DRAM-resident state is updated in place: the CPU rate covers it)
    numel = sum(g.numel for g in groups)
    update = numel / cluster.cpu.adam_params_per_s
    traffic: dict[str, list[float]] = {}
    up = down = fill = 0.0
    for g in groups:
        one: dict[str, list[float]] = {}
        for t, r, w in (
            (g.grads, g.numel * gb, 0.0),
            (g.moments, g.numel * eb.moments, g.numel * eb.moments),
            (g.master, g.numel * eb.master, g.numel * eb.master),
            (g.params, 0.0, g.numel * pb),
        ):
            if t != "device":
                _add(traffic, t, read=r, write=w)
                _add(one, t, read=r, write=w)
        if g.params == "device":
            up += g.numel * pb / link  # the updated parameters back to the device
        if g.grads == "device":
            down += g.numel * pb / link  # resident gradients down to the CPU update
        fill = max(fill, _tier_s(cluster, one, skip_dram=True) + g.numel / cluster.cpu.adam_params_per_s)
    optimizer = max(update, up, down, _tier_s(cluster, traffic, skip_dram=True)) + fill
    cpu_copies, opt_copies = cpu_copy_s(cluster, groups, eb, m)
    optimizer += opt_copies
    return StreamTime(
        forward_exposed_s=m * forward,
        backward_exposed_s=m * backward + accumulate + cpu_copies,
        optimizer_s=optimizer,
    )


# ---- the search ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class StreamedState:
    """The placement that won, with its device breakdown, host bytes and step time."""

    layout: Layout
    state: ModelStatePlan
    level: str  # the device ladder's rung, in words
    activation_strategy: str  # keep_all, recompute_block, recompute_all
    options: MemoryOptions  # the activation policy (what `planner.memory` costs the rest of the step with)
    memory: MemoryBreakdown  # the device peak: the state's terms + the rest of the step
    time: StepTime  # step_s with the streams' exposed time in it (swap_s holds it; see time_breakdown)
    time_breakdown: dict[str, float]
    host_bytes: dict[str, int]  # per host tier: model state and swapped activations
    tier_room: dict[str, int]  # per host tier: what the state could have taken
    host_peak_bytes: int
    master: bool = True  # an fp32 master copy (mixed precision); without it `StateGroup.master` is moot

    def candidate(self, layout: Layout, budget_bytes: int) -> tuple[Candidate, SearchResult]:
        """As the layout search's answer (one candidate, "opt:stream"), for `planner.planning.PlanResult`."""
        return _candidate_of(self, layout, budget_bytes)

    def notes(self, budget_bytes: int) -> tuple[str, ...]:
        """The plan's notes: the numbers, where each kind lives, and what is exposed where."""
        t, parts = self.time, self.time_breakdown
        tiers = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in sorted(self.host_bytes.items()))
        return (
            f"{self.layout.describe()} {self.activation_strategy}, model state streamed ({self.level}):"
            f" {t.step_s:.3f} s per step, {t.tflops_per_device:.1f} TFLOP/s per device (MFU {100 * t.mfu:.1f}%),"
            f" device peak {fmt_bytes(self.memory.total)} of {fmt_bytes(budget_bytes)}, host peak"
            f" {fmt_bytes(self.host_peak_bytes)} (staging {fmt_bytes(self.state.staging_bytes)}); state in {tiers}.",
            "where: "
            + "; ".join(
                f"{kind} {where_kind(self.state.groups, kind)}"
                for kind in KINDS
                if self.master or kind != "master"
            )
            + ".",
            "nothing fits with the model state on the device, so it streams per block (ZeRO-Infinity; Fuyou):"
            f" exposed per step: forward parameter reads {parts['stream_forward_exposed']:.3f} s, backward"
            f" parameter reads + gradient writes {parts['stream_backward_exposed']:.3f} s, out-of-core CPU"
            f" optimizer {parts['optimizer_out_of_core']:.3f} s after backward (compute {parts['compute']:.3f} s).",
        )


def _candidate_of(s: StreamedState, layout: Layout, budget_bytes: int) -> tuple[Candidate, SearchResult]:
    total = s.memory.total
    state_report = SolverReport(
        problem="model_state", strategy="ladder", status="feasible", objective=s.time.step_s
    )
    opt = StrategyResult(
        kind="optimizer", strategy="stream", options=s.options, device_bytes=total, host_bytes=s.host_bytes,
        report=state_report,
    )  # fmt: skip
    act = StrategyResult(
        kind="activations", strategy=s.activation_strategy, options=s.options, device_bytes=total,
        memory=s.memory, report=strategy_report("activations", s.activation_strategy, True, total),
    )  # fmt: skip
    chosen = Candidate(
        layout=layout, split="even", optimizer=opt, activations=act, memory=s.memory, time=s.time,
        budget_bytes=budget_bytes,
    )  # fmt: skip
    report = SolverReport(problem="layout", strategy="enumerate", status="feasible", objective=s.time.step_s)
    search_result = SearchResult(
        ranked=(chosen,), budget_bytes=budget_bytes, shapes=1, configurations=1, pruned_by_states=0,
        solved=1, timed=1, seconds=0.0, mapping_seconds=0.0, closest=None, report=report,
    )  # fmt: skip
    return chosen, search_result


def where_kind(groups: Sequence[StateGroup], kind: str) -> str:
    """One kind's tiers in words, as runs of groups: "dram rest..block.29, nvme block.30..block.39"."""
    runs: list[list[str]] = []
    for g in groups:
        tier = g.tiers()[kind]
        if runs and runs[-1][0] == tier:
            runs[-1][2] = g.name
        else:
            runs.append([tier, g.name, g.name])
    return ", ".join(f"{t} {a}" + (f"..{b}" if b != a else "") for t, a, b in runs)


@dataclass(frozen=True, kw_only=True)
class StateShortfall:
    """Nothing fits: on the device even with every group streamed, or in the host tiers."""

    where: Literal["device", "host"]
    need_bytes: int
    have_bytes: int
    detail: str

    @property
    def short_bytes(self) -> int:
        return max(0, self.need_bytes - self.have_bytes)


def _non_state(
    model: ModelSpec, workload: Workload, layout: Layout, loss_chunk_tokens: int
) -> list[tuple[MemoryOptions, MemoryBreakdown, int]]:
    """Per count n of recomputed blocks (0..L): options, breakdown and device bytes besides the model state
    (`planner.memory.estimate_memory` with `stream_state_bytes` (0, 0): activations, logits, loss,
    temporaries of one micro-batch)."""
    out = []
    for n in range(model.num_layers + 1):
        options = MemoryOptions(
            policies=block_policies(model, layout, n),
            loss_chunk_tokens=loss_chunk_tokens,
            stream_state_bytes=(0, 0),
        )
        mem = peak_memory(model, workload, layout, options, same_policy_per_stage=True)
        out.append((options, mem, mem.total))
    return out


def _activation_name(n: int, layers: int) -> str:
    return "keep_all" if n == 0 else "recompute_all" if n == layers else "recompute_block"


def _candidate(
    model: ModelSpec,
    cluster: ClusterSpec,
    workload: Workload,
    layout: Layout,
    level: DeviceLevel,
    placed: tuple[tuple[StateGroup, ...], dict[str, int]],
    non_state: tuple[MemoryOptions, MemoryBreakdown, int],
    n: int,
    dev_state: tuple[int, int],
    room: dict[str, int],
    staging: int,
) -> StreamedState:
    groups, used = placed
    eb = ElementBytes.of(workload)
    options, mem, rest_bytes = non_state
    params, grads = dev_state
    policies: tuple[ActivationPolicy, ...] = options.policies if n else ()
    st = stream_time(model, cluster, workload, layout, groups, frozenset(range(n)))
    timed = dataclasses.replace(options, policies=policies, stream_state_bytes=None)
    base = estimate_step_time(model, cluster, workload, layout, timed)
    exposed = st.forward_exposed_s + st.backward_exposed_s
    step = base.step_s - base.optimizer_s + st.optimizer_s + exposed
    achieved = base.model_flops / step
    peak = cluster.device.flops(workload.dtype)
    t = dataclasses.replace(
        base,
        optimizer_s=st.optimizer_s,
        swap_s=base.swap_s + exposed,
        step_s=step,
        tflops_per_device=achieved / 1e12,
        mfu=min(1.0, achieved / peak),
        hfu=min(1.0, base.hardware_flops / step / peak),
    )
    breakdown = {**base.breakdown(), "optimizer": 0.0, **st.breakdown()}
    memory = dataclasses.replace(mem, parameters=params, gradients=grads, host_bytes=dict(used))
    host = dict(used)  # (the block baselines swap no activations: the state is all the host tiers hold)
    cpu_device = memory.total if cluster.device.kind == "cpu" else 0
    state = ModelStatePlan(
        stream=True,
        prefetch_depth=PREFETCH_DEPTH,
        groups=groups,
        staging_bytes=staging,
        io_threads=IO_THREADS,
        chunk_numel=CHUNK_NUMEL,
    )
    return StreamedState(
        layout=layout,
        state=state,
        level=level.name,
        activation_strategy=_activation_name(n, model.num_layers),
        options=dataclasses.replace(options, policies=policies, stream_state_bytes=(params, grads)),
        memory=memory,
        time=t,
        time_breakdown=breakdown,
        host_bytes=host,
        tier_room=room,
        # the process itself (interpreter, torch, model library: probed) holds memory before any of this
        host_peak_bytes=staging + used.get("dram", 0) + cpu_device + cluster.cpu.process_memory,
        master=bool(eb.master),
    )


def plan_model_state(
    model: ModelSpec,
    cluster: ClusterSpec,
    workload: Workload,
    *,
    budget_bytes: int,
    micro_batches: Sequence[int],
    loss_chunk_tokens: int = 0,
    stream_all: bool = False,
) -> StreamedState | StateShortfall:
    """The fastest placement that fits the device budget and the host tiers; ties go to the cheaper rung.

    Per micro-batch (ascending; a micro-batch whose leanest rung misses the device ends the search) and per
    rung of the device ladder, the fewest recomputed blocks that fit (Megatron's block method), the host
    placement, and the step time. A rung where every block is kept ends the ladder: moving more off the
    device only adds traffic. `stream_all` tries only the last rung (every group streamed: what a
    benchmark of the runtime's streaming wants on a model that would fit).
    """
    eb = ElementBytes.of(workload)
    groups = state_groups(model)
    staging = staging_bytes(groups, eb)
    budget_bytes = cpu_device_budget(cluster, budget_bytes, staging)
    levels = device_levels(model)[-1:] if stream_all else device_levels(model)
    best: StreamedState | None = None
    host_miss: StateShortfall | None = None
    device_miss: StateShortfall | None = None
    for mb in micro_batches:
        layout = Layout(dp=1, micro_batch=mb, grad_accum=workload.global_batch // mb)
        costs = _non_state(model, workload.replace(micro_batch=mb), layout, loss_chunk_tokens)
        fitted = False
        for level in levels:
            dev = device_state_bytes(groups, level, eb)
            n = next((i for i, c in enumerate(costs) if c[2] + sum(dev) <= budget_bytes), None)
            if n is None:
                need = costs[-1][2] + sum(dev)
                if device_miss is None or need < device_miss.need_bytes:
                    device_miss = StateShortfall(
                        where="device",
                        need_bytes=need,
                        have_bytes=budget_bytes,
                        detail=f"mb{mb} {level.name}",
                    )
                continue
            fitted = True
            room = tier_room(cluster, staging, {}, device_bytes=costs[n][2] + sum(dev))
            for order in KIND_ORDERS:
                placed, used, short = place_groups(groups, level, eb, room, order)
                if short:
                    need = sum(used.values()) + short
                    if host_miss is None or need < host_miss.need_bytes:
                        host_miss = StateShortfall(
                            where="host", need_bytes=need, have_bytes=sum(room.values()), detail=level.name
                        )
                    break  # (every order needs the same bytes)
                cand = _candidate(
                    model, cluster, workload, layout, level, (placed, used), costs[n], n, dev, room, staging
                )
                if best is None or cand.time.step_s < best.time.step_s * (1 - 1e-9):
                    best = cand
            if n == 0:
                break
        if not fitted:
            break
    if best is not None:
        return best
    if host_miss is not None:
        return host_miss
    assert device_miss is not None or not micro_batches
    return device_miss or StateShortfall(where="device", need_bytes=0, have_bytes=budget_bytes, detail="")


class HostTiersShortError(InfeasibleError):
    """The host tiers cannot hold the streamed model state (exit 3): `host_need_bytes` of state off the
    device against `host_have_bytes` of room; `need_bytes` / `have_bytes` are the device's, as for every
    InfeasibleError (`make_plan` fills them from the layout search)."""

    def __init__(
        self,
        message: str,
        *,
        need_bytes: int,
        have_bytes: int,
        host_need_bytes: int,
        host_have_bytes: int,
        alternatives: Sequence[str] = (),
    ) -> None:
        super().__init__(message, need_bytes=need_bytes, have_bytes=have_bytes, alternatives=alternatives)
        self.host_need_bytes = host_need_bytes
        self.host_have_bytes = host_have_bytes

    @property
    def host_short_bytes(self) -> int:
        return max(0, self.host_need_bytes - self.host_have_bytes)


def host_shortfall_advice(
    model: ModelSpec, cluster: ClusterSpec, workload: Workload, miss: StateShortfall, fits_pure: bool
) -> tuple[str, list[str]]:
    """The exit-3 message of a model whose state the host tiers cannot hold, and what would fit."""
    eb = ElementBytes.of(workload)
    parts = f"params {eb.params:g} + master {eb.master:g} + grads {eb.grads:g} + moments {eb.moments:g}"
    rooms = ", ".join(
        f"{t} {fmt_bytes(r)}"
        for t, r in tier_room(cluster, staging_bytes(state_groups(model), eb), {}).items()
    )
    message = (
        f"the model state does not fit the host tiers: {model.params:,} parameters x {eb.total:g} B ({parts})"
        f" = {fmt_bytes(model.params * eb.total)}; off the device that needs {fmt_bytes(miss.need_bytes)}, the"
        f" tiers take {fmt_bytes(miss.have_bytes)} ({rooms}; DRAM less a {100 * HOST_RESERVE_FRACTION:.0f}%"
        f" reserve and the staging pool): short by {fmt_bytes(miss.short_bytes)}"
    )
    alternatives = []
    if workload.mixed_precision:
        pure = ElementBytes.of(workload.replace(precision="pure"))
        alternatives.append(
            f"pure {workload.dtype} (--precision pure, or any): no master, {workload.dtype} gradients and"
            f" moments, {pure.total:g} B/param = {fmt_bytes(model.params * pure.total)}"
            + (" - fits" if fits_pure else " - does not fit either")
        )
    nvme = cluster.tier("nvme")
    if nvme is not None:
        want = nvme.capacity + miss.short_bytes / FILL_FRACTION
        alternatives.append(
            f"an NVMe drive of at least {fmt_bytes(want)} ({want / 1e12:.1f} TB; has {fmt_bytes(nvme.capacity)},"
            f" {nvme.capacity / 1e12:.1f} TB)"
        )
    return message, alternatives


__all__ = [
    "DeviceLevel",
    "ElementBytes",
    "HostTiersShortError",
    "StateShortfall",
    "StreamTime",
    "StreamedState",
    "device_levels",
    "device_state_bytes",
    "host_shortfall_advice",
    "place_groups",
    "resident_state_bytes",
    "plan_model_state",
    "state_groups",
    "staging_bytes",
    "stream_refusal",
    "stream_time",
    "tier_room",
]
