"""``OffloadedAdamW``: the optimizer that composes the parts of ``offload.optimizer`` (see the package doc).

It owns the hooks (a subgroup is handed to a lane when its gradients are complete), ``step()`` (the updates
left, clipping, waiting for the lanes) and the ``torch.optim.Optimizer`` surface; where the state lives is
``residency``, the updates are ``lanes``, the CPU/device split ``scheduler``, the state dict and checkpoint
``checkpoint``.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import wait as wait_futures
from typing import Any

import torch
from torch import nn

from offload.optimizer import checkpoint
from offload.optimizer.clipping import clip_coefficient, subgroup_norms
from offload.optimizer.iteration import Iteration
from offload.optimizer.kernels import AdamWHyper, make_kernel, select_cpu_kernel
from offload.optimizer.lanes import InlineJob, Lanes, Streams
from offload.optimizer.layout import STATE_ROWS, TIERS, SubgroupLayout, build_slots, partition_subgroups
from offload.optimizer.params import active_params, params_into_huge_pages
from offload.optimizer.records import IterationRecord
from offload.optimizer.residency import StateResidency
from offload.optimizer.schedule import Phase, Schedule, Throughputs, default_throughputs
from offload.optimizer.scheduler import Scheduler, free_device_bytes
from offload.optimizer.settings import OffloadSettings, OptimizerOffloadError, validate_groups
from offload.tiers import TierStore
from planner.plan import OptimizerPlan, TierPlan

__all__ = ["OffloadedAdamW"]

logger = logging.getLogger("memtier.offload.optimizer")


class OffloadedAdamW(torch.optim.Optimizer):
    """AdamW with offloaded, interleaved optimizer state (see the package docstring).

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
            self._share_groups(share_param_groups, defaults)
        self._settings = settings or OffloadSettings()
        if tier not in TIERS:
            raise OptimizerOffloadError(f"must be one of {TIERS}, got {tier!r}", field="tier")
        self.placement = placement or OptimizerPlan(
            offload=tier != "device",
            tier=tier,  # type: ignore[arg-type]  # checked against TIERS above
            subgroup_size=subgroup_size,
        )
        validate_groups(self.param_groups)
        self._params: list[nn.Parameter] = [p for g in self.param_groups for p in g["params"]]
        devices = {p.device for p in self._params}
        if len(devices) != 1:
            raise OptimizerOffloadError(
                f"all parameters must be on one device, got {sorted(map(str, devices))}", field="params"
            )
        self.device = devices.pop()
        self._build(stores, tier_plans, throughputs, free_device_bytes)
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._make_hook(i)) for i, p in enumerate(self._params)
        ]
        self._removed = False
        self._built = True
        logger.info(
            "offloaded AdamW: %d parameters in %d subgroups (size %d), tiers %s, CPU kernel %s, device %s",
            sum(lay.numel for lay in self._layouts), len(self._layouts), self.placement.subgroup_size,
            dict(collections.Counter(self.subgroup_tiers)), self.cpu_kernel_name, self.device,
        )  # fmt: skip

    def _share_groups(self, share_param_groups: list[dict[str, Any]], defaults: dict[str, Any]) -> None:
        # NOTE: the groups are the wrapped optimizer's own dicts, so an LR scheduler built on either
        # optimizer drives this one; only the hyper-parameters are read from them.
        for mine, theirs in zip(self.param_groups, share_param_groups):
            if [id(p) for p in mine["params"]] != [id(p) for p in theirs["params"]]:
                raise OptimizerOffloadError("differ from the optimizer's", field="share_param_groups")
            for key, value in defaults.items():
                theirs.setdefault(key, value)
        self.param_groups = share_param_groups

    def _build(
        self,
        stores: Mapping[str, TierStore] | None,
        tier_plans: Sequence[TierPlan],
        throughputs: Throughputs | None,
        probe: Callable[[Phase], int] | None,
    ) -> None:
        """The parts: subgroups, kernels, the state in its tiers, the lanes, the scheduler."""
        settings = self._settings
        self._streams = Streams(self.device)
        self._layouts = partition_subgroups(
            [[p.numel() for p in g["params"]] for g in self.param_groups], self.placement.subgroup_size
        )
        self._sub_of = [0] * len(self._params)
        for lay in self._layouts:
            for pid in lay.params:
                self._sub_of[pid] = lay.index
        max_numel = max((lay.numel for lay in self._layouts), default=0)

        # kernels
        self.cpu_kernel_name = select_cpu_kernel(settings.cpu_kernel, build=settings.build_kernels)
        cpu_kernel = make_kernel(self.cpu_kernel_name, build=settings.build_kernels)
        self.params_in_huge_pages = (
            params_into_huge_pages(self._params, self.device) if settings.huge_page_params else 0
        )

        # tiers and state; one lock for the iteration, the prefetched buffers, the writes and the log
        self._lock = threading.RLock()
        slots = build_slots(self._layouts, self._params, self.placement, self.device)
        self._states = StateResidency(
            slots=slots, params=self._params, stores=stores, tier_plans=tier_plans, settings=settings,
            device=self.device, lock=self._lock, max_numel=max_numel,
        )  # fmt: skip
        self.stores = self._states.stores

        # lanes, scheduling
        self._free_device_bytes_fn = probe
        self._lanes = Lanes(
            params=self._params, states=self._states, streams=self._streams, settings=settings,
            cpu_kernel=cpu_kernel, max_numel=max_numel, free_device_bytes=self.free_device_bytes, lock=self._lock,
        )  # fmt: skip
        self._scheduler = Scheduler(
            slots=slots, params=self._params, device=self.device, settings=settings,
            throughputs=throughputs or default_throughputs(self.device),
            free_device_bytes=self.free_device_bytes, lock=self._lock,
        )  # fmt: skip
        self.iteration = 0
        self._iter: Iteration | None = None
        self.last_grad_norm: torch.Tensor | None = None

    @property
    def settings(self) -> OffloadSettings:
        return self._settings

    @settings.setter
    def settings(self, settings: OffloadSettings) -> None:
        # the parts read their settings at run time: a replacement (clipping, a schedule) applies from the next
        # subgroup handed over
        self._settings = settings
        self._states.settings = self._lanes.settings = self._scheduler.settings = settings

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_built", False):
            # NOTE: the subgroups, tiers and hooks are built once; a new group would need all of them re-made.
            raise OptimizerOffloadError(
                "cannot add a parameter group after construction", field="param_groups"
            )
        super().add_param_group(param_group)

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
                it = self._iter = Iteration(len(self._params), self._layouts)
            s = self._sub_of[pid]
            if not it.complete(pid, s, self.settings.grad_accum):
                return
            if self.settings.max_grad_norm is not None:
                it.norms.update(subgroup_norms(self._params, self._layouts[s]))
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

    # ---- scheduling -------------------------------------------------------------------------------------------

    def free_device_bytes(self, phase: Phase) -> int:
        """Device memory the device lane may use now: the probe, less the reserve, within the budget."""
        return free_device_bytes(
            phase, device=self.device, settings=self.settings, probe=self._free_device_bytes_fn,
            cached_bytes=self._lanes.cache.nbytes,
        )  # fmt: skip

    def _decide(self, it: Iteration, phase: Phase) -> Schedule:
        """This iteration's CPU/device split (called once, at the first completed subgroup or in step())."""
        schedule = self._scheduler.decide(phase)
        it.cpu_pending = [i for i in schedule.order if schedule.sides[i] == "cpu"]
        if logger.isEnabledFor(logging.DEBUG):  # the arguments cost time on every step
            logger.debug(
                "iteration %d (%s): %s, %d/%d subgroups on the device, predicted %.4f s, free device %d B",
                self.iteration, phase, schedule.strategy, len(schedule.device_subgroups), len(schedule.sides),
                schedule.predicted_s, schedule.free_device_bytes,
            )  # fmt: skip
        self._states.prefetch_ahead(it.cpu_pending)
        return schedule

    def _dispatch(self, it: Iteration, s: int, inline: list[InlineJob] | None = None) -> None:
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
        if side == "cpu" and inline is not None and self._states.slots[s].tier != "device":
            inline.append(InlineJob(index=s, hyper=hyper))
            return
        self._lanes.submit(it, s, side, hyper, threads)

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
                it = self._iter = Iteration(len(self._params), self._layouts)
            it.in_step = True
            if it.t0 is None:
                it.t0 = time.perf_counter()
        try:
            self._finish(it)
        finally:
            with self._lock:
                self._iter = None
        return loss

    def _finish(self, it: Iteration) -> None:
        # Ordering: gradients no hook saw complete (set by hand, or fewer micro-batches than grad_accum) were
        # produced on the caller's stream before step(); the lanes wait on this event for them.
        it.step_event = self._streams.record()
        pending = [lay.index for lay in self._layouts if lay.index not in it.dispatched]
        with_grads = [s for s in pending if active_params(self._params, self._layouts[s])]
        it.skipped = [s for s in pending if s not in with_grads]
        if self.settings.max_grad_norm is not None:
            self._clip(it)
        errors = self._run_updates(it, self._dispatch_rest(it, with_grads))
        self._states.drain_writes(errors)
        # Ordering: the host waits for both lanes' streams, so the next forward (any stream) sees the new
        # parameters and the CPU may read state the device lane wrote back.
        self._streams.synchronize()
        self._lanes.cache.clear()
        if errors:
            self._states.cancel_prefetches()
            raise errors[0]
        self._scheduler.learn(it, self.iteration)
        self.iteration += 1
        if self._states.pool is None:
            return  # nothing is staged: nothing to read ahead
        # the next iteration's first staged subgroups, read while forward and backward run
        assert it.schedule is not None
        sides = it.schedule.sides
        self._states.prefetch_ahead([i for i in self._scheduler.order if sides[i] == "cpu"])

    def _dispatch_rest(self, it: Iteration, with_grads: Sequence[int]) -> list[InlineJob]:
        """Dispatch the subgroups not started in backward; the CPU-side ones are returned to run inline."""
        inline: list[InlineJob] = []
        with self._lock:
            if it.schedule is None:
                it.schedule = self._decide(it, "step")
            # readiness order: completed subgroups as they completed, then the rest in the expected order
            done_order = sorted(it.ready_s, key=lambda s: it.ready_s[s])
            rest = [s for s in it.schedule.order if s not in it.ready_s]
            for s in done_order + rest:
                if s in with_grads:
                    self._dispatch(it, s, inline)
        return inline

    def _run_updates(self, it: Iteration, inline: Sequence[InlineJob]) -> list[BaseException]:
        """Run the inline jobs and wait for every lane job; their errors, the lanes' first."""
        inline_errors: list[BaseException] = []
        if inline:
            # The calling thread, which would only wait here, is the CPU lane for the rest of step(): no hand-off
            # to the lane thread and back per job (each a wake-up, costly on a loaded machine).
            # Ordering: jobs handed to the lane thread during backward finish first (the lane's submission order).
            if it.cpu_lane_futures:
                wait_futures(it.cpu_lane_futures)
            for job in inline:
                try:
                    self._lanes.run_job(it, job.index, "cpu", job.hyper)
                except Exception as exc:  # noqa: BLE001 - raised below, after every job has been waited for
                    inline_errors.append(exc)
        errors: list[BaseException] = []
        for fut in it.futures:
            try:
                fut.result()
            except BaseException as exc:  # noqa: BLE001 - wait for every job, raise the first error
                errors.append(exc)
        return errors + inline_errors  # the lane's jobs ran first

    def _clip(self, it: Iteration) -> None:
        """The clip coefficient of this iteration (see ``offload.optimizer.clipping``)."""
        max_norm = self.settings.max_grad_norm
        assert max_norm is not None
        clip = clip_coefficient(self._params, it.norms, max_norm, self.device)
        if clip is None:
            return
        it.coef, it.coef_cpu = clip.coef, clip.coef_cpu
        it.grad_norm = float(clip.total)
        self.last_grad_norm = clip.total

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
    def schedule_log(self) -> collections.deque[IterationRecord]:
        """One record per step() (the newest ``settings.log_limit``): the decision and what each job did."""
        return self._scheduler.log.records

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
        return tuple(s.tier for s in self._states.slots)

    @property
    def throughputs(self) -> Throughputs:
        return self._scheduler.log.rates

    def subgroup_state(self, index: int) -> torch.Tensor:
        """A host copy of subgroup ``index``'s [3, n] state (master weights, exp_avg, exp_avg_sq)."""
        self._require_idle("subgroup_state")
        slot = self._states.slots[index]
        return self._states.load_state(slot, torch.empty(STATE_ROWS, slot.layout.numel, dtype=torch.float32))

    def _require_idle(self, what: str) -> None:
        self._check_open()
        with self._lock:
            if self._iter is not None and self._iter.started:
                raise OptimizerOffloadError(
                    f"{what}() during an iteration whose updates started; call step() first", field=what
                )
        self._states.cancel_prefetches()

    def _check_open(self) -> None:
        if getattr(self, "_removed", False):
            raise OptimizerOffloadError("the offloaded optimizer was removed", field="remove")

    # ---- state dict, checkpoint file (offload.optimizer.checkpoint) ---------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch.optim.AdamW's format: per-parameter ``step``/``exp_avg``/``exp_avg_sq`` (+ ``master`` when the
        parameter is not fp32), gathered from every tier (NVMe included), one subgroup at a time."""
        self._require_idle("state_dict")
        return checkpoint.state_dict(self._states, self._params, self.param_groups)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load torch's AdamW format (ours or torch.optim.AdamW's); the state goes to each subgroup's tier."""
        self._require_idle("load_state_dict")
        checkpoint.load_state_dict(self._states, self._params, self.param_groups, state_dict)

    def _checkpoint_header(self) -> dict[str, Any]:
        return checkpoint.checkpoint_header(
            self._states, self._params, self.param_groups, subgroup_size=self.placement.subgroup_size,
            cpu_kernel=self.cpu_kernel_name, iteration=self.iteration,
        )  # fmt: skip

    def save_checkpoint(self, path: str) -> None:
        """Stream every subgroup's state (from whichever tier) to ``path``, written then renamed into place."""
        self._require_idle("save_checkpoint")
        checkpoint.save_checkpoint(path, self._checkpoint_header(), self._states)

    def load_checkpoint(self, path: str, *, restore_params: bool = True) -> None:
        """Load a checkpoint written by ``save_checkpoint`` for the same parameters and subgroups.

        With ``restore_params`` the model parameters are set from the saved fp32 master weights (so a model
        restored from its own checkpoint agrees with them exactly).
        """
        self._require_idle("load_checkpoint")
        self.iteration = checkpoint.load_checkpoint(
            path, self._states, self._params, self.param_groups, mine=self._checkpoint_header(),
            restore_params=restore_params,
        )  # fmt: skip
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
        self._lanes.shutdown()
        self._states.stop_writer()
        self._states.free()
        self._lanes.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.remove()
