"""The tier kinds by name: ``make_tier("nvme", path=..., capacity_bytes=...)`` and per-kind availability."""

from __future__ import annotations

from typing import Any

from offload.tiers.base import TierStore
from offload.tiers.cxl import CxlTier
from offload.tiers.errors import TierUnavailableError, TierValueError
from offload.tiers.host import HostTier
from offload.tiers.nvme import NvmeTier

__all__ = ["TIER_KINDS", "availability", "available", "make_tier"]

TIER_KINDS: dict[str, type[TierStore]] = {"host": HostTier, "cxl": CxlTier, "nvme": NvmeTier}


def _kind_class(kind: str) -> type[TierStore]:
    cls = TIER_KINDS.get(kind)
    if cls is None:
        raise TierValueError("kind", f"unknown tier kind {kind!r}; choices: {sorted(TIER_KINDS)}")
    return cls


def availability(kind: str) -> tuple[bool, str]:
    """(present on this machine, reason if not) for a tier kind."""
    return _kind_class(kind).availability()


def available(kind: str) -> bool:
    return availability(kind)[0]


def make_tier(kind: str, **settings: Any) -> TierStore:
    """Build a tier store of ``kind`` ("host", "cxl", "nvme") from its keyword settings.

    Raises ``TierValueError`` for an unknown kind or setting, ``TierUnavailableError`` when the kind is absent
    here (e.g. "cxl" without a CPU-less NUMA node and no explicit ``node``), ``TierPathError`` when an NVMe path
    fails the preflight.
    """
    cls = _kind_class(kind)
    if kind == "cxl" and settings.get("node") is None:
        ok, why = cls.availability()
        if not ok:
            raise TierUnavailableError("cxl tier", why)
    try:
        return cls(**settings)
    except TypeError as exc:  # an unknown keyword: name it as a bad setting
        raise TierValueError("settings", f"{kind} tier: {exc}") from exc
