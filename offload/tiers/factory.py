"""Plan tiers -> tier stores: the one place that turns a plan's ``TierPlan`` entries into ``TierStore``s.

Both users build their stores here: ``offload.apply`` (the activation swap tiers, each at the plan's cap) and
the offloaded optimizer (its state's tiers, each sized to the state within the cap). This module is the one
place that knows

- that the plan's host tier is called "dram" (``planner.plan.TierName``) where the stores say "host"
  (``make_tier("host")``): ``STORE_KINDS``;
- how a ``TierPlan``'s fields become a store's settings (``tier_settings``);
- the capacity cap: ``TierPlan.capacity_bytes`` is a hard cap (0: none given). A user that knows how many bytes
  it will store (``need_bytes``) is refused here, before anything is allocated, when they exceed the cap, and
  a memory arena is then sized to them (a host arena allocates its whole size up front); the store itself
  holds every put to the same cap (``TierCapacityError``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from offload.tiers.base import TierStore
from offload.tiers.preflight import DIRECT_IO_ALIGNMENT
from offload.tiers.registry import make_tier
from planner.errors import SpecError
from planner.plan import TierPlan

__all__ = ["STORE_KINDS", "TierPlanError", "bytes_for_blocks", "stores_for_plan", "tier_settings"]

# plan tier name (planner.plan.TierName, less "device") -> make_tier kind
STORE_KINDS: dict[str, str] = {"dram": "host", "cxl": "cxl", "nvme": "nvme"}
MEMORY_TIERS = ("dram", "cxl")  # arenas: allocated whole at construction
ARENA_ALIGN_BYTES = 512  # an arena's default block alignment (HostSettings.alignment_bytes)


class TierPlanError(SpecError):
    """A plan tier entry no store can be built from, or a need over its cap (the message names the field)."""


def bytes_for_blocks(block_bytes: Iterable[int]) -> int:
    """The bytes a store needs for blocks of these sizes: each rounded up to an arena's block alignment, plus one
    alignment unit of slack (a block is replaced free-then-put, so the new one fits where the old one was)."""
    aligned = [-(-b // ARENA_ALIGN_BYTES) * ARENA_ALIGN_BYTES for b in block_bytes]
    return sum(aligned) + ARENA_ALIGN_BYTES


def _check_cap(tier: TierPlan, need_bytes: int | None) -> None:
    if need_bytes is not None and tier.capacity_bytes and need_bytes > tier.capacity_bytes:
        raise TierPlanError(
            f"need({need_bytes}) > capacity_bytes({tier.capacity_bytes}): the plan caps the {tier.kind} tier "
            "below what is to be stored there",
            field=f"tiers.{tier.kind}.capacity_bytes",
        )


def tier_settings(tier: TierPlan, *, need_bytes: int | None = None) -> tuple[str, dict[str, Any]]:
    """The ``make_tier`` kind and keyword settings of one ``TierPlan``.

    ``need_bytes``: what the user will store there, when it knows (refused over the cap; a memory arena is
    sized to it, within the cap). Without it a memory arena takes the plan's whole cap.
    """
    kind = STORE_KINDS.get(tier.kind)
    if kind is None:
        raise TierPlanError(
            f"tier kind {tier.kind!r} has no store (choices: {sorted(STORE_KINDS)})", field="tiers.kind"
        )
    _check_cap(tier, need_bytes)
    if tier.kind in MEMORY_TIERS:
        capacity = tier.capacity_bytes if need_bytes is None else need_bytes
        if tier.kind == "dram":
            return kind, {"capacity_bytes": capacity}
        return kind, {"capacity_bytes": capacity, "node": tier.numa_node}
    if not tier.path:
        raise TierPlanError(
            "the nvme tier needs a path (a directory on the drive)", field=f"tiers.{tier.kind}.path"
        )
    if tier.block_bytes % DIRECT_IO_ALIGNMENT:
        raise TierPlanError(
            f"must be a multiple of {DIRECT_IO_ALIGNMENT} (one I/O request), got {tier.block_bytes}",
            field=f"tiers.{tier.kind}.block_bytes",
        )
    return kind, {
        "path": tier.path,
        "capacity_bytes": tier.capacity_bytes or None,
        "direct_io": tier.direct_io,
        "chunk_bytes": tier.block_bytes,
        "checksum": tier.checksum,
    }


def _entry(tier_plans: Iterable[TierPlan], name: str, need_bytes: int | None) -> TierPlan:
    """The plan's entry for tier ``name``; a memory tier without one is sized to the need (no cap given)."""
    tier = next((t for t in tier_plans if t.kind == name), None)
    if tier is not None:
        return tier
    if name in MEMORY_TIERS and need_bytes is not None:
        return TierPlan(kind=name, capacity_bytes=0)  # type: ignore[arg-type]  # name is a TierName
    if name == "nvme":
        raise TierPlanError(
            "the plan has no nvme tier: it needs a path (a directory on the drive)", field="tiers.nvme.path"
        )
    raise TierPlanError(f"the plan has no {name!r} tier entry", field="tiers")


def stores_for_plan(
    tier_plans: Iterable[TierPlan],
    need_bytes: Mapping[str, int | None],
    *,
    nvme_io_engine: Literal["auto", "aio", "posix"] = "auto",
    build_aio: bool = True,
) -> dict[str, TierStore]:
    """One store per plan tier name in ``need_bytes`` (``"dram"``, ``"cxl"``, ``"nvme"``), built from its entry.

    ``need_bytes[name]``: the bytes the caller will store in that tier (see ``tier_settings``), or None. A
    memory tier the plan has no entry for is sized to the need; NVMe needs an entry (its path). Every setting is
    checked before any store is built; if one fails to build, those already built are closed.
    ``nvme_io_engine``/``build_aio`` are the NVMe store's I/O engine and whether it may compile DeepSpeed's aio op.
    """
    plans = tuple(tier_plans)
    settings = {
        name: tier_settings(_entry(plans, name, need), need_bytes=need) for name, need in need_bytes.items()
    }
    stores: dict[str, TierStore] = {}
    try:
        for name, (kind, kwargs) in settings.items():
            if kind == "nvme":
                kwargs = {**kwargs, "io_engine": nvme_io_engine, "build_aio": build_aio}
            stores[name] = make_tier(kind, **kwargs)
    except BaseException:
        for store in stores.values():
            with contextlib.suppress(Exception):
                store.close()
        raise
    return stores
