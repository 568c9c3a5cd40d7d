"""Where each kind of each group's state lives, and the copies in and out of it.

The kinds (`KINDS`) are those of the plan (`planner.plan.StateGroup`): the working parameters ("params", the
training dtype), the fp32 master copy ("master", mixed precision only: otherwise the working parameters are
the master), the accumulated gradients ("grads") and the two AdamW moments ("exp_avg", "exp_avg_sq", in the
plan's "moments" tier). A kind lives either on the device (a resident tensor) or in a tier store (host DRAM,
CXL memory, NVMe files: `offload.tiers`, built from the plan's tiers by `offload.tiers.factory`). Every access
is a copy into or out of a caller's buffer, so the tiers are interchangeable; NVMe traffic goes through the
store's own staging slots with direct I/O (the page cache never holds a second copy of the model).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from offload.state.groups import Group, StateError
from offload.tiers import Handle, TierStore
from offload.tiers.factory import bytes_for_blocks, stores_for_plan
from planner.plan import StateGroup, TierPlan

__all__ = ["KINDS", "StateResidency"]

KINDS = ("params", "master", "grads", "exp_avg", "exp_avg_sq")
_PLAN_FIELD = {
    "params": "params",
    "master": "master",
    "grads": "grads",
    "exp_avg": "moments",
    "exp_avg_sq": "moments",
}


@dataclass(frozen=True)
class KindSpec:
    tier: str
    dtype: torch.dtype


class StateResidency:
    """Every group's state in its tier. ``dtypes`` maps each kind used to its dtype (no "master": fp32/pure)."""

    def __init__(
        self,
        groups: Sequence[Group],
        planned: Mapping[str, StateGroup],
        dtypes: Mapping[str, torch.dtype],
        tier_plans: Sequence[TierPlan],
        device: torch.device,
        *,
        stores: Mapping[str, TierStore] | None = None,
    ) -> None:
        self.groups = list(groups)
        self.device = device
        self.dtypes = dict(dtypes)
        self.spec: dict[tuple[int, str], KindSpec] = {}
        sizes: dict[str, list[int]] = {}
        for g in self.groups:
            plan_group = planned[g.name]
            for kind, dtype in self.dtypes.items():
                tier = getattr(plan_group, _PLAN_FIELD[kind])
                self.spec[(g.index, kind)] = KindSpec(tier=tier, dtype=dtype)
                if tier != "device":
                    sizes.setdefault(tier, []).append(g.numel * dtype.itemsize)
        given = dict(stores or {})
        # files are replaced put-then-free (a failed write leaves the old state readable): one extra entry of room
        need = {
            t: bytes_for_blocks(s) + (max(s) if t == "nvme" else 0)
            for t, s in sizes.items()
            if t not in given
        }
        for tier in need:
            if not any(tp.kind == tier for tp in tier_plans) and tier == "nvme":
                raise StateError(
                    "the plan places model state on nvme but has no nvme tier entry (its path)", field="tiers"
                )
        self._own = stores_for_plan(tier_plans, need) if need else {}
        self.stores: dict[str, TierStore] = {**given, **self._own}
        self._handles: dict[tuple[int, str], Handle] = {}
        self._resident: dict[tuple[int, str], torch.Tensor] = {}
        self._lock = threading.Lock()

    # ---- queries -------------------------------------------------------------------------------------------
    def tier(self, g: Group, kind: str) -> str:
        return self.spec[(g.index, kind)].tier

    def dtype(self, kind: str) -> torch.dtype:
        return self.dtypes[kind]

    def has(self, g: Group, kind: str) -> bool:
        key = (g.index, kind)
        return key in self._handles or key in self._resident

    def resident(self, g: Group, kind: str) -> torch.Tensor | None:
        """The device-resident tensor of a kind kept on the device (updated in place), else None."""
        return self._resident.get((g.index, kind))

    # ---- copies ----------------------------------------------------------------------------------------------
    def write(self, g: Group, kind: str, src: torch.Tensor) -> None:
        """Store ``src`` (flat, the kind's dtype) as the group's ``kind``; ``src`` may be reused on return."""
        key = (g.index, kind)
        spec = self.spec[key]
        if spec.tier == "device":
            res = self._resident.get(key)
            if res is None:
                self._resident[key] = src.detach().to(self.device, copy=True)
            else:
                res.copy_(src)
            return
        store = self.stores[spec.tier]
        with self._lock:
            old = self._handles.pop(key, None)
        if old is not None and callable(getattr(store, "view", None)):
            store.free(old)  # an arena: free first, the same-size block is there for the put (see factory)
            old = None
        new = store.put(src.detach())
        with self._lock:
            self._handles[key] = new
        if old is not None:
            store.free(old)

    def read(self, g: Group, kind: str, out: torch.Tensor) -> torch.Tensor:
        """Fill ``out`` (flat, the kind's dtype, ``g.numel`` elements) with the group's ``kind``."""
        key = (g.index, kind)
        res = self._resident.get(key)
        if res is not None:
            return out.copy_(res)
        with self._lock:
            handle = self._handles.get(key)
        if handle is None:
            raise RuntimeError(f"memtier: internal error: group {g.name} has no {kind} stored")
        return self.stores[self.spec[key].tier].get(handle, out=out)

    def prefetch(self, g: Group, kind: str, out: torch.Tensor) -> None:
        key = (g.index, kind)
        with self._lock:
            handle = self._handles.get(key)
        if handle is not None:
            self.stores[self.spec[key].tier].prefetch(handle, out=out)

    def bytes_by_tier(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for g in self.groups:
            for kind in self.dtypes:
                if self.has(g, kind):
                    spec = self.spec[(g.index, kind)]
                    out[spec.tier] = out.get(spec.tier, 0) + g.numel * spec.dtype.itemsize
        return out

    def synchronize(self) -> None:
        for store in self.stores.values():
            store.synchronize()

    def close(self) -> None:
        errors: list[BaseException] = []
        for store in self._own.values():
            try:
                store.close()
            except BaseException as exc:  # noqa: BLE001 - close the rest, then raise the first
                errors.append(exc)
        self._handles.clear()
        self._resident.clear()
        if errors:
            raise errors[0]
