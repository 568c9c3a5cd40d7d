"""Interleaved optimizer-state offload: AdamW whose state lives in tiers, updated on the CPU and the device.

After Deep Optimizer States (Maurya et al. 2024, "Towards Scalable Training of Transformer Models Using
Interleaved Offloading") on top of ZeRO-Offload (Ren et al. 2021) and ZeRO-Infinity (Rajbhandari et al. 2021):

- The parameters are partitioned into **subgroups** of whole tensors, at most ``subgroup_size`` elements each
  (DeepSpeed ZeRO-3's ``sub_group_size`` semantics: tensors are never split; 0: one subgroup per tensor).
  Each subgroup's fp32 master weights and the two Adam moments (``[3, n]`` fp32, 12 bytes per element) live in
  a tier -- host DRAM, CXL memory or NVMe files (``offload.tiers``), or the device ("device": not offloaded) --
  as the plan says, tier per subgroup. When the parameters are fp32 and the CPU can update them where they
  are (the device is the CPU, or the state is device-resident), they *are* the master weights and the tier
  keeps only the moments (``[2, n]``, 8 bytes per element): the same bits, without a master copy to write back.
- A CPU update of a subgroup starts as soon as its gradients are complete: a post-accumulate-grad hook on each
  parameter counts the micro-batches, and on the last one of an accumulation the subgroup is handed to the CPU
  lane (a worker thread), overlapping the rest of backward. NVMe-resident state is prefetched ahead of its
  turn (``prefetch_depth`` subgroups, in the expected order) and written back behind it (a writer thread).
  Memory tiers (host, CXL) are updated in place: the kernel's operands are views of the arena
  (``ArenaStore.view``), with no staging copy in or out; on a CPU device the gradients are read in place too.
  Updates left for ``step()`` (all of them with clipping) run on the thread that called it, which would
  otherwise only wait for the CPU lane.
- Each iteration a scheduler (``offload.optimizer_sched``), driven by the measured throughputs and the free
  device memory of that phase, decides which subgroups update on the device instead: their state is copied
  in, updated by the device kernel and copied back (the device lane, another worker thread). On a CPU-only
  machine the "device" is the CPU; the code paths are the same (device buffers are CPU tensors), and the
  schedule still runs and is logged (``schedule_log``).
- The CPU kernel is the faster, measured here, of torch's fused AdamW and DeepSpeed's CPU Adam
  (``offload.optimizer_kernels``). With torch's, the parameters are bit-identical to
  ``torch.optim.AdamW(fused=True)`` (+ ``torch.nn.utils.clip_grad_norm_``) without offload: the kernel is
  called per parameter tensor, as that optimizer does, and the norm is computed the way clip_grad_norm_ does.
- The update is memory-bound (it streams parameters, gradients and both moments once per step), so the
  memory it streams sits in transparent huge pages where it can: the host tier's arena, and on a CPU device
  the fp32 parameters themselves (moved once, at construction; ``huge_page_params``). And the path around the
  kernel is kept short: right after a sweep through memory every line of Python runs from cold caches, so a
  forced schedule is decided once and its iterations are logged in batches (``schedule_log`` is always
  complete when read).

Gradient clipping needs the global norm *before* any update. The choice made here (correctness first): with
``max_grad_norm`` set, the hooks only compute the gradient norms of each subgroup as it completes (one
``_foreach_norm`` per subgroup, overlapping backward) and every update is deferred to ``step()``, where the global norm is known; without clipping,
updates start in backward.

The optimizer is a ``torch.optim.Optimizer``: ``param_groups`` drive the update (learning rate read when a
subgroup is dispatched), so ``torch.optim.lr_scheduler`` works; ``state_dict()``/``load_state_dict()`` use
torch's per-parameter AdamW format (a torch AdamW state dict loads here and vice versa, plus ``"master"`` for
non-fp32 parameters); ``save_checkpoint()``/``load_checkpoint()`` stream the state subgroup by subgroup to
one file with write-then-rename (``offload.optimizer_checkpoint``).

CUDA: the device lane runs on its own stream, the CPU lane's copies on another; every hand-off between the
backward stream, the lanes and the host is ordered by an event, commented where it happens. On CPU those are
no-ops and the same code runs.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any, Literal

import psutil
import torch
from torch import nn

from offload.optimizer_checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from offload.optimizer_kernels import (
    AdamWHyper,
    AdamWTensors,
    TorchFusedAdamW,
    UpdateKernel,
    make_kernel,
    select_cpu_kernel,
)
from offload.optimizer_sched import (
    STATE_BYTES_PER_ELEM,
    IterationRecord,
    JobRecord,
    Phase,
    RateMeter,
    Schedule,
    Side,
    SubgroupWork,
    Throughputs,
    schedule_subgroups,
    simulate,
)
from offload.tiers import Handle, TierStore, make_tier
from offload.tiers.host import ArenaStore, anonymous_memory
from planner.errors import SpecError
from planner.plan import OptimizerPlan, Plan, TierPlan

__all__ = [
    "OffloadSettings",
    "OffloadedAdamW",
    "OptimizerOffloadError",
    "SubgroupLayout",
    "initial_throughputs",
    "offload_optimizer",
    "partition_subgroups",
]

logger = logging.getLogger("memtier.offload.optimizer")

STATE_ROWS = 3  # fp32 master weights, exp_avg, exp_avg_sq
MASTER, EXP_AVG, EXP_AVG_SQ = 0, 1, 2
TIERS = ("device", "dram", "cxl", "nvme")
_ARENA_ALIGN = 512  # HostTier's default block alignment
_HUGE_PAGE_BYTES = 2 << 20  # x86-64's transparent huge page
_RECORD_BATCH = 32  # iterations of a forced schedule logged together (see OffloadedAdamW._record)
_CHECKPOINT_FORMAT = "memtier-optimizer-state"


class OptimizerOffloadError(SpecError):
    """A setting, plan or call the offloaded optimizer cannot carry out (the message names the field)."""


# ---- settings ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class OffloadSettings:
    """How the runtime carries out an optimizer placement (the placement itself is an ``OptimizerPlan``)."""

    grad_accum: int = 1  # micro-batches per optimizer step: the hooks start updates on the last one
    max_grad_norm: float | None = None  # global-norm clipping (defers updates to step(), see module doc)
    schedule: Literal["auto", "plan", "cpu", "device"] = "auto"  # auto: the scheduler; plan: the plan's sides
    cpu_kernel: str = "auto"  # "auto" (fastest measured here), "torch_fused", "deepspeed"
    build_kernels: bool = False  # allow compiling DeepSpeed's cpu_adam op (~100 s once)
    prefetch_depth: int = 2  # staged (NVMe) subgroups read ahead of their update
    free_grads: bool = True  # drop each .grad once its subgroup has consumed it (ZeRO-Offload behaviour)
    device_budget_bytes: int | None = None  # cap on device working memory (CPU "device": the default pool)
    device_reserve_bytes: int = 0  # device bytes the scheduler leaves free
    rate_smoothing: float = 0.5  # weight of the newest measurement in the throughput averages
    log_limit: int = 1000  # iterations kept in schedule_log
    # a CPU device: fp32 parameters that own their storage move into one buffer of transparent huge pages
    # (their .data; the Parameter objects stay), as the host tier keeps the moments (HostSettings.huge_pages)
    huge_page_params: bool = True
    nvme_io_engine: Literal["auto", "aio", "posix"] = "auto"

    def __post_init__(self) -> None:
        def bad(field: str, message: str) -> OptimizerOffloadError:
            return OptimizerOffloadError(message, field=field)

        if not isinstance(self.grad_accum, int) or self.grad_accum < 1:
            raise bad("grad_accum", f"must be a positive int, got {self.grad_accum!r}")
        if self.max_grad_norm is not None and not (
            self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)
        ):
            raise bad(
                "max_grad_norm", f"must be a positive finite number or None, got {self.max_grad_norm!r}"
            )
        if self.schedule not in ("auto", "plan", "cpu", "device"):
            raise bad("schedule", f"must be auto, plan, cpu or device, got {self.schedule!r}")
        if self.cpu_kernel not in ("auto", "torch_fused", "deepspeed"):
            raise bad("cpu_kernel", f"must be auto, torch_fused or deepspeed, got {self.cpu_kernel!r}")
        if not isinstance(self.prefetch_depth, int) or self.prefetch_depth < 0:
            raise bad("prefetch_depth", f"must be a non-negative int, got {self.prefetch_depth!r}")
        if self.device_budget_bytes is not None and self.device_budget_bytes < 0:
            raise bad("device_budget_bytes", f"must be >= 0 or None, got {self.device_budget_bytes}")
        if self.device_reserve_bytes < 0:
            raise bad("device_reserve_bytes", f"must be >= 0, got {self.device_reserve_bytes}")
        if not 0.0 < self.rate_smoothing <= 1.0:
            raise bad("rate_smoothing", f"must be in (0, 1], got {self.rate_smoothing}")
        if self.nvme_io_engine not in ("auto", "aio", "posix"):
            raise bad("nvme_io_engine", f"must be auto, aio or posix, got {self.nvme_io_engine!r}")

    def replace(self, **changes: Any) -> OffloadSettings:
        return dataclasses.replace(self, **changes)


# ---- subgroups ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SubgroupLayout:
    """One subgroup: a run of whole parameters of one parameter group."""

    index: int
    group: int  # parameter-group index
    params: tuple[int, ...]  # global parameter indices (torch's state_dict numbering)
    offsets: tuple[int, ...]  # element offset of each parameter inside the subgroup
    numels: tuple[int, ...]
    numel: int
    start: int  # element offset of the subgroup in the concatenation of all parameters


def partition_subgroups(
    numels_by_group: Sequence[Sequence[int]], subgroup_size: int
) -> tuple[SubgroupLayout, ...]:
    """Whole parameters, in order, packed into subgroups of at most ``subgroup_size`` elements.

    A parameter larger than ``subgroup_size`` forms its own subgroup (DeepSpeed ZeRO-3, stage3.py
    ``_create_fp16_sub_groups``); ``subgroup_size == 0`` gives one subgroup per parameter. Subgroups never
    span parameter groups (their hyper-parameters differ).
    """
    if subgroup_size < 0:
        raise OptimizerOffloadError(f"must be >= 0, got {subgroup_size}", field="subgroup_size")
    out: list[SubgroupLayout] = []
    pid = 0
    start = 0

    def close(group: int, members: list[tuple[int, int]]) -> None:
        nonlocal start
        offsets, acc = [], 0
        for _, n in members:
            offsets.append(acc)
            acc += n
        out.append(
            SubgroupLayout(
                index=len(out),
                group=group,
                params=tuple(p for p, _ in members),
                offsets=tuple(offsets),
                numels=tuple(n for _, n in members),
                numel=acc,
                start=start,
            )
        )
        start += acc

    for g, numels in enumerate(numels_by_group):
        members: list[tuple[int, int]] = []
        size = 0
        for n in numels:
            if members and (subgroup_size == 0 or size + n > subgroup_size):
                close(g, members)
                members, size = [], 0
            members.append((pid, n))
            size += n
            pid += 1
        if members:
            close(g, members)
    return tuple(out)


def _plan_lookup(placement: OptimizerPlan, start: int) -> tuple[str, Side | None]:
    """(tier, planned update side) of the plan subgroup holding element ``start``."""
    if not placement.offload:
        return "device", "device"
    if not placement.subgroups:
        return placement.tier, None
    acc = 0
    for sg in placement.subgroups:
        if start < acc + sg.numel:
            return sg.tier, sg.update_side
        acc += sg.numel
    last = placement.subgroups[-1]  # the model has more elements than the plan counted: extend the last
    return last.tier, last.update_side


# ---- small runtime pieces ----------------------------------------------------------------------------------


class _BufferPool:
    """``count`` flat fp32 host buffers of ``numel`` elements (pinned with CUDA), handed out and returned."""

    def __init__(self, count: int, numel: int, *, pin: bool) -> None:
        self.numel = numel
        self._pin = pin
        self._free: list[torch.Tensor] = []
        self._created = 0
        self._count = count
        self._cond = threading.Condition()

    def _new(self) -> torch.Tensor:
        return torch.empty(self.numel, dtype=torch.float32, pin_memory=self._pin)

    def acquire(self) -> torch.Tensor:
        with self._cond:
            while not self._free and self._created >= self._count:
                self._cond.wait()
            if self._free:
                return self._free.pop()
            self._created += 1
        return self._new()  # allocated lazily, outside the lock

    def try_acquire(self) -> torch.Tensor | None:
        with self._cond:
            if self._free:
                return self._free.pop()
            if self._created >= self._count:
                return None
            self._created += 1
        return self._new()

    def release(self, buf: torch.Tensor) -> None:
        with self._cond:
            self._free.append(buf)
            self._cond.notify()

    def clear(self) -> None:
        """Drop the idle buffers (the memory goes back); buffers in use come back later as usual."""
        with self._cond:
            self._created -= len(self._free)
            self._free.clear()


def _rows(flat: torch.Tensor, numel: int, rows: int = STATE_ROWS) -> torch.Tensor:
    """The first ``rows * numel`` elements of a flat buffer as a contiguous ``[rows, numel]`` tensor."""
    return flat[: rows * numel].view(rows, numel)


class _Streams:
    """The lanes' CUDA streams; on CPU every method is a no-op and the same code runs."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.cpu_lane = torch.cuda.Stream(device) if self.cuda else None  # gradient D2H, parameter H2D
        self.device_lane = torch.cuda.Stream(device) if self.cuda else None  # state H2D/D2H, device kernels

    def use(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext()

    def record(self) -> Any:
        """An event on the current stream (None on CPU)."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def wait(self, event: Any) -> None:
        """The current stream waits for ``event`` (nothing on CPU)."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    @staticmethod
    def host_wait(event: Any) -> None:
        """The calling thread waits for ``event`` (nothing on CPU)."""
        if event is not None:
            event.synchronize()

    def synchronize(self) -> None:
        if self.cuda:
            assert self.cpu_lane is not None and self.device_lane is not None
            self.cpu_lane.synchronize()
            self.device_lane.synchronize()


@dataclass
class _Slot:
    """Where one subgroup's state is and its per-parameter step counts."""

    layout: SubgroupLayout
    tier: str
    store: TierStore | None = None
    handle: Handle | None = None
    resident: torch.Tensor | None = None  # tier "device": the stored rows, [rows, n]
    # fp32 parameters in host-addressable memory (the device tier, or any tier when the device is the CPU):
    # the parameters are the master weights; the tier keeps only the two moments ([2, n], see _Slot.rows)
    master_is_param: bool = False
    staged: bool = False  # read/written through a host staging buffer (no in-place view of the tier)
    steps: list[float] = dataclasses.field(default_factory=list)  # per parameter (see AdamWTensors.steps)
    planned_side: Side | None = None
    # (handle, its stored rows as a view of the tier, per-parameter views of them): see _in_place_rows
    in_place: tuple[Handle, torch.Tensor, tuple[list[torch.Tensor], ...]] | None = None
    shapes: tuple[torch.Size, ...] = ()  # of the subgroup's parameters

    @property
    def rows(self) -> int:
        """Rows the tier keeps: [master, exp_avg, exp_avg_sq], or the two moments when master_is_param."""
        return STATE_ROWS - 1 if self.master_is_param else STATE_ROWS

    @property
    def moment_rows(self) -> tuple[int, int]:
        """Indices of exp_avg and exp_avg_sq in the stored [rows, n] tensor."""
        return (0, 1) if self.master_is_param else (EXP_AVG, EXP_AVG_SQ)

    def stored_part(self, state: torch.Tensor) -> torch.Tensor:
        """The rows of a full [3, n] state that the tier keeps (a view)."""
        return state[EXP_AVG:] if self.master_is_param else state


@dataclass
class _Job:
    """Timings of one subgroup's update (filled by the lane; frozen into a JobRecord at step end)."""

    index: int
    side: Side
    numel: int
    tier: str
    staged: bool
    start: float = 0.0
    end: float = 0.0
    kernel_s: float = 0.0
    grads_s: float = 0.0
    state_in_s: float = 0.0
    state_out_s: float = 0.0
    params_s: float = 0.0
    state_bytes: int = 0
    grad_bytes: int = 0
    param_bytes: int = 0
    fallback: bool = False


@dataclass(frozen=True, kw_only=True)
class _InlineJob:
    """A CPU-side job that step()'s own thread runs (see ``OffloadedAdamW._finish``)."""

    index: int
    hyper: AdamWHyper


@dataclass(frozen=True, kw_only=True)
class _Unlogged:
    """A finished step not yet turned into an IterationRecord (see OffloadedAdamW._record)."""

    iteration: int
    schedule: Schedule
    jobs: list[_Job]
    rates: Throughputs  # the rates its decision used
    grad_norm: float | None
    coef_cpu: torch.Tensor | None
    skipped: tuple[int, ...]


class _Iteration:
    """Bookkeeping of one optimizer step, from the first completed gradient to the end of step()."""

    def __init__(self, n_params: int, layouts: Sequence[SubgroupLayout]) -> None:
        self.hits = [0] * n_params  # backward passes that reached each parameter since the last step
        self.remaining = [len(lay.params) for lay in layouts]  # parameters of a subgroup not yet complete
        self.t0: float | None = None  # the first subgroup's completion
        self.ready_s: dict[int, float] = {}
        self.schedule: Schedule | None = None
        self.dispatched: set[int] = set()  # subgroups handed to a lane or queued inline
        self.futures: list[Future[None]] = []  # of the jobs handed to a lane thread
        self.norms: dict[int, torch.Tensor] = {}  # parameter index -> its gradient's 2-norm
        self.grad_events: dict[int, Any] = {}  # subgroup -> CUDA event after its gradients
        self.step_event: Any = None  # CUDA event at step() entry, for gradients no hook saw
        self.coef: torch.Tensor | None = None  # clip coefficient (device) ...
        self.coef_cpu: torch.Tensor | None = None  # ... and on the host
        self.grad_norm: float | None = None
        self.in_step = False
        self.jobs: list[_Job] = []
        self.cpu_pending: list[int] = []  # CPU-side subgroups not started, in expected order (prefetch)
        self.cpu_lane_futures: list[Future[None]] = []  # jobs handed to the CPU lane's thread
        self.skipped: list[int] = []

    @property
    def started(self) -> bool:
        return bool(self.dispatched)

    def now(self) -> float:
        return time.perf_counter() - (self.t0 if self.t0 is not None else time.perf_counter())


# ---- the optimizer -----------------------------------------------------------------------------------------


class OffloadedAdamW(torch.optim.Optimizer):
    """AdamW with offloaded, interleaved optimizer state (see the module docstring).

    NOTE: ``optimizer.state`` stays empty -- the state lives in the tiers, per subgroup; ``state_dict()``
    gathers it in torch's per-parameter format. Parameters are grouped into subgroups once, at construction
    (``add_param_group`` raises).

    ``placement`` (a plan's ``OptimizerPlan``) gives the subgroup size, the tier per subgroup and the planned
    update side; without it every subgroup of ``subgroup_size`` goes to ``tier``. ``stores`` maps plan tier
    names ("dram", "cxl", "nvme") to tier stores to use (not closed by ``remove()``); missing ones are built
    from ``tier_plans`` (``plan.tiers``), sized to the state. ``free_device_bytes(phase)`` overrides the
    device-memory probe the scheduler reads.
    """

    def __init__(
        self,
        params: Iterable[Any],
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        placement: OptimizerPlan | None = None,
        subgroup_size: int = 0,
        tier: str = "dram",
        stores: Mapping[str, TierStore] | None = None,
        tier_plans: Sequence[TierPlan] = (),
        settings: OffloadSettings | None = None,
        throughputs: Throughputs | None = None,
        free_device_bytes: Callable[[Phase], int] | None = None,
        share_param_groups: list[dict[str, Any]] | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=False, maximize=False, foreach=None,
            capturable=False, differentiable=False, fused=None,
        )  # fmt: skip
        self._built = False
        super().__init__(params, defaults)
        if share_param_groups is not None:
            # NOTE: the groups are the wrapped optimizer's own dicts, so an LR scheduler built on either
            # optimizer drives this one; only the hyper-parameters are read from them.
            for mine, theirs in zip(self.param_groups, share_param_groups):
                if [id(p) for p in mine["params"]] != [id(p) for p in theirs["params"]]:
                    raise OptimizerOffloadError("differ from the optimizer's", field="share_param_groups")
                for key, value in defaults.items():
                    theirs.setdefault(key, value)
            self.param_groups = share_param_groups
        self.settings = settings or OffloadSettings()
        if tier not in TIERS:
            raise OptimizerOffloadError(f"must be one of {TIERS}, got {tier!r}", field="tier")
        self.placement = placement or OptimizerPlan(
            offload=tier != "device",
            tier=tier,  # type: ignore[arg-type]  # checked against TIERS above
            subgroup_size=subgroup_size,
        )
        self._validate_groups()
        self._params: list[nn.Parameter] = [p for g in self.param_groups for p in g["params"]]
        devices = {p.device for p in self._params}
        if len(devices) != 1:
            raise OptimizerOffloadError(
                f"all parameters must be on one device, got {sorted(map(str, devices))}", field="params"
            )
        self.device = devices.pop()
        self._streams = _Streams(self.device)
        self._layouts = partition_subgroups(
            [[p.numel() for p in g["params"]] for g in self.param_groups], self.placement.subgroup_size
        )
        self._sub_of = [0] * len(self._params)
        for lay in self._layouts:
            for pid in lay.params:
                self._sub_of[pid] = lay.index
        self._max_numel = max((lay.numel for lay in self._layouts), default=0)

        # kernels
        self.cpu_kernel_name = select_cpu_kernel(self.settings.cpu_kernel, build=self.settings.build_kernels)
        self._cpu_kernel: UpdateKernel = make_kernel(self.cpu_kernel_name, build=self.settings.build_kernels)
        self._device_kernel: UpdateKernel = TorchFusedAdamW()
        self.params_in_huge_pages = self._params_into_huge_pages() if self.settings.huge_page_params else 0

        # tiers and state
        self._owned_stores: dict[str, TierStore] = {}
        self.stores: dict[str, TierStore] = dict(stores or {})
        self._slots: list[_Slot] = []
        self._state_pool: _BufferPool | None = None
        self._grad_pool = _BufferPool(2, self._max_numel, pin=self._streams.cuda)
        self._prefetched: dict[int, torch.Tensor] = {}
        self._lock = threading.RLock()
        self._arena_lock = threading.Lock()  # free + put of an arena block, atomically (see _store_state)
        self._device_cache: dict[str, torch.Tensor] = {}  # the device lane's working buffers, this step only
        self._device_cache_bytes = 0
        try:
            self._build_slots(tier_plans)
        except BaseException:
            self._close_stores()
            raise

        # lanes: one worker thread each (jobs of a lane run in submission order)
        self._cpu_lane = ThreadPoolExecutor(1, thread_name_prefix="memtier-opt-cpu")
        self._device_lane = ThreadPoolExecutor(1, thread_name_prefix="memtier-opt-device")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="memtier-opt-write")
        self._writes: list[Future[None]] = []
        self._lane_threads = threading.local()  # the OpenMP team size each lane thread has set (see _run_job)

        # scheduling
        self._meter = RateMeter(
            throughputs or default_throughputs(self.device), smoothing=self.settings.rate_smoothing
        )
        self._free_device_bytes_fn = free_device_bytes
        self._log: collections.deque[IterationRecord] = collections.deque(maxlen=self.settings.log_limit)
        self._unlogged: list[_Unlogged] = []  # steps not yet in the log (see _record)
        self._forced: dict[tuple[str, Phase], Schedule] = {}  # forced schedules by (mode, phase): _decide
        self.iteration = 0
        self._order: tuple[int, ...] = tuple(
            reversed(range(len(self._layouts)))
        )  # backward: last layers first
        self._ready_s: dict[int, float] = {}
        self._iter: _Iteration | None = None
        self.last_grad_norm: torch.Tensor | None = None

        self._hooks = [
            p.register_post_accumulate_grad_hook(self._make_hook(i)) for i, p in enumerate(self._params)
        ]
        self._removed = False
        self._built = True
        logger.info(
            "offloaded AdamW: %d parameters in %d subgroups (size %d), tiers %s, CPU kernel %s, device %s",
            sum(lay.numel for lay in self._layouts), len(self._layouts), self.placement.subgroup_size,
            dict(collections.Counter(s.tier for s in self._slots)), self.cpu_kernel_name, self.device,
        )  # fmt: skip

    # ---- construction helpers -----------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_built", False):
            # NOTE: the subgroups, tiers and hooks are built once; a new group would need all of them re-made.
            raise OptimizerOffloadError(
                "cannot add a parameter group after construction", field="param_groups"
            )
        super().add_param_group(param_group)

    def _validate_groups(self) -> None:
        for g, group in enumerate(self.param_groups):
            if group.get("amsgrad"):
                raise OptimizerOffloadError("AMSGrad is not supported", field=f"param_groups[{g}].amsgrad")
            if group.get("maximize"):
                raise OptimizerOffloadError("maximize is not supported", field=f"param_groups[{g}].maximize")
            betas = group.get("betas")
            if not isinstance(betas, (tuple, list)) or len(betas) != 2:
                raise OptimizerOffloadError(
                    f"must be two numbers, got {betas!r}", field=f"param_groups[{g}].betas"
                )
            for i, p in enumerate(group["params"]):
                if not p.is_floating_point():
                    raise OptimizerOffloadError(
                        f"must be floating point, got {p.dtype}", field=f"param_groups[{g}].params[{i}]"
                    )

    def _build_slots(self, tier_plans: Sequence[TierPlan]) -> None:
        # tier per subgroup from the plan
        slots = []
        for lay in self._layouts:
            tier, side = _plan_lookup(self.placement, lay.start)
            if tier not in TIERS:
                raise OptimizerOffloadError(
                    f"unknown tier {tier!r}", field=f"optimizer.subgroups[{lay.index}].tier"
                )
            params = [self._params[i] for i in lay.params]
            # NOTE: with fp32 parameters the CPU (or the device, for device-resident state) can update the
            # parameters themselves: a separate fp32 master copy would hold the same bits and cost a copy back
            # per update (ZeRO-Offload keeps one because its parameters are fp16 on a GPU). The tier then keeps
            # the two moments only, 8 bytes per element instead of 12.
            master_is_param = all(p.dtype == torch.float32 for p in params) and (
                tier == "device" or self.device.type == "cpu"
            )
            slots.append(
                _Slot(
                    layout=lay,
                    tier=tier,
                    master_is_param=master_is_param,
                    steps=[0.0] * len(lay.params),
                    planned_side=side,
                    shapes=tuple(p.shape for p in params),
                )
            )
        self._slots = slots
        need: dict[str, list[int]] = collections.defaultdict(list)
        for s in slots:
            if s.tier != "device":
                need[s.tier].append(4 * s.rows * s.layout.numel)
        for tier, sizes in need.items():
            if tier not in self.stores:
                store = _build_store(tier, sizes, tier_plans, self.settings)
                self.stores[tier] = store
                self._owned_stores[tier] = store
        staged_numel = 0
        for s in slots:
            if s.tier == "device":
                continue
            s.store = self.stores[s.tier]
            s.staged = _view_fn(s.store) is None
            if s.staged:
                staged_numel = max(staged_numel, s.rows * s.layout.numel)
        if staged_numel:
            # the subgroup being updated, the prefetched ones, and one being written back
            self._state_pool = _BufferPool(
                self.settings.prefetch_depth + 2, staged_numel, pin=self._streams.cuda
            )
        # initial state: master weights from the parameters, zero moments
        with torch.no_grad():
            scratch = torch.empty(STATE_ROWS * self._max_numel, dtype=torch.float32)
            for s in slots:
                buf = _rows(scratch, s.layout.numel)
                self._gather_params(s.layout, buf[MASTER])
                buf[EXP_AVG:].zero_()
                self._store_state(s, buf)

    def _params_into_huge_pages(self) -> int:
        """Move the fp32 parameters of a CPU device into one buffer advised MADV_HUGEPAGE; how many moved.

        The CPU update streams parameters, gradients and both moments through memory once per step; with the
        parameters and the moments (HostTier) in 2 MiB pages the kernel takes fewer TLB misses (measured here,
        33.5M parameters: memtier's step 1.7% ahead of DeepSpeed's CPU Adam in two runs, 0.8-0.9% behind it in
        three without). Only parameters that own their whole storage move (no
        views, no storage shared with another parameter): their bytes are copied exactly and ``p.data`` is
        pointed at the copy, so the model, hooks and references to the Parameter objects are unaffected.
        """
        if self.device.type != "cpu":
            return 0
        storages = collections.Counter(p.untyped_storage().data_ptr() for p in self._params)
        movable = [
            p
            for p in self._params
            if p.dtype == torch.float32
            and p.is_contiguous()
            and p.storage_offset() == 0
            and p.untyped_storage().nbytes() == p.numel() * 4
            and storages[p.untyped_storage().data_ptr()] == 1
            and p.numel() > 0
        ]
        sizes = [-(-p.numel() * 4 // 64) * 64 for p in movable]  # 64-byte aligned slots (a cache line)
        if sum(sizes) < _HUGE_PAGE_BYTES:
            return 0  # less than one huge page: nothing to gain
        buf, advised = anonymous_memory(sum(sizes), huge_pages=True)
        if not advised:
            return 0
        offset = 0
        with torch.no_grad():
            for p, size in zip(movable, sizes):
                dst = buf[offset : offset + p.numel() * 4].view(torch.float32).view(p.shape)
                dst.copy_(p)
                # NOTE: .data is replaced, not the Parameter: modules, hooks and the caller's references keep
                # the same object; the old storage is freed when nothing else holds it
                p.data = dst
                offset += size
        return len(movable)

    def _gather_params(self, lay: SubgroupLayout, out: torch.Tensor) -> None:
        for pid, off, n in zip(lay.params, lay.offsets, lay.numels):
            out[off : off + n].view_as(self._params[pid]).copy_(self._params[pid].detach())

    # ---- residency: read / write a subgroup's [3, n] state wherever it lives ------------------------------

    def _store_state(self, slot: _Slot, state: torch.Tensor) -> None:
        """Replace the subgroup's state with the host tensor ``state`` ([3, n] fp32).

        With ``master_is_param`` the master row is not kept (the parameters are the master weights): callers
        that mean to set the parameters from ``state[MASTER]`` scatter it themselves (``load_checkpoint``).
        """
        self._write_stored(slot, slot.stored_part(state))

    def _write_stored(self, slot: _Slot, stored: torch.Tensor) -> None:
        """Replace the rows the subgroup keeps in its tier with ``stored`` ([slot.rows, n], host or device)."""
        if slot.tier == "device":
            if slot.resident is None:
                slot.resident = torch.empty(
                    slot.rows, slot.layout.numel, dtype=torch.float32, device=self.device
                )
            slot.resident.copy_(stored)
            return
        assert slot.store is not None
        view = None if slot.handle is None else _view_fn(slot.store)
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

    def _load_state(self, slot: _Slot, out: torch.Tensor) -> torch.Tensor:
        """Copy the subgroup's state into ``out`` ([3, n] fp32, host) and return it."""
        if slot.master_is_param:
            self._gather_params(slot.layout, out[MASTER])
        self._read_stored(slot, slot.stored_part(out))
        return out

    def _read_stored(self, slot: _Slot, out: torch.Tensor) -> torch.Tensor:
        """Copy the rows the subgroup keeps in its tier into ``out`` ([slot.rows, n], host or device)."""
        if slot.tier == "device":
            assert slot.resident is not None
            return out.copy_(slot.resident)
        assert slot.store is not None and slot.handle is not None
        view = _view_fn(slot.store)
        if view is not None:
            return out.copy_(view(slot.handle))
        with self._lock:
            prefetched = self._prefetched.pop(slot.layout.index, None)
        if prefetched is not None:
            # Ordering: get(h, out=buf) waits for the reads prefetch() started into buf.
            slot.store.get(slot.handle, out=prefetched)
            out.copy_(prefetched)
            assert self._state_pool is not None
            self._state_pool.release(_flat_base(prefetched))
            return out
        return slot.store.get(slot.handle, out=out)

    def _scatter_params(
        self, lay: SubgroupLayout, master: torch.Tensor, active: Sequence[int] | None = None
    ) -> int:
        """Model parameters <- master weights (cast to the parameter dtype); returns the bytes written."""
        nbytes = 0
        ks = range(len(lay.params)) if active is None else active
        for k in ks:
            p = self._params[lay.params[k]]
            off, n = lay.offsets[k], lay.numels[k]
            # non_blocking: from pinned host memory on CUDA; the caller orders it (see the lanes)
            p.detach().copy_(master[off : off + n].view_as(p), non_blocking=True)
            nbytes += n * p.element_size()
        return nbytes

    # ---- hooks ------------------------------------------------------------------------------------------------

    def _make_hook(self, pid: int) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            self._on_grad(pid, param)

        return hook

    def _on_grad(self, pid: int, param: torch.Tensor) -> None:
        """Runs on the autograd thread after ``param.grad`` has been accumulated for one backward pass."""
        with self._lock:
            it = self._iter
            if it is None:
                it = self._iter = _Iteration(len(self._params), self._layouts)
            if it.in_step:
                raise OptimizerOffloadError("backward ran during step()", field="step")
            it.hits[pid] += 1
            if it.hits[pid] > self.settings.grad_accum:
                raise OptimizerOffloadError(
                    f"parameter {pid} received gradients from {it.hits[pid]} backward passes since the last "
                    f"step(), more than grad_accum={self.settings.grad_accum}; call step() every grad_accum "
                    "micro-batches or set grad_accum",
                    field="grad_accum",
                )
            if it.hits[pid] < self.settings.grad_accum:
                return
            # the parameter's gradient is complete for this iteration
            s = self._sub_of[pid]
            it.remaining[s] -= 1
            if it.remaining[s]:
                return
            if self.settings.max_grad_norm is not None:
                self._subgroup_norms(it, s)
            if it.t0 is None:
                it.t0 = time.perf_counter()
            it.ready_s[s] = it.now()
            # Ordering: the lanes' streams wait on this event before they read the subgroup's gradients,
            # which were produced on the current (backward) stream.
            it.grad_events[s] = self._streams.record()
            if self.settings.max_grad_norm is not None:
                return  # updates wait for the global norm (step())
            if it.schedule is None:
                it.schedule = self._decide(it, "backward")
            self._dispatch(it, s)

    def _subgroup_norms(self, it: _Iteration, s: int) -> None:
        """The gradient 2-norms of subgroup ``s``'s parameters: one ``_foreach_norm`` call (the op
        clip_grad_norm_ uses) per subgroup, on the backward's stream, as soon as its gradients are complete."""
        pids = [pid for pid in self._layouts[s].params if self._params[pid].grad is not None]
        if not pids:
            return
        with torch.no_grad():
            norms = torch._foreach_norm([self._params[pid].grad for pid in pids], 2.0)  # type: ignore[misc]
        it.norms.update(zip(pids, norms))

    # ---- scheduling -----------------------------------------------------------------------------------------

    def free_device_bytes(self, phase: Phase) -> int:
        """Device memory the device lane may use now: the probe, less the reserve, within the budget."""
        if self._free_device_bytes_fn is not None:
            free = int(self._free_device_bytes_fn(phase))
        elif self.device.type == "cuda":
            idx = self.device.index if self.device.index is not None else torch.cuda.current_device()
            free_now, _total = torch.cuda.mem_get_info(idx)
            # bytes the caching allocator holds but does not use are free for our buffers too
            free = free_now + torch.cuda.memory_reserved(idx) - torch.cuda.memory_allocated(idx)
        else:
            free = psutil.virtual_memory().available
        free += self._device_cache_bytes  # the lane's cached buffers can be reused
        free -= self.settings.device_reserve_bytes
        if self.settings.device_budget_bytes is not None:
            free = min(free, self.settings.device_budget_bytes)
        return max(0, free)

    def _work(self, slot: _Slot, ready_s: float) -> SubgroupWork:
        lay = slot.layout
        params = [self._params[i] for i in lay.params]
        grad_elem = max((p.element_size() for p in params), default=4)
        upcast = any(p.dtype != torch.float32 for p in params)
        # fp32 parameters on a CPU device: a CPU update reads .grad and writes the parameters where they are
        in_place = slot.master_is_param and self.device.type == "cpu"
        return SubgroupWork(
            index=lay.index,
            numel=lay.numel,
            tier=slot.tier,
            staged=slot.staged,
            grad_bytes=0 if in_place else lay.numel * grad_elem,
            param_bytes=0 if in_place else sum(p.numel() * p.element_size() for p in params),
            device_bytes=0 if slot.tier == "device" else (4 * slot.rows + (4 if upcast else 0)) * lay.numel,
            ready_s=ready_s,
        )

    def _decide(self, it: _Iteration, phase: Phase) -> Schedule:
        """This iteration's CPU/device split (called once, at the first completed subgroup or in step())."""
        mode = self.settings.schedule
        # NOTE: a forced schedule's sides never change, so it is decided once per phase and expected order and
        # reused; its predicted_s and free_device_bytes are those of that first decision (jobs still check free
        # device memory when they run, and fall back to the CPU)
        schedule = self._forced.get((mode, phase)) if mode != "auto" else None
        if schedule is None or schedule.order != self._order:
            schedule = self._new_schedule(phase)
            if mode != "auto":
                self._forced[mode, phase] = schedule
        it.cpu_pending = [i for i in schedule.order if schedule.sides[i] == "cpu"]
        if logger.isEnabledFor(logging.DEBUG):  # the arguments cost time on every step
            logger.debug(
                "iteration %d (%s): %s, %d/%d subgroups on the device, predicted %.4f s, free device %d B",
                self.iteration, phase, schedule.strategy, len(schedule.device_subgroups), len(schedule.sides),
                schedule.predicted_s, schedule.free_device_bytes,
            )  # fmt: skip
        self._prefetch_ahead(it)
        return schedule

    def _new_schedule(self, phase: Phase) -> Schedule:
        """The scheduler's decision ("auto"), or the forced sides with their predicted makespan."""
        deferred = phase == "step"
        work = [
            self._work(s, 0.0 if deferred else self._ready_s.get(s.layout.index, 0.0)) for s in self._slots
        ]
        rates = self._meter.rates
        mode = self.settings.schedule
        # forced onto the CPU, nothing is lent device memory: the probe (a /proc read on CPU) is skipped
        free = 0 if mode == "cpu" else self.free_device_bytes(phase)
        order = self._order
        plan_sides = {s.layout.index: s.planned_side for s in self._slots if s.planned_side is not None}
        if mode == "auto":
            return schedule_subgroups(
                work, rates, free_device_bytes=free, order=order, plan_sides=plan_sides or None, phase=phase
            )
        forced: dict[int, Side] = {}
        for s in self._slots:
            i = s.layout.index
            if s.tier == "device":
                forced[i] = "device"
            elif mode == "plan":
                forced[i] = plan_sides.get(i) or "cpu"
            else:
                forced[i] = "device" if mode == "device" else "cpu"
        predicted = simulate(work, forced, order, rates)
        return Schedule(
            sides=tuple(forced[i] for i in range(len(self._slots))),
            order=order,
            strategy=mode if mode == "plan" else f"forced:{mode}",
            predicted_s=predicted,
            baselines_s={mode: predicted},
            free_device_bytes=free,
            phase=phase,
        )

    def _dispatch(self, it: _Iteration, s: int, inline: list[_InlineJob] | None = None) -> None:
        """Hand subgroup ``s`` to its lane (called with the lock held); with ``inline``, a CPU-side job is
        queued there instead, for the calling thread to run (see ``_finish``)."""
        assert it.schedule is not None
        if s in it.dispatched:
            return
        it.dispatched.add(s)
        side = it.schedule.sides[s]
        # NOTE: the hyper-parameters are read here, when the subgroup is handed over -- during the last
        # backward when updates start early -- not when step() is called: an LR scheduler stepped after
        # step() (the usual order) is seen by the next iteration, as with torch's optimizers.
        hyper = AdamWHyper.from_group(self.param_groups[self._layouts[s].group])
        threads = torch.get_num_threads()
        if side == "cpu" and inline is not None and self._slots[s].tier != "device":
            inline.append(_InlineJob(index=s, hyper=hyper))
            return
        lane = self._device_lane if side == "device" else self._cpu_lane
        fut = lane.submit(self._run_job, it, s, side, hyper, threads)
        it.futures.append(fut)
        if lane is self._cpu_lane:
            it.cpu_lane_futures.append(fut)

    # ---- the lanes ---------------------------------------------------------------------------------------------

    def _run_job(
        self, it: _Iteration, s: int, side: Side, hyper: AdamWHyper, threads: int | None = None
    ) -> None:
        if threads is not None and getattr(self._lane_threads, "count", None) != threads:
            # NOTE: OpenMP's team size is per calling thread: a lane thread starts with OpenMP's default (every
            # core, or OMP_NUM_THREADS), not with the training thread's torch.set_num_threads, and DeepSpeed's
            # kernel parallelises with it. The lane adopts the count of the thread that handed it the job.
            torch.set_num_threads(threads)
            self._lane_threads.count = threads
        slot = self._slots[s]
        job = _Job(index=s, side=side, numel=slot.layout.numel, tier=slot.tier, staged=slot.staged)
        job.start = it.now()
        if slot.tier == "device":
            job.side = "device"  # resident state updates where it lives
        with torch.no_grad():
            if job.side == "device" and slot.tier != "device":
                need = self._work(slot, 0.0).device_bytes
                if need > self.free_device_bytes("step" if it.in_step else "backward"):
                    job.side, job.fallback = "cpu", True
            if job.side == "cpu":
                self._cpu_update(it, slot, hyper, job)
            else:
                self._device_update(it, slot, hyper, job)
        job.end = it.now()
        with self._lock:
            it.jobs.append(job)

    def _active(self, lay: SubgroupLayout) -> list[int]:
        return [k for k, pid in enumerate(lay.params) if self._params[pid].grad is not None]

    def _release_grads(self, lay: SubgroupLayout, active: Sequence[int], stream: Any) -> None:
        # NOTE: a consumed gradient is dropped (``.grad = None``) as ZeRO-Offload does, so device memory is
        # freed during backward; after step() every .grad is None (``free_grads=False`` keeps them).
        if not self.settings.free_grads:
            return
        for k in active:
            p = self._params[lay.params[k]]
            if stream is not None and p.grad is not None:
                # Ordering: the allocator must not hand this memory to the backward stream before the lane's
                # stream has read it.
                p.grad.record_stream(stream)
            p.grad = None

    def _take_state_buffer(self, slot: _Slot) -> torch.Tensor:
        """A host [3, n] buffer holding the subgroup's state (prefetched, or read now). Staged slots only."""
        assert self._state_pool is not None and slot.store is not None and slot.handle is not None
        with self._lock:
            buf = self._prefetched.pop(slot.layout.index, None)
        if buf is None:
            buf = _rows(self._state_pool.acquire(), slot.layout.numel, slot.rows)
        # Ordering: with a prefetch in flight into `buf`, get(h, out=buf) waits for it; otherwise it reads now.
        slot.store.get(slot.handle, out=buf)
        return buf

    def _prefetch_ahead(self, it: _Iteration) -> None:
        """Start reading the next staged CPU-side subgroups' state into free staging buffers."""
        if self._state_pool is None or self.settings.prefetch_depth == 0:
            return
        with self._lock:
            outstanding = len(self._prefetched)
            for i in list(it.cpu_pending):
                if outstanding >= self.settings.prefetch_depth:
                    break
                slot = self._slots[i]
                if not slot.staged or i in self._prefetched or slot.handle is None:
                    continue
                flat = self._state_pool.try_acquire()
                if flat is None:
                    break
                buf = _rows(flat, slot.layout.numel, slot.rows)
                assert slot.store is not None
                slot.store.prefetch(slot.handle, out=buf)  # asynchronous for NVMe; lands in buf itself
                self._prefetched[i] = buf
                outstanding += 1

    def _cpu_update(self, it: _Iteration, slot: _Slot, hyper: AdamWHyper, job: _Job) -> None:
        lay = slot.layout
        with self._lock:
            if lay.index in it.cpu_pending:
                it.cpu_pending.remove(lay.index)
        self._prefetch_ahead(it)
        active = self._active(lay)
        if not active:
            return
        params = [self._params[lay.params[k]] for k in active]
        streams = self._streams
        staged: torch.Tensor | None = None  # a staging buffer this job holds (returned on any failure)
        gflat: torch.Tensor | None = None  # a host gradient buffer, taken only when a gradient is copied
        in_place_grads = False
        try:
            # 1. gradients on the host, fp32: used where they are when they already are (CPU device, fp32),
            # else copied (device to host, or upcast)
            t = time.perf_counter()
            with streams.use(streams.cpu_lane):
                # Ordering: the copies below read the gradients after backward produced them.
                streams.wait(it.grad_events.get(lay.index, it.step_event))
                grads = []
                for k, p in zip(active, params):
                    g = p.grad
                    assert g is not None
                    if _host_fp32(g):
                        # NOTE: clipping then scales .grad in place, as clip_grad_norm_ does
                        grads.append(g)
                        in_place_grads = True
                        continue
                    job.grad_bytes += g.numel() * g.element_size()  # bytes moved: the meter's d2h rate
                    if gflat is None:
                        gflat = self._grad_pool.acquire()
                    off, n = lay.offsets[k], lay.numels[k]
                    dst = gflat[off : off + n].view_as(p)
                    dst.copy_(g, non_blocking=True)  # pinned destination on CUDA: an asynchronous D2H copy
                    grads.append(dst)
                # Ordering: the CPU reads the host copies only after the D2H copies have landed.
                streams.host_wait(streams.record())
                if not in_place_grads:
                    self._release_grads(lay, active, streams.cpu_lane)
            job.grads_s = time.perf_counter() - t

            # 2. state: in place in the tier (a view of the arena), or in a staging buffer (prefetched for NVMe)
            t = time.perf_counter()
            if slot.staged or slot.store is None:
                state = staged = self._take_state_buffer(slot)
                rows = _row_views(slot, state)
            else:
                state, rows = self._in_place_rows(slot)
            job.state_in_s = time.perf_counter() - t
            job.state_bytes = state.numel() * 4

            # 3. clip, 4. update
            t = time.perf_counter()
            if it.coef_cpu is not None:
                torch._foreach_mul_(grads, it.coef_cpu)  # as clip_grad_norm_ does
            steps = _advance_steps(slot, active)
            self._cpu_kernel(_update_tensors(slot, rows, active, params, grads, steps), hyper)
            job.kernel_s = time.perf_counter() - t
            if in_place_grads:
                self._release_grads(lay, active, None)

            # 5. parameters <- master weights (nothing to do when the parameters are the master weights)
            t = time.perf_counter()
            if not slot.master_is_param:
                with streams.use(streams.cpu_lane):
                    job.param_bytes = self._scatter_params(lay, state[MASTER], active)
                    # Ordering: the H2D copies read `state`; it is not reused or written back before they land.
                    streams.host_wait(streams.record())
            job.params_s = time.perf_counter() - t
        except BaseException:
            if staged is not None:
                assert self._state_pool is not None
                self._state_pool.release(_flat_base(staged))
            raise
        finally:
            if gflat is not None:
                self._grad_pool.release(gflat)

        # 6. write back behind (staged), nothing to do in place
        if staged is not None:
            self._write_behind(slot, staged, job)

    def _in_place_rows(self, slot: _Slot) -> tuple[torch.Tensor, tuple[list[torch.Tensor], ...]]:
        """The stored rows of a memory-tier subgroup as the tier's own bytes (``view``), and their per-parameter
        views; both cached for the slot's handle (a view stays valid while its handle is live, and in-place
        updates keep the handle: only a put, which makes a new handle, moves the bytes)."""
        assert slot.store is not None and slot.handle is not None
        cached = slot.in_place
        if cached is not None and cached[0] is slot.handle and not slot.store.closed:
            return cached[1], cached[2]
        view = _view_fn(slot.store)
        assert view is not None
        state = view(slot.handle)
        rows = _row_views(slot, state)
        slot.in_place = (slot.handle, state, rows)
        return state, rows

    def _write_behind(self, slot: _Slot, state: torch.Tensor, job: _Job) -> None:
        """Write a staged subgroup's state back on the writer thread; the staging buffer returns to the pool.

        Ordering: the writer runs jobs in submission order and step() waits for all of them before the next
        read of any handle (the next iteration, a checkpoint), so a reader always sees the newest state.
        """

        def write() -> None:
            assert self._state_pool is not None
            t = time.perf_counter()
            try:
                self._write_stored(slot, state)  # put (new handle), then free the old one
            finally:
                self._state_pool.release(_flat_base(state))
            with self._lock:
                job.state_out_s += time.perf_counter() - t

        with self._lock:
            self._writes.append(self._writer.submit(write))

    def _device_buffer(self, key: str, numel: int) -> torch.Tensor:
        """A device working buffer of at least ``numel`` fp32 elements, cached for the rest of this step."""
        buf = self._device_cache.get(key)
        if buf is None or buf.numel() < numel:
            if buf is not None:
                self._device_cache_bytes -= buf.numel() * 4
            buf = torch.empty(numel, dtype=torch.float32, device=self.device)
            self._device_cache[key] = buf
            self._device_cache_bytes += numel * 4
        return buf[:numel]

    def _device_update(self, it: _Iteration, slot: _Slot, hyper: AdamWHyper, job: _Job) -> None:
        lay = slot.layout
        active = self._active(lay)
        if not active:
            return
        params = [self._params[lay.params[k]] for k in active]
        streams = self._streams
        with streams.use(streams.device_lane):
            # Ordering: everything below runs on the device lane's stream, after backward produced the grads.
            streams.wait(it.grad_events.get(lay.index, it.step_event))

            # 1. gradients: used in place when fp32, else upcast into a device buffer
            t = time.perf_counter()
            grads = []
            upcast = None
            for k, p in zip(active, params):
                g = p.grad
                assert g is not None
                if g.dtype != torch.float32:
                    if upcast is None:
                        upcast = self._device_buffer("grads", lay.numel)
                    off, n = lay.offsets[k], lay.numels[k]
                    g = upcast[off : off + n].view_as(p).copy_(g)
                grads.append(g)
            job.grads_s = time.perf_counter() - t

            # 2. state onto the device
            t = time.perf_counter()
            if slot.tier == "device":
                assert slot.resident is not None
                state = slot.resident
            else:
                state = _rows(self._device_buffer("state", slot.rows * lay.numel), lay.numel, slot.rows)
                self._read_stored(slot, state)
                job.state_bytes = state.numel() * 4
            job.state_in_s = time.perf_counter() - t

            # 3. clip, 4. update
            t = time.perf_counter()
            if it.coef is not None:
                torch._foreach_mul_(grads, it.coef.to(self.device))  # in place on .grad, as clip_grad_norm_
            steps = _advance_steps(slot, active)
            rows = _row_views(slot, state)
            self._device_kernel(_update_tensors(slot, rows, active, params, grads, steps), hyper)
            if streams.cuda:
                streams.host_wait(streams.record())  # for the timing only: the kernel has run
            job.kernel_s = time.perf_counter() - t

            # 5. parameters <- master weights (device to device)
            t = time.perf_counter()
            if not slot.master_is_param:
                job.param_bytes = self._scatter_params(lay, state[MASTER], active)
            job.params_s = time.perf_counter() - t

            # 6. state back to its tier
            t = time.perf_counter()
            if slot.tier != "device":
                # put() enqueues the D2H copy on this (the lane's) stream: later work on the stream that
                # reuses the buffer is ordered after it (the TierStore contract)
                self._write_stored(slot, state)
                streams.host_wait(streams.record())
            job.state_out_s = time.perf_counter() - t
            self._release_grads(lay, active, streams.device_lane)

    # ---- step ---------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Finish this iteration's updates (start those not started in backward) and wait for all of them."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_open()
        with self._lock:
            it = self._iter
            if it is None:
                it = self._iter = _Iteration(len(self._params), self._layouts)
            it.in_step = True
            if it.t0 is None:
                it.t0 = time.perf_counter()
        try:
            self._finish(it)
        finally:
            with self._lock:
                self._iter = None
        return loss

    def _finish(self, it: _Iteration) -> None:
        # Ordering: gradients no hook saw complete (set by hand, or fewer micro-batches than grad_accum) were
        # produced on the caller's stream before step(); the lanes wait on this event for them.
        it.step_event = self._streams.record()
        pending = [lay.index for lay in self._layouts if lay.index not in it.dispatched]
        with_grads = [s for s in pending if self._active(self._layouts[s])]
        it.skipped = [s for s in pending if s not in with_grads]
        if self.settings.max_grad_norm is not None:
            self._clip_coefficient(it)
        inline: list[_InlineJob] = []
        with self._lock:
            if it.schedule is None:
                it.schedule = self._decide(it, "step")
            # readiness order: completed subgroups as they completed, then the rest in the expected order
            done_order = sorted(it.ready_s, key=lambda s: it.ready_s[s])
            rest = [s for s in it.schedule.order if s not in it.ready_s]
            for s in done_order + rest:
                if s in with_grads:
                    self._dispatch(it, s, inline)
        inline_errors: list[BaseException] = []
        if inline:
            # The calling thread, which would only wait here, is the CPU lane for the rest of step(): no hand-off
            # to the lane thread and back per job (each a wake-up, costly on a loaded machine).
            # Ordering: jobs handed to the lane thread during backward finish first (the lane's submission order).
            if it.cpu_lane_futures:
                wait_futures(it.cpu_lane_futures)
            for job in inline:
                try:
                    self._run_job(it, job.index, "cpu", job.hyper)
                except Exception as exc:  # noqa: BLE001 - raised below, after every job has been waited for
                    inline_errors.append(exc)
        errors: list[BaseException] = []
        for fut in it.futures:
            try:
                fut.result()
            except BaseException as exc:  # noqa: BLE001 - wait for every job, raise the first error
                errors.append(exc)
        errors += inline_errors  # the lane's jobs ran first
        self._drain_writes(errors)
        # Ordering: the host waits for both lanes' streams, so the next forward (any stream) sees the new
        # parameters and the CPU may read state the device lane wrote back.
        self._streams.synchronize()
        self._release_device_cache()
        if errors:
            self._cancel_prefetches()
            raise errors[0]
        self._record(it)
        if self._state_pool is None:
            return  # nothing is staged: nothing to read ahead
        # the next iteration's first staged subgroups, read while forward and backward run
        nxt = _Iteration(len(self._params), self._layouts)
        nxt.cpu_pending = [
            i for i in self._order if it.schedule is not None and it.schedule.sides[i] == "cpu"
        ]
        self._prefetch_ahead(nxt)

    def _clip_coefficient(self, it: _Iteration) -> None:
        """Global 2-norm over every gradient, in parameter order, as torch.nn.utils.clip_grad_norm_."""
        max_norm = self.settings.max_grad_norm
        assert max_norm is not None
        norms = []
        for pid, p in enumerate(self._params):
            if p.grad is None:
                continue
            norm = it.norms.get(pid)
            if norm is None:  # fewer backward passes than grad_accum, or a gradient set by hand
                norm = torch._foreach_norm([p.grad], 2.0)[0]
            norms.append(norm)
        if not norms:
            return
        total = torch.linalg.vector_norm(torch.stack([n.to(self.device) for n in norms]), 2.0)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        it.coef = coef
        it.coef_cpu = coef.to("cpu")
        it.grad_norm = float(total)
        self.last_grad_norm = total

    def _drain_writes(self, errors: list[BaseException]) -> None:
        with self._lock:
            writes, self._writes = self._writes, []
        for fut in writes:
            try:
                fut.result()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

    def _release_device_cache(self) -> None:
        # the device lane's buffers are freed each step: device memory is lent only during the update
        self._device_cache.clear()
        self._device_cache_bytes = 0

    def _cancel_prefetches(self) -> None:
        with self._lock:
            prefetched, self._prefetched = self._prefetched, {}
        for i, buf in prefetched.items():
            slot = self._slots[i]
            with contextlib.suppress(Exception):
                if slot.store is not None and slot.handle is not None:
                    slot.store.get(slot.handle, out=buf)  # completes the read before the buffer is reused
            if self._state_pool is not None:
                self._state_pool.release(_flat_base(buf))

    def _record(self, it: _Iteration) -> None:
        """Log iteration ``it`` and learn from it: its readiness order now, its records and rates per batch."""
        assert it.schedule is not None
        # only what the record needs: the iteration's norms and futures are released now
        done = _Unlogged(
            iteration=self.iteration, schedule=it.schedule, jobs=it.jobs, rates=self._meter.rates,
            grad_norm=it.grad_norm, coef_cpu=it.coef_cpu, skipped=tuple(it.skipped),
        )  # fmt: skip
        with self._lock:  # _flush_records may run on another thread (schedule_log, throughputs)
            self._unlogged.append(done)
            pending = len(self._unlogged)
        # expected readiness of the next iteration: this one's observed order and times
        if it.ready_s:
            seen = sorted(it.ready_s, key=lambda s: it.ready_s[s])
            order = tuple(seen + [s for s in self._order if s not in it.ready_s])
            if order != self._order:  # the same object while unchanged (_decide compares it)
                self._order = order
            self._ready_s = dict(it.ready_s)
        self.iteration += 1
        # NOTE: a forced schedule never reads the measured rates, so its iterations are logged and folded into
        # the rates in batches: right after an update's sweep through memory every line of this bookkeeping
        # runs from cold caches (~0.1 ms an iteration here), in a batch it runs warm. The scheduler ("auto")
        # decides from the rates, so its iterations are folded in at once, and so is any fallback (logged).
        if self.settings.schedule == "auto" or pending >= _RECORD_BATCH or any(j.fallback for j in it.jobs):
            self._flush_records()

    def _flush_records(self) -> None:
        """Turn the iterations not yet logged into IterationRecords and fold their jobs into the rates."""
        with self._lock:
            pending, self._unlogged = self._unlogged, []
        for it in pending:
            iteration = it.iteration
            jobs = tuple(
                JobRecord(
                    index=j.index, side=j.side, numel=j.numel, start_s=j.start, end_s=j.end, kernel_s=j.kernel_s,
                    grads_s=j.grads_s, state_in_s=j.state_in_s, state_out_s=j.state_out_s, params_s=j.params_s,
                    state_bytes=j.state_bytes, grad_bytes=j.grad_bytes, param_bytes=j.param_bytes,
                    staged=j.staged, tier=j.tier, fallback=j.fallback,
                )
                for j in sorted(it.jobs, key=lambda j: j.start)
            )  # fmt: skip
            wall = max((j.end_s for j in jobs), default=0.0)
            record = IterationRecord(
                iteration=iteration,
                schedule=it.schedule,
                jobs=jobs,
                rates=it.rates,
                wall_s=wall,
                grad_norm=it.grad_norm,
                clip_coef=None if it.coef_cpu is None else float(it.coef_cpu),
                skipped=it.skipped,
            )
            self._log.append(record)
            self._meter.update(jobs)
            if record.fallbacks:
                logger.info(
                    "iteration %d: subgroups %s fell back to the CPU (device memory)",
                    iteration,
                    list(record.fallbacks),
                )
            if logger.isEnabledFor(logging.DEBUG):  # the arguments cost time on every step
                logger.debug(
                    "iteration %d done: %.4f s (predicted %.4f s), cpu busy %.4f s, device busy %.4f s",
                    iteration, wall, it.schedule.predicted_s, record.busy_s("cpu"), record.busy_s("device"),
                )  # fmt: skip

    @property
    def schedule_log(self) -> collections.deque[IterationRecord]:
        """One record per step() (the newest ``settings.log_limit``): the decision and what each job did."""
        self._flush_records()
        return self._log

    def zero_grad(self, set_to_none: bool = True) -> None:
        with self._lock:
            if self._iter is not None and self._iter.started:
                raise OptimizerOffloadError(
                    "updates of this iteration already started in backward; call step() before zero_grad()",
                    field="zero_grad",
                )
            self._iter = None  # nothing dispatched: forget the micro-batch counts
        # NOTE: after step() no parameter has a gradient (each was dropped once consumed) unless free_grads is
        # off or the caller set one since: then there is nothing to clear, and torch's zero_grad (a profiler
        # record, the groups walked) is skipped
        if set_to_none and all(p.grad is None for p in self._params):
            return
        super().zero_grad(set_to_none=set_to_none)

    # ---- introspection ------------------------------------------------------------------------------------------

    @property
    def updates_started(self) -> int:
        """Subgroups of the current iteration already handed to a lane (in backward, before step())."""
        with self._lock:
            return 0 if self._iter is None else len(self._iter.dispatched)

    @property
    def subgroups(self) -> tuple[SubgroupLayout, ...]:
        return self._layouts

    @property
    def subgroup_tiers(self) -> tuple[str, ...]:
        return tuple(s.tier for s in self._slots)

    @property
    def throughputs(self) -> Throughputs:
        self._flush_records()
        return self._meter.rates

    def subgroup_state(self, index: int) -> torch.Tensor:
        """A host copy of subgroup ``index``'s [3, n] state (master weights, exp_avg, exp_avg_sq)."""
        self._require_idle("subgroup_state")
        slot = self._slots[index]
        return self._load_state(slot, torch.empty(STATE_ROWS, slot.layout.numel, dtype=torch.float32))

    def _require_idle(self, what: str) -> None:
        self._check_open()
        with self._lock:
            if self._iter is not None and self._iter.started:
                raise OptimizerOffloadError(
                    f"{what}() during an iteration whose updates started; call step() first", field=what
                )
        self._cancel_prefetches()

    def _check_open(self) -> None:
        if getattr(self, "_removed", False):
            raise OptimizerOffloadError("the offloaded optimizer was removed", field="remove")

    # ---- state dict ---------------------------------------------------------------------------------------------

    def _packed_groups(self) -> list[dict[str, Any]]:
        out, start = [], 0
        for g in self.param_groups:
            packed = {k: v for k, v in g.items() if k != "params"}
            packed["params"] = list(range(start, start + len(g["params"])))
            start += len(g["params"])
            out.append(packed)
        return out

    def state_dict(self) -> dict[str, Any]:
        """torch.optim.AdamW's format: per-parameter ``step``/``exp_avg``/``exp_avg_sq`` (+ ``master`` when the
        parameter is not fp32), gathered from every tier (NVMe included), one subgroup at a time."""
        self._require_idle("state_dict")
        state: dict[int, dict[str, torch.Tensor]] = {}
        for slot in self._slots:
            lay = slot.layout
            if not any(slot.steps):
                continue
            host = self._load_state(slot, torch.empty(STATE_ROWS, lay.numel, dtype=torch.float32))
            for k, pid in enumerate(lay.params):
                step = slot.steps[k]
                if step == 0:
                    continue  # no state yet, as torch's AdamW before a parameter's first update
                p = self._params[pid]
                off, n = lay.offsets[k], lay.numels[k]
                entry = {
                    "step": torch.tensor(step, dtype=torch.float32),
                    "exp_avg": host[EXP_AVG, off : off + n].view(p.shape).clone(),
                    "exp_avg_sq": host[EXP_AVG_SQ, off : off + n].view(p.shape).clone(),
                }
                if p.dtype != torch.float32:
                    entry["master"] = host[MASTER, off : off + n].view(p.shape).clone()
                state[pid] = entry
        return {"state": state, "param_groups": self._packed_groups()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load torch's AdamW format (ours or torch.optim.AdamW's); the state goes to each subgroup's tier."""
        self._require_idle("load_state_dict")
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise OptimizerOffloadError(
                f"has {len(groups) if isinstance(groups, list) else groups!r} groups, the optimizer has "
                f"{len(self.param_groups)}",
                field="state_dict.param_groups",
            )
        for g, (mine, theirs) in enumerate(zip(self.param_groups, groups)):
            if len(theirs.get("params", ())) != len(mine["params"]):
                raise OptimizerOffloadError(
                    f"has {len(theirs.get('params', ()))} parameters, the optimizer's group has {len(mine['params'])}",
                    field=f"state_dict.param_groups[{g}].params",
                )
        saved_ids = [pid for g in groups for pid in g["params"]]
        by_saved = dict(zip(saved_ids, range(len(self._params))))
        state = {by_saved[k]: v for k, v in state_dict.get("state", {}).items() if k in by_saved}
        for mine, theirs in zip(self.param_groups, groups):
            for key, value in theirs.items():
                if key == "params":
                    continue
                mine[key] = tuple(value) if key == "betas" else value
        self._validate_groups()
        buf = torch.empty(STATE_ROWS * self._max_numel, dtype=torch.float32)
        with torch.no_grad():
            for slot in self._slots:
                lay = slot.layout
                rows = _rows(buf, lay.numel)
                self._gather_params(lay, rows[MASTER])
                rows[EXP_AVG:].zero_()
                steps = [0.0] * len(lay.params)
                for k, pid in enumerate(lay.params):
                    entry = state.get(pid)
                    if not entry:
                        continue
                    p = self._params[pid]
                    off, n = lay.offsets[k], lay.numels[k]
                    for key, row in (("master", MASTER), ("exp_avg", EXP_AVG), ("exp_avg_sq", EXP_AVG_SQ)):
                        value = entry.get(key)
                        if value is None:
                            continue
                        if value.numel() != n:
                            raise OptimizerOffloadError(
                                f"has {value.numel()} elements, parameter {pid} has {n} ({tuple(p.shape)})",
                                field=f"state_dict.state[{pid}].{key}",
                            )
                        rows[row, off : off + n].copy_(value.reshape(-1))
                    steps[k] = float(entry.get("step", 0))
                slot.steps = steps
                self._store_state(slot, rows)
        self._synchronize_stores()

    def _synchronize_stores(self) -> None:
        for store in self.stores.values():
            store.synchronize()

    # ---- checkpoint file -----------------------------------------------------------------------------------

    def _checkpoint_header(self) -> dict[str, Any]:
        return {
            "format": _CHECKPOINT_FORMAT,
            "version": 1,
            "param_groups": [_jsonable_group(g) for g in self._packed_groups()],
            "params": [
                {"shape": list(p.shape), "dtype": str(p.dtype).replace("torch.", "")} for p in self._params
            ],
            "subgroup_size": self.placement.subgroup_size,
            "subgroups": [
                {
                    "index": s.layout.index,
                    "params": list(s.layout.params),
                    "numel": s.layout.numel,
                    "steps": list(s.steps),
                    "tier": s.tier,
                }
                for s in self._slots
            ],
            "cpu_kernel": self.cpu_kernel_name,
            "iteration": self.iteration,
        }

    def save_checkpoint(self, path: str) -> None:
        """Stream every subgroup's state (from whichever tier) to ``path``, written then renamed into place."""
        self._require_idle("save_checkpoint")
        header = self._checkpoint_header()
        flat = torch.empty(STATE_ROWS * self._max_numel, dtype=torch.float32)

        def blocks() -> Iterator[torch.Tensor]:
            for slot in self._slots:
                yield self._load_state(slot, _rows(flat, slot.layout.numel))

        write_checkpoint(path, header, blocks())
        logger.info("optimizer state of %d subgroups saved to %s", len(self._slots), path)

    def load_checkpoint(self, path: str, *, restore_params: bool = True) -> None:
        """Load a checkpoint written by ``save_checkpoint`` for the same parameters and subgroups.

        With ``restore_params`` the model parameters are set from the saved fp32 master weights (so a model
        restored from its own checkpoint agrees with them exactly).
        """
        self._require_idle("load_checkpoint")
        header, n_blocks, read = read_checkpoint(path)
        if header.get("format") != _CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"format {header.get('format')!r} is not {_CHECKPOINT_FORMAT!r}", source=path, field="format"
            )
        mine = self._checkpoint_header()
        if header.get("params") != mine["params"]:
            raise CheckpointError(
                f"parameters differ: the file has {len(header.get('params', []))}, the optimizer "
                f"{len(mine['params'])} (or their shapes/dtypes differ)",
                source=path,
                field="params",
            )
        theirs = header.get("subgroups", [])
        if n_blocks != len(self._slots) or len(theirs) != len(self._slots):
            raise CheckpointError(
                f"has {len(theirs)} subgroups, the optimizer {len(self._slots)} (subgroup_size "
                f"{header.get('subgroup_size')} vs {self.placement.subgroup_size}); load it with the same plan",
                source=path,
                field="subgroups",
            )
        for i, (a, b) in enumerate(zip(theirs, mine["subgroups"])):
            if a.get("params") != b["params"] or a.get("numel") != b["numel"]:
                raise CheckpointError(
                    "covers other parameters than this optimizer's", source=path, field=f"subgroups[{i}]"
                )
        if header.get("cpu_kernel") != self.cpu_kernel_name:
            logger.warning(
                "checkpoint %s was written with the %s kernel, resuming with %s: not bit-identical",
                path,
                header.get("cpu_kernel"),
                self.cpu_kernel_name,
            )
        for mine_g, saved in zip(self.param_groups, header["param_groups"]):
            for key, value in saved.items():
                if key != "params":
                    mine_g[key] = tuple(value) if key == "betas" else value
        flat = torch.empty(STATE_ROWS * self._max_numel, dtype=torch.float32)
        with torch.no_grad():
            for slot, meta in zip(self._slots, theirs):
                rows = _rows(flat, slot.layout.numel)
                read(slot.layout.index, rows)
                slot.steps = [float(x) for x in meta["steps"]]
                if restore_params:
                    self._scatter_params(slot.layout, rows[MASTER])
                # NOTE: when the parameters are the master weights (fp32 on a CPU device, or device-resident
                # state), restore_params=False keeps the model's parameters as the master weights
                self._store_state(slot, rows)
        self.iteration = int(header.get("iteration", 0))
        self._synchronize_stores()
        if self._streams.cuda:
            torch.cuda.synchronize(self.device)

    # ---- teardown ------------------------------------------------------------------------------------------

    def remove(self) -> None:
        """Remove the hooks, stop the lanes, free the state and close the stores this optimizer built.

        NOTE: the state is gone afterwards; save it first (``state_dict``/``save_checkpoint``) to keep it.
        """
        if getattr(self, "_removed", True):
            return
        self._removed = True
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for lane in (self._cpu_lane, self._device_lane, self._writer):
            lane.shutdown(wait=True)
        self._cancel_prefetches()
        for slot in self._slots:
            if slot.store is not None and slot.handle is not None and not slot.store.closed:
                with contextlib.suppress(Exception):
                    slot.store.free(slot.handle)
            slot.handle = None
            slot.in_place = None
            slot.resident = None
        self._close_stores()
        if self._state_pool is not None:
            self._state_pool.clear()
        self._grad_pool.clear()
        kernel_close = getattr(self._cpu_kernel, "close", None)
        if callable(kernel_close):
            kernel_close()

    def _close_stores(self) -> None:
        for store in self._owned_stores.values():
            with contextlib.suppress(Exception):
                store.close()
        self._owned_stores.clear()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.remove()


# ---- helpers ---------------------------------------------------------------------------------------------------


def _row_views(slot: _Slot, state: torch.Tensor) -> tuple[list[torch.Tensor], ...]:
    """For each stored row of ``state`` ([slot.rows, n]), every parameter's slice shaped like the parameter."""
    lay = slot.layout
    return tuple(
        [row[off : off + n].view(shape) for off, n, shape in zip(lay.offsets, lay.numels, slot.shapes)]
        for row in state.unbind()
    )


def _advance_steps(slot: _Slot, active: Sequence[int]) -> list[float]:
    """Count one more step for the active parameters; their new step counts."""
    steps = slot.steps
    for k in active:
        steps[k] += 1.0
    return [steps[k] for k in active]


def _update_tensors(
    slot: _Slot,
    rows: Sequence[list[torch.Tensor]],
    active: Sequence[int],
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    steps: Sequence[float],
) -> AdamWTensors:
    """The kernel's operands for the active parameters of a subgroup whose stored rows are ``rows``
    (per-parameter views, ``_row_views``). Parameters are passed as themselves (updated in place under
    no_grad, as torch's AdamW does) when they are the master weights."""
    m_row, v_row = slot.moment_rows
    if len(active) == len(slot.layout.params):
        pick: Callable[[list[torch.Tensor]], list[torch.Tensor]] = list
    else:

        def pick(views: list[torch.Tensor]) -> list[torch.Tensor]:
            return [views[k] for k in active]

    return AdamWTensors(
        params=list(params) if slot.master_is_param else pick(rows[MASTER]),
        grads=grads,
        exp_avgs=pick(rows[m_row]),
        exp_avg_sqs=pick(rows[v_row]),
        steps=steps,
    )


def _host_fp32(t: torch.Tensor) -> bool:
    """A dense, contiguous fp32 CPU tensor: what the CPU kernels can read in place."""
    return (
        t.device.type == "cpu"
        and t.dtype == torch.float32
        and t.layout == torch.strided
        and t.is_contiguous()
    )


def _flat_base(t: torch.Tensor) -> torch.Tensor:
    """The pool buffer a [3, n] view was carved from (views share its storage; pools hand out whole buffers)."""
    base = t._base if t._base is not None else t
    return base


def _view_fn(store: TierStore) -> Callable[[Handle], torch.Tensor] | None:
    """The store's in-place view of a handle's bytes, when the tier offers one (memory arenas may)."""
    fn = getattr(store, "view", None)
    return fn if callable(fn) else None


def _jsonable_group(group: dict[str, Any]) -> dict[str, Any]:
    import json

    out: dict[str, Any] = {}
    for key, value in group.items():
        if isinstance(value, torch.Tensor):
            value = value.item() if value.numel() == 1 else value.tolist()
        elif isinstance(value, tuple):
            value = list(value)
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue  # not representable; the group keeps its current value on load
        out[key] = value
    return out


def _build_store(
    tier: str, sizes: Sequence[int], tier_plans: Sequence[TierPlan], settings: OffloadSettings
) -> TierStore:
    """A tier store for the optimizer's state in ``tier``, sized to it (the plan's capacity is the cap)."""
    plan = next((t for t in tier_plans if t.kind == tier), None)
    # room for the state and its alignment (blocks are replaced free-then-put, see _store_state)
    aligned = [-(-b // _ARENA_ALIGN) * _ARENA_ALIGN for b in sizes]
    need = sum(aligned) + _ARENA_ALIGN
    if tier in ("dram", "cxl"):
        cap = need if plan is None or plan.capacity_bytes == 0 else min(need, plan.capacity_bytes)
        if plan is not None and plan.capacity_bytes and need > plan.capacity_bytes:
            raise OptimizerOffloadError(
                f"the optimizer state needs {need} bytes in {tier}, the plan caps it at {plan.capacity_bytes}",
                field=f"tiers.{tier}.capacity_bytes",
            )
        if tier == "dram":
            return make_tier("host", capacity_bytes=cap)
        return make_tier("cxl", capacity_bytes=cap, node=None if plan is None else plan.numa_node)
    if plan is None or not plan.path:
        raise OptimizerOffloadError(
            "subgroups live on NVMe but the plan has no nvme tier with a path", field="tiers.nvme.path"
        )
    return make_tier(
        "nvme",
        path=plan.path,
        capacity_bytes=plan.capacity_bytes or None,
        direct_io=plan.direct_io if plan.direct_io else None,
        chunk_bytes=plan.block_bytes if plan.block_bytes % 4096 == 0 else 1 << 20,
        checksum=plan.checksum,
        io_engine=settings.nvme_io_engine,
        build_aio=False,  # never compile DeepSpeed's aio op implicitly here
    )


def default_throughputs(device: torch.device) -> Throughputs:
    """Order-of-magnitude starting rates when no plan is given (replaced by measurements after a step)."""
    cuda = device.type == "cuda"
    return Throughputs(
        cpu_params_per_s=2e8,
        device_params_per_s=2e10 if cuda else 2e8,
        h2d_bytes_per_s=2e10 if cuda else 8e9,
        d2h_bytes_per_s=2e10 if cuda else 8e9,
        read_bytes_per_s={"nvme": 2e9, "dram": 8e9, "cxl": 4e9},
        write_bytes_per_s={"nvme": 1.5e9, "dram": 8e9, "cxl": 4e9},
        shared_compute=not cuda,
    )


def initial_throughputs(plan: Plan, device: torch.device) -> Throughputs:
    """Starting rates from the plan's cluster: the CPU Adam rate, the host link, the host tiers' bandwidths."""
    cluster = plan.cluster
    dev = cluster.device
    d = plan.workload.dtype_bytes
    # device update: memory-bound, as the step-time model (planner/steptime.py): parameters, gradients and
    # state read, parameters and state written, (3d + 2 * 12) bytes per parameter at the memory bandwidth
    device_rate = dev.memory_bandwidth / (3 * d + 2 * STATE_BYTES_PER_ELEM)
    if device.type == "cpu":
        device_rate = cluster.cpu.adam_params_per_s  # the "device" is the CPU
    reads: dict[str, float] = {t.kind: t.read_bandwidth for t in cluster.host}
    writes: dict[str, float] = {t.kind: t.write_bandwidth for t in cluster.host}
    return Throughputs(
        cpu_params_per_s=cluster.cpu.adam_params_per_s,
        device_params_per_s=device_rate,
        h2d_bytes_per_s=dev.host_link.bandwidth,
        d2h_bytes_per_s=dev.host_link.bandwidth,
        read_bytes_per_s=reads,
        write_bytes_per_s=writes,
        shared_compute=device.type == "cpu",
    )


def offload_optimizer(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    plan: Plan,
    *,
    stores: Mapping[str, TierStore] | None = None,
    settings: OffloadSettings | None = None,
    free_device_bytes: Callable[[Phase], int] | None = None,
) -> OffloadedAdamW:
    """Carry out ``plan.optimizer``: an ``OffloadedAdamW`` over ``optimizer``'s parameter groups.

    ``optimizer`` must be a ``torch.optim.AdamW`` (its groups are shared, so a scheduler on it still drives
    the learning rate); its state, if any, is moved into the tiers. Use the returned optimizer for
    ``step()``/``zero_grad()``/``state_dict()``; ``remove()`` undoes the hooks and frees the state.
    Settings default from the plan: ``grad_accum`` from ``plan.layout``, ``max_grad_norm`` and ``cpu_kernel``
    from ``plan.optimizer.settings`` when present.
    """
    if not isinstance(plan, Plan):
        raise OptimizerOffloadError(f"expected a planner.plan.Plan, got {type(plan).__name__}", field="plan")
    if not isinstance(optimizer, torch.optim.AdamW):
        raise OptimizerOffloadError(
            f"optimizer offload carries out AdamW; got {type(optimizer).__name__}", field="optimizer"
        )
    placement = plan.optimizer
    if placement.kind != "adamw":
        raise OptimizerOffloadError(
            f"offload supports kind 'adamw', the plan has {placement.kind!r}", field="optimizer.kind"
        )
    model_params = {id(p) for p in model.parameters()}
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            if id(p) not in model_params:
                raise OptimizerOffloadError(
                    "is not a parameter of the model", field=f"param_groups[{g}].params[{i}]"
                )
    if settings is None:
        opts = placement.settings
        settings = OffloadSettings(
            grad_accum=plan.layout.grad_accum,
            max_grad_norm=opts.get("max_grad_norm"),
            cpu_kernel=opts.get("cpu_kernel", "auto"),
        )
    device = next(iter(model.parameters())).device
    saved = optimizer.state_dict() if optimizer.state else None
    wrapped = OffloadedAdamW(
        [dict(g) for g in optimizer.param_groups],
        placement=placement,
        tier_plans=plan.tiers,
        stores=stores,
        settings=settings,
        throughputs=initial_throughputs(plan, device),
        free_device_bytes=free_device_bytes,
        share_param_groups=optimizer.param_groups,
    )
    if saved is not None:
        wrapped.load_state_dict(saved)
        optimizer.state.clear()  # the state now lives in the tiers
    return wrapped
