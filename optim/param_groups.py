"""Split a model's parameters into a projected group and a plain one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from optim.errors import OptimizerConfigError

DEFAULT_TARGETS: tuple[str, ...] = ("attn", "mlp")


def low_rank_param_groups(
    model: nn.Module,
    *,
    switch_key: str,
    targets: Sequence[str] = DEFAULT_TARGETS,
    **settings: Any,
) -> list[dict[str, Any]]:
    """Two parameter groups: weights of ``nn.Linear`` modules whose name contains one of ``targets``
    (``switch_key: True`` plus ``settings``), and everything else (``switch_key: False``).

    This is how GaLore and FRUGAL are applied to transformers: the attention and MLP projections are
    projected, embeddings, norms and the output head get AdamW. ``switch_key`` is ``"galore"`` for
    GaLoreAdamW / NaturalGaLoreAdamW and ``"frugal"`` for FRUGAL.
    """
    if switch_key not in ("galore", "frugal"):
        raise OptimizerConfigError("switch_key", f"must be 'galore' or 'frugal', got {switch_key!r}")
    projected: list[torch.Tensor] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) and any(t in name for t in targets)):
            continue
        weight = module.weight
        if weight.requires_grad and id(weight) not in seen:
            projected.append(weight)
            seen.add(id(weight))
    if not projected:
        raise OptimizerConfigError("targets", f"no nn.Linear module name contains any of {tuple(targets)}")
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    groups: list[dict[str, Any]] = [{"params": projected, switch_key: True, **settings}]
    if rest:
        groups.append({"params": rest, switch_key: False})
    return groups
