"""Global-norm gradient clipping, computed the way ``torch.nn.utils.clip_grad_norm_`` computes it.

Clipping needs the global norm *before* any update. The choice made here (correctness first): with
``max_grad_norm`` set, the hooks only compute the gradient norms of each subgroup as it completes (one
``_foreach_norm`` per subgroup, overlapping backward) and every update is deferred to ``step()``, where the
global norm is known (``clip_coefficient``); without clipping, updates start in backward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from offload.optimizer.layout import SubgroupLayout

__all__ = ["ClipCoefficient", "clip_coefficient", "subgroup_norms"]


def subgroup_norms(params: Sequence[nn.Parameter], lay: SubgroupLayout) -> dict[int, torch.Tensor]:
    """The gradient 2-norms of a subgroup's parameters (by parameter index): one ``_foreach_norm`` call (the op
    clip_grad_norm_ uses) per subgroup, on the backward's stream, as soon as its gradients are complete."""
    pids = [pid for pid in lay.params if params[pid].grad is not None]
    if not pids:
        return {}
    with torch.no_grad():
        norms = torch._foreach_norm([params[pid].grad for pid in pids], 2.0)  # type: ignore[misc]
    return dict(zip(pids, norms))


@dataclass(frozen=True)
class ClipCoefficient:
    """The scale every gradient is multiplied by, on the device and on the host, and the global norm."""

    coef: torch.Tensor
    coef_cpu: torch.Tensor
    total: torch.Tensor  # the global 2-norm (0-dim, on the device)


def clip_coefficient(
    params: Sequence[nn.Parameter],
    norms: Mapping[int, torch.Tensor],
    max_norm: float,
    device: torch.device,
) -> ClipCoefficient | None:
    """Global 2-norm over every gradient, in parameter order, as torch.nn.utils.clip_grad_norm_; None when no
    parameter has a gradient. ``norms`` are those the hooks computed (``subgroup_norms``)."""
    found = []
    for pid, p in enumerate(params):
        if p.grad is None:
            continue
        norm = norms.get(pid)
        if norm is None:  # fewer backward passes than grad_accum, or a gradient set by hand
            norm = torch._foreach_norm([p.grad], 2.0)[0]
        found.append(norm)
    if not found:
        return None
    total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in found]), 2.0)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return ClipCoefficient(coef=coef, coef_cpu=coef.to("cpu"), total=total)
