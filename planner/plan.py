"""The Plan: the one contract between the planner and the runtime.

A frozen, JSON-serialisable record of every decision the planner made (parallel
layout, per-layer activation policy, optimizer-state placement, loss, tiers) and of
what it predicts (bytes per tier, step time, MFU). The runtime reads decisions
from here and never re-derives them; benchmarks check `predicted`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from planner.cluster import ClusterSpec
from planner.errors import SpecError
from planner.model import ModelSpec
from planner.schema import atomic_write_text, build, to_plain
from planner.workload import OptimizerKind, Precision, StateBits, Workload

# 1.1: Layout.engine; OptimizerPlan.cpu_kernel, schedule, max_grad_norm; SolverReport.problem (was "stage").
# 1.2: OptimizerPlan.precision, layerwise, state_bits (the memory modes; `planner.workload`).
# 1.3: Plan.model_state (parameters, gradients and optimizer state streamed from host tiers); Predicted.host_peak_bytes.
# 1.4: Workload.lora_rank, lora_targets (LoRA: only the adapters train; `planner.lora`).
# 1.5: ModelSpec.attn_dropout, hidden_dropout, embd_dropout (what dropout keeps; `planner.activation_elems`).
# 1.6: Workload.compile, compile_memory_budget (the blocks run under torch.compile); DeviceSpec.compile_backend,
#      compile_saved_ratio, compile_time_ratio (what compile changes, probed).
# 1.7: DeviceSpec.compile_budgets (what compile changes, probed at several partitioner budgets: `memtier plan
#      --compile` picks Workload.compile_memory_budget among them).
# A 1.0 to 1.6 file loads with the defaults (see `upgrade`).
SCHEMA_VERSION = "1.7"
SUPPORTED_MAJOR = 1

TierName = Literal["device", "dram", "cxl", "nvme"]
# what runs the step: torch (DDP / FSDP2 / DTensor TP / pipelining), DeepSpeed (ZeRO DP), or HF accelerate
Engine = Literal["torch", "deepspeed", "accelerate"]
# the offloaded optimizer's CPU update kernel: torch's fused AdamW, or DeepSpeed's CPU Adam
CpuKernel = Literal["torch_fused", "deepspeed"]
# how a solve ended (planner.mip.common re-exports it for the MIPs):
#   optimal:    solved to within gap_rel
#   feasible:   a heuristic's answer that fits (no optimality claim)
#   time_limit: the MIP stopped at its time limit with a feasible answer (gap reported)
#   infeasible: nothing fits; the solution says by how many bytes
#   fallback:   the MIP did not beat the best heuristic, whose answer is returned
SolverStatus = Literal["optimal", "feasible", "time_limit", "infeasible", "fallback"]
# which side updates each subgroup of an offloaded optimizer: as `OptimizerPlan.subgroups` say ("plan"), all
# on the CPU, or all on the device
UpdateSchedule = Literal["plan", "cpu", "device"]
_FRACTION = {"min": 0.0, "max": 1.0}
_EPS = 1e-9


@dataclass(frozen=True, kw_only=True)
class Layout:
    dp: int = field(default=1, metadata={"positive": True})
    tp: int = field(default=1, metadata={"positive": True})
    pp: int = field(default=1, metadata={"positive": True})
    cp: int = field(default=1, metadata={"positive": True})
    micro_batch: int = field(default=1, metadata={"positive": True})
    grad_accum: int = field(default=1, metadata={"positive": True})
    zero_stage: int = field(default=0, metadata={"min": 0, "max": 3})
    sequence_parallel: bool = False
    # the embeddings and the LM head split by vocabulary over tp (Megatron's vocab-parallel layers); memtier's
    # trainer keeps them whole on every tp rank (False), as the planner then costs them
    vocab_parallel: bool = False
    stage_layers: tuple[int, ...] = ()  # transformer blocks per pipeline stage
    # interleaved 1F1B: each device holds this many model chunks (Narayanan et al. 2021, Sec. 2.2.2;
    # Megatron's --num-layers-per-virtual-pipeline-stage); 1 is plain 1F1B
    virtual_stages: int = field(default=1, metadata={"positive": True})
    rank_to_device: tuple[str, ...] = ()  # logical rank -> "nN:dM"
    engine: Engine = "torch"

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    @property
    def vocab_shards(self) -> int:
        """How many ways the embeddings, the head and the logits are split: tp when vocab-parallel, else 1."""
        return self.tp if self.vocab_parallel else 1

    def describe(self) -> str:
        s = f"dp{self.dp} tp{self.tp} pp{self.pp}"
        if self.virtual_stages > 1:
            s += f"v{self.virtual_stages}"
        if self.cp > 1:
            s += f" cp{self.cp}"
        return s + f" mb{self.micro_batch} ga{self.grad_accum} z{self.zero_stage}"


@dataclass(frozen=True, kw_only=True)
class ActivationPolicy:
    """What happens to one transformer block's saved activations, as token fractions.

    MEMO (Zhao et al. 2024) splits each block's activations along the sequence:
    `swap_fraction` of the tokens go to `swap_tier` in forward and come back in
    backward, `recompute_fraction` are dropped and recomputed, the rest stay.
    """

    layer: int = field(metadata={"min": 0})
    keep_fraction: float = field(default=1.0, metadata=_FRACTION)
    swap_fraction: float = field(default=0.0, metadata=_FRACTION)
    recompute_fraction: float = field(default=0.0, metadata=_FRACTION)
    swap_tier: TierName = "dram"
    buffer_offsets: tuple[int, ...] = ()  # byte offsets in the reuse arena, per saved tensor
    buffer_bytes: tuple[int, ...] = ()  # aligned bytes of each saved tensor at buffer_offsets
    # fetch the swapped share one block ahead (during the backward of the next swapped block) so the copy
    # hides behind compute; False where nothing would hide it (a CPU device swapping to DRAM/CXL: the
    # copy runs on the compute cores), fetched at its own backward and never two blocks on the device
    prefetch: bool = True

    def __post_init__(self) -> None:
        if len(self.buffer_bytes) != len(self.buffer_offsets):
            raise ValueError(
                f"layer {self.layer}: {len(self.buffer_bytes)} buffer_bytes for {len(self.buffer_offsets)}"
                " buffer_offsets"
            )
        total = self.keep_fraction + self.swap_fraction + self.recompute_fraction
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"layer {self.layer}: keep({self.keep_fraction}) + swap({self.swap_fraction}) + "
                f"recompute({self.recompute_fraction}) = {total} != 1"
            )

    @property
    def kind(self) -> str:
        if self.recompute_fraction >= 1 - _EPS:
            return "recompute"
        if self.swap_fraction >= 1 - _EPS:
            return "swap"
        if self.keep_fraction >= 1 - _EPS:
            return "keep"
        return "mixed"


@dataclass(frozen=True, kw_only=True)
class Subgroup:
    index: int = field(metadata={"min": 0})
    numel: int = field(metadata={"min": 0})
    tier: TierName = "dram"  # where its fp32 master weights and moments live
    update_side: Literal["cpu", "device"] = "cpu"  # expected side of its update


@dataclass(frozen=True, kw_only=True)
class OptimizerPlan:
    kind: OptimizerKind = "adamw"
    settings: dict[str, Any] = field(default_factory=dict)
    offload: bool = False  # state lives off the device
    tier: TierName = "device"
    subgroup_size: int = field(default=0, metadata={"min": 0})  # elements per subgroup; 0: one per tensor
    subgroups: tuple[Subgroup, ...] = ()
    device_update_fraction: float = field(default=1.0, metadata=_FRACTION)  # expected per-step share
    # one fixed kernel and one fixed schedule: an "auto" choice measured in each process would differ
    # between data-parallel ranks (the kernels round differently) and drift them apart
    cpu_kernel: CpuKernel = "torch_fused"
    schedule: UpdateSchedule = "cpu"  # "plan" where the planner placed subgroups (interleaved offload)
    max_grad_norm: float = field(default=1.0, metadata={"min": 0.0})  # global-norm clipping; 0 = off
    # the memory modes (`planner.workload`): fp32 master copy or pure 16-bit; each parameter stepped and its
    # gradient freed in backward (optim.LayerwiseStepper); moments in 8 or 4 bits (0: not quantized)
    precision: Precision = "mixed"
    layerwise: bool = False
    state_bits: StateBits = 0

    def __post_init__(self) -> None:
        if self.layerwise and self.max_grad_norm:
            raise SpecError(
                f"layer-wise updates step each parameter before the others' gradients exist: global-norm"
                f" clipping is impossible, got max_grad_norm={self.max_grad_norm!r} (use 0)",
                field="max_grad_norm",
            )
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise SpecError(
                f"must be a finite number >= 0, got {self.max_grad_norm!r}", field="max_grad_norm"
            )


@dataclass(frozen=True, kw_only=True)
class LossPlan:
    kind: Literal["standard", "chunked"] = "standard"
    chunk_size: int = field(default=0, metadata={"min": 0})  # tokens per chunk


@dataclass(frozen=True, kw_only=True)
class TierPlan:
    kind: TierName
    capacity_bytes: int = field(metadata={"min": 0})  # hard cap the runtime enforces
    path: str | None = None
    numa_node: int | None = None
    direct_io: bool = True
    block_bytes: int = field(default=1 << 20, metadata={"positive": True})
    # per-chunk CRC32 of swap and state files, verified on read: on by default (a flipped bit must not come
    # back as data); `memtier plan --no-checksum` turns it off
    checksum: bool = True

    def __post_init__(self) -> None:
        if self.path is not None and not str(self.path).strip():
            raise SpecError("an empty path; give the directory for swap files, or leave it out", field="path")


@dataclass(frozen=True, kw_only=True)
class StateGroup:
    """Where each kind of one group's model state lives between uses.

    A group is the unit the runtime streams: "block.{i}" (transformer block i, as `offload.blocks.find_blocks`
    orders them) or "rest" (every parameter outside the blocks: embedding, final norm, head). The kinds follow
    the ZeRO paper's accounting (Rajbhandari et al. 2020, Sec. 3.1): the working parameters in the training
    dtype, the fp32 master copy (mixed precision only; with fp32 or pure 16-bit training the working
    parameters are the master and `master` is ignored), the gradients (accumulated over micro-batches, fp32
    when there is a master copy) and the optimizer moments. "device" keeps that kind resident on the device.
    """

    name: str
    numel: int = field(metadata={"min": 0})
    params: TierName = "device"
    master: TierName = "device"
    grads: TierName = "device"
    moments: TierName = "device"

    def tiers(self) -> dict[str, TierName]:
        return {"params": self.params, "master": self.master, "grads": self.grads, "moments": self.moments}


@dataclass(frozen=True, kw_only=True)
class ModelStatePlan:
    """Model state off the device (ZeRO-Infinity, Rajbhandari et al. 2021; Fuyou, Liao et al. 2024).

    With `stream` on, the runtime (`offload.state`) reads each group's parameters from their tier into a
    device buffer shortly before its forward and again before its backward (`prefetch_depth` groups ahead of
    the one computing), releases them after use, moves each gradient to its tier as backward produces it,
    and updates the optimizer state out of core on the CPU (read ahead, write behind). `staging_bytes` is the
    host staging pool the transfers go through, allocated once (see `offload.state` for its parts). Off: every kind of state stays on the device
    (the optimizer may still be offloaded by `OptimizerPlan`).
    """

    stream: bool = False
    prefetch_depth: int = field(default=1, metadata={"min": 0})
    groups: tuple[StateGroup, ...] = ()
    staging_bytes: int = field(default=0, metadata={"min": 0})
    io_threads: int = field(default=2, metadata={"positive": True})
    # host-side state moves and updates in chunks of this many elements (MemAscend: buffers sized to the
    # transfer, not to the largest tensor): the optimizer's two work sets, the gradient buffers
    chunk_numel: int = field(default=1 << 22, metadata={"positive": True})

    def group(self, name: str) -> StateGroup | None:
        return next((g for g in self.groups if g.name == name), None)

    def bytes_by_tier(self, *, param_bytes: int, master: bool, moment_bytes: float) -> dict[str, int]:
        """Bytes of model state per tier: working parameters at `param_bytes` per element, the fp32 master
        when `master`, fp32 gradients when there is a master (else `param_bytes`), moments at `moment_bytes`
        per element."""
        out: dict[str, int] = {}
        grad_bytes = 4 if master else param_bytes
        for g in self.groups:
            parts = [(g.params, param_bytes), (g.grads, grad_bytes), (g.moments, moment_bytes)]
            if master:
                parts.append((g.master, 4))
            for tier, per in parts:
                out[tier] = out.get(tier, 0) + int(round(g.numel * per))
        return out


@dataclass(frozen=True, kw_only=True)
class SolverReport:
    problem: str  # what was solved: "layout", "activations", "buffers", "optimizer", "mapping"
    strategy: str  # "mip", "greedy", "keep_all", ...
    status: SolverStatus
    objective: float = 0.0
    gap: float | None = None  # relative optimality gap; None for heuristics (no bound)
    # wall time: kept in memory, not written to plan.json (same inputs, same file) nor compared
    seconds: float = field(default=0.0, compare=False, metadata={"volatile": True})
    fragmentation: float | None = None  # buffers: arena bytes / live-bytes peak (>= 1); None elsewhere


@dataclass(frozen=True, kw_only=True)
class Predicted:
    bytes_by_tier: dict[str, int] = field(default_factory=dict)  # per device (device) / per node (host tiers)
    bytes_by_category: dict[str, int] = field(default_factory=dict)  # per device
    peak_bytes: int = 0
    step_time_s: float = 0.0
    time_breakdown: dict[str, float] = field(default_factory=dict)
    tflops_per_device: float = 0.0
    mfu: float = 0.0
    hfu: float = 0.0
    # peak system memory of the host per node (staging pool, state held in DRAM, the CPU optimizer's working
    # set; page cache excluded: NVMe traffic uses direct I/O); 0 where the planner did not model it
    host_peak_bytes: int = field(default=0, metadata={"min": 0})
    solvers: tuple[SolverReport, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Plan:
    schema_version: str = SCHEMA_VERSION
    model: ModelSpec
    cluster: ClusterSpec
    workload: Workload
    layout: Layout = field(default_factory=Layout)
    activations: tuple[ActivationPolicy, ...] = ()
    optimizer: OptimizerPlan = field(default_factory=OptimizerPlan)
    loss: LossPlan = field(default_factory=LossPlan)
    tiers: tuple[TierPlan, ...] = ()
    model_state: ModelStatePlan = field(default_factory=ModelStatePlan)
    predicted: Predicted = field(default_factory=Predicted)
    notes: tuple[str, ...] = ()

    def activation_policy(self, layer: int) -> ActivationPolicy:
        for a in self.activations:
            if a.layer == layer:
                return a
        return ActivationPolicy(layer=layer)

    def tier(self, kind: str) -> TierPlan | None:
        return next((t for t in self.tiers if t.kind == kind), None)

    def replace(self, **changes: Any) -> Plan:
        return dataclasses.replace(self, **changes)

    # ---- serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str | None = None) -> Plan:
        version = data.get("schema_version") if isinstance(data, dict) else None
        if not isinstance(version, str):
            raise SpecError(
                "missing schema_version; is this a memtier plan?", field="schema_version", source=source
            )
        try:
            major = int(version.split(".")[0])
        except ValueError:
            raise SpecError(
                f"malformed schema_version {version!r}", field="schema_version", source=source
            ) from None
        if major != SUPPORTED_MAJOR:
            raise SpecError(
                f"plan schema {version} is not supported by this memtier (reads {SUPPORTED_MAJOR}.x); "
                "re-run `memtier plan` with this version",
                field="schema_version",
                source=source,
            )
        try:
            return build(cls, upgrade(data), source=source)
        except SpecError as e:
            if _minor(version) > _minor(SCHEMA_VERSION) and e.message.startswith("unknown key"):
                # a newer memtier's plan: its new fields are what this one does not know
                raise SpecError(
                    f"{e.message}. The plan is schema {version}, newer than this memtier's {SCHEMA_VERSION}: "
                    "upgrade memtier, or re-run `memtier plan` with this one",
                    field=e.field,
                    source=source,
                ) from None
            raise

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        from planner.schema import load_mapping

        p = os.fspath(path)
        return cls.from_dict(load_mapping(p), source=p)


def _minor(version: str) -> int:
    parts = version.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A plan dict of an older 1.x schema in the current one (a copy; `data` is left as it is).

    1.0 named a solver report's problem "stage", and had no `optimizer.schedule`: the runtime updated the
    planned subgroups on their planned sides when there were any, else every subgroup on the CPU.
    """
    out = dict(data)
    optimizer = out.get("optimizer")
    if isinstance(optimizer, dict) and "schedule" not in optimizer:
        out["optimizer"] = {**optimizer, "schedule": "plan" if optimizer.get("subgroups") else "cpu"}
    predicted = out.get("predicted")
    if isinstance(predicted, dict) and isinstance(predicted.get("solvers"), list):
        solvers = [
            {("problem" if k == "stage" else k): v for k, v in r.items()}
            if isinstance(r, dict) and "stage" in r and "problem" not in r
            else r
            for r in predicted["solvers"]
        ]
        out["predicted"] = {**predicted, "solvers": solvers}
    return out


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """The one call a training script makes to read its plan."""
    return Plan.load(path)
