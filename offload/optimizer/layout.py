"""How parameters map to subgroups and a subgroup's state to rows of a flat fp32 buffer.

The parameters are partitioned into **subgroups** of whole tensors, at most ``subgroup_size`` elements each
(DeepSpeed ZeRO-3's ``sub_group_size`` semantics: tensors are never split; 0: one subgroup per tensor). A
subgroup's state is ``[3, n]`` fp32 (master weights, exp_avg, exp_avg_sq: 12 bytes per element); a ``Slot``
says in which tier it lives and which of those rows the tier keeps (the two moments only, ``[2, n]``, when the
fp32 parameters themselves are the master weights).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from offload.optimizer.kernels import AdamWTensors
from offload.optimizer.schedule import Side
from offload.optimizer.settings import OptimizerOffloadError
from offload.tiers import Handle, TierStore
from planner.plan import OptimizerPlan

__all__ = [
    "EXP_AVG",
    "EXP_AVG_SQ",
    "MASTER",
    "STATE_ROWS",
    "TIERS",
    "Slot",
    "SubgroupLayout",
    "advance_steps",
    "build_slots",
    "partition_subgroups",
    "plan_lookup",
    "row_views",
    "rows",
    "update_tensors",
]

STATE_ROWS = 3  # fp32 master weights, exp_avg, exp_avg_sq
MASTER, EXP_AVG, EXP_AVG_SQ = 0, 1, 2
TIERS = ("device", "dram", "cxl", "nvme")


@dataclass(frozen=True, kw_only=True)
class SubgroupLayout:
    """One subgroup: a run of whole parameters of one parameter group."""

    index: int
    group: int  # parameter-group index
    params: tuple[int, ...]  # global parameter indices (torch's state_dict numbering)
    offsets: tuple[int, ...]  # element offset of each parameter inside the subgroup
    numels: tuple[int, ...]
    numel: int
    start: int  # element offset of the subgroup in the concatenation of all parameters


def partition_subgroups(
    numels_by_group: Sequence[Sequence[int]], subgroup_size: int
) -> tuple[SubgroupLayout, ...]:
    """Whole parameters, in order, packed into subgroups of at most ``subgroup_size`` elements.

    A parameter larger than ``subgroup_size`` forms its own subgroup (DeepSpeed ZeRO-3, stage3.py
    ``_create_fp16_sub_groups``); ``subgroup_size == 0`` gives one subgroup per parameter. Subgroups never
    span parameter groups (their hyper-parameters differ).
    """
    if subgroup_size < 0:
        raise OptimizerOffloadError(f"must be >= 0, got {subgroup_size}", field="subgroup_size")
    out: list[SubgroupLayout] = []
    pid = 0
    start = 0

    def close(group: int, members: list[tuple[int, int]]) -> None:
        nonlocal start
        offsets, acc = [], 0
        for _, n in members:
            offsets.append(acc)
            acc += n
        out.append(
            SubgroupLayout(
                index=len(out),
                group=group,
                params=tuple(p for p, _ in members),
                offsets=tuple(offsets),
                numels=tuple(n for _, n in members),
                numel=acc,
                start=start,
            )
        )
        start += acc

    for g, numels in enumerate(numels_by_group):
        members: list[tuple[int, int]] = []
        size = 0
        for n in numels:
            if members and (subgroup_size == 0 or size + n > subgroup_size):
                close(g, members)
                members, size = [], 0
            members.append((pid, n))
            size += n
            pid += 1
        if members:
            close(g, members)
    return tuple(out)


def plan_lookup(placement: OptimizerPlan, start: int) -> tuple[str, Side | None]:
    """(tier, planned update side) of the plan subgroup holding element ``start``."""
    if not placement.offload:
        return "device", "device"
    if not placement.subgroups:
        return placement.tier, None
    acc = 0
    for sg in placement.subgroups:
        if start < acc + sg.numel:
            return sg.tier, sg.update_side
        acc += sg.numel
    last = placement.subgroups[-1]  # the model has more elements than the plan counted: extend the last
    return last.tier, last.update_side


@dataclass
class Slot:
    """Where one subgroup's state is and its per-parameter step counts."""

    layout: SubgroupLayout
    tier: str
    store: TierStore | None = None
    handle: Handle | None = None
    resident: torch.Tensor | None = None  # tier "device": the stored rows, [rows, n]
    # fp32 parameters in host-addressable memory (the device tier, or any tier when the device is the CPU):
    # the parameters are the master weights; the tier keeps only the two moments ([2, n], see Slot.rows)
    master_is_param: bool = False
    staged: bool = False  # read/written through a host staging buffer (no in-place view of the tier)
    steps: list[float] = dataclasses.field(default_factory=list)  # per parameter (see AdamWTensors.steps)
    planned_side: Side | None = None
    # (handle, its stored rows as a view of the tier, per-parameter views of them): see
    # StateResidency.in_place_rows
    in_place: tuple[Handle, torch.Tensor, tuple[list[torch.Tensor], ...]] | None = None
    shapes: tuple[torch.Size, ...] = ()  # of the subgroup's parameters

    @property
    def rows(self) -> int:
        """Rows the tier keeps: [master, exp_avg, exp_avg_sq], or the two moments when master_is_param."""
        return STATE_ROWS - 1 if self.master_is_param else STATE_ROWS

    @property
    def moment_rows(self) -> tuple[int, int]:
        """Indices of exp_avg and exp_avg_sq in the stored [rows, n] tensor."""
        return (0, 1) if self.master_is_param else (EXP_AVG, EXP_AVG_SQ)

    def stored_part(self, state: torch.Tensor) -> torch.Tensor:
        """The rows of a full [3, n] state that the tier keeps (a view)."""
        return state[EXP_AVG:] if self.master_is_param else state


def build_slots(
    layouts: Sequence[SubgroupLayout],
    params: Sequence[nn.Parameter],
    placement: OptimizerPlan,
    device: torch.device,
) -> list[Slot]:
    """A slot per subgroup: its tier and planned side from the plan, whether its parameters are its master."""
    slots = []
    for lay in layouts:
        tier, side = plan_lookup(placement, lay.start)
        if tier not in TIERS:
            raise OptimizerOffloadError(
                f"unknown tier {tier!r}", field=f"optimizer.subgroups[{lay.index}].tier"
            )
        members = [params[i] for i in lay.params]
        # NOTE: with fp32 parameters the CPU (or the device, for device-resident state) can update the
        # parameters themselves: a separate fp32 master copy would hold the same bits and cost a copy back
        # per update (ZeRO-Offload keeps one because its parameters are fp16 on a GPU). The tier then keeps
        # the two moments only, 8 bytes per element instead of 12.
        master_is_param = all(p.dtype == torch.float32 for p in members) and (
            tier == "device" or device.type == "cpu"
        )
        slots.append(
            Slot(
                layout=lay,
                tier=tier,
                master_is_param=master_is_param,
                steps=[0.0] * len(lay.params),
                planned_side=side,
                shapes=tuple(p.shape for p in members),
            )
        )
    return slots


def rows(flat: torch.Tensor, numel: int, n_rows: int = STATE_ROWS) -> torch.Tensor:
    """The first ``n_rows * numel`` elements of a flat buffer as a contiguous ``[n_rows, numel]`` tensor."""
    return flat[: n_rows * numel].view(n_rows, numel)


def row_views(slot: Slot, state: torch.Tensor) -> tuple[list[torch.Tensor], ...]:
    """For each stored row of ``state`` ([slot.rows, n]), every parameter's slice shaped like the parameter."""
    lay = slot.layout
    return tuple(
        [row[off : off + n].view(shape) for off, n, shape in zip(lay.offsets, lay.numels, slot.shapes)]
        for row in state.unbind()
    )


def advance_steps(slot: Slot, active: Sequence[int]) -> list[float]:
    """Count one more step for the active parameters; their new step counts."""
    steps = slot.steps
    for k in active:
        steps[k] += 1.0
    return [steps[k] for k in active]


def update_tensors(
    slot: Slot,
    stored: Sequence[list[torch.Tensor]],
    active: Sequence[int],
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    steps: Sequence[float],
) -> AdamWTensors:
    """The kernel's operands for the active parameters of a subgroup whose stored rows are ``stored``
    (per-parameter views, ``row_views``). Parameters are passed as themselves (updated in place under
    no_grad, as torch's AdamW does) when they are the master weights."""
    m_row, v_row = slot.moment_rows
    if len(active) == len(slot.layout.params):
        pick: Callable[[list[torch.Tensor]], list[torch.Tensor]] = list
    else:

        def pick(views: list[torch.Tensor]) -> list[torch.Tensor]:
            return [views[k] for k in active]

    return AdamWTensors(
        params=list(params) if slot.master_is_param else pick(stored[MASTER]),
        grads=grads,
        exp_avgs=pick(stored[m_row]),
        exp_avg_sqs=pick(stored[v_row]),
        steps=steps,
    )
