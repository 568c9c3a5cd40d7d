"""Low-memory optimizers: GaLore, Natural GaLore and FRUGAL, with layer-wise (per-parameter) updates.

Public names are imported lazily so that ``import optim.state_bytes`` (the torch-free state-size formula
the planner mirrors) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optim.base import SubspaceAdamW
    from optim.errors import OptimizerConfigError, ProjectionFallbackWarning
    from optim.frugal import FRUGAL
    from optim.galore import GaLoreAdamW
    from optim.layerwise import LayerwiseStepper, broadcast_parameters
    from optim.natural_galore import NaturalGaLoreAdamW
    from optim.param_groups import low_rank_param_groups
    from optim.projection import captured_energy, compute_basis
    from optim.state_bytes import expected_state_bytes, total_expected_state_bytes

_EXPORTS = {
    "SubspaceAdamW": "optim.base",
    "GaLoreAdamW": "optim.galore",
    "NaturalGaLoreAdamW": "optim.natural_galore",
    "FRUGAL": "optim.frugal",
    "LayerwiseStepper": "optim.layerwise",
    "broadcast_parameters": "optim.layerwise",
    "low_rank_param_groups": "optim.param_groups",
    "compute_basis": "optim.projection",
    "captured_energy": "optim.projection",
    "expected_state_bytes": "optim.state_bytes",
    "total_expected_state_bytes": "optim.state_bytes",
    "OptimizerConfigError": "optim.errors",
    "ProjectionFallbackWarning": "optim.errors",
}

__all__ = [
    "FRUGAL",
    "GaLoreAdamW",
    "LayerwiseStepper",
    "NaturalGaLoreAdamW",
    "OptimizerConfigError",
    "ProjectionFallbackWarning",
    "SubspaceAdamW",
    "broadcast_parameters",
    "captured_energy",
    "compute_basis",
    "expected_state_bytes",
    "low_rank_param_groups",
    "total_expected_state_bytes",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'optim' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
