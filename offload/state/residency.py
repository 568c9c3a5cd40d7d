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


# A chunk that ends inside a parameter ends at a multiple of ALIGN elements from the parameter's start. torch's
# fused CPU AdamW splits each tensor into tasks of one cache line (64 bytes) and runs each task vectorised with a
# scalar tail, so in a whole tensor only its last (numel % vector width) elements take the scalar path; a slice
# starting at a multiple of 64 elements from the tensor's start gives every element the same path as in the
# whole tensor (vector width | 64 for every dtype), hence the same rounding.
ALIGN = 64


def split_chunks(g: Group, chunk_numel: int) -> list[tuple[int, int]]:
    """[start, end) ranges covering the group: at most ``chunk_numel`` (>= ALIGN) elements each, every boundary
    inside a parameter at a multiple of ALIGN from its start."""
    slots = sorted(g.slots, key=lambda s: s.offset)
    out: list[tuple[int, int]] = []
    pos, i = 0, 0
    while pos < g.numel:
        end = min(pos + chunk_numel, g.numel)
        while i < len(slots) and slots[i].offset + slots[i].numel <= end:
            i += 1
        if end < g.numel and i < len(slots) and slots[i].offset < end:
            s = slots[i]
            aligned = s.offset + (end - s.offset) // ALIGN * ALIGN
            end = (
                aligned if aligned > pos else end
            )  # a chunk shorter than ALIGN past pos cannot happen: pos is aligned
        out.append((pos, end))
        pos = end
    return out


@dataclass(frozen=True)
class KindSpec:
    tier: str
    dtype: torch.dtype


class StateResidency:
    """Every group's state in its tier, in chunks of ``chunk_numel`` elements (one store entry per chunk).

    ``dtypes`` maps each kind used to its dtype (no "master" with fp32 or pure 16-bit training).
    """

    def __init__(
        self,
        groups: Sequence[Group],
        planned: Mapping[str, StateGroup],
        dtypes: Mapping[str, torch.dtype],
        tier_plans: Sequence[TierPlan],
        device: torch.device,
        *,
        chunk_numel: int,
        stores: Mapping[str, TierStore] | None = None,
    ) -> None:
        self.groups = list(groups)
        self.device = device
        self.dtypes = dict(dtypes)
        self.chunk_numel = max(chunk_numel, ALIGN)
        self._chunks: dict[int, list[tuple[int, int]]] = {}
        self.spec: dict[tuple[int, str], KindSpec] = {}
        sizes: dict[str, list[int]] = {}
        for g in self.groups:
            plan_group = planned[g.name]
            for kind, dtype in self.dtypes.items():
                tier = getattr(plan_group, _PLAN_FIELD[kind])
                self.spec[(g.index, kind)] = KindSpec(tier=tier, dtype=dtype)
                if tier != "device":
                    sizes.setdefault(tier, []).extend((b - a) * dtype.itemsize for a, b in self.chunks(g))
        given = dict(stores or {})
        # files are replaced put-then-free (a failed write leaves the old state readable): one extra entry of room
        need = {
            t: bytes_for_blocks(s) + (max(s) if t == "nvme" else 0)
            for t, s in sizes.items()
            if t not in given
        }
        if "nvme" in need and not any(tp.kind == "nvme" for tp in tier_plans):
            raise StateError(
                "the plan places model state on nvme but has no nvme tier entry (its path)", field="tiers"
            )
        self._own = stores_for_plan(tier_plans, need) if need else {}
        self.stores: dict[str, TierStore] = {**given, **self._own}
        self._handles: dict[tuple[int, str, int], Handle] = {}
        self._resident: dict[tuple[int, str], torch.Tensor] = {}
        self._lock = threading.Lock()

    # ---- queries -------------------------------------------------------------------------------------------
    def chunks(self, g: Group) -> list[tuple[int, int]]:
        """The element ranges [start, end) of the group's chunks (at most ``chunk_numel`` elements each)."""
        found = self._chunks.get(g.index)
        if found is None:
            found = self._chunks[g.index] = split_chunks(g, self.chunk_numel)
        return found

    def tier(self, g: Group, kind: str) -> str:
        return self.spec[(g.index, kind)].tier

    def dtype(self, kind: str) -> torch.dtype:
        return self.dtypes[kind]

    def has(self, g: Group, kind: str) -> bool:
        with self._lock:
            return (g.index, kind) in self._resident or (g.index, kind, 0) in self._handles

    def has_chunk(self, g: Group, kind: str, k: int) -> bool:
        with self._lock:
            return (g.index, kind) in self._resident or (g.index, kind, k) in self._handles

    def resident(self, g: Group, kind: str) -> torch.Tensor | None:
        """The device-resident tensor of a kind kept on the device (updated in place), else None."""
        return self._resident.get((g.index, kind))

    # ---- copies ----------------------------------------------------------------------------------------------
    def write(self, g: Group, kind: str, src: torch.Tensor) -> None:
        """Store ``src`` (flat, the kind's dtype, the whole group); ``src`` may be reused on return."""
        if self.spec[(g.index, kind)].tier == "device":
            self._write_resident(g, kind, src, 0)
            return
        for k, (a, b) in enumerate(self.chunks(g)):
            self.write_chunk(g, kind, k, src[a:b])

    def read(self, g: Group, kind: str, out: torch.Tensor) -> torch.Tensor:
        """Fill ``out`` (flat, the kind's dtype, ``g.numel`` elements) with the group's ``kind``."""
        res = self._resident.get((g.index, kind))
        if res is not None:
            return out.copy_(res)
        for k, (a, b) in enumerate(self.chunks(g)):
            self.read_chunk(g, kind, k, out[a:b])
        return out

    def write_chunk(self, g: Group, kind: str, k: int, src: torch.Tensor) -> None:
        spec = self.spec[(g.index, kind)]
        if spec.tier == "device":
            self._write_resident(g, kind, src, self.chunks(g)[k][0])
            return
        store = self.stores[spec.tier]
        key = (g.index, kind, k)
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

    def read_chunk(self, g: Group, kind: str, k: int, out: torch.Tensor) -> torch.Tensor:
        res = self._resident.get((g.index, kind))
        if res is not None:
            a, b = self.chunks(g)[k]
            return out.copy_(res[a:b])
        with self._lock:
            handle = self._handles.get((g.index, kind, k))
        if handle is None:
            raise RuntimeError(f"memtier: internal error: group {g.name} has no {kind} chunk {k} stored")
        return self.stores[self.spec[(g.index, kind)].tier].get(handle, out=out)

    def prefetch_chunk(self, g: Group, kind: str, k: int, out: torch.Tensor) -> None:
        """Start reading chunk ``k`` into ``out`` (an NVMe read in the background; memory tiers do nothing):
        `read_chunk` with the same ``out`` then waits for it."""
        if (g.index, kind) in self._resident:
            return
        with self._lock:
            handle = self._handles.get((g.index, kind, k))
        if handle is not None:
            self.stores[self.spec[(g.index, kind)].tier].prefetch(handle, out=out)

    def _write_resident(self, g: Group, kind: str, src: torch.Tensor, start: int) -> None:
        key = (g.index, kind)
        res = self._resident.get(key)
        if res is None:
            res = self._resident[key] = torch.empty(g.numel, dtype=self.dtypes[kind], device=self.device)
        res[start : start + src.numel()].copy_(src)

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
