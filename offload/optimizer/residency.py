"""Each subgroup's state in its tier: the stores, reads and writes, in-place views, NVMe prefetch and write-behind.

The state lives in a tier -- host DRAM, CXL memory or NVMe files (``offload.tiers``, built from the plan's
tiers by ``offload.tiers.factory``), or the device ("device": not offloaded) -- as the plan says, tier per
subgroup. Memory tiers (host, CXL) are updated in place: the kernel's operands are views of the arena
(``ArenaStore.view``), with no staging copy in or out. NVMe-resident state is staged through host buffers:
prefetched ahead of its turn (``prefetch_depth`` subgroups, in the expected order) and written back behind it
(a writer thread).
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from offload.optimizer.buffers import BufferPool, flat_base
from offload.optimizer.layout import EXP_AVG, MASTER, STATE_ROWS, Slot, row_views, rows
from offload.optimizer.params import gather_params
from offload.optimizer.records import Job
from offload.optimizer.settings import OffloadSettings, OptimizerOffloadError
from offload.tiers import Handle, TierStore
from offload.tiers.factory import TierPlanError, bytes_for_blocks, stores_for_plan
from offload.tiers.host import ArenaStore
from planner.plan import TierPlan

__all__ = ["StateResidency", "view_fn"]


def view_fn(store: TierStore) -> Callable[[Handle], torch.Tensor] | None:
    """The store's in-place view of a handle's bytes, when the tier offers one (memory arenas may)."""
    fn = getattr(store, "view", None)
    return fn if callable(fn) else None


class StateResidency:
    """Where every subgroup's state lives, and its moves between the tiers and host or device buffers.

    ``stores`` maps plan tier names ("dram", "cxl", "nvme") to stores to use (the caller's: not closed here);
    the missing ones are built from ``tier_plans`` (``offload.tiers.factory``), sized to the state, and closed
    by ``close_stores``. ``lock`` is the optimizer's: it guards the prefetched buffers and the writes in flight
    together with the iteration they belong to.
    """

    def __init__(
        self,
        *,
        slots: Sequence[Slot],
        params: Sequence[nn.Parameter],
        stores: Mapping[str, TierStore] | None,
        tier_plans: Sequence[TierPlan],
        settings: OffloadSettings,
        device: torch.device,
        lock: threading.RLock,
        max_numel: int,
    ) -> None:
        self.slots = list(slots)
        self.settings = settings
        self.device = device
        self._params = params
        self._lock = lock
        self._arena_lock = threading.Lock()  # free + put of an arena block, atomically (see write_stored)
        self.owned_stores: dict[str, TierStore] = {}
        self.stores: dict[str, TierStore] = dict(stores or {})
        self.pool: BufferPool | None = None  # staging buffers of the staged subgroups
        self._prefetched: dict[int, torch.Tensor] = {}
        self._writes: list[Future[None]] = []
        try:
            self._open_stores(tier_plans)
            self._place_slots()
            self._initial_state(max_numel)
        except BaseException:
            self.close_stores()
            raise
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="memtier-opt-write")

    # ---- construction -----------------------------------------------------------------------------------------

    def _open_stores(self, tier_plans: Sequence[TierPlan]) -> None:
        """Stores for the tiers the state needs and the caller did not pass, from the plan's tier entries."""
        blocks: dict[str, list[int]] = collections.defaultdict(list)
        for s in self.slots:
            if s.tier != "device" and s.tier not in self.stores:
                blocks[s.tier].append(4 * s.rows * s.layout.numel)
        try:
            built = stores_for_plan(
                tier_plans,
                {tier: bytes_for_blocks(sizes) for tier, sizes in blocks.items()},
                nvme_io_engine=self.settings.nvme_io_engine,
                build_aio=False,  # never compile DeepSpeed's aio op implicitly here
            )
        except TierPlanError as exc:
            raise OptimizerOffloadError(exc.message, field=exc.field) from exc
        self.stores.update(built)
        self.owned_stores.update(built)

    def _place_slots(self) -> None:
        staged_numel = 0
        for s in self.slots:
            if s.tier == "device":
                continue
            s.store = self.stores[s.tier]
            s.staged = view_fn(s.store) is None
            if s.staged:
                staged_numel = max(staged_numel, s.rows * s.layout.numel)
        if staged_numel:
            # the subgroup being updated, the prefetched ones, and one being written back
            self.pool = BufferPool(
                self.settings.prefetch_depth + 2, staged_numel, pin=self.device.type == "cuda"
            )

    def _initial_state(self, max_numel: int) -> None:
        """Master weights from the parameters, zero moments."""
        with torch.no_grad():
            scratch = torch.empty(STATE_ROWS * max_numel, dtype=torch.float32)
            for s in self.slots:
                buf = rows(scratch, s.layout.numel)
                gather_params(self._params, s.layout, buf[MASTER])
                buf[EXP_AVG:].zero_()
                self.store_state(s, buf)

    # ---- read / write a subgroup's [3, n] state wherever it lives ---------------------------------------------

    def store_state(self, slot: Slot, state: torch.Tensor) -> None:
        """Replace the subgroup's state with the host tensor ``state`` ([3, n] fp32).

        With ``master_is_param`` the master row is not kept (the parameters are the master weights): callers
        that mean to set the parameters from ``state[MASTER]`` scatter it themselves (``load_checkpoint``).
        """
        self.write_stored(slot, slot.stored_part(state))

    def write_stored(self, slot: Slot, stored: torch.Tensor) -> None:
        """Replace the rows the subgroup keeps in its tier with ``stored`` ([slot.rows, n], host or device)."""
        if slot.tier == "device":
            if slot.resident is None:
                slot.resident = torch.empty(
                    slot.rows, slot.layout.numel, dtype=torch.float32, device=self.device
                )
            slot.resident.copy_(stored)
            return
        assert slot.store is not None
        view = None if slot.handle is None else view_fn(slot.store)
        if view is not None and slot.handle is not None:
            view(slot.handle).copy_(stored)
            return
        if isinstance(slot.store, ArenaStore) and slot.handle is not None:
            # An arena (host, CXL) replaces a block by freeing it first: putting first would need room for a
            # second copy and, with subgroups of different sizes, fragments the arena until a put fails. Under
            # the store's lock the freed block (the same size) is always there for the put that follows.
            with self._arena_lock:
                slot.store.free(slot.handle)
                slot.handle = None
                slot.handle = slot.store.put(stored)
            return
        new = slot.store.put(stored)  # files: put then free, so a failed write leaves the old state readable
        old, slot.handle = slot.handle, new
        if old is not None:
            slot.store.free(old)

    def load_state(self, slot: Slot, out: torch.Tensor) -> torch.Tensor:
        """Copy the subgroup's state into ``out`` ([3, n] fp32, host) and return it."""
        if slot.master_is_param:
            gather_params(self._params, slot.layout, out[MASTER])
        self.read_stored(slot, slot.stored_part(out))
        return out

    def read_stored(self, slot: Slot, out: torch.Tensor) -> torch.Tensor:
        """Copy the rows the subgroup keeps in its tier into ``out`` ([slot.rows, n], host or device)."""
        if slot.tier == "device":
            assert slot.resident is not None
            return out.copy_(slot.resident)
        assert slot.store is not None and slot.handle is not None
        view = view_fn(slot.store)
        if view is not None:
            return out.copy_(view(slot.handle))
        with self._lock:
            prefetched = self._prefetched.pop(slot.layout.index, None)
        if prefetched is not None:
            # Ordering: get(h, out=buf) waits for the reads prefetch() started into buf.
            slot.store.get(slot.handle, out=prefetched)
            out.copy_(prefetched)
            self.release_staging(prefetched)
            return out
        return slot.store.get(slot.handle, out=out)

    def in_place_rows(self, slot: Slot) -> tuple[torch.Tensor, tuple[list[torch.Tensor], ...]]:
        """The stored rows of a memory-tier subgroup as the tier's own bytes (``view``), and their per-parameter
        views; both cached for the slot's handle (a view stays valid while its handle is live, and in-place
        updates keep the handle: only a put, which makes a new handle, moves the bytes)."""
        assert slot.store is not None and slot.handle is not None
        cached = slot.in_place
        if cached is not None and cached[0] is slot.handle and not slot.store.closed:
            return cached[1], cached[2]
        view = view_fn(slot.store)
        assert view is not None
        state = view(slot.handle)
        views = row_views(slot, state)
        slot.in_place = (slot.handle, state, views)
        return state, views

    def synchronize(self) -> None:
        for store in self.stores.values():
            store.synchronize()

    # ---- staged (NVMe) state: prefetch ahead, write behind ----------------------------------------------------

    def take_state_buffer(self, slot: Slot) -> torch.Tensor:
        """A host [3, n] buffer holding the subgroup's state (prefetched, or read now). Staged slots only."""
        assert self.pool is not None and slot.store is not None and slot.handle is not None
        with self._lock:
            buf = self._prefetched.pop(slot.layout.index, None)
        if buf is None:
            buf = rows(self.pool.acquire(), slot.layout.numel, slot.rows)
        # Ordering: with a prefetch in flight into `buf`, get(h, out=buf) waits for it; otherwise it reads now.
        slot.store.get(slot.handle, out=buf)
        return buf

    def release_staging(self, buf: torch.Tensor) -> None:
        """Return a staging buffer (a [rows, n] view of a pool buffer) to the pool."""
        assert self.pool is not None
        self.pool.release(flat_base(buf))

    def prefetch_ahead(self, pending: list[int]) -> None:
        """Start reading the next staged subgroups of ``pending`` (CPU-side, not started, in expected order; the
        iteration's list, guarded by the lock) into free staging buffers."""
        if self.pool is None or self.settings.prefetch_depth == 0:
            return
        with self._lock:
            outstanding = len(self._prefetched)
            for i in list(pending):
                if outstanding >= self.settings.prefetch_depth:
                    break
                slot = self.slots[i]
                if not slot.staged or i in self._prefetched or slot.handle is None:
                    continue
                flat = self.pool.try_acquire()
                if flat is None:
                    break
                buf = rows(flat, slot.layout.numel, slot.rows)
                assert slot.store is not None
                slot.store.prefetch(slot.handle, out=buf)  # asynchronous for NVMe; lands in buf itself
                self._prefetched[i] = buf
                outstanding += 1

    def write_behind(self, slot: Slot, state: torch.Tensor, job: Job) -> None:
        """Write a staged subgroup's state back on the writer thread; the staging buffer returns to the pool.

        Ordering: the writer runs jobs in submission order and step() waits for all of them before the next
        read of any handle (the next iteration, a checkpoint), so a reader always sees the newest state.
        """

        def write() -> None:
            t = time.perf_counter()
            try:
                self.write_stored(slot, state)  # put (new handle), then free the old one
            finally:
                self.release_staging(state)
            with self._lock:
                job.state_out_s += time.perf_counter() - t

        with self._lock:
            self._writes.append(self._writer.submit(write))

    def drain_writes(self, errors: list[BaseException]) -> None:
        """Wait for every write-behind in flight; their errors are appended to ``errors``."""
        with self._lock:
            writes, self._writes = self._writes, []
        for fut in writes:
            try:
                fut.result()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

    def cancel_prefetches(self) -> None:
        with self._lock:
            prefetched, self._prefetched = self._prefetched, {}
        for i, buf in prefetched.items():
            slot = self.slots[i]
            with contextlib.suppress(Exception):
                if slot.store is not None and slot.handle is not None:
                    slot.store.get(slot.handle, out=buf)  # completes the read before the buffer is reused
            if self.pool is not None:
                self.pool.release(flat_base(buf))

    # ---- teardown --------------------------------------------------------------------------------------------

    def stop_writer(self) -> None:
        self._writer.shutdown(wait=True)

    def free(self) -> None:
        """Free every subgroup's state, close the stores built here and drop the staging buffers."""
        self.cancel_prefetches()
        for slot in self.slots:
            if slot.store is not None and slot.handle is not None and not slot.store.closed:
                with contextlib.suppress(Exception):
                    slot.store.free(slot.handle)
            slot.handle = None
            slot.in_place = None
            slot.resident = None
        self.close_stores()
        if self.pool is not None:
            self.pool.clear()

    def close_stores(self) -> None:
        for store in self.owned_stores.values():
            with contextlib.suppress(Exception):
                store.close()
        self.owned_stores.clear()
