"""The groups the model state is streamed in: one per transformer block, and "rest" (everything else).

A group's parameters are laid out back to back in one flat buffer of the training dtype (`Group.numel`
elements; `ParamSlot.offset` is each parameter's first element), the unit every tier holds and every transfer
moves. Group names match the plan's (`planner.plan.StateGroup.name`): "rest" (embedding, final norm, head:
every parameter outside the blocks, a tied head once) and "block.{i}" in block order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from planner.errors import SpecError
from planner.plan import ModelStatePlan

__all__ = ["Group", "ParamSlot", "StateError", "build_groups"]


class StateError(SpecError):
    """A model-state plan that cannot be carried out on this model or optimizer (names the field)."""


@dataclass(eq=False)
class ParamSlot:
    """One parameter's place in its group's flat buffer, and its place in `model.parameters()` order."""

    param: nn.Parameter
    name: str
    offset: int
    numel: int
    shape: torch.Size
    order: int  # index in model.parameters(): clipping sums the norms in this order, as clip_grad_norm_ does

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        return flat[self.offset : self.offset + self.numel].view(self.shape)


@dataclass(eq=False)
class Group:
    index: int
    name: str
    module: nn.Module | None  # the block; None for "rest"
    slots: list[ParamSlot] = field(default_factory=list)
    numel: int = 0

    @property
    def trainable(self) -> list[ParamSlot]:
        return [s for s in self.slots if s.param.requires_grad]


def build_groups(model: nn.Module, blocks: Sequence[nn.Module], plan: ModelStatePlan) -> list[Group]:
    """ "rest" then one group per block, checked against the plan's groups (names and element counts)."""
    order = {id(p): i for i, p in enumerate(model.parameters())}
    names = {id(p): n for n, p in model.named_parameters()}
    owner: dict[int, str] = {}
    groups = [Group(index=0, name="rest", module=None)]
    for i, block in enumerate(blocks):
        groups.append(Group(index=i + 1, name=f"block.{i}", module=block))
    for g in groups[1:]:
        assert g.module is not None
        for p in g.module.parameters():
            _add(g, p, owner, order, names)
    for p in model.parameters():
        if id(p) not in owner:
            _add(groups[0], p, owner, order, names)
    _check_against_plan(groups, plan)
    return groups


def _add(
    g: Group, p: nn.Parameter, owner: dict[int, str], order: dict[int, int], names: dict[int, str]
) -> None:
    if id(p) in owner:
        if owner[id(p)] != g.name:
            raise StateError(
                f"parameter {names.get(id(p), '?')} is shared by {owner[id(p)]} and {g.name}: a streamed group "
                "must own its parameters",
                field="model_state.groups",
            )
        return
    owner[id(p)] = g.name
    g.slots.append(
        ParamSlot(
            param=p,
            name=names.get(id(p), "?"),
            offset=g.numel,
            numel=p.numel(),
            shape=p.shape,
            order=order[id(p)],
        )
    )
    g.numel += p.numel()


def _check_against_plan(groups: Sequence[Group], plan: ModelStatePlan) -> None:
    planned = {g.name: g for g in plan.groups}
    for g in groups:
        spec = planned.get(g.name)
        if spec is None:
            raise StateError(
                f"the model has group {g.name!r} ({g.numel} parameters) and the plan has none by that name; "
                f"planned: {', '.join(sorted(planned)) or 'none'}",
                field="model_state.groups",
            )
        if spec.numel != g.numel:
            raise StateError(
                f"group {g.name!r}: the plan has {spec.numel} parameters, the model {g.numel}: the plan was "
                "made for another model",
                field="model_state.groups",
            )
    extra = sorted(set(planned) - {g.name for g in groups})
    if extra:
        raise StateError(
            f"the plan has groups the model does not: {', '.join(extra)}", field="model_state.groups"
        )
