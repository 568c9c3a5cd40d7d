"""Activation policies as the runtime carries them out: one mode per block (keep, swap a share, recompute).

`BlockPolicy.from_plan` validates a plan's `ActivationPolicy` (a fractional recompute is refused, naming the
layer and field); `swap_tokens` is the rounding every swap uses (engine, profiles and the planner agree).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from planner.errors import SpecError
from planner.plan import ActivationPolicy

__all__ = ["BlockPolicy", "Mode", "PolicyError", "swap_tokens"]

_EPS = 1e-9

Mode = Literal["keep", "swap", "recompute"]


class PolicyError(SpecError):
    """An activation policy the runtime cannot carry out (the message names the layer and field)."""


@dataclass(frozen=True, kw_only=True)
class BlockPolicy:
    """The runtime form of one block's `ActivationPolicy`: one mode, and the swap share and tier."""

    layer: int
    mode: Mode = "keep"
    swap_fraction: float = 0.0  # share of each saved tensor's tokens sent to the tier (mode "swap")
    swap_tier: str = "dram"  # plan tier name: "dram", "cxl", "nvme"
    prefetch: bool = True  # fetched during the next swapped block's backward (ActivationPolicy.prefetch)

    @classmethod
    def from_plan(cls, policy: ActivationPolicy, *, index: int | None = None) -> BlockPolicy:
        where = f"activations[{index}]" if index is not None else f"activations[layer={policy.layer}]"
        r = policy.recompute_fraction
        if _EPS < r < 1 - _EPS:
            raise PolicyError(
                f"layer {policy.layer}: recompute_fraction={r} is fractional; the runtime recomputes whole "
                "blocks (0 or 1). Re-plan with a per-block recompute decision.",
                field=f"{where}.recompute_fraction",
            )
        if r >= 1 - _EPS:
            return cls(layer=policy.layer, mode="recompute")
        # NOTE: swap_tier "device" keeps the data where it is, i.e. it is the same as keep.
        if policy.swap_fraction > _EPS and policy.swap_tier != "device":
            return cls(
                layer=policy.layer,
                mode="swap",
                swap_fraction=float(policy.swap_fraction),
                swap_tier=policy.swap_tier,
                prefetch=policy.prefetch,
            )
        return cls(layer=policy.layer, mode="keep")


def swap_tokens(swap_fraction: float, seq_len: int) -> int:
    """Tokens of a saved tensor sent to the tier: floor(s*seq + 0.5) (round half up, deterministic)."""
    return min(seq_len, max(0, math.floor(swap_fraction * seq_len + 0.5)))
